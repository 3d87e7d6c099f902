"""Fusing the masks of one image: mask types, instances as foreground and back, per-expert scores.

Instance masks (0 background, 1..I objects) are fused as foreground/background after
:func:`instances_to_semantic` has cut a one-pixel background ridge between touching
objects, and the fused foreground is cut into objects again by :func:`relabel`. Each expert
is then scored against the fused mask: Dice per class, STAPLE's sensitivity and specificity,
and for instances the F1 of object matching at IoU >= 0.5 (:func:`matching_f1`, the one
matching of :mod:`lib.scoring.metrics`, the same that inference and evaluation report).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..common.settings import ConfigError
from ..scoring.metrics import match_instances
from ..store import images
from .patterns import FusionError, FusionResult, check_masks
from .staple import DEFAULT_MAX_ITERATIONS, DEFAULT_TOLERANCE, staple_binary, staple_multiclass
from .vote import majority_vote

METHODS = ("staple", "majority_vote")
MASK_TYPES = ("binary", "multiclass", "instance")
IOU_THRESHOLD = 0.5
# More distinct labels than this in one image: instance masks, not classes.
MAX_SEMANTIC_LABELS = 255
# A multi-class fusion detected automatically (mask_type auto) may have at most this many classes:
# more is nearly always a damaged binary job (0/255 masks with stray values, lossy compression), and a
# 256-class STAPLE runs for minutes per image.
MAX_AUTO_CLASSES = 32


# Instances


def instances_to_semantic(instances: np.ndarray) -> np.ndarray:
    """Instance labels (H, W) (0 background, 1..I objects) -> foreground mask (H, W) uint8 0/1.

    Where two objects touch (8-neighbourhood), the pixels of the lower-numbered object next
    to a higher-numbered one become background: a one-pixel ridge, so that no two
    remaining pixels of different objects are neighbours, even diagonally.
    """
    from scipy import ndimage

    instances = np.asarray(instances)
    if instances.ndim != 2:
        raise FusionError(f"instance mask must be 2D (H, W); got shape {instances.shape}")
    neighbour_max = ndimage.maximum_filter(instances, size=3, mode="constant", cval=0)
    ridge = neighbour_max > instances
    return ((instances != 0) & ~ridge).view(np.uint8)


def relabel(foreground: np.ndarray) -> np.ndarray:
    """Foreground (H, W) -> instances (H, W): 4-connected components numbered 1..I.

    4-connectivity keeps objects apart where the fused ridge survived only diagonally
    (experts placing a boundary one pixel apart). dtype: the smallest unsigned that fits.
    """
    from scipy import ndimage

    labels, count = ndimage.label(np.asarray(foreground) != 0)
    return labels.astype(images.smallest_uint(max(count, 1)))


def matching_f1(reference: np.ndarray, prediction: np.ndarray, iou_threshold: float = IOU_THRESHOLD) -> float:
    """F1 of object matching between two instance masks (H, W): a pair matches when IoU >= threshold.

    The matching of :func:`lib.scoring.metrics.match_instances` (one implementation for the
    whole toolkit). With a threshold >= 0.5 an object can match at most one other (two halves
    of one object at exactly 0.5 are resolved by the largest IoU). Returns NaN when neither
    mask holds an object. Raises ``ValueError`` for a threshold outside [0.5, 1) or masks of
    different shapes.
    """
    if not 0.5 <= iou_threshold < 1:
        raise ValueError(f"iou_threshold must be in [0.5, 1); got {iou_threshold}")
    reference, prediction = np.asarray(reference), np.asarray(prediction)
    if reference.shape != prediction.shape:
        raise ValueError(f"instance masks must have the same shape; got {reference.shape} and {prediction.shape}")
    return match_instances(reference, prediction, iou_threshold).stats[float(iou_threshold)].f1


# Mask types


def detect_mask_type(masks: Sequence[np.ndarray]) -> tuple[str, str]:
    """Guess the kind of the masks of one image: ``(mask_type, reason)``.

    binary: every label is 0 or 1. instance: more than ``MAX_SEMANTIC_LABELS`` distinct
    labels, or (nearly) every non-zero label of every mask is one 8-connected region (one
    object per label; a tenth of the labels may be split, e.g. by a stray stroke).
    multiclass: otherwise. A multi-class mask with one region per class looks like an
    instance mask; pass the type explicitly then.
    """
    from skimage import measure

    top = max(int(np.max(m)) if np.size(m) else 0 for m in masks)
    if top <= 1:
        return "binary", "every label is 0 or 1"
    present = np.zeros(top + 1, bool)
    for m in masks:
        present |= np.bincount(m.ravel(), minlength=top + 1) > 0
    n_labels = int(np.count_nonzero(present[1:]))
    if n_labels > MAX_SEMANTIC_LABELS:
        return "instance", f"{n_labels} distinct labels, more than a multi-class mask would hold"
    for m in masks:
        labels = int(np.count_nonzero(np.bincount(m.ravel())[1:])) if m.size else 0
        regions = int(measure.label(m, background=0, connectivity=2).max())
        if regions > labels + labels // 10:
            return "multiclass", (f"labels up to {top}, and labels form several separate regions "
                                  f"({regions} regions for {labels} labels)")
    return "instance", f"labels up to {top}, each label (nearly always) one connected region"


def _shown(values: np.ndarray) -> str:
    values = [int(v) for v in values]
    return ", ".join(map(str, values)) if len(values) <= 6 else \
        f"{', '.join(map(str, values[:3]))}, ... {values[-1]} ({len(values)} values)"


def decide_mask_type(images: Iterable[tuple[str, Sequence[Path], Sequence[np.ndarray]]]) -> tuple[str, str, bool]:
    """The mask type of a whole fusion from every image's masks: ``(mask_type, reason, plain)``.

    ``images``: ``(key, paths, masks)`` per image (masks (H, W) integers, as read). Each image is
    typed by :func:`detect_mask_type`; when all agree, that type (``plain`` True). When they
    disagree, the type of most images (a tie goes to binary, then instance: one odd mask is more
    likely a mistake than a class), and ``plain`` is False: the reason then counts the images of
    each type and names the masks holding labels above 1 with those labels, so that one odd patch
    in one mask is seen, not silently obeyed (a binary decision then refuses that mask by name,
    :func:`check_values`).

    Raises :class:`FusionError` when the decision is multiclass with more than
    ``MAX_AUTO_CLASSES`` classes (labels 0..max), naming the masks with the highest labels.
    """
    by_type: dict[str, list[str]] = {}
    first_reason: dict[str, str] = {}
    odd: dict[str, np.ndarray] = {}  # mask path -> its labels above 1
    for key, paths, masks in images:
        kind, reason = detect_mask_type(masks)
        by_type.setdefault(kind, []).append(key)
        first_reason.setdefault(kind, f"{key!r}: {reason}")
        for path, mask in zip(paths, masks):
            values = np.unique(mask)
            if values.size and values[-1] > 1:
                odd[str(path)] = values[values > 1]
    plain = len(by_type) == 1
    kind = max(by_type, key=lambda k: (len(by_type[k]), -MASK_TYPES.index(k)))
    top = max((int(v[-1]) for v in odd.values()), default=1)
    worst = sorted(odd, key=lambda p: (-int(odd[p][-1]), p))[:5]
    named = ", ".join(f"{p} (labels above 1: {_shown(odd[p])})" for p in worst) + \
        (f" and {len(odd) - len(worst)} more mask(s)" if len(odd) > len(worst) else "")
    if kind == "multiclass" and top + 1 > MAX_AUTO_CLASSES:
        raise FusionError(f"mask labels must be below {MAX_AUTO_CLASSES} for a multi-class fusion detected "
                          f"automatically; got labels up to {top} ({top + 1} classes) in {named}. Stray values in "
                          "0/255 masks come from lossy compression or editing: fix those masks, or pass --mask_type "
                          "to fuse them as they are")
    counts = ", ".join(f"{len(keys)} {k} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                       for k, keys in by_type.items())
    if plain:
        return kind, f"every image {kind} ({len(by_type[kind])}); first {first_reason[kind]}", True
    return kind, f"images disagree: {counts}; decided by {named}", False


def check_values(masks: list[np.ndarray], paths: list[Path], mask_type: str, how: str) -> None:
    """``FusionError`` when a mask of a binary fusion holds a label above 1 (``how``: where the type came from)."""
    if mask_type != "binary":
        return
    for mask, path in zip(masks, paths):
        top = int(mask.max()) if mask.size else 0
        if top > 1:
            raise FusionError(f"binary mask values must be 0 and 1 (or 0 and 255); got labels up to {top} in {path} "
                              f"(mask type binary {how}). Pass --mask_type multiclass or instance")


# Fusing one image


def fuse_masks(masks: Sequence[np.ndarray], mask_type: str, method: str = "staple",
               undecided_label: int = 0, max_iterations: int = DEFAULT_MAX_ITERATIONS,
               tolerance: float | None = None, return_probabilities: bool = False) -> tuple[np.ndarray, FusionResult,
                                                                                            list[dict]]:
    """Fuse the R masks (H, W) of one image and measure every expert against the result.

    Returns ``(fused, result, metrics)``: fused (H, W) labels (instance ids for
    ``mask_type="instance"``, 0/1 for binary), the :class:`FusionResult` of the semantic
    fusion, and one dict of metrics per expert (``dice``, ``dice_class_<c>``,
    ``f1_iou50``, ``sensitivity``, ``specificity`` ... as they apply).
    Raises ``ConfigError`` for an unknown method or mask type, ``FusionError`` for invalid
    masks (both ``ValueError``).
    """
    problems = []
    if method not in METHODS:
        problems.append(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if mask_type not in MASK_TYPES:
        problems.append(f"mask_type must be one of {', '.join(MASK_TYPES)}; got {mask_type!r}")
    if problems:
        raise ConfigError(problems)
    masks = check_masks(masks)
    semantic = [instances_to_semantic(m) for m in masks] if mask_type == "instance" else masks
    binary = mask_type != "multiclass"
    if method == "majority_vote":
        result = majority_vote(semantic, n_classes=2 if binary else None, undecided_label=undecided_label,
                               return_probabilities=return_probabilities)
    elif binary:
        result = staple_binary(semantic, max_iterations, tolerance or DEFAULT_TOLERANCE["binary"],
                               return_probabilities)
    else:
        result = staple_multiclass(semantic, None, max_iterations, tolerance or DEFAULT_TOLERANCE["multiclass"],
                                   undecided_label, return_probabilities)
    fused = relabel(result.labels == 1) if mask_type == "instance" else result.labels
    return fused, result, [_expert_scores(result, r, mask, fused, mask_type) for r, mask in enumerate(masks)]


def _expert_scores(result: FusionResult, r: int, mask: np.ndarray, fused: np.ndarray, mask_type: str) -> dict:
    """Expert ``r`` (its ``mask``) against the fusion: Dice (per class), F1 of instances, STAPLE's rates."""
    binary = mask_type != "multiclass"
    row: dict = {}
    if binary:
        row["dice"] = result.dice[r, 1]
    else:
        per_class = result.dice[r, 1:]
        row["dice"] = float(np.nanmean(per_class)) if np.isfinite(per_class).any() else float("nan")
        row.update({f"dice_class_{c}": result.dice[r, c] for c in range(1, result.dice.shape[1])})
    if mask_type == "instance":
        row["f1_iou50"] = matching_f1(mask, fused)
    if result.sensitivity is not None:
        if binary:
            row["sensitivity"], row["specificity"] = result.sensitivity[r], result.specificity[r]
        else:
            for c in range(1, result.sensitivity.shape[1]):
                row[f"sensitivity_class_{c}"] = result.sensitivity[r, c]
                row[f"specificity_class_{c}"] = result.specificity[r, c]
    return {k: float(v) for k, v in row.items()}
