"""Ground-truth estimation from several experts' masks: STAPLE, majority voting, agreement.

Every fusion here works on *decision patterns*. At one pixel, the R experts' labels form a
vector (d_1, ..., d_R); STAPLE's E-step, the vote and every per-expert count depend on the
pixel only through that vector. An image is therefore reduced once to its distinct
vectors and how often each occurs (at most 2^R for binary masks, C^R for C classes), the
expectation-maximisation runs on those counts, and the per-pattern answer is looked up
back into the image. One EM iteration costs O(patterns), not O(pixels), which is what
makes hundreds of iterations on noisy multi-class masks cheap.

The numbers follow ITK/SimpleITK, the reference implementations:

* :func:`staple_binary` is ``itk::STAPLEImageFilter`` (Warfield, Zou and Wells, IEEE TMI
  23(7):903-921, 2004): initial foreground probability = mean of the experts' decisions,
  prior g = its image mean, then M-step (per-expert sensitivity p and specificity q) and
  E-step until no p or q moves by more than ``tolerance`` (ITK: 1e-7).
* :func:`staple_multiclass` is ``itk::MultiLabelSTAPLEImageFilter``: per-expert confusion
  matrices initialised from the majority vote, prior = label frequency over all experts,
  stop when no confusion-matrix entry moves by ``tolerance`` or more (ITK: 1e-5); the
  label is the unique argmax of the posterior, otherwise ``undecided_label``. (ITK's
  initialisation also counts pixels where the vote is undecided, by writing past the end
  of a matrix row; they are left out here. On very noisy masks, both stop at 1e-5 short of
  the fixed point from these slightly different starts, and labels can differ on a few
  tenths of a percent of pixels; at a tighter tolerance both reach the same answer.)
* :func:`majority_vote` is ``itk::LabelVotingImageFilter``: the label with the most votes
  when it is unique, otherwise ``undecided_label``.

Instance masks (0 background, 1..I objects) are fused as foreground/background after
:func:`instances_to_semantic` has cut a one-pixel background ridge between touching
objects, and the fused foreground is cut into objects again by :func:`relabel`.

:func:`fuse_folder` runs all of it over a folder of expert sub-folders; ``fuse_masks.py``
is its command line.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..store import images

logger = logging.getLogger(__name__)

METHODS = ("staple", "majority_vote")
MASK_TYPES = ("binary", "multiclass", "instance")
OUTPUT_FORMATS = ("png", "tif")
# The same stopping rules as SimpleITK's STAPLE and MultiLabelSTAPLE filters.
DEFAULT_TOLERANCE = {"binary": 1e-7, "multiclass": 1e-5}
DEFAULT_MAX_ITERATIONS = 10000
IOU_THRESHOLD = 0.5
# More distinct labels than this in one image: instance masks, not classes.
MAX_SEMANTIC_LABELS = 255
# Above this many possible decision vectors, patterns are found by sorting instead of counting.
_MAX_COUNTED_CODES = 1 << 22
# Multi-class STAPLE holds (decision patterns x classes) posterior values, several times over.
MAX_POSTERIOR_VALUES = 1 << 26
PER_IMAGE_CSV = "fusion_per_image.csv"
SUMMARY_CSV = "fusion_summary.csv"
SETTINGS_JSON = "fusion.json"
PROBABILITY_FOLDER = "probabilities"
AGREEMENT_FOLDER = "agreement"


class FusionError(Exception):
    """Masks that cannot be fused as asked (values that do not fit the mask type)."""


# Decision patterns


@dataclasses.dataclass(frozen=True)
class DecisionPatterns:
    """The distinct vectors of expert decisions in an image and how often each occurs.

    ``patterns``: (P, R) the labels of the R experts, one row per distinct vector.
    ``counts``: (P,) int64 pixels per pattern. ``shape``: (H, W) of the image.
    Use :meth:`expand` to turn one value per pattern into an image.
    """

    patterns: np.ndarray
    counts: np.ndarray
    shape: tuple[int, int]
    codes: np.ndarray  # (H * W,) integer code of each pixel's vector, or its pattern index
    present: np.ndarray | None  # (P,) code of each pattern; None when ``codes`` are pattern indices
    n_codes: int

    def expand(self, values: np.ndarray) -> np.ndarray:
        """Per-pattern values ``(P, ...)`` -> per-pixel array ``(H, W, ...)``."""
        values = np.asarray(values)
        if self.present is None:
            table = values
        else:
            table = np.zeros((self.n_codes,) + values.shape[1:], values.dtype)
            table[self.present] = values
        return table[self.codes].reshape(self.shape + values.shape[1:])


def _stack_check(masks: Sequence[np.ndarray]) -> list[np.ndarray]:
    masks = [np.asarray(m) for m in masks]
    if len(masks) < 2:
        raise ValueError(f"number of masks must be at least 2; got {len(masks)}. "
                         "Fusion needs several experts' masks of the same image")
    shape = masks[0].shape
    if len(shape) != 2:
        raise ValueError(f"masks must be 2D (H, W); got shape {shape}")
    for i, m in enumerate(masks):
        if m.shape != shape:
            raise ValueError(f"masks must all have the same shape; got {shape} for mask 0 and {m.shape} for mask {i}")
        if m.dtype.kind not in "biu":
            raise ValueError(f"masks must hold integer labels; got dtype {m.dtype} for mask {i}")
        if m.dtype.kind == "i" and m.size and m.min() < 0:
            raise ValueError(f"mask labels must be >= 0; got {int(m.min())} in mask {i}")
    return masks


def decision_patterns(masks: Sequence[np.ndarray], n_classes: int) -> DecisionPatterns:
    """Reduce R masks ``(H, W)`` with labels in ``0 .. n_classes - 1`` to their decision patterns.

    Each pixel's vector is encoded as one integer (base ``n_classes``). Up to 2^22 possible
    codes they are counted with ``np.bincount``; beyond, found with ``np.unique``.
    Raises ``ValueError`` for invalid masks or labels >= ``n_classes``.
    """
    masks = _stack_check(masks)
    top = max(int(m.max()) if m.size else 0 for m in masks)
    if top >= n_classes:
        raise ValueError(f"mask labels must be < n_classes={n_classes}; got {top}")
    n_experts = len(masks)
    shape = masks[0].shape
    n_codes = n_classes ** n_experts
    if n_codes <= 1 << 63:
        dtype = images.smallest_uint(n_codes - 1)
        codes = masks[-1].astype(dtype).ravel()
        for m in reversed(masks[:-1]):
            codes *= dtype.type(n_classes)
            codes += m.ravel()
        if n_codes <= _MAX_COUNTED_CODES:
            counts = np.bincount(codes, minlength=n_codes)
            present = np.flatnonzero(counts)
            counts = counts[present].astype(np.int64)
            patterns = _decode(present, n_classes, n_experts)
            return DecisionPatterns(patterns, counts, shape, codes, present, n_codes)
        unique, inverse, counts = np.unique(codes, return_inverse=True, return_counts=True)
        patterns = _decode(unique, n_classes, n_experts)
        return DecisionPatterns(patterns, counts.astype(np.int64), shape, inverse.ravel(), None, len(unique))
    stack = np.stack([m.ravel() for m in masks], axis=1)
    patterns, inverse, counts = np.unique(stack, axis=0, return_inverse=True, return_counts=True)
    return DecisionPatterns(patterns, counts.astype(np.int64), shape, inverse.ravel(), None, len(patterns))


def _decode(codes: np.ndarray, n_classes: int, n_experts: int) -> np.ndarray:
    codes = codes.astype(np.uint64)
    out = np.empty((len(codes), n_experts), np.int64)
    for r in range(n_experts):
        out[:, r] = codes % np.uint64(n_classes)
        codes = codes // np.uint64(n_classes)
    return out


# Results


@dataclasses.dataclass(frozen=True)
class FusionResult:
    """One image's fused mask and how each expert compares with it.

    ``labels``: (H, W) fused labels (smallest unsigned dtype).
    ``probabilities``: None unless asked for; binary (H, W) float32 probability of
    foreground, multi-class (H, W, C) float32 posterior per class (for majority voting,
    the fraction of experts voting for the class).
    ``agreement``: (H, W) uint8, binary: how many experts marked the pixel as foreground;
    multi-class: how many experts gave the fused label.
    ``dice``: (R, C) Dice of each expert against the fused mask per class (NaN where both
    are empty). ``sensitivity`` / ``specificity``: STAPLE only, (R,) for binary masks, (R, C)
    per class (one class against the rest) for multi-class masks; None for voting.
    ``confusion``: multi-class STAPLE only, (R, C, C) with ``confusion[r, j, c]`` = P(expert r
    says j | truth is c). ``iterations``: EM rounds run (0 for voting).
    """

    labels: np.ndarray
    probabilities: np.ndarray | None
    agreement: np.ndarray
    dice: np.ndarray
    sensitivity: np.ndarray | None = None
    specificity: np.ndarray | None = None
    confusion: np.ndarray | None = None
    iterations: int = 0
    converged: bool = True


def _unique_argmax(scores: np.ndarray, undecided_label: int) -> np.ndarray:
    """Per row of ``scores`` (P, C): the column of the unique positive maximum, else undecided."""
    best = scores.max(axis=1)
    labels = scores.argmax(axis=1)
    decided = (np.count_nonzero(scores == best[:, None], axis=1) == 1) & (best > 0)
    return np.where(decided, labels, undecided_label)


def _vote(decisions: np.ndarray, undecided_label: int) -> np.ndarray:
    """Per pattern (P, R): the label given by most experts when it is unique, else undecided.

    Works on the sorted decisions, so memory is O(P * R^2) whatever the number of classes.
    """
    ordered = np.sort(decisions, axis=1)
    votes = (ordered[:, :, None] == ordered[:, None, :]).sum(axis=2)  # (P, R): votes for each entry's label
    best = votes.max(axis=1)
    # the winning label occupies `best` entries; any other label with as many votes doubles that
    unique = np.count_nonzero(votes == best[:, None], axis=1) == best
    winner = ordered[np.arange(len(ordered)), votes.argmax(axis=1)]
    return np.where(unique, winner, undecided_label)


def _one_hot(decisions: np.ndarray, n_classes: int):
    """(P, R * C) indicator of (expert r says j) at column r * C + j: dense when small, else sparse CSR."""
    n_patterns, n_experts = decisions.shape
    columns = decisions + np.arange(n_experts) * n_classes
    if n_patterns * n_experts * n_classes <= 1 << 22:
        dense = np.zeros((n_patterns, n_experts * n_classes))
        dense[np.arange(n_patterns)[:, None], columns] = 1.0
        return dense
    from scipy import sparse

    rows = np.repeat(np.arange(n_patterns), n_experts)
    return sparse.csr_matrix((np.ones(rows.size), (rows, columns.ravel())),
                             shape=(n_patterns, n_experts * n_classes))


def _pattern_dice(patterns: np.ndarray, counts: np.ndarray, fused: np.ndarray, n_classes: int) -> np.ndarray:
    """(R, C) Dice of each expert against the fused labels, from pattern counts."""
    weights = counts.astype(np.float64)
    decided = fused < n_classes  # an undecided label >= C belongs to no class
    fused_area = np.bincount(fused[decided], weights=weights[decided], minlength=n_classes)[:n_classes]
    dice = np.empty((patterns.shape[1], n_classes))
    for r in range(patterns.shape[1]):
        said = patterns[:, r]
        same = said == fused
        intersection = np.bincount(said[same], weights=weights[same], minlength=n_classes)
        total = np.bincount(said, weights=weights, minlength=n_classes) + fused_area
        with np.errstate(invalid="ignore", divide="ignore"):
            dice[r] = np.where(total > 0, 2 * intersection / total, np.nan)
    return dice


def _labels_dtype(n_labels: int, undecided_label: int) -> np.dtype:
    return images.smallest_uint(max(n_labels - 1, undecided_label, 1))


def _check_classes(masks: list[np.ndarray], n_classes: int | None) -> int:
    top = max(int(m.max()) if m.size else 0 for m in masks)
    if n_classes is None:
        return max(top + 1, 2)
    if n_classes < 2:
        raise ValueError(f"n_classes must be at least 2; got {n_classes}")
    if top >= n_classes:
        raise ValueError(f"mask labels must be < n_classes={n_classes}; got {top}. "
                         "Leave n_classes out to take the largest label + 1")
    return n_classes


def _check_iterations(max_iterations: int, tolerance: float) -> None:
    if not isinstance(max_iterations, (int, np.integer)) or max_iterations < 1:
        raise ValueError(f"max_iterations must be an integer >= 1; got {max_iterations!r}")
    if not (tolerance > 0 and math.isfinite(tolerance)):
        raise ValueError(f"tolerance must be a finite number > 0; got {tolerance!r}")


# Binary STAPLE


def _staple_binary_em(decisions: np.ndarray, counts: np.ndarray, max_iterations: int,
                      tolerance: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, bool]:
    """EM of ITK's STAPLEImageFilter on pattern counts.

    ``decisions``: (P, R) 0/1; ``counts``: (P,). Returns ``(W, p, q, iterations, converged)``
    with W (P,) the posterior probability of foreground per pattern.
    """
    d = decisions.astype(np.float64)
    n = counts.astype(np.float64)
    weight = d.mean(axis=1)
    prior = float(n @ weight / n.sum())
    n_experts = d.shape[1]
    if prior in (0.0, 1.0):
        # Every expert marked nothing (or everything): no EM to run, one class is undefined.
        p = np.full(n_experts, np.nan if prior == 0.0 else 1.0)
        q = np.full(n_experts, 1.0 if prior == 0.0 else np.nan)
        return weight, p, q, 0, True
    p = q = last_p = last_q = None
    iteration, converged = 0, False
    for iteration in range(1, max_iterations + 1):
        nw, nv = n * weight, n * (1.0 - weight)
        p_denominator, q_denominator = nw.sum(), nv.sum()
        p = d.T @ nw / p_denominator if p_denominator > 0 else last_p
        q = (1.0 - d).T @ nv / q_denominator if q_denominator > 0 else last_q
        alpha = np.prod(np.where(decisions == 1, p, 1.0 - p), axis=1) * prior
        beta = np.prod(np.where(decisions == 1, 1.0 - q, q), axis=1) * (1.0 - prior)
        total = alpha + beta
        weight = np.divide(alpha, total, out=np.full_like(alpha, prior), where=total > 0)
        if last_p is not None and np.all(np.abs(p - last_p) <= tolerance) and np.all(np.abs(q - last_q) <= tolerance):
            converged = True
            break
        last_p, last_q = p, q
    return weight, p, q, iteration, converged


def staple_binary(masks: Sequence[np.ndarray], max_iterations: int = DEFAULT_MAX_ITERATIONS,
                  tolerance: float = DEFAULT_TOLERANCE["binary"], return_probabilities: bool = False) -> FusionResult:
    """STAPLE for binary masks (SimpleITK ``STAPLE`` with foreground 1).

    ``masks``: R >= 2 arrays (H, W) of 0 (background) and 1 (foreground); any non-zero
    label counts as foreground. The fused label is 1 where the posterior probability of
    foreground is >= 0.5. ``sensitivity`` / ``specificity`` are (R,) (NaN when the image
    has no foreground, respectively no background, in any mask).
    Raises ``ValueError`` for fewer than two masks, differing shapes or invalid settings.
    """
    _check_iterations(max_iterations, tolerance)
    masks = [(m != 0).view(np.uint8) for m in _stack_check(masks)]
    patterns = decision_patterns(masks, 2)
    weight, p, q, iterations, converged = _staple_binary_em(patterns.patterns, patterns.counts, max_iterations,
                                                             tolerance)
    if not converged:
        logger.warning("STAPLE did not converge in %d iterations (tolerance %g); the result is the last estimate. "
                       "Raise max_iterations", max_iterations, tolerance)
    fused = (weight >= 0.5).astype(np.uint8)
    return FusionResult(
        labels=patterns.expand(fused),
        probabilities=patterns.expand(weight.astype(np.float32)) if return_probabilities else None,
        agreement=patterns.expand(patterns.patterns.sum(axis=1).astype(np.uint8)),
        dice=_pattern_dice(patterns.patterns, patterns.counts, fused, 2),
        sensitivity=p, specificity=q, iterations=iterations, converged=converged)


# Multi-class STAPLE


def _log(values: np.ndarray) -> np.ndarray:
    """Natural log with log(0) = -1e300: finite, so that 0 * log(0) = 0 in a matrix product."""
    out = np.full(values.shape, _LOG_ZERO)
    np.log(values, out=out, where=values > 0)
    return out


_LOG_ZERO = -1e300


def _staple_multiclass_em(decisions: np.ndarray, counts: np.ndarray, n_classes: int, max_iterations: int,
                          tolerance: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, bool]:
    """EM of ITK's MultiLabelSTAPLEImageFilter on pattern counts.

    ``decisions``: (P, R) labels; ``counts``: (P,). Returns ``(W, confusion, prior,
    iterations, converged)``: W (P, C) the unnormalised posterior weights of the final
    E-step, confusion (R, C, C) with [r, j, c] = P(expert r says j | truth c).
    """
    n_patterns, n_experts = decisions.shape
    n = counts.astype(np.float64)
    says = _one_hot(decisions, n_classes)  # (P, R * C)
    prior = np.bincount(decisions.ravel(), weights=np.repeat(n, n_experts), minlength=n_classes)
    prior /= prior.sum()
    # Start from the majority vote: [r, j, c] = share of expert r's label-j pixels voted c.
    vote = _vote(decisions, n_classes)
    voted = np.zeros((n_patterns, n_classes))
    decided = vote < n_classes  # undecided patterns are left out
    voted[np.flatnonzero(decided), vote[decided]] = n[decided]
    confusion = np.asarray(says.T @ voted)  # (R * J, C)
    row_sums = confusion.reshape(n_experts, n_classes, n_classes).sum(axis=2).reshape(-1, 1)
    confusion = np.divide(confusion, row_sums, out=confusion, where=row_sums > 0)
    log_prior = _log(prior)

    def posterior(confusion: np.ndarray) -> np.ndarray:
        # prior[c] * prod_r confusion[r, d_r, c], as one matrix product in the log domain
        return np.exp(np.asarray(says @ _log(confusion)) + log_prior)  # (P, C)

    iteration, converged = 0, False
    for iteration in range(1, max_iterations + 1):
        weight = posterior(confusion)
        sums = weight.sum(axis=1, keepdims=True)
        np.divide(weight, sums, out=weight, where=sums > 0)
        weight *= n[:, None]
        updated = np.asarray(says.T @ weight).reshape(n_experts, n_classes, n_classes)
        column_sums = updated.sum(axis=1, keepdims=True)
        updated = np.divide(updated, column_sums, out=updated, where=column_sums > 0).reshape(-1, n_classes)
        change = float(np.abs(updated - confusion).max())
        confusion = updated
        if change < tolerance:
            converged = True
            break
    return posterior(confusion), confusion.reshape(n_experts, n_classes, n_classes), prior, iteration, converged


def staple_multiclass(masks: Sequence[np.ndarray], n_classes: int | None = None,
                      max_iterations: int = DEFAULT_MAX_ITERATIONS, tolerance: float = DEFAULT_TOLERANCE["multiclass"],
                      undecided_label: int = 0, return_probabilities: bool = False) -> FusionResult:
    """Multi-class STAPLE (SimpleITK ``MultiLabelSTAPLE``) with per-expert confusion matrices.

    ``masks``: R >= 2 arrays (H, W) with labels 0 .. C - 1; ``n_classes`` None takes the
    largest label + 1. The fused label is the class of largest posterior; ties (and
    patterns that no class explains) get ``undecided_label``. ``sensitivity[r, c]`` =
    P(expert says c | truth c), ``specificity[r, c]`` = P(expert says not c | truth not c),
    both from the final posterior. Raises ``ValueError`` for invalid masks or settings.
    """
    _check_iterations(max_iterations, tolerance)
    masks = _stack_check(masks)
    n_classes = _check_classes(masks, n_classes)
    patterns = decision_patterns(masks, n_classes)
    size = len(patterns.counts) * n_classes
    if size > MAX_POSTERIOR_VALUES:
        raise ValueError(f"multi-class STAPLE must hold at most {MAX_POSTERIOR_VALUES} posterior values (decision "
                         f"patterns x classes); got {len(patterns.counts)} x {n_classes} = {size}. With this many "
                         "classes the masks are likely instance masks (mask_type instance); otherwise use "
                         "majority voting")
    weight, confusion, _, iterations, converged = _staple_multiclass_em(
        patterns.patterns, patterns.counts, n_classes, max_iterations, tolerance)
    if not converged:
        logger.warning("multi-class STAPLE did not converge in %d iterations (tolerance %g); the result is the last "
                       "estimate. Raise max_iterations", max_iterations, tolerance)
    fused = _unique_argmax(weight, undecided_label)
    sums = weight.sum(axis=1, keepdims=True)
    posterior = np.divide(weight, sums, out=np.zeros_like(weight), where=sums > 0)
    sensitivity, specificity = _class_rates(patterns.patterns, patterns.counts, posterior, n_classes)
    dtype = _labels_dtype(n_classes, undecided_label)
    return FusionResult(
        labels=patterns.expand(fused.astype(dtype)),
        probabilities=patterns.expand(posterior.astype(np.float32)) if return_probabilities else None,
        agreement=patterns.expand(np.count_nonzero(patterns.patterns == fused[:, None], axis=1).astype(np.uint8)),
        dice=_pattern_dice(patterns.patterns, patterns.counts, fused, n_classes),
        sensitivity=sensitivity, specificity=specificity, confusion=confusion,
        iterations=iterations, converged=converged)


def _class_rates(decisions: np.ndarray, counts: np.ndarray, posterior: np.ndarray,
                 n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(R, C) per-class sensitivity and specificity of each expert under the posterior (P, C)."""
    # mass[r, j, c]: expected number of pixels where expert r says j and the truth is c
    mass = np.asarray(_one_hot(decisions, n_classes).T @ (posterior * counts[:, None]))
    mass = mass.reshape(decisions.shape[1], n_classes, n_classes)
    truth = mass.sum(axis=1)  # (R, C)
    diagonal = np.einsum("rcc->rc", mass)
    said = mass.sum(axis=2)  # (R, J)
    total = truth.sum(axis=1, keepdims=True)
    # pixels where the truth is not c and the expert does not say c
    true_negative = total - truth - said + diagonal
    with np.errstate(invalid="ignore", divide="ignore"):
        sensitivity = np.where(truth > 0, diagonal / truth, np.nan)
        specificity = np.where(total - truth > 0, true_negative / (total - truth), np.nan)
    return sensitivity, specificity


# Majority vote


def majority_vote(masks: Sequence[np.ndarray], n_classes: int | None = None, undecided_label: int = 0,
                  return_probabilities: bool = False) -> FusionResult:
    """Majority voting (SimpleITK ``LabelVoting``): the label most experts gave, when unique.

    ``masks``: R >= 2 arrays (H, W) with labels 0 .. C - 1. Ties get ``undecided_label``
    (by default background). ``probabilities`` (when asked) are the vote shares (H, W, C),
    or (H, W) for two classes. Raises ``ValueError`` for invalid masks.
    """
    masks = _stack_check(masks)
    n_classes = _check_classes(masks, n_classes)
    patterns = decision_patterns(masks, n_classes)
    decisions = patterns.patterns
    fused = _vote(decisions, undecided_label)
    shares = None
    if return_probabilities:
        if n_classes == 2:
            share = decisions.mean(axis=1).astype(np.float32)
        else:
            share = np.zeros((len(decisions), n_classes), np.float32)
            for r in range(decisions.shape[1]):
                share[np.arange(len(decisions)), decisions[:, r]] += 1.0 / decisions.shape[1]
        shares = patterns.expand(share)
    binary = n_classes == 2
    if binary:
        agreement = decisions.sum(axis=1)
    else:
        agreement = np.count_nonzero(decisions == fused[:, None], axis=1)
    return FusionResult(
        labels=patterns.expand(fused.astype(_labels_dtype(n_classes, undecided_label))),
        probabilities=shares, agreement=patterns.expand(agreement.astype(np.uint8)),
        dice=_pattern_dice(patterns.patterns, patterns.counts, fused, n_classes))


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
        raise ValueError(f"instance mask must be 2D (H, W); got shape {instances.shape}")
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
    """F1 of object matching between two instance masks (H, W): a pair matches when IoU > threshold.

    With a threshold >= 0.5 an object can match at most one other, so the matched pairs
    are counted directly. Returns NaN when neither mask holds an object.
    """
    if not 0.5 <= iou_threshold < 1:
        raise ValueError(f"iou_threshold must be in [0.5, 1); got {iou_threshold}")
    a = _compact_labels(np.asarray(reference).ravel())
    b = _compact_labels(np.asarray(prediction).ravel())
    if a.shape != b.shape:
        raise ValueError(f"instance masks must have the same shape; got {np.shape(reference)} and "
                         f"{np.shape(prediction)}")
    n_a, n_b = int(a.max(initial=0)), int(b.max(initial=0))
    area_a = np.bincount(a, minlength=n_a + 1)
    area_b = np.bincount(b, minlength=n_b + 1)
    objects_a, objects_b = np.count_nonzero(area_a[1:]), np.count_nonzero(area_b[1:])
    if objects_a + objects_b == 0:
        return float("nan")
    both = (a != 0) & (b != 0)
    pairs = a[both].astype(np.int64) * (n_b + 1) + b[both]
    if (n_a + 1) * (n_b + 1) <= _MAX_COUNTED_CODES:
        overlap = np.bincount(pairs, minlength=(n_a + 1) * (n_b + 1))
        pairs = np.flatnonzero(overlap)
        overlap = overlap[pairs]
    else:
        pairs, overlap = np.unique(pairs, return_counts=True)
    i, j = pairs // (n_b + 1), pairs % (n_b + 1)
    iou = overlap / (area_a[i] + area_b[j] - overlap)
    matched = int(np.count_nonzero(iou > iou_threshold))
    return 2.0 * matched / (objects_a + objects_b)


def _compact_labels(labels: np.ndarray) -> np.ndarray:
    """Renumber sparse labels (largest label above the pixel count) to 0..K, keeping 0."""
    if labels.size and int(labels.max()) > labels.size:
        unique, inverse = np.unique(labels, return_inverse=True)
        return (inverse + (0 if unique[0] == 0 else 1)).ravel()
    return labels


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


def _check_values(masks: list[np.ndarray], paths: list[Path], mask_type: str, how: str) -> None:
    if mask_type != "binary":
        return
    for mask, path in zip(masks, paths):
        top = int(mask.max()) if mask.size else 0
        if top > 1:
            raise FusionError(f"binary mask values must be 0 and 1 (or 0 and 255); got labels up to {top} in {path} "
                              f"(mask type binary {how}). Pass --mask_type multiclass or instance")


# Fusing one image


@dataclasses.dataclass(frozen=True)
class ImageFusion:
    """One image fused: the mask to write, the result, per-expert metrics rows."""

    key: str
    mask: np.ndarray  # (H, W) labels as written: binary 0/255, multi-class labels, instance ids
    result: FusionResult
    rows: list[dict]


def fuse_masks(masks: Sequence[np.ndarray], mask_type: str, method: str = "staple",
               undecided_label: int = 0, max_iterations: int = DEFAULT_MAX_ITERATIONS,
               tolerance: float | None = None, return_probabilities: bool = False) -> tuple[np.ndarray, FusionResult,
                                                                                            list[dict]]:
    """Fuse the R masks (H, W) of one image and measure every expert against the result.

    Returns ``(fused, result, metrics)``: fused (H, W) labels (instance ids for
    ``mask_type="instance"``, 0/1 for binary), the :class:`FusionResult` of the semantic
    fusion, and one dict of metrics per expert (``dice``, ``dice_class_<c>``,
    ``f1_iou50``, ``sensitivity``, ``specificity`` ... as they apply).
    Raises ``ValueError`` for an unknown method or mask type.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if mask_type not in MASK_TYPES:
        raise ValueError(f"mask_type must be one of {', '.join(MASK_TYPES)}; got {mask_type!r}")
    masks = _stack_check(masks)
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
    metrics = []
    for r, mask in enumerate(masks):
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
        metrics.append({k: float(v) for k, v in row.items()})
    return fused, result, metrics


# Folders


@dataclasses.dataclass(frozen=True)
class ImageJob:
    """The masks of one image: expert name -> file, the experts without one, the output name."""

    key: str
    files: dict[str, Path]
    missing: list[str]
    output_name: str


@dataclasses.dataclass(frozen=True)
class FusionReport:
    """What :func:`fuse_folder` did: settings, per-image rows, per-expert summary, output paths."""

    mask_type: str
    mask_type_reason: str
    experts: list[str]
    n_images: int
    rows: list[dict]
    summary: list[dict]
    output_folder: Path
    seconds: float


def output_folder_problem(input_folder: str | os.PathLike, output_folder: str | os.PathLike) -> str | None:
    """A message when the output folder would mix with the inputs, else None."""
    source, target = Path(input_folder).resolve(), Path(output_folder).resolve()
    if target == source or source in target.parents:
        return (f"output_folder must not be inside input_folder; got {str(output_folder)!r} in {str(input_folder)!r}. "
                "Every sub-folder of the input folder is read as an expert; write elsewhere")
    return None


def find_experts(input_folder: str | os.PathLike) -> dict[str, Path]:
    """Expert name -> folder: the visible sub-folders of ``input_folder``, sorted by name.

    Raises ``FileNotFoundError`` when the folder does not exist.
    """
    folder = Path(input_folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"input_folder must be an existing folder; got {str(folder)!r}")
    return {p.name: p for p in sorted(folder.iterdir()) if p.is_dir() and not p.name.startswith(".")}


def plan_fusion(input_folder: str | os.PathLike, output_format: str | None = None) -> tuple[list[ImageJob], list[str]]:
    """Match masks across experts by file key and check the layout from file headers.

    Returns ``(jobs, problems)``. Problems: fewer than two expert folders, an expert folder
    without masks, duplicate keys, an image with fewer than two masks, unreadable or
    non-2D masks, masks of one image with different shapes (both paths and shapes).
    Experts missing for an image are not problems; they are listed in ``ImageJob.missing``.
    """
    if output_format is not None and output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output_format must be one of {', '.join(OUTPUT_FORMATS)}; got {output_format!r}")
    folder = Path(input_folder)
    experts = find_experts(folder)
    problems: list[str] = []
    if len(experts) < 2:
        loose = len(images.list_images(folder)[0])
        hint = f" (it holds {loose} image file(s) directly: pass the parent of the experts' folders)" if loose else ""
        problems.append(f"input_folder must hold one sub-folder per expert, at least two; got {len(experts)} "
                        f"({', '.join(experts) or 'none'}) in {folder}{hint}")
        return [], problems
    files: dict[str, dict[str, Path]] = {}
    for name, expert_folder in experts.items():
        found, duplicates = images.list_images(expert_folder)
        problems += duplicates
        if not found:
            problems.append(f"expert folder must hold mask files ({', '.join(images.IMAGE_EXTENSIONS)}); got none in "
                            f"{expert_folder}. Remove the folder or add that expert's masks")
        files[name] = found
    jobs = []
    for key in sorted(set().union(*(f.keys() for f in files.values()))):
        present = {name: files[name][key] for name in experts if key in files[name]}
        missing = [name for name in experts if key not in files[name]]
        if len(present) < 2:
            (name, path), = present.items()
            problems.append(f"image {key!r} must have masks from at least two experts; got only {name} ({path})")
            continue
        problems += _check_headers(key, present)
        first = next(iter(present.values()))
        suffix = first.suffix
        if output_format is not None:
            suffix = ".png" if output_format == "png" else ".tif"
        elif suffix.lower() in (".jpg", ".jpeg"):
            suffix = ".png"  # never write labels with a lossy codec
        jobs.append(ImageJob(key, present, missing, key + suffix))
    return jobs, problems


def _check_headers(key: str, present: dict[str, Path]) -> list[str]:
    problems, shapes = [], {}
    for name, path in present.items():
        try:
            info = images.read_info(path)
        except images.ImageReadError as exc:
            problems.append(f"unreadable mask: {exc}")
            continue
        if info.is_volume:
            problems.append(f"mask must be 2D; got a stack of shape (Z, Y, X, C) = {info.shape} in {path}")
        elif info.shape[2] not in (1, 2, 3, 4):
            problems.append(f"mask must have one channel; got {info.shape[2]} in {path}")
        else:
            shapes[name] = info.shape[:2]
    if shapes:
        reference = next(iter(shapes))
        for name, shape in shapes.items():
            if shape != shapes[reference]:
                problems.append(f"masks of image {key!r} must all have the same shape; got {shapes[reference][0]}x"
                                f"{shapes[reference][1]} (HxW) in {present[reference]} and {shape[0]}x{shape[1]} in "
                                f"{present[name]}")
    return problems


def _warn_missing(jobs: list[ImageJob], experts: list[str]) -> None:
    for expert in experts:
        lacking = [job.key for job in jobs if expert in job.missing]
        if lacking:
            shown = ", ".join(lacking[:10]) + (f" and {len(lacking) - 10} more" if len(lacking) > 10 else "")
            logger.warning("expert %s has no mask for %d image(s): %s; those are fused from the other experts",
                           expert, len(lacking), shown)


def fuse_folder(input_folder: str | os.PathLike, output_folder: str | os.PathLike, method: str = "staple",
                mask_type: str = "auto", undecided_label: int = 0, max_iterations: int = DEFAULT_MAX_ITERATIONS,
                tolerance: float | None = None, save_probabilities: bool = False, output_format: str | None = None,
                command: Sequence[str] | None = None) -> FusionReport:
    """Fuse every image's expert masks in ``input_folder/<expert>/<key>.<ext>`` into ``output_folder``.

    Writes ``<key>.<ext>`` fused masks (binary as 0/255 uint8, multi-class labels, instance
    ids), ``agreement/<key>.png`` (uint8 count of experts: binary and instance, how many
    marked the pixel as foreground; multi-class, how many gave the fused label),
    ``probabilities/<key>.tif`` (float32, when ``save_probabilities``), ``fusion_per_image.csv``
    (one row per image and expert), ``fusion_summary.csv`` (per expert: mean and std over
    images) and ``fusion.json`` (settings and provenance).

    Outputs go to a hidden staging folder beside ``output_folder`` and move into place only
    when every image is fused, so a failed run leaves nothing behind.
    ``mask_type`` "auto" decides from the first image (see :func:`detect_mask_type`).
    Raises ``images.DatasetError`` listing every layout problem before anything is written,
    ``FusionError`` when mask values do not fit the mask type, ``ValueError`` for bad settings.
    """
    started = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if mask_type != "auto" and mask_type not in MASK_TYPES:
        raise ValueError(f"mask_type must be auto or one of {', '.join(MASK_TYPES)}; got {mask_type!r}")
    if not isinstance(undecided_label, (int, np.integer)) or not 0 <= undecided_label <= 65535:
        raise ValueError(f"undecided_label must be an integer in 0..65535; got {undecided_label!r}")
    _check_iterations(max_iterations, tolerance if tolerance is not None else 1.0)
    problem = output_folder_problem(input_folder, output_folder)
    if problem:
        raise ValueError(problem)
    output_folder = Path(output_folder)
    jobs, problems = plan_fusion(input_folder, output_format)
    if problems:
        raise images.DatasetError(problems, title=f"The expert masks in {input_folder} have problems")
    experts = list(find_experts(input_folder))
    _warn_missing(jobs, experts)

    how, reason = "as given", "set by the caller"
    first_masks = None
    if mask_type == "auto":
        first_masks = [images.read_mask(p) for p in jobs[0].files.values()]
        mask_type, reason = detect_mask_type(first_masks)
        how = f"detected from {jobs[0].key!r}"
        logger.info("mask type: %s (%s: %s); pass --mask_type to override", mask_type, how, reason)

    output_folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_folder.name}.partial-", dir=output_folder.parent))
    rows: list[dict] = []
    try:
        for index, job in enumerate(jobs):
            tic = time.perf_counter()
            paths = list(job.files.values())
            masks = first_masks if index == 0 and first_masks is not None else [images.read_mask(p) for p in paths]
            _check_values(masks, paths, mask_type, how)
            fused, result, metrics = fuse_masks(masks, mask_type, method, undecided_label, max_iterations, tolerance,
                                                save_probabilities)
            _write_image_outputs(staging, job, mask_type, fused, result)
            for expert, path, metric in zip(job.files, paths, metrics):
                rows.append({"image": job.key, "expert": expert, "mask_file": str(path), "n_experts": len(paths),
                             **metric, "iterations": result.iterations, "converged": result.converged})
            logger.info("%s: %d experts%s, %s%s, %.2f s", job.key, len(paths),
                        f" (missing {', '.join(job.missing)})" if job.missing else "", method,
                        f" {result.iterations} iterations" if method == "staple" else "",
                        time.perf_counter() - tic)
        summary = summarize(rows, experts)
        resolved_tolerance = tolerance or DEFAULT_TOLERANCE["multiclass" if mask_type == "multiclass" else "binary"]
        metrics = _metric_columns(rows)
        _write_csv(staging / PER_IMAGE_CSV, rows, ROW_HEAD + tuple(metrics) + ROW_TAIL)
        _write_csv(staging / SUMMARY_CSV, summary,
                   ("expert", "n_images") + tuple(f"{m}_{s}" for m in metrics for s in ("mean", "std")))
        settings = {"command": list(command) if command is not None else None,
                    "input_folder": str(Path(input_folder).resolve()), "experts": experts, "method": method,
                    "mask_type": mask_type, "mask_type_reason": f"{how}: {reason}", "undecided_label": undecided_label,
                    "max_iterations": max_iterations, "tolerance": resolved_tolerance,
                    "save_probabilities": save_probabilities,
                    "iou_threshold": IOU_THRESHOLD, "python": sys.version.split()[0], "numpy": np.__version__,
                    "images": [{"key": j.key, "experts": list(j.files), "missing": j.missing,
                                "output": j.output_name} for j in jobs]}
        _write_text(staging / SETTINGS_JSON, json.dumps(settings, indent=2) + "\n")
        _commit(staging, output_folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return FusionReport(mask_type, f"{how}: {reason}", experts, len(jobs), rows, summary, output_folder,
                        time.perf_counter() - started)


def _write_image_outputs(staging: Path, job: ImageJob, mask_type: str, fused: np.ndarray,
                         result: FusionResult) -> None:
    mask = fused
    if mask_type == "binary":
        mask = fused.astype(np.uint8, copy=True)
        mask[fused == 1] = 255  # viewable; read_mask turns 0/255 back into 0/1
    name = job.output_name
    if mask.dtype.itemsize > 2 and not name.lower().endswith((".tif", ".tiff")):
        logger.warning("%s: %s needs %s labels, which PNG cannot hold; writing %s.tif", job.key, name, mask.dtype,
                       job.key)
        name = job.key + ".tif"
    images.write_image(staging / name, mask)
    images.write_image(staging / AGREEMENT_FOLDER / f"{job.key}.png", result.agreement)
    if result.probabilities is not None:
        images.write_image(staging / PROBABILITY_FOLDER / f"{job.key}.tif", result.probabilities)


def _commit(staging: Path, output_folder: Path) -> None:
    """Move the staged outputs into ``output_folder`` (one rename when it does not exist yet)."""
    if not output_folder.exists():
        os.replace(staging, output_folder)
        return
    for source in sorted(staging.rglob("*")):
        if source.is_file():
            target = output_folder / source.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)
    shutil.rmtree(staging, ignore_errors=True)


METRIC_ORDER = ("dice", "f1_iou50", "sensitivity", "specificity")
ROW_HEAD = ("image", "expert", "mask_file", "n_experts")
ROW_TAIL = ("iterations", "converged")


def _metric_columns(rows: list[dict]) -> list[str]:
    """The metric names found in ``rows``, in reading order (dice, dice per class, f1, ...)."""
    keys = {k for row in rows for k in row if k not in ROW_HEAD + ROW_TAIL}

    def order(key: str) -> tuple:
        head = next((i for i, m in enumerate(METRIC_ORDER) if key == m or key.startswith(m + "_class_")),
                    len(METRIC_ORDER))
        return head, int(key.rsplit("_", 1)[1]) if "_class_" in key else -1, key

    return sorted(keys, key=order)


def summarize(rows: list[dict], experts: Sequence[str]) -> list[dict]:
    """Per expert: number of images and mean / std (over images, ignoring NaN) of every metric."""
    columns = _metric_columns(rows)
    summary = []
    for expert in experts:
        mine = [row for row in rows if row["expert"] == expert]
        entry: dict = {"expert": expert, "n_images": len(mine)}
        for column in columns:
            values = np.array([row.get(column, np.nan) for row in mine], dtype=np.float64)
            finite = values[np.isfinite(values)]
            entry[f"{column}_mean"] = float(finite.mean()) if finite.size else float("nan")
            entry[f"{column}_std"] = float(finite.std()) if finite.size else float("nan")
        summary.append(entry)
    return summary


def _format(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else format(value, ".6g")
    return str(value)


def _write_csv(path: Path, rows: list[dict], fields: Sequence[str]) -> None:

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(fields)
    writer.writerows([[_format(row.get(f, float("nan"))) for f in fields] for row in rows])
    _write_text(path, buffer.getvalue())


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
