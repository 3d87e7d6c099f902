"""Tests of lib/scoring/reports.py: metrics rows, instance rows, the one CSV writer."""

from __future__ import annotations

import os

import numpy as np
import pytest

from lib.scoring import metrics, reports


def test_metrics_row_from_a_confusion_matrix():
    cm = np.array([[3, 1], [0, 4]])
    row = reports.metrics_row("img", cm)
    assert row["image"] == "img" and row["pixels"] == 8 and row["pixel_accuracy"] == 7 / 8
    assert row["iou_0"] == 3 / 4 and row["iou_1"] == 4 / 5 and row["dice_1"] == 8 / 9
    assert reports.evaluate_labels(np.array([[0, 1]]), np.array([[0, 0]]), 2).tolist() == [[1, 1], [0, 0]]


def test_evaluate_instances_and_rows():
    true = np.array([[1, 1, 0, 2, 2]])
    pred = np.array([[3, 3, 0, 0, 4]])
    matching, cm = reports.evaluate_instances(pred, true, (0.5,))
    assert cm.tolist() == [[1, 0], [1, 3]]
    rows = reports.instance_metrics_rows("img", matching.stats)
    assert list(rows[0]) == list(reports.INSTANCE_METRIC_FIELDS)
    assert (rows[0]["tp"], rows[0]["fp"], rows[0]["fn"]) == (2, 0, 0)  # 1 of 2 pixels: IoU exactly 0.5 matches
    with pytest.raises(ValueError, match="mask size must equal the image size"):
        reports.evaluate_instances(pred, true[:, :4])


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_write_csv_cells_and_mode(tmp_path, monkeypatch, umask, mode):
    previous = os.umask(umask)
    try:
        path = reports.write_csv(tmp_path / "sub" / "t.csv", [{"a": 1, "b": float("nan"), "c": 1 / 3},
                                                              {"a": "x", "b": float("inf"), "c": 2.0}])
        empty = reports.write_csv(tmp_path / "empty.csv", [])
    finally:
        os.umask(previous)
    assert path.read_text().splitlines() == ["a,b,c", "1,,0.333333", "x,,2"]
    assert empty.read_text() == ""
    assert os.stat(path).st_mode & 0o777 == mode and os.stat(empty).st_mode & 0o777 == mode
    assert [p.name for p in path.parent.iterdir()] == ["t.csv"]
    with pytest.raises(ValueError, match="rows must only hold the columns a; got b in row 1"):
        reports.write_csv(tmp_path / "bad.csv", [{"a": 1}, {"a": 2, "b": 3}])
    assert not (tmp_path / "bad.csv").exists()


def test_associations_of_an_image_without_objects_have_a_header(tmp_path):
    matching = metrics.match_instances(np.zeros((2, 2), int), np.zeros((2, 2), int), (0.5,))
    path = reports.write_associations(tmp_path / "a.csv", reports.associations_rows(matching, "img"))
    assert path.read_text().splitlines() == [",".join(reports.ASSOCIATION_FIELDS)]
