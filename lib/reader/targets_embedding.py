"""Pixel embeddings with seediness and sigma (EmbedSeg): the planes of the ``E`` channel set.

A network with the ``E`` channels predicts five planes per pixel, each through a sigmoid (values
in [0, 1]):

* ``Ey``, ``Ex``: an offset ``(2 m - 1) REACH`` px (``m`` the plane's value), so within
  +-:data:`REACH` (256) px. Pixel ``(y, x)`` is *embedded* at ``(y + offset_y, x + offset_x)``; a
  trained network embeds the pixels of one object around one point.
* ``Esy``, ``Esx``: the object's *clustering bandwidth* along y and x, as ``s`` in [0, 1]: a pixel
  embedded at ``e`` belongs to the object of centre ``c`` with the score
  ``phi = exp(-sum_axis exp(10 s_axis) ((e - c)_axis / REACH)^2)`` (0.5 on a margin the network
  chooses per object: EmbedSeg's learnt sigma).
* ``Eseed``: the seediness, the score ``phi`` a pixel would get from its own object (high at
  pixels that embed near their object's centre), 0 on background.

The network is not trained towards fixed target maps: its loss (:mod:`lib.training.embedding_loss`)
takes the instance ids the reader passes along and scores whole objects (a Lovasz hinge on each
object's ``phi`` map, the spread of ``s`` inside each object, the seediness against ``phi``).
:func:`embedding_targets` nonetheless gives the *ideal* maps of a label image (offsets to each
object's centroid, the bandwidth that puts ``phi = 0.5`` at the object's equivalent radius,
seediness 1 on objects), which the instance clustering turns back into the objects (the
perfect-target test), and whose means start the network's output biases.
"""

from __future__ import annotations

import math

import numpy as np

from .targets_fields import consecutive

EMBEDDING_PLANES = ("Ey", "Ex", "Esy", "Esx", "Eseed")
REACH = 256.0  # px: the largest offset an embedding plane can express (objects up to about 500 px across)
SIGMA_SCALE = 10.0  # phi uses exp(SIGMA_SCALE * s) as the precision, as EmbedSeg
SIGMA_PLANES = ("Esy", "Esx")  # their priors are means over object pixels (0 on background)


def is_embedding_name(name) -> bool:
    return name in EMBEDDING_PLANES


def ideal_bandwidth(radius_px: np.ndarray) -> np.ndarray:
    """``s`` in [0, 1] whose score ``phi`` is 0.5 at ``radius_px`` from the centre (per object)."""
    radius = np.maximum(np.asarray(radius_px, np.float64), 0.5) / REACH
    return np.clip(np.log(math.log(2.0) / radius ** 2) / SIGMA_SCALE, 0.0, 1.0).astype(np.float32)


def embedding_targets(labels: np.ndarray) -> np.ndarray:
    """The ideal ``(H, W, 5)`` float32 maps of ``labels`` (0 = background), in plane order
    :data:`EMBEDDING_PLANES`: offsets to each object's centroid (0.5 on background), the bandwidth
    of each object's equivalent radius ``sqrt(area / pi)`` (0 on background), seediness 1 on objects."""
    h, w = labels.shape
    out = np.zeros((h, w, 5), np.float32)
    out[..., 0:2] = 0.5
    ids, n = consecutive(labels)
    if n == 0:
        return out
    ys, xs = np.nonzero(ids)
    own = ids[ys, xs]
    counts = np.bincount(own, minlength=n + 1).astype(np.float64)
    counts[0] = 1
    centre_y = np.bincount(own, weights=ys, minlength=n + 1) / counts
    centre_x = np.bincount(own, weights=xs, minlength=n + 1) / counts
    out[ys, xs, 0] = encode_offsets(centre_y[own] - ys)
    out[ys, xs, 1] = encode_offsets(centre_x[own] - xs)
    bandwidth = ideal_bandwidth(np.sqrt(counts / math.pi))
    out[ys, xs, 2] = bandwidth[own]
    out[ys, xs, 3] = bandwidth[own]
    out[ys, xs, 4] = 1.0
    return out


def encode_offsets(offset_px: np.ndarray) -> np.ndarray:
    """Offsets in px -> plane values in [0, 1] (clipped at +-:data:`REACH`)."""
    return np.clip((np.asarray(offset_px, np.float64) / REACH + 1.0) / 2.0, 0.0, 1.0).astype(np.float32)


def decode_offsets(values: np.ndarray) -> np.ndarray:
    """Plane values in [0, 1] -> offsets in px."""
    return (2.0 * np.asarray(values, np.float32) - 1.0) * np.float32(REACH)


def precision(bandwidth: np.ndarray) -> np.ndarray:
    """``s`` in [0, 1] -> the precision ``exp(10 s)`` per (REACH px)^2."""
    return np.exp(SIGMA_SCALE * np.asarray(bandwidth, np.float64))
