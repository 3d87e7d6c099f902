"""Standard-layer model.keras (loads with Keras alone) and float32 exports (issue 15, items 1-2)."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, unet_folder

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _randomise_statistics(model, seed: int = 1) -> None:
    """Non-trivial batch-norm statistics (an untrained model has mean 0, variance 1: a test that cannot fail)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if "BatchNormalization" in type(layer).__name__:
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.5, beta.shape),
                               rng.normal(0, 0.5, mean.shape), rng.uniform(0.3, 3.0, var.shape)])


def _build(architecture: str = "unet", policy: str = "float32", **options):
    import keras

    from lib.models import build_model

    keras.utils.set_random_seed(0)
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = build_model(architecture, 1, 3, **options)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    _randomise_statistics(model)
    return model


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(5).normal(0, 1, (1, 64, 64, 1)).astype(np.float32)


@pytest.mark.parametrize("architecture, options", [
    ("unet", {"base_filters": 4, "depth": 2, "dropout": 0.5}),
    ("fc-densenet56", {"growth_rate": 4, "stem_filters": 8, "n_layers_per_block": 2, "n_pool": 2}),
])
def test_standard_model_has_only_keras_layers_and_the_same_outputs(architecture, options, image):
    from lib.export.keras_standard import custom_classes, fast_model, standard_model

    model = _build(architecture, **options)
    names = {type(layer).__name__ for layer in model.layers}
    assert "FusedBatchNormalization" in names
    standard = standard_model(model)
    assert custom_classes(standard.get_config()) == []
    kinds = {type(layer).__name__ for layer in standard.layers}
    assert "FusedBatchNormalization" not in kinds and "FastDropout" not in kinds and "BatchNormalization" in kinds
    expected = np.asarray(model(image, training=False))
    np.testing.assert_allclose(np.asarray(standard(image, training=False)), expected, rtol=1e-4, atol=1e-4)
    back = fast_model(standard)
    assert "FusedBatchNormalization" in {type(layer).__name__ for layer in back.layers}
    np.testing.assert_allclose(np.asarray(back(image, training=False)), expected, rtol=1e-4, atol=1e-4)
    for a, b in zip(model.layers, standard.layers):
        assert a.name == b.name
        if "BatchNormalization" in type(a).__name__:
            assert a.epsilon == b.epsilon and a.momentum == b.momentum


def test_mixed_bfloat16_model_is_saved_computing_in_float32(tmp_path, image):
    from lib import model_folder
    from lib.export.savedmodel import keras_precision
    from lib.inference.predictor import with_precision

    model = _build("unet", policy="mixed_bfloat16", base_filters=4, depth=1)
    assert keras_precision(model) == "bfloat16"
    model_folder.save_model(tmp_path, model)
    config = json.loads(zipfile.ZipFile(tmp_path / "model.keras").read("config.json"))
    assert "mixed_bfloat16" not in json.dumps(config) and "segmentation>" not in json.dumps(config)
    loaded = model_folder.load_model(tmp_path / "model.keras")
    assert keras_precision(loaded) == "float32"
    assert "BatchNormalization" in {type(layer).__name__ for layer in loaded.layers}
    fast = with_precision(loaded, "bfloat16")  # the predictor's bfloat16 gets our layers back
    assert keras_precision(fast) == "bfloat16"
    assert "FusedBatchNormalization" in {type(layer).__name__ for layer in fast.layers}
    np.testing.assert_allclose(np.asarray(fast(image)), np.asarray(loaded(image)), atol=0.1)


@pytest.mark.parametrize("architecture, options", [
    ("unet", {"base_filters": 4, "depth": 2, "dropout": 0.5}),
    ("fcn8", {"width": 0.0625, "fc_filters": 16, "fc6_kernel": 3, "batch_norm": True}),  # Keras' own BatchNormalization beside our FastDropout
])
def test_save_model_rewrites_the_archive_to_the_same_model(tmp_path, image, monkeypatch, architecture, options):
    from lib import model_folder
    from lib.export import keras_standard

    model = _build(architecture, **options)
    monkeypatch.setattr(keras_standard, "standard_model", None)  # the rebuild fallback must not be needed
    model_folder.save_model(tmp_path, model)
    monkeypatch.undo()
    loaded = model_folder.load_model(tmp_path / "model.keras")
    assert keras_standard.custom_classes(loaded.get_config()) == []
    np.testing.assert_allclose(np.asarray(loaded(image)), np.asarray(model(image, training=False)), rtol=1e-4,
                               atol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.keras"]  # no scratch left behind


_KERAS_ONLY = """
import sys
# The repository's own folders leave the path (the venv's site-packages may lie inside it, as in CI).
sys.path = [p for p in sys.path if p and not (p == {root!r} or (p.startswith({root!r} + '/') and 'site-packages' not in p))]
import numpy as np, keras
model = keras.saving.load_model(sys.argv[1])  # safe mode is the default
try:
    import lib  # noqa
    raise SystemExit("lib must not be importable here")
except ImportError:
    pass
np.save(sys.argv[3], np.asarray(model.predict(np.load(sys.argv[2]), verbose=0)))
print(sorted({{type(layer).__name__ for layer in model.layers}}))
"""


@pytest.fixture(scope="module")
def standard_run(tmp_path_factory) -> Path:
    """A model folder whose model.keras was written by save_model (standard layers) from a seeded UNet."""
    from lib import model_folder

    folder = unet_folder(tmp_path_factory.mktemp("std"), classes=3, input_dtype="float32", mean=0.25, std=2.0,
                         depth=1)
    import keras

    model = keras.saving.load_model(folder / "model.keras", safe_mode=True, compile=False)  # old way: our layers
    _randomise_statistics(model)
    model_folder.save_model(folder, model)
    return folder


def test_model_keras_loads_with_keras_alone_and_predicts_like_our_inference(standard_run, tmp_path):
    from lib.inference.predictor import load_predictor, normalize

    raw = np.random.default_rng(2).normal(0.25, 2.0, (1, 64, 64, 1)).astype(np.float32)
    predictor = load_predictor(standard_run)
    x = normalize(raw, predictor.members[0].info)
    np.save(tmp_path / "x.npy", x)
    script = tmp_path / "keras_only.py"
    script.write_text(_KERAS_ONLY.format(root=str(ROOT)))
    out = subprocess.run([sys.executable, "-I", str(script), str(standard_run / "model.keras"), str(tmp_path / "x.npy"),
                          str(tmp_path / "y.npy")], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "BatchNormalization" in out.stdout and "Fused" not in out.stdout
    logits = np.load(tmp_path / "y.npy")
    exps = np.exp(logits - logits.max(-1, keepdims=True))
    probabilities, _ = predictor.predict_batch(raw)
    np.testing.assert_allclose(exps / exps.sum(-1, keepdims=True), probabilities, atol=1e-5)
    assert predictor.precision == "float32"


def test_an_old_model_folder_with_our_layers_inside_still_loads(tmp_path, image):
    """unet_folder saves the built model as it is (FusedBatchNormalization inside): the way older versions did."""
    import keras

    from lib import model_folder
    from lib.inference.predictor import load_predictor

    folder = unet_folder(tmp_path, classes=2, input_dtype="float32", mean=0.0, std=1.0, depth=1)
    config = zipfile.ZipFile(folder / "model.keras").read("config.json").decode()
    assert "segmentation>FusedBatchNormalization" in config
    old = model_folder.load_model(folder / "model.keras")
    predictor = load_predictor(folder)
    np.testing.assert_allclose(predictor.predict_batch(image)[0],
                               np.asarray(keras.activations.softmax(old(image))), atol=1e-5)
    assert model_folder.export_saved_model(folder, log=lambda m: None)


def test_saved_model_precision_is_recorded_as_computed(tmp_path):
    """A SavedModel exported in bfloat16 (as before this fix) predicts in bfloat16 and says so; ours is float32."""
    import inference
    from lib import model_folder
    from lib.export.savedmodel import graph_precision
    from lib.store.images import write_image

    folder = unet_folder(tmp_path, classes=2, input_dtype="float32", mean=0.0, std=1.0, depth=1)
    bf16 = _build("unet", policy="mixed_bfloat16", base_filters=4, depth=1)
    bf16.export(str(folder / "saved_model"), format="tf_saved_model", verbose=False)  # the old export
    images = tmp_path / "images"
    write_image(images / "a.tif", np.random.default_rng(0).normal(0, 1, (64, 64)).astype(np.float32))
    assert inference.main(["--model", str(folder / "saved_model"), "--image_folder", str(images),
                           "--output_folder", str(tmp_path / "out"), "--quiet"]) == 0
    record = json.loads((tmp_path / "out" / "inference.json").read_text())
    assert record["precision"] == "bfloat16"
    # The toolkit's export of the same bfloat16 model computes in float32.
    model_folder.save_model(folder, bf16)
    assert model_folder.export_saved_model(folder, log=lambda m: None)
    assert graph_precision(model_folder.load_model(folder / "saved_model")) == "float32"
    assert inference.main(["--model", str(folder / "saved_model"), "--image_folder", str(images),
                           "--output_folder", str(tmp_path / "out2"), "--quiet"]) == 0
    assert json.loads((tmp_path / "out2" / "inference.json").read_text())["precision"] == "float32"
