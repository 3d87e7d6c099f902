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


def tiny_database(folder: Path) -> Path:
    """``folder/db`` with train-t.lmdb / test-t.lmdb: six generated 64 x 64 3-class images in 32-px tiles."""
    from data.generate import generate_dataset
    from lib.store.build import BuildConfig, build_databases

    generate_dataset(folder / "data", n_images=6, height=64, width=64, n_experts=0, seed=3)
    build_databases(BuildConfig(image_folder=str(folder / "data/images"), mask_folder=str(folder / "data/masks"),
                                output_folder=str(folder / "db"), dataset_name="t", tile_size=32,
                                train_fraction=0.67, number_classes=3, workers=0), progress=False, log=lambda m: None)
    return folder / "db"


def unet_folder(folder: Path, classes: int, input_dtype: str, mean: float, std: float, depth: int) -> Path:
    """``folder/run``: a seeded untrained UNet (base 4 filters) saved with a version-1 model.json."""
    import json

    import keras

    from lib.models import build_model, model_geometry

    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    options = {"base_filters": 4, "depth": depth}
    divisor, radius = model_geometry("unet", **options)
    run = folder / "run"
    run.mkdir(parents=True)
    build_model("unet", 1, classes, **options).save(run / "model.keras")
    meta = {"architecture": "unet", "model_options": options, "label_kind": "semantic", "number_classes": classes,
            "input_channels": 1, "input_dtype": input_dtype,
            "normalization": {"mode": "dataset", "mean": [mean], "std": [std]},
            "size_divisor": divisor, "receptive_field_radius": radius}
    (run / "model.json").write_text(json.dumps(meta))
    return run
