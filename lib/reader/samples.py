"""Pictures of what the network sees: augmented examples beside their labels (``--save_aug_samples``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..common.pictures import colour_labels, display_image, enlarge, save_png
from ..store.lmdb_store import LmdbReader
from .augment import AugmentParams, augment
from .imagereader import ImageReader


def save_augmentation_samples(reader_or_db: ImageReader | LmdbReader | str | os.PathLike, out_dir: str | os.PathLike,
                              n: int = 8, params: AugmentParams | None = None, seed: int = 0,
                              patch_shape: Sequence[int] | None = None, side: int | None = None) -> list[Path]:
    """Write ``n`` PNGs ``aug_sample_XX.png``: an augmented image beside its coloured label.

    ``side``: patches shorter than this on their long side are enlarged by a whole factor
    (nearest neighbour: every pixel a sharp square), so that a 32 px patch can be seen; None
    keeps them at their size (a 4 px white gap between the two then).

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
            shown, coloured = display_image(image), colour_labels(label)
            if side is not None:
                shown, coloured = enlarge(shown, side), enlarge(coloured, side)
            gap = np.full((shown.shape[0], 4 if side is None else 8, 3), 255, np.uint8)
            picture = np.concatenate([shown, gap, coloured], axis=1)
            paths.append(save_png(out_dir / f"aug_sample_{i:02d}.png", picture))
    return paths
