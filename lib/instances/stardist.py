"""Instances from star-convex polygons (StarDist): candidates, non-maximum suppression, rasterisation.

The maps hold, per pixel, an object probability (``F``) and ``N`` ray planes ``R0..R<N-1>``: the
distance to the object's boundary along ray k (angle ``2 pi k / N`` from the +x axis towards +y),
encoded as ``d / (d + 16)`` (see ``lib/reader/targets_stardist.py``).

:func:`polygon_instances`:

1. Candidates: the pixels with ``F > prob_threshold``. Each is the centre of a polygon whose
   vertex k lies at the decoded distance along ray k.
2. Candidates are ranked by ``F x`` their shortest ray (StarDist ranks by its probability map,
   trained as the normalised distance to the boundary, whose maximum is at the most central
   pixel; ``F`` times the shortest ray is largest there too, without a separate channel). Ties
   keep raster order.
3. Greedy suppression, in rank order: a candidate whose centre pixel a kept polygon already
   owns is dropped (it describes the same object; StarDist needs no such rule because its
   probability is low near boundaries, where ``F`` is still high, and a candidate near an
   object's edge has a polygon too small to be suppressed by IoU). Otherwise its polygon is
   rasterised (``skimage.draw.polygon``: the pixels whose centres are inside) and dropped when
   its IoU with a polygon already kept exceeds ``nms_threshold``, else kept. The intersection is
   counted on the pixels each kept polygon *owns* (a pixel belongs to the first kept polygon
   that covers it), which is the true intersection unless kept polygons overlap each other.
4. Labels: every kept polygon paints the pixels it owns, so overlaps go to the higher-ranked
   polygon; a polygon without a pixel of its own is not kept.
"""

from __future__ import annotations

import numpy as np

from ..reader.targets_stardist import decode_rays, ray_directions

MIN_SHORTEST_RAY = 1.0  # px: candidates on an object's rim (a ray of 0.5 px) make no polygon


def polygon_instances(probability: np.ndarray, rays: np.ndarray, prob_threshold: float = 0.5,
                      nms_threshold: float = 0.4) -> tuple[np.ndarray, np.ndarray]:
    """Instance labels from an object probability map and encoded ray maps.

    Parameters
    ----------
    probability : (H, W) float, in [0, 1].
    rays : (H, W, N) float, encoded distances in [0, 1] (N >= 3).
    prob_threshold : candidates need ``probability > prob_threshold``.
    nms_threshold : a candidate whose IoU with a kept polygon exceeds this is dropped (in [0, 1]).

    Returns
    -------
    labels : (H, W) int32, kept polygons numbered 1.. in rank order.
    centres : (n, 2) int64, the (row, column) of each kept polygon's centre pixel.
    """
    from skimage.draw import polygon

    h, w = probability.shape
    n_rays = rays.shape[-1]
    labels = np.zeros(h * w, np.int32)
    candidates = np.flatnonzero(np.asarray(probability).ravel() > prob_threshold)
    if candidates.size == 0:
        return labels.reshape(h, w), np.zeros((0, 2), np.int64)
    # a ray longer than the image is as good as the image's size (an encoded value near 1 decodes to
    # millions of pixels)
    distances = np.minimum(decode_rays(np.asarray(rays).reshape(-1, n_rays)[candidates]), float(h + w))
    shortest = distances.min(axis=1)
    inner = shortest >= MIN_SHORTEST_RAY
    candidates, distances, shortest = candidates[inner], distances[inner], shortest[inner]
    score = np.asarray(probability).ravel()[candidates] * shortest
    order = np.argsort(-score, kind="stable")
    dy, dx = ray_directions(n_rays)
    areas = [0]
    centres = []
    for i in order:
        d = distances[i]
        if d.max() <= 0:
            continue
        if labels[candidates[i]]:
            continue  # inside a kept polygon: the same object
        cy, cx = divmod(int(candidates[i]), w)
        rows, cols = polygon(cy + d * dy, cx + d * dx, (h, w))
        if rows.size == 0:
            continue
        pixels = rows * w + cols
        owners = labels[pixels]
        if owners.any():
            ids, shared = np.unique(owners[owners > 0], return_counts=True)
            iou = shared / (pixels.size + np.asarray(areas)[ids] - shared)
            if (iou > nms_threshold).any() or (ids.size and shared.sum() > 0.5 * pixels.size):
                continue
        free = pixels[owners == 0]
        if free.size == 0:
            continue
        labels[free] = len(areas)
        areas.append(pixels.size)
        centres.append((cy, cx))
    return labels.reshape(h, w), np.asarray(centres, np.int64).reshape(-1, 2)
