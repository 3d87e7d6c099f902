"""Intensity normalisation shared by training (the reader) and inference (the predictor).

Three modes, each a per-channel affine map ``(x - offset) / scale`` to float32:

- ``dataset``: offset, scale = the training database's mean and standard deviation (one pair
  for every image, in the units of the training images);
- ``tile``: each image's own mean and standard deviation (in training: each patch's);
- ``percentile``: each image's own low and high percentiles (default 1 and 99.8, as CSBDeep
  and StarDist): offset = low percentile, scale = high - low, so that the image's dim
  background maps near 0 and its bright objects near 1 whatever the exposure or bit depth.
  Values are NOT clipped (pixels beyond the percentiles map below 0 or above 1), as in
  CSBDeep's ``normalize`` default: clipping would flatten the brightest objects.

Percentiles are taken over the whole source image, never a training patch: the build stores
a table of percentiles of every source image (:data:`PERCENTILE_GRID`) in the database
metadata, and inference computes them over the whole image. A scale below :data:`MIN_SCALE`
(a flat image) divides by 1.

This module imports no other ``lib`` package.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

MODES = ("dataset", "tile", "percentile")
DEFAULT_MODE = "percentile"
DEFAULT_PERCENTILES = (1.0, 99.8)
# A channel whose scale (std, or high - low percentile) is below this is only shifted, never divided.
MIN_SCALE = 1e-6
# Percentiles of every source image stored by build_lmdb.py (dense in the tails, where
# normalisation percentiles are chosen). Any other pair is computed from the records.
PERCENTILE_GRID = tuple(
    [round(0.1 * i, 1) for i in range(0, 21)] + [2.5, 3.0, 4.0, 5.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 96.0,
                                                 97.0, 98.0, 98.5, 99.0]
    + [round(99.0 + 0.1 * i, 1) for i in range(1, 10)] + [99.95, 100.0])
# At most this many pixels per channel enter a percentile (larger images: evenly spaced rows).
MAX_PERCENTILE_PIXELS = 1 << 24
# The percentiles of each image that inference compares with the training images.
REFERENCE_PERCENTILES = (1.0, 50.0, 99.8)


def percentile_problems(percentiles: Sequence[float]) -> list[str]:
    """What is wrong with a (low, high) percentile pair, as ``"percentiles must ..."`` lines (empty when fine)."""
    try:
        low, high = (float(v) for v in percentiles)
    except (TypeError, ValueError):
        return [f"percentiles must be two numbers LOW HIGH; got {percentiles!r}"]
    if not (0.0 <= low < high <= 100.0):
        return [f"percentiles must satisfy 0 <= LOW < HIGH <= 100; got {low:g} {high:g}. The usual pair is "
                f"{DEFAULT_PERCENTILES[0]:g} {DEFAULT_PERCENTILES[1]:g}"]
    return []


def _rows(image, max_pixels: int):
    """``image`` (H, W, C) or every k-th row of it, so that at most ``max_pixels`` pixels per channel are read."""
    height, width = image.shape[:2]
    step = max(1, -(-height * width // max_pixels))
    return np.asarray(image[::step])


def image_percentiles(image, percentiles: Sequence[float], max_pixels: int = MAX_PERCENTILE_PIXELS) -> np.ndarray:
    """Per-channel percentiles ``(len(percentiles), C)`` float64 of a whole image ``(H, W, C)``.

    Images above ``max_pixels`` pixels use every k-th row (deterministic). NaN pixels are ignored.
    """
    pixels = _rows(image, max_pixels)
    flat = pixels.reshape(-1, pixels.shape[-1]) if pixels.ndim == 3 else pixels.reshape(-1, 1)
    flat = flat.astype(np.float64, copy=False)
    if flat.shape[0] == 0:
        return np.zeros((len(percentiles), flat.shape[1]))
    if flat.dtype.kind == "f" and not np.isfinite(flat).all():
        return np.nanpercentile(np.where(np.isfinite(flat), flat, np.nan), list(percentiles), axis=0)
    return np.percentile(flat, list(percentiles), axis=0)


def from_table(table: Sequence[Sequence[float]], grid: Sequence[float], percentiles: Sequence[float]
               ) -> np.ndarray | None:
    """The ``percentiles`` ``(P, C)`` read from a stored ``table`` (len(grid), C); None unless all are on the grid."""
    index = {round(float(g), 4): i for i, g in enumerate(grid)}
    rows = [index.get(round(float(p), 4)) for p in percentiles]
    if any(r is None for r in rows):
        return None
    values = np.asarray(table, np.float64)
    return values[rows]


def percentile_offset_scale(low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(offset, scale)`` of the percentile map: ``low`` and ``high - low`` (1 where below MIN_SCALE)."""
    low = np.asarray(low, np.float64)
    span = np.asarray(high, np.float64) - low
    return low, np.where(span < MIN_SCALE, 1.0, span)


def image_statistics(image, mode: str, percentiles: Sequence[float] = DEFAULT_PERCENTILES
                     ) -> tuple[np.ndarray, np.ndarray] | None:
    """The per-image pair ``((C,), (C,))`` that ``mode`` needs: ``tile`` mean and std, ``percentile`` low and
    high percentiles; None for ``dataset`` (which uses the training statistics)."""
    if mode == "percentile":
        low, high = image_percentiles(image, percentiles)
        return low, high
    if mode == "tile":  # by row chunks: a memory-mapped image is never read whole into float64
        channels = image.shape[-1]
        total, square, count = np.zeros(channels), np.zeros(channels), 0
        for y in range(0, image.shape[0], 1024):
            block = np.asarray(image[y:y + 1024], dtype=np.float64).reshape(-1, channels)
            total += block.sum(axis=0)
            square += (block * block).sum(axis=0)
            count += block.shape[0]
        mean = total / max(count, 1)
        return mean, np.sqrt(np.maximum(square / max(count, 1) - mean * mean, 0.0))
    return None


def apply(x: np.ndarray, offset, scale, out: np.ndarray | None = None) -> np.ndarray:
    """``(x - offset) / scale`` in float32 (``scale`` below MIN_SCALE: 1); into ``out`` when given."""
    offset = np.asarray(offset, np.float32)
    scale = np.asarray(scale, np.float64)
    inverse = np.where(scale < MIN_SCALE, 1.0, 1.0 / np.maximum(scale, MIN_SCALE)).astype(np.float32)
    if out is None:
        out = np.empty(np.shape(x), np.float32)
    np.subtract(x, offset, out=out, casting="unsafe")
    out *= inverse
    return out


def reference_values(percentiles: np.ndarray) -> dict[str, np.ndarray]:
    """From an image's :data:`REFERENCE_PERCENTILES` ``(3, C)``: ``low``, ``median``, ``high`` (per channel),
    ``contrast`` (high - low) and ``relative_median`` ((median - low) / contrast, where the median lies
    between the dim and the bright end; 0 for a flat channel)."""
    low, median, high = (np.asarray(v, np.float64) for v in percentiles)
    contrast = high - low
    relative = np.where(contrast > MIN_SCALE, (median - low) / np.maximum(contrast, MIN_SCALE), 0.0)
    return {"low": low, "median": median, "high": high, "contrast": contrast, "relative_median": relative}


def intensity_reference(tables: Sequence[Sequence[Sequence[float]] | None], grid: Sequence[float]) -> dict | None:
    """The training images' intensity distribution recorded in model.json (``training_images``).

    For each of :func:`reference_values`' quantities, per channel, the min, median and max over
    the training images; ``percentiles`` says which (:data:`REFERENCE_PERCENTILES`). ``tables``
    are the stored per-image percentile tables (len(grid), C). None when there are none.
    """
    values = [from_table(t, grid, REFERENCE_PERCENTILES) for t in tables if t is not None]
    values = [reference_values(v) for v in values if v is not None]
    if not values:
        return None
    out: dict = {"percentiles": list(REFERENCE_PERCENTILES), "images": len(values)}
    for key in values[0]:
        stack = np.stack([v[key] for v in values])  # (images, C)
        out[key] = {"min": stack.min(axis=0).tolist(), "median": np.median(stack, axis=0).tolist(),
                    "max": stack.max(axis=0).tolist()}
    return out
