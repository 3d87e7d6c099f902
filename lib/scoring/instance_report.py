"""Reports of instance matching (:func:`lib.scoring.metrics.match_instances`): association tables and overlay pictures.

* :func:`associations_rows` lists, for one image at one threshold, every true object (matched
  to which prediction, with which IoU, or missed) and every false-positive prediction;
  :func:`write_csv` writes such rows atomically.
* :func:`matching_overlay` draws the same on the image: matched predictions outlined green,
  false-positive predictions outlined blue, missed true objects filled semi-transparent red;
  :func:`save_png` writes it atomically.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from .metrics import InstanceMatching

ASSOCIATION_FIELDS = ("image", "threshold", "true_id", "pred_id", "iou", "status")
MATCHED, MISSED, FALSE_POSITIVE = "matched", "missed", "false_positive"

# Overlay colours (RGB) and the opacity of the missed-object fill.
MATCHED_COLOUR = (0, 255, 0)
MISSED_COLOUR = (255, 0, 0)
FALSE_POSITIVE_COLOUR = (0, 90, 255)
MISSED_ALPHA = 0.45


def associations_rows(matching: InstanceMatching, image_name: str,
                      threshold: float | None = None) -> list[dict[str, object]]:
    """Rows of the associations table of one image, with keys ``ASSOCIATION_FIELDS``.

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


def write_csv(path: str | os.PathLike, rows: Sequence[dict[str, object]],
              fieldnames: Sequence[str] = ASSOCIATION_FIELDS) -> Path:
    """Write ``rows`` as CSV atomically (temporary name in the same folder, then ``os.replace``).

    Columns ``fieldnames`` (a header is written even without rows); floats with 6 significant
    digits, NaN as an empty cell. Raises ``ValueError`` when a row holds a key not in ``fieldnames``.
    """
    path = Path(path)
    fieldnames = list(fieldnames)
    for number, row in enumerate(rows):
        extra = sorted(set(row) - set(fieldnames))
        if extra:
            raise ValueError(f"rows must only hold the columns {', '.join(fieldnames)}; got {', '.join(extra)} in "
                             f"row {number}. Pass fieldnames=")
    from .evaluate import write_csv as write_rows

    return write_rows(path, rows, fieldnames)


def grey_display(image: np.ndarray) -> np.ndarray:
    """``image`` (H, W) or (H, W, C), any dtype, as (H, W) uint8 grey: channel mean, then percentiles 0.5-99.5 to 0-255.

    A constant image becomes 0. Raises ``ValueError`` for another number of dimensions.
    """
    image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise ValueError(f"image must be (H, W) or (H, W, C); got shape {image.shape}")
    grey = image.astype(np.float32)
    if grey.ndim == 3:
        grey = grey.mean(axis=2)
    low, high = np.percentile(grey, (0.5, 99.5)) if grey.size else (0.0, 0.0)
    scaled = np.clip((grey - low) / (high - low if high > low else 1.0), 0.0, 1.0)
    return (scaled * 255).round().astype(np.uint8)


def _select(labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Boolean (H, W): pixels of ``labels`` whose id is in ``ids``."""
    if ids.size == 0:
        return np.zeros(labels.shape, bool)
    return np.isin(labels, ids)


def matching_overlay(image: np.ndarray, true: np.ndarray, pred: np.ndarray, matching: InstanceMatching,
                     threshold: float = 0.5) -> np.ndarray:
    """Picture of a matching on its image: (H, W, 3) uint8.

    Parameters
    ----------
    image : (H, W) or (H, W, C), any dtype; shown grey (:func:`grey_display`).
    true, pred : (H, W) integer label images the matching was computed on (or one Z plane of
        the 3-D volumes: objects are drawn by id).
    matching : from :func:`lib.scoring.metrics.match_instances`.
    threshold : one of ``matching.thresholds``.

    Missed true objects are filled red at opacity ``MISSED_ALPHA``; then the inner outlines
    (object pixels next to another id or background) of matched predictions are drawn green
    and of false-positive predictions blue, fully opaque.

    Raises ``ValueError`` when the shapes differ or the threshold was not matched at.
    """
    from skimage.segmentation import find_boundaries

    t = matching.check_threshold(threshold)
    true, pred = np.asarray(true), np.asarray(pred)
    if true.ndim != 2 or true.shape != pred.shape or np.shape(image)[:2] != true.shape:
        raise ValueError(f"image (H, W[, C]), true and pred (H, W) must have one height and width; got "
                         f"{np.shape(image)}, {true.shape} and {pred.shape}. For 3-D labels pass one Z plane")
    picture = np.repeat(grey_display(image)[..., None], 3, axis=2).astype(np.float32)
    missed = _select(true, matching.unmatched_true[t])
    picture[missed] = (1 - MISSED_ALPHA) * picture[missed] + MISSED_ALPHA * np.float32(MISSED_COLOUR)
    for ids, colour in ((matching.matched[t][:, 1], MATCHED_COLOUR),
                        (matching.unmatched_pred[t], FALSE_POSITIVE_COLOUR)):
        chosen = _select(pred, ids)
        outline = find_boundaries(np.where(chosen, pred, 0), mode="inner") & chosen
        picture[outline] = colour
    return picture.round().astype(np.uint8)


def save_png(path: str | os.PathLike, rgb: np.ndarray) -> Path:
    """Write ``rgb`` (H, W, 3) uint8 as PNG atomically (temporary name, then ``os.replace``).

    Raises ``ValueError`` for another shape or dtype.
    """
    from PIL import Image

    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be an (H, W, 3) uint8 picture; got {rgb.dtype} of shape {rgb.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".partial.png", dir=path.parent)
    os.close(fd)
    try:
        Image.fromarray(rgb).save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
