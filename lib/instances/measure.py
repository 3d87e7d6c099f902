"""Shape measurements of instances: one row per object of a 2-D or 3-D label image.

The rows feed the measurement tables of inference (``KEY_instances.csv``) and the rules of
:mod:`.rules` (``"npixels < 100 and circularity <= 0.7"``). Every column that has a unit
carries it in its name: ``_px`` / ``_px2`` in pixels, ``_um`` / ``_um2`` when a pixel size in
micrometres is given (:func:`measurement_columns`). The definitions follow scikit-image's
``regionprops`` wherever it has the property (``docs/measurements.md``); this module computes
them itself and ``tests/instances/test_measure_regionprops.py`` checks them against it.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from scipy import ndimage as ndi

from .labels import check_labels

# The columns of measure(): "{u}" is the length unit (px or um), "{u}2" the area unit.
_COLUMNS_2D = ("label", "npixels", "area_{u}2", "centroid_y_{u}", "centroid_x_{u}", "perimeter_{u}",
               "equivalent_diameter_{u}", "feret_max_{u}", "feret_min_{u}", "major_axis_{u}", "minor_axis_{u}",
               "eccentricity", "solidity", "circularity")
_COLUMNS_3D = ("label", "nvoxels", "volume_{u}3", "centroid_z_{u}", "centroid_y_{u}", "centroid_x_{u}",
               "equivalent_diameter_{u}", "surface_area_{u}2", "sphericity")


def measurement_columns(pixel_size: Any = None, dims: int = 2) -> tuple[str, ...]:
    """The columns of :func:`measure` (``dims`` 2) or :func:`measure_3d` (3): lengths in ``px``
    (``pixel_size`` None) or ``um`` (a pixel or voxel size given, in micrometres)."""
    unit = "px" if pixel_size is None else "um"
    return tuple(c.format(u=unit) for c in (_COLUMNS_2D if dims == 2 else _COLUMNS_3D))


MEASUREMENT_COLUMNS = measurement_columns(None)
MEASUREMENT_COLUMNS_UM = measurement_columns(1.0)
MEASUREMENT_COLUMNS_3D = measurement_columns(None, 3)
MEASUREMENT_COLUMNS_3D_UM = measurement_columns(1.0, 3)

# Weights of the boundary-pixel perimeter estimate (regionprops' ``perimeter``, 4-neighbourhood):
# each boundary pixel is coded by itself (1), its 4 edge neighbours (2 each) and its 4 corner
# neighbours (10 each) in the boundary image; straight runs count 1, diagonal steps sqrt(2),
# corners between the two (1 + sqrt(2)) / 2.
_CODE_KERNEL = np.array([[10, 2, 10], [2, 1, 2], [10, 2, 10]])
_CODE_WEIGHTS = np.zeros(50)
_CODE_WEIGHTS[[5, 7, 15, 17, 25, 27]] = 1.0
_CODE_WEIGHTS[[21, 33]] = math.sqrt(2)
_CODE_WEIGHTS[[13, 23]] = (1 + math.sqrt(2)) / 2


def boundary_perimeter(own: np.ndarray) -> float:
    """Perimeter in pixels of the boolean object ``own``: its boundary pixels (object pixels with a
    4-neighbour outside), each weighted by the shape of the boundary through it (1 along a row
    or column, sqrt(2) on a diagonal, (1 + sqrt(2)) / 2 where they meet). Holes count.
    A single pixel or a one-pixel-wide line has perimeter 0 (as in regionprops)."""
    own = np.pad(np.asarray(own, bool), 1)
    cross = ndi.generate_binary_structure(2, 1)
    boundary = own & ~ndi.binary_erosion(own, cross, border_value=0)
    codes = ndi.convolve(boundary.astype(np.int64), _CODE_KERNEL, mode="constant", cval=0)
    return float(_CODE_WEIGHTS[np.clip(codes[boundary], 0, 49)].sum())


def hull_points(own: np.ndarray) -> np.ndarray:
    """(N, 2) float (row, column): the 0.5 iso-contour (marching squares) of the convex hull image
    of the boolean object ``own``, padded by one pixel (coordinates relative to ``own``): the
    outline Feret diameters are measured on, as in regionprops' ``feret_diameter_max``."""
    from skimage.measure import find_contours
    from skimage.morphology import convex_hull_image

    own = np.asarray(own, bool)
    hull = convex_hull_image(own) if own.sum() > 2 else own
    contours = find_contours(np.pad(hull, 1).astype(np.float32), 0.5, fully_connected="high")
    return np.concatenate(contours, axis=0) - 1.0


def feret_diameters(points: np.ndarray) -> tuple[float, float]:
    """(max, min) Feret diameter of the points (N, 2): the longest distance between two of them,
    and the smallest width of their convex hull over all directions (rotating calipers: the
    narrowest caliper pair rests on an edge of the hull, so the minimum over hull edges of the
    farthest hull point from that edge's line). Points on one line: width 0."""
    from scipy.spatial import ConvexHull, QhullError

    points = np.unique(np.asarray(points, np.float64), axis=0)
    if len(points) < 2:
        return 0.0, 0.0
    try:
        corners = points[ConvexHull(points).vertices]  # counter-clockwise
    except QhullError:  # all on one line
        span = points.max(axis=0) - points.min(axis=0)
        return float(np.hypot(*span)), 0.0
    gaps = corners[:, None, :] - corners[None, :, :]
    longest = float(np.sqrt((gaps ** 2).sum(axis=2)).max())
    edges = np.roll(corners, -1, axis=0) - corners
    normals = np.stack([-edges[:, 1], edges[:, 0]], axis=1) / np.hypot(edges[:, 0], edges[:, 1])[:, None]
    # distances[e, k]: of hull point k from the line through edge e
    distances = np.abs(np.einsum("ekj,ej->ek", corners[None, :, :] - corners[:, None, :], normals))
    return longest, float(distances.max(axis=1).min())


def ellipse_axes(ys: np.ndarray, xs: np.ndarray) -> tuple[float, float, float]:
    """(major, minor, eccentricity) of the ellipse with the same second central moments as the
    pixels (ys, xs): 4 sqrt of the eigenvalues of their covariance (divided by N), and
    sqrt(1 - minor**2 / major**2) (0 for a single pixel)."""
    coords = np.stack([ys, xs]).astype(np.float64)
    coords -= coords.mean(axis=1, keepdims=True)
    covariance = coords @ coords.T / coords.shape[1]
    small, large = np.clip(np.linalg.eigvalsh(covariance), 0, None)
    eccentricity = math.sqrt(1 - small / large) if large > 0 else 0.0
    return 4 * math.sqrt(large), 4 * math.sqrt(small), eccentricity


def measure(labels: np.ndarray, pixel_size: float | None = None) -> list[dict[str, Any]]:
    """One row of shape measurements per instance of a 2-D label image, in label order.

    Parameters
    ----------
    labels : (H, W) integer labels, 0 = background.
    pixel_size : side of a pixel in micrometres, or None for pixel units.

    Returns
    -------
    rows : dicts with the keys ``measurement_columns(pixel_size)`` (``u`` below is ``px`` or
    ``um``, lengths times ``pixel_size``, areas times its square):

    * ``label``, ``npixels`` (pixel count); ``area_u2``.
    * ``centroid_y_u``, ``centroid_x_u``: mean row and column of the pixels (pixel centres at
      whole numbers, 0 at the top-left pixel).
    * ``perimeter_u``: :func:`boundary_perimeter` (regionprops' ``perimeter``).
    * ``equivalent_diameter_u``: diameter of the disc of the same area, sqrt(4 area / pi).
    * ``feret_max_u``, ``feret_min_u``: :func:`feret_diameters` of :func:`hull_points`: the
      longest caliper distance (regionprops' ``feret_diameter_max``) and the shortest.
    * ``major_axis_u``, ``minor_axis_u``, ``eccentricity``: :func:`ellipse_axes`
      (regionprops' ``axis_major_length``, ``axis_minor_length``, ``eccentricity``).
    * ``solidity``: pixels / pixels of the convex hull image (regionprops' ``solidity``).
    * ``circularity``: ``min(1, 4 pi area / perimeter**2)``, 1 for a disc; NaN (an empty
      cell) when the perimeter is 0 (a single pixel or a one-pixel-wide line). Clipped at 1
      because small digital objects exceed it.

    Raises ``ValueError`` for labels that are not a 2-D non-negative integer array, or a
    ``pixel_size`` that is not a positive number.
    """
    from skimage.morphology import convex_hull_image

    check_labels(labels, 2)
    scale = _check_spacing(pixel_size, 1, "pixel_size")[0]
    columns = measurement_columns(pixel_size)
    rows = []
    for label, box in enumerate(ndi.find_objects(labels), 1):
        if box is None:
            continue
        own = labels[box] == label
        ys, xs = np.nonzero(own)
        npixels = int(ys.size)
        perimeter = boundary_perimeter(own)
        feret_max, feret_min = feret_diameters(hull_points(own))
        major, minor, eccentricity = ellipse_axes(ys, xs)
        convex = int(convex_hull_image(own).sum()) if npixels > 2 else npixels
        circularity = min(1.0, 4.0 * math.pi * npixels / perimeter ** 2) if perimeter > 0 else math.nan
        values = (label, npixels, npixels * scale * scale, (ys.mean() + box[0].start) * scale,
                  (xs.mean() + box[1].start) * scale, perimeter * scale,
                  math.sqrt(4 * npixels / math.pi) * scale, feret_max * scale, feret_min * scale,
                  major * scale, minor * scale, eccentricity, npixels / convex, circularity)
        rows.append({name: (value if name in ("label", "npixels") else float(value))
                     for name, value in zip(columns, values)})
    return rows


def measure_3d(labels: np.ndarray, voxel_size: Sequence[float] | None = None) -> list[dict[str, Any]]:
    """One row of shape measurements per instance of a 3-D label image, in label order.

    Parameters
    ----------
    labels : (Z, Y, X) integer labels, 0 = background.
    voxel_size : (z, y, x) voxel sides in micrometres, or None for voxel units.

    Returns
    -------
    rows : dicts with the keys ``measurement_columns(voxel_size, 3)`` (``u`` is ``px`` or ``um``):

    * ``label``, ``nvoxels``; ``volume_u3`` = ``nvoxels * z * y * x``.
    * ``centroid_z_u``, ``centroid_y_u``, ``centroid_x_u``: mean index along each axis times
      that axis' voxel side.
    * ``equivalent_diameter_u``: diameter of the ball of the same volume, (6 volume / pi)**(1/3)
      (regionprops' ``equivalent_diameter_area`` in 3-D).
    * ``surface_area_u2``: area of the 0.5 iso-surface of the object's mask (its bounding box
      padded by one voxel), ``skimage.measure.marching_cubes`` with ``spacing=voxel_size``
      then ``mesh_surface_area``. The mesh follows the voxel staircase, so it is about 8 %
      larger than the smooth surface of the same volume.
    * ``sphericity``: ``min(1, pi**(1/3) * (6 * volume)**(2/3) / surface_area)``: 0.90 to 0.93
      for digital balls of radius 3 to 20 voxels (the staircase area above); about
      (pi/6)**(1/3) = 0.81 for large cubes. Clipped at 1 (one voxel: 2.8).

    Raises ``ValueError`` for labels that are not a 3-D non-negative integer array, or a
    ``voxel_size`` that is not three positive numbers.
    """
    from skimage.measure import marching_cubes, mesh_surface_area

    check_labels(labels, 3)
    spacing = _check_spacing(voxel_size, 3, "voxel_size")
    columns = measurement_columns(voxel_size, 3)
    rows = []
    for label, box in enumerate(ndi.find_objects(labels), 1):
        if box is None:
            continue
        own = labels[box] == label
        zs, ys, xs = np.nonzero(own)
        volume = zs.size * spacing[0] * spacing[1] * spacing[2]
        vertices, faces, _, _ = marching_cubes(np.pad(own, 1).astype(np.float32), 0.5, spacing=spacing)
        surface_area = float(mesh_surface_area(vertices, faces))
        values = (label, int(zs.size), volume, (zs.mean() + box[0].start) * spacing[0],
                  (ys.mean() + box[1].start) * spacing[1], (xs.mean() + box[2].start) * spacing[2],
                  (6 * volume / math.pi) ** (1 / 3), surface_area,
                  min(1.0, math.pi ** (1 / 3) * (6 * volume) ** (2 / 3) / surface_area))
        rows.append({name: (value if name in ("label", "nvoxels") else float(value))
                     for name, value in zip(columns, values)})
    return rows


def _check_spacing(spacing: Any, n: int, name: str) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * n
    values = (spacing,) if n == 1 else spacing
    try:
        values = tuple(float(v) for v in values if not isinstance(v, (bool, np.bool_, str)))
        ok = len(values) == n and all(math.isfinite(v) and v > 0 for v in values) and \
            (n != 1 or not isinstance(spacing, (bool, np.bool_)))
    except TypeError:
        ok = False
    if not ok:
        what = "a positive number" if n == 1 else f"{n} positive numbers (z, y, x)"
        raise ValueError(f"{name} must be {what} or None; got {spacing!r}")
    return values
