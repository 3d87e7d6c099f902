"""Target channels beyond F, C, Db, P, T: centre offsets (HoVer-Net ``H``, ``V``), the signed
distance ``D``, the distance to neighbours ``Dn``, and affinities ``A<dy>_<dx>``.

Every function takes an (H, W) integer label image (0 = background, objects may touch) and
returns float32 maps with values in [0, 1] (inference clips non-binary channels to [0, 1], so
every learnt value lives there):

* :func:`centre_offsets`: HoVer-Net's horizontal and vertical maps. For each object pixel,
  ``x - cx`` (``y - cy``) with ``(cy, cx)`` the object's centre of mass, divided by the largest
  value of that sign in the object, so in [-1, 1] on each object (-1 at its left/top edge, +1 at
  its right/bottom edge); stored as ``(value + 1) / 2``, background 0.5.
* :func:`signed_distance`: ``0.5 + 0.5 tanh(d / alpha)`` inside an object (``d`` the distance
  to the nearest pixel not of the object, as for ``Db``), ``0.5 - 0.5 tanh(d / beta)`` outside
  (``d`` the distance to the nearest object pixel): 0.5 on the boundary, towards 1 at centres,
  towards 0 far from objects.
* :func:`neighbour_distance`: inside each object, ``1 - d / scale`` clipped to [0, 1], ``d`` the
  distance to the nearest pixel of *another* object: high where objects touch; 0 on background
  and in objects with no neighbour within ``scale`` px.
* :func:`affinities`: for an offset ``(dy, dx)``, 1 where the pixel and the pixel at
  ``(y + dy, x + dx)`` are of the same object (and not background), else 0 (also when the
  second pixel is outside the patch).
"""

from __future__ import annotations

import re

import cv2
import numpy as np
from scipy import ndimage as ndi

AFFINITY_NAME = re.compile(r"^A(-?[0-9]+)_(-?[0-9]+)$")
DEFAULT_AFFINITIES = ((0, 1), (1, 0))
MAX_AFFINITY_OFFSET = 64


def affinity_name(dy: int, dx: int) -> str:
    return f"A{dy}_{dx}"


def affinity_offset(name) -> tuple[int, int] | None:
    """``"A0_1"`` -> ``(0, 1)``; None when ``name`` is not an affinity plane name."""
    match = AFFINITY_NAME.match(name) if isinstance(name, str) else None
    return (int(match.group(1)), int(match.group(2))) if match else None


def consecutive(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """``labels`` renumbered 0..n (0 stays background) as int32 / int64, and n."""
    values, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.reshape(labels.shape)
    if values.size and values[0] != 0:
        inverse = inverse + 1
    return inverse, int(values.size - (1 if values.size and values[0] == 0 else 0))


def centre_offsets(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HoVer-Net ``(H, V)`` maps, each (H, W) float32 in [0, 1] (0.5 = no offset; background 0.5)."""
    ids, n = consecutive(labels)
    horizontal = np.full(labels.shape, 0.5, np.float32)
    vertical = np.full(labels.shape, 0.5, np.float32)
    if n == 0:
        return horizontal, vertical
    ys, xs = np.nonzero(ids)
    own = ids[ys, xs]
    counts = np.bincount(own, minlength=n + 1).astype(np.float64)
    counts[0] = 1
    for coords, target in ((xs, horizontal), (ys, vertical)):
        centre = np.bincount(own, weights=coords, minlength=n + 1) / counts
        offset = coords - centre[own]
        index = np.arange(n + 1)
        positive = np.asarray(ndi.maximum(np.maximum(offset, 0), own, index), np.float64)
        negative = np.asarray(ndi.maximum(np.maximum(-offset, 0), own, index), np.float64)
        scale = np.where(offset >= 0, positive[own], negative[own])
        normalised = np.divide(offset, scale, out=np.zeros_like(offset), where=scale > 0)
        target[ys, xs] = (normalised + 1.0) / 2.0
    return horizontal, vertical


def signed_distance(labels: np.ndarray, inside: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """The ``D`` map from ``inside`` (per object pixel, the distance to the nearest pixel not of its
    object; any value on background)."""
    foreground = labels != 0
    out = np.empty(labels.shape, np.float32)
    if foreground.all():
        outside = np.zeros(labels.shape, np.float32)
    else:
        outside = cv2.distanceTransform((~foreground).view(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    np.copyto(out, 0.5 - 0.5 * np.tanh(outside / np.float32(beta)))
    np.copyto(out, 0.5 + 0.5 * np.tanh(inside / np.float32(alpha)), where=foreground)
    return out.astype(np.float32, copy=False)


def neighbour_distance(labels: np.ndarray, scale: float) -> np.ndarray:
    """The ``Dn`` map (see the module docstring)."""
    out = np.zeros(labels.shape, np.float32)
    ids, n = consecutive(labels)
    if n < 2:
        return out
    h, w = labels.shape
    grow = int(np.ceil(scale)) + 1
    for i, box in enumerate(ndi.find_objects(ids), start=1):
        if box is None:
            continue
        rows, cols = box
        r0, r1 = max(rows.start - grow, 0), min(rows.stop + grow, h)
        c0, c1 = max(cols.start - grow, 0), min(cols.stop + grow, w)
        crop = ids[r0:r1, c0:c1]
        others = (crop != 0) & (crop != i)
        if not others.any():
            continue
        distance = cv2.distanceTransform((~others).view(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        mine = crop == i
        values = np.clip(1.0 - distance / np.float32(scale), 0.0, 1.0)
        np.copyto(out[r0:r1, c0:c1], values, where=mine)
    return out


def affinities(labels: np.ndarray, offsets) -> np.ndarray:
    """(H, W, len(offsets)) float32: 1 where a pixel and the one at ``(y + dy, x + dx)`` share an object."""
    h, w = labels.shape
    out = np.zeros((h, w, len(offsets)), np.float32)
    for k, (dy, dx) in enumerate(offsets):
        ys, yd = _overlap(h, dy)
        xs, xd = _overlap(w, dx)
        here, there = labels[ys, xs], labels[yd, xd]
        out[ys, xs, k] = (here == there) & (here != 0)
    return out


def _overlap(n: int, d: int) -> tuple[slice, slice]:
    """Slices ``(a, b)`` of an axis of length ``n`` such that ``b`` is ``a`` shifted by ``d``."""
    if d >= 0:
        return slice(0, max(n - d, 0)), slice(d, n) if d < n else slice(n, n)
    return slice(-d, n) if -d < n else slice(n, n), slice(0, max(n + d, 0))
