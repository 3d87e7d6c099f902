"""Layers of the segmentation models that Keras does not provide in the form we need.

:class:`FusedBatchNormalization` is ``keras.layers.BatchNormalization`` trained through
TensorFlow's fused kernel (``FusedBatchNormV3``: one pass forward, one backward) instead of
Keras 3's composite of moments and element-wise ops, and applied at inference as one
multiply-add in the input's dtype (Keras 3 upcasts bfloat16 activations to float32 for
batch-norm and back). Measured in ``benchmarks/bench_train.py`` (modes ``*_kerasbn``) and
``benchmarks/bench_inference.py``.
Same weights, same moving statistics (biased batch variance, Keras' momentum convention),
same ``get_config``: a model saved with it loads as this class wherever ``lib.models`` is
imported (registered as ``segmentation>FusedBatchNormalization``).

Falls back to the Keras computation whenever the fused kernel does not apply: another
backend, masks, renorm, synchronised statistics, inputs that are not 4-D channels-last, or
float64.
"""

from __future__ import annotations

import keras


@keras.saving.register_keras_serializable(package="segmentation")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """Batch normalisation over the last axis of NHWC inputs with TensorFlow's fused kernel."""

    def _fused_applies(self, inputs, mask) -> bool:
        if keras.backend.backend() != "tensorflow" or mask is not None or self.renorm or self.synchronized:
            return False
        rank = len(inputs.shape)
        axis = self.axis if isinstance(self.axis, int) else (self.axis[0] if len(self.axis) == 1 else None)
        return (rank == 4 and axis in (-1, 3)
                and keras.backend.standardize_dtype(inputs.dtype) in ("float32", "bfloat16", "float16"))

    def call(self, inputs, training=None, mask=None):
        if not self._fused_applies(inputs, mask):
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf

        channels = inputs.shape[-1]
        gamma = tf.cast(self.gamma, tf.float32) if self.scale else tf.ones((channels,), tf.float32)
        beta = tf.cast(self.beta, tf.float32) if self.center else tf.zeros((channels,), tf.float32)
        if training and self.trainable:
            # bfloat16 through the fused kernel is fast only for channel counts that are multiples
            # of 16 (oneDNN's blocked layouts: 48, 96, 144 run 1.5-2x faster than in float32; 60,
            # 72, 84, 120 run 1.6-2.3x slower), so other counts go through the float32 kernel
            # between two casts.
            native = inputs.dtype != tf.bfloat16 or channels % 16 == 0
            x = inputs if native else tf.cast(inputs, tf.float32)
            outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
                x, gamma, beta, epsilon=self.epsilon, data_format="NHWC", is_training=True)
            # The kernel returns the Bessel-corrected variance; Keras' moving variance uses the
            # biased one (the one the outputs were normalised with).
            count = tf.cast(tf.reduce_prod(tf.shape(inputs)[:-1]), tf.float32)
            variance = variance * tf.maximum(count - 1.0, 0.0) / tf.maximum(count, 1.0)
            momentum = self.momentum
            self.moving_mean.assign(self.moving_mean * momentum + tf.cast(mean, self.moving_mean.dtype)
                                    * (1.0 - momentum))
            self.moving_variance.assign(self.moving_variance * momentum
                                        + tf.cast(variance, self.moving_variance.dtype) * (1.0 - momentum))
            return tf.cast(outputs, self.compute_dtype)
        # Inference: one multiply-add in the input's dtype (faster than the fused kernel here).
        inverse = gamma * tf.math.rsqrt(tf.cast(self.moving_variance, tf.float32) + self.epsilon)
        shift = beta - tf.cast(self.moving_mean, tf.float32) * inverse
        outputs = inputs * tf.cast(inverse, inputs.dtype) + tf.cast(shift, inputs.dtype)
        return tf.cast(outputs, self.compute_dtype)


@keras.saving.register_keras_serializable(package="segmentation")
class FastDropout(keras.layers.Dropout):
    """``keras.layers.Dropout`` whose keep-mask costs a quarter of the random numbers.

    Keras draws one 32-bit random number per element; this layer draws one per four elements
    and uses each byte: an element is dropped when its byte is below ``round(256 * rate)``, and
    kept elements are scaled by ``256 / (256 - round(256 * rate))``, so the expectation is
    unchanged. Rates that 1/256 steps do not reach within 1e-3 (and noise shapes, other
    backends) use Keras' own dropout. FC-DenseNet puts a dropout after every convolution: on
    FC-DenseNet56 (256x256, batch 4, bfloat16) dropout took a fifth of the training step.
    """

    def _threshold(self) -> int | None:
        threshold = round(256 * self.rate)
        if keras.backend.backend() != "tensorflow" or self.noise_shape is not None or not 0 < threshold < 256 \
                or abs(threshold / 256 - self.rate) > 1e-3:
            return None
        return threshold

    def call(self, inputs, training=False):
        threshold = self._threshold() if training and self.rate > 0 else None
        if threshold is None:
            return super().call(inputs, training=training)
        import tensorflow as tf

        seed = self.seed_generator.next()
        seed = tf.cast(tf.math.floormod(tf.cast(seed, tf.int64), 2 ** 31 - 2), tf.int32)
        count = tf.size(inputs)
        words = tf.random.stateless_uniform(tf.reshape((count + 3) // 4, [1]), seed=seed, minval=None,
                                            maxval=None, dtype=tf.uint32)
        random_bytes = tf.reshape(tf.bitcast(words, tf.uint8), [-1])[:count]
        keep = tf.reshape(random_bytes >= threshold, tf.shape(inputs))
        scale = tf.cast(256.0 / (256 - threshold), inputs.dtype)
        return tf.where(keep, inputs * scale, tf.zeros_like(inputs))
