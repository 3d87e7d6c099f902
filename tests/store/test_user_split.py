"""build_lmdb.py --test_image_folder/--test_mask_folder: the user's own test set becomes the test database."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

import build_lmdb
from lib.common.settings import ConfigError
from lib.store.build import BuildConfig, build_databases
from lib.store.lmdb_store import LmdbReader
from tests.conftest import write_pairs


def _two_sets(tmp_path: Path, rename: bool = True) -> tuple[Path, Path]:
    train = write_pairs(tmp_path / "train", [(40, 40)] * 5, seed=1)
    test = write_pairs(tmp_path / "test", [(40, 48)] * 3, seed=2)
    if rename:
        for sub in ("images", "masks"):
            for f in sorted((test / sub).iterdir()):
                f.rename(f.with_name(f.name.replace("img_", "test_")))
    return train, test


def _argv(train: Path, test: Path | None, out: Path, *extra: str) -> list[str]:
    argv = ["--image_folder", str(train / "images"), "--mask_folder", str(train / "masks"),
            "--output_folder", str(out), "--dataset_name", "u", "--tile_size", "32", "--workers", "0", "--quiet"]
    if test is not None:
        argv += ["--test_image_folder", str(test / "images"), "--test_mask_folder", str(test / "masks")]
    return argv + list(extra)


def test_every_test_folder_image_goes_to_the_test_database(tmp_path, capsys):
    train, test = _two_sets(tmp_path)
    out = tmp_path / "db"
    assert build_lmdb.main(_argv(train, test, out, "--folds", "2")) == 0
    with LmdbReader(out / "train-u.lmdb") as reader:
        train_meta = reader.metadata
    with LmdbReader(out / "test-u.lmdb") as reader:
        test_meta = reader.metadata
    sources = train_meta["sources"]
    used_train = {sources[i]["key"] for i in train_meta["tiles"]["source"]}
    used_test = {sources[i]["key"] for i in test_meta["tiles"]["source"]}
    assert used_train == {f"img_{i:02d}" for i in range(5)}
    assert used_test == {f"test_{i:02d}" for i in range(3)}
    assert train_meta["build_config"]["train_fraction"] == 1.0
    # folds among the training images only; test images have none
    folds = {s["key"]: s["fold"] for s in sources}
    assert {folds[k] for k in used_train} == {0, 1} and {folds[k] for k in used_test} == {-1}
    rows = list(csv.DictReader(open(out / "split-u.csv")))
    assert {r["key"]: r["split"] for r in rows} == {**{k: "train" for k in used_train},
                                                    **{k: "test" for k in used_test}}


def test_explicit_train_fraction_one_is_accepted_and_below_one_refused(tmp_path, capsys):
    train, test = _two_sets(tmp_path)
    assert build_lmdb.main(_argv(train, test, tmp_path / "a", "--train_fraction", "1")) == 0
    with pytest.raises(SystemExit) as info:
        build_lmdb.main(_argv(train, test, tmp_path / "b", "--train_fraction", "0.8"))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--train_fraction must be 1 with --test_image_folder" in err and "got 0.8" in err
    assert not (tmp_path / "b").exists()


def test_half_a_test_set_and_train_fraction_zero_are_told_clearly(tmp_path, capsys):
    train, test = _two_sets(tmp_path)
    argv = _argv(train, None, tmp_path / "c", "--test_image_folder", str(test / "images"))
    with pytest.raises(SystemExit) as info:
        build_lmdb.main(argv)
    assert info.value.code == 2
    assert "--test_mask_folder must be given with test_image_folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        build_lmdb.main(_argv(train, None, tmp_path / "c", "--train_fraction", "0"))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--train_fraction must be in (0, 1]; got 0.0: no image would go to the training database" in err
    assert "--test_image_folder" in err
    assert not (tmp_path / "c").exists()


def test_a_name_in_both_sets_is_refused_before_anything_is_written(tmp_path, capsys):
    train, test = _two_sets(tmp_path, rename=False)
    out = tmp_path / "d"
    assert build_lmdb.main(_argv(train, test, out)) == 2
    err = capsys.readouterr().err
    assert "image names must differ between image_folder and test_image_folder; got 3 in both: img_00" in err
    assert not out.exists() or not any(out.iterdir())


def test_config_defaults_without_a_test_folder_stay_as_before(tmp_path):
    train, test = _two_sets(tmp_path)
    plain = BuildConfig(image_folder=str(train / "images"), mask_folder=str(train / "masks"),
                        output_folder=str(tmp_path / "e"), dataset_name="u")
    assert plain.train_fraction == 0.8
    with pytest.raises(ConfigError, match="test_image_folder must differ from image_folder"):
        BuildConfig(image_folder=str(train / "images"), mask_folder=str(train / "masks"),
                    output_folder=str(tmp_path / "e"), dataset_name="u", test_image_folder=str(train / "images"),
                    test_mask_folder=str(test / "masks")).validate()
    result = build_databases(BuildConfig(image_folder=str(train / "images"), mask_folder=str(train / "masks"),
                                         output_folder=str(tmp_path / "f"), dataset_name="u", tile_size=32, workers=0,
                                         test_image_folder=str(test / "images"),
                                         test_mask_folder=str(test / "masks")), progress=False, log=lambda m: None)
    assert result.n_images == {"train": 5, "test": 3}
