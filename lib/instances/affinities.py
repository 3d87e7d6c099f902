"""Affinity post-processing: per pixel aggregates of the predicted affinity planes ``A<dy>_<dx>``.

Plane ``A<dy>_<dx>`` holds, at pixel ``p``, the probability that ``p`` and ``p + (dy, dx)``
belong to the same object (see ``lib/reader/targets_fields.py``). A pixel's affinities are its
outgoing ones (its own value in every plane) and its incoming ones (the value at
``p - (dy, dx)``). Derived channels for the watershed (``lib/instances/postprocess.py``):

* ``Amin``: the minimum over all of them: high only in object interiors, away from every
  boundary, so its thresholded mask gives seeds separated between touching objects, and
  ``-Amin`` is the flooded surface;
* ``Amax``: the maximum: high on every object pixel with a neighbour in its object: the growth mask.

Pixels whose neighbour at an offset falls outside the image ignore that offset.
"""

from __future__ import annotations

import numpy as np

from ..reader.targets_fields import affinity_offset


def aggregate(maps: np.ndarray, names) -> tuple[np.ndarray, np.ndarray]:
    """``(Amin, Amax)``, each (H, W) float32, from maps (H, W, K) and the K plane names."""
    h, w = maps.shape[:2]
    low = np.ones((h, w), np.float32)
    high = np.zeros((h, w), np.float32)
    for k, name in enumerate(names):
        offset = affinity_offset(name)
        if offset is None:
            continue
        dy, dx = offset
        plane = np.asarray(maps[..., k], np.float32)
        ys, yd = _shift(h, dy)
        xs, xd = _shift(w, dx)
        low[ys, xs] = np.minimum(low[ys, xs], plane[ys, xs])  # outgoing
        high[ys, xs] = np.maximum(high[ys, xs], plane[ys, xs])
        low[yd, xd] = np.minimum(low[yd, xd], plane[ys, xs])  # incoming, at p + (dy, dx)
        high[yd, xd] = np.maximum(high[yd, xd], plane[ys, xs])
    return low, high


def _shift(n: int, d: int) -> tuple[slice, slice]:
    if abs(d) >= n:
        return slice(0, 0), slice(0, 0)
    return (slice(0, n - d), slice(d, n)) if d >= 0 else (slice(-d, n), slice(0, n + d))
