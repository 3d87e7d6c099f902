"""Test-time augmentation of channel maps whose meaning turns with the image.

The predictor averages a model's maps over the 8 flips and rotations by 90 degrees of a tile
(:func:`transforms`): it predicts the transformed tile and turns the maps back. Turning the
pixels back is enough for maps of scalars (probabilities, distances, classes). Some instance
channels hold directions, which the transformation changed too:

* vectors: ``H``, ``V`` (HoVer-Net offsets) and ``Ey``, ``Ex`` (embedding offsets), stored as
  ``(v + 1) / 2``: a component may move to the other plane and change sign (``m -> 1 - m``);
* per-axis values: ``Esy``, ``Esx`` (embedding bandwidths) swap when the axes do;
* rays ``R0..``: ray k of the original is ray j of the transformed tile, where ray j points where
  the transformation sends ray k (needs ``n_rays`` divisible by 4);
* affinities ``A<dy>_<dx>``: the plane of offset ``o`` is the transformed tile's plane of offset
  ``M o``, or that of ``-M o`` read ``o`` px further (the affinity of a pair seen from its other
  pixel), 0 beyond the tile.

:func:`channel_plan` says, for one transformation, where each channel comes from; it raises
``ValueError`` when a channel has no counterpart (rays not divisible by 4, affinity offsets
without their turned copies), and the predictor then refuses ``--tta`` for that model.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from ..reader.targets_fields import affinity_name, affinity_offset
from ..reader.targets_stardist import ray_count, ray_directions

VECTORS = (("V", "H"), ("Ey", "Ex"))  # (y component, x component), stored as (v + 1) / 2
PER_AXIS = (("Esy", "Esx"),)


class Source(NamedTuple):
    """Where one output plane comes from: plane ``index`` of the turned-back maps, as ``1 - m`` when
    ``invert``, read at ``(y + shift[0], x + shift[1])`` (0 outside the tile)."""

    index: int
    invert: bool = False
    shift: tuple[int, int] = (0, 0)


def transforms() -> list[tuple[int, bool]]:
    """The 8 transformations as ``(k, flip)``: rotate by ``k`` quarter turns counter-clockwise
    (``tf.image.rot90`` / ``np.rot90``), then mirror the columns when ``flip``."""
    return [(k, flip) for k in range(4) for flip in (False, True)]


def matrix(k: int, flip: bool) -> np.ndarray:
    """The (2, 2) integer matrix ``M`` of a transformation on ``(dy, dx)`` displacements: a pixel
    ``d`` away from another in the original is ``M d`` away in the transformed tile."""
    columns = []
    for dy, dx in ((1, 0), (0, 1)):
        probe = np.zeros((5, 5), np.int8)
        probe[2 + dy, 2 + dx] = 1
        moved = np.rot90(probe, k)
        if flip:
            moved = moved[:, ::-1]
        y, x = np.argwhere(moved)[0]
        columns.append((y - 2, x - 2))
    return np.array(columns).T


def channel_plan(names: Sequence[str], k: int, flip: bool) -> list[Source]:
    """One :class:`Source` per plane of ``names`` for the transformation ``(k, flip)``."""
    m = matrix(k, flip)
    index = {name: i for i, name in enumerate(names)}
    plan = [Source(i) for i in range(len(names))]
    for y_name, x_name in VECTORS:
        if y_name in index and x_name in index:
            # the original v is M^T v' (M is a signed permutation): each component is +- one of v'
            for axis, name in enumerate((y_name, x_name)):
                row = m[:, axis]  # v[axis] = sum_j M[j, axis] v'[j]
                j = int(np.flatnonzero(row)[0])
                plan[index[name]] = Source(index[(y_name, x_name)[j]], invert=bool(row[j] < 0))
    for y_name, x_name in PER_AXIS:
        if y_name in index and x_name in index and m[0, 0] == 0:
            plan[index[y_name]], plan[index[x_name]] = Source(index[x_name]), Source(index[y_name])
    n_rays = ray_count(names)
    if n_rays and (k or flip):
        if n_rays % 4:
            raise ValueError(f"test-time augmentation needs a number of rays divisible by 4 (the flips and quarter "
                             f"turns must map every ray onto another); this model has {n_rays}")
        dy, dx = ray_directions(n_rays)
        turned = m @ np.stack([dy, dx])  # where each ray points in the transformed tile
        first = index["R0"]
        for ray in range(n_rays):
            j = int(np.argmin((dy - turned[0, ray]) ** 2 + (dx - turned[1, ray]) ** 2))
            plan[first + ray] = Source(first + j)
    for name, i in index.items():
        offset = affinity_offset(name)
        if offset is None or not (k or flip):
            continue
        turned = tuple(int(v) for v in m @ np.array(offset))
        if affinity_name(*turned) in index:
            plan[i] = Source(index[affinity_name(*turned)])
        elif affinity_name(-turned[0], -turned[1]) in index:
            plan[i] = Source(index[affinity_name(-turned[0], -turned[1])], shift=offset)
        else:
            raise ValueError(f"test-time augmentation needs, for affinity {name}, the plane of the turned offset "
                             f"{affinity_name(*turned)} or {affinity_name(-turned[0], -turned[1])}; this model has "
                             f"{', '.join(n for n in names if affinity_offset(n) is not None)}")
    return plan


def tta_problem(names: Sequence[str]) -> str | None:
    """Why these channels cannot be averaged over the 8 transformations (None when they can)."""
    try:
        for k, flip in transforms():
            channel_plan(names, k, flip)
    except ValueError as error:
        return str(error)
    return None


def apply_plan(maps, plan: Sequence[Source]):
    """``maps (B, H, W, K)`` tensor, already turned back -> the maps the original tile would give."""
    import tensorflow as tf

    if all(s == Source(i) for i, s in enumerate(plan)):
        return maps
    planes = []
    for source in plan:
        plane = maps[..., source.index]
        if source.invert:
            plane = 1.0 - plane
        dy, dx = source.shift
        if dy or dx:
            # value at (y + dy, x + dx), 0 beyond the tile
            padded = tf.pad(plane, [[0, 0], [max(-dy, 0), max(dy, 0)], [max(-dx, 0), max(dx, 0)]])
            h, w = tf.shape(plane)[1], tf.shape(plane)[2]
            plane = padded[:, max(dy, 0):max(dy, 0) + h, max(dx, 0):max(dx, 0) + w]
        planes.append(plane)
    return tf.stack(planes, axis=-1)

