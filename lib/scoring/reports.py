"""Tables of scores: semantic and instance evaluation of label images, metrics rows, associations, CSV.

Scores come from confusion matrices (:mod:`.metrics`), so an overall row is computed from the
summed matrices of all images (pixels weigh the same wherever they are), not averaged over
per-image scores. Instance label images are matched object to object
(:func:`evaluate_instances`); their pooled statistics likewise sum the counts of all images.

* :func:`metrics_row` and :func:`instance_metrics_rows`: rows of metrics.csv and
  instance_metrics.csv.
* :func:`associations_rows`: for one image at one threshold, every true object (matched to
  which prediction, with which IoU, or missed) and every false-positive prediction.
* :func:`write_csv` writes any such rows atomically (:mod:`lib.common.files`).
* :func:`matching_overlay` draws a matching on its image (colours: :mod:`lib.common.pictures`).
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..common.files import write_text
from ..common.pictures import instance_overlay
from .metrics import (
    DEFAULT_THRESHOLDS,
    InstanceMatching,
    MatchStats,
    confusion_matrix,
    majority_class,
    match_instances,
    match_instances_by_class,
    pool_stats,
    scores,
)

INSTANCE_METRIC_FIELDS = ("image", "threshold", "tp", "fp", "fn", "n_true", "n_pred", "precision", "recall",
                          "accuracy", "f1", "panoptic_quality", "mean_matched_iou")
ASSOCIATION_FIELDS = ("image", "threshold", "true_id", "pred_id", "iou", "status")
# The status column of the associations table.
MATCHED, MISSED, FALSE_POSITIVE = "matched", "missed", "false_positive"


def _check_same_size(labels: np.ndarray, mask: np.ndarray) -> None:
    if labels.shape != mask.shape:
        raise ValueError(f"mask size must equal the image size; got mask {mask.shape[0]}x{mask.shape[1]} for "
                         f"image {labels.shape[0]}x{labels.shape[1]} (HxW)")


# Semantic


def evaluate_labels(labels: np.ndarray, mask: np.ndarray, number_classes: int) -> np.ndarray:
    """Confusion matrix ``(K, K)`` int64 (rows: truth, columns: prediction) of ``labels`` (H, W) against ``mask`` (H, W).

    Raises ``ValueError`` when the shapes differ or the mask holds a class >= ``number_classes``.
    """
    _check_same_size(labels, mask)
    if mask.size and int(mask.max()) >= number_classes:
        raise ValueError(f"mask values must be < number_classes={number_classes} (the model's); got "
                         f"{int(mask.max())}")
    return confusion_matrix(mask, labels, number_classes)


def metrics_row(name: str, cm: np.ndarray) -> dict[str, object]:
    """One row of metrics.csv: pixels, accuracy, mean IoU/Dice and per-class IoU/Dice from ``cm`` (K, K)."""
    s = scores(cm)
    row: dict[str, object] = {"image": name, "pixels": int(cm.sum()), "pixel_accuracy": s["pixel_accuracy"],
                              "mean_iou": s["mean_iou"], "mean_foreground_iou": s["mean_foreground_iou"],
                              "mean_dice": s["mean_dice"]}
    for k, value in enumerate(s["iou"]):
        row[f"iou_{k}"] = value
    for k, value in enumerate(s["dice"]):
        row[f"dice_{k}"] = value
    return row


# Instances


def evaluate_instances(labels: np.ndarray, mask: np.ndarray, thresholds: Sequence[float] = DEFAULT_THRESHOLDS
                       ) -> tuple[InstanceMatching, np.ndarray]:
    """Instance matching and the foreground confusion matrix of instance ``labels`` (H, W) against ``mask`` (H, W).

    Both are instance label images (0 background, one id per object). Returns the matching at
    each IoU threshold (:func:`lib.scoring.metrics.match_instances`) and the 2 x 2 confusion matrix of
    background/object (``mask > 0`` against ``labels > 0``), so the semantic scores exist for
    instance models too. Raises ``ValueError`` when the shapes differ.
    """
    _check_same_size(labels, mask)
    matching = match_instances(mask, labels, thresholds)
    cm = confusion_matrix((mask > 0).astype(np.uint8), (labels > 0).astype(np.uint8), 2)
    return matching, cm


def instance_metrics_rows(name: str, stats: dict[float, MatchStats]) -> list[dict[str, object]]:
    """Rows of instance_metrics.csv for one image (or ``ALL``, pooled): one per IoU threshold, ascending.

    Columns :data:`INSTANCE_METRIC_FIELDS`; ratios are NaN (an empty cell) where undefined
    (e.g. precision with no predicted object).
    """
    rows = []
    for threshold in sorted(stats):
        values = stats[threshold].as_dict()
        rows.append({"image": name, **{k: values[k] for k in INSTANCE_METRIC_FIELDS[1:]}})
    return rows


def evaluate_instance_classes(labels: np.ndarray, pred_classes: dict[int, int], mask: np.ndarray,
                              mask_classes: np.ndarray, class_names: Sequence[str],
                              thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> dict[str, dict[str, dict]]:
    """Matching per class of a model with a class per instance against a two-channel truth (``mask`` ids,
    ``mask_classes`` the class of each pixel): ``{class name: {str(threshold): MatchStats.as_dict()}}`` for the
    object classes 1.. of ``class_names`` (background first). A true object's class is its pixels' majority."""
    _check_same_size(labels, mask)
    true_classes = majority_class(mask, mask_classes)
    found = match_instances_by_class(mask, true_classes, labels, pred_classes, range(1, len(class_names)),
                                     thresholds)
    return {class_names[c]: {str(t): s.as_dict() for t, s in m.stats.items()} for c, m in found.items()}


def with_class_rows(rows: list[dict[str, object]], records: dict[str, dict]) -> list[dict[str, object]]:
    """The rows of instance_metrics.csv, followed by per-class rows when the images' records hold
    ``instance_class_stats`` (models with a class per instance, two-channel masks).

    Then every row gets a ``class`` column: ``all`` for the class-agnostic rows above, the class name
    for the per-class rows (per image, then ``ALL`` pooled over the images). Otherwise ``rows`` as they are.
    """
    tables = {key: r["instance_class_stats"] for key, r in records.items() if r.get("instance_class_stats")}
    if not tables:
        return rows
    out = [{**row, "class": "all"} for row in rows]
    names = list(dict.fromkeys(name for table in tables.values() for name in table))
    pooled_rows = []
    for name in names:
        per_image = {key: {float(t): MatchStats(**d) for t, d in table[name].items()}
                     for key, table in tables.items() if name in table}
        for key, stats in per_image.items():
            out += [{**row, "class": name} for row in instance_metrics_rows(key, stats)]
        pooled_rows += [{**row, "class": name} for row in instance_metrics_rows("ALL", pool_stats(list(
            per_image.values())))]
    return out + pooled_rows


def associations_rows(matching: InstanceMatching, image_name: str,
                      threshold: float | None = None) -> list[dict[str, object]]:
    """Rows of the associations table of one image, with keys :data:`ASSOCIATION_FIELDS`.

    One row per true object, ascending by id: ``status`` "matched" with its ``pred_id`` and
    ``iou``, or "missed" with ``pred_id`` and ``iou`` empty (``""`` and NaN); then one row per
    unmatched prediction, ascending by id: "false_positive", ``true_id`` "" and ``iou`` NaN.
    ``threshold``: one of ``matching.thresholds``; default the lowest (``matching.pairs``).
    Raises ``ValueError`` for a threshold the matching was not computed at.
    """
    t = matching.thresholds[0] if threshold is None else matching.check_threshold(threshold)
    partner = dict(zip(matching.matched[t][:, 0].tolist(), zip(matching.matched[t][:, 1].tolist(),
                                                              matching.matched_iou[t].tolist())))
    rows: list[dict[str, object]] = []
    for true_id in matching.true_ids.tolist():
        if true_id in partner:
            pred_id, iou = partner[true_id]
            rows.append({"image": image_name, "threshold": t, "true_id": true_id, "pred_id": pred_id, "iou": iou,
                         "status": MATCHED})
        else:
            rows.append({"image": image_name, "threshold": t, "true_id": true_id, "pred_id": "",
                         "iou": float("nan"), "status": MISSED})
    for pred_id in matching.unmatched_pred[t].tolist():
        rows.append({"image": image_name, "threshold": t, "true_id": "", "pred_id": pred_id, "iou": float("nan"),
                     "status": FALSE_POSITIVE})
    return rows


def matching_overlay(image: np.ndarray, true: np.ndarray, pred: np.ndarray, matching: InstanceMatching,
                     threshold: float = 0.5, readable: bool = False) -> np.ndarray:
    """Picture of a matching on its image: (H, W, 3) uint8 (:func:`lib.common.pictures.instance_overlay`).

    Parameters
    ----------
    image : (H, W) or (H, W, C), any dtype.
    true, pred : (H, W) integer label images the matching was computed on (or one Z plane of
        the 3-D volumes: objects are drawn by id).
    matching : from :func:`lib.scoring.metrics.match_instances`.
    threshold : one of ``matching.thresholds``.

    Raises ``ValueError`` when the shapes differ or the threshold was not matched at.
    """
    t = matching.check_threshold(threshold)
    return instance_overlay(image, true, pred, matching.matched[t][:, 1], matching.unmatched_pred[t],
                            matching.unmatched_true[t], readable=readable)


# CSV


def _cell(value: object) -> object:
    """Floats with 6 significant digits, NaN and infinities as an empty cell; the rest as is."""
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else ""
    return value


def write_csv(path: str | os.PathLike, rows: Sequence[dict[str, object]],
              fieldnames: Sequence[str] | None = None) -> Path:
    """Write ``rows`` as CSV atomically (:func:`lib.common.files.write_text`); return ``path``.

    Columns ``fieldnames`` (a header even without rows), default the keys of the first row
    (an empty file without rows). Floats with 6 significant digits, NaN as an empty cell.
    Raises ``ValueError`` when a row holds a key not among the columns.
    """
    columns = list(fieldnames if fieldnames is not None else rows[0] if rows else [])
    for number, row in enumerate(rows):
        extra = sorted(set(row) - set(columns))
        if extra:
            raise ValueError(f"rows must only hold the columns {', '.join(columns)}; got {', '.join(extra)} in "
                             f"row {number}. Pass fieldnames=")
    buffer = io.StringIO()
    if columns:
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(v) for k, v in row.items()})
    return write_text(path, buffer.getvalue())


def write_associations(path: str | os.PathLike, rows: Sequence[dict[str, object]]) -> Path:
    """:func:`write_csv` with the columns :data:`ASSOCIATION_FIELDS` (a header even for an image without objects)."""
    return write_csv(path, rows, ASSOCIATION_FIELDS)
