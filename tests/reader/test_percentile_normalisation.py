"""Percentile normalisation in training: per whole source image (never per patch), from the build's tables."""

from __future__ import annotations

import numpy as np
import pytest

from lib.common import normalization as norm
from lib.reader.batches import source_percentile_ranges
from lib.reader.imagereader import ImageReader
from lib.store.build import BuildConfig, build_databases
from lib.store.images import read_image, write_image
from lib.store.lmdb_store import LmdbReader
from lib.training.config import TrainConfig
from tests.conftest import write_pairs


def _database(tmp_path, dtype="uint16"):
    folder = write_pairs(tmp_path / "data", [(64, 64), (64, 96), (96, 64)], dtype=dtype, n_classes=2, seed=4)
    rng = np.random.default_rng(5)
    for i, path in enumerate(sorted((folder / "images").iterdir())):
        image = read_image(path)[..., 0]
        # very different exposures and a gradient, so per-image and per-patch statistics differ
        ramp = np.linspace(0, 1, image.shape[1])[None, :]
        scaled = (image * 0.01 * (i + 1) ** 3 + 5000 * ramp + rng.normal(0, 3, image.shape))
        write_image(path, scaled.astype(dtype) if dtype != "uint16" else np.clip(scaled, 0, 65535).astype(dtype))
    build_databases(BuildConfig(image_folder=str(folder / "images"), mask_folder=str(folder / "masks"),
                                output_folder=str(tmp_path / "db"), dataset_name="p", tile_size=32,
                                train_fraction=1.0, workers=0), progress=False, log=lambda m: None)
    return tmp_path / "db" / "train-p.lmdb"


@pytest.mark.parametrize("dtype", ["uint16", "float32"])
def test_the_build_stores_each_images_percentiles(tmp_path, dtype):
    database = _database(tmp_path, dtype)
    with LmdbReader(database) as reader:
        meta = reader.metadata
    assert meta["percentile_grid"] == list(norm.PERCENTILE_GRID)
    for source in meta["sources"]:
        image = read_image(source["image"]).astype(np.float64)
        expected = np.percentile(image.reshape(-1, 1), norm.PERCENTILE_GRID, axis=0)
        np.testing.assert_allclose(source["percentiles"], expected, rtol=1e-6, atol=1e-6)


def test_batches_are_normalised_with_the_whole_source_images_percentiles(tmp_path):
    database = _database(tmp_path)
    with LmdbReader(database) as reader:
        meta = reader.metadata
        records = [reader[i][0].copy() for i in range(len(reader))]
    reader = ImageReader(database, 4, mode="test", normalization="percentile", reader_count=0)
    got = np.concatenate([batch.images[:len(batch)] for batch in reader.epoch(copy=True)])
    reader.close()
    assert got.dtype == np.float32 and len(got) == len(records)
    for record, (tile, out) in enumerate(zip(records, got)):
        source = meta["sources"][meta["tiles"]["source"][record]]
        image = read_image(source["image"]).astype(np.float64)
        low, high = np.percentile(image, [1.0, 99.8])
        np.testing.assert_allclose(out, (tile - low) / (high - low), rtol=1e-5, atol=1e-5)
    # not the patch's own percentiles: those would put every tile's 1st percentile at 0
    assert max(abs(float(np.percentile(o, 1.0))) for o in got) > 0.2


def test_other_percentiles_and_old_databases_are_computed_from_the_records(tmp_path):
    database = _database(tmp_path)
    with LmdbReader(database) as reader:
        meta = dict(reader.metadata)
    from_tables = source_percentile_ranges(str(database), meta, (1.0, 99.8))
    old = {k: v for k, v in meta.items() if k != "percentile_grid"}  # a database built before the tables
    np.testing.assert_allclose(np.asarray(source_percentile_ranges(str(database), old, (1.0, 99.8))),
                               np.asarray(from_tables), rtol=1e-9)
    custom = source_percentile_ranges(str(database), meta, (2.5, 97.3))
    for source, (offset, scale) in zip(meta["sources"], custom):
        low, high = np.percentile(read_image(source["image"]).astype(np.float64), [2.5, 97.3])
        np.testing.assert_allclose([offset[0], scale[0]], [low, high - low], rtol=1e-9)


def test_the_percentile_settings_are_validated():
    with pytest.raises(ValueError, match="percentiles must satisfy 0 <= LOW < HIGH <= 100; got 99 1"):
        ImageReader("unused", 2, normalization="percentile", percentiles=(99, 1))
    assert norm.percentile_problems((5, 5)) and norm.percentile_problems("x") and not norm.percentile_problems((0, 100))
    assert TrainConfig(train_database="a", test_database="b", output_dir="c").percentiles == (1.0, 99.8)
