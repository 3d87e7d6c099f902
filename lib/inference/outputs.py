"""Every file inference writes goes through :mod:`lib.common.files` (unique temporary name beside the
target, fsync, the umask's mode, rename), whatever the format's own writer does inside.

The image, picture and table writers of ``store`` and ``scoring`` write to the temporary path
they are given; :func:`lib.common.files.write_with` then commits it. A prediction written under
umask 022 is therefore mode 0644 (the writers' own ``mkstemp`` would leave 0600).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..common import files
from ..scoring import evaluate, instance_report
from ..store.images import write_image


def save_image(path: Path, array: np.ndarray) -> Path:
    """An image (TIFF keeps any dtype; PNG uint8/uint16), atomically."""
    return files.write_with(path, lambda tmp: write_image(tmp, array))


def save_png(path: Path, rgb: np.ndarray) -> Path:
    """A picture (H, W, 3) uint8 as PNG, atomically."""
    return files.write_with(path, lambda tmp: instance_report.save_png(tmp, rgb))


def save_rows(path: Path, rows: Sequence[dict], fieldnames: Sequence[str] = instance_report.ASSOCIATION_FIELDS
              ) -> Path:
    """Rows of fixed columns ``fieldnames`` (a header even without rows) as CSV, atomically."""
    return files.write_with(path, lambda tmp: instance_report.write_csv(tmp, rows, fieldnames))


def save_table(path: Path, rows: Sequence[dict]) -> Path:
    """Rows as CSV with the first row's keys as columns, atomically."""
    return files.write_with(path, lambda tmp: evaluate.write_csv(tmp, rows))


def save_json(path: Path, value: Any) -> Path:
    """Indented JSON, atomically."""
    return files.write_json(path, value)
