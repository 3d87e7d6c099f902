"""Segmentation metrics: semantic scores from a confusion matrix, instance matching statistics.

The confusion matrix ``cm`` is ``(C, C)`` int64 with ``cm[true, predicted]`` pixel counts.

Instance matching (:func:`overlaps`, :func:`match_instances`, :func:`pool_stats`) compares two
label images, 0 background and any non-negative ids (not necessarily consecutive), object by
object. The conventions, chosen once here:

* A true and a predicted object *match* at threshold ``t`` when their IoU is ``>= t`` (IoU
  computed as one correctly rounded division of pixel counts, so 2 of 4 pixels is exactly 0.5
  and matches at 0.5). Thresholds must lie in (0, 1].
* Per threshold, a one-to-one assignment is chosen among the *candidate* pairs, those with
  IoU ``>= t``: the largest number of matched pairs, and among all assignments with that
  many pairs the one whose matched pairs have the largest total IoU. Pairs below ``t`` take
  no part. For ``t > 0.5`` each object has at most one candidate, so the assignment is
  unique; below 0.5 (and at exactly 0.5, for two halves of one object) an object can have
  several candidates and the assignment matters.

  This is not quite ``stardist.matching.matching``. StarDist solves one assignment over
  *all* pairs, min(n_true, n_pred) of them, with the cost ``-[IoU >= t] - IoU / (2 k)``
  (k = min(n_true, n_pred)), and then counts the assigned pairs with IoU ``>= t``. Its
  number of matches is the same maximum as ours (the IoU term of any assignment sums to
  less than 1/2), but its tie-break adds the IoU of assigned pairs *below* ``t`` too, so
  among assignments with the most matches it may prefer one with less matched IoU if that
  pairs the leftover objects with larger sub-threshold overlaps. Counts, precision, recall
  and F1 are therefore identical; below ``t = 0.5`` the mean matched IoU and panoptic
  quality can differ (issue 12 measured up to 0.034 in mean matched IoU; the hand-made case
  in ``tests/scoring/test_matching.py`` gives 8/15 here against 5/13 there). Ours is the
  assignment that maximises what is reported.
* TP = matched pairs, FP = n_pred - TP, FN = n_true - TP; precision = TP/n_pred, recall =
  TP/n_true, accuracy = TP/(TP+FP+FN), F1 = 2TP/(n_true+n_pred), panoptic quality =
  sum of matched IoU/(TP + FP/2 + FN/2) (= mean matched IoU x F1).
* A ratio with a zero denominator is NaN, as in :func:`scores`: with no predicted object
  precision is NaN (recall, F1, accuracy and PQ are 0 when there are true objects); with no
  true object recall is NaN; with neither, every ratio is NaN. Mean matched IoU is NaN
  without a match.
* Over a dataset, :func:`pool_stats` sums the counts and matched IoU of all images and takes
  the ratios of the sums (every object weighs the same), not the mean of per-image ratios;
  an empty image adds nothing and its NaN does not spread.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Mapping, Sequence

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


# Instance matching

DEFAULT_THRESHOLDS = (0.3, 0.5, 0.75)
# Largest label id relabelled through a lookup table (else np.unique, which sorts), and the
# largest (true x predicted) pair table counted with np.bincount, both as multiples of the pixel count.
_LOOKUP_FACTOR = 4
_LOOKUP_MINIMUM = 1 << 16


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else float("nan")


@dataclasses.dataclass(frozen=True)
class MatchStats:
    """Instance matching statistics at one IoU threshold (conventions: module docstring)."""

    threshold: float
    tp: int
    fp: int
    fn: int
    n_true: int
    n_pred: int
    precision: float
    recall: float
    accuracy: float
    f1: float
    panoptic_quality: float
    mean_matched_iou: float
    sum_matched_iou: float

    @classmethod
    def from_counts(cls, threshold: float, tp: int, n_true: int, n_pred: int, sum_matched_iou: float) -> "MatchStats":
        """Statistics from the counts: ``tp`` matched pairs among ``n_true`` true and ``n_pred`` predicted objects."""
        tp, n_true, n_pred = int(tp), int(n_true), int(n_pred)
        fp, fn = n_pred - tp, n_true - tp
        sum_matched_iou = float(sum_matched_iou)
        return cls(threshold=float(threshold), tp=tp, fp=fp, fn=fn, n_true=n_true, n_pred=n_pred,
                   precision=_ratio(tp, n_pred), recall=_ratio(tp, n_true), accuracy=_ratio(tp, tp + fp + fn),
                   f1=_ratio(2 * tp, n_true + n_pred),
                   panoptic_quality=_ratio(sum_matched_iou, tp + fp / 2 + fn / 2),
                   mean_matched_iou=_ratio(sum_matched_iou, tp), sum_matched_iou=sum_matched_iou)

    def as_dict(self) -> dict[str, float | int]:
        """The fields as a plain dict (Python ints and floats), e.g. for a CSV row or JSON."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Overlaps:
    """The objects of two label images and every pair of them that shares a pixel.

    ``true_ids`` (n_true,) and ``pred_ids`` (n_pred,) int64: the non-zero ids present, ascending;
    ``true_areas`` / ``pred_areas``: their pixel (voxel) counts. Pairs, in coordinate form, (k,)
    each: ``true_index`` and ``pred_index`` (positions in ``true_ids`` / ``pred_ids``),
    ``intersections`` (shared pixels, >= 1) and ``iou`` float64, in (0, 1].
    """

    true_ids: np.ndarray
    pred_ids: np.ndarray
    true_areas: np.ndarray
    pred_areas: np.ndarray
    true_index: np.ndarray
    pred_index: np.ndarray
    intersections: np.ndarray
    iou: np.ndarray

    def dense(self) -> np.ndarray:
        """IoU as an (n_true, n_pred) float64 matrix, 0 for pairs that share no pixel (small images)."""
        matrix = np.zeros((self.true_ids.size, self.pred_ids.size))
        matrix[self.true_index, self.pred_index] = self.iou
        return matrix

    def sparse(self):
        """IoU as an (n_true, n_pred) ``scipy.sparse.csr_array``; absent entries share no pixel."""
        from scipy import sparse

        return sparse.csr_array((self.iou, (self.true_index, self.pred_index)),
                                shape=(self.true_ids.size, self.pred_ids.size))


def _check_labels(name: str, labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.dtype == bool:
        labels = labels.view(np.uint8)
    if labels.dtype.kind not in "iu":
        raise ValueError(f"{name} must be an integer label image (0 background, object ids > 0); got dtype "
                         f"{labels.dtype}. Round and cast float labels first, e.g. labels.astype(np.int32)")
    if labels.ndim not in (2, 3):
        raise ValueError(f"{name} must be a 2-D (H, W) or 3-D (Z, Y, X) label image; got shape {labels.shape}")
    if labels.dtype.kind == "i" and labels.size and int(labels.min()) < 0:
        raise ValueError(f"{name} must hold ids >= 0 (0 is background); got minimum {int(labels.min())}")
    return labels


def _compact(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``labels`` (N,) as consecutive 0..n (0 kept for background): (ids (n,), compact (N,), areas (n,))."""
    top = int(labels.max()) if labels.size else 0
    if top <= _LOOKUP_FACTOR * labels.size + _LOOKUP_MINIMUM:
        # One counting pass and a gather: no sort, which matters on multi-megapixel images.
        counts = np.bincount(labels.astype(np.intp, copy=False), minlength=top + 1)
        ids = np.flatnonzero(counts[1:]) + 1
        lookup = np.zeros(top + 1, np.int64)
        lookup[ids] = np.arange(1, ids.size + 1)
        return ids.astype(np.int64), lookup[labels], counts[ids].astype(np.int64)
    ids, compact, counts = np.unique(labels, return_inverse=True, return_counts=True)
    compact = compact.ravel().astype(np.int64)
    if ids[0] == 0:
        return ids[1:].astype(np.int64), compact, counts[1:].astype(np.int64)
    return ids.astype(np.int64), compact + 1, counts.astype(np.int64)


def overlaps(true: np.ndarray, pred: np.ndarray) -> Overlaps:
    """Objects of ``true`` and ``pred`` and the IoU of every pair that shares a pixel.

    Parameters
    ----------
    true, pred : (H, W) or (Z, Y, X) integer label images of one shape; 0 is background, any
        other value one object (ids need not be consecutive; an id may cover disconnected pixels).

    Returns
    -------
    :class:`Overlaps`, pairs in coordinate form (``.dense()`` / ``.sparse()`` give the matrix).

    Raises ``ValueError`` for shapes that differ, a non-integer dtype, negative ids, or a
    dimension other than 2 or 3. Cost: a few passes over the pixels (counting, no per-object loop).
    """
    true = _check_labels("true", true)
    pred = _check_labels("pred", pred)
    if true.shape != pred.shape:
        raise ValueError(f"true and pred must have one shape; got {true.shape} and {pred.shape}")
    true_ids, t, true_areas = _compact(true.ravel())
    pred_ids, p, pred_areas = _compact(pred.ravel())
    n_pred1 = pred_ids.size + 1
    table_size = (true_ids.size + 1) * n_pred1
    if table_size <= _LOOKUP_FACTOR * t.size + _LOOKUP_MINIMUM:
        codes = t * n_pred1
        codes += p
        counts = np.bincount(codes, minlength=table_size)
        counts[:n_pred1] = 0  # true background row
        counts[::n_pred1] = 0  # predicted background column
        codes = np.flatnonzero(counts)
        counts = counts[codes]
    else:
        both = (t > 0) & (p > 0)
        codes, counts = np.unique(t[both] * n_pred1 + p[both], return_counts=True)
    true_index, pred_index = codes // n_pred1 - 1, codes % n_pred1 - 1
    intersections = counts.astype(np.int64)
    union = true_areas[true_index] + pred_areas[pred_index] - intersections
    return Overlaps(true_ids=true_ids, pred_ids=pred_ids, true_areas=true_areas, pred_areas=pred_areas,
                    true_index=true_index, pred_index=pred_index, intersections=intersections,
                    iou=intersections / union)


def _check_thresholds(thresholds: float | Iterable[float]) -> tuple[float, ...]:
    try:
        values = [float(v) for v in np.ravel(np.asarray(thresholds, dtype=object))]
    except (TypeError, ValueError):
        raise ValueError(f"thresholds must be numbers in (0, 1]; got {thresholds!r}") from None
    if not values:
        raise ValueError(f"thresholds must hold at least one IoU threshold in (0, 1]; got {thresholds!r}")
    bad = [v for v in values if not 0.0 < v <= 1.0]  # also catches NaN
    if bad:
        raise ValueError(f"thresholds must be in (0, 1]; got {bad}. Threshold 0 would match objects that share "
                         "no pixel; IoU never exceeds 1")
    if len(set(values)) != len(values):
        raise ValueError(f"thresholds must be distinct; got {values}")
    return tuple(sorted(values))


def _assign(n_true: int, n_pred: int, true_index: np.ndarray, pred_index: np.ndarray,
            iou: np.ndarray) -> np.ndarray:
    """Positions (into the candidate pairs) of the chosen one-to-one assignment.

    Most candidates are isolated pairs (each object has one candidate) and are taken as they
    are; the rest are split into connected components of the candidate graph, each solved by
    ``linear_sum_assignment`` on its small dense matrix.
    """
    from scipy.optimize import linear_sum_assignment
    from scipy.sparse import coo_array
    from scipy.sparse.csgraph import connected_components

    true_degree = np.bincount(true_index, minlength=n_true)
    pred_degree = np.bincount(pred_index, minlength=n_pred)
    isolated = (true_degree[true_index] == 1) & (pred_degree[pred_index] == 1)
    chosen = [np.flatnonzero(isolated)]
    rest = np.flatnonzero(~isolated)
    if rest.size:
        # Nodes: true objects 0..n_true-1, predicted objects n_true.. ; one edge per candidate pair.
        graph = coo_array((np.ones(rest.size), (true_index[rest], n_true + pred_index[rest])),
                          shape=(n_true + n_pred, n_true + n_pred))
        _, component = connected_components(graph, directed=False)
        edge_component = component[true_index[rest]]
        order = np.argsort(edge_component, kind="stable")
        rest, edge_component = rest[order], edge_component[order]
        starts = np.flatnonzero(np.r_[True, edge_component[1:] != edge_component[:-1]])
        for edges in np.split(rest, starts[1:]):
            rows, row_of = np.unique(true_index[edges], return_inverse=True)
            columns, column_of = np.unique(pred_index[edges], return_inverse=True)
            # Weight 1 + IoU/(k+1): the IoU part of any assignment sums to less than 1, so one
            # more matched pair always wins, and among equally many pairs the larger total IoU.
            k = min(rows.size, columns.size)
            weight = np.zeros((rows.size, columns.size))
            weight[row_of, column_of] = 1.0 + iou[edges] / (k + 1)
            position = np.full((rows.size, columns.size), -1)
            position[row_of, column_of] = edges
            r, c = linear_sum_assignment(weight, maximize=True)
            taken = position[r, c]
            chosen.append(taken[taken >= 0])
    return np.concatenate(chosen)


@dataclasses.dataclass(frozen=True)
class InstanceMatching:
    """Result of :func:`match_instances` for one image (conventions: module docstring).

    ``thresholds`` ascending. Per threshold ``t`` (dict keys, the floats passed in):
    ``stats[t]`` :class:`MatchStats`; ``matched[t]`` (k, 2) int64 rows (true_id, pred_id)
    ascending by true id, with ``matched_iou[t]`` (k,) float64; ``unmatched_true[t]`` and
    ``unmatched_pred[t]`` the ids left over (ascending). ``true_ids`` / ``pred_ids``: all ids.
    """

    thresholds: tuple[float, ...]
    true_ids: np.ndarray
    pred_ids: np.ndarray
    stats: dict[float, MatchStats]
    matched: dict[float, np.ndarray]
    matched_iou: dict[float, np.ndarray]
    unmatched_true: dict[float, np.ndarray]
    unmatched_pred: dict[float, np.ndarray]

    @property
    def pairs(self) -> list[tuple[int, int, float]]:
        """(true_id, pred_id, iou) of the pairs matched at the lowest threshold, ascending by true id."""
        t = self.thresholds[0]
        return [(int(a), int(b), float(c)) for (a, b), c in zip(self.matched[t], self.matched_iou[t])]

    def check_threshold(self, threshold: float) -> float:
        """``threshold`` as the key of this matching; ``ValueError`` when it was not matched at."""
        if threshold not in self.stats:
            raise ValueError(f"threshold must be one of the matching's thresholds "
                             f"{', '.join(map(str, self.thresholds))}; got {threshold}. Pass it to match_instances")
        return float(threshold)


def match_instances(true: np.ndarray, pred: np.ndarray,
                    thresholds: float | Iterable[float] = DEFAULT_THRESHOLDS) -> InstanceMatching:
    """Match the objects of ``pred`` to those of ``true`` at each IoU threshold.

    Parameters
    ----------
    true, pred : (H, W) or (Z, Y, X) integer label images of one shape, 0 background (see :func:`overlaps`).
    thresholds : one IoU threshold or several, each in (0, 1], distinct.

    Returns
    -------
    :class:`InstanceMatching`. Per threshold, a pair is a candidate when its IoU >= threshold;
    the assignment has the most candidate pairs possible and, among such, the largest total
    IoU of the matched pairs (module docstring: how this differs from StarDist's tie-break).

    Raises ``ValueError`` for bad labels (see :func:`overlaps`) or thresholds.
    """
    levels = _check_thresholds(thresholds)
    found = overlaps(true, pred)
    n_true, n_pred = found.true_ids.size, found.pred_ids.size
    stats, matched, matched_iou, unmatched_true, unmatched_pred = {}, {}, {}, {}, {}
    for t in levels:
        candidates = np.flatnonzero(found.iou >= t)
        chosen = candidates[_assign(n_true, n_pred, found.true_index[candidates], found.pred_index[candidates],
                                    found.iou[candidates])]
        chosen = chosen[np.argsort(found.true_index[chosen], kind="stable")]
        true_index, pred_index, iou = found.true_index[chosen], found.pred_index[chosen], found.iou[chosen]
        matched[t] = np.stack([found.true_ids[true_index], found.pred_ids[pred_index]], axis=1).reshape(-1, 2)
        matched_iou[t] = iou
        true_left = np.ones(n_true, bool)
        true_left[true_index] = False
        pred_left = np.ones(n_pred, bool)
        pred_left[pred_index] = False
        unmatched_true[t] = found.true_ids[true_left]
        unmatched_pred[t] = found.pred_ids[pred_left]
        stats[t] = MatchStats.from_counts(t, chosen.size, n_true, n_pred, math.fsum(iou.tolist()))
    return InstanceMatching(thresholds=levels, true_ids=found.true_ids, pred_ids=found.pred_ids, stats=stats,
                            matched=matched, matched_iou=matched_iou, unmatched_true=unmatched_true,
                            unmatched_pred=unmatched_pred)


def pool_stats(items: Sequence[InstanceMatching | Mapping[float, MatchStats]]) -> dict[float, MatchStats]:
    """Statistics over a dataset: per threshold, counts and matched IoU summed over ``items``, then the ratios.

    ``items``: per image an :class:`InstanceMatching` or its ``stats`` dict, all at the same
    thresholds. Every object weighs the same, so the pooled F1 is not the mean of per-image F1s.
    Raises ``ValueError`` for no items or thresholds that differ between items.
    """
    tables = [item.stats if isinstance(item, InstanceMatching) else dict(item) for item in items]
    if not tables:
        raise ValueError("items must hold at least one matching (one per image); got none")
    levels = sorted(tables[0])
    for number, table in enumerate(tables):
        if sorted(table) != levels:
            raise ValueError(f"items must all be matched at the same thresholds; got {levels} for item 0 and "
                             f"{sorted(table)} for item {number}")
    pooled = {}
    for t in levels:
        column = [table[t] for table in tables]
        pooled[t] = MatchStats.from_counts(t, sum(s.tp for s in column), sum(s.n_true for s in column),
                                           sum(s.n_pred for s in column),
                                           math.fsum(s.sum_matched_iou for s in column))
    return pooled


# A class per instance (two-channel label images: instance ids, class of each instance)


def majority_class(labels: np.ndarray, classes: np.ndarray) -> dict[int, int]:
    """``{instance id: the class most of its pixels have}`` for every id > 0 of ``labels`` (ties: the smaller
    class). ``classes``: non-negative integers of the same shape (a class map, or the argmax of a class head)."""
    inside = labels > 0
    ids, cls = labels[inside].astype(np.int64), classes[inside].astype(np.int64)
    if not ids.size:
        return {}
    uid, index = np.unique(ids, return_inverse=True)
    n = int(cls.max()) + 1
    counts = np.bincount(index * n + cls, minlength=uid.size * n).reshape(uid.size, n)
    return dict(zip(uid.tolist(), counts.argmax(axis=1).tolist()))


def match_instances_by_class(true: np.ndarray, true_classes: Mapping[int, int], pred: np.ndarray,
                             pred_classes: Mapping[int, int], classes: Iterable[int],
                             thresholds: float | Iterable[float] = DEFAULT_THRESHOLDS) -> dict[int, InstanceMatching]:
    """Per class ``c`` of ``classes``: :func:`match_instances` of the true objects of class ``c`` with the
    predicted objects of class ``c`` (the others count as background), as in the CoNIC challenge's
    per-class panoptic quality. ``true_classes`` / ``pred_classes``: the class of each id (e.g. from
    :func:`majority_class`); an id without one belongs to no class."""
    out = {}
    for c in classes:
        keep_true = np.asarray([i for i, k in true_classes.items() if k == c], np.int64)
        keep_pred = np.asarray([i for i, k in pred_classes.items() if k == c], np.int64)
        out[int(c)] = match_instances(np.where(np.isin(true, keep_true), true, 0),
                                      np.where(np.isin(pred, keep_pred), pred, 0), thresholds)
    return out
