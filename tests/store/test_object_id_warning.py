"""Instance-like masks built as semantic classes with --number_classes: built, with a warning naming them."""

from __future__ import annotations

import numpy as np

import build_lmdb
from lib.store.images import write_image


def _instance_pairs(folder, n=2):
    rng = np.random.default_rng(0)
    for i in range(n):
        mask = np.zeros((64, 64), np.uint8)
        for obj in range(1, 13):  # twelve 5x5 objects with their own ids
            y, x = divmod(obj - 1, 4)
            mask[4 + 15 * y:9 + 15 * y, 4 + 15 * x:9 + 15 * x] = obj
        write_image(folder / "images" / f"cells_{i}.tif", rng.integers(0, 4000, (64, 64)).astype(np.uint16))
        write_image(folder / "masks" / f"cells_{i}.png", mask)
    return folder


def _argv(folder, out, *extra):
    return ["--image_folder", str(folder / "images"), "--mask_folder", str(folder / "masks"), "--output_folder",
            str(out), "--dataset_name", "o", "--tile_size", "32", "--workers", "0", "--quiet", *extra]


def test_object_ids_with_number_classes_warn_and_suggest_instance(tmp_path, capsys):
    folder = _instance_pairs(tmp_path / "data")
    assert build_lmdb.main(_argv(folder, tmp_path / "db", "--number_classes", "13")) == 0
    out = capsys.readouterr().out
    assert "warning: 2 mask(s) hold many values that each form a small separate blob, like object ids" in out
    assert "cells_0.png (12 values)" in out and "--mask_type instance" in out
    assert (tmp_path / "db" / "train-o.lmdb").is_dir()


def test_object_ids_without_number_classes_are_still_refused(tmp_path, capsys):
    folder = _instance_pairs(tmp_path / "data")
    assert build_lmdb.main(_argv(folder, tmp_path / "db")) == 2
    assert "Pass --mask_type instance" in capsys.readouterr().err


def test_real_classes_with_number_classes_do_not_warn(tmp_path, capsys):
    folder = tmp_path / "data"
    rng = np.random.default_rng(1)
    for i in range(2):
        write_image(folder / "images" / f"a_{i}.tif", rng.integers(0, 4000, (64, 64)).astype(np.uint16))
        write_image(folder / "masks" / f"a_{i}.png", (np.arange(64)[None, :] // 16 + np.zeros((64, 1), int))
                    .astype(np.uint8))
    assert build_lmdb.main(_argv(folder, tmp_path / "db", "--number_classes", "4")) == 0
    assert "object ids" not in capsys.readouterr().out
