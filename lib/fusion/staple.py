"""STAPLE (Warfield, Zou and Wells, IEEE TMI 23(7):903-921, 2004) on decision patterns.

The numbers follow ITK/SimpleITK, the reference implementations:

* :func:`staple_binary` is ``itk::STAPLEImageFilter``: initial foreground probability = mean
  of the experts' decisions, prior g = its image mean, then M-step (per-expert sensitivity p
  and specificity q) and E-step until no p or q moves by more than ``tolerance`` (ITK: 1e-7).
* :func:`staple_multiclass` is ``itk::MultiLabelSTAPLEImageFilter``: per-expert confusion
  matrices initialised from the majority vote, prior = label frequency over all experts,
  stop when no confusion-matrix entry moves by ``tolerance`` or more (ITK: 1e-5); the
  label is the unique argmax of the posterior, otherwise ``undecided_label``. (ITK's
  initialisation also counts pixels where the vote is undecided, by writing past the end
  of a matrix row; they are left out here. On very noisy masks, both stop at 1e-5 short of
  the fixed point from these slightly different starts, and labels can differ on a few
  tenths of a percent of pixels; at a tighter tolerance both reach the same answer.)
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from .patterns import (
    FusionError,
    FusionResult,
    check_classes,
    check_iterations,
    check_masks,
    decision_patterns,
    labels_dtype,
    pattern_dice,
)
from .vote import vote_patterns

logger = logging.getLogger(__name__)

# The same stopping rules as SimpleITK's STAPLE and MultiLabelSTAPLE filters.
DEFAULT_TOLERANCE = {"binary": 1e-7, "multiclass": 1e-5}
DEFAULT_MAX_ITERATIONS = 10000
# Multi-class STAPLE holds (decision patterns x classes) posterior values, several times over.
MAX_POSTERIOR_VALUES = 1 << 26


def _unique_argmax(scores: np.ndarray, undecided_label: int) -> np.ndarray:
    """Per row of ``scores`` (P, C): the column of the unique positive maximum, else undecided."""
    best = scores.max(axis=1)
    labels = scores.argmax(axis=1)
    decided = (np.count_nonzero(scores == best[:, None], axis=1) == 1) & (best > 0)
    return np.where(decided, labels, undecided_label)


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
    Raises ``FusionError`` (a ``ValueError``) for fewer than two masks or differing shapes,
    ``ConfigError`` (a ``ValueError``) for invalid settings.
    """
    check_iterations(max_iterations, tolerance)
    masks = [(m != 0).view(np.uint8) for m in check_masks(masks)]
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
        dice=pattern_dice(patterns.patterns, patterns.counts, fused, 2),
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
    vote = vote_patterns(decisions, n_classes)
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
    both from the final posterior. Raises ``FusionError`` for invalid masks or too many
    decision patterns, ``ConfigError`` for invalid settings (both ``ValueError``).
    """
    check_iterations(max_iterations, tolerance)
    masks = check_masks(masks)
    n_classes = check_classes(masks, n_classes)
    patterns = decision_patterns(masks, n_classes)
    size = len(patterns.counts) * n_classes
    if size > MAX_POSTERIOR_VALUES:
        raise FusionError(f"multi-class STAPLE must hold at most {MAX_POSTERIOR_VALUES} posterior values (decision "
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
    dtype = labels_dtype(n_classes, undecided_label)
    return FusionResult(
        labels=patterns.expand(fused.astype(dtype)),
        probabilities=patterns.expand(posterior.astype(np.float32)) if return_probabilities else None,
        agreement=patterns.expand(np.count_nonzero(patterns.patterns == fused[:, None], axis=1).astype(np.uint8)),
        dice=pattern_dice(patterns.patterns, patterns.counts, fused, n_classes),
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
