"""Geometric and intensity augmentation of an image with its label, as pure functions.

``image, label = augment(image, label, rng, params)`` draws one random :class:`Transform`
from ``rng`` and applies it. The parameterisation and the defaults are those of NIST's
reference UNet reader (``usnistgov/semantic-segmentation-unet``):

* reflection in x and in y, each with probability 0.5;
* rotation uniform in [0, 360) degrees;
* jitter: a translation uniform in +-``jitter`` of the field of view (default 0.1);
* anisotropic scale change about the patch centre, uniform in ``1 +- scale`` per axis (default 0.1);
* additive Gaussian noise whose standard deviation is uniform in [0, ``noise``] times the
  dynamic range (max - min) of each channel (default 0.02);
* Gaussian blur with sigma ``max(0, U(-blur_max_sigma, blur_max_sigma))`` pixels (default 2),
  so, as in the reference, half of the samples are not blurred; each channel is blurred on
  its own, never across channels;
* intensity shift uniform in +-``intensity`` times each channel's dynamic range (default 0: off).

Reflection, rotation, scale, jitter and the random crop to the output patch are composed into
**one** affine map and applied with a single ``cv2.warpAffine`` per array: the image with
bilinear interpolation, the label with nearest neighbour, both with ``BORDER_REFLECT``, so an
augmented label never holds a value that was not in the input. Maps that send pixel centres to
pixel centres (flips, multiples of 90 degrees, integer crops) are exact.

Coordinates: ``x`` is the column, ``y`` the row, pixel centres at integer positions.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import cv2
import numpy as np

# Sigma below which a Gaussian blur changes nothing visible; skipping it saves the filter.
MIN_BLUR_SIGMA = 0.05

# cv2 warps work on these dtypes; any other label dtype is viewed as one of the same width.
_CV2_VIEW_DTYPE = {1: np.dtype("uint8"), 2: np.dtype("uint16"), 4: np.dtype("int32")}


@dataclasses.dataclass(frozen=True)
class AugmentParams:
    """Settings of the random augmentation (NIST's defaults).

    Fractions are of the field of view (``jitter``), of the size (``scale``) or of each
    channel's dynamic range (``noise``, ``intensity``). Raises ``ValueError`` listing every
    invalid field.
    """

    reflection: bool = True
    rotation: bool = True
    jitter: float = 0.1
    scale: float = 0.1
    noise: float = 0.02
    blur_max_sigma: float = 2.0
    intensity: float = 0.0

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("Invalid augmentation parameters:\n" + "\n".join(f"  - {p}" for p in problems))

    def problems(self) -> list[str]:
        """Every violated rule, one line per field (empty when valid)."""
        problems = []
        for name in ("reflection", "rotation"):
            value = getattr(self, name)
            if not isinstance(value, (bool, np.bool_)):
                problems.append(f"{name} must be a bool; got {value!r}")
        for name in ("jitter", "scale", "noise", "intensity"):
            value = getattr(self, name)
            if not _is_real(value) or not 0 <= value < 1:
                problems.append(f"{name} must be a fraction in [0, 1); got {value!r}")
        if not _is_real(self.blur_max_sigma) or not 0 <= self.blur_max_sigma <= 64:
            problems.append(f"blur_max_sigma must be a number of pixels in [0, 64]; got {self.blur_max_sigma!r}")
        return problems

    @classmethod
    def none(cls) -> "AugmentParams":
        """Parameters that change nothing (``augment`` then only crops)."""
        return cls(reflection=False, rotation=False, jitter=0.0, scale=0.0, noise=0.0, blur_max_sigma=0.0,
                   intensity=0.0)

    @property
    def is_identity(self) -> bool:
        return self == AugmentParams.none()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _is_real(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class Transform:
    """One drawn augmentation: everything ``apply_transform`` needs, nothing random left.

    ``angle`` in degrees (counter-clockwise as displayed, y pointing down), ``scale_x`` and
    ``scale_y`` as magnifications, ``shift_x``/``shift_y`` in output pixels, ``centre_y``/
    ``centre_x`` the source point (pixel coordinates) that lands on the patch centre.
    ``noise_sigma``, ``intensity_shift``: fractions of each channel's dynamic range;
    ``noise_seed`` seeds OpenCV's generator for the noise field.
    """

    centre_y: float
    centre_x: float
    flip_x: bool = False
    flip_y: bool = False
    angle: float = 0.0
    scale_x: float = 1.0
    scale_y: float = 1.0
    shift_x: float = 0.0
    shift_y: float = 0.0
    noise_sigma: float = 0.0
    noise_seed: int = 0
    blur_sigma: float = 0.0
    intensity_shift: float = 0.0


def crop_centre(source_shape: Sequence[int], patch_shape: Sequence[int], top: int, left: int) -> tuple[float, float]:
    """Source point ``(centre_y, centre_x)`` that puts the patch with top-left ``(top, left)`` in place."""
    return top + (patch_shape[0] - 1) / 2.0, left + (patch_shape[1] - 1) / 2.0


def random_crop_origin(rng: np.random.Generator, source_shape: Sequence[int], patch_shape: Sequence[int],
                       valid_shape: Sequence[int] | None = None) -> tuple[int, int]:
    """Top-left ``(top, left)`` of a patch drawn uniformly among those inside the source.

    ``valid_shape`` ``(h, w)`` restricts the patch to the unpadded part of a tile where it fits.
    A source smaller than the patch gives a negative origin: the patch is centred on it and the
    warp fills the rest by reflection.
    """
    origin = []
    for axis in range(2):
        extent = source_shape[axis]
        if valid_shape is not None and valid_shape[axis] >= patch_shape[axis]:
            extent = min(extent, int(valid_shape[axis]))
        room = extent - patch_shape[axis]
        origin.append(int(rng.integers(0, room + 1)) if room >= 0 else room // 2)
    return origin[0], origin[1]


def sample_transform(rng: np.random.Generator, params: AugmentParams, source_shape: Sequence[int],
                     patch_shape: Sequence[int] | None = None, centre: tuple[float, float] | None = None,
                     valid_shape: Sequence[int] | None = None) -> Transform:
    """Draw a :class:`Transform` for a source of ``(H, W, ...)`` and an output patch ``(h, w)``.

    ``centre`` fixes the source point that lands on the patch centre (foreground-weighted
    sampling); otherwise the crop is uniform over the source (see :func:`random_crop_origin`).
    Draws always consume ``rng`` in the same order, so a seed gives the same transform whatever
    the parameters that are switched off.
    """
    patch_shape = tuple(source_shape[:2]) if patch_shape is None else tuple(patch_shape)
    if centre is None:
        top, left = random_crop_origin(rng, source_shape, patch_shape, valid_shape)
        centre = crop_centre(source_shape, patch_shape, top, left)
    u = rng.random(10)
    ph, pw = patch_shape
    return Transform(
        centre_y=float(centre[0]), centre_x=float(centre[1]),
        flip_x=bool(params.reflection and u[0] < 0.5),
        flip_y=bool(params.reflection and u[1] < 0.5),
        angle=float(360.0 * u[2]) if params.rotation else 0.0,
        scale_x=float(1.0 + params.scale * (2 * u[3] - 1)),
        scale_y=float(1.0 + params.scale * (2 * u[4] - 1)),
        shift_x=float(params.jitter * pw * (2 * u[5] - 1)),
        shift_y=float(params.jitter * ph * (2 * u[6] - 1)),
        noise_sigma=float(params.noise * u[7]),
        noise_seed=int(rng.integers(0, 2**31 - 1)) if params.noise > 0 else 0,
        blur_sigma=float(max(0.0, params.blur_max_sigma * (2 * u[8] - 1))),
        intensity_shift=float(params.intensity * (2 * u[9] - 1)),
    )


def affine_matrix(transform: Transform, patch_shape: Sequence[int]) -> np.ndarray:
    """The ``(2, 3)`` float64 map from output pixel ``(x, y, 1)`` to source pixel (``WARP_INVERSE_MAP``).

    Forward, a source point ``p`` goes to ``F S R (p - c_source) + c_patch + shift``: rotation
    ``R``, then scale ``S``, then flips ``F``, about the patch centre. This returns its inverse.
    """
    ph, pw = patch_shape[0], patch_shape[1]
    theta = math.radians(transform.angle)
    cos, sin = math.cos(theta), math.sin(theta)
    # R(-theta) S^-1 F^-1, with y down: a positive angle turns the picture counter-clockwise.
    rotation_inverse = np.array([[cos, -sin], [sin, cos]])
    scale_inverse = np.diag([1.0 / transform.scale_x, 1.0 / transform.scale_y])
    flip = np.diag([-1.0 if transform.flip_x else 1.0, -1.0 if transform.flip_y else 1.0])
    a = rotation_inverse @ scale_inverse @ flip
    # Multiples of 90 degrees leave cos/sin of 1e-16, not 0; snap them so the map is exact.
    snapped = np.round(a)
    a = np.where(np.abs(a - snapped) < 1e-12, snapped, a)
    patch_centre = np.array([(pw - 1) / 2.0 + transform.shift_x, (ph - 1) / 2.0 + transform.shift_y])
    source_centre = np.array([transform.centre_x, transform.centre_y])
    matrix = np.empty((2, 3))
    matrix[:, :2] = a
    matrix[:, 2] = source_centre - a @ patch_centre
    return matrix


def _integer_crop(matrix: np.ndarray, source_shape: Sequence[int], patch_shape: Sequence[int]) -> tuple[int, int] | None:
    """``(top, left)`` when the map is a plain in-bounds integer crop, else None."""
    if not np.array_equal(matrix[:, :2], np.eye(2)):
        return None
    left, top = matrix[0, 2], matrix[1, 2]
    if left != round(left) or top != round(top):
        return None
    top, left = int(top), int(left)
    if top < 0 or left < 0 or top + patch_shape[0] > source_shape[0] or left + patch_shape[1] > source_shape[1]:
        return None
    return top, left


def warp(array: np.ndarray, matrix: np.ndarray, patch_shape: Sequence[int], nearest: bool) -> np.ndarray:
    """Warp ``(H, W)`` or ``(H, W, C)`` by ``matrix`` (output -> source) into ``patch_shape`` ``(h, w)``.

    ``nearest`` picks nearest-neighbour interpolation and keeps the dtype (labels: values are
    copied, never mixed); otherwise bilinear, and the result is float32. Borders reflect
    (``cv2.BORDER_REFLECT``). Integer in-bounds crops are plain slices, exact for every dtype.
    """
    ph, pw = int(patch_shape[0]), int(patch_shape[1])
    out_dtype = array.dtype if nearest else np.dtype(np.float32)
    crop = _integer_crop(matrix, array.shape, (ph, pw))
    if crop is not None:
        top, left = crop
        return np.array(array[top:top + ph, left:left + pw], dtype=out_dtype)
    work = array
    if not nearest and work.dtype != np.float32:
        # Interpolate in float32: an integer warp would round away the sub-level detail.
        work = work.astype(np.float32)
    elif nearest and work.dtype not in (np.uint8, np.uint16, np.int16, np.int32, np.float32):
        # Nearest neighbour only copies bytes, so a same-width view keeps every value intact
        # for dtypes OpenCV lacks (bool, int8, uint32, int64, ...); 8-byte values travel as
        # two int32 channels.
        work = np.ascontiguousarray(work)
        channels = 1 if work.ndim == 2 else work.shape[2]
        if work.dtype.itemsize == 8:
            work = work.view(np.int32).reshape(work.shape[0], work.shape[1], 2 * channels)
        else:
            work = work.view(_CV2_VIEW_DTYPE[work.dtype.itemsize])
    flags = (cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR) | cv2.WARP_INVERSE_MAP
    out = cv2.warpAffine(np.ascontiguousarray(work), matrix, (pw, ph), flags=flags, borderMode=cv2.BORDER_REFLECT)
    if out.dtype != out_dtype:
        out = np.ascontiguousarray(out).view(out_dtype)
    # OpenCV drops a trailing axis of length 1 and the byte view may have folded axes.
    return out.reshape((ph, pw) + tuple(array.shape[2:]))


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Blur each channel of a float32 ``(H, W, C)`` image with its own 2D Gaussian (reflect border).

    Channels are filtered one by one, so no channel ever leaks into another.
    """
    if sigma < MIN_BLUR_SIGMA:
        return image
    out = np.empty_like(image)
    for c in range(image.shape[2]):
        out[:, :, c] = cv2.GaussianBlur(np.ascontiguousarray(image[:, :, c]), (0, 0), sigma,
                                        borderType=cv2.BORDER_REFLECT)
    return out


def apply_transform(image: np.ndarray, label: np.ndarray | None, transform: Transform,
                    patch_shape: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Apply a drawn :class:`Transform`; see :func:`augment` for shapes and dtypes."""
    image = _as_hwc(image)
    patch_shape = tuple(image.shape[:2]) if patch_shape is None else tuple(int(s) for s in patch_shape[:2])
    matrix = affine_matrix(transform, patch_shape)
    out = warp(image, matrix, patch_shape, nearest=False)
    out_label = None if label is None else warp(label, matrix, patch_shape, nearest=True)

    if transform.noise_sigma > 0 or transform.intensity_shift != 0:
        # Dynamic range of each channel, as in the reference (after the geometric warp).
        flat = out.reshape(-1, out.shape[2])
        dynamic_range = (flat.max(axis=0) - flat.min(axis=0)).astype(np.float32)
    if transform.noise_sigma > 0:
        # OpenCV's normal generator is about 5x faster than NumPy's; it is seeded from the
        # transform, so the noise is still a function of the caller's rng alone.
        noise = np.empty(out.shape, dtype=np.float32)
        cv2.setRNGSeed(transform.noise_seed)
        cv2.randn(noise.reshape(out.shape[0], -1), 0.0, 1.0)
        noise *= transform.noise_sigma * dynamic_range
        out += noise
    if transform.blur_sigma >= MIN_BLUR_SIGMA:
        out = gaussian_blur(out, transform.blur_sigma)
    if transform.intensity_shift != 0:
        out += transform.intensity_shift * dynamic_range
    return out, out_label


def augment(image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator,
            params: AugmentParams, patch_shape: Sequence[int] | None = None,
            centre: tuple[float, float] | None = None,
            valid_shape: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Randomly augment an image and its label together, then crop them to ``patch_shape``.

    Parameters
    ----------
    image : (H, W, C) or (H, W) array, any real dtype
    label : (H, W) or (H, W, L) integer array, or None
    rng : numpy Generator, the only source of randomness (same state -> same output)
    params : AugmentParams
    patch_shape : (h, w), default (H, W). Smaller gives a random crop (uniform, or about ``centre``).
    centre : optional source point (y, x) to put at the patch centre.
    valid_shape : optional (h, w) unpadded extent of the source, where random crops stay if they fit.

    Returns
    -------
    image : (h, w, C) float32
    label : (h, w) or (h, w, L), the input dtype, holding only values present in the input; or None

    Raises
    ------
    ValueError
        for an image that is not 2D/3D or a label whose (H, W) differs from the image's.
    """
    image = _as_hwc(image)
    if label is not None and (label.ndim not in (2, 3) or label.shape[:2] != image.shape[:2]):
        raise ValueError(f"label must be (H, W) or (H, W, L) with H, W = {image.shape[:2]}; got {label.shape}")
    transform = sample_transform(rng, params, image.shape, patch_shape, centre=centre, valid_shape=valid_shape)
    return apply_transform(image, label, transform, patch_shape)


def _as_hwc(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return image[:, :, None]
    if image.ndim != 3:
        raise ValueError(f"image must be (H, W) or (H, W, C); got shape {image.shape}")
    return image
