"""Majority voting (``itk::LabelVotingImageFilter``): the label with the most votes when it is
unique, otherwise ``undecided_label``. Computed on decision patterns (:mod:`.patterns`)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .patterns import FusionResult, check_classes, check_masks, decision_patterns, labels_dtype, pattern_dice


def vote_patterns(decisions: np.ndarray, undecided_label: int) -> np.ndarray:
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


def majority_vote(masks: Sequence[np.ndarray], n_classes: int | None = None, undecided_label: int = 0,
                  return_probabilities: bool = False) -> FusionResult:
    """Majority voting (SimpleITK ``LabelVoting``): the label most experts gave, when unique.

    ``masks``: R >= 2 arrays (H, W) with labels 0 .. C - 1. Ties get ``undecided_label``
    (by default background). ``probabilities`` (when asked) are the vote shares (H, W, C),
    or (H, W) for two classes. Raises ``FusionError`` (a ``ValueError``) for invalid masks.
    """
    masks = check_masks(masks)
    n_classes = check_classes(masks, n_classes)
    patterns = decision_patterns(masks, n_classes)
    decisions = patterns.patterns
    fused = vote_patterns(decisions, undecided_label)
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
        labels=patterns.expand(fused.astype(labels_dtype(n_classes, undecided_label))),
        probabilities=shares, agreement=patterns.expand(agreement.astype(np.uint8)),
        dice=pattern_dice(patterns.patterns, patterns.counts, fused, n_classes))
