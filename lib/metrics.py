"""Segmentation metrics from a confusion matrix (NumPy only).

The confusion matrix ``cm`` is ``(C, C)`` int64 with ``cm[true, predicted]`` pixel counts.
"""

from __future__ import annotations

import numpy as np


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, n_classes: int,
                     valid: np.ndarray | None = None) -> np.ndarray:
    """``(C, C)`` counts of ``labels`` (true) against ``predictions``, both integer arrays of one shape.

    ``valid``: optional boolean mask of the pixels to count. Raises ``ValueError`` for a label
    or prediction outside ``[0, n_classes)`` or for shapes that differ.
    """
    if labels.shape != predictions.shape:
        raise ValueError(f"labels and predictions must have one shape; got {labels.shape} and {predictions.shape}")
    labels = labels.astype(np.int64, copy=False).ravel()
    predictions = predictions.astype(np.int64, copy=False).ravel()
    if valid is not None:
        keep = valid.ravel()
        labels, predictions = labels[keep], predictions[keep]
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes or predictions.min() < 0
                        or predictions.max() >= n_classes):
        raise ValueError(f"labels and predictions must be in [0, {n_classes}); got labels in "
                         f"[{labels.min()}, {labels.max()}], predictions in [{predictions.min()}, {predictions.max()}]")
    return np.bincount(labels * n_classes + predictions, minlength=n_classes * n_classes).reshape(
        n_classes, n_classes)


def scores(cm: np.ndarray) -> dict[str, object]:
    """Per-class IoU and Dice, their means over classes present, and pixel accuracy.

    A class absent from both labels and predictions has IoU and Dice NaN and is left out of
    the means. ``mean_foreground_iou`` leaves out class 0 (background).
    """
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (tp + fp + fn)
        dice = 2 * tp / (2 * tp + fp + fn)
    total = cm.sum()
    foreground = iou[1:]
    return {
        "iou": iou.tolist(),
        "dice": dice.tolist(),
        "mean_iou": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
        "mean_foreground_iou": float(np.nanmean(foreground)) if np.isfinite(foreground).any() else float("nan"),
        "mean_dice": float(np.nanmean(dice)) if np.isfinite(dice).any() else float("nan"),
        "pixel_accuracy": float(tp.sum() / total) if total else float("nan"),
    }
