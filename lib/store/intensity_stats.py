"""Per-image intensity statistics a build records: moments (pooled into the dataset mean and std)
and a percentile table (for percentile normalisation and the intensity check at inference)."""

from __future__ import annotations

import numpy as np

from ..common.normalization import PERCENTILE_GRID, image_percentiles

__all__ = ["PERCENTILE_GRID", "moments", "percentile_table"]


def moments(image: np.ndarray) -> tuple[int, list[float], list[float]]:
    """Pixel count, per-channel mean and per-channel sum of squared deviations of ``image`` (H, W, C).

    Large 8- and 16-bit images go through a histogram (exact, and 3x faster than float64 arithmetic).
    """
    n = image.shape[0] * image.shape[1]
    means, m2s = [], []
    for c in range(image.shape[2]):
        channel = image[..., c]
        if image.dtype in (np.uint8, np.uint16) and n > 4 * (1 << (8 * image.dtype.itemsize)):
            counts = np.bincount(channel.ravel()).astype(np.float64)
            values = np.arange(len(counts), dtype=np.float64)
            mean = float(counts @ values) / n
            m2 = float(counts @ (values - mean) ** 2)
        else:
            flat = channel.astype(np.float64).ravel()
            mean = float(flat.mean())
            m2 = float(((flat - mean) ** 2).sum())
        means.append(mean)
        m2s.append(m2)
    return n, means, m2s


def percentile_table(image: np.ndarray) -> list[list[float]]:
    """Percentiles :data:`PERCENTILE_GRID` of each channel of the whole image: ``(len(grid), C)`` nested lists.

    8- and 16-bit images go through a histogram per channel (exact; the pixel values are integers).
    """
    if image.dtype in (np.uint8, np.uint16):
        table = np.empty((len(PERCENTILE_GRID), image.shape[2]))
        for c in range(image.shape[2]):
            counts = np.bincount(image[..., c].ravel())
            table[:, c] = _histogram_percentiles(counts, PERCENTILE_GRID)
        return table.tolist()
    return image_percentiles(image, PERCENTILE_GRID).tolist()


def _histogram_percentiles(counts: np.ndarray, percentiles) -> np.ndarray:
    """``np.percentile``'s linear interpolation from the value histogram ``counts`` of integer pixels."""
    cumulative = np.cumsum(counts)
    n = int(cumulative[-1])
    out = []
    for q in percentiles:
        position = q / 100.0 * (n - 1)
        below = int(np.floor(position))
        fraction = position - below
        lower = int(np.searchsorted(cumulative, below + 1))
        upper = int(np.searchsorted(cumulative, min(below + 2, n)))
        out.append(lower + fraction * (upper - lower))
    return np.asarray(out, np.float64)
