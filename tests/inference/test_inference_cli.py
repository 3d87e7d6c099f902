"""inference.py end to end: outputs, resume, failures by name, shards, evaluation, --help without TensorFlow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[2]

import inference  # noqa: E402
from lib.store.images import read_image, read_volume, write_image
from tests.conftest import write_pairs  # noqa: E402


@pytest.fixture
def data(tmp_path) -> Path:
    return write_pairs(tmp_path / "data", [(70, 90), (64, 64), (33, 80), (100, 50)])


def run(*args) -> int:
    return inference.main([str(a) for a in args] + ["--quiet"])


def test_help_does_not_import_tensorflow():
    code = ("import sys, contextlib, io\nimport inference\nwith contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    try:\n        inference.main(['--help'])\n    except SystemExit:\n        pass\n"
            "assert '--saved_model_filepath' in out.getvalue() and '--shard' in out.getvalue()\n"
            "print('tensorflow' in sys.modules, 'keras' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False False"


def test_predicts_evaluates_and_writes_every_output(model_folder, data, tmp_path, capsys):
    out = tmp_path / "out"
    code = run("--saved_model_filepath", model_folder, "--image_folder", data / "images", "--mask_folder",
               data / "masks", "--output_folder", out, "--probabilities", "--uncertainty", "--tile_size", "64",
               "--batch_size", "2")
    assert code == 0
    labels = read_image(out / "img_00.tif")
    assert labels.shape == (70, 90, 1) and labels.dtype == np.uint8 and labels.max() < 3
    probabilities = read_image(out / "probabilities" / "img_00.tif")
    assert probabilities.shape == (70, 90, 3) and probabilities.dtype == np.float32
    assert np.array_equal(probabilities.argmax(-1), labels[..., 0])
    assert read_image(out / "uncertainty" / "img_03_entropy.tif").shape == (100, 50, 1)
    overlay = read_image(out / "overlays" / "img_02.png")  # 33 x 80 enlarged 10x, legend strip below
    assert overlay.shape[1] == 800 and overlay.shape[0] > 330 and (out / "report.html").is_file()
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("image,pixels,pixel_accuracy,mean_iou") and len(rows) == 6
    assert rows[-1].startswith("ALL,") and int(rows[-1].split(",")[1]) == 70 * 90 + 64 * 64 + 33 * 80 + 100 * 50
    assert len((out / "uncertainty.csv").read_text().splitlines()) == 5
    settings = json.loads((out / "inference.json").read_text())
    assert settings["compared"]["halo"] == 23 and settings["exact"]
    record = json.loads((out / "records" / "img_00.json").read_text())
    assert record["halo"] == 23 and record["plan"]["tiles"] > 1
    assert not list(out.rglob("*.partial*"))
    printed = capsys.readouterr().out
    assert "halo 23 px (exact" in printed and "mean IoU" in printed


def test_png_labels_and_rerun_resumes(model_folder, data, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--model", model_folder, "--image_folder", data / "images", "--output_folder", out,
            "--output_format", "png"]
    assert run(*args) == 0
    first = read_image(out / "img_01.png")
    assert first.dtype == np.uint8
    # An interrupted run: one image's record and labels missing, a stale temporary left behind.
    (out / "records" / "img_01.json").unlink()
    (out / "img_01.png").unlink()
    (out / ".img_01.abc.partial.png").write_bytes(b"")
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("img_0*.png")}
    capsys.readouterr()
    assert run(*args) == 0
    assert "1 predicted, 3 skipped" in capsys.readouterr().out
    assert np.array_equal(read_image(out / "img_01.png"), first)
    assert all((out / name).stat().st_mtime_ns == stamp for name, stamp in stamps.items())
    assert run(*args, "--overwrite") == 0
    assert "4 predicted, 0 skipped" in capsys.readouterr().out


def test_bad_images_are_reported_by_name_and_the_others_predicted(model_folder, data, tmp_path, capsys):
    write_image(data / "images" / "rgb.tif", np.zeros((40, 40, 3), np.uint16))
    write_image(data / "images" / "bytes.png", np.zeros((40, 40), np.uint8))
    (data / "images" / "broken.tif").write_bytes(b"II*\x00garbage")
    out = tmp_path / "out"
    assert run("--model", model_folder, "--image_folder", data / "images", "--output_folder", out) == 1
    err = capsys.readouterr().err
    assert "3 image(s) failed" in err
    assert "rgb: image channels must be 1" in err and "rgb.tif" in err
    assert "bytes: image dtype must be uint16" in err
    assert "broken: cannot read" in err
    assert sorted(p.name for p in out.glob("*.tif")) == [f"img_0{i}.tif" for i in range(4)]


def test_shards_split_the_folder_without_collisions(model_folder, data, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["--model", model_folder, "--image_folder", data / "images", "--output_folder", out,
            "--mask_folder", data / "masks"]
    assert run(*base, "--shard", "0/3") == 0
    assert sorted(p.name for p in out.glob("*.tif")) == ["img_00.tif", "img_03.tif"]
    assert run(*base, "--shard", "1/3") == 0 and run(*base, "--shard", "2/3") == 0
    assert len((out / "metrics-shard1of3.csv").read_text().splitlines()) == 3
    capsys.readouterr()
    # Gathering run: every image is done, metrics.csv covers them all.
    assert run(*base) == 0
    assert "0 predicted, 4 skipped" in capsys.readouterr().out
    assert len((out / "metrics.csv").read_text().splitlines()) == 6


def test_other_settings_in_the_same_folder_are_refused(model_folder, data, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--model", model_folder, "--image_folder", data / "images", "--output_folder", out]
    assert run(*args) == 0
    assert run(*args, "--halo", "8") == 2
    assert "made with others (halo: 23 -> 8" in capsys.readouterr().err
    assert run(*args, "--halo", "8", "--overwrite") == 0


def test_stacks_are_predicted_plane_by_plane(model_folder, tmp_path):
    images = tmp_path / "stacks"
    stack = np.random.default_rng(0).integers(0, 60000, (3, 30, 41, 1)).astype(np.uint16)
    write_image(images / "stack.tif", stack)
    out = tmp_path / "out"
    assert run("--model", model_folder, "--image_folder", images, "--output_folder", out, "--z_filter", "3",
               "--output_format", "png") == 0
    labels = read_volume(out / "stack.tif")
    assert labels.shape == (3, 30, 41, 1) and labels.dtype == np.uint8


def test_bfloat16_precision_is_wired_through_and_recorded(model_folder, data, tmp_path, capsys):
    args = ["--model", model_folder, "--image_folder", data / "images", "--tile_size", "64"]
    assert run(*args, "--output_folder", tmp_path / "f32") == 0
    assert run(*args, "--output_folder", tmp_path / "bf16", "--precision", "bfloat16") == 0
    assert "; bfloat16" in capsys.readouterr().out
    settings = json.loads((tmp_path / "bf16" / "inference.json").read_text())
    assert settings["precision"] == "bfloat16" and settings["config"]["precision"] == "bfloat16"
    assert settings["compared"]["precision"] == "bfloat16"
    assert json.loads((tmp_path / "f32" / "inference.json").read_text())["precision"] == "float32"
    for key in ("img_00", "img_03"):
        single, half = (read_image(tmp_path / run_ / f"{key}.tif") for run_ in ("f32", "bf16"))
        assert (single == half).mean() > 0.99
    # A folder of float32 outputs is not completed in bfloat16.
    assert run(*args, "--output_folder", tmp_path / "f32", "--precision", "bfloat16") == 2
    assert "precision: 'float32' -> 'bfloat16'" in capsys.readouterr().err


def test_large_images_get_a_bar_over_tiles_on_a_terminal(model_folder, tmp_path, capsys, monkeypatch):
    write_image(tmp_path / "images" / "big.tif", np.zeros((200, 150), np.uint16))
    write_image(tmp_path / "images" / "small.tif", np.zeros((10, 10), np.uint16))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    code = inference.main(["--model", str(model_folder), "--image_folder", str(tmp_path / "images"),
                           "--output_folder", str(tmp_path / "out"), "--tile_size", "64", "--batch_size", "4"])
    assert code == 0
    err = capsys.readouterr().err
    assert "big:" in err and "/130 [" in err and "tile/s" in err  # 13 x 10 tiles of big.tif
    assert "2/2 [" in err
    assert "small:" not in err  # one tile: no bar of its own
    assert run("--model", model_folder, "--image_folder", tmp_path / "images", "--output_folder",
               tmp_path / "quiet") == 0
    assert "tile" not in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--precision", "half"], "--precision: invalid choice: 'half'"),
    (["--shard", "3/3"], "--shard: must be K/N with 0 <= K < N"),
    (["--shard", "a"], "--shard: must be K/N with integers"),
    (["--tile_size", "0"], "--tile_size must be >= 1"),
    (["--halo", "-1"], "--halo must be >= 0"),
    (["--z_filter", "2"], "--z_filter must be 0 (off) or an odd size"),
])
def test_flag_errors_exit_2(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        inference.main(["--model", "m", "--image_folder", str(tmp_path), "--output_folder", "o", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("case, message", [
    ("no_model", "not found"),
    ("same_folder", "output_folder must not be, contain or lie inside image_folder"),
    ("mask_folder", "output_folder must not be, contain or lie inside mask_folder"),
    ("inside_masks", "output_folder must not be, contain or lie inside mask_folder"),
    ("tile", "tile_size must be a multiple of the model's size divisor 4"),
    ("empty", "image_folder must hold images"),
])
def test_setting_errors_exit_2_before_writing(model_folder, data, tmp_path, case, message, capsys):
    model, images, out = model_folder, data / "images", tmp_path / "out"
    extra = []
    if case == "no_model":
        model = tmp_path / "nothing"
    elif case == "same_folder":
        out = images
    elif case in ("mask_folder", "inside_masks"):  # predicted KEY.tif would replace the mask KEY.tif
        extra = ["--mask_folder", data / "masks"]
        out = data / "masks" if case == "mask_folder" else data / "masks" / "pred"
    elif case == "tile":
        extra = ["--tile_size", "90"]
    elif case == "empty":
        images = tmp_path / "empty"
        images.mkdir()
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (data / "masks").iterdir())
    assert run("--model", model, "--image_folder", images, "--output_folder", out, *extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (data / "masks").iterdir()) == before


def test_large_images_stream_to_tiled_bigtiff_equal_to_in_memory(model_folder, data, tmp_path, monkeypatch):
    import tifffile

    import lib.inference.runner
    import lib.inference.tiled

    args = ["--model", model_folder, "--image_folder", data / "images", "--mask_folder", data / "masks",
            "--probabilities", "--uncertainty", "--tile_size", "64", "--output_format", "png"]
    assert run(*args, "--output_folder", tmp_path / "memory") == 0
    monkeypatch.setattr(lib.inference.runner, "STREAM_PIXELS", 1000)
    monkeypatch.setattr(lib.inference.tiled, "TIFF_TILE", 16)
    assert run(*args, "--output_folder", tmp_path / "stream") == 0
    for key in ("img_00", "img_03"):
        record = json.loads((tmp_path / "stream" / "records" / f"{key}.json").read_text())
        assert record["plan"]["streamed"]
        with tifffile.TiffFile(tmp_path / "stream" / f"{key}.tif") as tif:
            assert tif.is_bigtiff and tif.pages[0].is_tiled
        assert np.array_equal(read_image(tmp_path / "stream" / f"{key}.tif"),
                              read_image(tmp_path / "memory" / f"{key}.png"))
        for sub in ("probabilities/", "uncertainty/"):
            name = sub + (key if sub == "probabilities/" else key + "_entropy") + ".tif"
            assert np.allclose(read_image(tmp_path / "stream" / name), read_image(tmp_path / "memory" / name))
        assert np.array_equal(read_image(tmp_path / "stream" / "overlays" / f"{key}.png"),
                              read_image(tmp_path / "memory" / "overlays" / f"{key}.png"))
    assert (tmp_path / "stream" / "metrics.csv").read_text() == (tmp_path / "memory" / "metrics.csv").read_text()


@pytest.mark.parametrize("state, stopped, warned", [
    ("finished", "max_steps", False),
    ("interrupted", "signal SIGTERM", True),
    ("running", None, True),
    ("failed", "non_finite_loss", True),
])
def test_a_model_from_an_unfinished_run_is_named_as_such(model_folder, data, tmp_path, capsys, state, stopped, warned):
    import shutil

    folder = tmp_path / "run"
    shutil.copytree(model_folder, folder)
    meta = json.loads((folder / "model.json").read_text())
    meta.update(format_version=2, run_state=state, stopped_because=stopped)
    (folder / "model.json").write_text(json.dumps(meta))
    assert run("--model", folder, "--image_folder", data / "images", "--output_folder", tmp_path / "out") == 0
    out = capsys.readouterr().out
    assert (f"warning: {folder / 'model.json'} is from a training run that is {state}" in out) is warned
    if warned:
        assert "not a finished model. Rerun the training command" in out


def test_a_bug_on_one_image_shows_its_traceback_and_a_bad_file_does_not(model_folder, data, tmp_path, monkeypatch,
                                                                       capsys):
    import lib.inference.runner as runner

    real = runner.open_image

    def faulty(path, info):
        if path.stem == "img_01":
            raise TypeError("a programming error")
        return real(path, info)

    monkeypatch.setattr(runner, "open_image", faulty)
    (data / "images" / "img_02.tif").write_bytes(b"not a tiff")  # a user's broken file
    assert run("--model", model_folder, "--image_folder", data / "images", "--output_folder", tmp_path / "out") == 1
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "img_01.tif: TypeError: a programming error (skipped)" in text
    assert "Traceback (most recent call last)" in text and "in faulty" in text
    assert "img_02.tif" in text and text.count("Traceback (most recent call last)") == 1


def test_a_batch_log_gets_progress_lines_instead_of_bars(model_folder, data, tmp_path, monkeypatch, capsys):
    import lib.inference.runner as runner

    monkeypatch.setattr(runner, "HEARTBEAT_SECONDS", 0.0)  # a line per image here; a real log: every 60 s
    # stderr is not a terminal under pytest: tqdm's bars are off, as in a SLURM log
    assert inference.main(["--model", str(model_folder), "--image_folder", str(data / "images"),
                           "--output_folder", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("inference: ")]
    assert [line.split()[1] for line in lines] == ["1/4", "2/4", "3/4", "4/4"]
    assert all("Mpixel/s, about" in line and line.endswith("min left") for line in lines)


def test_quiet_runs_print_no_progress_lines(model_folder, data, tmp_path, capsys):
    assert run("--model", model_folder, "--image_folder", data / "images", "--output_folder", tmp_path / "out") == 0
    assert "inference: " not in capsys.readouterr().out


@pytest.mark.parametrize("first, second", [
    (["--output_format", "tif"], ["--output_format", "ome-zarr"]),
    ([], ["--pixel_size", "0.5"]),
])
def test_a_folder_keeps_one_output_format_and_pixel_size(model_folder, data, tmp_path, capsys, first, second):
    out = tmp_path / "out"
    base = ["--model", model_folder, "--image_folder", data / "images", "--output_folder", out, "--quiet"]
    assert run(*base, *first) == 0
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert run(*base, *second) == 2
    err = capsys.readouterr().err
    assert "output_folder must hold outputs of these settings only" in err and "--overwrite" in err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # nothing added or replaced
    assert run(*base, *second, "--overwrite") == 0
