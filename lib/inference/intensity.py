"""Is an image's intensity like the training images'? And may an image of another dtype be predicted?

:func:`intensity_check` compares one image's percentiles with the training images' distribution
that training records in model.json (``normalization.training_images``:
:func:`lib.common.normalization.intensity_reference`) and returns a short flag for the
``intensity_flag`` column of uncertainty.csv and a warning naming the image. The rules, per channel:

- ``saturated``: an integer image with at least :data:`SATURATED_FRACTION` of its pixels at
  the dtype's largest value, when no training image reached it (another exposure clipped);
- ``flat``: no contrast (99.8th - 1st percentile is 0): nothing to segment;
- for a "dataset"-normalised model (which works in the training images' units):
  ``brighter``/``darker`` when the median lies more than one typical training contrast
  beyond the training medians, ``contrast_high``/``contrast_low`` when the contrast is more than
  :data:`CONTRAST_FACTOR` times the largest, or less than the smallest over that factor;
- for "tile" and "percentile" models (units cancel): ``histogram_shape`` when the median's
  position between the 1st and 99.8th percentiles is more than :data:`SHAPE_MARGIN` outside
  the training images' range of it.

:func:`dtype_decision` is the rule for an image whose dtype differs from the model's
``input_dtype``: accepted with a warning where the normalisation makes units irrelevant
("percentile" and "tile" members only), refused otherwise with a message naming
``--normalization percentile``.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from ..common.normalization import REFERENCE_PERCENTILES, image_percentiles, reference_values

# The column of uncertainty.csv (and of the per-image table) holding the flag; "" = nothing unusual.
COLUMN = "intensity_flag"
SATURATED_FRACTION = 0.01
CONTRAST_FACTOR = 2.0
SHAPE_MARGIN = 0.2
# Normalisations under which an image's units do not matter.
UNIT_FREE = ("tile", "percentile")


@dataclasses.dataclass(frozen=True)
class IntensityCheck:
    """``flag``: "" or the reasons joined by "+" (e.g. "saturated+flat"); ``warning``: a line naming the image, or None."""

    flag: str = ""
    warning: str | None = None


def _range(reference: dict, key: str, channel: int) -> tuple[float, float, float]:
    block = reference[key]
    return block["min"][channel], block["median"][channel], block["max"][channel]


def _usable(reference) -> bool:
    keys = ("low", "median", "high", "contrast", "relative_median")
    return isinstance(reference, dict) and all(
        isinstance(reference.get(k), dict) and all(isinstance(reference[k].get(s), list) for s in ("min", "median", "max"))
        for k in keys)


def intensity_check(image, normalization: dict, name: str, dtype: str | None = None) -> IntensityCheck:
    """Flag ``image`` (H, W, C) whose intensity lies far outside the training images'.

    ``normalization`` is model.json's ``normalization`` block (its ``mode`` and
    ``training_images``); a model without ``training_images`` (trained before they were
    recorded) flags only ``saturated`` and ``flat``. ``dtype`` defaults to the image's.
    """
    mode = normalization.get("mode", "dataset")
    reference = normalization.get("training_images")
    if not _usable(reference):  # none recorded, or recorded in another layout: the unit-free checks only
        reference = None
    values = reference_values(image_percentiles(image, REFERENCE_PERCENTILES))
    dtype = np.dtype(dtype or np.asarray(image[:1, :1]).dtype)
    reasons: list[str] = []
    details: list[str] = []
    if dtype.kind in "ui":
        top = np.iinfo(dtype).max
        fraction = float(np.mean(np.asarray(image) == top))
        trained_top = max(reference["high"]["max"]) if reference else -np.inf
        if fraction >= SATURATED_FRACTION and trained_top < top:
            reasons.append("saturated")
            details.append(f"{fraction:.0%} of its pixels are at {top}, the largest {dtype.name} value")
    channels = values["contrast"].shape[0]
    if np.any(values["contrast"] <= 0):
        reasons.append("flat")
        details.append("its 1st and 99.8th percentiles are equal (no contrast)")
    if reference:
        for c in range(min(channels, len(reference["median"]["min"]))):
            where = f" (channel {c})" if channels > 1 else ""
            if mode in UNIT_FREE:
                low, _, high = _range(reference, "relative_median", c)
                value = float(values["relative_median"][c])
                if values["contrast"][c] > 0 and not low - SHAPE_MARGIN <= value <= high + SHAPE_MARGIN:
                    reasons.append("histogram_shape")
                    details.append(f"its median lies at {value:.2f} of the way from its 1st to its 99.8th "
                                   f"percentile{where}; training images: {low:.2f} to {high:.2f}")
                continue
            low, typical, high = _range(reference, "contrast", c)
            contrast = float(values["contrast"][c])
            if contrast > CONTRAST_FACTOR * high:
                reasons.append("contrast_high")
                details.append(f"contrast (99.8th - 1st percentile) {contrast:.4g}{where}; training images: "
                               f"{low:.4g} to {high:.4g}")
            elif 0 < contrast < low / CONTRAST_FACTOR:
                reasons.append("contrast_low")
                details.append(f"contrast (99.8th - 1st percentile) {contrast:.4g}{where}; training images: "
                               f"{low:.4g} to {high:.4g}")
            m_low, _, m_high = _range(reference, "median", c)
            median = float(values["median"][c])
            if median > m_high + typical or median < m_low - typical:
                reasons.append("brighter" if median > m_high else "darker")
                details.append(f"median {median:.4g}{where}; training images: {m_low:.4g} to {m_high:.4g}")
    if not reasons:
        return IntensityCheck()
    reasons = list(dict.fromkeys(reasons))
    hint = ("retrain with --normalization percentile, or convert the image to the training images' exposure"
            if mode == "dataset" else "check the acquisition; the prediction may be wrong")
    return IntensityCheck("+".join(reasons), f"{name}: intensity unlike the training images ({'; '.join(details)})"
                          f"; {hint}")


def dtype_decision(expected: str, got: str, modes: Sequence[str], name: str) -> tuple[str | None, str | None]:
    """``(warning, error)`` for an image of dtype ``got`` given to members of ``input_dtype`` ``expected``
    normalised with ``modes``: both None when the dtypes agree (or are both float)."""
    want, have = np.dtype(expected), np.dtype(got)
    if want == have or (want.kind == "f" and have.kind == "f"):
        return None, None
    if all(mode in UNIT_FREE for mode in modes):
        return (f"{name} is {have.name}, the model was trained on {want.name} images; accepted because its "
                f"normalisation ({'/'.join(sorted(set(modes)))}) uses each image's own statistics"), None
    return None, (f"image dtype must be {want.name} (the model's input_dtype; its normalisation statistics are in "
                  f"those units); got {have.name} in {name}. Convert the image, or retrain with "
                  "--normalization percentile, which makes the units irrelevant")


def check_predicted_image(image, predictor, name: str) -> IntensityCheck:
    """:func:`intensity_check` of ``image`` (H, W, C) against the first member of ``predictor``
    (a :class:`lib.inference.predictor.Predictor`; members of an ensemble share their training images)."""
    normalization = predictor.members[0].info.meta.get("normalization") or {}
    return intensity_check(image, normalization, name, dtype=str(np.asarray(image[:1, :1]).dtype))


def flag_image(image, predictor, name: str, log) -> str:
    """:func:`check_predicted_image`, its warning (if any) to ``log`` as ``"warning: ..."``; returns the flag
    for the :data:`COLUMN` of uncertainty.csv ("" when the image is like the training images)."""
    check = check_predicted_image(image, predictor, name)
    if check.warning:
        log(f"warning: {check.warning}")
    return check.flag
