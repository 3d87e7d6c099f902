"""Evaluation of predicted label images against masks: metrics tables and overlay pictures.

Scores come from confusion matrices (:mod:`lib.metrics`), so the overall row is computed from
the summed matrices of all images (pixels weigh the same wherever they are), not averaged
over per-image scores. Instance label images are matched object to object
(:func:`evaluate_instances`); their pooled statistics likewise sum the counts of all images.
"""

from __future__ import annotations

import csv
import math
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from .metrics import InstanceMatching, MatchStats, confusion_matrix, match_instances, scores

# Overlay colours (RGB): correct foreground, foreground predicted on background (false
# positive), foreground predicted as background (false negative), wrong foreground class.
TRUE_POSITIVE = (0, 200, 0)
FALSE_POSITIVE = (230, 0, 230)
FALSE_NEGATIVE = (0, 120, 255)
WRONG_CLASS = (255, 200, 0)
OVERLAY_ALPHA = 0.45
# Longest side of an overlay; larger images are subsampled for the picture only.
OVERLAY_MAX_SIDE = 4096


def evaluate_labels(labels: np.ndarray, mask: np.ndarray, number_classes: int) -> np.ndarray:
    """Confusion matrix ``(K, K)`` int64 (rows: truth, columns: prediction) of ``labels`` (H, W) against ``mask`` (H, W).

    Raises ``ValueError`` when the shapes differ or the mask holds a class >= ``number_classes``.
    """
    if labels.shape != mask.shape:
        raise ValueError(f"mask size must equal the image size; got mask {mask.shape[0]}x{mask.shape[1]} for "
                         f"image {labels.shape[0]}x{labels.shape[1]} (HxW)")
    if mask.size and int(mask.max()) >= number_classes:
        raise ValueError(f"mask values must be < number_classes={number_classes} (the model's); got "
                         f"{int(mask.max())}")
    return confusion_matrix(mask, labels, number_classes)


def evaluate_instances(labels: np.ndarray, mask: np.ndarray, thresholds: Sequence[float] = (0.3, 0.5, 0.75)
                       ) -> tuple[InstanceMatching, np.ndarray]:
    """Instance matching and the foreground confusion matrix of instance ``labels`` (H, W) against ``mask`` (H, W).

    Both are instance label images (0 background, one id per object). Returns the matching at
    each IoU threshold (:func:`lib.scoring.metrics.match_instances`) and the 2 x 2 confusion matrix of
    background/object (``mask > 0`` against ``labels > 0``), so the semantic scores exist for
    instance models too. Raises ``ValueError`` when the shapes differ.
    """
    if labels.shape != mask.shape:
        raise ValueError(f"mask size must equal the image size; got mask {mask.shape[0]}x{mask.shape[1]} for "
                         f"image {labels.shape[0]}x{labels.shape[1]} (HxW)")
    matching = match_instances(mask, labels, thresholds)
    cm = confusion_matrix((mask > 0).astype(np.uint8), (labels > 0).astype(np.uint8), 2)
    return matching, cm


INSTANCE_METRIC_FIELDS = ("image", "threshold", "tp", "fp", "fn", "n_true", "n_pred", "precision", "recall",
                          "accuracy", "f1", "panoptic_quality", "mean_matched_iou")


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


def write_csv(path: str | os.PathLike, rows: Sequence[dict[str, object]],
              fieldnames: Sequence[str] | None = None) -> Path:
    """Write ``rows`` as CSV atomically; floats with 6 significant digits, NaN as an empty cell.

    Columns ``fieldnames`` (a header even without rows), default the keys of the first row
    (no file content at all without rows).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".partial.csv", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as handle:
            if rows or fieldnames is not None:
                writer = csv.DictWriter(handle, fieldnames=list(fieldnames if fieldnames is not None else rows[0]))
                writer.writeheader()
                for row in rows:
                    writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) and math.isfinite(v) else
                                         "" if isinstance(v, float) else v) for k, v in row.items()})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def display_image(image: np.ndarray) -> np.ndarray:
    """``image`` (H, W, C) of any dtype as (H, W, 3) uint8 for display: percentiles 0.5-99.5 per channel.

    One channel becomes grey; two channels fill red and green; more use the first three.
    """
    image = np.asarray(image, dtype=np.float32)
    low = np.percentile(image, 0.5, axis=(0, 1))
    high = np.percentile(image, 99.5, axis=(0, 1))
    scaled = np.clip((image - low) / np.where(high > low, high - low, 1.0), 0.0, 1.0)
    scaled = (scaled * 255).astype(np.uint8)
    channels = scaled.shape[2]
    if channels == 1:
        return np.repeat(scaled, 3, axis=2)
    if channels == 2:
        return np.concatenate([scaled, np.zeros_like(scaled[..., :1])], axis=2)
    return np.ascontiguousarray(scaled[..., :3])


def overlay(image: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Picture of a prediction on its image: (h, w, 3) uint8.

    Foreground (classes > 0) pixels are tinted: green where the class is right, magenta where
    background was called foreground (false positive), blue where foreground was missed (false
    negative), yellow where foreground got the wrong foreground class. Background left as is.
    Images longer than ``OVERLAY_MAX_SIDE`` are subsampled.
    """
    step = max(1, -(-max(labels.shape) // OVERLAY_MAX_SIDE))
    image, labels, mask = image[::step, ::step], labels[::step, ::step], mask[::step, ::step]
    picture = display_image(image).astype(np.float32)
    truth_fg, pred_fg = mask > 0, labels > 0
    colours = ((truth_fg & pred_fg & (labels == mask), TRUE_POSITIVE), (~truth_fg & pred_fg, FALSE_POSITIVE),
               (truth_fg & ~pred_fg, FALSE_NEGATIVE), (truth_fg & pred_fg & (labels != mask), WRONG_CLASS))
    for where, colour in colours:
        picture[where] = (1 - OVERLAY_ALPHA) * picture[where] + OVERLAY_ALPHA * np.float32(colour)
    return picture.round().astype(np.uint8)
