"""inference.py with OME-TIFF and OME-Zarr. OME-TIFF outputs carry the input's pixel size. OME-Zarr: images read chunk by chunk give the labels of the same images as TIFF (in memory
and streamed), and --output_format ome-zarr writes labels, probabilities and uncertainty as NGFF images that
ome-zarr's reader opens with their axes and pixel size; reruns, --overwrite and foreign folders as for files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import inference  # noqa: E402
from lib.store.images import pixel_size_of, read_image, read_volume, write_image  # noqa: E402
from lib.store.ome_zarr import write_ome_zarr  # noqa: E402
from tests.conftest import write_pairs  # noqa: E402

zarr = pytest.importorskip("zarr")
SHAPES = [(70, 90), (64, 64), (100, 50)]


@pytest.fixture
def data(tmp_path) -> Path:
    """The same images as TIFF (images/) and as OME-Zarr with a 0.5 um pixel (zarr/), masks as PNG."""
    folder = write_pairs(tmp_path / "data", SHAPES)
    for path in sorted((folder / "images").iterdir()):
        write_ome_zarr(folder / "zarr" / f"{path.stem}.ome.zarr", read_image(path)[..., 0], labels=False,
                       pixel_size=(0.5, 0.5))
    return folder


def run(*args) -> int:
    return inference.main([str(a) for a in args] + ["--quiet"])


def _zarr_level(path: Path, level: int = 0) -> np.ndarray:
    return np.asarray(zarr.open_group(str(path), mode="r")[str(level)][...])


def test_ome_zarr_input_gives_the_labels_of_the_same_tiff_in_memory_and_streamed(model_folder, data, tmp_path,
                                                                                  monkeypatch):
    import lib.inference.runner
    import lib.inference.sources
    import lib.inference.tiled

    common = ["--model", model_folder, "--mask_folder", data / "masks", "--probabilities", "--tile_size", "64"]
    assert run(*common, "--image_folder", data / "images", "--output_folder", tmp_path / "tif") == 0
    assert run(*common, "--image_folder", data / "zarr", "--output_folder", tmp_path / "zarr") == 0
    # Read window by window (a lazy view) and streamed zone row by zone row.
    monkeypatch.setattr(lib.inference.sources, "MEMMAP_PIXELS", 0)
    monkeypatch.setattr(lib.inference.runner, "STREAM_PIXELS", 1000)
    monkeypatch.setattr(lib.inference.tiled, "TIFF_TILE", 16)
    opened = []
    real_open = lib.inference.runner.open_image
    monkeypatch.setattr(lib.inference.runner, "open_image", lambda p, i: opened.append(real_open(p, i)) or opened[-1])
    assert run(*common, "--image_folder", data / "zarr", "--output_folder", tmp_path / "lazy") == 0
    assert {type(image).__name__ for image in opened} == {"OmeZarrView"}
    for i in range(len(SHAPES)):
        expected = read_image(tmp_path / "tif" / f"img_{i:02d}.tif")
        for out in ("zarr", "lazy"):
            assert np.array_equal(read_image(tmp_path / out / f"img_{i:02d}.tif"), expected), (out, i)
            assert np.allclose(read_image(tmp_path / out / "probabilities" / f"img_{i:02d}.tif"),
                               read_image(tmp_path / "tif" / "probabilities" / f"img_{i:02d}.tif"), atol=1e-6)
    assert (tmp_path / "lazy" / "metrics.csv").read_text() == (tmp_path / "tif" / "metrics.csv").read_text()
    record = json.loads((tmp_path / "lazy" / "records" / "img_00.json").read_text())
    assert record["plan"]["streamed"] and record["pixel_size"] == [0.5, 0.5]


def test_ome_zarr_output_of_every_field_opens_with_the_reader(model_folder, data, tmp_path, monkeypatch):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    import lib.inference.runner

    stack = np.random.default_rng(7).integers(0, 60000, (3, 40, 48)).astype(np.uint16)
    for folder in ("images", "zarr"):
        write_image(data / folder / "stack.tif", stack[..., np.newaxis])
    common = ["--model", model_folder, "--probabilities", "--uncertainty", "--tile_size", "64"]
    assert run(*common, "--image_folder", data / "images", "--output_folder", tmp_path / "tif") == 0
    out = tmp_path / "out"
    assert run(*common, "--image_folder", data / "zarr", "--output_folder", out, "--output_format", "ome-zarr") == 0
    monkeypatch.setattr(lib.inference.runner, "STREAM_PIXELS", 1000)  # streamed: zone rows into the pyramid
    assert run(*common, "--image_folder", data / "zarr", "--output_folder", tmp_path / "streamed",
               "--output_format", "ome-zarr") == 0
    for folder in (out, tmp_path / "streamed"):
        for i in range(len(SHAPES)):
            key = f"img_{i:02d}"
            labels = _zarr_level(folder / f"{key}.ome.zarr")
            assert np.array_equal(labels, read_image(tmp_path / "tif" / f"{key}.tif")[..., 0])
            probabilities = _zarr_level(folder / "probabilities" / f"{key}.ome.zarr")
            assert probabilities.shape == (3,) + SHAPES[i]  # (classes, H, W)
            assert np.allclose(np.moveaxis(probabilities, 0, -1),
                               read_image(tmp_path / "tif" / "probabilities" / f"{key}.tif"), atol=1e-6)
            entropy = _zarr_level(folder / "uncertainty" / f"{key}_entropy.ome.zarr")
            assert np.allclose(entropy, read_image(tmp_path / "tif" / "uncertainty" / f"{key}_entropy.tif")[..., 0],
                               atol=1e-6)
        node = next(iter(Reader(parse_url(str(folder / "img_00.ome.zarr")))()))
        assert [(a["name"], a["type"], a.get("unit")) for a in node.metadata["axes"]] == [
            ("y", "space", "micrometer"), ("x", "space", "micrometer")]
        assert node.metadata["coordinateTransformations"][0][0]["scale"] == [0.5, 0.5]  # from the input's metadata
        maps = next(iter(Reader(parse_url(str(folder / "probabilities" / "img_00.ome.zarr")))()))
        assert [a["name"] for a in maps.metadata["axes"]] == ["c", "y", "x"]
        assert not list(folder.rglob("*.partial*"))
    volume = _zarr_level(out / "stack.ome.zarr")
    assert volume.shape == (3, 40, 48) and np.array_equal(volume, read_volume(tmp_path / "tif" / "stack.tif")[..., 0])
    attrs = json.loads((out / "stack.ome.zarr" / ".zattrs").read_text())
    assert [a["name"] for a in attrs["multiscales"][0]["axes"]] == ["z", "y", "x"]
    record = json.loads((out / "records" / "img_00.json").read_text())
    assert record["outputs"]["labels"] == "img_00.ome.zarr"


def test_reruns_overwrite_and_foreign_folders_as_for_files(model_folder, data, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--model", model_folder, "--image_folder", data / "zarr", "--output_folder", out,
            "--output_format", "ome-zarr"]
    assert run(*args) == 0
    chunk = out / "img_01.ome.zarr" / "0" / "0" / "0"
    before = chunk.stat().st_mtime_ns
    assert run(*args) == 0 and "0 predicted, 3 skipped" in capsys.readouterr().out  # done before
    assert chunk.stat().st_mtime_ns == before
    assert run(*args, "--overwrite") == 0
    assert chunk.stat().st_mtime_ns != before and len(list(out.glob("*.ome.zarr"))) == 3
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary or old folders left
    foreign = tmp_path / "other"
    (foreign / "img_00.ome.zarr").mkdir(parents=True)
    (foreign / "img_00.ome.zarr" / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert run(*args[:-4], "--output_folder", foreign, "--output_format", "ome-zarr") == 2
    assert "did not write" in capsys.readouterr().err and "img_00.ome.zarr" in str(list(foreign.iterdir()))
    assert (foreign / "img_00.ome.zarr" / "notes.txt").read_text() == "mine"


def test_a_damaged_zarr_image_fails_by_name_and_the_others_are_done(model_folder, data, tmp_path, capsys):
    (data / "zarr" / "broken.zarr").mkdir()
    out = tmp_path / "out"
    assert run("--model", model_folder, "--image_folder", data / "zarr", "--output_folder", out) == 1
    err = capsys.readouterr().err
    assert "broken.zarr" in err and "OME-Zarr" in err and "Traceback" not in err
    assert len(list(out.glob("img_*.tif"))) == 3 and not (out / "broken.tif").exists()


def test_inference_tiffs_carry_the_input_pixel_size(model_folder, tmp_path):
    import tifffile

    data = write_pairs(tmp_path / "data", [(40, 48)])
    image = read_image(data / "images" / "img_00.tif")[..., 0]
    write_image(data / "images" / "img_00.tif", image, ome=True, pixel_size=(0.65, 0.65))
    out = tmp_path / "out"
    assert inference.main(["--model", str(model_folder), "--image_folder", str(data / "images"), "--output_folder",
                           str(out), "--probabilities", "--uncertainty", "--quiet"]) == 0
    for name, axes in (("img_00.tif", "YX"), ("probabilities/img_00.tif", "CYX"),
                       ("uncertainty/img_00_entropy.tif", "YX")):
        with tifffile.TiffFile(out / name) as tif:
            assert tif.is_ome and tif.series[0].axes == axes, name
        assert pixel_size_of(out / name) == (0.65, 0.65), name
