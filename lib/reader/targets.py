"""Per-pixel training targets for bottom-up (watershed-based) instance segmentation.

An instance label patch ``(H, W)`` (0 = background, one id per object; ids need not be
consecutive or small, and objects may touch) becomes a stack of target channels
``(H, W, K)`` float32 in the order the user lists them (``--instance_channels F,C,Db``):

========  =========  ==========================================================================
name      kind       meaning
========  =========  ==========================================================================
``F``     binary     foreground: 1 where the label is not 0.
``C``     binary     contour: ``skimage.segmentation.find_boundaries(labels, mode=contour_mode)``
                     with 4-connectivity, computed here with array shifts (identical output).
``Db``    distance   distance to the object's boundary: the Euclidean distance from each pixel
                     to the nearest pixel *not of its own object* (so touching objects are
                     separated), divided by that object's maximum, so in (0, 1] on each object
                     and 0 on background. A pixel next to the boundary has distance 1 px.
``P``     binary     centre points: a disk of radius ``point_radius`` px around each object's
                     centre, clipped to the object. The centre is the pixel with the largest
                     boundary distance (inside the object even when the object is not convex).
``T``     binary     touching areas: foreground pixels closer than ``touch_width`` px to a
                     contact pixel, i.e. a pixel with an 8-neighbour of a different non-zero id.
                     Along a straight seam this is a band ``touch_width`` px wide on each side.
========  =========  ==========================================================================

Binary channels are trained with sigmoid cross-entropy, distance channels with L1 or MSE
(:attr:`TargetSpec.distance_loss`); :data:`CHANNELS` gives each name's kind.

The patch edge is not an object boundary: an object cut by the crop continues outside it, so
the distance transform only looks for non-object pixels inside the patch (the same result as
edge-padding the object's mask). An object that fills the whole patch has no boundary in view;
its ``Db`` is 1 everywhere and its centre is the pixel nearest the patch centre.

Targets are made in the data-loader workers after augmentation, so the work is vectorised:
whole-image shifts for ``F``, ``C`` and ``T``, and one exact distance transform per object
restricted to the object's bounding box grown by one pixel (``scipy.ndimage.find_objects``),
which always holds the pixel nearest to any of its object's pixels.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any

import cv2
import numpy as np
from scipy import ndimage as ndi

from ..common.settings import ConfigError

CHANNELS: dict[str, str] = {"F": "binary", "C": "binary", "Db": "distance", "P": "binary", "T": "binary"}
CONTOUR_MODES = ("thick", "inner", "outer")
DISTANCE_LOSSES = ("l1", "mse")

# find_objects returns one entry per possible id, so ids above _DIRECT_ID_LIMIT are renumbered
# 1..n first: through a lookup table up to _BINCOUNT_ID_LIMIT, by sorting (np.unique) above it.
_DIRECT_ID_LIMIT = 4096
_BINCOUNT_ID_LIMIT = 1 << 22


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """Which target channels to make, in which order, and how to weight their losses.

    Parameters
    ----------
    channels : names from :data:`CHANNELS`, in output order (case-sensitive).
    weights : loss weight per channel, non-negative, not all 0; ``None`` = 1.0 each.
    contour_mode : ``find_boundaries`` mode of ``C``: one of :data:`CONTOUR_MODES`.
    point_radius : radius in pixels of the ``P`` disks (0 = the centre pixel only).
    touch_width : width in pixels of the ``T`` band on each side of a contact (>= 1).
    distance_loss : loss of the distance channels: ``"l1"`` or ``"mse"``.

    Lists given for ``channels`` or ``weights`` (as read from JSON) are stored as tuples.
    """

    channels: tuple[str, ...] = ("F", "C", "Db")
    weights: tuple[float, ...] | None = None
    contour_mode: str = "thick"
    point_radius: int = 3
    touch_width: int = 2
    distance_loss: str = "l1"

    def __post_init__(self):
        if isinstance(self.channels, list):
            object.__setattr__(self, "channels", tuple(self.channels))
        if isinstance(self.weights, list):
            object.__setattr__(self, "weights", tuple(self.weights))

    def validate(self) -> "TargetSpec":
        """Return self, or raise ``ConfigError`` (a ``ValueError``) listing every invalid field."""
        v = []
        known = ", ".join(CHANNELS)
        if isinstance(self.channels, str) or not isinstance(self.channels, tuple):
            v.append(f"channels must be a tuple of channel names from {known}; got {self.channels!r}. "
                     f"Use parse_instance_channels('F,C,Db') to read a comma-separated text")
        elif not self.channels:
            v.append(f"channels must name at least one channel from {known}; got ()")
        else:
            for name in self.channels:
                if name not in CHANNELS:
                    v.append(f"channels must be names from {known} (case-sensitive); got {name!r}."
                             + _did_you_mean(name))
            repeated = sorted({c for c in self.channels if isinstance(c, str) and self.channels.count(c) > 1})
            if repeated:
                v.append(f"channels must not repeat a name; got {', '.join(repeated)} more than once "
                         f"in {','.join(map(str, self.channels))}")
        if self.weights is not None:
            if not isinstance(self.weights, tuple):
                v.append(f"weights must be a tuple of numbers, one per channel, or None; got {self.weights!r}")
            else:
                if isinstance(self.channels, tuple) and len(self.weights) != len(self.channels):
                    v.append(f"weights must give one number per channel ({len(self.channels)}: "
                             f"{','.join(map(str, self.channels))}); got {len(self.weights)}: {self.weights}")
                bad = [w for w in self.weights if not _is_real(w) or not math.isfinite(w) or w < 0]
                if bad:
                    v.append(f"weights must be finite numbers >= 0; got {', '.join(map(repr, bad))}")
                elif self.weights and all(w == 0 for w in self.weights):
                    v.append(f"weights must not all be 0 (nothing would be trained); got {self.weights}")
        if self.contour_mode not in CONTOUR_MODES:
            v.append(f"contour_mode must be one of {', '.join(CONTOUR_MODES)}; got {self.contour_mode!r}")
        if not _is_int(self.point_radius) or self.point_radius < 0:
            v.append(f"point_radius must be an integer >= 0 (pixels; 0 = the centre pixel only); "
                     f"got {self.point_radius!r}")
        if not _is_int(self.touch_width) or self.touch_width < 1:
            v.append(f"touch_width must be an integer >= 1 (pixels on each side of a contact); "
                     f"got {self.touch_width!r}")
        if self.distance_loss not in DISTANCE_LOSSES:
            v.append(f"distance_loss must be one of {', '.join(DISTANCE_LOSSES)}; got {self.distance_loss!r}")
        if v:
            raise ConfigError(v)
        return self

    @property
    def kinds(self) -> tuple[str, ...]:
        """Per channel ``"binary"`` (sigmoid cross-entropy) or ``"distance"`` (L1 / MSE)."""
        return tuple(CHANNELS[name] for name in self.channels)

    @property
    def loss_weights(self) -> tuple[float, ...]:
        """Per channel loss weight; 1.0 each when :attr:`weights` is ``None``."""
        if self.weights is None:
            return (1.0,) * len(self.channels)
        return tuple(float(w) for w in self.weights)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (lists, not tuples) that :meth:`from_dict` reads back."""
        d = dataclasses.asdict(self)
        d["channels"] = list(self.channels)
        d["weights"] = None if self.weights is None else [float(w) for w in self.weights]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TargetSpec":
        """Build and validate a spec from :meth:`to_dict` output; unknown keys raise ``ConfigError``.

        Missing keys take their defaults.
        """
        if not isinstance(d, dict):
            raise ConfigError([f"target spec must be a dict (as written by TargetSpec.to_dict); "
                               f"got {type(d).__name__}"])
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ConfigError([f"unknown setting {k!r} for TargetSpec; known: {', '.join(names)}"
                               for k in unknown])
        return cls(**d).validate()


def parse_instance_channels(text: str, weights: str | None = None, **options: Any) -> TargetSpec:
    """Read ``--instance_channels`` (and ``--instance_weights``) into a validated :class:`TargetSpec`.

    Parameters
    ----------
    text : comma-separated channel names, e.g. ``"F,C,Db"``; spaces around names are ignored.
    weights : comma-separated loss weights, one per channel, e.g. ``"1,1,0.5"``; ``None`` = all 1.
    **options : other :class:`TargetSpec` fields (``contour_mode``, ``point_radius``, ...).

    Raises
    ------
    ConfigError (a ValueError)
        listing every problem: an empty name, an unknown name or option, a weight that is not a
        number, a weight count that differs from the channel count, and so on.
    """
    problems = []
    names = tuple(part.strip() for part in str(text).split(","))
    if any(not name for name in names):
        problems.append(f"instance channels must be comma-separated names from {', '.join(CHANNELS)} "
                        f"with none empty; got {text!r}")
    parsed_weights = None
    if weights is not None:
        try:
            parsed_weights = tuple(float(part) for part in str(weights).split(","))
        except ValueError:
            problems.append(f"instance weights must be comma-separated numbers, e.g. '1,1,0.5'; got {weights!r}")
    fields = [f.name for f in dataclasses.fields(TargetSpec) if f.name not in ("channels", "weights")]
    unknown = sorted(set(options) - set(fields))
    problems += [f"unknown option {k!r} for instance targets; known: {', '.join(fields)}" for k in unknown]
    if problems:
        raise ConfigError(problems)
    spec = TargetSpec(channels=names, weights=parsed_weights, **options)
    return spec.validate()


def make_targets(instances: np.ndarray, spec: TargetSpec, out: np.ndarray | None = None) -> np.ndarray:
    """Compute the target channels of one instance label patch.

    Parameters
    ----------
    instances : (H, W) label image, any integer dtype, bool, or float holding whole numbers;
        0 = background, every other value one object (any non-negative ids, touching allowed).
    spec : a :class:`TargetSpec` (validated here).
    out : optional (H, W, K) float32 array to write into (e.g. a shared-memory view), where
        K = ``len(spec.channels)``; every element is overwritten.

    Returns
    -------
    targets : (H, W, K) float32, channel k = ``spec.channels[k]``; ``out`` itself when given.
        Binary channels hold 0 / 1, ``Db`` holds values in [0, 1].

    Raises
    ------
    ValueError
        when ``instances`` is not 2-D, holds negative, non-finite or fractional values, or
        ``out`` has the wrong shape or dtype; ``ConfigError`` for an invalid ``spec``.
    """
    spec.validate()
    labels = _as_labels(instances)
    h, w = labels.shape
    n_channels = len(spec.channels)
    if out is None:
        out = np.empty((h, w, n_channels), np.float32)
    elif not isinstance(out, np.ndarray) or out.shape != (h, w, n_channels) or out.dtype != np.float32:
        got = f"{out.shape} {out.dtype}" if isinstance(out, np.ndarray) else type(out).__name__
        raise ValueError(f"out must be a float32 array of shape {(h, w, n_channels)} "
                         f"(instances (H, W) + one plane per channel of {','.join(spec.channels)}); got {got}")

    foreground = labels != 0
    for k, name in enumerate(spec.channels):
        if name == "F":
            out[..., k] = foreground
        elif name == "C":
            out[..., k] = contours(labels, spec.contour_mode)
        elif name == "T":
            out[..., k] = touching_areas(labels, spec.touch_width, foreground)
        else:  # Db and P come from one distance transform per object, below
            out[..., k] = 0
    if "Db" in spec.channels or "P" in spec.channels:
        _object_channels(labels, out,
                         spec.channels.index("Db") if "Db" in spec.channels else None,
                         spec.channels.index("P") if "P" in spec.channels else None,
                         spec.point_radius)
    return out


def contours(labels: np.ndarray, mode: str = "thick") -> np.ndarray:
    """``skimage.segmentation.find_boundaries(labels, connectivity=1, mode=mode)``, without its
    grey dilations.

    Parameters
    ----------
    labels : (H, W) integer labels, 0 = background.
    mode : ``"thick"`` (pixels with a 4-neighbour of another value), ``"inner"`` (those that are
        foreground) or ``"outer"`` (those that are background, or foreground with an 8-neighbour
        of another non-zero id).

    Returns
    -------
    (H, W) bool.
    """
    if mode not in CONTOUR_MODES:
        raise ValueError(f"mode must be one of {', '.join(CONTOUR_MODES)}; got {mode!r}")
    boundary = np.zeros(labels.shape, bool)
    for a, b in _pairs(labels, diagonal=False):
        differ = labels[a] != labels[b]
        boundary[a] |= differ
        boundary[b] |= differ
    if mode == "inner":
        boundary &= labels != 0
    elif mode == "outer":
        boundary &= (labels == 0) | _contacts(labels)
    return boundary


def touching_areas(labels: np.ndarray, touch_width: int = 2, foreground: np.ndarray | None = None) -> np.ndarray:
    """Foreground pixels at Euclidean distance < ``touch_width`` px from a contact pixel.

    A contact pixel is a foreground pixel with an 8-neighbour of a different non-zero id
    (both sides of a seam are contact pixels, so a straight seam gives a band ``touch_width``
    pixels wide on each side).

    Parameters
    ----------
    labels : (H, W) integer labels, 0 = background.
    touch_width : >= 1.
    foreground : optional precomputed ``labels != 0``.

    Returns
    -------
    (H, W) bool.
    """
    if not _is_int(touch_width) or touch_width < 1:
        raise ValueError(f"touch_width must be an integer >= 1; got {touch_width!r}")
    seeds = _contacts(labels)
    if touch_width == 1 or not seeds.any():
        return seeds
    r = touch_width - 1
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    disk = (yy * yy + xx * xx < touch_width * touch_width).astype(np.uint8)
    band = cv2.dilate(seeds.view(np.uint8), disk).view(bool)
    return band & (labels != 0 if foreground is None else foreground)


def _object_channels(labels: np.ndarray, out: np.ndarray, k_distance: int | None, k_point: int | None,
                     point_radius: int) -> None:
    """Write ``Db`` (plane ``k_distance``) and ``P`` (plane ``k_point``) of every object into ``out``
    (those planes are zero on entry)."""
    h, w = labels.shape
    max_id = int(labels.max()) if labels.size else 0
    if max_id == 0:
        return
    if max_id > _DIRECT_ID_LIMIT:
        # find_objects returns one entry per possible id: renumber large ids 1..n first.
        if max_id <= _BINCOUNT_ID_LIMIT:
            present = np.bincount(labels.ravel().astype(np.intp, copy=False), minlength=max_id + 1) > 0
            present[0] = True
            lookup = np.cumsum(present, dtype=np.int32) - 1
            labels = lookup[labels]
        else:
            values, inverse = np.unique(labels, return_inverse=True)
            labels = inverse.reshape(h, w).astype(np.int32, copy=False)
            labels = labels if values[0] == 0 else labels + 1  # no background: keep 0 free
        max_id = int(labels.max())
    boxes = ndi.find_objects(labels, max_label=max_id)
    r = point_radius
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    stencil = yy * yy + xx * xx <= r * r
    for i, box in enumerate(boxes, start=1):
        if box is None:
            continue
        rows, cols = box
        # Grown by one pixel (inside the patch) so the box holds the nearest non-object pixel
        # of every object pixel; not grown past the patch edge, which is not a boundary.
        r0, r1 = max(rows.start - 1, 0), min(rows.stop + 1, h)
        c0, c1 = max(cols.start - 1, 0), min(cols.stop + 1, w)
        mask = labels[r0:r1, c0:c1] == i
        if mask.all():  # the object fills the patch: no boundary in view
            distance = mask.astype(np.float32)
        else:
            distance = cv2.distanceTransform(mask.view(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        peak = distance.max()
        if k_distance is not None:
            np.copyto(out[r0:r1, c0:c1, k_distance], distance / peak, where=mask)
        if k_point is not None:
            cy, cx = _centre(np.flatnonzero(distance.ravel() == peak), c1 - c0)
            y0, y1 = max(cy - r, 0), min(cy + r + 1, r1 - r0)
            x0, x1 = max(cx - r, 0), min(cx + r + 1, c1 - c0)
            disk = stencil[y0 - cy + r:y1 - cy + r, x0 - cx + r:x1 - cx + r] & mask[y0:y1, x0:x1]
            out[r0 + y0:r0 + y1, c0 + x0:c0 + x1, k_point][disk] = 1


def _centre(ties: np.ndarray, width: int) -> tuple[int, int]:
    """Of the raster indices ``ties`` (sorted) into a box ``width`` pixels wide, the (row, column)
    of the one nearest their mean; the first in raster order among equals. Deterministic, and on
    a ridge of equal maxima it picks the middle."""
    if len(ties) > 1:
        ys, xs = np.divmod(ties, width)
        d2 = (ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2
        return divmod(int(ties[np.argmin(d2)]), width)
    return divmod(int(ties[0]), width)


def _contacts(labels: np.ndarray) -> np.ndarray:
    """(H, W) bool: foreground pixels with an 8-neighbour of a different non-zero id."""
    contact = np.zeros(labels.shape, bool)
    for a, b in _pairs(labels, diagonal=True):
        la, lb = labels[a], labels[b]
        touch = (la != lb) & (la != 0) & (lb != 0)
        contact[a] |= touch
        contact[b] |= touch
    return contact


def _pairs(labels: np.ndarray, diagonal: bool):
    """Index pairs ``(a, b)`` such that ``labels[a]`` and ``labels[b]`` are the neighbour pairs
    along rows, columns and, if ``diagonal``, both diagonals."""
    s, e, a = slice(1, None), slice(None, -1), slice(None)
    pairs = [((s, a), (e, a)), ((a, s), (a, e))]
    if diagonal:
        pairs += [((s, s), (e, e)), ((s, e), (e, s))]
    return pairs


def _as_labels(instances: np.ndarray) -> np.ndarray:
    """Check ``instances`` and return it as a (H, W) integer array (no copy when already one)."""
    instances = np.asarray(instances)
    if instances.ndim != 2:
        raise ValueError(f"instances must be a 2-D (H, W) label image; got shape {instances.shape}. "
                         f"Drop a trailing channel axis with instances[..., 0]")
    kind = instances.dtype.kind
    if kind == "b":
        return instances.view(np.uint8)
    if kind == "f":
        if not np.isfinite(instances).all() or not np.array_equal(instances, np.floor(instances)):
            raise ValueError("instances must hold whole-number ids; got a float array with fractional or "
                             "non-finite values. Warp labels with nearest-neighbour interpolation")
        if instances.size and instances.min() < 0:
            raise ValueError(f"instances must be >= 0 (0 = background); got minimum {instances.min()}")
        return instances.astype(np.int64)
    if kind not in "iu":
        raise ValueError(f"instances must have an integer, bool or float dtype; got {instances.dtype}")
    if kind == "i" and instances.size and instances.min() < 0:
        raise ValueError(f"instances must be >= 0 (0 = background); got minimum {instances.min()}")
    return instances


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _did_you_mean(name: Any) -> str:
    if not isinstance(name, str):
        return ""
    exact = [known for known in CHANNELS if known.lower() == name.lower()]
    close = exact or difflib.get_close_matches(name, list(CHANNELS), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""
