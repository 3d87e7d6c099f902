"""Tile grids: covering an image with fixed-size tiles for building databases.

A grid covers every pixel. Tiles step by ``stride``; a last tile that would run past the
edge is shifted inside so that it ends on the edge. An image smaller than the tile along an
axis gets one tile there, and is padded up to the tile size (see :func:`pad_to`).
"""

from __future__ import annotations

import numpy as np


def tile_starts(length: int, tile_size: int, stride: int) -> list[int]:
    """Origins of the tiles along one axis of ``length`` pixels.

    Raises ``ValueError`` unless ``length >= 1`` and ``1 <= stride <= tile_size``.
    """
    if length < 1 or tile_size < 1:
        raise ValueError(f"length and tile_size must be >= 1; got {length} and {tile_size}")
    if not 1 <= stride <= tile_size:
        raise ValueError(f"stride must be in [1, tile_size={tile_size}] so that tiles cover the image; got {stride}")
    if length <= tile_size:
        return [0]
    starts = list(range(0, length - tile_size + 1, stride))
    if starts[-1] + tile_size < length:
        starts.append(length - tile_size)
    return starts


def tile_grid(height: int, width: int, tile_size: int, stride: int) -> list[tuple[int, int]]:
    """Tile origins ``(y, x)`` in row-major order covering a ``height x width`` image."""
    return [(y, x) for y in tile_starts(height, tile_size, stride) for x in tile_starts(width, tile_size, stride)]


def pad_to(array: np.ndarray, height: int, width: int, mode: str) -> np.ndarray:
    """Pad ``array`` (H, W[, C]) at the bottom and right up to ``height x width``.

    ``mode``: "reflect" (images; mirror without repeating the edge pixel, repeated as needed
    for images much smaller than the tile) or "zero" (masks: background).
    """
    pad_h, pad_w = max(height - array.shape[0], 0), max(width - array.shape[1], 0)
    if pad_h == 0 and pad_w == 0:
        return array
    widths = [(0, pad_h), (0, pad_w)] + [(0, 0)] * (array.ndim - 2)
    if mode == "zero":
        return np.pad(array, widths, mode="constant")
    if mode != "reflect":
        raise ValueError(f"mode must be 'reflect' or 'zero'; got {mode!r}")
    if min(array.shape[:2]) == 1:
        return np.pad(array, widths, mode="edge")
    # np.pad's reflect handles pads wider than the array by reflecting repeatedly.
    return np.pad(array, widths, mode="reflect")
