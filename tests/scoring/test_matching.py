"""Tests of instance matching (lib/scoring/metrics.py) and its reports (lib/scoring/reports.py).

Hand-computed cases with exact expected values, brute force on seeded random label images
as an oracle, and every error raised.
"""

from __future__ import annotations

import csv
import itertools
import math

import numpy as np
import pytest

from lib.common import pictures
from lib.scoring import metrics, reports

NAN = float("nan")
STAT_FIELDS = ("tp", "fp", "fn", "precision", "recall", "f1", "accuracy", "panoptic_quality", "mean_matched_iou")


def row(*values) -> np.ndarray:
    """A (1, N) label image."""
    return np.array([values], np.int32)


# Hand-computed cases: true, pred, thresholds, {threshold: (tp, fp, fn, precision, recall, f1,
# accuracy, PQ, mean matched IoU)} or the error raised.
MATCH_CASES = {
    "identical": (row(1, 1, 0, 2, 2, 2), row(1, 1, 0, 2, 2, 2), (0.3, 0.5, 0.75),
                  {t: (2, 0, 0, 1, 1, 1, 1, 1, 1) for t in (0.3, 0.5, 0.75)}),
    "permuted ids": (row(1, 1, 0, 2, 2, 2), row(7, 7, 0, 3, 3, 3), (0.5,), {0.5: (2, 0, 0, 1, 1, 1, 1, 1, 1)}),
    "empty prediction": (row(1, 1, 0, 2), row(0, 0, 0, 0), (0.5,), {0.5: (0, 0, 2, NAN, 0, 0, 0, 0, NAN)}),
    "empty truth": (row(0, 0, 0, 0), row(1, 0, 3, 3), (0.5,), {0.5: (0, 2, 0, 0, NAN, 0, 0, 0, NAN)}),
    "both empty": (row(0, 0, 0), row(0, 0, 0), (0.5,), {0.5: (0, 0, 0, NAN, NAN, NAN, NAN, NAN, NAN)}),
    # One true object (6 px), two predictions: IoU 4/6 and 2/6; only one can match.
    # At 0.3: P 1/2, R 1, F1 2/3, accuracy 1/2, PQ (2/3)/(1 + 1/2 + 0) = 4/9.
    "one true, two predictions": (row(1, 1, 1, 1, 1, 1), row(1, 1, 1, 1, 2, 2), (0.3, 0.5, 0.75),
                                  {0.3: (1, 1, 0, 1 / 2, 1, 2 / 3, 1 / 2, 4 / 9, 2 / 3),
                                   0.5: (1, 1, 0, 1 / 2, 1, 2 / 3, 1 / 2, 4 / 9, 2 / 3),
                                   0.75: (0, 2, 1, 0, 0, 0, 0, 0, NAN)}),
    # 2 px shared of a 4 px union: IoU exactly 0.5 matches at 0.5 (>=). PQ 0.5/1.
    "IoU exactly 0.5": (row(1, 1, 1, 0), row(0, 2, 2, 2), (0.5, 0.75),
                        {0.5: (1, 0, 0, 1, 1, 1, 1, 0.5, 0.5), 0.75: (0, 1, 1, 0, 0, 0, 0, 0, NAN)}),
    # Two halves of one object: both IoU exactly 0.5, one match; PQ 0.5/(1 + 1/2).
    "two halves at 0.5": (row(1, 1), row(1, 2), (0.5,), {0.5: (1, 1, 0, 1 / 2, 1, 2 / 3, 1 / 2, 1 / 3, 0.5)}),
    "IoU 1/3": (row(1, 1, 0), row(0, 1, 1), (0.3, 0.5),
                {0.3: (1, 0, 0, 1, 1, 1, 1, 1 / 3, 1 / 3), 0.5: (0, 1, 1, 0, 0, 0, 0, 0, NAN)}),
    # A (10 px) and B (1 px); Y = 1 px of A (IoU 1/10), X = the other 9 px of A and B
    # (IoU 9/11 with A, 1/10 with B). At 0.1 the most pairs: A-Y and B-X, not A-X alone.
    "most pairs before most IoU": (row(*[1] * 10, 2), row(5, *[8] * 10), (0.1, 0.5),
                                   {0.1: (2, 0, 0, 1, 1, 1, 1, 0.2 / 2, 0.1),
                                    0.5: (1, 1, 1, 1 / 2, 1 / 2, 1 / 2, 1 / 3, (9 / 11) / 2, 9 / 11)}),
    "one threshold as a number": (row(1, 1, 0), row(0, 1, 1), 0.3, {0.3: (1, 0, 0, 1, 1, 1, 1, 1 / 3, 1 / 3)}),
    "bool labels": (np.array([[True, False]]), np.array([[True, True]]), (0.5,),
                    {0.5: (1, 0, 0, 1, 1, 1, 1, 0.5, 0.5)}),
    "shapes differ": (row(1, 1), row(1, 1, 1), (0.5,), ValueError("true and pred must have one shape")),
    "float labels": (row(1, 1).astype(np.float32), row(1, 1), (0.5,), ValueError("true must be an integer label")),
    "negative ids": (row(1, 1), row(-1, 1), (0.5,), ValueError("pred must hold ids >= 0")),
    "1-D labels": (np.array([1, 1]), np.array([1, 1]), (0.5,), ValueError("true must be a 2-D")),
    "4-D labels": (np.ones((1, 1, 1, 2), int), np.ones((1, 1, 1, 2), int), (0.5,), ValueError("true must be a 2-D")),
    "threshold 0": (row(1), row(1), (0.0, 0.5), ValueError(r"thresholds must be in \(0, 1\]; got \[0.0\]")),
    "threshold above 1": (row(1), row(1), (1.5,), ValueError(r"thresholds must be in \(0, 1\]; got \[1.5\]")),
    "threshold NaN": (row(1), row(1), (NAN,), ValueError(r"thresholds must be in \(0, 1\]; got \[nan\]")),
    "no threshold": (row(1), row(1), (), ValueError("thresholds must hold at least one")),
    "repeated threshold": (row(1), row(1), (0.5, 0.5), ValueError("thresholds must be distinct")),
    "threshold not a number": (row(1), row(1), ("half",), ValueError("thresholds must be numbers")),
}


@pytest.mark.parametrize("true, pred, thresholds, expected", MATCH_CASES.values(), ids=MATCH_CASES.keys())
def test_match_instances_hand_computed(true, pred, thresholds, expected):
    if isinstance(expected, Exception):
        with pytest.raises(type(expected), match=str(expected)):
            metrics.match_instances(true, pred, thresholds)
        return
    matching = metrics.match_instances(true, pred, thresholds)
    assert matching.thresholds == tuple(sorted(expected))
    for t, values in expected.items():
        stats = matching.stats[t]
        got = tuple(getattr(stats, name) for name in STAT_FIELDS)
        assert got == pytest.approx(values, rel=1e-12, nan_ok=True), t
        assert (stats.threshold, stats.n_true, stats.n_pred) == (t, stats.tp + stats.fn, stats.tp + stats.fp)
        assert stats.sum_matched_iou == pytest.approx(float(np.sum(matching.matched_iou[t])), rel=1e-12)
        assert len(matching.matched[t]) + len(matching.unmatched_true[t]) == stats.n_true
        assert len(matching.matched[t]) + len(matching.unmatched_pred[t]) == stats.n_pred


def test_matched_pairs_and_leftovers():
    matching = metrics.match_instances(row(*[1] * 10, 2), row(5, *[8] * 10), (0.5, 0.1))
    assert matching.thresholds == (0.1, 0.5)
    assert matching.pairs == [(1, 5, 0.1), (2, 8, 0.1)]
    np.testing.assert_array_equal(matching.matched[0.5], [[1, 8]])
    np.testing.assert_array_equal(matching.matched_iou[0.5], [9 / 11])
    np.testing.assert_array_equal(matching.unmatched_true[0.5], [2])
    np.testing.assert_array_equal(matching.unmatched_pred[0.5], [5])
    assert matching.unmatched_true[0.1].size == 0 and matching.unmatched_pred[0.1].size == 0
    assert matching.stats[0.5].as_dict() == {
        "threshold": 0.5, "tp": 1, "fp": 1, "fn": 1, "n_true": 2, "n_pred": 2, "precision": 0.5, "recall": 0.5,
        "accuracy": 1 / 3, "f1": 0.5, "panoptic_quality": (9 / 11) / 2, "mean_matched_iou": 9 / 11,
        "sum_matched_iou": 9 / 11}


def test_overlaps_hand_computed():
    true = np.array([[3, 3, 0],
                     [3, 9, 9]], np.uint16)
    pred = np.array([[4, 4, 4],
                     [0, 4, 1]], np.uint16)
    found = metrics.overlaps(true, pred)
    np.testing.assert_array_equal(found.true_ids, [3, 9])
    np.testing.assert_array_equal(found.pred_ids, [1, 4])
    np.testing.assert_array_equal(found.true_areas, [3, 2])
    np.testing.assert_array_equal(found.pred_areas, [1, 4])
    # 3 with 4: 2 shared of 5; 9 with 4: 1 of 5; 9 with 1: 1 of 2.
    np.testing.assert_array_equal(found.dense(), [[0, 2 / 5], [1 / 2, 1 / 5]])
    np.testing.assert_array_equal(found.sparse().toarray(), found.dense())
    assert sorted(zip(found.true_index.tolist(), found.pred_index.tolist(), found.intersections.tolist())) == [
        (0, 1, 2), (1, 0, 1), (1, 1, 1)]


def test_large_non_consecutive_ids():
    true = np.array([[70000, 70000, 0, 5],
                     [70000, 0, 5, 5]], np.uint32)
    pred = np.array([[4_000_000_000, 4_000_000_000, 0, 0],
                     [4_000_000_000, 0, 9, 9]], np.uint32)
    matching = metrics.match_instances(true, pred, (0.5, 0.75))
    assert matching.pairs == [(5, 9, 2 / 3), (70000, 4_000_000_000, 1.0)]
    assert matching.stats[0.75].tp == 1
    np.testing.assert_array_equal(matching.unmatched_true[0.75], [5])
    np.testing.assert_array_equal(matching.unmatched_pred[0.75], [9])
    assert matching.stats[0.5].panoptic_quality == pytest.approx((1 + 2 / 3) / 2, rel=1e-12)


def test_3d_labels():
    true = np.zeros((2, 2, 3), np.int32)
    true[0, :, :2] = 1  # 4 voxels
    true[1] = 2  # 6 voxels
    pred = np.zeros_like(true)
    pred[0] = 3  # 6 voxels, 4 of them object 1's: IoU 4/6
    pred[1, :, :1] = 4  # 2 voxels inside object 2: IoU 2/6
    matching = metrics.match_instances(true, pred, (0.3, 0.5))
    assert matching.pairs == [(1, 3, 2 / 3), (2, 4, 1 / 3)]
    assert (matching.stats[0.5].tp, matching.stats[0.5].fp, matching.stats[0.5].fn) == (1, 1, 1)


def test_pooled_statistics_are_not_the_mean_of_per_image_ones():
    one = metrics.match_instances(row(1, 1, 0), row(2, 2, 0), (0.5,))  # F1 1
    two = metrics.match_instances(row(1, 0, 2, 0, 3), row(0, 0, 0, 0, 0), (0.5,))  # F1 0, precision NaN
    pooled = metrics.pool_stats([one, two])[0.5]
    # Mean of per-image F1s would be 1/2; pooled: TP 1 of 4 true and 1 predicted, F1 2/5.
    assert (pooled.tp, pooled.fp, pooled.fn, pooled.n_true, pooled.n_pred) == (1, 0, 3, 4, 1)
    assert (pooled.precision, pooled.recall, pooled.f1, pooled.accuracy) == (1.0, 0.25, 0.4, 0.25)
    assert (pooled.panoptic_quality, pooled.mean_matched_iou) == (1 / 2.5, 1.0)
    assert metrics.pool_stats([one.stats, two.stats]) == metrics.pool_stats([one, two])


POOL_ERRORS = [
    ([], "items must hold at least one matching"),
    ([metrics.match_instances(row(1), row(1), (0.5,)), metrics.match_instances(row(1), row(1), (0.3, 0.5))],
     r"items must all be matched at the same thresholds; got \[0.5\] for item 0 and \[0.3, 0.5\] for item 1"),
]


@pytest.mark.parametrize("items, message", POOL_ERRORS)
def test_pool_stats_errors(items, message):
    with pytest.raises(ValueError, match=message):
        metrics.pool_stats(items)


def brute_force_iou(true: np.ndarray, pred: np.ndarray) -> tuple[list[int], list[int], np.ndarray]:
    true_ids = sorted(set(true.ravel().tolist()) - {0})
    pred_ids = sorted(set(pred.ravel().tolist()) - {0})
    iou = np.zeros((len(true_ids), len(pred_ids)))
    for i, a in enumerate(true_ids):
        for j, b in enumerate(pred_ids):
            iou[i, j] = np.sum((true == a) & (pred == b)) / np.sum((true == a) | (pred == b))
    return true_ids, pred_ids, iou


def brute_force_best(iou: np.ndarray, threshold: float) -> tuple[int, float]:
    """(most pairs, largest total IoU among those) over every one-to-one assignment."""
    best = (0, 0.0)
    n_true, n_pred = iou.shape
    for size in range(1, min(n_true, n_pred) + 1):
        for rows in itertools.combinations(range(n_true), size):
            for columns in itertools.permutations(range(n_pred), size):
                values = [iou[r, c] for r, c in zip(rows, columns)]
                if min(values) >= threshold:
                    best = max(best, (size, sum(values)))
    return best


@pytest.mark.parametrize("force_sorting", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_against_brute_force(seed, force_sorting, monkeypatch):
    if force_sorting:  # the np.unique paths taken for huge ids or object counts
        monkeypatch.setattr(metrics, "_LOOKUP_FACTOR", 0)
        monkeypatch.setattr(metrics, "_LOOKUP_MINIMUM", 0)
    rng = np.random.default_rng(seed)
    true = rng.integers(0, 5, (5, 6)) * 11
    pred = rng.integers(0, 5, (5, 6)) + 100
    pred[rng.random(pred.shape) < 0.3] = 0
    true_ids, pred_ids, iou = brute_force_iou(true, pred)
    found = metrics.overlaps(true, pred)
    assert (found.true_ids.tolist(), found.pred_ids.tolist()) == (true_ids, pred_ids)
    np.testing.assert_allclose(found.dense(), iou, rtol=1e-12)
    matching = metrics.match_instances(true, pred, (0.05, 0.15, 0.25, 0.5))
    for t in matching.thresholds:
        count, total = brute_force_best(iou, t)
        assert matching.stats[t].tp == count
        assert matching.stats[t].sum_matched_iou == pytest.approx(total, rel=1e-12)
        pairs = matching.matched[t]
        assert len(set(pairs[:, 0].tolist())) == len(set(pairs[:, 1].tolist())) == len(pairs)
        assert np.all(matching.matched_iou[t] >= t)


def test_many_objects_through_the_pair_table_fallback():
    # 10000 one-pixel objects: the (true x pred) table would hold 10^8 entries, so codes are sorted.
    rng = np.random.default_rng(5)
    true = np.arange(1, 10001).reshape(100, 100)
    pred = rng.permutation(true.ravel()).reshape(100, 100) * 3
    matching = metrics.match_instances(true, pred, (0.5,))
    assert matching.stats[0.5].tp == 10000 and matching.stats[0.5].panoptic_quality == 1.0
    np.testing.assert_array_equal(matching.matched[0.5][:, 1], pred.ravel()[np.argsort(true.ravel())])


# Reports


def test_associations_rows_and_csv(tmp_path):
    true = row(1, 1, 1, 1, 1, 1, 0, 4, 4)
    pred = row(1, 1, 1, 1, 2, 2, 0, 0, 0)
    matching = metrics.match_instances(true, pred, (0.3, 0.75))
    rows = reports.associations_rows(matching, "img_01")
    assert [tuple(r.values()) for r in rows][1:] == [
        ("img_01", 0.3, 4, "", rows[1]["iou"], "missed"), ("img_01", 0.3, "", 2, rows[2]["iou"], "false_positive")]
    assert rows[0] == {"image": "img_01", "threshold": 0.3, "true_id": 1, "pred_id": 1, "iou": 4 / 6,
                       "status": "matched"}
    assert math.isnan(rows[1]["iou"]) and math.isnan(rows[2]["iou"])
    strict = reports.associations_rows(matching, "img_01", threshold=0.75)
    assert [(r["true_id"], r["pred_id"], r["status"]) for r in strict] == [
        (1, "", "missed"), (4, "", "missed"), ("", 1, "false_positive"), ("", 2, "false_positive")]
    path = reports.write_associations(tmp_path / "out" / "associations.csv", rows)
    assert path.read_text().splitlines() == ["image,threshold,true_id,pred_id,iou,status",
                                             "img_01,0.3,1,1,0.666667,matched", "img_01,0.3,4,,,missed",
                                             "img_01,0.3,,2,,false_positive"]
    assert [p.name for p in path.parent.iterdir()] == ["associations.csv"]  # no temporary left
    empty = reports.write_associations(tmp_path / "empty.csv", [])
    assert list(csv.reader(empty.open())) == [list(reports.ASSOCIATION_FIELDS)]


REPORT_ERRORS = [
    (lambda m: reports.associations_rows(m, "a", threshold=0.4),
     r"threshold must be one of the matching's thresholds 0.3, 0.75; got 0.4"),
    (lambda m: reports.write_associations("unused.csv", [{"image": "a", "colour": "red"}]),
     "rows must only hold the columns image, threshold, true_id, pred_id, iou, status; got colour in row 0"),
    (lambda m: reports.matching_overlay(np.zeros((1, 9)), row(1), row(1), m, 0.3),
     r"must have one height and width; got \(1, 9\), \(1, 1\) and \(1, 1\)"),
    (lambda m: reports.matching_overlay(np.zeros((1, 1)), row(1), row(1), m, 0.5),
     "threshold must be one of"),
    (lambda m: pictures.save_png("unused.png", np.zeros((2, 2, 3), np.float32)),
     r"rgb must be an \(H, W, 3\) uint8 picture; got float32 of shape \(2, 2, 3\)"),
    (lambda m: pictures.grey_display(np.zeros((1, 1, 1, 1))), r"image must be \(H, W\) or \(H, W, C\)"),
]


@pytest.mark.parametrize("call, message", REPORT_ERRORS)
def test_report_errors(call, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    matching = metrics.match_instances(row(1), row(1), (0.3, 0.75))
    with pytest.raises(ValueError, match=message):
        call(matching)
    assert list(tmp_path.iterdir()) == []


def test_grey_display_stretches_percentiles():
    # 201 values 0..200: the 0.5th percentile is 1, the 99.5th 199; 100 -> 99/198 = 0.5 -> 127.5 -> 128.
    image = np.arange(201, dtype=np.uint16).reshape(1, 201)
    grey = pictures.grey_display(image)
    assert (grey[0, 0], grey[0, 1], grey[0, 100], grey[0, 199], grey[0, 200]) == (0, 0, 128, 255, 255)
    np.testing.assert_array_equal(pictures.grey_display(np.repeat(image[..., None], 3, axis=2)), grey)
    np.testing.assert_array_equal(pictures.grey_display(np.full((2, 2), 7.5)), np.zeros((2, 2)))


def test_matching_overlay_colours(tmp_path):
    true = np.zeros((8, 8), np.int32)
    true[1:4, 1:4] = 1  # matched by prediction 9
    true[5:7, 5:7] = 2  # missed
    pred = np.zeros_like(true)
    pred[1:4, 1:4] = 9
    pred[5:7, 0:2] = 4  # false positive
    image = np.zeros((8, 8, 2), np.float64)  # constant: grey 0
    matching = metrics.match_instances(true, pred, (0.5,))
    rgb = reports.matching_overlay(image, true, pred, matching, 0.5)
    assert rgb.shape == (8, 8, 3) and rgb.dtype == np.uint8
    # One colour vocabulary (lib.common.pictures): green matched, magenta false positive, blue missed.
    assert tuple(rgb[1, 1]) == tuple(rgb[3, 2]) == pictures.TRUE_POSITIVE == (0, 200, 0)  # matched outline
    assert tuple(rgb[2, 2]) == (0, 90, 0)  # inside it: tinted, 0.45 * 200
    assert tuple(rgb[5, 5]) == tuple(rgb[6, 6]) == (0, 54, 115)  # missed: 0.45 * (0, 120, 255)
    assert tuple(rgb[5, 0]) == tuple(rgb[6, 1]) == pictures.FALSE_POSITIVE  # false-positive outline
    assert tuple(rgb[0, 7]) == (0, 0, 0)
    assert np.count_nonzero(rgb.any(axis=2)) == 9 + 4 + 4
    path = pictures.save_png(tmp_path / "overlay.png", rgb)
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(path)), rgb)
    assert [p.name for p in tmp_path.iterdir()] == ["overlay.png"]


def test_tie_break_is_the_largest_matched_iou_not_stardists():
    # 1-D row: true A = 1 (10 px), B = 2 (5 px); predicted X = 1 covers 8 px of A and all of B,
    # Y = 2 the other 2 px of A. IoU(A, X) = 8/15, IoU(B, X) = 5/13, IoU(A, Y) = 2/10, IoU(B, Y) = 0.
    true = row(*([1] * 10 + [2] * 5))
    pred = row(*([2] * 2 + [1] * 13))
    matching = metrics.match_instances(true, pred, (0.3,))
    assert matching.pairs == [(1, 1, 8 / 15)]  # one match at most (only X has candidates): the larger IoU
    # StarDist's cost over all pairs, -[IoU >= t] - IoU / (2 k), also counts the sub-threshold A-Y pair:
    # it assigns B-X and A-Y (5/13 + 2/10 > 8/15 + 0) and reports B-X, same count, smaller IoU.
    from scipy.optimize import linear_sum_assignment

    iou = metrics.overlaps(true, pred).dense()
    k = min(iou.shape)
    rows, columns = linear_sum_assignment(-(iou >= 0.3).astype(float) - iou / (2 * k))
    kept = iou[rows, columns] >= 0.3
    assert kept.sum() == matching.stats[0.3].tp == 1
    assert iou[rows, columns][kept].tolist() == [5 / 13]
