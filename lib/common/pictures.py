"""Pictures for people: one display stretch, one colour vocabulary, overlays, label colours, PNGs.

Every picture the toolkit draws (semantic and instance overlays, augmentation samples) goes
through here, so that a colour means the same thing in all of them:

==================  ===============  =====================================================
colour              constant         meaning
==================  ===============  =====================================================
green (0, 200, 0)   TRUE_POSITIVE    correct: right class / prediction matched to a truth
magenta             FALSE_POSITIVE   predicted where the truth has none (false positive)
blue (0, 120, 255)  FALSE_NEGATIVE   missed: in the truth, not predicted (false negative)
yellow              WRONG_CLASS      foreground of the wrong foreground class (semantic)
==================  ===============  =====================================================

Green against magenta stays apart for the common red-green colour blindnesses (the pairing
fluorescence microscopists use for two-channel merges), and blue and yellow are the other
axis of colour vision, so the four read apart for most viewers.

Overlays tint pixels by blending ``OVERLAY_ALPHA`` of the colour into the displayed image, the
same way in both kinds, so a false-positive or missed pixel looks the same in a semantic and
an instance overlay. Instance overlays also draw the inner outline of each prediction fully
opaque in its colour, so that touching objects stay apart.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .files import write_with

TRUE_POSITIVE = (0, 200, 0)
FALSE_POSITIVE = (230, 0, 230)
FALSE_NEGATIVE = (0, 120, 255)
WRONG_CLASS = (255, 200, 0)
OVERLAY_ALPHA = 0.45
# Longest side of a semantic overlay; larger images are subsampled for the picture only.
OVERLAY_MAX_SIDE = 4096
# The display stretch maps these percentiles of each channel to 0 and 255. Microscopy images
# hold hot pixels, saturated spots and dark borders: a min-max stretch lets one hot pixel
# darken the whole picture, while clipping 0.5 % at each end ignores them and still shows
# the full range of the cells (ImageJ's "Auto" contrast likewise saturates 0.35 %). The
# three stretches this replaced used 0.5-99.5 twice and 1-99 once.
DISPLAY_PERCENTILES = (0.5, 99.5)


def stretch(values: np.ndarray) -> np.ndarray:
    """``values`` (H, W) or (H, W, C), any dtype, as uint8 of the same shape: per channel,
    :data:`DISPLAY_PERCENTILES` to 0 and 255, clipped, rounded. A constant channel becomes 0."""
    values = np.asarray(values, dtype=np.float32)
    if values.size == 0:
        return np.zeros(values.shape, np.uint8)
    low, high = np.percentile(values, DISPLAY_PERCENTILES, axis=(0, 1))
    scaled = np.clip((values - low) / np.where(high > low, high - low, 1.0), 0.0, 1.0)
    return (scaled * 255).round().astype(np.uint8)


def display_image(image: np.ndarray) -> np.ndarray:
    """``image`` (H, W) or (H, W, C), any dtype, as (H, W, 3) uint8 for display (:func:`stretch`).

    One channel becomes grey; two channels fill red and green; more use the first three.
    Raises ``ValueError`` for another number of dimensions.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3:
        raise ValueError(f"image must be (H, W) or (H, W, C); got shape {image.shape}")
    scaled = stretch(image[..., :3])
    channels = scaled.shape[2]
    if channels == 1:
        return np.repeat(scaled, 3, axis=2)
    if channels == 2:
        return np.concatenate([scaled, np.zeros_like(scaled[..., :1])], axis=2)
    return np.ascontiguousarray(scaled)


def grey_display(image: np.ndarray) -> np.ndarray:
    """``image`` (H, W) or (H, W, C), any dtype, as (H, W) uint8 grey: the channel mean, then :func:`stretch`.

    Raises ``ValueError`` for another number of dimensions.
    """
    image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise ValueError(f"image must be (H, W) or (H, W, C); got shape {image.shape}")
    grey = image.astype(np.float32)
    return stretch(grey.mean(axis=2) if grey.ndim == 3 else grey)


def _tint(picture: np.ndarray, colour_index: np.ndarray, colours: Sequence[tuple[int, int, int]]) -> np.ndarray:
    """Blend colour ``k`` into ``picture`` (H, W, 3) float32 where ``colour_index == k + 1``; one blend per pixel."""
    for k, colour in enumerate(colours, 1):
        where = colour_index == k
        picture[where] = (1 - OVERLAY_ALPHA) * picture[where] + OVERLAY_ALPHA * np.float32(colour)
    return picture


def semantic_overlay(image: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Picture of a semantic prediction on its image: (h, w, 3) uint8.

    ``image`` (H, W[, C]); ``labels`` (predicted) and ``mask`` (true) (H, W) class images.
    Foreground pixels (class > 0 in either) are tinted: :data:`TRUE_POSITIVE` where the class
    is right, :data:`FALSE_POSITIVE` where background was called foreground,
    :data:`FALSE_NEGATIVE` where foreground was missed, :data:`WRONG_CLASS` where foreground got
    the wrong foreground class. Background is left as is. Images longer than
    :data:`OVERLAY_MAX_SIDE` are subsampled.
    """
    step = max(1, -(-max(labels.shape) // OVERLAY_MAX_SIDE))
    image, labels, mask = image[::step, ::step], labels[::step, ::step], mask[::step, ::step]
    picture = display_image(image).astype(np.float32)
    truth_fg, pred_fg = mask > 0, labels > 0
    index = np.zeros(labels.shape, np.uint8)
    index[truth_fg & pred_fg & (labels == mask)] = 1
    index[~truth_fg & pred_fg] = 2
    index[truth_fg & ~pred_fg] = 3
    index[truth_fg & pred_fg & (labels != mask)] = 4
    picture = _tint(picture, index, (TRUE_POSITIVE, FALSE_POSITIVE, FALSE_NEGATIVE, WRONG_CLASS))
    return picture.round().astype(np.uint8)


def _select(labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Boolean (H, W): pixels of ``labels`` whose id is in ``ids``."""
    ids = np.asarray(ids)
    if ids.size == 0:
        return np.zeros(labels.shape, bool)
    return np.isin(labels, ids)


def instance_overlay(image: np.ndarray, true: np.ndarray, pred: np.ndarray, matched_ids: np.ndarray,
                     false_positive_ids: np.ndarray, missed_ids: np.ndarray) -> np.ndarray:
    """Picture of an instance matching on its image: (H, W, 3) uint8.

    Parameters
    ----------
    image : (H, W) or (H, W, C), any dtype (:func:`display_image`).
    true, pred : (H, W) integer label images (0 background).
    matched_ids, false_positive_ids : ids of ``pred`` matched to a true object, and not.
    missed_ids : ids of ``true`` no prediction matched.

    Missed true objects are tinted :data:`FALSE_NEGATIVE`; matched predictions
    :data:`TRUE_POSITIVE` and false-positive predictions :data:`FALSE_POSITIVE` (a prediction
    over a missed object shows the prediction's colour). Then the inner outline of every
    prediction (object pixels next to another id or background) is drawn fully opaque in its
    colour. Raises ``ValueError`` when the heights and widths differ.
    """
    from skimage.segmentation import find_boundaries

    true, pred = np.asarray(true), np.asarray(pred)
    if true.ndim != 2 or true.shape != pred.shape or np.shape(image)[:2] != true.shape:
        raise ValueError(f"image (H, W[, C]), true and pred (H, W) must have one height and width; got "
                         f"{np.shape(image)}, {true.shape} and {pred.shape}. For 3-D labels pass one Z plane")
    picture = display_image(image).astype(np.float32)
    matched, false_positive = _select(pred, matched_ids), _select(pred, false_positive_ids)
    index = np.zeros(true.shape, np.uint8)
    index[_select(true, missed_ids)] = 3
    index[false_positive] = 2
    index[matched] = 1
    picture = _tint(picture, index, (TRUE_POSITIVE, FALSE_POSITIVE, FALSE_NEGATIVE))
    for chosen, colour in ((matched, TRUE_POSITIVE), (false_positive, FALSE_POSITIVE)):
        outline = find_boundaries(np.where(chosen, pred, 0), mode="inner") & chosen
        picture[outline] = colour
    return picture.round().astype(np.uint8)


def colour_labels(label: np.ndarray) -> np.ndarray:
    """``label`` (H, W) integer ids as (H, W, 3) uint8: 0 black, every other id a fixed colour.

    Colours depend on the id only (the same id is the same colour in every picture) and are
    never darker than 64 per channel, so no object vanishes into the black background.
    """
    values = np.asarray(label).astype(np.uint64)
    # A multiplicative hash spreads neighbouring ids (instances 1, 2, 3) over distant colours.
    hashed = (values * np.uint64(2654435761)) % np.uint64(2**32)
    rgb = np.stack([(hashed >> np.uint64(s)) & np.uint64(255) for s in (0, 8, 16)], axis=-1).astype(np.uint8)
    rgb = np.maximum(rgb, 64)
    rgb[values == 0] = 0
    return rgb


def save_png(path: str | os.PathLike, rgb: np.ndarray) -> Path:
    """Write ``rgb`` (H, W, 3) uint8 as PNG through :func:`lib.common.files.write_with` (atomic, umask mode).

    Raises ``ValueError`` for another shape or dtype.
    """
    from PIL import Image

    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be an (H, W, 3) uint8 picture; got {rgb.dtype} of shape {rgb.shape}")
    return write_with(path, lambda tmp: Image.fromarray(rgb).save(tmp, format="PNG"))


# Charts


@dataclasses.dataclass(frozen=True)
class Panel:
    """One chart panel: ``series`` maps a legend label to ``(x, y)`` sequences."""

    title: str
    y_label: str
    series: dict[str, tuple[Sequence[float], Sequence[float]]]
    log_scale: bool = False
    y_limits: tuple[float, float] | None = None
    x_label: str = "step"


def save_charts(path: str | os.PathLike, panels: Sequence[Panel]) -> Path:
    """Draw ``panels`` side by side into the PNG ``path`` (atomic, umask mode); return ``path``.

    Every point gets a marker, so a run with one or two evaluations still shows them.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for axis, panel in zip(axes[0], panels):
        for label, (x, y) in panel.series.items():
            axis.plot(list(x), list(y), marker="o", markersize=3, label=label)
        axis.set_title(panel.title)
        axis.set_xlabel(panel.x_label)
        axis.set_ylabel(panel.y_label)
        if panel.log_scale:
            axis.set_yscale("log")
        if panel.y_limits is not None:
            axis.set_ylim(*panel.y_limits)
        axis.legend()
    fig.tight_layout()
    try:
        return write_with(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
    finally:
        plt.close(fig)

