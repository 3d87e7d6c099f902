"""Plausibility of the pixels before a build: masks' stray values, sparse or large class counts, object ids;
NaN or infinite values in float images.

A semantic build takes every mask value for a class. Masks that were saved lossily, edited by
hand or that hold object ids instead of classes then give databases of hundreds of classes,
silently. The checks here work on the value counts the build computes anyway (one
``np.bincount`` per mask); only masks with many distinct values are looked at further
(bounding boxes of their values). They run only when ``--number_classes`` is not given: a
user who states the class count has said what the values are.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# A 0/255 mask whose other values cover at most this fraction of its pixels holds stray values.
STRAY_FRACTION = 0.01
# A value covering less than this fraction of all mask pixels is rare.
RARE_FRACTION = 1e-3
# More classes than this (values 0..K-1) is implausible for a semantic build without --number_classes.
MAX_CLASSES = 64
# A mask with more distinct non-zero values than this is examined for object ids.
MANY_VALUES = 8
# Values whose bounding boxes cover at most this fraction of the mask (median) look like objects.
BLOB_AREA = 0.05
# An object id covers at least this many pixels.
MIN_OBJECT_PIXELS = 4


def _shown(values, counts=None, limit: int = 8) -> str:
    items = [f"{v} ({counts[v]} px)" if counts is not None else str(v) for v in values[:limit]]
    return ", ".join(items) + (f" and {len(values) - limit} more" if len(values) > limit else "")


def stray_values(counts: np.ndarray, path: Path) -> list[str]:
    """A problem when a 0/255 mask holds a few pixels of other values (``counts``: its bincount)."""
    if len(counts) != 256 or counts[255] == 0:
        return []
    total = int(counts.sum())
    others = np.flatnonzero(counts[1:255]) + 1
    n_other = int(counts[others].sum())
    if not n_other or n_other > STRAY_FRACTION * total or n_other >= counts[255]:
        return []
    return [f"mask values must be 0/255 or classes 0..K-1; got a 0/255 mask with {n_other} stray pixel(s) of "
            f"{_shown(others.tolist(), counts)} in {path}. With them 255 stays class 255 (256 classes): set them "
            "to 0 or 255 and save the mask again (PNG/TIFF)"]


def object_like(mask: np.ndarray, counts: np.ndarray) -> int:
    """The number of distinct non-zero values of ``mask`` when they look like object ids, else 0.

    Object ids: many distinct values, most of them in one small compact region (a bounding box
    under :data:`BLOB_AREA` of the mask that they fill to 30 % or more).
    """
    present = np.flatnonzero(counts[1:]) + 1
    if len(present) <= MANY_VALUES:
        return 0
    from scipy import ndimage

    boxes = ndimage.find_objects(np.ascontiguousarray(mask))
    compact = 0
    for v in present:
        box = boxes[v - 1]
        area = (box[0].stop - box[0].start) * (box[1].stop - box[1].start)
        # An object fills much of its own box; stray values (ringing, noise) are scattered or tiny.
        compact += counts[v] >= MIN_OBJECT_PIXELS and counts[v] >= 0.3 * area and area <= BLOB_AREA * mask.size
    return len(present) if compact > len(present) // 2 else 0


def dataset_problems(masks: list[Path], counts: list[np.ndarray], objects: list[int]) -> list[str]:
    """Problems of the class values over all masks: object ids, too many classes, sparse or rare values.

    ``counts``: each mask's value counts; ``objects``: :func:`object_like` of each mask.
    """
    problems = []
    ids = [(m, n) for m, n in zip(masks, objects) if n]
    if ids:
        shown = ", ".join(f"{m.name} ({n} values)" for m, n in ids[:8]) + (" ..." if len(ids) > 8 else "")
        problems.append(f"mask values must be classes for --mask_type semantic; got {len(ids)} mask(s) whose many "
                        f"values each form a small separate blob, like object ids: {shown}. Pass --mask_type "
                        "instance for instance masks, or --number_classes to keep the values as classes")
    if not counts:
        return problems
    size = max(len(c) for c in counts)
    total = np.zeros(size, dtype=np.int64)
    for c in counts:
        total[:len(c)] += c
    present = np.flatnonzero(total)
    n_classes = int(present[-1]) + 1 if len(present) else 1
    rare = [int(v) for v in present if v and total[v] < RARE_FRACTION * total.sum()]
    large = n_classes > MAX_CLASSES
    sparse = n_classes > MANY_VALUES and len(present) <= n_classes // 2
    if ids or not (large or sparse or len(rare) >= 3):
        return problems
    holders = []
    for m, c in zip(masks, counts):
        mine = [v for v in rare if v < len(c) and c[v]]
        if mine:
            holders.append(f"{m.name} ({_shown(mine, limit=5)})")
    why = (f"more than {MAX_CLASSES}" if large else f"only {len(present)} of them occur" if sparse
           else f"{len(rare)} values cover under {RARE_FRACTION:.1%} of the pixels each")
    where = (f"; rare values in {len(holders)} mask(s): " + ", ".join(holders[:10])
             + (" ..." if len(holders) > 10 else "")) if holders else ""
    problems.append(f"number of classes must be plausible for --mask_type semantic; got {n_classes} (values 0.."
                    f"{n_classes - 1}), {why}{where}. Fix those masks (stray values from a lossy export or an "
                    "editor), pass --mask_type instance if the values are object ids, or --number_classes "
                    f"{n_classes} if they really are classes")
    return problems


def object_id_warnings(masks: list[Path], results: list[dict], number_classes: int | None) -> list[str]:
    """A warning when ``--number_classes`` was given (so nothing was refused) and masks still look like
    object ids (``results``: the build's per-pair results, in the order of ``masks``, with ``object_like``)."""
    if number_classes is None:
        return []
    ids = [(m, r["object_like"]) for m, r in zip(masks, results) if r.get("object_like")]
    if not ids:
        return []
    shown = ", ".join(f"{m.name} ({n} values)" for m, n in ids[:8]) + (" ..." if len(ids) > 8 else "")
    return [f"{len(ids)} mask(s) hold many values that each form a small separate blob, like object ids, and were "
            f"built as {number_classes} semantic classes: {shown}. If they are instance masks, rebuild with "
            "--mask_type instance (and leave --number_classes out)"]


def non_finite(image: np.ndarray, path: Path) -> list[str]:
    """A problem naming ``path`` when a float image holds NaN or infinite pixels."""
    finite = np.isfinite(image)
    if finite.all():
        return []
    n_nan = int(np.isnan(image).sum())
    n_inf = int(finite.size - finite.sum()) - n_nan
    return [f"image values must be finite; got {n_nan} NaN and {n_inf} infinite pixel value(s) in {path}. "
            "Replace them (e.g. with 0 or the image's mean) and save the image again"]
