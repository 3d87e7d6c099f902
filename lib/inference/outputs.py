"""The writers inference uses, in one place: every one of them writes through
:mod:`lib.common.files` (unique temporary name beside the target, fsync, the umask's mode,
rename), so a prediction written under umask 022 is mode 0644 and a killed run never leaves a
half-written output under its final name."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..common import files, pictures
from ..scoring import reports
from ..store.images import TIFF_EXTENSIONS, write_image
from ..store.ome_zarr import is_zarr_path, write_ome_zarr


def save_image(path: Path, array: np.ndarray, pixel_size: tuple[float, float] | None = None,
               volume: bool = False) -> Path:
    """An image, atomically: an OME-TIFF (any dtype; OME-XML with its axes and ``pixel_size`` (y, x) in µm
    when known), a PNG (uint8/uint16), or an OME-Zarr folder for a ``.zarr`` path (a pyramid: nearest
    neighbour for integer labels, 2 x 2 mean for float maps). ``volume``: ``array`` is a stack
    (Z, Y, X[, C]) (a trailing channel of 1 is dropped)."""
    if is_zarr_path(path):
        array = np.asarray(array)
        if array.ndim == (4 if volume else 3) and array.shape[-1] == 1:
            array = array[..., 0]
        return write_ome_zarr(path, array, labels=array.dtype.kind != "f", pixel_size=pixel_size, volume=volume)
    if Path(path).suffix.lower() in TIFF_EXTENSIONS:
        return write_image(path, array, ome=True, pixel_size=pixel_size)
    return write_image(path, array)


def save_png(path: Path, rgb: np.ndarray) -> Path:
    """A picture (H, W, 3) uint8 as PNG, atomically."""
    return pictures.save_png(path, rgb)


def save_rows(path: Path, rows: Sequence[dict], fieldnames: Sequence[str] = reports.ASSOCIATION_FIELDS) -> Path:
    """Rows of fixed columns ``fieldnames`` (a header even without rows) as CSV, atomically."""
    return reports.write_csv(path, rows, fieldnames)


def save_table(path: Path, rows: Sequence[dict]) -> Path:
    """Rows as CSV with the first row's keys as columns, atomically."""
    return reports.write_csv(path, rows)


def save_json(path: Path, value: Any) -> Path:
    """Indented JSON, atomically."""
    return files.write_json(path, value)
