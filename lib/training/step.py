"""The distributed training and evaluation steps, the optimizer and the learning-rate schedule.

Keras 3 ``Model.fit`` does not run under ``MultiWorkerMirroredStrategy`` (keras-team/keras
issue 20585), so training is a custom loop: a ``tf.function`` step run with
``strategy.run``, per-example losses summed per replica and divided by the global batch. The
same step serves one device, ``MirroredStrategy`` and ``MultiWorkerMirroredStrategy``.
TensorFlow is imported inside the functions.
"""

from __future__ import annotations

import math
from typing import Callable

from .config import TrainConfig
from .losses import instance_activations, make_instance_loss, make_loss


def learning_rate_at(step: int, config: TrainConfig, plateau_factor: float) -> float:
    """Learning rate for ``step`` (0-based): linear warm-up, then the schedule."""
    base = config.learning_rate
    if config.warmup_steps and step < config.warmup_steps:
        return base * (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return base
    if config.lr_schedule == "plateau":
        return base * plateau_factor
    total = max(config.max_steps - config.warmup_steps, 1)
    progress = min(max(step - config.warmup_steps, 0) / total, 1.0)
    if config.lr_schedule == "cosine":
        return base * 0.5 * (1 + math.cos(math.pi * progress))
    # one-cycle: up from base/25 to base over 30 %, then cosine down to base/1e4
    if progress < 0.3:
        return base / 25 + (base - base / 25) * progress / 0.3
    return base / 1e4 + (base - base / 1e4) * 0.5 * (1 + math.cos(math.pi * (progress - 0.3) / 0.7))


def make_optimizer(config: TrainConfig, model, precision: str = "float32"):
    """AdamW with decoupled weight decay on the kernels, built for ``model`` (call inside the strategy scope).

    ``precision`` "float16": wrapped in Keras' ``LossScaleOptimizer`` (dynamic loss scaling:
    the loss is multiplied by a scale so that small float16 gradients do not underflow; a step
    whose gradients overflow is skipped and the scale halved; it doubles after 2000 good steps).
    The AdamW inside (``optimizer.inner_optimizer``) holds what a checkpoint saves.
    """
    import keras

    optimizer = keras.optimizers.AdamW(learning_rate=config.learning_rate, weight_decay=config.weight_decay)
    # Decay the kernels only: biases and normalisation parameters keep their scale.
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    if precision == "float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    optimizer.build(model.trainable_variables)
    return optimizer


def saved_optimizer(optimizer):
    """The optimizer whose variables a checkpoint holds: the AdamW inside a loss-scale wrapper
    (the loss scale starts afresh on resume), so a run can resume under another precision."""
    return getattr(optimizer, "inner_optimizer", optimizer)


def make_losses(config: TrainConfig, class_weights: list[float] | None = None) -> tuple[Callable, Callable | None]:
    """``(loss_fn, channel_loss_fn)``: per-example loss ``(B,)``, and for an instance run the
    per-example, per-channel losses ``(B, K)`` whose sum over channels ``loss_fn`` is."""
    import tensorflow as tf

    spec = config.target_spec()
    if spec is None:
        return make_loss(config.loss, config.number_classes, class_weights), None
    channel_loss_fn = make_instance_loss(spec.kinds, spec.loss_weights, spec.distance_loss)
    return (lambda labels, logits: tf.reduce_sum(channel_loss_fn(labels, logits), axis=-1)), channel_loss_fn


def make_train_step(strategy, model, optimizer, loss_fn, global_batch: int, jit_compile: bool = False):
    """``step(iterator) -> loss``: one optimisation step on the next element of a distributed iterator.

    Each replica sums its per-example losses and divides by ``global_batch``, so the
    all-reduced (summed) gradients are those of the mean loss over the global batch, whatever
    the number of replicas. ``jit_compile`` compiles the forward and backward pass with XLA.

    With a loss-scale optimizer (float16) the gradients are those of the scaled loss, and when
    any replica's are not finite every replica's are made so: Keras' ``LossScaleOptimizer``
    decides to skip a step from the gradients of its own replica, and replicas (workers) that
    decide differently would leave one waiting in the others' all-reduce.

    ``step(iterator, flags)`` with a float32 vector ``flags`` returns ``[loss, *flags summed over
    every replica]``: how the workers of a multi-worker run agree on stopping at no extra cost.
    """
    import tensorflow as tf

    scaled = hasattr(optimizer, "scale_loss")

    @tf.function(jit_compile=jit_compile or None)
    def gradients(images, labels):
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            loss = tf.reduce_sum(loss_fn(labels, logits)) / global_batch
            target = optimizer.scale_loss(loss) if scaled else loss
        return loss, tape.gradient(target, model.trainable_variables)

    def replica_step(images, labels):
        loss, grads = gradients(images, labels)
        if scaled and strategy.num_replicas_in_sync > 1:
            finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads if g is not None])
            context = tf.distribute.get_replica_context()
            bad = context.all_reduce(tf.distribute.ReduceOp.SUM, 1.0 - tf.cast(finite, tf.float32))
            grads = [g if g is None else tf.where(bad > 0, tf.fill(tf.shape(g), tf.constant(float("nan"), g.dtype)), g)
                     for g in grads]
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    def replica_step_with_flags(images, labels, flags):
        loss = replica_step(images, labels)
        return tf.concat([tf.reshape(tf.cast(loss, tf.float32), [1]), tf.identity(flags)], axis=0)

    @tf.function
    def step(iterator, flags=None):
        if flags is None:
            per_replica = strategy.run(replica_step, args=next(iterator))
            return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
        # the stop flags of lib.training.agreement ride on the loss's all-reduce: no extra collective
        per_replica = strategy.run(replica_step_with_flags, args=(*next(iterator), flags))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    return step


def make_eval_step(config: TrainConfig, model, loss_fn, channel_loss_fn=None):
    """``eval_step(images, labels)``: semantic ``(summed loss, argmax classes)``; instance
    ``(per-channel summed losses (K,), activated maps (B, h, w, K))``."""
    import tensorflow as tf

    spec = config.target_spec()
    if spec is None:
        @tf.function(reduce_retracing=True)
        def eval_step(images, labels):
            logits = model(images, training=False)
            return tf.reduce_sum(loss_fn(labels, logits)), tf.argmax(logits, axis=-1, output_type=tf.int32)

        return eval_step
    activate = instance_activations(spec.kinds)

    @tf.function(reduce_retracing=True)
    def eval_instance_step(images, labels):
        logits = model(images, training=False)
        return tf.reduce_sum(channel_loss_fn(labels, logits), axis=0), activate(logits)

    return eval_instance_step
