"""export_model.py: bioimage.io package (validated and test-run by bioimageio.core), ONNX, SavedModel,
model card; inference.py on an exported package (issue 15)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import tiny_database, unet_folder

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A model folder (UNet depth 2, base 4, non-trivial batch-norm statistics) trained on nothing but saved the
    way training saves it, whose model.json names the tiny test database; made once per session of this module."""
    import keras

    from lib import model_folder
    from lib.store.lmdb_store import LmdbReader

    base = tmp_path_factory.mktemp("export")
    database = tiny_database(base)
    test_db = next(database.glob("test-*.lmdb"))
    reader = LmdbReader(test_db)
    meta = reader.metadata
    reader.close()
    folder = unet_folder(base, classes=3, input_dtype=meta["image_dtype"], mean=float(meta["channel_mean"][0]),
                         std=float(meta["channel_std"][0]), depth=2)
    model = keras.saving.load_model(folder / "model.keras", safe_mode=True, compile=False)
    rng = np.random.default_rng(1)
    for layer in model.layers:
        if "BatchNormalization" in type(layer).__name__:
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.5, beta.shape),
                               rng.normal(0, 0.3, mean.shape), rng.uniform(0.5, 2.0, var.shape)])
    model_folder.save_model(folder, model)
    description = json.loads((folder / "model.json").read_text())
    description["data"] = {"dataset_name": "t", "test_database": str(test_db), "train_records": 8, "test_records": 4}
    description["best"] = {"mean_iou": 0.5, "step": 3}
    # The default normalisation of training (each image by its own 1st-99.8th percentiles: bioimage.io's
    # scale_range); "dataset" (fixed_zero_mean_unit_variance) is checked in test_model_card.py.
    description["normalization"] = {**description["normalization"], "mode": "percentile", "percentiles": [1.0, 99.8]}
    (folder / "model.json").write_text(json.dumps(description))
    return folder


@pytest.fixture(scope="module")
def package(run, tmp_path_factory) -> Path:
    import export_model

    out = tmp_path_factory.mktemp("pkg") / "m.zip"
    assert export_model.main(["--model", str(run), "--format", "bioimageio", "--output", str(out), "--quiet",
                              "--author", "Test Author"]) == 0
    return out


def test_package_holds_the_spec_files_and_our_outputs(package, run):
    from lib.export.bioimageio import geometry
    from lib.inference.predictor import load_predictor
    from lib.model_folder import read_model_json

    with zipfile.ZipFile(package) as archive:
        names = set(archive.namelist())
        rdf = archive.read("rdf.yaml").decode()
        x = np.load(archive.open("test_input.npy"))
        y = np.load(archive.open("test_output.npy"))
    assert {"rdf.yaml", "model.keras", "tf_saved_model.zip", "model.onnx", "test_input.npy", "test_output.npy",
            "cover.png", "README.md", "model.json"} <= names
    info = read_model_json(run / "model.json")
    min_size, step, halo = geometry(info)
    assert step == info.size_divisor and halo >= info.receptive_field_radius and halo % step == 0
    for needle in ("format_version: \"0.5.", "scale_range", f"step: {step}", f"halo: {halo}",
                   "softmax", "keras_v3", "tensorflow_saved_model_bundle", "onnx", "10.1007/978-3-319-24574-4_28"):
        assert needle in rdf
    assert x.dtype == np.dtype(info.input_dtype) and x.shape[0] == 1 and x.shape[-1] == 1
    predictor = load_predictor(run)
    expected, _ = predictor.predict_batch(x, predictor.image_statistics(x[0]))
    np.testing.assert_allclose(y, expected, atol=1e-6)
    assert (run / "model_card.md").is_file() and (run / "cover.png").is_file()
    card = (run / "model_card.md").read_text()
    assert "Ronneberger" in card and "mean_iou" in card and "export_model.py" in card


def test_bioimageio_core_validates_and_reproduces_the_test_outputs(package, tmp_path, monkeypatch):
    """The reference validator and runner: static validation, then its own run of every weight format."""
    # bioimageio.core's Keras backend defaults to torch and it writes KERAS_BACKEND into os.environ (inherited by
    # every later subprocess): name TensorFlow, and let monkeypatch restore the environment afterwards.
    monkeypatch.setenv("KERAS_BACKEND", "tensorflow")
    pytest.importorskip("bioimageio.core")
    from bioimageio.core import test_model
    from bioimageio.spec import load_description

    monkeypatch.chdir(tmp_path)  # bioimageio.core unzips TF weights into the working directory
    description = load_description(package, format_version="discover")
    assert description.validation_summary.status in ("valid-format", "passed"), description.validation_summary
    summary = test_model(package, working_dir=tmp_path)  # every weight format in the package
    failed = [(d.name, [e.msg[:300] for e in d.errors]) for d in summary.details if d.status == "failed"]
    assert failed == []
    for weights in ("keras_v3", "tensorflow_saved_model_bundle", "onnx"):
        assert any(f"Reproduce test outputs from test inputs ({weights})" in d.name and d.status == "passed"
                   for d in summary.details), weights


def test_inference_reads_an_exported_package_like_the_folder(package, run, tmp_path):
    import inference
    from lib.store.images import read_image, write_image
    from lib.store.lmdb_store import LmdbReader

    reader = LmdbReader(json.loads((run / "model.json").read_text())["data"]["test_database"])
    image = np.array(reader[1][0])
    reader.close()
    write_image(tmp_path / "images" / "a.tif", np.tile(image[..., 0], (2, 2)))
    for name, model in (("folder", run), ("zip", package)):
        assert inference.main(["--model", str(model), "--image_folder", str(tmp_path / "images"),
                               "--output_folder", str(tmp_path / name), "--quiet"]) == 0
    np.testing.assert_array_equal(read_image(tmp_path / "zip" / "a.tif"), read_image(tmp_path / "folder" / "a.tif"))


def test_onnx_export_matches_keras(run, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnxruntime

    import export_model
    from lib.export.model_card import sample_tile
    from lib.common.normalization import image_statistics
    from lib.inference.predictor import normalize
    from lib.model_folder import load_model, read_model_json

    out = tmp_path / "m.onnx"
    assert export_model.main(["--model", str(run), "--format", "onnx", "--output", str(out), "--quiet",
                              "--no_model_card"]) == 0
    info = read_model_json(run / "model.json")
    image, _ = sample_tile(info)
    tiled = np.tile(image, (1, 2, 1))  # another size than the one checked at export
    x = normalize(tiled[None], info, image_statistics(tiled, info.normalization, (1.0, 99.8)))
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(got, np.asarray(load_model(run / "model.keras")(x)), atol=1e-4)


def test_savedmodel_export_is_float32_and_predicts_like_keras(run, tmp_path):
    import export_model
    from lib.export.savedmodel import graph_precision
    from lib.model_folder import load_model

    out = tmp_path / "sm"
    assert export_model.main(["--model", str(run), "--format", "savedmodel", "--output", str(out), "--quiet",
                              "--no_model_card"]) == 0
    layer = load_model(out)
    assert graph_precision(layer) == "float32"
    x = np.random.default_rng(0).normal(size=(1, 32, 32, 1)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(layer(x)["logits"]), np.asarray(load_model(run / "model.keras")(x)),
                               atol=1e-5)
    assert export_model.main(["--model", str(run), "--format", "savedmodel", "--output", str(tmp_path / "b16"),
                              "--precision", "bfloat16", "--quiet", "--no_model_card"]) == 0
    assert graph_precision(load_model(tmp_path / "b16")) == "bfloat16"


# Faults: one message, exit 2, nothing written or changed.


def test_existing_output_is_kept_without_overwrite(run, tmp_path, capsys):
    import export_model

    out = tmp_path / "m.zip"
    out.write_bytes(b"mine")
    assert export_model.main(["--model", str(run), "--format", "bioimageio", "--output", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == b"mine"


@pytest.mark.parametrize("args, message", [
    (["--format", "onnx", "--output", "{tmp}/m.zip"], "output must end in .onnx"),
    (["--format", "bioimageio", "--output", "{run}/m.zip"], "must not be, contain or lie inside --model"),
    (["--format", "bioimageio", "--output", "{tmp}/no/m.zip"], "output's folder must exist"),
    (["--format", "onnx", "--output", "{tmp}/m.onnx", "--precision", "bfloat16"], "precision must be float32"),
])
def test_bad_settings_are_refused_before_writing(run, tmp_path, capsys, args, message):
    import export_model

    argv = ["--model", str(run)] + [a.format(tmp=tmp_path, run=run) for a in args]
    before = sorted(p.name for p in run.iterdir())
    assert export_model.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert sorted(p.name for p in run.iterdir()) == before and list(tmp_path.iterdir()) == []


def test_a_folder_without_a_model_is_refused(tmp_path, capsys):
    import export_model

    assert export_model.main(["--model", str(tmp_path), "--format", "onnx", "--output", str(tmp_path / "x.onnx")]) == 2
    assert "model must be a model folder" in capsys.readouterr().err


def test_onnx_without_the_converter_says_why_and_writes_nothing(run, tmp_path, capsys, monkeypatch):
    import sys

    import export_model

    monkeypatch.setitem(sys.modules, "tf2onnx", None)  # import tf2onnx raises ImportError
    out = tmp_path / "m.onnx"
    assert export_model.main(["--model", str(run), "--format", "onnx", "--output", str(out), "--no_model_card"]) == 2
    assert "tf2onnx" in capsys.readouterr().err and not out.exists() and list(tmp_path.iterdir()) == []


def test_inference_refuses_a_foreign_package(tmp_path, capsys):
    import inference

    foreign = tmp_path / "foreign.zip"
    with zipfile.ZipFile(foreign, "w") as archive:
        archive.writestr("rdf.yaml", "type: model\n")
    from lib.store.images import write_image

    write_image(tmp_path / "images" / "a.tif", np.zeros((32, 32), np.uint16))
    assert inference.main(["--model", str(foreign), "--image_folder", str(tmp_path / "images"),
                           "--output_folder", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "exported by export_model.py" in err and "Traceback" not in err and not (tmp_path / "out").exists()


def test_without_the_test_database_a_test_image_is_needed(run, tmp_path, capsys):
    import shutil

    import export_model
    from lib.store.images import write_image

    folder = tmp_path / "moved"
    shutil.copytree(run, folder)
    meta = json.loads((folder / "model.json").read_text())
    meta["data"]["test_database"] = str(tmp_path / "gone.lmdb")
    (folder / "model.json").write_text(json.dumps(meta))
    out = tmp_path / "m.onnx"
    assert export_model.main(["--model", str(folder), "--format", "onnx", "--output", str(out),
                              "--no_model_card"]) == 2
    assert "--test_image" in capsys.readouterr().err and not out.exists()
    write_image(tmp_path / "img.tif", np.full((40, 36), 7, np.dtype(meta["input_dtype"])))
    assert export_model.main(["--model", str(folder), "--format", "onnx", "--output", str(out), "--quiet",
                              "--test_image", str(tmp_path / "img.tif")]) == 0
    assert out.is_file() and (folder / "model_card.md").is_file() and (folder / "cover.png").is_file()
