"""Refinements of instance labels beyond those of ``postprocess.refine``: Voronoi tessellation
restricted to a mask, and the repair of large blobs.

* :func:`voronoi`: every pixel of ``mask`` goes to the nearest instance (Euclidean distance to
  its nearest pixel; ties to the lower raster position of that pixel, as
  ``scipy.ndimage.distance_transform_edt`` picks), pixels outside the mask become 0, and
  instance pixels outside the mask are kept. In the post-processing the mask is the growth
  mask (e.g. ``F > 0.5``): foreground that no seed reached is shared out.
* :func:`repair_blobs`: an instance larger than ``size`` px is a blob: each touching instance
  that shares at least half of its own boundary with the blob is taken to be a fragment of it
  and merged into it; then the blob's holes made only of background are filled. (BiaPy's
  "repair large blobs" merges neighbours into a too-large instance and removes central holes;
  the half-boundary rule is ours, so that a neighbour merely touching the blob stays.)
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def voronoi(labels: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """``labels`` with every ``mask`` pixel given to its nearest instance (same dtype).

    ``mask``: (H, W) bool, None = the whole image. No instance: ``labels`` unchanged.
    """
    if not labels.any():
        return labels.copy()
    _, (iy, ix) = ndi.distance_transform_edt(labels == 0, return_indices=True)
    nearest = labels[iy, ix]
    if mask is None:
        return nearest.astype(labels.dtype, copy=False)
    return np.where(labels != 0, labels, np.where(mask, nearest, 0)).astype(labels.dtype, copy=False)


def repair_blobs(labels: np.ndarray, size: int) -> np.ndarray:
    """Merge fragments into instances larger than ``size`` px and fill their background holes."""
    out = labels.copy()
    areas = np.bincount(out.ravel())
    blobs = [int(i) for i in np.flatnonzero(areas > size) if i != 0]
    if not blobs:
        return out
    # boundary pixels of every instance, and which ids they touch (4-neighbours)
    pairs = []
    for a, b in (((slice(1, None), slice(None)), (slice(None, -1), slice(None))),
                 ((slice(None), slice(1, None)), (slice(None), slice(None, -1)))):
        la, lb = out[a], out[b]
        differ = la != lb
        pairs.append(np.stack([la[differ], lb[differ]], 1))
        pairs.append(np.stack([lb[differ], la[differ]], 1))
    edges = np.concatenate(pairs) if pairs else np.zeros((0, 2), out.dtype)
    edges = edges[edges[:, 0] != 0]  # (instance, what is across its boundary), one row per pixel edge
    for blob in blobs:
        for other in np.unique(edges[edges[:, 1] == blob, 0]):
            if other == blob or other == 0 or areas[other] > size:
                continue
            mine = edges[edges[:, 0] == other]
            if np.count_nonzero(mine[:, 1] == blob) * 2 >= len(mine):
                out[out == other] = blob
                edges[edges == other] = blob
    for blob in blobs:
        box = ndi.find_objects((out == blob).astype(np.uint8))[0]
        fill_background_holes(out[box], blob)
    return out


def fill_background_holes(crop: np.ndarray, label: int) -> None:
    """Fill, in place, the holes of ``label`` in ``crop`` (a view of the labels around it) that are all
    background: an object inside a ring stays."""
    own = crop == label
    holes, n_holes = ndi.label(ndi.binary_fill_holes(own) & ~own)
    if n_holes:
        foreign = np.bincount(holes.ravel(), weights=(crop != 0).ravel(), minlength=n_holes + 1)
        fill = foreign == 0
        fill[0] = False
        crop[fill[holes]] = label


def apply_step(labels: np.ndarray, name: str, size: int | None, border: tuple[bool, bool, bool, bool],
               mask: np.ndarray | None = None) -> np.ndarray:
    """One refinement step (``lib.instances.postprocess.REFINEMENTS``) on int labels; ``border`` says
    which edges (top, bottom, left, right) are the image's; ``mask`` restricts ``voronoi`` (None:
    the whole image)."""
    if name == "voronoi":
        return voronoi(labels, mask)
    if name == "repair_blobs":
        return repair_blobs(labels, size)
    if name == "fill_holes":
        labels = labels.copy()
        for label, box in enumerate(ndi.find_objects(labels), 1):
            if box is None:
                continue
            fill_background_holes(labels[box], label)
        return labels
    if name == "clear_border":
        edges = [labels[0], labels[-1], labels[:, 0], labels[:, -1]]
        touching = np.unique(np.concatenate([e for e, on in zip(edges, border) if on] or [np.zeros(0, labels.dtype)]))
        return np.where(np.isin(labels, touching[touching > 0]), 0, labels).astype(labels.dtype)
    if name in ("remove_small_objects", "remove_large_objects"):
        sizes = np.bincount(labels.ravel())
        drop = sizes < size if name == "remove_small_objects" else sizes > size
        drop[0] = False
        return np.where(drop[labels], 0, labels).astype(labels.dtype)
    if name == "dilation":
        from skimage.segmentation import expand_labels

        return expand_labels(labels, distance=size)
    # erosion: per label, so that touching labels both give up their shared seam
    footprint = _disk(size)
    low = ndi.grey_erosion(labels, footprint=footprint, mode="nearest")
    high = ndi.grey_dilation(labels, footprint=footprint, mode="nearest")
    return np.where((low == labels) & (high == labels), labels, 0).astype(labels.dtype)


def _disk(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    return r[:, None] ** 2 + r[None, :] ** 2 <= radius * radius
