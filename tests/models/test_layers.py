"""The toolkit's own layers (lib/models/layers.py) against the Keras layers they replace."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from lib.models.layers import FastDropout, FusedBatchNormalization  # noqa: E402


@pytest.fixture
def policy():
    """Set a global dtype policy for one test and restore float32 afterwards."""
    def set_policy(name):
        keras.config.set_dtype_policy(name)
    yield set_policy
    keras.config.set_dtype_policy("float32")


def _pair(channels, momentum=0.9):
    reference, fused = keras.layers.BatchNormalization(momentum=momentum), FusedBatchNormalization(momentum=momentum)
    for layer in (reference, fused):
        layer.build((None, None, None, channels))
        layer.gamma.assign(np.linspace(0.5, 2.0, channels))
        layer.beta.assign(np.linspace(-1.0, 1.0, channels))
    return reference, fused


def _run(layer, x, training):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=training)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) ** 2 * np.arange(1, y.shape[-1] + 1, dtype=np.float32))
    grads = tape.gradient(loss, [x, layer.gamma, layer.beta])
    return tf.cast(y, tf.float32).numpy(), [g.numpy().astype(np.float32) for g in grads]


@pytest.mark.parametrize("channels", [4, 48, 60, 64])
@pytest.mark.parametrize("dtype_policy, tolerance", [("float32", 1e-4), ("mixed_bfloat16", 5e-2)])
def test_fused_batch_norm_matches_keras(policy, channels, dtype_policy, tolerance):
    policy(dtype_policy)
    rng = np.random.default_rng(channels)
    reference, fused = _pair(channels)
    for step in range(2):  # two training steps: outputs, gradients and moving statistics agree
        x = tf.constant(rng.normal(2.0, 3.0, (2, 5, 6, channels)).astype(np.float32))
        y_ref, g_ref = _run(reference, x, True)
        y_fused, g_fused = _run(fused, x, True)
        np.testing.assert_allclose(y_fused, y_ref, atol=tolerance * 4, rtol=tolerance)
        for a, b in zip(g_fused, g_ref):
            np.testing.assert_allclose(a, b, atol=max(tolerance, 5e-3) * np.abs(b).max(), rtol=tolerance)
    np.testing.assert_allclose(fused.moving_mean.numpy(), reference.moving_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fused.moving_variance.numpy(), reference.moving_variance.numpy(), rtol=1e-4)
    assert not np.allclose(fused.moving_mean.numpy(), 0)  # the statistics really moved
    x = tf.constant(rng.normal(2.0, 3.0, (2, 5, 6, channels)).astype(np.float32))
    y_ref, _ = _run(reference, x, False)
    y_fused, _ = _run(fused, x, False)
    np.testing.assert_allclose(y_fused, y_ref, atol=tolerance * 8, rtol=tolerance)


def test_fused_batch_norm_falls_back_for_other_ranks():
    reference, fused = keras.layers.BatchNormalization(), FusedBatchNormalization()
    x = tf.constant(np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32))
    np.testing.assert_allclose(fused(x, training=True).numpy(), reference(x, training=True).numpy(), atol=1e-5)


def test_fast_dropout_rate_scale_and_identity_at_inference():
    layer = FastDropout(0.2, seed=3)
    x = tf.ones((4, 64, 64, 16))
    assert np.array_equal(layer(x, training=False).numpy(), x.numpy())
    y = layer(x, training=True).numpy()
    values = np.unique(y)
    np.testing.assert_allclose(values, [0.0, 256 / 205], rtol=1e-6)  # dropped when the byte < 51
    dropped = float((y == 0).mean())
    assert abs(dropped - 51 / 256) < 0.005  # 262144 elements: the standard error is 0.0008
    assert abs(float(y.mean()) - 1.0) < 0.01  # expectation kept
    assert not np.array_equal(layer(x, training=True).numpy(), y)  # a new mask per call


def test_fast_dropout_same_seed_same_mask_and_gradient_is_the_mask():
    x = tf.constant(np.random.default_rng(1).normal(size=(2, 8, 8, 3)).astype(np.float32))
    first, second = FastDropout(0.5, seed=7), FastDropout(0.5, seed=7)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = first(x, training=True)
        total = tf.reduce_sum(y)
    grad = tape.gradient(total, x).numpy()
    assert np.array_equal(y.numpy(), second(x, training=True).numpy())
    kept = y.numpy() != 0
    np.testing.assert_allclose(grad, np.where(kept, 2.0, 0.0))


@pytest.mark.parametrize("rate", [0.37, 1e-4])
def test_fast_dropout_uses_keras_for_rates_bytes_do_not_reach(rate):
    layer = FastDropout(rate, seed=0)
    assert layer._threshold() is None
    y = layer(tf.ones((64, 64)), training=True).numpy()
    assert set(np.unique(y)) <= {0.0, np.float32(1 / (1 - rate))}


def test_layers_round_trip_through_keras_file_in_safe_mode(tmp_path):
    inputs = keras.Input((8, 8, 2))
    x = FusedBatchNormalization(name="bn")(inputs)
    outputs = FastDropout(0.2, name="drop")(x)
    model = keras.Model(inputs, outputs)
    model.get_layer("bn").moving_mean.assign([0.5, -0.5])
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras", safe_mode=True)
    assert type(loaded.get_layer("bn")) is FusedBatchNormalization
    assert type(loaded.get_layer("drop")) is FastDropout
    x = np.random.default_rng(2).normal(size=(1, 8, 8, 2)).astype(np.float32)
    np.testing.assert_allclose(loaded(x, training=False).numpy(), model(x, training=False).numpy(), atol=1e-6)
