"""The EmbedSeg loss of the five embedding planes (``E``: ``Ey, Ex, Esy, Esx, Eseed``).

Per example, from the instance ids the reader passes beside the targets and the five logits:

* each pixel is embedded at ``e = position / 256 + (2 sigmoid(logit) - 1)`` (units of 256 px, the
  offset planes' reach); its bandwidth ``s = sigmoid(logit)`` per axis, its seediness
  ``sigmoid(logit)``;
* each object ``k`` has a centre ``c_k``, the centroid of its pixel positions, and a bandwidth
  ``s_k``, the mean of its pixels' ``s``; every pixel ``i`` of the example gets the score
  ``phi_k(i) = exp(-sum_axis exp(10 s_k) (e_i - c_k)^2)``;
* instance loss: the Lovasz hinge (Berman et al. 2018, the convex surrogate of the IoU that
  EmbedSeg uses) between ``2 phi_k - 1`` and the object's mask, averaged over the objects;
* variance loss: the squared difference between each pixel's ``s`` and its object's ``s_k`` (held
  constant), summed over the two axes, averaged over each object's pixels, then over the objects,
  weight 10;
* seed loss: on background the seediness squared, on objects ``(seed - phi_own)^2`` with
  ``phi_own`` held constant, weight 10 on object pixels (they are the minority), averaged over
  the pixels.

The sum is the example's loss. Objects are told apart within an example only: ``phi_k`` is
computed over the pixels of the example that holds ``k``. Memory grows as objects x pixels per
example, as EmbedSeg's; the trainer (``lib/training/losses.py``) calls it one example at a time.
Measured: 8 whole 256-px validation tiles with about 90 objects each raised the peak memory by
1.49 GB in one call and by 0.67 GB one example at a time (same losses, same time). Train E on
patches (``--patch_size``), not whole images.
"""

from __future__ import annotations

from ..reader.targets_embedding import REACH, SIGMA_SCALE

VARIANCE_WEIGHT = 10.0
SEED_FOREGROUND_WEIGHT = 10.0


def lovasz_hinge_rows(scores, truths):
    """Lovasz hinge per row: ``scores (K, P)`` in [-1, 1] (any real), ``truths (K, P)`` 0/1 -> ``(K,)``."""
    import tensorflow as tf

    signs = 2.0 * truths - 1.0
    errors = 1.0 - scores * signs
    n = tf.shape(errors)[1]
    errors_sorted, order = tf.math.top_k(errors, k=n, sorted=True)
    truths_sorted = tf.gather(truths, order, batch_dims=1)
    total = tf.reduce_sum(truths_sorted, axis=1, keepdims=True)
    intersection = total - tf.cumsum(truths_sorted, axis=1)
    union = total + tf.cumsum(1.0 - truths_sorted, axis=1)
    jaccard = 1.0 - intersection / tf.maximum(union, 1e-6)
    grad = tf.concat([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], axis=1)
    return tf.reduce_sum(tf.nn.relu(errors_sorted) * tf.stop_gradient(grad), axis=1)


def embedding_loss(ids, logits):
    """``ids (B, H, W)`` instance ids (any float or integer, 0 = background), ``logits (B, H, W, 5)``
    -> ``(B,)`` float32: the example losses (0 for an example without objects but its seed term)."""
    import tensorflow as tf

    logits = tf.cast(logits, tf.float32)
    shape = tf.shape(logits)
    b, h, w = shape[0], shape[1], shape[2]
    p = h * w
    rows = tf.cast(tf.range(h), tf.float32) / REACH
    cols = tf.cast(tf.range(w), tf.float32) / REACH
    grid_y, grid_x = tf.meshgrid(rows, cols, indexing="ij")
    position = tf.reshape(tf.stack([grid_y, grid_x], axis=-1), [1, p, 2])
    offset = 2.0 * tf.sigmoid(tf.reshape(logits[..., 0:2], [b, p, 2])) - 1.0
    embedding = position + offset  # (B, P, 2)
    bandwidth = tf.sigmoid(tf.reshape(logits[..., 2:4], [b, p, 2]))
    seed = tf.sigmoid(tf.reshape(logits[..., 4], [b, p]))

    ids = tf.cast(tf.round(tf.reshape(tf.cast(ids, tf.float32), [b, p])), tf.int64)
    example = tf.repeat(tf.range(tf.cast(b, tf.int64))[:, tf.newaxis], p, axis=1)
    keys, segment = tf.unique(tf.reshape(example * (1 << 32) + ids, [-1]))
    n_segments = tf.shape(keys)[0]
    ones = tf.ones_like(segment, tf.float32)
    count = tf.math.unsorted_segment_sum(ones, segment, n_segments)
    positions = tf.reshape(tf.tile(position, [b, 1, 1]), [-1, 2])
    centre = tf.math.unsorted_segment_sum(positions, segment, n_segments) / count[:, tf.newaxis]
    flat_bandwidth = tf.reshape(bandwidth, [-1, 2])
    mean_bandwidth = tf.math.unsorted_segment_sum(flat_bandwidth, segment, n_segments) / count[:, tf.newaxis]
    valid = tf.cast(keys % (1 << 32) != 0, tf.float32)  # background segments are not objects
    owner = tf.cast(keys // (1 << 32), tf.int32)  # the example of each segment
    precision = tf.exp(SIGMA_SCALE * mean_bandwidth)  # (S, 2)

    # instance loss: every object against every pixel of its example
    embedded = tf.gather(embedding, owner)  # (S, P, 2)
    distance = tf.reduce_sum(precision[:, tf.newaxis, :] * tf.square(embedded - centre[:, tf.newaxis, :]), axis=-1)
    phi = tf.exp(-distance)  # (S, P)
    segment_map = tf.reshape(segment, [b, p])
    truth = tf.cast(tf.equal(tf.gather(segment_map, owner), tf.range(n_segments)[:, tf.newaxis]), tf.float32)
    hinge = lovasz_hinge_rows(2.0 * phi - 1.0, truth) * valid
    objects = tf.math.unsorted_segment_sum(valid, owner, b)
    instance = tf.math.unsorted_segment_sum(hinge, owner, b) / tf.maximum(objects, 1.0)

    # variance of the bandwidth inside each object
    spread = tf.reduce_sum(tf.square(flat_bandwidth - tf.stop_gradient(tf.gather(mean_bandwidth, segment))), axis=-1)
    per_object = tf.math.unsorted_segment_sum(spread, segment, n_segments) / count * valid
    variance = tf.math.unsorted_segment_sum(per_object, owner, b) / tf.maximum(objects, 1.0)

    # seediness: phi of the pixel's own object on objects, 0 on background
    own = tf.gather(centre, segment)
    own_precision = tf.gather(precision, segment)
    flat_embedding = tf.reshape(embedding, [-1, 2])
    phi_own = tf.exp(-tf.reduce_sum(own_precision * tf.square(flat_embedding - own), axis=-1))
    on_object = tf.reshape(tf.gather(valid, segment), [b, p])
    phi_own = tf.stop_gradient(tf.reshape(phi_own, [b, p]))
    seed_error = on_object * SEED_FOREGROUND_WEIGHT * tf.square(seed - phi_own) + (1.0 - on_object) * tf.square(seed)
    seed_loss = tf.reduce_mean(seed_error, axis=1)
    return instance + VARIANCE_WEIGHT * variance + seed_loss
