"""The EmbedSeg loss (lib/training/embedding_loss.py): its Lovasz hinge against the definition, and
that the ideal embedding of the objects scores better than a wrong one."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from lib.reader.targets import make_targets, parse_instance_channels  # noqa: E402
from lib.training.embedding_loss import embedding_loss, lovasz_hinge_rows  # noqa: E402
from lib.training.losses import make_instance_loss  # noqa: E402


def lovasz_by_definition(scores: np.ndarray, truth: np.ndarray) -> float:
    """The Lovasz extension of the Jaccard loss at the hinge errors, from the set function itself:
    sum over the pixels sorted by error of error x (Delta(first i) - Delta(first i - 1)), with
    Delta(S) = 1 - |truth outside S| / |truth or S| (S = the mispredicted pixels)."""
    errors = 1.0 - scores * (2.0 * truth - 1.0)
    order = np.argsort(-errors, kind="stable")
    total, previous = 0.0, 0.0
    chosen = np.zeros(truth.size, bool)
    for i in order:
        chosen[i] = True
        kept = np.count_nonzero(truth.astype(bool) & ~chosen)
        union = np.count_nonzero(truth.astype(bool) | chosen)
        delta = 1.0 - kept / union if union else 0.0
        total += max(errors[i], 0.0) * (delta - previous)
        previous = delta
    return total


def test_lovasz_hinge_matches_its_definition():
    rng = np.random.default_rng(0)
    scores = rng.uniform(-1.5, 1.5, (6, 9)).astype(np.float32)
    truths = (rng.random((6, 9)) < 0.4).astype(np.float32)
    truths[0] = 0  # an empty mask
    got = lovasz_hinge_rows(tf.constant(scores), tf.constant(truths)).numpy()
    expected = [lovasz_by_definition(s, t) for s, t in zip(scores, truths)]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # perfect, confident scores cost nothing
    perfect = lovasz_hinge_rows(tf.constant(2.0 * truths[1:] - 1.0), tf.constant(truths[1:])).numpy()
    np.testing.assert_allclose(perfect, 0.0, atol=1e-6)


def ideal_logits(labels: np.ndarray) -> np.ndarray:
    maps = make_targets(labels, parse_instance_channels("E"))
    maps = np.clip(maps, 1e-4, 1 - 1e-4)
    return np.log(maps / (1 - maps)).astype(np.float32)


def cells() -> np.ndarray:
    labels = np.zeros((48, 48), np.int32)
    yy, xx = np.mgrid[:48, :48]
    for k, (cy, cx, r) in enumerate([(12, 12, 7), (12, 26, 7), (34, 30, 9), (36, 8, 5)], 1):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = k  # the first two touch
    return labels


def test_ideal_embeddings_score_better_than_wrong_ones():
    labels = cells()
    ids = tf.constant(np.stack([labels, labels[::-1]]).astype(np.float32))
    good = np.stack([ideal_logits(labels), ideal_logits(labels[::-1].copy())])
    bad = good.copy()
    bad[..., 0:2] = 0.0  # no offsets: every pixel embedded where it is
    swapped = good.copy()
    swapped[0] = good[1]  # another example's maps
    losses = {name: embedding_loss(ids, tf.constant(v)).numpy() for name, v in
              (("good", good), ("bad", bad), ("swapped", swapped))}
    assert losses["good"].shape == (2,) and np.isfinite(losses["good"]).all()
    assert (losses["good"] < 0.5 * losses["bad"]).all()
    assert losses["good"][0] < 0.5 * losses["swapped"][0]
    np.testing.assert_allclose(losses["good"][1], losses["swapped"][1], rtol=1e-5)  # example 1 unchanged


def test_loss_handles_empty_examples_and_gives_finite_gradients():
    labels = cells()
    ids = tf.constant(np.stack([labels, np.zeros_like(labels)]).astype(np.float32))
    logits = tf.Variable(np.random.default_rng(1).normal(0, 1, (2, 48, 48, 5)).astype(np.float32))
    with tf.GradientTape() as tape:
        loss = embedding_loss(ids, logits)
        total = tf.reduce_sum(loss)
    gradient = tape.gradient(total, logits).numpy()
    assert np.isfinite(loss.numpy()).all() and np.isfinite(gradient).all()
    assert np.abs(gradient[0, ..., :4]).sum() > 0  # offsets and bandwidth learn from the objects
    assert np.abs(gradient[1, ..., :4]).sum() == 0 and np.abs(gradient[1, ..., 4]).sum() > 0  # seeds only


def test_instance_loss_splits_the_embedding_loss_among_its_planes():
    labels = cells()
    spec = parse_instance_channels("E")
    targets = make_targets(labels, spec)
    batch = np.concatenate([targets, labels[..., None].astype(np.float32)], axis=-1)[None]
    logits = ideal_logits(labels)[None]
    columns = make_instance_loss(spec.kinds, spec.loss_weights)(tf.constant(batch), tf.constant(logits)).numpy()
    assert columns.shape == (1, 5)
    np.testing.assert_allclose(columns[0], columns[0, 0])
    whole = embedding_loss(tf.constant(labels[None].astype(np.float32)), tf.constant(logits)).numpy()[0]
    assert math.isclose(columns.sum(), whole, rel_tol=1e-5)
    with pytest.raises(ValueError, match="instance ids"):
        make_instance_loss(spec.kinds, spec.loss_weights)(tf.constant(targets[None]), tf.constant(logits))
    assert list(itertools.islice(spec.channels, 5)) == ["Ey", "Ex", "Esy", "Esx", "Eseed"]
