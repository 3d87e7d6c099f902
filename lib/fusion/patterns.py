"""Decision patterns: the reduction every fusion here works on, and the result of a fusion.

At one pixel, the R experts' labels form a vector (d_1, ..., d_R); STAPLE's E-step, the vote
and every per-expert count depend on the pixel only through that vector. An image is
therefore reduced once to its distinct vectors and how often each occurs (at most 2^R for
binary masks, C^R for C classes), the expectation-maximisation (:mod:`.staple`) or the vote
(:mod:`.vote`) runs on those counts, and the per-pattern answer is looked up back into the
image. One EM iteration costs O(patterns), not O(pixels), which is what makes hundreds of
iterations on noisy multi-class masks cheap.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from ..common.errors import BadInput
from ..common.settings import ConfigError
from ..store import images

# Above this many possible decision vectors, patterns are found by sorting instead of counting.
_MAX_COUNTED_CODES = 1 << 22


class FusionError(BadInput, ValueError):
    """Masks that cannot be fused as asked (values or shapes that do not fit): bad input, exit 2."""


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


def check_masks(masks: Sequence[np.ndarray]) -> list[np.ndarray]:
    """``masks`` as arrays; ``FusionError`` unless there are >= 2, all 2-D, of one shape, integer labels >= 0."""
    masks = [np.asarray(m) for m in masks]
    if len(masks) < 2:
        raise FusionError(f"number of masks must be at least 2; got {len(masks)}. "
                         "Fusion needs several experts' masks of the same image")
    shape = masks[0].shape
    if len(shape) != 2:
        raise FusionError(f"masks must be 2D (H, W); got shape {shape}")
    for i, m in enumerate(masks):
        if m.shape != shape:
            raise FusionError(f"masks must all have the same shape; got {shape} for mask 0 and {m.shape} for mask {i}")
        if m.dtype.kind not in "biu":
            raise FusionError(f"masks must hold integer labels; got dtype {m.dtype} for mask {i}")
        if m.dtype.kind == "i" and m.size and m.min() < 0:
            raise FusionError(f"mask labels must be >= 0; got {int(m.min())} in mask {i}")
    return masks


def decision_patterns(masks: Sequence[np.ndarray], n_classes: int) -> DecisionPatterns:
    """Reduce R masks ``(H, W)`` with labels in ``0 .. n_classes - 1`` to their decision patterns.

    Each pixel's vector is encoded as one integer (base ``n_classes``). Up to 2^22 possible
    codes they are counted with ``np.bincount``; beyond, found with ``np.unique``.
    Raises ``FusionError`` (a ``ValueError``) for invalid masks or labels >= ``n_classes``.
    """
    masks = check_masks(masks)
    top = max(int(m.max()) if m.size else 0 for m in masks)
    if top >= n_classes:
        raise FusionError(f"mask labels must be < n_classes={n_classes}; got {top}")
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


def pattern_dice(patterns: np.ndarray, counts: np.ndarray, fused: np.ndarray, n_classes: int) -> np.ndarray:
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


def labels_dtype(n_labels: int, undecided_label: int) -> np.dtype:
    """The smallest unsigned dtype for fused labels 0..n_labels - 1 and ``undecided_label``."""
    return images.smallest_uint(max(n_labels - 1, undecided_label, 1))


def check_classes(masks: list[np.ndarray], n_classes: int | None) -> int:
    """The number of classes: ``n_classes``, or the largest label + 1 (at least 2) when None."""
    top = max(int(m.max()) if m.size else 0 for m in masks)
    if n_classes is None:
        return max(top + 1, 2)
    if n_classes < 2:
        raise ConfigError([f"n_classes must be at least 2; got {n_classes}"])
    if top >= n_classes:
        raise FusionError(f"mask labels must be < n_classes={n_classes}; got {top}. "
                         "Leave n_classes out to take the largest label + 1")
    return n_classes


def check_iterations(max_iterations: int, tolerance: float) -> None:
    """Raise ``ConfigError`` for an iteration cap below 1 or a tolerance that is not a finite number > 0."""
    problems = iteration_problems(max_iterations, tolerance)
    if problems:
        raise ConfigError(problems)


def iteration_problems(max_iterations: int, tolerance: float | None) -> list[str]:
    """What is wrong with STAPLE's stopping settings (``tolerance`` None: the default), one line each."""
    problems = []
    if isinstance(max_iterations, bool) or not isinstance(max_iterations, (int, np.integer)) or max_iterations < 1:
        problems.append(f"max_iterations must be >= 1 (an integer); got {max_iterations!r}")
    if tolerance is not None and (isinstance(tolerance, bool) or not isinstance(tolerance, (int, float, np.number))
                                  or not (tolerance > 0 and math.isfinite(tolerance))):
        problems.append(f"tolerance must be a finite number > 0; got {tolerance!r}")
    return problems
