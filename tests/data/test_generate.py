"""data/generate.py: the synthetic example dataset, written through lib.store.images."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from data.generate import generate_dataset, main
from lib.common.settings import ConfigError
from lib.store.images import read_image, read_mask
from tests.conftest import ROOT


def test_dataset_files_are_whole_and_readable_as_the_umask_says(tmp_path, monkeypatch):
    previous = os.umask(0o022)
    try:
        out = generate_dataset(tmp_path / "d", n_images=2, height=48, width=40, n_experts=1, seed=2)
    finally:
        os.umask(previous)
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == ["experts/expert1/cells_000.png", "experts/expert1/cells_001.png", "images/cells_000.tif",
                       "images/cells_001.tif", "instances/cells_000.tif", "instances/cells_001.tif",
                       "masks/cells_000.png", "masks/cells_001.png"]
    assert all((out / name).stat().st_mode & 0o777 == 0o644 for name in written)
    image, semantic = read_image(out / "images/cells_000.tif"), read_mask(out / "masks/cells_000.png")
    assert image.shape == (48, 40, 1) and image.dtype == np.uint16
    assert semantic.shape == (48, 40) and set(np.unique(semantic)) <= {0, 1, 2}
    again = generate_dataset(tmp_path / "e", n_images=1, height=48, width=40, n_experts=0, seed=2)
    np.testing.assert_array_equal(read_image(again / "images/cells_000.tif"), image)


def test_bad_arguments_are_reported_together_and_nothing_is_written(tmp_path, capsys):
    with pytest.raises(ConfigError) as info:
        generate_dataset(tmp_path / "d", n_images=0, height=16, n_experts=-1)
    assert len(info.value.violations) == 3 and "height must be >= 32; got 16" in str(info.value)
    assert main(["--output_folder", str(tmp_path / "d"), "--n_images", "0"]) == 2
    assert "n_images must be >= 1; got 0" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_runs_as_a_script(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "data" / "generate.py"), "--output_folder", str(tmp_path),
                             "--n_images", "1", "--height", "32", "--width", "32", "--n_experts", "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "images" / "cells_000.tif").is_file()
