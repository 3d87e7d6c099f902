"""From predicted channel maps to instance labels: marker-controlled watershed, whole or by windows.

A network for bottom-up instance segmentation predicts per-pixel channels (see
``lib/reader/targets.py`` for how their training targets are made); inference hands over maps
``(H, W, K)`` float32, probabilities already through a sigmoid and distances clipped to
[0, 1], together with the channel names:

========  ================================================================================
name      meaning (and how a seed uses it)
========  ================================================================================
``F``     foreground probability (seed where above its threshold)
``C``     contour probability (seed where *below* its threshold)
``Db``    distance to the object boundary divided by the object's maximum: 1 at centres,
          small at the boundary, 0 on background (seed where above its threshold)
``P``     centre-point probability (seed where above its threshold)
``T``     touching-area probability (seed where *below* its threshold)
========  ================================================================================

:func:`postprocess` is a marker-controlled watershed (the recipe BiaPy and PyTorch
Connectomics use for binary, contour and distance channels): seeds are the pixels where every seed channel passes its
threshold, labelled into connected seeds; a topographic surface (``C``, ``-Db`` or the
negative distance transform of the ``F`` mask) is flooded from them inside a growth mask;
then optional refinements (:func:`refine`). :func:`postprocess_windowed` does the same for
images too large for memory, window by window, and stitches without splitting or
duplicating objects. ``"auto"`` thresholds are Otsu's (:func:`resolve_thresholds`).

The rest of the stage: :mod:`.measure` (one row of shape measurements per instance),
:mod:`.rules` (remove or keep instances by rules on those rows), :mod:`.classical` (the
usual Otsu + distance-transform watershed, to compare with), :mod:`.labels` (label dtypes
and numbering).

Connectivity, everywhere here: seeds are labelled with 8-connectivity (a seed is a blob of
centre pixels, and a diagonal link between two such pixels is the same blob); the watershed
floods with 4-connectivity (the ``skimage.segmentation.watershed`` default), which is what
makes a thick contour line a barrier that a neighbour's flood cannot cut diagonally.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

import numpy as np
from scipy import ndimage as ndi

from ..common.settings import ConfigError
from ..reader.targets import channel_kind
from ..reader.targets_embedding import EMBEDDING_PLANES
from ..reader.targets_stardist import ray_count
from .affinities import aggregate
from .embedding import cluster_instances
from .labels import LABEL_DTYPES, check_labels, choose_label_dtype, is_int, renumber
from .offsets import gradient_map
from .refine import apply_step
from .stardist import polygon_instances

CHANNELS = ("F", "C", "Db", "P", "T")
# Channels of issue 17 (lib/reader/targets.py): planes, and maps derived from several planes.
MORE_CHANNELS = ("B", "H", "V", "D", "Dc", "Dn")
DERIVED = {"HV": "HoVer-Net gradient of H and V (lib/instances/offsets.py)",
           "Amin": "minimum of the affinities (lib/instances/affinities.py)",
           "Amax": "maximum of the affinities"}
SEED_ABOVE = ("F", "Db", "P", "D", "Dc", "Amin", "Eseed")  # seed where map > threshold
SEED_BELOW = ("C", "T", "B", "Dn", "HV")  # seed where map < threshold
SURFACE_CHANNELS = ("C", "Db", "F", "HV", "D", "Dc", "Amin", "Eseed")  # C, HV flooded as they are, the others negated
GROWTH_CHANNELS = ("F", "Db", "P", "D", "Amax", "Eseed")
# polygons: StarDist non-maximum suppression (lib/instances/stardist.py); embedding: EmbedSeg
# clustering around seeds (lib/instances/embedding.py)
METHODS = ("watershed", "polygons", "embedding")
REFINEMENTS = {  # name -> whether it takes a positive integer argument
    "fill_holes": False,
    "clear_border": False,
    "remove_small_objects": True,
    "remove_large_objects": True,
    "dilation": True,
    "erosion": True,
    "voronoi": False,  # every growth-mask pixel to the nearest instance (lib/instances/refine.py)
    "repair_blobs": True,  # merge fragments into instances larger than N px, fill their holes
}
OTSU_BINS = 256  # "auto" thresholds: Otsu on this many bins over [0, 1]

_UINT32_MAX = np.iinfo(np.uint32).max


# Settings


@dataclasses.dataclass(frozen=True)
class PostProcessConfig:
    """Settings of :func:`postprocess`.

    Parameters
    ----------
    channels : names of the maps along the last axis, in order, from :data:`CHANNELS`.
    thresholds : per seed channel, a number in [0, 1] or ``"auto"`` (Otsu on that map, on
        :data:`OTSU_BINS` bins over [0, 1]). Seeds need ``F``, ``Db``, ``P`` above and
        ``C``, ``T`` below their thresholds. Otsu here splits a histogram whose bin k holds
        (k/256, (k+1)/256] and returns the upper edge of the lower class's last bin. When
        ``surface_channel`` is ``"F"`` the key ``"F"`` is required too: it makes the mask
        whose distance transform is the surface.
    seed_channels : channels whose thresholded maps are AND-ed into the seed mask; at least
        one of ``F``, ``Db``, ``P`` (``C`` or ``T`` alone would seed the background).
    surface_channel : the flooded surface: ``"C"`` -> C, ``"Db"`` -> -Db, ``"F"`` -> minus the
        Euclidean distance transform of the mask ``F > thresholds["F"]``.
    growth_channel, growth_threshold : the growth mask is ``map > growth_threshold``; pixels of
        it that no seed reaches stay 0. Channel one of ``F``, ``Db``, ``P``.
    seed_erosion, seed_dilation : radii (px) of a disk by which the seed mask is eroded, then
        dilated, before labelling (0 = off). The image edge does not erode seeds.
    min_seed_size : seeds (8-connected) with fewer pixels are dropped (px). The limit it sets:
        an object whose seed is smaller is not found, and its pixels go to a touching neighbour
        or stay background. With :meth:`default_for`'s 5, discs of radius <= 1.5 px vanish even
        from perfect maps when ``C`` or ``Db`` seeds (their seed is the inner half, under 5 px);
        set 0 (in model.json's ``instance.postprocess``, or here) to keep them, at the cost of a
        spurious object for each one- or two-pixel noise seed. Objects 2 px wide vanish whatever
        this setting when ``C`` is a seed channel (every one of their pixels is contour): leave
        ``C`` out of ``seed_channels`` to keep them (tests/instances/test_windowed_guarantee.py).
    refinements : applied in order after the watershed: ``"fill_holes"`` (holes made only of
        background), ``"clear_border"`` (objects touching the image edge), ``"remove_small_objects
        N"`` (fewer than N px), ``"remove_large_objects N"`` (more than N px), ``"dilation r"``
        (each label grows into background only, a background pixel going to the nearest label
        within r px, so touching instances never merge), ``"erosion r"`` (a pixel stays when
        every pixel within r px has its label; the image edge does not erode).
    label_dtype : ``"uint16"``, ``"uint32"`` or ``"auto"`` (uint16 when the count fits).
    method : ``"watershed"`` (the above), or ``"polygons"`` for star-convex polygons (channels
        ``F`` and ``R0..``): candidates ``F > thresholds["F"]``, non-maximum suppression at IoU
        ``nms_threshold`` (:func:`lib.instances.stardist.polygon_instances`); seeds, surface and
        growth are then unused, refinements apply.
    nms_threshold : the IoU above which a candidate polygon is suppressed (method ``polygons``).
    method ``"embedding"`` (the ``E`` planes): EmbedSeg clustering (:mod:`.embedding`), mask ``Eseed >
        thresholds["Eseed"]``, seeds above ``seed_score``, proposals of at least ``min_seed_size`` px
        of which a fraction ``min_unclustered`` is new; refinements apply.

    Besides the plane names, seed, surface and growth channels may name maps derived from
    several planes (:data:`DERIVED`): ``HV`` from ``H`` and ``V``, ``Amin`` and ``Amax`` from the
    affinity planes. ``B``, ``Dn`` and ``HV`` seed where they are low; ``voronoi`` (every
    growth-mask pixel to the nearest instance) and ``repair_blobs N`` (:mod:`.refine`) are
    refinements too.
    """

    channels: tuple[str, ...]
    thresholds: dict[str, float | str]
    seed_channels: tuple[str, ...]
    surface_channel: str
    growth_channel: str = "F"
    growth_threshold: float | str = 0.5
    seed_erosion: int = 0
    seed_dilation: int = 0
    min_seed_size: int = 0
    refinements: tuple[str, ...] = ()
    label_dtype: str = "auto"
    method: str = "watershed"
    nms_threshold: float = 0.4
    seed_score: float = 0.9
    min_unclustered: float = 0.5

    def __post_init__(self):
        # JSON gives lists; the settings are tuples so that the object stays immutable
        for name in ("channels", "seed_channels", "refinements"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        if isinstance(self.thresholds, dict):
            object.__setattr__(self, "thresholds", dict(self.thresholds))

    def validate(self) -> "PostProcessConfig":
        """Return self, or raise ``ConfigError`` (a ``ValueError``) listing every invalid field."""
        v = []
        known = ", ".join(CHANNELS)
        channels = self.channels if isinstance(self.channels, tuple) else ()
        if not isinstance(self.channels, tuple) or not self.channels:
            v.append(f"channels must be a non-empty tuple of names from {known}; got {self.channels!r}")
        else:
            bad = [c for c in channels if channel_kind(c) is None]
            if bad:
                v.append(f"channels must be names from {known}; got {', '.join(map(repr, bad))} "
                         f"in {self.channels!r}. Names are case-sensitive")
            if len(set(channels)) != len(channels):
                v.append(f"channels must not repeat a name; got {self.channels!r}")
        channels = channels + _derived(channels)
        seed_channels = self.seed_channels if isinstance(self.seed_channels, tuple) else ()
        if not isinstance(self.seed_channels, tuple) or not self.seed_channels:
            v.append(f"seed_channels must be a non-empty tuple of channel names; got {self.seed_channels!r}")
        else:
            missing = [c for c in seed_channels if c not in channels]
            if missing:
                v.append(f"seed_channels must be among channels {channels!r}; got {', '.join(map(repr, missing))}")
            if not any(c in SEED_ABOVE for c in seed_channels):
                v.append(f"seed_channels must include one of {', '.join(SEED_ABOVE[:3])}; got {self.seed_channels!r}. "
                         f"C and T seed where they are low, which includes the background (D, Dc, Amin seed too)")
        if self.surface_channel not in SURFACE_CHANNELS:
            v.append(f"surface_channel must be one of {', '.join(SURFACE_CHANNELS[:3])}; got {self.surface_channel!r} "
                     f"(or {', '.join(SURFACE_CHANNELS[3:])} when predicted)")
        elif self.surface_channel not in channels:
            v.append(f"surface_channel must be one of the channels {channels!r}; got {self.surface_channel!r}")
        needed = set(seed_channels) | ({"F"} if self.surface_channel == "F" else set())
        if not isinstance(self.thresholds, dict):
            v.append(f"thresholds must be a dict {{channel: number or 'auto'}}; got {self.thresholds!r}")
        else:
            for name in sorted(needed - set(self.thresholds)):
                why = "the F mask of the surface" if name not in seed_channels else "a seed channel"
                v.append(f"thresholds must give a value for {name!r} ({why}); got keys {sorted(self.thresholds)}")
            for name in sorted(set(self.thresholds) - needed, key=str):
                v.append(f"thresholds must only name seed channels{' and F' if self.surface_channel == 'F' else ''}"
                         f" ({', '.join(sorted(needed))}); got {name!r}")
            for name, value in self.thresholds.items():
                if not _is_threshold(value):
                    v.append(f"thresholds[{name!r}] must be a number in [0, 1] or 'auto'; got {value!r}")
        if self.growth_channel not in GROWTH_CHANNELS:
            v.append(f"growth_channel must be one of {', '.join(GROWTH_CHANNELS[:3])}; got {self.growth_channel!r} "
                     f"(or {', '.join(GROWTH_CHANNELS[3:])} when predicted)")
        elif self.growth_channel not in channels:
            v.append(f"growth_channel must be one of the channels {channels!r}; got {self.growth_channel!r}")
        if not _is_threshold(self.growth_threshold):
            v.append(f"growth_threshold must be a number in [0, 1] or 'auto'; got {self.growth_threshold!r}")
        for name in ("seed_erosion", "seed_dilation", "min_seed_size"):
            value = getattr(self, name)
            if not is_int(value) or value < 0:
                v.append(f"{name} must be an integer >= 0 (pixels); got {value!r}")
        if not isinstance(self.refinements, tuple):
            v.append(f"refinements must be a tuple of steps; got {self.refinements!r}")
        else:
            for step in self.refinements:
                try:
                    parse_refinement(step)
                except ValueError as error:
                    v.append(str(error))
        if self.label_dtype not in LABEL_DTYPES:
            v.append(f"label_dtype must be one of {', '.join(LABEL_DTYPES)}; got {self.label_dtype!r}")
        if self.method not in METHODS:
            v.append(f"method must be one of {', '.join(METHODS)}; got {self.method!r}")
        elif self.method == "polygons" and ("F" not in channels or not ray_count(channels)):
            v.append(f"method 'polygons' needs channels F and R0..; got {self.channels!r}")
        elif self.method == "embedding" and not set(EMBEDDING_PLANES) <= set(channels):
            v.append(f"method 'embedding' needs channels {','.join(EMBEDDING_PLANES)}; got {self.channels!r}")
        for name in ("seed_score", "min_unclustered"):
            if not _is_threshold(getattr(self, name)) or isinstance(getattr(self, name), str):
                v.append(f"{name} must be a number in [0, 1]; got {getattr(self, name)!r}")
        if not _is_threshold(self.nms_threshold) or isinstance(self.nms_threshold, str):
            v.append(f"nms_threshold must be a number in [0, 1]; got {self.nms_threshold!r}")
        if v:
            raise ConfigError(v)
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (tuples as lists); :meth:`from_dict` reads them back."""
        d = dataclasses.asdict(self)
        for name in ("channels", "seed_channels", "refinements"):
            d[name] = list(d[name])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PostProcessConfig":
        """Build and validate settings from :meth:`to_dict` output; unknown or missing keys raise ``ConfigError``."""
        if not isinstance(d, dict):
            raise ConfigError([f"post-processing settings must be a dict (as written by to_dict); "
                               f"got {type(d).__name__}"])
        fields = {f.name: f for f in dataclasses.fields(cls)}
        problems = [f"unknown setting {k!r} for PostProcessConfig; known: {', '.join(fields)}"
                    for k in sorted(set(d) - set(fields), key=str)]
        problems += [f"setting {name!r} must be given for PostProcessConfig; got keys {sorted(d, key=str)}"
                     for name, f in fields.items()
                     if name not in d and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if problems:
            raise ConfigError(problems)
        return cls(**d).validate()

    @classmethod
    def default_for(cls, channels: Sequence[str]) -> "PostProcessConfig":
        """Sensible settings for any subset of :data:`CHANNELS`, in any order.

        * Seeds: every available channel, ``F > 0.5``, ``Db > 0.5``, ``P > 0.5``, ``C < 0.5``,
          ``T < 0.5``. ``Db > 0.5`` keeps the inner half of each object, far from every
          neighbour even where the contour prediction has a gap; a lower threshold let
          blurred seeds of touching objects merge, a higher one split elongated objects.
        * ``min_seed_size = 5``: noise makes one- or two-pixel seeds at object edges that
          would otherwise each become an object; a real seed (the inner half of an object
          of radius >= 3 px) is larger. The price: objects of radius <= 1.5 px are not found
          even from perfect maps, nor, with a ``C`` seed, slivers 2 px wide (see ``min_seed_size``).
        * Surface: ``C`` when predicted, else ``-Db``, else the distance transform of ``F``.
          ``C`` is flat inside objects and high on every contour, so where two objects touch
          the flood meets on the contour ridge whatever the objects' sizes; ``-Db`` is
          normalised per object, so the larger object's edge sits lower than the smaller
          one's and the seam shifts into it. On synthetic touching objects with blurred,
          noisy maps, ``C`` matched more objects at IoU > 0.8 (0.93 against 0.88).
        * Growth: ``F > 0.5``, else ``Db > 0.02`` (a boundary pixel has Db = 1 / the object's
          largest distance, above 0.02 for objects up to 50 px in radius).

        Raises ``ConfigError`` for unknown or repeated names, for no ``F``, ``Db`` or ``P`` to
        seed from, or no ``F`` or ``Db`` to grow into (``P`` marks only centres).
        """
        channels = tuple(channels)
        known = ", ".join(CHANNELS)
        problems = []
        bad = [c for c in channels if channel_kind(c) is None]
        if bad:
            problems.append(f"channels must be names from {known}; got {', '.join(map(repr, bad))} in {channels!r}")
        if len(set(channels)) != len(channels):
            problems.append(f"channels must not repeat a name; got {channels!r}")
        if not problems and ray_count(channels) and "F" in channels:
            return cls(channels=channels, thresholds={"F": 0.5}, seed_channels=("F",), surface_channel="F",
                       method="polygons").validate()
        if not problems and set(EMBEDDING_PLANES) <= set(channels):
            return cls(channels=channels, thresholds={"Eseed": 0.5}, seed_channels=("Eseed",),
                       surface_channel="Eseed", growth_channel="Eseed", min_seed_size=5,
                       method="embedding").validate()
        names = channels + _derived(channels)
        if not any(c in SEED_ABOVE for c in names):
            problems.append(f"channels must include F, Db or P to build seeds from; got {channels!r}")
        if not any(c in ("F", "Db", "D", "Amax") for c in names):
            problems.append(f"channels must include F or Db to build the growth mask from; got {channels!r}")
        if problems:
            raise ConfigError(problems)
        # Seed thresholds of the channels of issue 17: D > 0.75 is 2.75 px inside an object (with
        # d_alpha 5); HV < 0.4 is HoVer-Net's marker rule; Dn < 0.8 is a fifth of dn_scale from neighbours.
        defaults = {"F": 0.5, "Db": 0.5, "P": 0.5, "C": 0.5, "T": 0.5, "D": 0.75, "Dc": 0.5, "Dn": 0.8,
                    "HV": 0.4, "Amin": 0.5}
        seed_channels = tuple(c for c in (*CHANNELS, "D", "Dc", "Dn", "HV", "Amin") if c in names)
        surface = next(c for c in ("C", "Db", "HV", "D", "Dc", "Amin", "F") if c in names)
        growth = next(c for c in ("F", "Db", "D", "Amax") if c in names)
        thresholds: dict[str, float | str] = {c: defaults[c] for c in seed_channels}
        return cls(channels=channels, thresholds=thresholds, seed_channels=seed_channels, surface_channel=surface,
                   growth_channel=growth, growth_threshold=0.02 if growth == "Db" else 0.5,
                   min_seed_size=5).validate()


def _derived(channels: tuple[str, ...]) -> tuple[str, ...]:
    """The derived maps (:data:`DERIVED`) that these planes give."""
    out = ("HV",) if "H" in channels and "V" in channels else ()
    if any(channel_kind(c) == "binary" and c.startswith("A") for c in channels):
        out += ("Amin", "Amax")
    return out


def _planes(maps: Any, channels: tuple[str, ...]) -> Callable[[str], np.ndarray]:
    """``plane(name) -> (h, w) float32`` of ``maps`` (a window or strip of them), derived maps included."""
    index = {name: k for k, name in enumerate(channels)}
    cache: dict[str, np.ndarray] = {}

    def plane(name: str) -> np.ndarray:
        if name in index:
            return np.asarray(maps[..., index[name]], dtype=np.float32)
        if name not in cache:
            if name == "HV":
                cache[name] = gradient_map(plane("H"), plane("V"))
            else:
                cache["Amin"], cache["Amax"] = aggregate(np.asarray(maps, np.float32), channels)
        return cache[name]

    return plane


def parse_refinement(step: str) -> tuple[str, int | None]:
    """``"dilation 2"`` -> ``("dilation", 2)``; ``"fill_holes"`` -> ``("fill_holes", None)``.

    Raises ``ValueError`` for an unknown name, a missing or extra argument, or an argument
    that is not an integer >= 1.
    """
    words = step.split() if isinstance(step, str) else []
    if not words or words[0] not in REFINEMENTS:
        raise ValueError(f"refinement must be one of {', '.join(REFINEMENTS)} (with an integer after the "
                         f"size and radius ones, e.g. 'dilation 2'); got {step!r}")
    name = words[0]
    if not REFINEMENTS[name]:
        if len(words) != 1:
            raise ValueError(f"refinement {name!r} must have no argument; got {step!r}")
        return name, None
    if len(words) != 2 or not re.fullmatch(r"[0-9]+", words[1]) or int(words[1]) < 1:
        unit = "pixels" if name.startswith("remove") else "radius in pixels"
        raise ValueError(f"refinement {name!r} must be followed by one integer >= 1 ({unit}); got {step!r}")
    return name, int(words[1])


# Post-processing


def resolve_thresholds(maps: Any, config: PostProcessConfig, rows_per_pass: int = 2048) -> dict[str, float]:
    """Numeric thresholds: ``{seed channel: t, ..., "growth": t}`` with ``"auto"`` replaced by Otsu.

    Otsu runs on a histogram of :data:`OTSU_BINS` bins over [0, 1] (values outside are
    clipped), accumulated ``rows_per_pass`` rows at a time, so a memory-mapped image is read
    in strips and windows of it get the thresholds of the whole image.

    Raises ``ValueError`` when an ``"auto"`` map has all its values in one bin.
    """
    config.validate()
    wanted = {name: value for name, value in config.thresholds.items()}
    auto = sorted({name for name, value in wanted.items() if value == "auto"}
                  | ({config.growth_channel} if config.growth_threshold == "auto" else set()))
    counts = {name: np.zeros(OTSU_BINS, np.int64) for name in auto}
    for y0 in range(0, maps.shape[0] if auto else 0, rows_per_pass):
        plane = _planes(maps[y0:y0 + rows_per_pass], config.channels)
        for name in auto:
            # bins closed on the right, (k/B, (k+1)/B], so "map > upper edge of bin k" is exactly
            # "bin > k": the thresholded mask splits the pixels where Otsu split the histogram
            values = plane(name)
            bins = np.clip(np.ceil(values * OTSU_BINS) - 1, 0, OTSU_BINS - 1).astype(np.intp)
            counts[name] += np.bincount(bins.ravel(), minlength=OTSU_BINS)
    otsu = {name: _otsu(counts[name], name) for name in auto}
    out = {name: otsu[name] if value == "auto" else float(value) for name, value in wanted.items()}
    g = config.growth_threshold
    out["growth"] = otsu[config.growth_channel] if g == "auto" else float(g)
    return out


def postprocess(maps: np.ndarray, config: PostProcessConfig, return_intermediates: bool = False):
    """Instance labels from channel maps by marker-controlled watershed.

    Parameters
    ----------
    maps : (H, W, K) float array, K = ``len(config.channels)``, values in [0, 1].
    config : the settings; :meth:`PostProcessConfig.default_for` gives sensible ones.
    return_intermediates : also return ``{"seeds": (H, W) int32 seed labels 1..S,
        "surface": (H, W) float32, "growth": (H, W) bool, "thresholds": resolved numbers}``.

    Returns
    -------
    labels : (H, W) uint16 or uint32 (``config.label_dtype``), 0 = background, objects
        1..N numbered in raster order of their first pixel (top row first, then leftmost).
    intermediates : only with ``return_intermediates``.

    Steps: seed mask = AND over ``seed_channels`` of (map > t for F, Db, P; map < t for C, T)
    and the growth mask; erosion then dilation by disks; 8-connected labelling; seeds under
    ``min_seed_size`` dropped; ``skimage.segmentation.watershed(surface, seeds, mask=growth)``
    (growth pixels no seed reaches stay 0); refinements in order; renumbering.

    Raises ``ConfigError`` for invalid settings, ``ValueError`` for maps of the wrong shape
    or an ``"auto"`` threshold on a constant map.
    """
    config.validate()
    _check_maps(maps, config)
    thresholds = resolve_thresholds(maps, config)
    labels, seeds, surface, growth = _segment(maps, config, thresholds, (True, True, True, True))
    labels = renumber(labels, config.label_dtype)
    if return_intermediates:
        return labels, {"seeds": seeds, "surface": surface, "growth": growth, "thresholds": thresholds}
    return labels


def postprocess_windowed(maps: Any, config: PostProcessConfig, window: int = 2048, overlap: int = 256,
                         log: Callable[[str], None] = print) -> np.ndarray:
    """:func:`postprocess` on overlapping windows, stitched into one label image.

    Parameters
    ----------
    maps : (H, W, K) array or anything sliced like one (``numpy.memmap``, zarr, h5py):
        only one window plus a strip for ``"auto"`` thresholds is in memory at a time.
    window : side of the square windows (px). overlap : overlap of neighbouring windows (px).
    log : where the warning about lost objects goes (one line; default ``print``).

    Returns
    -------
    labels : (H, W) uint16 or uint32, numbered as by :func:`postprocess`. When the image fits
        in one window this *is* :func:`postprocess`.

    The rule. Windows start every ``window - overlap`` px (the last row and column of
    windows are moved back to end at the image edge), and the image is cut into *cores*,
    one per window, at the middle of each overlap: every core pixel is at least
    ``overlap // 2`` px from the edges of its window that lie inside the image. An object
    found in a window is kept from it when (a) the centre of its bounding box lies in the
    window's core and (b) it touches no edge of the window that lies inside the image.
    Cores do not overlap, so no object is taken twice; a kept object is whole in its window,
    so none is split; ids are given across windows, then renumbered in raster order.
    ``"auto"`` thresholds are computed once on the whole image; ``clear_border`` removes
    objects touching the image edge, not a window edge.

    The guarantee (exact). Ties of the flood are broken by raster position (:func:`_ranks`), so
    the labels of a clump depend only on the pixels of the clump. An object is labelled exactly
    as by :func:`postprocess` on the whole image (same pixels; same number after renumbering)
    when its *clump*, the 8-connected region of the growth mask holding it (for surface ``"F"``,
    of the growth mask and ``F > thresholds["F"]`` together), grown by
    ``seed_erosion + seed_dilation + 1`` px plus twice the largest ``dilation``/``erosion``
    refinement radius, lies within ``overlap // 2`` px of the centre of the object's bounding
    box: the window whose core holds that centre then holds the clump whole, away from its inner
    edges. So the result equals the whole image's when no clump is wider than about
    ``overlap / 2`` (tested with windows a sixth of the image and clumps crossing window borders,
    tests/instances/test_windowed_guarantee.py). Otherwise:
    surfaces ``"C"`` and ``"Db"`` (local values) were still equal on dense touching cells
    (576 objects, window 128, overlap 64, tests/instances/test_instances.py); an object up to
    ``overlap`` px is kept once and whole, but a neighbour cut by a window edge can move their seam
    by a few pixels; a larger object touches an inner edge of the window whose core holds its
    centre and is lost: a warning (through ``log``) then says how many pixels that windows
    labelled are missing from the result. With surface ``"F"`` a clump of touching objects
    wider than the overlap (its distance transform is not local) is lost that way: raise the
    overlap above the largest clump, or predict a C or Db channel.

    Methods ``polygons`` and ``embedding`` keep the same rule, but a polygon reaches as far as its
    rays and an embedding cluster gathers the pixels that point at one centre (not always connected):
    keep the overlap above twice the largest object.

    Raises ``ValueError`` for a bad window or overlap or maps of the wrong shape,
    ``ConfigError`` for invalid settings.
    """
    config.validate()
    problems = []
    if not is_int(window) or window < 1:
        problems.append(f"window must be an integer >= 1 (pixels); got {window!r}")
    if not is_int(overlap) or overlap < 0:
        problems.append(f"overlap must be an integer >= 0 (pixels); got {overlap!r}")
    elif is_int(window) and overlap >= window:
        problems.append(f"overlap must be smaller than window={window}; got {overlap}. Windows would not advance")
    if problems:
        raise ValueError("; ".join(problems))
    _check_maps(maps, config)
    height, width = int(maps.shape[0]), int(maps.shape[1])
    if height <= window and width <= window:
        return postprocess(np.asarray(maps), config)
    # strips of about one window's pixels: a wide memory-mapped image is not read whole
    thresholds = resolve_thresholds(maps, config, rows_per_pass=max(1, window * window // width))
    ys, xs = _windows(height, window, overlap), _windows(width, window, overlap)
    out = np.zeros((height, width), np.uint32 if height * width <= _UINT32_MAX else np.uint64)
    first_pixels: list[tuple[int, int]] = []
    claimed = []  # per window: core pixels the window labelled, packed, to find lost objects
    for (y0, y1), (cy0, cy1) in ys:
        for (x0, x1), (cx0, cx1) in xs:
            tile = np.asarray(maps[y0:y1, x0:x1], dtype=np.float32)
            border = (y0 == 0, y1 == height, x0 == 0, x1 == width)  # top, bottom, left, right
            local = _segment(tile, config, thresholds, border)[0]
            h, w = local.shape
            lut = np.zeros(int(local.max()) + 1, out.dtype)
            for label, box in enumerate(ndi.find_objects(local), 1):
                if box is None:
                    continue
                ry, rx = box
                if (ry.start == 0 and y0 > 0) or (ry.stop == h and y1 < height) or \
                        (rx.start == 0 and x0 > 0) or (rx.stop == w and x1 < width):
                    continue
                centre_y, centre_x = y0 + (ry.start + ry.stop - 1) // 2, x0 + (rx.start + rx.stop - 1) // 2
                if not (cy0 <= centre_y < cy1 and cx0 <= centre_x < cx1):
                    continue
                first_col = rx.start + int(np.argmax(local[ry.start, rx] == label))
                first_pixels.append((y0 + ry.start, x0 + first_col))
                lut[label] = len(first_pixels)
            new = lut[local]
            view = out[y0:y1, x0:x1]
            write = (new > 0) & (view == 0)  # the first window to claim a pixel keeps it
            view[write] = new[write]
            claimed.append(((cy0, cy1, cx0, cx1), np.packbits(local[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0] > 0)))
    lost = 0
    for (cy0, cy1, cx0, cx1), packed in claimed:
        size = (cy1 - cy0) * (cx1 - cx0)
        mask = np.unpackbits(packed, count=size).reshape(cy1 - cy0, cx1 - cx0).astype(bool)
        lost += int(np.count_nonzero(mask & (out[cy0:cy1, cx0:cx1] == 0)))
    if lost:
        log(f"warning: postprocess_windowed: {lost} pixels that windows labelled are unlabelled in the stitched "
            f"result: objects larger than overlap={overlap} px (or changed by a neighbour cut at a window edge) "
            "were dropped. Raise overlap above the largest object")
    n = len(first_pixels)
    final = np.zeros(n + 1, choose_label_dtype(n, config.label_dtype))
    if n:
        rows, cols = np.array(first_pixels).T
        final[1 + np.lexsort((cols, rows))] = np.arange(1, n + 1)
    return final[out]


def _segment(maps: np.ndarray, config: PostProcessConfig, thresholds: dict[str, float],
             border: tuple[bool, bool, bool, bool]):
    """Labels (not renumbered), seed labels, surface and growth mask of one image or window."""
    channel = _planes(maps, config.channels)
    if config.method == "watershed":
        labels, seeds, surface, growth = _watershed(config, thresholds, channel)
    else:  # polygons and embedding clusters make the objects themselves; their centres are the seeds
        if config.method == "polygons":
            first, mask, surface = config.channels.index("R0"), "F", channel("F")
            labels, centres = polygon_instances(channel("F"), maps[..., first:first + ray_count(config.channels)],
                                                thresholds["F"], config.nms_threshold)
        else:
            first, mask, surface = config.channels.index("Ey"), "Eseed", -channel("Eseed")
            labels, centres = cluster_instances(maps[..., first:first + len(EMBEDDING_PLANES)], thresholds["Eseed"],
                                                config.seed_score, max(config.min_seed_size, 1), config.min_unclustered)
        seeds = np.zeros(labels.shape, np.int32)
        seeds[centres[:, 0], centres[:, 1]] = np.arange(1, len(centres) + 1)
        growth = channel(mask) > thresholds[mask]
    for step in config.refinements:
        labels = _refine(labels, *parse_refinement(step), border, growth)
    return labels, seeds, surface, growth


def _watershed(config: PostProcessConfig, thresholds: dict[str, float], channel: Callable[[str], np.ndarray]):
    """Labels, seed labels, surface and growth mask by marker-controlled watershed (refinements not applied)."""
    from skimage.segmentation import watershed

    growth = channel(config.growth_channel) > thresholds["growth"]
    seed_mask = growth.copy()
    for name in config.seed_channels:
        values = channel(name)
        seed_mask &= values > thresholds[name] if name in SEED_ABOVE else values < thresholds[name]
    if config.seed_erosion:
        seed_mask = ndi.binary_erosion(seed_mask, _disk(config.seed_erosion), border_value=1)
    if config.seed_dilation:
        seed_mask = ndi.binary_dilation(seed_mask, _disk(config.seed_dilation)) & growth
    seeds, n_seeds = ndi.label(seed_mask, structure=np.ones((3, 3), bool))
    if config.min_seed_size > 1 and n_seeds:
        keep = np.bincount(seeds.ravel(), minlength=n_seeds + 1) >= config.min_seed_size
        keep[0] = False
        seeds = (np.cumsum(keep) * keep).astype(np.int32)[seeds]
    if config.surface_channel in ("C", "HV"):
        surface = channel(config.surface_channel)
    elif config.surface_channel == "Amin":  # flat inside and out: flood by the distance to the seed mask
        surface = ndi.distance_transform_edt(channel("Amin") <= thresholds.get("Amin", 0.5)).astype(np.float32)
    elif config.surface_channel == "F":
        surface = -ndi.distance_transform_edt(channel("F") > thresholds["F"]).astype(np.float32)
    else:
        surface = -channel(config.surface_channel)
    labels = watershed(_ranks(surface), seeds, mask=growth, connectivity=1).astype(np.int32, copy=False)
    return labels, seeds, surface, growth


def _ranks(surface: np.ndarray) -> np.ndarray:
    """The surface's pixels ranked by (value, raster position): all distinct, so the flood never meets a tie.

    ``skimage``'s watershed breaks ties between equal values (a contour ridge of C = 1, a plateau)
    by the history of its heap, which depends on every marker of the array; ranks make the flood
    order depend only on values and on raster order, which a window keeps. So a window that holds
    a clump of touching objects whole labels it exactly as the whole image does.
    """
    order = np.argsort(surface, axis=None, kind="stable")
    ranks = np.empty(surface.size, np.float64)  # exact up to 2**53 pixels
    ranks[order] = np.arange(surface.size, dtype=np.float64)
    return ranks.reshape(surface.shape)


def refine(labels: np.ndarray, refinements: Sequence[str]) -> np.ndarray:
    """Apply refinement steps (see :class:`PostProcessConfig`) in order to integer labels.

    Parameters
    ----------
    labels : (H, W) integer labels, 0 = background.
    refinements : steps such as ``("fill_holes", "dilation 2")``.

    Returns
    -------
    labels : (H, W), same dtype, ids kept (not renumbered).

    Raises ``ValueError`` for labels that are not a 2-D non-negative integer array or an
    invalid step.
    """
    check_labels(labels, 2)
    steps = [parse_refinement(step) for step in refinements]
    out = labels
    for name, size in steps:
        out = _refine(out, name, size, (True, True, True, True))
    return out.astype(labels.dtype, copy=out is labels)


def _refine(labels: np.ndarray, name: str, size: int | None, border: tuple[bool, bool, bool, bool],
            mask: np.ndarray | None = None) -> np.ndarray:
    """One refinement step on int labels (:func:`lib.instances.refine.apply_step`)."""
    return apply_step(labels, name, size, border, mask)


def _windows(n: int, window: int, overlap: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Per window along one axis: ((start, stop), (core_start, core_stop)); cores tile [0, n)."""
    if n <= window:
        return [((0, n), (0, n))]
    starts = list(range(0, n - window, window - overlap)) + [n - window]
    spans = [(s, s + window) for s in starts]
    cuts = [0] + [(nxt[0] + cur[1]) // 2 for cur, nxt in zip(spans, spans[1:])] + [n]
    return [(span, (cuts[i], cuts[i + 1])) for i, span in enumerate(spans)]


def _check_maps(maps: Any, config: PostProcessConfig) -> None:
    shape = tuple(getattr(maps, "shape", ()))
    k = len(config.channels)
    if len(shape) != 3 or shape[2] != k or shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"maps must have shape (H, W, K) with K = {k} channels ({', '.join(config.channels)}); "
                         f"got shape {shape}")


def _otsu(counts: np.ndarray, name: str) -> float:
    """Otsu's threshold of a histogram on :data:`OTSU_BINS` bins over [0, 1]: the upper edge of
    the last bin of the lower class, the first one on ties."""
    if np.count_nonzero(counts) < 2:
        value = (int(np.argmax(counts)) + 0.5) / OTSU_BINS
        raise ValueError(f"'auto' threshold of {name!r} must see at least two distinct values; got a map with all "
                         f"values in one bin (about {value:.3f}). Give a number instead")
    counts = counts.astype(np.float64)
    centres = (np.arange(OTSU_BINS) + 0.5) / OTSU_BINS
    below = np.cumsum(counts)[:-1]
    above = counts.sum() - below
    mass = np.cumsum(counts * centres)[:-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = below * above * (mass / below - (mass[-1] + counts[-1] * centres[-1] - mass) / above) ** 2
    k = int(np.argmax(np.nan_to_num(between, nan=-1.0)))
    return (k + 1) / OTSU_BINS


def _disk(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    return r[:, None] ** 2 + r[None, :] ** 2 <= radius * radius


def _is_threshold(value: Any) -> bool:
    if isinstance(value, str):
        return value == "auto"
    return (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
            and 0.0 <= float(value) <= 1.0)

