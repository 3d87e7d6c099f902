"""Fault injection for inference.py (issue 13): each row makes its bad input, runs main(argv), and checks the
exit code, the message (what, which file, how to fix) and what is left on disk."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import inference  # noqa: E402
from lib.store.images import read_image, write_image  # noqa: E402
from tests.conftest import unet_folder  # noqa: E402


@pytest.fixture(scope="module")
def float_model(tmp_path_factory) -> Path:
    """A tiny semantic UNet (base 4, depth 1) taking float32 images."""
    pytest.importorskip("keras")
    return unet_folder(tmp_path_factory.mktemp("model"), 2, "float32", 0.0, 1.0, depth=1)


@pytest.fixture
def images(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    for i in range(3):
        write_image(folder / f"img_{i}.tif", rng.standard_normal((24, 32)).astype(np.float32))
    return folder


def run(model, images, out, *extra) -> int:
    return inference.main([str(a) for a in ("--model", model, "--image_folder", images, "--output_folder", out,
                                            "--quiet", *extra)])


def _foreign_label(out: Path) -> bytes:
    out.mkdir()
    write_image(out / "img_1.tif", np.full((5, 5), 7, np.uint8))  # the user's own file, same name
    return (out / "img_1.tif").read_bytes()


def _foreign_table(out: Path) -> bytes:
    out.mkdir()
    (out / "uncertainty.csv").write_text("my notes\n")
    return (out / "uncertainty.csv").read_bytes()


@pytest.mark.parametrize("make, name", [(_foreign_label, "img_1.tif"), (_foreign_table, "uncertainty.csv")],
                         ids=["unrelated KEY.tif", "unrelated table, no inference.json"])
def test_file_not_written_by_inference_is_never_replaced(float_model, images, tmp_path, capsys, make, name):
    out = tmp_path / "out"
    before = make(out)
    assert run(float_model, images, out) == 2
    err = capsys.readouterr().err
    assert str(out / name) in err and "--overwrite" in err and "choose a new folder" in err
    assert (out / name).read_bytes() == before  # untouched
    assert sorted(p.name for p in out.iterdir()) == [name]  # nothing else written
    assert run(float_model, images, out, "--overwrite") == 0  # the user's explicit choice
    assert (out / name).read_bytes() != before


def test_rerun_same_model_skips_and_killed_image_is_redone(float_model, images, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(float_model, images, out) == 0
    assert not list((out / "records").glob("*.pending.json"))  # claims released once recorded
    # a run killed between img_1's labels and its record: the claim is still there
    (out / "records" / "img_1.json").rename(out / "records" / "img_1.pending.json")
    capsys.readouterr()
    assert run(float_model, images, out) == 0
    assert "1 predicted, 2 skipped" in capsys.readouterr().out
    assert (out / "records" / "img_1.json").is_file() and not (out / "records" / "img_1.pending.json").exists()


def test_a_different_model_never_reuses_results(float_model, images, tmp_path, capsys):
    keras = pytest.importorskip("keras")
    from lib.models import build_model

    out, other = tmp_path / "out", tmp_path / "retrained"
    assert run(float_model, images, out) == 0
    shutil.copytree(float_model, other)
    assert run(other, images, tmp_path / "out2") == 0  # a byte-equal copy: same fingerprint
    labels = (out / "img_0.tif").read_bytes()
    keras.utils.set_random_seed(1)  # retrained in place: same path, other weights
    build_model("unet", 1, 2, base_filters=4, depth=1).save(other / "model.keras")
    capsys.readouterr()
    assert run(other, images, tmp_path / "out2") == 2
    err = capsys.readouterr().err
    assert "model_fingerprint" in err and "--overwrite" in err
    assert (out / "img_0.tif").read_bytes() == labels


def test_nan_pixels_fail_that_image_by_name(float_model, images, tmp_path, capsys):
    bad = np.zeros((24, 32), np.float32)
    bad[3:6, 4:9] = np.nan
    bad[0, 0] = np.inf
    write_image(images / "img_1.tif", bad)
    out = tmp_path / "out"
    assert run(float_model, images, out) == 1
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "img_1" in text and "16 NaN or infinite pixel(s)" in text and str(images / "img_1.tif") in text
    assert not (out / "img_1.tif").exists() and not (out / "records" / "img_1.json").exists()
    assert read_image(out / "img_0.tif").shape == (24, 32, 1)  # the others are done


@pytest.mark.parametrize("damage", ["truncated", "flipped bytes"])
def test_damaged_model_file_is_named(float_model, images, tmp_path, capsys, damage):
    model = tmp_path / "model"
    shutil.copytree(float_model, model)
    data = (model / "model.keras").read_bytes()
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        middle = len(data) // 2
        data = data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 64]) + data[middle + 64:]
    (model / "model.keras").write_bytes(data)
    out = tmp_path / "out"
    assert run(model, images, out) == 2
    err = capsys.readouterr().err
    assert "damaged or truncated" in err and str(model / "model.keras") in err and "File not found" not in err
    assert not out.exists()


def test_output_folder_that_is_a_file(float_model, images, tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("a file")
    assert run(float_model, images, out) == 2
    assert "output_folder must be a folder" in capsys.readouterr().err
    assert out.read_text() == "a file"
