"""Instance models: label and probability outputs carry the pixel size (OME-TIFF PhysicalSizeX, OME-Zarr scale),
measurements use the input's pixel size when --pixel_size is not given, OME-Zarr outputs, and --thresholds nms
refused without polygons."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import inference  # noqa: E402
from lib.store.images import read_image, write_image  # noqa: E402

keras = pytest.importorskip("keras")
zarr = pytest.importorskip("zarr")

from tests.inference.test_inference_instances import disks, perfect_logits  # noqa: E402

CENTRES = [(12, 12), (12, 40), (36, 20), (40, 48)]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """One 56 x 60 image of four disks (logits of the perfect maps) as an OME-TIFF with a 0.5 um pixel."""
    folder = tmp_path_factory.mktemp("images_px")
    truth = disks((56, 60), CENTRES, 7.5)
    logits, _ = perfect_logits(truth)
    write_image(folder / "disks.tif", logits, ome=True, pixel_size=(0.5, 0.5))
    write_image(folder.parent / f"{folder.name}_masks" / "disks.tif", truth)
    return folder


def run(*args) -> int:
    return inference.main([str(a) for a in args] + ["--quiet"])


def physical_size_x(path: Path) -> float | None:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome, path
        pixels = tif.ome_metadata.split("<Pixels ", 1)[1].split(">", 1)[0]
    if "PhysicalSizeX=" not in pixels:
        return None
    return float(pixels.split('PhysicalSizeX="', 1)[1].split('"', 1)[0])


def measurements(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_labels_and_maps_carry_the_input_pixel_size_and_measure_in_um(oracle_folder, images, tmp_path, capsys):
    out = tmp_path / "out"
    assert inference.main(["--model", str(oracle_folder), "--image_folder", str(images), "--output_folder", str(out),
                           "--probabilities"]) == 0
    assert "disks.tif: measurements in um (0.5 um per pixel from the image's metadata)" in capsys.readouterr().out
    for name in ("disks.tif", "probabilities/disks_F.tif", "probabilities/disks_Db.tif"):
        assert physical_size_x(out / name) == 0.5, name
    rows = measurements(out / "disks_instances.csv")
    assert len(rows) == 4 and "area_um2" in rows[0] and "area_px2" not in rows[0]
    assert all(float(r["area_um2"]) == pytest.approx(int(r["npixels"]) * 0.25) for r in rows)
    record = json.loads((out / "records" / "disks.json").read_text())
    assert record["instances"]["measurement_pixel_size"] == 0.5 and record["pixel_size"] == [0.5, 0.5]


def test_the_pixel_size_flag_wins_and_filter_rules_keep_pixel_units(oracle_folder, images, tmp_path, capsys):
    out = tmp_path / "given"
    assert run("--model", oracle_folder, "--image_folder", images, "--output_folder", out, "--probabilities",
               "--pixel_size", "2") == 0
    assert physical_size_x(out / "disks.tif") == 2.0 and physical_size_x(out / "probabilities/disks_C.tif") == 2.0
    assert "area_um2" in measurements(out / "disks_instances.csv")[0]
    ruled = tmp_path / "ruled"
    assert inference.main(["--model", str(oracle_folder), "--image_folder", str(images), "--output_folder", str(ruled),
                           "--filter_rules", "npixels < 5"]) == 0
    assert "measurements in pixels (the image records 0.5 x 0.5 um, but --filter_rules are in pixel units)" in \
        capsys.readouterr().out
    assert "area_px2" in measurements(ruled / "disks_instances.csv")[0]
    assert physical_size_x(ruled / "disks.tif") == 0.5  # the files still carry it


def test_streamed_instance_outputs_carry_the_pixel_size(oracle_folder, images, tmp_path, monkeypatch):
    import lib.inference.runner
    import lib.inference.tiled

    monkeypatch.setattr(lib.inference.runner, "STREAM_PIXELS", 1000)
    monkeypatch.setattr(lib.inference.tiled, "TIFF_TILE", 16)
    out = tmp_path / "streamed"
    assert run("--model", oracle_folder, "--image_folder", images, "--output_folder", out, "--probabilities") == 0
    assert json.loads((out / "records" / "disks.json").read_text())["plan"]["streamed"]
    assert physical_size_x(out / "disks.tif") == 0.5 and physical_size_x(out / "probabilities/disks_F.tif") == 0.5
    assert read_image(out / "disks.tif")[..., 0].max() == len(CENTRES)


def _zarr(path: Path) -> tuple[np.ndarray, list]:
    group = zarr.open_group(str(path), mode="r")
    scale = group.attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"]
    return np.asarray(group["0"][...]), scale


@pytest.mark.parametrize("streamed", [False, True])
def test_ome_zarr_outputs_of_an_instance_model(oracle_folder, images, tmp_path, monkeypatch, streamed):
    import lib.inference.runner

    assert run("--model", oracle_folder, "--image_folder", images, "--output_folder", tmp_path / "tif",
               "--probabilities", "--uncertainty") == 0
    if streamed:
        monkeypatch.setattr(lib.inference.runner, "STREAM_PIXELS", 1000)
    out = tmp_path / "zarr"
    assert run("--model", oracle_folder, "--image_folder", images, "--output_folder", out, "--probabilities",
               "--uncertainty", "--output_format", "ome-zarr", "--mask_folder",
               images.parent / f"{images.name}_masks") == 0
    assoc = (out / "associations" / "disks.csv").read_text().splitlines()
    assert len(assoc) > 1 and all(line.startswith("disks,") for line in assoc[1:])  # named by the image's key
    f1 = next(r for r in csv.DictReader((out / "instance_metrics.csv").read_text().splitlines())
              if r["image"] == "disks" and float(r["threshold"]) == 0.5)["f1"]
    assert float(f1) == 1.0
    labels, scale = _zarr(out / "disks.ome.zarr")
    assert scale == [0.5, 0.5] and labels.dtype == np.uint16
    assert np.array_equal(labels, read_image(tmp_path / "tif" / "disks.tif")[..., 0])
    assert zarr.open_group(str(out / "disks.ome.zarr"), mode="r").attrs.get("image-label") is not None
    for name in ("F", "C", "Db"):
        values, scale = _zarr(out / "probabilities" / f"disks_{name}.ome.zarr")
        assert scale == [0.5, 0.5]
        np.testing.assert_allclose(values, read_image(tmp_path / "tif" / "probabilities" / f"disks_{name}.tif")[..., 0],
                                   atol=1e-6)
    assert (out / "uncertainty" / "disks_entropy.ome.zarr").is_dir() != streamed  # streamed: scores only
    record = json.loads((out / "records" / "disks.json").read_text())
    assert record["outputs"]["labels"] == "disks.ome.zarr"
    assert (out / "previews" / "disks_labels.png").is_file() and (out / "previews" / "disks_probabilities_F.png").is_file()
    assert not (out / "previews" / "disks_probabilities_Db.png").exists()  # a distance, not a probability
    assert not list(out.rglob("*.partial*"))


def test_nms_is_refused_without_polygons(oracle_folder, images, tmp_path, capsys):
    assert run("--model", oracle_folder, "--image_folder", images, "--output_folder", tmp_path / "out",
               "--thresholds", "nms=0.4") == 2
    err = capsys.readouterr().err
    assert "thresholds nms (the IoU of the polygon suppression) applies only to a model that makes polygons" in err
    assert "F,C,Db" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert run("--model", oracle_folder, "--image_folder", images, "--output_folder", tmp_path / "out",
               "--thresholds", "seed=0.7") == 2
    assert "thresholds seed (the seed score of the embedding clustering) applies only to a model with the E " \
        "channels" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert run("--model", oracle_folder, "--image_folder", images, "--output_folder", tmp_path / "png",
               "--output_format", "png") == 2
    assert "or ome-zarr" in capsys.readouterr().err
