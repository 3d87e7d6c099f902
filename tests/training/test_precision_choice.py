"""The training precision per device (decision table with faked device facts), float16 training
with dynamic loss scaling for real on the CPU, and what a finished run folder keeps."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lib.common.device import DeviceFacts, bfloat16_is_native, choose_precision
from lib.common.settings import ConfigError
from tests.conftest import ROOT, tiny_database

A100, H100, V100, T4, P100 = (8, 0), (9, 0), (7, 0), (7, 5), (6, 0)


@pytest.mark.parametrize("requested, facts, expected", [
    (None, DeviceFacts((H100,)), "bfloat16"),
    ("auto", DeviceFacts((A100, A100)), "bfloat16"),
    (None, DeviceFacts((V100,)), "float16"),
    (None, DeviceFacts((T4,)), "float16"),
    (None, DeviceFacts((A100, T4)), "float16"),  # the lowest GPU decides: every replica computes alike
    (None, DeviceFacts((P100,)), "float32"),
    (True, DeviceFacts((P100,)), "float16"),
    (None, DeviceFacts((), cpu_bfloat16=True), "bfloat16"),
    (None, DeviceFacts((), cpu_bfloat16=False), "float32"),
    (None, DeviceFacts((T4,), cpu_bfloat16=True), "float16"),  # GPUs compute, not the CPU
    (True, DeviceFacts(()), "bfloat16"),
    (False, DeviceFacts((H100,)), "float32"),
    ("float32", DeviceFacts((H100,)), "float32"),
    ("float16", DeviceFacts((H100,)), "float16"),
    ("bfloat16", DeviceFacts((T4,)), "bfloat16"),
])
def test_precision_decision_table(requested, facts, expected):
    precision, reason = choose_precision(requested, facts)
    assert precision == expected
    assert reason.startswith("auto" if requested in (None, "auto") else ("asked for", "auto"))


def test_the_reason_names_the_compute_capability():
    assert "compute capability 7.5" in choose_precision(None, DeviceFacts((T4,)))[1]
    assert "loss scaling" in choose_precision(None, DeviceFacts((T4,)))[1]
    assert bfloat16_is_native(DeviceFacts((A100, H100))) and not bfloat16_is_native(DeviceFacts((A100, V100)))


def test_an_unknown_precision_is_refused():
    with pytest.raises(ConfigError, match="mixed_precision must be one of auto, float32, bfloat16, float16"):
        choose_precision("float8", DeviceFacts(()))


def _tiny_step(precision: str):
    import keras
    import tensorflow as tf

    from lib.models import build_model
    from lib.training.config import TrainConfig
    from lib.training.losses import make_loss
    from lib.training.step import make_optimizer, make_train_step

    keras.utils.set_random_seed(0)
    config = TrainConfig(train_database="x", test_database="y", output_dir="z", number_classes=2,
                         learning_rate=1e-2)
    model = build_model("unet", 1, 2, base_filters=4, depth=1, batch_norm=True, dropout=0.0)
    optimizer = make_optimizer(config, model, precision)
    strategy = tf.distribute.get_strategy()
    rng = np.random.default_rng(0)
    images = rng.standard_normal((8, 16, 16, 1)).astype("float32")
    labels = (images[..., 0] > 0).astype("uint8")
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(4).repeat()
    step = make_train_step(strategy, model, optimizer, make_loss("ce", 2), global_batch=4)
    return model, optimizer, step, iter(dataset)


def test_float16_trains_for_real_with_dynamic_loss_scaling():
    import keras

    previous = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model, optimizer, step, batches = _tiny_step("float16")
        assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        conv = next(layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D))
        assert conv.compute_dtype == "float16" and conv.kernel.dtype == "float32"
        initial = [np.array(w.numpy()) for w in model.trainable_weights]
        losses = [float(step(batches)) for _ in range(12)]
        assert all(np.isfinite(losses)), losses
        assert losses[-1] < losses[0], losses  # it learns the sign of the pixels
        changed = max(float(np.abs(w.numpy() - i).max()) for w, i in zip(model.trainable_weights, initial))
        assert changed > 1e-3
        # the scale starts at 2**15 and stays a power of two (halved on overflow, doubled after 2000 good steps)
        scale = float(optimizer.dynamic_scale.numpy())
        assert scale > 1 and np.log2(scale) == int(np.log2(scale))
        assert int(optimizer.inner_optimizer.iterations.numpy()) >= 1
    finally:
        keras.mixed_precision.set_global_policy(previous)


def test_an_overflowing_step_is_skipped_and_the_scale_halved():
    import keras

    previous = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model, optimizer, step, batches = _tiny_step("float16")
        optimizer.dynamic_scale.assign(2.0 ** 40)  # the scaled float16 gradients overflow
        before = [np.array(w.numpy()) for w in model.trainable_weights]
        loss = float(step(batches))
        assert np.isfinite(loss)
        assert float(optimizer.dynamic_scale.numpy()) == 2.0 ** 39
        for w, b in zip(model.trainable_weights, before):
            np.testing.assert_array_equal(w.numpy(), b)  # the step was skipped
    finally:
        keras.mixed_precision.set_global_policy(previous)


def test_a_float16_run_records_its_precision_and_resumes_in_float32(tmp_path):
    from lib.training import TrainConfig, train

    db = tiny_database(tmp_path)
    settings = dict(train_database=str(db / "train-t.lmdb"), test_database=str(db / "test-t.lmdb"),
                    output_dir=str(tmp_path / "run"), number_classes=3, batch_size=2, patch_size=32, reader_count=0,
                    model_options={"base_filters": 4, "depth": 1}, test_every_n_steps=4, warmup_steps=0)
    lines: list[str] = []
    result = train(TrainConfig(**settings, max_steps=4, mixed_precision="float16"), log=lines.append)
    assert result.steps == 4 and np.isfinite(result.best_test_loss)
    assert any(line.startswith("precision: mixed float16 with dynamic loss scaling (asked for") for line in lines)
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["precision"]["compute"] == "float16" and meta["precision"]["loss_scaling"] is True
    assert meta["precision"]["reason"].startswith("asked for")
    # the finished run keeps only the checkpoint that extending it needs
    assert (tmp_path / "run" / "checkpoint" / "state.json").is_file()
    assert not (tmp_path / "run" / "checkpoint.previous").exists()
    assert any(line.startswith("removed checkpoint.previous/ (") for line in lines)
    # the checkpoint holds AdamW's variables without the loss scale: the run goes on in another precision
    # (weights are float32 in all), as a run moved from a V100 to a CPU node with "auto" does
    lines.clear()
    result = train(TrainConfig(**settings, max_steps=8, mixed_precision=False, keep_checkpoints=True),
                   log=lines.append)
    assert result.steps == 8 and result.resumed_from == 4
    assert json.loads((tmp_path / "run" / "checkpoint.previous" / "state.json").read_text())["step"] == 8
    assert json.loads((tmp_path / "run" / "model.json").read_text())["precision"]["compute"] == "float32"


MIRRORED_FLOAT16 = """
import json, sys
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
sys.path.insert(0, sys.argv[1])
from lib.models import build_model
from lib.training.config import TrainConfig
from lib.training.losses import make_loss
from lib.training.step import make_optimizer, make_train_step

keras.mixed_precision.set_global_policy("mixed_float16")
keras.utils.set_random_seed(0)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
config = TrainConfig(train_database="-", test_database="-", output_dir="-", number_classes=2, learning_rate=1e-2)
with strategy.scope():
    model = build_model("unet", 1, 2, base_filters=4, depth=1, batch_norm=False, dropout=0.0)
    optimizer = make_optimizer(config, model, "float16")
rng = np.random.default_rng(0)
images = rng.standard_normal((8, 16, 16, 1)).astype("float32")
labels = (images[..., 0] > 0).astype("uint8")
dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(2).repeat()
iterator = iter(strategy.distribute_datasets_from_function(lambda ctx: dataset))
step = make_train_step(strategy, model, optimizer, make_loss("ce", 2), global_batch=4)
start = [np.array(w.numpy()) for w in model.trainable_weights]
losses = [float(step(iterator)) for _ in range(4)]
trained = [np.array(w.numpy()) for w in model.trainable_weights]
copies = max(float(np.abs(a - b).max()) for w in model.trainable_weights
             for a, b in [[v.numpy() for v in w.value.values]])
optimizer.dynamic_scale.assign(2.0 ** 40)
skipped_loss = float(step(iterator))
after = [np.array(w.numpy()) for w in model.trainable_weights]
print(json.dumps({"losses": losses, "moved": max(float(np.abs(a - b).max()) for a, b in zip(trained, start)),
                  "replica_difference": copies, "skipped_loss": skipped_loss,
                  "unchanged": all(np.array_equal(a, b) for a, b in zip(after, trained)),
                  "scale": float(optimizer.dynamic_scale.numpy())}))
"""


def test_float16_with_two_replicas_skips_an_overflowing_step_on_both():
    done = subprocess.run([sys.executable, "-c", MIRRORED_FLOAT16, str(ROOT)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert all(np.isfinite(figures["losses"])) and figures["moved"] > 1e-3
    assert figures["replica_difference"] == 0.0  # both replicas applied the same steps
    assert np.isfinite(figures["skipped_loss"]) and figures["unchanged"] and figures["scale"] == 2.0 ** 39
