"""The classical baseline: Otsu threshold and distance-transform watershed, no learning.

What a learned model has to beat (``benchmarks/bench_instance_accuracy.py`` compares them).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

from .labels import LABEL_DTYPES, is_int, renumber


def classical_baseline(image: np.ndarray, min_distance: int = 5, sigma: float = 1.0, invert: bool = False,
                       label_dtype: str = "auto") -> np.ndarray:
    """Otsu threshold + distance-transform watershed, the usual non-learned segmentation.

    Parameters
    ----------
    image : (H, W) or (H, W, C) intensities; channels are averaged.
    min_distance : smallest distance between two object centres (px), for
        ``skimage.feature.peak_local_max``.
    sigma : Gaussian smoothing before the threshold (px; 0 = none).
    invert : objects darker than the background (default: brighter).
    label_dtype : as in :class:`lib.instances.postprocess.PostProcessConfig`.

    Returns
    -------
    labels : (H, W) uint16 or uint32, numbered as by :func:`lib.instances.postprocess.postprocess`.

    Steps: smooth; mask = above Otsu (below, with ``invert``); Euclidean distance transform
    of the mask; its local maxima at least ``min_distance`` apart within each connected
    component, where maxima on one plateau that touch (8-connected) count as one marker;
    watershed of minus the distance inside the mask.

    Raises ``ValueError`` for a bad image shape, a constant image, or bad parameters.
    """
    from skimage.feature import peak_local_max
    from skimage.filters import threshold_otsu
    from skimage.segmentation import watershed

    problems = []
    if not isinstance(image, np.ndarray) or image.ndim not in (2, 3) or image.dtype.kind not in "uif" \
            or min(image.shape[:2], default=0) < 1:
        problems.append(f"image must be an (H, W) or (H, W, C) numeric array; got shape "
                        f"{getattr(image, 'shape', None)}, dtype {getattr(image, 'dtype', type(image).__name__)}")
    if not is_int(min_distance) or min_distance < 1:
        problems.append(f"min_distance must be an integer >= 1 (pixels); got {min_distance!r}")
    if isinstance(sigma, (bool, np.bool_)) or not isinstance(sigma, (int, float, np.integer, np.floating)) \
            or not 0 <= sigma < math.inf:
        problems.append(f"sigma must be a number >= 0 (pixels); got {sigma!r}")
    if label_dtype not in LABEL_DTYPES:
        problems.append(f"label_dtype must be one of {', '.join(LABEL_DTYPES)}; got {label_dtype!r}")
    if problems:
        raise ValueError("; ".join(problems))
    grey = image.astype(np.float64)
    if grey.ndim == 3:
        grey = grey.mean(axis=2)
    if sigma > 0:
        grey = ndi.gaussian_filter(grey, sigma)
    if grey.min() == grey.max():
        raise ValueError(f"image must not be constant to be thresholded; got every value {grey.min():g} "
                         f"(after smoothing)")
    threshold = threshold_otsu(grey)
    mask = grey < threshold if invert else grey > threshold
    distance = ndi.distance_transform_edt(mask)
    components, _ = ndi.label(mask)
    peaks = peak_local_max(distance, min_distance=min_distance, labels=components, exclude_border=False)
    peak_mask = np.zeros(mask.shape, bool)
    peak_mask[tuple(peaks.T)] = True
    markers, _ = ndi.label(peak_mask, structure=np.ones((3, 3), bool))
    labels = watershed(-distance, markers, mask=mask).astype(np.int32, copy=False)
    return renumber(labels, label_dtype)
