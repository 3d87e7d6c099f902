"""Tests of lib/fusion/ (patterns, staple, vote, masks, runner) and fuse_masks.py: hand-computed cases, SimpleITK as an oracle, the CLI."""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fuse_masks
from lib.common.errors import EXIT_BAD_INPUT, BadInput
from lib.common.settings import ConfigError
from lib.fusion.masks import detect_mask_type, instances_to_semantic, matching_f1, relabel
from lib.fusion.masks import fuse_masks as fuse_image
from lib.fusion.patterns import FusionError, decision_patterns
from lib.fusion.runner import (
    PER_IMAGE_CSV,
    SETTINGS_JSON,
    SUMMARY_CSV,
    FusionConfig,
    MaskLayoutError,
    find_experts,
    fuse_folder,
    plan_fusion,
)
from lib.fusion.staple import DEFAULT_TOLERANCE, staple_binary, staple_multiclass
from lib.fusion.vote import majority_vote
from lib.scoring.metrics import match_instances
from lib.store import images

ROOT = Path(__file__).resolve().parents[2]


def noisy_copies(truth: np.ndarray, rates, n_classes: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One mask per rate: ``truth`` with that share of pixels replaced by a random class."""
    masks = []
    for rate in rates:
        mask = truth.copy()
        flip = rng.random(truth.shape) < rate
        mask[flip] = rng.integers(0, n_classes, int(flip.sum()))
        masks.append(mask.astype(np.uint8))
    return masks


def structured(shape=(96, 112), n_classes=2) -> np.ndarray:
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    field = np.sin(xx / 9.0) + np.cos(yy / 7.0) + 2.0  # 0..4
    return np.clip((field * n_classes / 4.0).astype(int), 0, n_classes - 1).astype(np.uint8)


# Hand-computed cases


def test_decision_patterns_counts_each_vector_once():
    a = np.array([[0, 1], [1, 1]], np.uint8)
    b = np.array([[0, 1], [0, 1]], np.uint8)
    patterns = decision_patterns([a, b], 2)
    found = {tuple(p): int(n) for p, n in zip(patterns.patterns, patterns.counts)}
    assert found == {(0, 0): 1, (1, 1): 2, (1, 0): 1}
    per_pixel = patterns.expand(np.arange(len(patterns.counts)))
    assert per_pixel.shape == (2, 2)
    np.testing.assert_array_equal(patterns.patterns[per_pixel][..., 0], a)
    np.testing.assert_array_equal(patterns.patterns[per_pixel][..., 1], b)


@pytest.mark.parametrize("n_classes, n_experts", [(300, 4), (2, 70)])
def test_decision_patterns_without_counting_table(n_classes, n_experts):
    # 300^4 codes: np.unique on codes; 2^70 codes: np.unique on rows. Vote checked by brute force.
    rng = np.random.default_rng(3)
    masks = [rng.integers(0, n_classes, (6, 7)).astype(np.uint16) for _ in range(n_experts)]
    masks[0][0, 0] = n_classes - 1
    fused = majority_vote(masks, undecided_label=n_classes).labels
    stack = np.stack(masks)
    for y, x in np.ndindex(6, 7):
        votes = np.bincount(stack[:, y, x], minlength=n_classes)
        winners = np.flatnonzero(votes == votes.max())
        assert fused[y, x] == (winners[0] if len(winners) == 1 else n_classes)


VOTE_CASES = [
    # experts' labels at 4 pixels, undecided label, fused
    ([[0, 1, 1, 0], [0, 1, 0, 1]], 0, [0, 1, 0, 0]),  # two experts disagree: ties -> background
    ([[0, 1, 1, 0], [0, 1, 0, 1]], 7, [0, 1, 7, 7]),
    ([[0, 1, 1, 0], [0, 1, 0, 1], [1, 1, 0, 1]], 0, [0, 1, 0, 1]),
    ([[0, 1, 2, 2], [1, 1, 2, 0], [2, 1, 1, 1]], 5, [5, 1, 2, 5]),  # three-way tie, unanimous, 2:1, three-way
]


@pytest.mark.parametrize("labels, undecided, expected", VOTE_CASES)
def test_majority_vote_ties(labels, undecided, expected):
    masks = [np.array([row], np.uint8) for row in labels]
    result = majority_vote(masks, undecided_label=undecided, return_probabilities=True)
    np.testing.assert_array_equal(result.labels[0], expected)
    assert result.iterations == 0 and result.sensitivity is None


def test_majority_vote_shares_agreement_and_dice_are_exact():
    a = np.array([[1, 1, 0, 0]], np.uint8)
    b = np.array([[1, 0, 1, 0]], np.uint8)
    c = np.array([[1, 1, 1, 0]], np.uint8)
    result = majority_vote([a, b, c], return_probabilities=True)
    np.testing.assert_array_equal(result.labels, [[1, 1, 1, 0]])
    np.testing.assert_allclose(result.probabilities, [[1, 2 / 3, 2 / 3, 0]], rtol=1e-6)
    np.testing.assert_array_equal(result.agreement, [[3, 2, 2, 0]])
    # foreground Dice: a 2*2/(2+3), b 2*2/(2+3), c 2*3/(3+3); background: a 2*1/(2+1), b the same, c 1
    np.testing.assert_allclose(result.dice[:, 1], [0.8, 0.8, 1.0])
    np.testing.assert_allclose(result.dice[:, 0], [2 / 3, 2 / 3, 1.0])


def test_staple_unanimous_experts_give_their_mask_back():
    mask = structured()
    result = staple_binary([mask] * 4, return_probabilities=True)
    np.testing.assert_array_equal(result.labels, mask)
    np.testing.assert_array_equal(result.probabilities, mask.astype(np.float32))
    np.testing.assert_array_equal(result.sensitivity, np.ones(4))
    np.testing.assert_array_equal(result.specificity, np.ones(4))
    np.testing.assert_array_equal(result.dice[:, 1], np.ones(4))
    assert result.converged


def test_staple_complement_expert_gets_zero_sensitivity():
    mask = structured()
    result = staple_binary([mask, mask, mask, 1 - mask])
    np.testing.assert_array_equal(result.labels, mask)
    assert result.sensitivity[3] < 1e-6 and result.specificity[3] < 1e-6
    np.testing.assert_allclose(result.sensitivity[:3], 1.0)
    assert result.dice[3, 1] == 0.0


def test_staple_multiclass_unanimous_and_degenerate_inputs():
    mask = structured(n_classes=3)
    result = staple_multiclass([mask] * 3, return_probabilities=True)
    np.testing.assert_array_equal(result.labels, mask)
    np.testing.assert_allclose(result.sensitivity, 1.0)
    np.testing.assert_allclose(result.specificity, 1.0)
    assert result.probabilities.shape == mask.shape + (3,)
    np.testing.assert_allclose(result.confusion, np.broadcast_to(np.eye(3), (3, 3, 3)))

    empty = np.zeros((5, 5), np.uint8)
    nothing = staple_binary([empty, empty])
    np.testing.assert_array_equal(nothing.labels, empty)
    assert np.isnan(nothing.sensitivity).all() and (nothing.specificity == 1).all()
    assert np.isnan(nothing.dice[:, 1]).all()


def test_staple_warns_when_it_stops_before_converging(caplog):
    rng = np.random.default_rng(0)
    masks = noisy_copies(structured(), [0.1, 0.3, 0.45], 2, rng)
    with caplog.at_level(logging.WARNING, logger="lib.fusion"):
        result = staple_binary(masks, max_iterations=1)
    assert not result.converged and result.iterations == 1
    assert "did not converge in 1 iterations" in caplog.text


def test_instance_ridge_keeps_touching_instances_apart():
    instances = np.zeros((8, 10), np.uint16)
    instances[1:7, 1:5] = 3
    instances[1:7, 5:9] = 9  # touches object 3 along a column
    semantic = instances_to_semantic(instances)
    expected = (instances > 0).astype(np.uint8)
    expected[1:7, 4] = 0  # the lower-numbered object's border column becomes background
    np.testing.assert_array_equal(semantic, expected)
    # three experts, one drawing object 9 a column wider: the fused mask still has two objects
    wider = instances.copy()
    wider[1:7, 4] = 9
    fused, result, metrics = fuse_image([instances, instances, wider], "instance")
    assert int(fused.max()) == 2
    np.testing.assert_array_equal(relabel(semantic), fused)
    assert [m["f1_iou50"] for m in metrics] == [1.0, 1.0, 1.0]


def test_ridge_separates_diagonal_neighbours():
    instances = np.array([[1, 0], [0, 2]], np.uint8)
    np.testing.assert_array_equal(instances_to_semantic(instances), [[0, 0], [0, 1]])


def test_matching_f1_counts_pairs_with_iou_from_half():
    reference = np.zeros((4, 8), np.uint8)
    reference[0:2, 0:2] = 1  # area 4
    reference[0:2, 4:8] = 2  # area 8
    prediction = np.zeros_like(reference)
    prediction[0:2, 0:2] = 5  # identical to 1: IoU 1
    prediction[0:2, 4:6] = 6  # half of 2: IoU exactly 0.5, a match (IoU >= 0.5, as lib.scoring.metrics)
    prediction[3, 7] = 7  # spurious
    assert matching_f1(reference, prediction) == pytest.approx(2 * 2 / (2 + 3))
    assert matching_f1(reference, prediction) == match_instances(reference, prediction, (0.5,)).stats[0.5].f1
    prediction[0, 6] = 6  # one pixel more: IoU 5/8; one less than half: IoU 3/8, no match
    assert matching_f1(reference, prediction) == pytest.approx(2 * 2 / (2 + 3))
    prediction[0, 6], prediction[0, 5] = 0, 0
    assert matching_f1(reference, prediction) == pytest.approx(2 * 1 / (2 + 3))
    assert matching_f1(reference, reference) == 1.0
    assert np.isnan(matching_f1(np.zeros((3, 3), np.uint8), np.zeros((3, 3), np.uint8)))
    sparse = reference.astype(np.uint32) * 1_000_000  # labels far above the pixel count
    assert matching_f1(sparse, reference) == 1.0


@pytest.mark.parametrize("make, expected", [
    (lambda: [structured(), structured()], "binary"),
    (lambda: [structured(n_classes=3), structured(n_classes=3)], "multiclass"),
    (lambda: [np.kron(np.arange(6, dtype=np.uint8).reshape(2, 3), np.ones((4, 4), np.uint8))] * 2, "instance"),
])
def test_detect_mask_type(make, expected):
    assert detect_mask_type(make())[0] == expected


def test_fuse_masks_multiclass_metrics_per_class():
    truth = structured(n_classes=3)
    _, result, metrics = fuse_image([truth, truth, truth], "multiclass")
    assert set(metrics[0]) == {"dice", "dice_class_1", "dice_class_2", "sensitivity_class_1", "sensitivity_class_2",
                               "specificity_class_1", "specificity_class_2"}
    assert all(v == pytest.approx(1.0) for v in metrics[0].values())


@contextlib.contextmanager
def quiet_fusion_log():
    """Silence the expected "did not converge" warnings of deliberately short runs."""
    log = logging.getLogger("lib.fusion")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def pixelwise_staple_binary(masks, iterations):
    """ITK's STAPLEImageFilter written pixel by pixel (no patterns), for a fixed number of rounds."""
    d = np.stack([m.ravel() for m in masks], axis=1).astype(np.float64)
    weight = d.mean(axis=1)
    prior = weight.mean()
    for _ in range(iterations):
        p = (d * weight[:, None]).sum(0) / weight.sum()
        q = ((1 - d) * (1 - weight[:, None])).sum(0) / (1 - weight).sum()
        alpha = np.prod(np.where(d == 1, p, 1 - p), axis=1) * prior
        beta = np.prod(np.where(d == 1, 1 - q, q), axis=1) * (1 - prior)
        weight = alpha / (alpha + beta)
    return weight.reshape(masks[0].shape), p, q


def pixelwise_staple_multiclass(masks, n_classes, iterations):
    """ITK's MultiLabelSTAPLE pixel by pixel: start from the vote (undecided pixels left out), then EM."""
    d = np.stack([m.ravel() for m in masks], axis=1)
    n_experts = d.shape[1]
    prior = np.bincount(d.ravel(), minlength=n_classes) / d.size
    votes = np.stack([np.count_nonzero(d == c, axis=1) for c in range(n_classes)], axis=1)
    decided = np.count_nonzero(votes == votes.max(axis=1, keepdims=True), axis=1) == 1
    confusion = np.zeros((n_experts, n_classes, n_classes))
    for r in range(n_experts):
        np.add.at(confusion[r], (d[decided, r], votes[decided].argmax(axis=1)), 1.0)
    rows = confusion.sum(axis=2, keepdims=True)
    confusion = np.divide(confusion, rows, out=confusion, where=rows > 0)
    for _ in range(iterations):
        weight = prior * np.prod(confusion[np.arange(n_experts), d, :], axis=1)
        sums = weight.sum(axis=1, keepdims=True)  # zero where no class explains the pixel (ITK: skip)
        weight = np.divide(weight, sums, out=weight, where=sums > 0)
        updated = np.zeros_like(confusion)
        for r in range(n_experts):
            np.add.at(updated[r], d[:, r], weight)
        columns = updated.sum(axis=1, keepdims=True)
        confusion = np.divide(updated, columns, out=updated, where=columns > 0)
    return confusion


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_experts=st.integers(2, 6), rounds=st.integers(1, 6))
def test_pattern_em_equals_pixelwise_em(seed, n_experts, rounds):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 2, (9, 11))
    masks = noisy_copies(truth, rng.uniform(0.0, 0.4, n_experts), 2, rng)
    masks[0][0, 0], masks[1][0, 1] = 0, 1  # both classes present
    with quiet_fusion_log():
        ours = staple_binary(masks, max_iterations=rounds, tolerance=1e-300, return_probabilities=True)
    weight, p, q = pixelwise_staple_binary(masks, rounds)
    np.testing.assert_allclose(ours.probabilities, weight, atol=1e-6)
    np.testing.assert_allclose(ours.sensitivity, p, atol=1e-12)
    np.testing.assert_allclose(ours.specificity, q, atol=1e-12)

    masks = noisy_copies(rng.integers(0, 3, (9, 11)), rng.uniform(0.0, 0.4, n_experts), 3, rng)
    masks[0][0, :3] = [0, 1, 2]  # every class present
    with quiet_fusion_log():
        ours = staple_multiclass(masks, max_iterations=rounds, tolerance=1e-300)
    np.testing.assert_allclose(ours.confusion, pixelwise_staple_multiclass(masks, 3, rounds), atol=1e-10)


def test_sparse_path_for_many_patterns_equals_pixelwise_em():
    # 16 classes, 5 experts, 90 000 noisy pixels: over 52 000 patterns, so the (expert, label) indicator is sparse
    rng = np.random.default_rng(8)
    truth = rng.integers(0, 16, (300, 300))
    masks = noisy_copies(truth, [0.5, 0.6, 0.7, 0.8, 0.9], 16, rng)
    with quiet_fusion_log():
        ours = staple_multiclass(masks, max_iterations=2, tolerance=1e-300)
    assert len(decision_patterns(masks, 16).counts) * 5 * 16 > 1 << 22
    np.testing.assert_allclose(ours.confusion, pixelwise_staple_multiclass(masks, 16, 2), atol=1e-10)


def test_multiclass_staple_refuses_huge_posteriors(monkeypatch):
    monkeypatch.setattr("lib.fusion.staple.MAX_POSTERIOR_VALUES", 10)
    masks = noisy_copies(structured(n_classes=4), [0.3, 0.3], 4, np.random.default_rng(0))
    with pytest.raises(ValueError, match="likely instance masks"):
        staple_multiclass(masks)


def test_many_labels_are_detected_as_instances():
    many = np.arange(300 * 4, dtype=np.uint16).reshape(30, 40) % 300  # labels repeat: several regions each
    assert detect_mask_type([many, many])[0] == "instance"


ERROR_CASES = [
    (lambda: staple_binary([np.zeros((3, 3), np.uint8)]), "number of masks must be at least 2; got 1"),
    (lambda: majority_vote([np.zeros((3, 3), np.uint8), np.zeros((3, 4), np.uint8)]),
     "same shape; got (3, 3) for mask 0 and (3, 4) for mask 1"),
    (lambda: majority_vote([np.zeros(3, np.uint8)] * 2), "must be 2D"),
    (lambda: majority_vote([np.zeros((2, 2))] * 2), "integer labels; got dtype float64"),
    (lambda: majority_vote([np.full((2, 2), -1)] * 2), "must be >= 0; got -1"),
    (lambda: majority_vote([np.full((2, 2), 3, np.uint8)] * 2, n_classes=3), "must be < n_classes=3; got 3"),
    (lambda: majority_vote([np.zeros((2, 2), np.uint8)] * 2, n_classes=1), "n_classes must be at least 2"),
    (lambda: staple_binary([np.zeros((2, 2), np.uint8)] * 2, max_iterations=0), "max_iterations must be"),
    (lambda: staple_multiclass([np.zeros((2, 2), np.uint8)] * 2, tolerance=0.0), "tolerance must be"),
    (lambda: matching_f1(np.zeros((2, 2), np.uint8), np.zeros((2, 2), np.uint8), 0.3), "iou_threshold"),
    (lambda: matching_f1(np.zeros((2, 2), np.uint8), np.zeros((2, 3), np.uint8)), "the same shape"),
    (lambda: instances_to_semantic(np.zeros(4, np.uint8)), "must be 2D (H, W)"),
    (lambda: fuse_image([np.zeros((2, 2), np.uint8)] * 2, "binary", "mean"), "method must be one of"),
    (lambda: fuse_image([np.zeros((2, 2), np.uint8)] * 2, "semantic"), "mask_type must be one of"),
    (lambda: plan_fusion(ROOT, output_format="jpg"), "output_format must be one of png, tif"),
    (lambda: find_experts(ROOT / "no_such_folder"), "input_folder must be an existing folder"),
]


@pytest.mark.parametrize("call, message", ERROR_CASES)
def test_errors_say_what_and_why(call, message):
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        call()
    assert message in str(info.value)


# SimpleITK as the oracle


@pytest.fixture
def sitk():
    return pytest.importorskip("SimpleITK")


def to_sitk(sitk, masks):
    return [sitk.GetImageFromArray(np.ascontiguousarray(m)) for m in masks]


@pytest.mark.parametrize("kind", ["random", "structured"])
def test_binary_staple_matches_simpleitk(sitk, kind):
    rng = np.random.default_rng(11)
    truth = rng.integers(0, 2, (80, 90)).astype(np.uint8) if kind == "random" else structured()
    masks = noisy_copies(truth, [0.02, 0.1, 0.2, 0.3, 0.4], 2, rng)
    oracle = sitk.STAPLEImageFilter()
    probabilities = sitk.GetArrayFromImage(oracle.Execute(to_sitk(sitk, masks)))
    ours = staple_binary(masks, return_probabilities=True)
    np.testing.assert_allclose(ours.probabilities, probabilities, atol=1e-3)
    np.testing.assert_allclose(ours.sensitivity, oracle.GetSensitivity(), atol=1e-3)
    np.testing.assert_allclose(ours.specificity, oracle.GetSpecificity(), atol=1e-3)
    np.testing.assert_array_equal(ours.labels, probabilities >= 0.5)


@pytest.mark.parametrize("kind, tolerance", [("structured", None), ("random", 1e-9)])
def test_multiclass_staple_matches_simpleitk(sitk, kind, tolerance):
    # At SimpleITK's own tolerance (1e-5) both stop before the fixed point on noisy masks, from
    # slightly different starts (see the module docstring); at 1e-9 both reach the same one.
    rng = np.random.default_rng(5)
    truth = rng.integers(0, 4, (80, 90)).astype(np.uint8) if kind == "random" else structured(n_classes=4)
    masks = noisy_copies(truth, [0.05, 0.1, 0.2, 0.3, 0.5], 4, rng)
    oracle = sitk.MultiLabelSTAPLEImageFilter()
    oracle.SetLabelForUndecidedPixels(0)
    if tolerance:
        oracle.SetTerminationUpdateThreshold(tolerance)
    expected = sitk.GetArrayFromImage(oracle.Execute(to_sitk(sitk, masks)))
    ours = staple_multiclass(masks, tolerance=tolerance or DEFAULT_TOLERANCE["multiclass"])
    assert np.mean(ours.labels == expected) >= 0.999


@pytest.mark.parametrize("n_classes, undecided", [(2, 0), (2, 9), (4, 0), (4, 9)])
def test_majority_vote_matches_simpleitk_label_voting(sitk, n_classes, undecided):
    rng = np.random.default_rng(n_classes)
    masks = [rng.integers(0, n_classes, (50, 60)).astype(np.uint8) for _ in range(4)]  # 4 experts: many ties
    expected = sitk.GetArrayFromImage(sitk.LabelVoting(to_sitk(sitk, masks), undecided))
    np.testing.assert_array_equal(majority_vote(masks, undecided_label=undecided).labels, expected)


# The command line


def write_experts(root: Path, masks: dict[str, dict[str, np.ndarray]], suffix=".png") -> Path:
    for expert, by_key in masks.items():
        for key, mask in by_key.items():
            images.write_image(root / expert / f"{key}{suffix}", mask)
    return root


@pytest.fixture
def binary_experts(tmp_path):
    rng = np.random.default_rng(2)
    truth = structured((40, 48))
    experts = {f"expert{e}": {} for e in range(1, 4)}
    for key in ("a", "b"):
        for e, mask in enumerate(noisy_copies(truth, [0.0, 0.05, 0.1], 2, rng), start=1):
            experts[f"expert{e}"][key] = mask * 255
    return write_experts(tmp_path / "in", experts), truth


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_cli_fuses_binary_masks_and_reports(binary_experts, tmp_path):
    source, truth = binary_experts
    out = tmp_path / "out"
    assert fuse_masks.main(["--input_folder", str(source), "--output_folder", str(out), "--save_probabilities"]) == 0
    fused = images.read_mask(out / "a.png")
    raw = images.read_image(out / "a.png")[..., 0]
    assert set(np.unique(raw)) <= {0, 255}
    masks = [images.read_mask(source / f"expert{e}" / "a.png") for e in (1, 2, 3)]
    np.testing.assert_array_equal(fused, staple_binary(masks).labels)
    np.testing.assert_array_equal(images.read_mask(out / "agreement" / "a.png", binary_255=False), sum(masks))
    probabilities = images.read_image(out / "probabilities" / "a.tif")
    assert probabilities.dtype == np.float32 and probabilities.shape == truth.shape + (1,)
    rows = read_csv(out / PER_IMAGE_CSV)
    assert [(r["image"], r["expert"]) for r in rows] == [(k, f"expert{e}") for k in "ab" for e in (1, 2, 3)]
    assert list(rows[0])[:8] == ["image", "expert", "mask_file", "n_experts", "dice", "sensitivity", "specificity",
                                 "iterations"]
    summary = read_csv(out / SUMMARY_CSV)
    assert [s["expert"] for s in summary] == ["expert1", "expert2", "expert3"]
    assert float(summary[0]["dice_mean"]) > float(summary[2]["dice_mean"])
    settings = json.loads((out / SETTINGS_JSON).read_text())
    assert settings["mask_type"] == "binary" and settings["tolerance"] == 1e-7
    assert not list(tmp_path.glob(".out.partial-*"))


def test_cli_multiclass_majority_vote_tif_to_png(tmp_path):
    rng = np.random.default_rng(4)
    truth = structured((32, 40), n_classes=3)
    experts = {f"e{e}": {"img": m} for e, m in enumerate(noisy_copies(truth, [0.1, 0.1, 0.2], 3, rng))}
    source = write_experts(tmp_path / "in", experts, suffix=".tif")
    out = tmp_path / "out"
    code = fuse_masks.main(["--input_folder", str(source), "--output_folder", str(out), "--method", "majority_vote",
                            "--mask_type", "multiclass", "--output_format", "png", "--undecided_label", "0"])
    assert code == 0
    expected = majority_vote(list(next(iter(e.values())) for e in experts.values())).labels
    np.testing.assert_array_equal(images.read_mask(out / "img.png"), expected)
    rows = read_csv(out / PER_IMAGE_CSV)
    assert {"dice_class_1", "dice_class_2"} <= set(rows[0]) and "sensitivity" not in rows[0]


def test_cli_instances_are_relabelled(tmp_path):
    instances = np.zeros((20, 20), np.uint8)
    instances[2:10, 2:10], instances[2:10, 10:18], instances[12:18, 4:16] = 1, 2, 3
    source = write_experts(tmp_path / "in", {f"e{e}": {"cells": instances} for e in range(3)})
    out = tmp_path / "out"
    assert fuse_masks.main(["--input_folder", str(source), "--output_folder", str(out), "--quiet"]) == 0
    fused = images.read_mask(out / "cells.png", binary_255=False)
    assert int(fused.max()) == 3
    rows = read_csv(out / PER_IMAGE_CSV)
    assert [float(r["f1_iou50"]) for r in rows] == [1.0, 1.0, 1.0]


def test_cli_warns_about_missing_expert_and_fuses_the_rest(binary_experts, tmp_path, caplog):
    source, _ = binary_experts
    (source / "expert2" / "b.png").unlink()
    with caplog.at_level(logging.INFO, logger="lib.fusion"):
        assert fuse_masks.main(["--input_folder", str(source), "--output_folder", str(tmp_path / "out")]) == 0
    assert "expert expert2 has no mask for 1 image(s): b" in caplog.text
    rows = read_csv(tmp_path / "out" / PER_IMAGE_CSV)
    assert [r["expert"] for r in rows if r["image"] == "b"] == ["expert1", "expert3"]
    assert {r["n_experts"] for r in rows if r["image"] == "b"} == {"2"}


def assert_nothing_written(tmp_path: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}.partial")]


@pytest.mark.parametrize("damage, messages", [
    (lambda src: [p.unlink() for p in (src / "expert2").iterdir()] and None,
     ["expert folder must hold mask files", "expert2"]),
    (lambda src: [(src / "expert2" / "a.png").unlink(), (src / "expert3" / "a.png").unlink()],
     ["image 'a' must have masks from at least two experts; got only expert1", "expert1/a.png"]),
    (lambda src: images.write_image(src / "expert3" / "b.png", np.zeros((40, 50), np.uint8)),
     ["masks of image 'b' must all have the same shape; got 40x48 (HxW) in", "expert1/b.png", "40x50 in",
      "expert3/b.png"]),
    (lambda src: (src / "expert1" / "b.png").write_bytes(b"not an image"), ["unreadable mask", "expert1/b.png"]),
])
def test_cli_layout_errors_stop_before_writing(binary_experts, tmp_path, capsys, damage, messages):
    source, _ = binary_experts
    damage(source)
    out = tmp_path / "out"
    assert fuse_masks.main(["--input_folder", str(source), "--output_folder", str(out)]) == 2
    error = capsys.readouterr().err
    for message in messages:
        assert message in error
    assert_nothing_written(tmp_path, out)


def test_cli_single_expert_is_an_error(tmp_path, capsys):
    source = write_experts(tmp_path / "in", {"only": {"a": np.zeros((4, 4), np.uint8)}})
    assert fuse_masks.main(["--input_folder", str(source), "--output_folder", str(tmp_path / "out")]) == 2
    assert "at least two; got 1 (only)" in capsys.readouterr().err
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_cli_value_error_midway_leaves_outputs_untouched(binary_experts, tmp_path, capsys):
    source, _ = binary_experts
    images.write_image(source / "expert3" / "b.png", np.full((40, 48), 2, np.uint8))  # not binary
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    assert fuse_masks.main(["--input_folder", str(source), "--output_folder", str(out)]) == 2
    error = capsys.readouterr().err
    assert "binary mask values must be 0 and 1" in error and "expert3/b.png" in error
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial")]


@pytest.mark.parametrize("extra, message", [
    (["--max_iterations", "0"], "--max_iterations must be >= 1"),
    (["--tolerance", "-1"], "--tolerance must be a finite number > 0"),
    (["--undecided_label", "-3"], "--undecided_label must be in 0..65535"),
    (["--method", "mean"], "invalid choice: 'mean'"),
])
def test_cli_misuse_exits_2(binary_experts, tmp_path, capsys, extra, message):
    source, _ = binary_experts
    with pytest.raises(SystemExit) as info:
        fuse_masks.parse_args(["--input_folder", str(source), "--output_folder", str(tmp_path / "out")] + extra)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_cli_rejects_output_inside_input_and_missing_input(binary_experts, tmp_path, capsys):
    source, _ = binary_experts
    for argv, message in ((["--input_folder", str(source), "--output_folder", str(source / "fused")],
                           "--output_folder must not be inside --input_folder"),
                          (["--input_folder", str(tmp_path / "nope"), "--output_folder", str(tmp_path / "out")],
                           "--input_folder must be an existing folder")):
        with pytest.raises(SystemExit) as info:
            fuse_masks.main(argv)
        assert info.value.code == 2 and message in capsys.readouterr().err


def test_fuse_folder_rejects_bad_settings(binary_experts, tmp_path):
    source, _ = binary_experts
    for chosen, output, message in (({"method": "mean"}, tmp_path / "out", "method must be one of"),
                                    ({"mask_type": "x"}, tmp_path / "out", "mask_type must be"),
                                    ({"undecided_label": -1}, tmp_path / "out", "undecided_label must be"),
                                    ({}, source / "x", "must not be inside input_folder"),
                                    ({}, source.parent, "must not contain input_folder")):
        with pytest.raises(ValueError, match=message):
            fuse_folder(source, output, FusionConfig(**chosen))


def test_cli_help_is_instant_and_imports_no_tensorflow():
    code = ("import sys, fuse_masks\n"
            "try:\n    fuse_masks.parse_args(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'tensorflow' not in sys.modules and 'SimpleITK' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "--input_folder" in done.stdout and "--undecided_label" in done.stdout


def test_cli_merges_into_an_existing_output_folder(binary_experts, tmp_path):
    source, _ = binary_experts
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    assert fuse_masks.main(["--input_folder", str(source), "--output_folder", str(out), "--quiet"]) == 0
    assert {"keep.txt", "a.png", "b.png", "agreement", PER_IMAGE_CSV} <= {p.name for p in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial")]


def test_more_instances_than_png_holds_are_written_as_tif(tmp_path, caplog):
    dots = np.zeros((512, 512), np.uint8)
    dots[::2, ::2] = 1  # 65536 separate one-pixel objects: uint32 ids
    source = write_experts(tmp_path / "in", {"e1": {"dots": dots}, "e2": {"dots": dots}})
    with caplog.at_level(logging.WARNING, logger="lib.fusion"):
        fuse_folder(source, tmp_path / "out", FusionConfig(mask_type="instance"))
    assert "PNG cannot hold" in caplog.text
    fused = images.read_mask(tmp_path / "out" / "dots.tif")
    assert fused.dtype == np.uint32 and int(fused.max()) == 65536


# Errors, settings, file modes (the redesign's rules)


@pytest.mark.parametrize("umask, file_mode, folder_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_outputs_get_the_umask_mode(binary_experts, tmp_path, monkeypatch, umask, file_mode, folder_mode):

    source, _ = binary_experts
    out = tmp_path / "out"
    previous = os.umask(umask)
    try:
        fuse_folder(source, out, FusionConfig(save_probabilities=True))
    finally:
        os.umask(previous)
    written = sorted(p for p in out.rglob("*") if p.is_file())
    assert {p.relative_to(out).as_posix() for p in written} >= {
        "a.png", "b.png", "agreement/a.png", "probabilities/b.tif", PER_IMAGE_CSV, SUMMARY_CSV, SETTINGS_JSON}
    assert {oct(p.stat().st_mode & 0o777) for p in written} == {oct(file_mode)}
    assert oct(out.stat().st_mode & 0o777) == oct(folder_mode)  # the staging folder renamed into place


def test_fusion_config_lists_every_problem_and_is_bad_input():
    with pytest.raises(ConfigError) as info:
        FusionConfig(method="mean", max_iterations=0, tolerance=-1.0, undecided_label=70000, output_format="jpg")
    assert len(info.value.violations) == 5
    assert info.value.exit_code == EXIT_BAD_INPUT and isinstance(info.value, ValueError)
    assert FusionConfig(mask_type="multiclass").resolved_tolerance("multiclass") == DEFAULT_TOLERANCE["multiclass"]


def test_mask_errors_are_bad_input(binary_experts, tmp_path):
    assert issubclass(FusionError, BadInput) and issubclass(FusionError, ValueError)
    source, _ = binary_experts
    (source / "expert2" / "a.png").unlink()
    (source / "expert3" / "a.png").unlink()
    with pytest.raises(MaskLayoutError) as info:
        fuse_folder(source, tmp_path / "out")
    assert info.value.exit_code == EXIT_BAD_INPUT and len(info.value.problems) == 1


def test_cli_unreadable_mask_midway_exits_2(binary_experts, tmp_path, capsys, monkeypatch):
    source, _ = binary_experts

    def broken(path, binary_255=True):
        raise images.ImageReadError(f"cannot read {path}: truncated")

    monkeypatch.setattr(images, "read_mask", broken)
    assert fuse_masks.main(["--input_folder", str(source), "--output_folder", str(tmp_path / "out")]) == 2
    assert "unreadable mask: cannot read" in capsys.readouterr().err
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_fusion_imports_neither_tensorflow_nor_training():
    code = ("import sys, lib.fusion.runner\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')\n"
            "             or m.startswith(('lib.training', 'lib.inference', 'lib.reader', 'lib.models')))\n"
            "assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
