"""HoVer-Net post-processing: the gradient map of the predicted centre offsets (``H``, ``V``).

``H`` and ``V`` hold, per object pixel, the horizontal and vertical offset to the object's
centre, normalised to [-1, 1] per object and stored as ``(offset + 1) / 2`` (see
``lib/reader/targets_fields.py``). Inside an object they change slowly; across the seam between
two touching objects they jump (from +1 to -1). :func:`gradient_map` is HoVer-Net's
"overall" map: the Sobel derivative of ``H`` along x and of ``V`` along y, and their maximum
(HoVer-Net min-max normalises each over the image, which lets one small object with steep
offsets set the scale of all; here they are divided by the response to a unit step, a fixed
scale); the post-processing (``lib/instances/postprocess.py``,
derived channel ``HV``) seeds where ``F`` is high and ``HV`` low, and floods the ``HV`` surface
inside the ``F`` mask, as HoVer-Net does (its markers are ``F - (HV >= 0.4)``; its surface,
a smoothed ``(1 - HV) * F`` negated, orders pixels as ``HV`` does inside the mask).
"""

from __future__ import annotations

import cv2
import numpy as np

SOBEL_SIZE = 3


def _step_response(size: int) -> float:
    """The largest |Sobel| of a unit step: the scale at which a jump from background (0 offset) to
    an object's edge (offset 1) saturates the map."""
    step = np.zeros((2 * size + 1, 2 * size + 1), np.float32)
    step[:, size + 1:] = 1.0
    return float(np.abs(cv2.Sobel(step, cv2.CV_32F, 1, 0, ksize=size, borderType=cv2.BORDER_REPLICATE)).max())


def gradient_map(horizontal: np.ndarray, vertical: np.ndarray, size: int = SOBEL_SIZE) -> np.ndarray:
    """(H, W) float32 in [0, 1]: max of |d H / dx| and |d V / dy| (offsets in [-1, 1]) divided by the
    response to a unit step and clipped to 1. Inside an object of radius r the offsets change by
    about 1 / r per pixel, which gives about 2 / r (0.4 at r = 5 px); seams and edges give 1."""
    scale = _step_response(size)
    out = None
    for values, dx, dy in ((horizontal, 1, 0), (vertical, 0, 1)):
        centred = np.asarray(values, np.float32) * 2.0 - 1.0
        gradient = np.abs(cv2.Sobel(centred, cv2.CV_32F, dx, dy, ksize=size, borderType=cv2.BORDER_REPLICATE))
        out = gradient if out is None else np.maximum(out, gradient)
    return np.minimum(out / scale, 1.0).astype(np.float32, copy=False)
