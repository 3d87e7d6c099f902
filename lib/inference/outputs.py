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
from ..store.images import write_image


def save_image(path: Path, array: np.ndarray) -> Path:
    """An image (TIFF keeps any dtype; PNG uint8/uint16), atomically."""
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
