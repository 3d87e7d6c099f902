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
# What each colour means, in the legend strip of a readable overlay.
SEMANTIC_LEGEND = (("correct", TRUE_POSITIVE), ("false positive", FALSE_POSITIVE), ("missed", FALSE_NEGATIVE),
                   ("wrong class", WRONG_CLASS))
INSTANCE_LEGEND = (("matched", TRUE_POSITIVE), ("false positive", FALSE_POSITIVE), ("missed", FALSE_NEGATIVE))
# Readable pictures (overlays with a legend, previews) are enlarged by a whole factor, nearest
# neighbour (every pixel stays a sharp square), until the long side is at least this: a
# 256 x 256 image becomes 768 x 768. Never by more than MAX_ENLARGEMENT.
READABLE_SIDE = 768
MAX_ENLARGEMENT = 16
# Longest side of a preview picture; larger maps are subsampled for the picture.
PREVIEW_MAX_SIDE = 2048
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


def semantic_overlay(image: np.ndarray, labels: np.ndarray, mask: np.ndarray, readable: bool = False) -> np.ndarray:
    """Picture of a semantic prediction on its image: (h, w, 3) uint8.

    ``image`` (H, W[, C]); ``labels`` (predicted) and ``mask`` (true) (H, W) class images.
    Foreground pixels (class > 0 in either) are tinted: :data:`TRUE_POSITIVE` where the class
    is right, :data:`FALSE_POSITIVE` where background was called foreground,
    :data:`FALSE_NEGATIVE` where foreground was missed, :data:`WRONG_CLASS` where foreground got
    the wrong foreground class. Background is left as is. Images longer than
    :data:`OVERLAY_MAX_SIDE` are subsampled. ``readable``: enlarged and given the legend strip
    of :data:`SEMANTIC_LEGEND` below (:func:`with_legend`).
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
    picture = picture.round().astype(np.uint8)
    return with_legend(picture, SEMANTIC_LEGEND) if readable else picture


def _select(labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Boolean (H, W): pixels of ``labels`` whose id is in ``ids``."""
    ids = np.asarray(ids)
    if ids.size == 0:
        return np.zeros(labels.shape, bool)
    return np.isin(labels, ids)


def instance_overlay(image: np.ndarray, true: np.ndarray, pred: np.ndarray, matched_ids: np.ndarray,
                     false_positive_ids: np.ndarray, missed_ids: np.ndarray, readable: bool = False) -> np.ndarray:
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
    colour. ``readable``: enlarged and given the legend strip of :data:`INSTANCE_LEGEND`
    below (:func:`with_legend`). Raises ``ValueError`` when the heights and widths differ.
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
    picture = picture.round().astype(np.uint8)
    return with_legend(picture, INSTANCE_LEGEND) if readable else picture


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


# Readable pictures: enlargement, legend strips, colour-mapped previews

LEGEND_FONT_PX = 16
LEGEND_MIN_WIDTH = 420  # px; narrower pictures get white margin on the right for their legend
_PAD = 8


def enlarge(picture: np.ndarray, side: int = READABLE_SIDE) -> np.ndarray:
    """``picture`` (H, W[, C]) repeated ``f`` times along both axes (nearest neighbour), with the
    smallest whole ``f`` that brings the long side to at least ``side`` (at most
    :data:`MAX_ENLARGEMENT`); unchanged when it is that long already."""
    picture = np.asarray(picture)
    factor = min(MAX_ENLARGEMENT, max(1, -(-int(side) // max(1, max(picture.shape[:2])))))
    return picture if factor == 1 else np.repeat(np.repeat(picture, factor, axis=0), factor, axis=1)


def _font(size: int = LEGEND_FONT_PX):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _strip(width: int, title: str | None, entries: Sequence[tuple[str, tuple[int, int, int]]],
           bar: tuple[str, float, float] | None = None) -> np.ndarray:
    """A white (h, width, 3) uint8 strip: ``title``, then a colour square and label per entry
    (wrapped to the width), or ``bar`` = (colour map, low, high) drawn as a gradient with ticks."""
    from PIL import Image, ImageDraw

    font, line = _font(), LEGEND_FONT_PX + 10
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    placed, x, y = [], _PAD, _PAD + (line if title else 0)
    for label, colour in entries:
        need = LEGEND_FONT_PX + 6 + int(measure.textlength(label, font=font)) + 18
        if x > _PAD and x + need > width - _PAD:
            x, y = _PAD, y + line
        placed.append((x, y, label, colour))
        x += need
    height = y + (line if entries else 0) + (2 * line + 4 if bar else 0) + _PAD
    strip = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    if title:
        draw.text((_PAD, _PAD), title, fill=(0, 0, 0), font=font)
    for x, y, label, colour in placed:
        draw.rectangle([x, y + 2, x + LEGEND_FONT_PX, y + 2 + LEGEND_FONT_PX], fill=tuple(colour), outline=(0, 0, 0))
        draw.text((x + LEGEND_FONT_PX + 6, y), label, fill=(0, 0, 0), font=font)
    if bar:
        name, low, high = bar
        top, length = y, width - 2 * _PAD
        gradient = colour_map(np.linspace(low, high, length)[None, :], low, high, name)
        strip.paste(Image.fromarray(np.repeat(gradient, line - 6, axis=0)), (_PAD, top))
        draw.rectangle([_PAD - 1, top - 1, _PAD + length, top + line - 6], outline=(0, 0, 0))
        for fraction in (0.0, 0.5, 1.0):
            text = f"{low + fraction * (high - low):.3g}"
            tick = _PAD + round(fraction * (length - 1))
            draw.line([tick, top + line - 6, tick, top + line - 1], fill=(0, 0, 0))
            shift = measure.textlength(text, font=font) * fraction
            draw.text((tick - shift, top + line), text, fill=(0, 0, 0), font=font)
    return np.asarray(strip)


def _above(picture: np.ndarray, strip_of_width) -> np.ndarray:
    """``picture`` with white margin on the right up to :data:`LEGEND_MIN_WIDTH`, over the strip ``strip_of_width(width)``."""
    height, width = picture.shape[:2]
    if width < LEGEND_MIN_WIDTH:
        margin = np.full((height, LEGEND_MIN_WIDTH - width, 3), 255, np.uint8)
        picture, width = np.concatenate([picture, margin], axis=1), LEGEND_MIN_WIDTH
    return np.concatenate([picture, strip_of_width(width)], axis=0)


def with_legend(picture: np.ndarray, entries: Sequence[tuple[str, tuple[int, int, int]]],
                title: str | None = None) -> np.ndarray:
    """``picture`` (H, W, 3) uint8 :func:`enlarge` d, over a white legend strip: ``title`` and one
    colour square with its label per ``entries`` item (:data:`SEMANTIC_LEGEND`, :data:`INSTANCE_LEGEND`)."""
    return _above(enlarge(picture), lambda width: _strip(width, title, entries))


def colour_map(values: np.ndarray, low: float, high: float, name: str = "viridis") -> np.ndarray:
    """``values`` (H, W) as (H, W, 3) uint8 through matplotlib's colour map ``name``: ``low`` and
    below its first colour, ``high`` and above its last; NaN mid grey."""
    import matplotlib

    table = (matplotlib.colormaps[name](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)
    values = np.asarray(values, dtype=np.float64)
    span = high - low if high > low else 1.0
    index = np.clip(np.nan_to_num((values - low) / span, nan=0.0) * 255, 0, 255).round().astype(np.intp)
    rgb = table[index]
    rgb[np.isnan(values)] = 128
    return rgb


def preview(values: np.ndarray, title: str, low: float | None = None, high: float | None = None,
            colours: str = "viridis", levels: Sequence[str] | None = None) -> np.ndarray:
    """A colour-mapped picture of a 2-D map with its colour bar below: (h, w, 3) uint8.

    ``values`` (H, W): subsampled to at most :data:`PREVIEW_MAX_SIDE` on the long side,
    :func:`enlarge` d when small. Continuous maps go through :func:`colour_map` between ``low``
    and ``high`` (default: the finite minimum and maximum) and get a gradient bar with three
    ticks. With ``levels`` the values are whole numbers 0..len(levels)-1, each drawn in its own
    colour of ``colours`` and named in a legend (e.g. the number of experts who agree).
    Raises ``ValueError`` for values that are not 2-D.
    """
    values = np.asarray(values)
    if values.ndim != 2:
        raise ValueError(f"values must be a 2-D map (H, W); got shape {values.shape}")
    step = max(1, -(-max(values.shape) // PREVIEW_MAX_SIDE))
    values = values[::step, ::step]
    if levels is not None:
        top = max(1, len(levels) - 1)
        palette = colour_map(np.arange(len(levels), dtype=np.float64)[None, :], 0, top, colours)[0]
        rgb = palette[np.clip(np.nan_to_num(values.astype(np.float64)), 0, len(levels) - 1).astype(np.intp)]
        entries = [(str(name), tuple(int(c) for c in palette[k])) for k, name in enumerate(levels)]
        return _above(enlarge(rgb), lambda width: _strip(width, title, entries))
    finite = values[np.isfinite(values)] if values.size else values
    low = float(finite.min()) if low is None and finite.size else 0.0 if low is None else float(low)
    high = float(finite.max()) if high is None and finite.size else 1.0 if high is None else float(high)
    rgb = colour_map(values, low, high, colours)
    return _above(enlarge(rgb), lambda width: _strip(width, title, [], bar=(colours, low, high)))


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
    best_x: float | None = None  # marked by a dashed line and a star on each series


def save_charts(path: str | os.PathLike, panels: Sequence[Panel], title: str | None = None) -> Path:
    """Draw ``panels`` side by side into the PNG ``path`` (atomic, umask mode); return ``path``.

    Every point gets a marker, so a run with one or two evaluations still shows them; a
    panel's ``best_x`` gets a dashed vertical line and a star on every series there.
    ``title`` goes above the panels.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for axis, panel in zip(axes[0], panels):
        for label, (x, y) in panel.series.items():
            x, y = list(x), list(y)
            line, = axis.plot(x, y, marker="o", markersize=5, linewidth=1.5, label=label)
            chosen = [k for k, value in enumerate(x) if panel.best_x is not None and value == panel.best_x]
            if chosen:
                axis.plot([x[chosen[0]]], [y[chosen[0]]], marker="*", markersize=14, color=line.get_color(),
                          markeredgecolor="black", linestyle="none")
        if panel.best_x is not None:
            axis.axvline(panel.best_x, color="0.4", linestyle="--", linewidth=1, label=f"best (step {panel.best_x:g})")
        axis.grid(True, alpha=0.3)
        axis.set_title(panel.title)
        axis.set_xlabel(panel.x_label)
        axis.set_ylabel(panel.y_label)
        if panel.log_scale:
            axis.set_yscale("log")
        if panel.y_limits is not None:
            axis.set_ylim(*panel.y_limits)
        axis.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        return write_with(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
    finally:
        plt.close(fig)

