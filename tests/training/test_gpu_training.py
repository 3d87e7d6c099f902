"""Training on a real GPU (marked ``gpu``; skipped where TensorFlow sees none).

benchmarks/gpu_check.sh runs them (``pytest -m gpu``) and reports their outcome in its JSON line.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.gpu


def _gpus() -> int:
    import tensorflow as tf

    return len(tf.config.list_physical_devices("GPU"))


needs_gpu = pytest.mark.skipif("_gpus() == 0", reason="needs a GPU visible to TensorFlow")


@needs_gpu
def test_auto_precision_follows_the_compute_capability_and_trains():
    import keras
    import tensorflow as tf

    from lib.common.device import device_facts
    from lib.models import build_model
    from lib.training.config import TrainConfig
    from lib.training.losses import make_loss
    from lib.training.precision import precision_policy
    from lib.training.step import make_optimizer, make_train_step

    facts = device_facts()
    lowest = min(facts.gpu_capabilities)
    expected = "bfloat16" if lowest >= (8, 0) else "float16" if lowest >= (7, 0) else "float32"
    lines: list[str] = []
    with precision_policy(None, lines.append) as (precision, reason):
        assert precision == expected and f"compute capability {lowest[0]}.{lowest[1]}" in reason
        keras.utils.set_random_seed(0)
        model = build_model("unet", 1, 2, base_filters=8, depth=2)
        conv = next(layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D))
        assert conv.compute_dtype == {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[precision]
        config = TrainConfig(train_database="-", test_database="-", output_dir="-", number_classes=2)
        optimizer = make_optimizer(config, model, precision)
        rng = np.random.default_rng(0)
        images = rng.standard_normal((8, 64, 64, 1)).astype("float32")
        labels = (images[..., 0] > 0).astype("uint8")
        batches = iter(tf.data.Dataset.from_tensor_slices((images, labels)).batch(4).repeat())
        step = make_train_step(tf.distribute.get_strategy(), model, optimizer, make_loss("ce", 2), 4)
        before = [np.array(w.numpy()) for w in model.trainable_weights]
        losses = [float(step(batches)) for _ in range(10)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    assert max(float(np.abs(w.numpy() - b).max()) for w, b in zip(model.trainable_weights, before)) > 1e-4


MIRRORED_ON_ONE_GPU = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    sys.path.insert(0, sys.argv[1])
    gpu = tf.config.list_physical_devices("GPU")[0]
    tf.config.set_logical_device_configuration(gpu, [tf.config.LogicalDeviceConfiguration(memory_limit=2048)] * 2)
    tf.config.experimental.enable_op_determinism()
    import keras
    from lib.models import build_model
    from lib.training.losses import make_loss
    from lib.training.step import make_train_step

    def run(replicas):
        keras.utils.set_random_seed(0)
        strategy = (tf.distribute.MirroredStrategy(["/gpu:0", "/gpu:1"]) if replicas == 2
                    else tf.distribute.OneDeviceStrategy("/gpu:0"))
        with strategy.scope():
            model = build_model("unet", 1, 3, base_filters=8, depth=2, batch_norm=False, dropout=0.0)
            optimizer = keras.optimizers.AdamW(learning_rate=1e-2, weight_decay=1e-2)
            optimizer.build(model.trainable_variables)
        rng = np.random.default_rng(0)
        images = rng.standard_normal((24, 32, 32, 1)).astype("float32")
        labels = rng.integers(0, 3, (24, 32, 32)).astype("uint8")
        dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8 // replicas)
        iterator = iter(strategy.distribute_datasets_from_function(lambda ctx: dataset))
        step = make_train_step(strategy, model, optimizer, make_loss("ce", 3), global_batch=8)
        losses = [float(step(iterator)) for _ in range(3)]
        return strategy.num_replicas_in_sync, losses, [w.numpy() for w in model.weights]

    n1, one, w1 = run(1)
    n2, two, w2 = run(2)
    print(json.dumps({"replicas": [n1, n2], "losses_one": one, "losses_two": two,
                      "max_weight_diff": max(float(np.abs(a - b).max()) for a, b in zip(w1, w2))}))
""")


@needs_gpu
def test_mirrored_strategy_over_two_logical_gpus_equals_one_device():
    done = subprocess.run([sys.executable, "-c", MIRRORED_ON_ONE_GPU, str(ROOT)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["replicas"] == [1, 2]
    assert figures["losses_one"] == pytest.approx(figures["losses_two"], rel=1e-4)
    assert figures["max_weight_diff"] < 1e-4
