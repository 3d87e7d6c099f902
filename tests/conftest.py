"""Shared test fixtures: seeded synthetic datasets written by the tests themselves."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHARED_DATA = ROOT.parent / "shared" / "data" / "nist_phase_contrast"


def write_pairs(folder: Path, shapes: list[tuple[int, ...]], dtype: str = "uint16", n_classes: int = 3,
                seed: int = 0, image_ext: str = ".tif", mask_ext: str = ".png", mask_suffix: str = "") -> Path:
    """Write images ``img_XX`` (shapes (H, W) or (H, W, C)) and masks with values < n_classes."""
    from lib.store.images import write_image

    rng = np.random.default_rng(seed)
    for i, shape in enumerate(shapes):
        info = np.iinfo(dtype) if np.dtype(dtype).kind in "ui" else None
        if info is not None:
            image = rng.integers(0, min(int(info.max), 60000) + 1, size=shape, dtype=dtype)
        else:
            image = rng.standard_normal(shape).astype(dtype)
        mask = rng.integers(0, n_classes, size=shape[:2]).astype(np.uint8)
        write_image(folder / "images" / f"img_{i:02d}{image_ext}", image)
        write_image(folder / "masks" / f"img_{i:02d}{mask_suffix}{mask_ext}", mask)
    return folder


@pytest.fixture
def small_dataset(tmp_path: Path) -> Path:
    """Six 2-class-plus-boundary pairs of assorted sizes, uint16, one channel."""
    return write_pairs(tmp_path / "data", [(70, 90), (64, 64), (100, 50), (33, 80), (64, 130), (90, 90)])
