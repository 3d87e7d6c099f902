"""Per-example segmentation losses for the custom training loop (TensorFlow).

Each loss maps ``labels (B, H, W)`` integer and ``logits (B, H, W, C)`` to a ``(B,)`` vector
of per-example losses; the trainer sums them per replica and divides by the global batch.
"""

from __future__ import annotations

from typing import Callable, Sequence

LOSSES = ("ce", "weighted_ce", "dice", "ce_dice")


def class_weights_from_counts(counts: Sequence[int]) -> list[float]:
    """Inverse-frequency class weights, normalised so that the pixel-weighted mean weight is 1.

    ``w_c = N / (C * n_c)``; a class with no pixels gets weight 0 (it cannot occur).
    """
    total = float(sum(counts))
    n_present = sum(1 for c in counts if c > 0)
    return [total / (n_present * c) if c > 0 else 0.0 for c in counts]


def make_loss(name: str, n_classes: int, class_weights: Sequence[float] | None = None
              ) -> Callable[[object, object], object]:
    """The per-example loss function ``f(labels, logits) -> (B,)`` float32.

    ``name``: "ce" (mean pixel cross-entropy), "weighted_ce" (pixels weighted by
    ``class_weights``, normalised by the sum of weights), "dice" (1 - soft Dice averaged
    over classes present in label or prediction), "ce_dice" (their sum).
    Raises ``ValueError`` for an unknown name or missing weights.
    """
    import tensorflow as tf

    if name not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}; got {name!r}")
    if name == "weighted_ce" and (class_weights is None or len(class_weights) != n_classes):
        raise ValueError(f"weighted_ce needs one class weight per class ({n_classes}); got {class_weights!r}")
    weights = tf.constant(class_weights if class_weights is not None else [1.0] * n_classes, tf.float32)

    def cross_entropy(labels, logits):
        labels = tf.cast(labels, tf.int32)
        logits = tf.cast(logits, tf.float32)
        per_pixel = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
        if name == "weighted_ce":
            w = tf.gather(weights, labels)
            return tf.reduce_sum(per_pixel * w, axis=[1, 2]) / tf.maximum(tf.reduce_sum(w, axis=[1, 2]), 1e-6)
        return tf.reduce_mean(per_pixel, axis=[1, 2])

    def dice(labels, logits):
        probabilities = tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1)
        onehot = tf.one_hot(tf.cast(labels, tf.int32), n_classes, dtype=tf.float32)
        intersection = tf.reduce_sum(probabilities * onehot, axis=[1, 2])
        sizes = tf.reduce_sum(probabilities + onehot, axis=[1, 2])
        per_class = 1.0 - (2.0 * intersection + 1.0) / (sizes + 1.0)
        present = tf.cast(tf.reduce_sum(onehot, axis=[1, 2]) > 0, tf.float32)
        # Classes absent from an example's labels still count when predicted (false positives).
        counted = tf.maximum(present, tf.cast(tf.reduce_sum(probabilities, axis=[1, 2]) > 0.5, tf.float32))
        return tf.reduce_sum(per_class * counted, axis=-1) / tf.maximum(tf.reduce_sum(counted, axis=-1), 1.0)

    if name in ("ce", "weighted_ce"):
        return cross_entropy
    if name == "dice":
        return dice
    return lambda labels, logits: cross_entropy(labels, logits) + dice(labels, logits)
