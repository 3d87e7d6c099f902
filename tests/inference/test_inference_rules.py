"""The rules the inference redesign (issue 12) fixed, one test each: outputs independent of the halo,
one tile plan announced and predicted, tiles of several images sharing batches, file modes from the
umask, errors mapped by class, no dependency on training."""

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
from lib.common.errors import BadInput, ToolkitError
from lib.inference.predictor import InputMismatch, Member, Predictor
from lib.inference.runner import InferenceConfig, run_inference
from lib.model_folder import ModelInfo
from lib.store.images import read_image, write_image
from lib.store.tiling import inference_plan
from tests.conftest import write_pairs  # noqa: E402

keras = pytest.importorskip("keras")

from lib.inference.predictor import predictor_from_models  # noqa: E402
from lib.inference.tiled import predict_image, predict_whole  # noqa: E402
from lib.models import build_model, model_geometry  # noqa: E402

UNET = {"base_filters": 4, "depth": 2}


def semantic_json(divisor: int, radius: int, classes: int = 3) -> dict:
    return {"architecture": "unet", "model_options": UNET, "label_kind": "semantic", "number_classes": classes,
            "input_channels": 1, "input_dtype": "uint16",
            "normalization": {"mode": "dataset", "mean": [300.0], "std": [90.0]},
            "size_divisor": divisor, "receptive_field_radius": radius}


@pytest.fixture(scope="module")
def unet():
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    divisor, radius = model_geometry("unet", **UNET)
    return build_model("unet", 1, 3, **UNET), semantic_json(divisor, radius)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, unet) -> Path:
    model, meta = unet
    folder = tmp_path_factory.mktemp("model") / "run"
    folder.mkdir()
    model.save(folder / "model.keras")
    (folder / "model.json").write_text(json.dumps(meta))
    return folder


# The output does not depend on the halo


def test_every_halo_from_the_radius_gives_the_whole_image_output(unet):
    model, meta = unet
    predictor = predictor_from_models([(model, meta)])
    divisor, radius = meta["size_divisor"], meta["receptive_field_radius"]
    assert radius % divisor  # r and r + 1 round up to the same margin, r + 5 to the next one
    image = np.random.default_rng(1).integers(0, 600, (77, 131, 1)).astype(np.uint16)
    reference = predict_whole(predictor, image, halo=radius)
    for halo in (radius, radius + 1, radius + 5):
        whole = predict_whole(predictor, image, halo=halo)
        assert np.abs(whole - reference).max() < 1e-5, halo
        for tile_size in (None, 96):
            prediction = predict_image(predictor, image, tile_size=tile_size, halo=halo, batch_size=2,
                                       keep_probabilities=True)
            if tile_size is not None:
                assert prediction.plan.n_tiles > 1
            assert np.abs(prediction.probabilities - reference).max() < 1e-5, (halo, tile_size)
            assert np.array_equal(prediction.labels, reference.argmax(-1))


def test_tiles_start_on_the_image_pooling_grid():
    plan = inference_plan(300, 200, 16, 107, tile_size=256)
    assert plan.margin == 112
    for zone in plan.zones():
        y0, y1, x0, x1 = plan.tile_window(zone)
        assert y0 % 16 == 0 and x0 % 16 == 0
        assert zone[0] - y0 >= 107 and y1 - zone[1] >= 107 and x1 - zone[3] >= 107


# One plan: the tiles announced are the tiles predicted


class CountingForward:
    """A numpy stand-in for a model's compiled forward pass: constant maps, tiles counted."""

    def __init__(self, classes: int):
        self.classes = classes
        self.tiles = 0

    def __call__(self, x):
        self.tiles += x.shape[0]
        p = np.zeros(x.shape[:3] + (self.classes,), np.float32)
        p[..., 0] = 1.0
        return p, np.zeros(0, np.float32)


def stub_predictor(divisor: int = 32, radius: int = 96) -> tuple[Predictor, CountingForward]:
    info = ModelInfo.from_dict(semantic_json(divisor, radius, classes=2))
    forward = CountingForward(2)
    return Predictor([Member(info, None, forward)], source="stub"), forward


def test_huge_streamed_image_announces_the_tiles_it_predicts(tmp_path, capsys, monkeypatch):
    import tifffile

    side = 16384
    folder = tmp_path / "images"
    folder.mkdir()
    mapped = tifffile.memmap(folder / "huge.tif", shape=(side, side), dtype=np.uint16, photometric="minisblack")
    mapped[::4096, ::4096] = 7
    mapped.flush()
    del mapped
    predictor, forward = stub_predictor()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    config = InferenceConfig(model="stub", image_folder=str(folder), output_folder=str(tmp_path / "out"))
    result = run_inference(config, log=lambda _: None, progress=True, predictor=predictor)
    assert result.predicted == ["huge"] and not result.failed
    record = json.loads((tmp_path / "out" / "records" / "huge.json").read_text())
    assert record["plan"]["streamed"] and record["halo"] == 96
    expected = inference_plan(side, side, 32, 96).n_tiles
    assert record["plan"]["tiles"] == forward.tiles == expected
    assert f"/{expected} [" in capsys.readouterr().err  # the tile bar's total
    with tifffile.TiffFile(tmp_path / "out" / "huge.tif") as tif:
        assert tif.is_bigtiff and tif.pages[0].is_tiled and tif.pages[0].shape == (side, side)


# Tiles of several images share batches


def test_batched_images_give_the_outputs_of_one_image_at_a_time(model_folder, tmp_path):
    shapes = [(40, 50), (40, 50), (64, 64), (40, 50), (33, 80), (40, 50)]
    data = write_pairs(tmp_path / "data", shapes)
    calls = {}
    for batched in (False, True):
        predictor = predictor_from_models([(keras.models.load_model(model_folder / "model.keras"),
                                            json.loads((model_folder / "model.json").read_text()))],
                                          source=str(model_folder))
        counted = predictor.predict_batch
        calls[batched] = []

        def spy(tiles, *args, _calls=calls[batched], _inner=counted, **kwargs):
            _calls.append(len(tiles))
            return _inner(tiles, *args, **kwargs)

        predictor.predict_batch = spy
        config = InferenceConfig(model=str(model_folder), image_folder=str(data / "images"),
                                 mask_folder=str(data / "masks"), output_folder=str(tmp_path / f"out{batched}"),
                                 probabilities=True, uncertainty=True, batch_images=batched)
        result = run_inference(config, log=lambda _: None, progress=False, predictor=predictor)
        assert len(result.predicted) == len(shapes)
    assert len(calls[False]) == len(shapes) and sum(calls[False]) == sum(calls[True])
    assert len(calls[True]) < len(calls[False]) and max(calls[True]) > 1
    one, many = tmp_path / "outFalse", tmp_path / "outTrue"
    for i in range(len(shapes)):
        key = f"img_{i:02d}"
        assert np.array_equal(read_image(one / f"{key}.tif"), read_image(many / f"{key}.tif"))
        assert np.abs(read_image(one / "probabilities" / f"{key}.tif")
                      - read_image(many / "probabilities" / f"{key}.tif")).max() < 1e-4  # float rounding
        scores = [json.loads((folder / "records" / f"{key}.json").read_text())["scores"] for folder in (one, many)]
        assert scores[0]["mean_entropy"] == pytest.approx(scores[1]["mean_entropy"], abs=1e-5)
    assert (one / "metrics.csv").read_text() == (many / "metrics.csv").read_text()


def test_tile_normalised_models_batch_images_with_their_own_statistics(tmp_path):
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    divisor, radius = model_geometry("unet", **UNET)
    meta = semantic_json(divisor, radius)
    meta["normalization"]["mode"] = "tile"
    predictor = predictor_from_models([(build_model("unet", 1, 3, **UNET), meta)])
    rng = np.random.default_rng(0)
    for i, scale in enumerate((1, 50, 3)):
        write_image(tmp_path / "images" / f"img_{i}.tif", (rng.integers(0, 600, (30, 30)) * scale).astype(np.uint16))
    config = InferenceConfig(model="m", image_folder=str(tmp_path / "images"), output_folder=str(tmp_path / "out"),
                             probabilities=True)
    run_inference(config, log=lambda _: None, progress=False, predictor=predictor)
    for i in range(3):
        image = read_image(tmp_path / "images" / f"img_{i}.tif")
        expected = predict_whole(predictor, image)
        assert np.abs(read_image(tmp_path / "out" / "probabilities" / f"img_{i}.tif") - expected).max() < 1e-5


# File modes


def test_outputs_are_written_with_the_umask_mode(model_folder, tmp_path, monkeypatch):
    import lib.inference.runner
    import lib.inference.tiled

    data = write_pairs(tmp_path / "data", [(40, 50), (100, 90)])
    monkeypatch.setattr(lib.inference.runner, "STREAM_PIXELS", 5000)  # the second image is streamed
    monkeypatch.setattr(lib.inference.tiled, "TIFF_TILE", 16)
    previous = os.umask(0o022)
    try:
        assert inference.main(["--model", str(model_folder), "--image_folder", str(data / "images"), "--mask_folder",
                               str(data / "masks"), "--output_folder", str(tmp_path / "out"), "--probabilities",
                               "--uncertainty", "--quiet"]) == 0
    finally:
        os.umask(previous)
    out = tmp_path / "out"
    written = [p for p in out.rglob("*") if p.is_file()]
    for name in ("img_00.tif", "img_01.tif", "probabilities/img_00.tif", "probabilities/img_01.tif",
                 "uncertainty/img_01_entropy.tif", "metrics.csv", "uncertainty.csv", "records/img_00.json",
                 "inference.json", "overlays/img_01.png"):
        assert out / name in written
    assert {oct(p.stat().st_mode & 0o777) for p in written} == {"0o644"}


# Errors


def test_input_mismatch_is_a_bad_input():
    assert issubclass(InputMismatch, BadInput) and issubclass(InputMismatch, ToolkitError)


def test_a_bug_keeps_its_traceback_instead_of_exiting_as_bad_settings(model_folder, tmp_path, monkeypatch):
    import lib.inference.runner

    def broken(*args, **kwargs):
        raise ValueError("a programming error")

    monkeypatch.setattr(lib.inference.runner, "run_inference", broken)
    with pytest.raises(ValueError, match="a programming error"):
        inference.main(["--model", str(model_folder), "--image_folder", str(tmp_path), "--output_folder",
                        str(tmp_path / "out"), "--quiet"])


def test_inference_imports_nothing_from_training():
    code = ("import sys, lib.inference.runner, lib.inference.tiled\n"
            "print([m for m in sys.modules if m.startswith('lib.training')], 'tensorflow' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[] False"
