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
``B``     binary     background: 1 where the label is 0.
``R``     ray        StarDist star-convex polygons: ``R`` stands for ``n_rays`` planes ``R0`` ..
                     ``R<n-1>``, the distance from each object pixel to its object's boundary
                     along ray k (angle 2 pi k / n), learnt as ``d / (d + 16 px)``
                     (:mod:`.targets_stardist`). Needs ``F``: the object probability.
``H, V``  distance   HoVer-Net offsets to the object's centre of mass, per object in [-1, 1],
                     stored as ``(offset + 1) / 2`` (:mod:`.targets_fields`). Need ``F``.
``D``     distance   signed distance to the boundary, tanh-scaled: ``0.5 + 0.5 tanh(d / d_alpha)``
                     inside, ``0.5 - 0.5 tanh(d / d_beta)`` outside.
``Dc``    distance   closeness to the object's centre (the ``P`` centre): 1 there, falling
                     linearly to 0 at the object's farthest pixel; 0 on background.
``Dn``    distance   closeness to the neighbouring objects: ``1 - d / dn_scale`` clipped to [0, 1]
                     inside objects, ``d`` the distance to the nearest pixel of another object.
``A``     binary     affinities: ``A`` stands for ``A0_1, A1_0``; ``A<dy>_<dx>`` (any offsets,
                     e.g. ``A0_4,A4_0`` for long range) is 1 where a pixel and the one at
                     ``(y + dy, x + dx)`` belong to the same object.
``E``     embedding  EmbedSeg pixel embeddings: ``E`` stands for ``Ey, Ex`` (offsets of up to
                     256 px), ``Esy, Esx`` (the clustering bandwidth) and ``Eseed`` (seediness),
                     all through a sigmoid; trained by a loss on whole objects
                     (lib/training/embedding_loss.py); the maps here are the ideal ones
                     (:mod:`.targets_embedding`). Works alone.
``K``     class      a class per instance: planes ``K0`` (background) .. ``K<n>``, one-hot of the
                     class of each pixel's object (databases with two-channel instance masks,
                     lib/store/instance_classes.py); trained with a softmax cross-entropy over
                     the K planes together. Added by the trainer, never named by the user.
========  =========  ==========================================================================

The shorthands ``R``, ``A`` and ``E`` are expanded by :func:`parse_instance_channels`: a spec always
lists one name per plane, so ``len(spec.channels)`` is the number of output planes.

Binary channels are trained with sigmoid cross-entropy, distance channels with L1 or MSE
(:attr:`TargetSpec.distance_loss`), ray planes with the same loss on object pixels only (the
StarDist polygon-distance loss: see ``lib/training/losses.py``); :func:`channel_kind` gives each
name's kind.

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
from . import targets_fields as fields
from .targets_embedding import EMBEDDING_PLANES, embedding_targets, is_embedding_name
from .targets_stardist import encode_rays, grid_offset, is_ray_name, ray_count, ray_names, star_distances

CHANNELS: dict[str, str] = {"F": "binary", "C": "binary", "Db": "distance", "P": "binary", "T": "binary"}
# The channels of issue 17 (one plane each; R and A are shorthands for several planes, below).
MORE_CHANNELS: dict[str, str] = {"B": "binary", "H": "distance", "V": "distance", "D": "distance",
                                 "Dc": "distance", "Dn": "distance"}
# A class per instance: planes K0 (background) .. K<n>, kind "class" (see with_classes).
CLASS_PREFIX = "K"
# Shorthands that stand for several planes (expanded by parse_instance_channels).
SHORTHANDS = ("R", "A", "E")
# Channel sets whose maps the post-processing turns into instances (lib/instances/postprocess.py).
WORKING_COMBINATIONS = ("F,C,Db (the default)", "F", "F,C", "F,Db", "F,P", "F,C,T", "Db", "F,R", "F,H,V", "F,D",
                        "D", "F,Dc", "F,Dn", "F,B", "A", "F,A", "E")
CONTOUR_MODES = ("thick", "inner", "outer")
# The ray planes' default loss weights add up to this: an error of 1 px on a typical ray (8 px, encoded
# d / (d + 16)) then costs about 0.1, as much as F's cross-entropy late in training.
RAY_TOTAL_WEIGHT = 4.0
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
    n_rays : number of ``R`` planes (>= 3); ray_grid : compute rays on every ray_grid-th row and
        column only (StarDist's grid; 1 = every pixel, 2 = 4 times faster).
    d_alpha, d_beta : tanh scales (px) of ``D`` inside and outside objects (> 0).
    dn_scale : distance (px) over which ``Dn`` falls from 1 (touching) to 0 (> 0).

    Lists given for ``channels`` or ``weights`` (as read from JSON) are stored as tuples.
    """

    channels: tuple[str, ...] = ("F", "C", "Db")
    weights: tuple[float, ...] | None = None
    contour_mode: str = "thick"
    point_radius: int = 3
    touch_width: int = 2
    distance_loss: str = "l1"
    n_rays: int = 32
    ray_grid: int = 2
    d_alpha: float = 5.0
    d_beta: float = 5.0
    dn_scale: float = 10.0
    class_names: tuple[str, ...] = ()  # a class per instance: names of classes 0 (background) .. n (planes K*)

    def __post_init__(self):
        for name in ("channels", "weights", "class_names"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))

    def validate(self) -> "TargetSpec":
        """Return self, or raise ``ConfigError`` (a ``ValueError``) listing every invalid field."""
        v = []
        known = ", ".join([*CHANNELS, *MORE_CHANNELS, *SHORTHANDS])
        if isinstance(self.channels, str) or not isinstance(self.channels, tuple):
            v.append(f"channels must be a tuple of channel names from {known}; got {self.channels!r}. "
                     f"Use parse_instance_channels('F,C,Db') to read a comma-separated text")
        elif not self.channels:
            v.append(f"channels must name at least one channel from {known}; got ()")
        else:
            for name in self.channels:
                if channel_kind(name) is None:
                    v.append(f"channels must be names from {', '.join(CHANNELS)} (case-sensitive); got {name!r}."
                             + _did_you_mean(name) + f" Also valid: {', '.join(MORE_CHANNELS)}, R0.. (rays), "
                             "A<dy>_<dx> (affinities), E (embeddings)")
            rays = [c for c in self.channels if is_ray_name(c)]
            if rays and _is_int(self.n_rays) and tuple(rays) != ray_names(self.n_rays):
                v.append(f"channels must hold the n_rays={self.n_rays} ray planes R0..R{self.n_rays - 1} in order; "
                         f"got {','.join(rays)}. Write R in --instance_channels to get them all")
            embedding = tuple(c for c in self.channels if is_embedding_name(c))
            first = self.channels.index(embedding[0]) if embedding else 0
            if embedding and self.channels[first:first + len(EMBEDDING_PLANES)] != EMBEDDING_PLANES:
                v.append(f"channels must hold the embedding planes {','.join(EMBEDDING_PLANES)} side by side and in order; "
                         f"got {','.join(embedding)}. Write E in --instance_channels to get them all")
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
        if not _is_int(self.n_rays) or not 3 <= self.n_rays <= 256:
            v.append(f"n_rays must be an integer in [3, 256]; got {self.n_rays!r}")
        if not _is_int(self.ray_grid) or not 1 <= self.ray_grid <= 8:
            v.append(f"ray_grid must be an integer in [1, 8] (1 = rays at every pixel); got {self.ray_grid!r}")
        for name in ("d_alpha", "d_beta", "dn_scale"):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value) or value <= 0:
                v.append(f"{name} must be a number > 0 (pixels); got {value!r}")
        if self.distance_loss not in DISTANCE_LOSSES:
            v.append(f"distance_loss must be one of {', '.join(DISTANCE_LOSSES)}; got {self.distance_loss!r}")
        v += _class_problems(self)
        if v:
            raise ConfigError(v)
        return self

    @property
    def n_class_planes(self) -> int:
        """The planes of the class head (K0..K<n>): 0 without classes."""
        return len(self.class_names)

    @property
    def kinds(self) -> tuple[str, ...]:
        """Per plane ``"binary"`` (sigmoid cross-entropy), ``"distance"`` (L1 / MSE) or ``"ray"``
        (L1 / MSE on object pixels only)."""
        return tuple(channel_kind(name) for name in self.channels)

    @property
    def loss_weights(self) -> tuple[float, ...]:
        """Per channel loss weight. When :attr:`weights` is ``None``: 1.0 each, but the ray planes
        share :data:`RAY_TOTAL_WEIGHT` (each ``RAY_TOTAL_WEIGHT / n_rays``): with weight 1 each, 32
        ray planes outweighed ``F`` 32 to 1 and a 3-minute CPU run had not yet learnt ``F`` at all
        (StarDist, too, weighs its mean ray loss, not the sum, against the probability's)."""
        if self.weights is None:
            n_rays = ray_count(self.channels)
            return tuple(RAY_TOTAL_WEIGHT / n_rays if is_ray_name(c) else 1.0 for c in self.channels)
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

    ``R`` stands for the ``n_rays`` ray planes ``R0..``, ``A`` for the affinity planes
    ``A0_1,A1_0``, ``E`` for the five embedding planes ``Ey,Ex,Esy,Esx,Eseed``; a weight given for a
    shorthand applies to each of its planes.

    Raises
    ------
    ConfigError (a ValueError)
        listing every problem: an empty name, an unknown name or option, a weight that is not a
        number, a weight count that differs from the channel count, a set of channels the
        post-processing cannot turn into instances (the message lists the sets that work), and so on.
    """
    problems = []
    given = tuple(part.strip() for part in str(text).split(","))
    names: list[str] = []
    for name in given:
        if name == "R":
            n_rays = options.get("n_rays", TargetSpec.n_rays)
            names += ray_names(n_rays) if _is_int(n_rays) and 3 <= n_rays <= 256 else ["R0"]
        elif name == "A":
            names += [fields.affinity_name(*offset) for offset in fields.DEFAULT_AFFINITIES]
        elif name == "E":
            names += EMBEDDING_PLANES
        else:
            names.append(name)
    if any(not name for name in names):
        problems.append(f"instance channels must be comma-separated names from "
                        f"{', '.join([*CHANNELS, *MORE_CHANNELS, *SHORTHANDS])} "
                        f"with none empty; got {text!r}")
    parsed_weights = None
    if weights is not None:
        try:
            parsed_weights = tuple(float(part) for part in str(weights).split(","))
        except ValueError:
            problems.append(f"instance weights must be comma-separated numbers, e.g. '1,1,0.5'; got {weights!r}")
    option_names = [f.name for f in dataclasses.fields(TargetSpec) if f.name not in ("channels", "weights")]
    unknown = sorted(set(options) - set(option_names))
    problems += [f"unknown option {k!r} for instance targets; known: {', '.join(option_names)}" for k in unknown]
    if parsed_weights is not None and len(parsed_weights) == len(given) != len(names):
        parsed_weights = tuple(w for name, w in zip(given, parsed_weights) for _ in range(_planes(name, options)))
    if all(channel_kind(name) is not None for name in names):
        problems += combination_problems(tuple(names))
    if problems:
        raise ConfigError(problems)
    spec = TargetSpec(channels=tuple(names), weights=parsed_weights, **options)
    return spec.validate()


def _planes(name: str, options: dict) -> int:
    if name == "R":
        return int(options.get("n_rays", TargetSpec.n_rays))
    if name == "E":
        return len(EMBEDDING_PLANES)
    return len(fields.DEFAULT_AFFINITIES) if name == "A" else 1


def class_plane_names(n: int) -> tuple[str, ...]:
    """``K0`` .. ``K<n-1>``: the planes of a class head over ``n`` classes (background included)."""
    return tuple(f"{CLASS_PREFIX}{i}" for i in range(n))


def is_class_name(name: Any) -> bool:
    return isinstance(name, str) and name[:1] == CLASS_PREFIX and name[1:].isdigit() and name[1:] == str(int(name[1:]))


def with_classes(spec: TargetSpec, class_names: list[str] | tuple[str, ...]) -> TargetSpec:
    """``spec`` with a class head over ``class_names`` (background first): planes K0.. appended, weight 1 each.

    A spec that has them already, or an empty ``class_names``, is returned as it is.
    """
    if not class_names or spec.class_names:
        return spec
    weights = None if spec.weights is None else spec.weights + (1.0,) * len(class_names)
    return dataclasses.replace(spec, channels=spec.channels + class_plane_names(len(class_names)), weights=weights,
                               class_names=tuple(class_names)).validate()


def _class_problems(spec: TargetSpec) -> list[str]:
    if not isinstance(spec.class_names, tuple) or not all(isinstance(n, str) for n in spec.class_names):
        return [f"class_names must be a list of names, background first; got {spec.class_names!r}"]
    if not isinstance(spec.channels, tuple):
        return []
    planes = tuple(c for c in spec.channels if is_class_name(c))
    n = len(spec.class_names)
    if n == 1:
        return [f"class_names must name background and at least one class; got {spec.class_names!r}"]
    if planes and not n:
        return [f"channels must not name class planes ({','.join(planes)}): the trainer adds them for a database "
                "with a class per instance (build_lmdb.py --mask_type instance with two-channel masks)"]
    if planes != class_plane_names(n) or (n and spec.channels[-n:] != planes):
        return [f"channels must end with the class planes K0..K{max(n - 1, 0)}, one per class name "
                f"({n}: {', '.join(spec.class_names) or 'none'}); got {','.join(planes) or 'none'}"]
    return []


def channel_kind(name: Any) -> str | None:
    """``"binary"``, ``"distance"``, ``"ray"``, ``"embedding"`` or ``"class"`` for a plane name; None for an
    unknown one."""
    if not isinstance(name, str):
        return None
    if is_class_name(name):
        return "class"
    if name in CHANNELS or name in MORE_CHANNELS:
        return CHANNELS.get(name) or MORE_CHANNELS[name]
    if is_ray_name(name):
        return "ray"
    if is_embedding_name(name):
        return "embedding"
    offset = fields.affinity_offset(name)
    if offset is not None and offset != (0, 0) and max(map(abs, offset)) <= fields.MAX_AFFINITY_OFFSET:
        return "binary"
    return None


def combination_problems(names: tuple[str, ...]) -> list[str]:
    """Why the post-processing could not make instances from these planes ([] when it can)."""
    present = set(names)
    # affinities and embeddings build seeds and masks from their own planes
    self_sufficient = any(fields.affinity_offset(n) is not None for n in names) or "Eseed" in present
    problems = []
    if ray_count(names) and "Eseed" in present:
        problems.append("channels R (polygons) and E (embedding clustering) each make the instances: choose one")
    elif "Eseed" in present and any(not is_embedding_name(n) and not is_class_name(n) for n in names):
        problems.append("channels E make the instances by clustering alone: the other channels "
                        f"({','.join(n for n in names if not is_embedding_name(n) and not is_class_name(n))}) would "
                        "be trained and never used; give E alone")
    if ray_count(names) and "F" not in present:
        problems.append("channels with R (star-convex polygons) need F, the object probability of each polygon")
    if ("H" in present) != ("V" in present) or (("H" in present) and "F" not in present):
        problems.append("channels H and V (HoVer-Net offsets) go together and need F")
    if not self_sufficient and not present & {"F", "Db", "P", "D", "Dc"}:
        problems.append("channels must include F, Db, P, D, Dc, affinities or E to build seeds from")
    if not self_sufficient and not present & {"F", "Db", "D"}:
        problems.append("channels must include F, Db, D, affinities or E to build the growth mask from")
    if problems:
        got = ",".join("R" if n == "R0" else "E" if n == "Ey" else n for n in names
                       if not (is_ray_name(n) or is_embedding_name(n)) or n in ("R0", "Ey"))
        problems = [f"instance channels {got} cannot be post-processed: " + "; ".join(problems)
                    + ". Sets that work: " + "; ".join(WORKING_COMBINATIONS)
                    + " (other channels may be added to any of them)"]
    return problems


def make_targets(instances: np.ndarray, spec: TargetSpec, out: np.ndarray | None = None,
                 classes: np.ndarray | None = None) -> np.ndarray:
    """Compute the target channels of one instance label patch.

    Parameters
    ----------
    instances : (H, W) label image, any integer dtype, bool, or float holding whole numbers;
        0 = background, every other value one object (any non-negative ids, touching allowed).
    spec : a :class:`TargetSpec` (validated here).
    out : optional (H, W, K) float32 array to write into (e.g. a shared-memory view), where
        K = ``len(spec.channels)``; every element is overwritten.
    classes : (H, W) class of each pixel's object (0 on background), the second label channel of
        a database with a class per instance; needed when ``spec`` has class planes (K0..).

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
    index = {name: k for k, name in enumerate(spec.channels)}
    for k, name in enumerate(spec.channels):
        if name == "F":
            out[..., k] = foreground
        elif name == "B":
            out[..., k] = ~foreground
        elif name == "C":
            out[..., k] = contours(labels, spec.contour_mode)
        elif name == "T":
            out[..., k] = touching_areas(labels, spec.touch_width, foreground)
        elif name == "Dn":
            out[..., k] = fields.neighbour_distance(labels, spec.dn_scale)
        elif not (is_ray_name(name) or is_embedding_name(name)):  # the others below, several planes at a time
            out[..., k] = 0  # (rays and embeddings overwrite their planes whole: zeroing 32 strided planes cost 10 ms)
    per_object = {name: index[name] for name in ("Db", "P", "Dc") if name in index}
    inside = np.zeros(labels.shape, np.float32) if "D" in index else None
    if per_object or inside is not None:
        _object_channels(labels, out, per_object, spec.point_radius, inside)
    if inside is not None:
        out[..., index["D"]] = fields.signed_distance(labels, inside, spec.d_alpha, spec.d_beta)
    if "H" in index:
        out[..., index["H"]], out[..., index["V"]] = fields.centre_offsets(labels)
    n_rays = ray_count(spec.channels)
    if n_rays:
        first = index["R0"]
        offset = grid_offset(labels, spec.ray_grid)
        out[..., first:first + n_rays] = encode_rays(star_distances(labels, n_rays, spec.ray_grid, offset))
    if "Ey" in index:
        first = index["Ey"]
        out[..., first:first + len(EMBEDDING_PLANES)] = embedding_targets(labels)
    planes = [(k, fields.affinity_offset(name)) for k, name in enumerate(spec.channels)]
    planes = [(k, offset) for k, offset in planes if offset is not None]
    if planes:
        maps = fields.affinities(labels, [offset for _, offset in planes])
        for j, (k, _) in enumerate(planes):
            out[..., k] = maps[..., j]
    if spec.n_class_planes:
        _class_planes(labels, classes, out[..., n_channels - spec.n_class_planes:])
    return out


def _class_planes(labels: np.ndarray, classes: np.ndarray | None, out: np.ndarray) -> None:
    """One-hot of the class of each pixel's object (plane 0: background) into ``out`` (H, W, n)."""
    if classes is None or np.shape(classes) != labels.shape:
        got = "none" if classes is None else f"shape {np.shape(classes)}"
        raise ValueError(f"classes must be an (H, W) array beside instances {labels.shape} for the class planes "
                         f"K0..K{out.shape[-1] - 1}; got {got}")
    values = np.where(labels != 0, np.asarray(classes), 0).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() >= out.shape[-1]):
        raise ValueError(f"classes must be in [0, {out.shape[-1]}) (the class names of the spec); got values "
                         f"{int(values.min())}..{int(values.max())}")
    out[...] = 0
    np.put_along_axis(out, values[..., np.newaxis], 1.0, axis=-1)


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


def _object_channels(labels: np.ndarray, out: np.ndarray, planes: dict[str, int], point_radius: int,
                     inside: np.ndarray | None = None) -> None:
    """Write ``Db``, ``P`` and ``Dc`` (planes ``planes[name]``) of every object into ``out`` (those
    planes are zero on entry), and the unnormalised distance to the boundary into ``inside``."""
    k_distance, k_point, k_centre = planes.get("Db"), planes.get("P"), planes.get("Dc")
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
        if inside is not None:
            np.copyto(inside[r0:r1, c0:c1], distance, where=mask)
        if k_point is None and k_centre is None:
            continue
        cy, cx = _centre(np.flatnonzero(distance.ravel() == peak), c1 - c0)
        if k_centre is not None:
            yy_box, xx_box = np.nonzero(mask)
            far = np.hypot(yy_box - cy, xx_box - cx)
            top = far.max()
            out[r0 + yy_box, c0 + xx_box, k_centre] = 1.0 - far / top if top > 0 else 1.0
        if k_point is not None:
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
    names = [*CHANNELS, *MORE_CHANNELS, *SHORTHANDS]
    exact = [known for known in names if known.lower() == name.lower()]
    close = exact or difflib.get_close_matches(name, names, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""
