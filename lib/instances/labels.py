"""Label images, the common ground of post-processing, measurements and the classical baseline.

A label image is an integer array, 0 background and one id per object. Here: the check every
public function runs on one, the dtype its result gets, and the raster-order numbering that
makes results comparable whatever order the objects were found in.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage as ndi

LABEL_DTYPES = ("auto", "uint16", "uint32")

_UINT16_MAX = np.iinfo(np.uint16).max
_UINT32_MAX = np.iinfo(np.uint32).max


def choose_label_dtype(n_labels: int, label_dtype: str = "auto") -> np.dtype:
    """The dtype of a label image with labels 1..``n_labels``.

    ``"auto"``: uint16 up to 65535 labels, uint32 above. Raises ``ValueError`` when the
    requested dtype cannot hold ``n_labels`` or when ``label_dtype`` is unknown.
    """
    if label_dtype not in LABEL_DTYPES:
        raise ValueError(f"label_dtype must be one of {', '.join(LABEL_DTYPES)}; got {label_dtype!r}")
    if n_labels > _UINT32_MAX:
        raise ValueError(f"the number of labels must be at most {_UINT32_MAX} to fit uint32; got {n_labels}")
    if label_dtype == "uint16" and n_labels > _UINT16_MAX:
        raise ValueError(f"label_dtype 'uint16' must hold every label; got {n_labels} labels (at most "
                         f"{_UINT16_MAX} fit). Use 'uint32' or 'auto'")
    if label_dtype == "uint32" or (label_dtype == "auto" and n_labels > _UINT16_MAX):
        return np.dtype(np.uint32)
    return np.dtype(np.uint16)


def raster_order(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Lookup table renumbering the labels present 1..n by their first pixel in raster order, and n."""
    firsts, present = [], []
    for label, box in enumerate(ndi.find_objects(labels), 1):
        if box is None:
            continue
        ry, rx = box
        firsts.append((ry.start, rx.start + int(np.argmax(labels[ry.start, rx] == label))))
        present.append(label)
    lut = np.zeros(int(labels.max(initial=0)) + 1, np.int64)
    if present:
        rows, cols = np.array(firsts).T
        order = np.lexsort((cols, rows))
        lut[np.array(present)[order]] = np.arange(1, len(present) + 1)
    return lut, len(present)


def renumber(labels: np.ndarray, label_dtype: str = "auto") -> np.ndarray:
    """``labels`` renumbered 1..n in raster order, as ``choose_label_dtype(n, label_dtype)``."""
    lut, n = raster_order(labels)
    return lut.astype(choose_label_dtype(n, label_dtype))[labels]


def check_labels(labels: Any, ndim: int) -> None:
    """Raise ``ValueError`` unless ``labels`` is an ``ndim``-D non-negative integer array."""
    axes = "(H, W)" if ndim == 2 else "(Z, Y, X)"
    if not isinstance(labels, np.ndarray) or labels.ndim != ndim or labels.dtype.kind not in "iu":
        shape = getattr(labels, "shape", None)
        dtype = getattr(labels, "dtype", type(labels).__name__)
        raise ValueError(f"labels must be a {axes} integer array; got shape {shape}, dtype {dtype}. "
                         f"A boolean mask must be labelled first (scipy.ndimage.label)")
    if labels.size and labels.min() < 0:
        raise ValueError(f"labels must be >= 0 (0 = background); got minimum {labels.min()}")


def is_int(value: Any) -> bool:
    """Whether ``value`` is an integer (Python or NumPy), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
