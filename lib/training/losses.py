"""Per-example segmentation losses for the custom training loop (TensorFlow).

Each loss maps ``labels (B, H, W)`` integer and ``logits (B, H, W, C)`` to a ``(B,)`` vector
of per-example losses; the trainer sums them per replica and divides by the global batch.
"""

from __future__ import annotations

from typing import Callable, Sequence

from .embedding_loss import embedding_loss

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


INSTANCE_DISTANCE_LOSSES = ("l1", "mse")
INSTANCE_KINDS = ("binary", "distance", "ray", "embedding", "class")
SIGMOID_KINDS = ("binary", "embedding")  # maps through a sigmoid; the others are clipped to [0, 1]


def make_instance_loss(kinds: Sequence[str], weights: Sequence[float], distance_loss: str = "l1"
                       ) -> Callable[[object, object], object]:
    """Per-example, per-channel losses of an instance model: ``f(targets, logits) -> (B, K)`` float32.

    ``targets (B, H, W, >= K)`` float32 (channels beyond K, such as the instance ids the
    reader appends, are ignored), ``logits (B, H, W, K)``. Channel ``k`` of kind "binary" is
    the mean sigmoid cross-entropy of its logit; "distance" the mean absolute ("l1") or
    squared ("mse") error of the raw output; "ray" (a StarDist ray plane) the same error
    averaged over the object pixels only (those whose target is > 0: every object pixel has a
    positive ray, background and pixels off the ray grid have 0): StarDist's polygon-distance loss, L1 on the distances weighted by the object mask
    (StarDist weights by its probability target, the normalised distance to the boundary; the
    mask weights every object pixel alike, and the loss is on the encoded distances
    ``d / (d + 16)``, so a pixel of error counts more on small objects). Every ray plane is a
    column of its own, so the rays together weigh N times one channel, as StarDist's summed
    distance loss outweighs its probability loss. Each column is
    multiplied by its weight; the trainer's loss is the sum over channels. The planes of kind
    "class" (a class per instance, one-hot targets K0..K<n>, the last planes) share one softmax
    cross-entropy over them all, split equally among their columns (their sum is the class loss).
    The five planes of kind "embedding" (EmbedSeg, contiguous) share the loss of
    :func:`lib.training.embedding_loss.embedding_loss`, which needs the instance ids that follow
    the K target channels, split equally among their columns.
    Raises ``ValueError`` for unknown kinds or losses.
    """
    import tensorflow as tf

    kinds = tuple(kinds)
    if any(k not in INSTANCE_KINDS for k in kinds):
        raise ValueError(f"channel kinds must be one of {', '.join(INSTANCE_KINDS)}; got {kinds}")
    if len(weights) != len(kinds):
        raise ValueError(f"weights must have one value per channel ({len(kinds)}); got {list(weights)}")
    if distance_loss not in INSTANCE_DISTANCE_LOSSES:
        raise ValueError(f"distance_loss must be one of {', '.join(INSTANCE_DISTANCE_LOSSES)}; got {distance_loss!r}")
    n = len(kinds)
    n_class = sum(k == "class" for k in kinds)
    if n_class and (n_class < 2 or any(k != "class" for k in kinds[n - n_class:])):
        raise ValueError(f"class planes must be the last channels, at least 2 (background and a class); got {kinds}")
    n_embedding = sum(k == "embedding" for k in kinds)
    first_embedding = kinds.index("embedding") if n_embedding else 0
    if n_embedding and kinds[first_embedding:first_embedding + n_embedding] != ("embedding",) * n_embedding:
        raise ValueError(f"embedding planes must be contiguous; got {kinds}")
    binary = tf.constant([k == "binary" for k in kinds])
    ray = tf.constant([k == "ray" for k in kinds])
    weight = tf.constant(list(weights), tf.float32)

    def per_channel(targets, logits):
        targets_all = targets
        targets = tf.cast(targets[..., :n], tf.float32)
        logits = tf.cast(logits, tf.float32)
        bce = tf.nn.sigmoid_cross_entropy_with_logits(labels=targets, logits=logits)
        error = logits - targets
        regression = tf.abs(error) if distance_loss == "l1" else tf.square(error)
        per_pixel = tf.where(binary, bce, regression)
        mean = tf.reduce_mean(per_pixel, axis=[1, 2])
        if any(k == "ray" for k in kinds):
            on_object = tf.cast(targets > 0, tf.float32)
            masked = tf.reduce_sum(regression * on_object, axis=[1, 2]) / tf.maximum(
                tf.reduce_sum(on_object, axis=[1, 2]), 1.0)
            mean = tf.where(ray, masked, mean)
        if n_embedding:
            if targets_all.shape[-1] is not None and targets_all.shape[-1] <= n:
                raise ValueError("the embedding loss needs the instance ids after the target channels")
            end = first_embedding + n_embedding
            ids = tf.cast(targets_all[..., n], tf.float32)
            # one example at a time: the loss holds (objects x pixels) tensors, so a batch at once
            # multiplied the peak memory by the batch size (validation passes on whole tiles)
            per_example = tf.map_fn(lambda pair: embedding_loss(pair[0][tf.newaxis], pair[1][tf.newaxis])[0],
                                    (ids, logits[..., first_embedding:end]), fn_output_signature=tf.float32)
            share = per_example[:, tf.newaxis] / n_embedding
            mean = tf.concat([mean[:, :first_embedding], tf.repeat(share, n_embedding, axis=1), mean[:, end:]], axis=1)
        if n_class:
            first = n - n_class
            ce = tf.nn.softmax_cross_entropy_with_logits(labels=targets[..., first:], logits=logits[..., first:])
            share = tf.reduce_mean(ce, axis=[1, 2])[:, tf.newaxis] / n_class
            mean = tf.concat([mean[:, :first], tf.repeat(share, n_class, axis=1)], axis=1)
        return mean * weight

    return per_channel


def instance_activations(kinds: Sequence[str]) -> Callable[[object], object]:
    """``f(logits (B, H, W, K)) -> maps`` float32: sigmoid for binary and embedding channels, clip to [0, 1] for the
    others (distances and rays: every regression target is encoded in [0, 1]), a softmax over the
    class planes (the last ones) together."""
    import tensorflow as tf

    kinds = tuple(kinds)
    binary = tf.constant([k in SIGMOID_KINDS for k in kinds])
    first = len(kinds) - sum(k == "class" for k in kinds)

    def activate(logits):
        logits = tf.cast(logits, tf.float32)
        maps = tf.where(binary, tf.sigmoid(logits), tf.clip_by_value(logits, 0.0, 1.0))
        if first == len(kinds):
            return maps
        return tf.concat([maps[..., :first], tf.nn.softmax(logits[..., first:], axis=-1)], axis=-1)

    return activate
