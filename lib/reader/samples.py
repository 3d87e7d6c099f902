"""Pictures of what the network sees: augmented examples beside their labels (``--save_aug_samples``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from ..common.files import write_with
from ..store.lmdb_store import LmdbReader
from .augment import AugmentParams, augment
from .imagereader import ImageReader


def _colour_labels(label: np.ndarray) -> np.ndarray:
    """``(h, w)`` integer labels -> ``(h, w, 3)`` uint8; 0 is black, other values get fixed distinct colours."""
    values = label.astype(np.uint64)
    # A multiplicative hash spreads neighbouring ids (instances 1, 2, 3) over distant colours.
    hashed = (values * np.uint64(2654435761)) % np.uint64(2**32)
    rgb = np.stack([(hashed >> np.uint64(s)) & np.uint64(255) for s in (0, 8, 16)], axis=-1).astype(np.uint8)
    rgb = np.maximum(rgb, 64)
    rgb[label == 0] = 0
    return rgb


def _display(image: np.ndarray) -> np.ndarray:
    """``(h, w, C)`` float -> ``(h, w, 3)`` uint8, each channel stretched between its 1st and 99th percentiles."""
    shown = image[:, :, :3] if image.shape[2] >= 3 else image[:, :, :1]
    low, high = np.percentile(shown, [1, 99], axis=(0, 1))
    scaled = np.clip((shown - low) / np.maximum(high - low, 1e-6), 0, 1) * 255
    scaled = scaled.astype(np.uint8)
    return np.repeat(scaled, 3, axis=2) if scaled.shape[2] == 1 else scaled


def save_augmentation_samples(reader_or_db: ImageReader | LmdbReader | str | os.PathLike, out_dir: str | os.PathLike,
                              n: int = 8, params: AugmentParams | None = None, seed: int = 0,
                              patch_shape: Sequence[int] | None = None) -> list[Path]:
    """Write ``n`` PNGs ``aug_sample_XX.png``: an augmented image beside its coloured label.

    ``reader_or_db``: an ImageReader (its database, patch shape and augmentation are the
    defaults), an LmdbReader or a database path. Returns the paths written. Raises
    ``ValueError`` for ``n < 1``.
    """
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive number of samples; got {n!r}")
    if isinstance(reader_or_db, ImageReader):
        database = reader_or_db.database
        params = reader_or_db.spec.augment if params is None else params
        patch_shape = reader_or_db.spec.patch_shape if patch_shape is None else patch_shape
    elif isinstance(reader_or_db, LmdbReader):
        database = reader_or_db.path
    else:
        database = Path(reader_or_db)
    params = AugmentParams() if params is None else params
    out_dir = Path(out_dir)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2**31 - 1]))
    paths = []
    with LmdbReader(database) as db:
        for i in range(int(n)):
            image, label = db[int(rng.integers(len(db)))]
            image, label = augment(image, label, rng, params, patch_shape)
            label = label if label.ndim == 2 else label[:, :, 0]
            gap = np.full((image.shape[0], 4, 3), 255, np.uint8)
            picture = np.concatenate([_display(image), gap, _colour_labels(label)], axis=1)
            paths.append(write_with(out_dir / f"aug_sample_{i:02d}.png", lambda tmp: _write_png(tmp, picture)))
    return paths


def _write_png(path: Path, picture: np.ndarray) -> None:
    if not cv2.imwrite(str(path), picture[:, :, ::-1]):  # OpenCV writes BGR
        raise OSError(f"could not write {path}")
