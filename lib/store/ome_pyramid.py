"""Resolution pyramids built while an image is streamed row strip by row strip (OME-Zarr and OME-TIFF outputs).

Level ``l`` halves level ``l - 1`` in Y and X (sizes rounded up): labels by nearest neighbour
(every second pixel: level ``l`` pixel ``(i, j)`` is level 0 pixel ``(i 2^l, j 2^l)``),
maps (probabilities, uncertainty) by the mean of 2 x 2 blocks (the last row or column of an
odd size is repeated). A :class:`StripPyramid` receives full-width strips of level 0 in row
order and hands each level on in strips whose heights are multiples of ``rows`` (the chunk or
tile height), so memory holds at most ``rows`` rows of each level, whatever the image height.

Axes: strips are ``(h, W)`` or ``(h, W, C)``; only the first two axes are downsampled.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

# The smallest level of a pyramid has its longest side at most this many pixels.
SMALLEST_LEVEL_SIDE = 512


def level_count(height: int, width: int, smallest: int = SMALLEST_LEVEL_SIDE) -> int:
    """Levels (full resolution included) halving ``height x width`` until its longest side is <= ``smallest``."""
    levels, side = 1, max(height, width)
    while side > smallest:
        side = -(-side // 2)
        levels += 1
    return levels


def level_shapes(height: int, width: int, levels: int) -> list[tuple[int, int]]:
    """``(height, width)`` of each level: halved and rounded up at each step."""
    shapes = [(height, width)]
    for _ in range(levels - 1):
        h, w = shapes[-1]
        shapes.append((-(-h // 2), -(-w // 2)))
    return shapes


def downsample(strip: np.ndarray, method: str) -> np.ndarray:
    """Halve ``strip`` (h, w[, C]) in its first two axes: ``"nearest"`` (every second pixel) or ``"mean"`` (2 x 2)."""
    if method == "nearest":
        return strip[::2, ::2]
    if method != "mean":
        raise ValueError(f"method must be 'nearest' or 'mean'; got {method!r}")
    h, w = strip.shape[:2]
    if h % 2 or w % 2:
        strip = np.pad(strip, [(0, h % 2), (0, w % 2)] + [(0, 0)] * (strip.ndim - 2), mode="edge")
    h2, w2 = strip.shape[0] // 2, strip.shape[1] // 2
    blocks = strip.reshape((h2, 2, w2, 2) + strip.shape[2:])  # a view: no copy of the strip
    return blocks.mean(axis=(1, 3), dtype=np.float32).astype(strip.dtype, copy=False)


class StripPyramid:
    """Turns full-width strips of level 0 (rows in order) into the strips of every level.

    ``emit(level, y0, strip)`` is called with strips of ``rows`` rows (a multiple of 2 ** (levels - 1)
    is not needed: ``rows`` even is enough), the last strip of a level holding what is left.
    ``rows`` must be even (each strip handed down is halved).
    """

    def __init__(self, height: int, levels: int, method: str, rows: int,
                 emit: Callable[[int, int, np.ndarray], None]):
        if rows % 2:
            raise ValueError(f"rows must be even; got {rows}")
        self.shapes = level_shapes(height, 1, levels)
        self.method, self.rows, self.emit = method, rows, emit
        self.buffers: list[list[np.ndarray]] = [[] for _ in range(levels)]
        self.buffered = [0] * levels
        self.written = [0] * levels

    def put(self, strip: np.ndarray) -> None:
        """The next rows of level 0 (full width)."""
        self._put(0, strip)

    def _put(self, level: int, strip: np.ndarray) -> None:
        self.buffers[level].append(strip)
        self.buffered[level] += strip.shape[0]
        last = self.written[level] + self.buffered[level] >= self.shapes[level][0]
        if self.buffered[level] < self.rows and not last:
            return
        parts = self.buffers[level]
        data = np.concatenate(parts) if len(parts) > 1 else parts[0]
        full = data.shape[0] if last else data.shape[0] // self.rows * self.rows
        done, rest = data[:full], data[full:]
        self.buffers[level] = [rest] if rest.shape[0] else []
        self.buffered[level] = rest.shape[0]
        self.emit(level, self.written[level], done)
        self.written[level] += full
        for y in range(0, full if level + 1 < len(self.shapes) else 0, self.rows):  # bounded temporaries
            self._put(level + 1, downsample(done[y:y + self.rows], self.method))

    @property
    def complete(self) -> bool:
        return all(w == s[0] for w, s in zip(self.written, self.shapes))
