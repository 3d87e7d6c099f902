"""Instances from pixel embeddings (EmbedSeg): clustering around seeds.

The maps hold the five ``E`` planes (``lib/reader/targets_embedding.py``): per pixel an offset
(``Ey``, ``Ex``) that embeds it at ``e = position + offset``, a bandwidth (``Esy``, ``Esx``) and
a seediness (``Eseed``). :func:`cluster_instances`:

1. The object mask is ``Eseed > foreground``; every mask pixel starts *unclustered*.
2. Seeds, in decreasing seediness: the unclustered mask pixel with the highest seediness, while it
   is above ``seed_score``. Its embedding ``c`` is the centre and its bandwidth ``s`` the
   object's: every mask pixel gets ``phi = exp(-sum_axis exp(10 s_axis) ((e - c)_axis / 256)^2)``.
3. The proposal is the mask pixels with ``phi > 0.5``. It becomes an object (its unclustered
   pixels, a new id) when it holds at least ``min_mask_sum`` pixels and at least a fraction
   ``min_unclustered`` of them is still unclustered (otherwise it describes an object found
   already). Either way its pixels and the seed itself are clustered from then on.
4. Mask pixels that no proposal took stay background.

Each seed looks only at the mask pixels embedded within ``256 sqrt(ln 2 / min(exp(10 s)))`` px of its
centre (``phi`` is at most 0.5 farther out), found in a k-d tree of the embeddings: the work grows
with the objects' sizes, not with the image's.
"""

from __future__ import annotations

import math

import numpy as np

from ..reader.targets_embedding import REACH, SIGMA_SCALE, decode_offsets


def cluster_instances(maps: np.ndarray, foreground: float = 0.5, seed_score: float = 0.9, min_mask_sum: int = 5,
                      min_unclustered: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Instance labels from the five embedding planes.

    Parameters
    ----------
    maps : (H, W, 5) float, planes ``Ey, Ex, Esy, Esx, Eseed`` in [0, 1].
    foreground : mask pixels need ``Eseed > foreground``.
    seed_score : seeds need ``Eseed > seed_score``.
    min_mask_sum : a proposal needs at least this many pixels (px) to become an object.
    min_unclustered : ... and this fraction of them not yet in an object.

    Returns
    -------
    labels : (H, W) int32, objects 1.. in the order they were found.
    seeds : (n, 2) int64, the (row, column) of each object's seed.
    """
    maps = np.asarray(maps, np.float32)
    h, w = maps.shape[:2]
    seediness = maps[..., 4]
    mask = seediness > foreground
    labels = np.zeros((h, w), np.int32)
    if not mask.any():
        return labels, np.zeros((0, 2), np.int64)
    from scipy.spatial import cKDTree

    ys, xs = np.nonzero(mask)
    embedded = np.stack([ys + decode_offsets(maps[ys, xs, 0]), xs + decode_offsets(maps[ys, xs, 1])], axis=1)
    precisions = np.exp(SIGMA_SCALE * maps[ys, xs, 2:4].astype(np.float64)) / REACH ** 2  # per px^2
    tree = cKDTree(embedded)
    unclustered = np.ones(ys.size, bool)
    score = seediness[ys, xs]
    order = np.argsort(-score, kind="stable")
    order = order[score[order] > seed_score]
    limit = math.log(2.0)
    seeds = []
    for i in order:
        if not unclustered[i]:
            continue
        centre, precision = embedded[i], precisions[i]
        near = np.asarray(tree.query_ball_point(centre, math.sqrt(limit / precision.min()) + 1e-6), np.int64)
        inside = near[((embedded[near] - centre) ** 2 * precision).sum(axis=1) < limit]  # phi > 0.5
        free = inside[unclustered[inside]]
        if inside.size >= min_mask_sum and free.size >= min_unclustered * inside.size:
            labels[ys[free], xs[free]] = len(seeds) + 1
            seeds.append((int(ys[i]), int(xs[i])))
        unclustered[inside] = False
        unclustered[i] = False
    return labels, np.asarray(seeds, np.int64).reshape(-1, 2)
