"""Exact tiled prediction (Majurski and Bajcsy, J. Res. NIST 126:126009, 2021): ONE zone loop
that feeds batches of tiles to a predictor and writes each zone into sinks.

An image of any size is cut into tiles: each tile is a *zone of responsibility* plus context
on every side (the plan, :func:`lib.store.tiling.inference_plan`). Tiles start on the image's
own pooling grid (multiples of the model's size divisor in image coordinates), outside the
image they read its reflection, and only each zone is kept. With a halo at least the
receptive-field radius, an output pixel sees exactly the pixels it sees in one whole-image
pass (:func:`predict_whole`), and the zero "same" padding at a tile's border is too far away to
reach it: tiled output equals whole-image output up to float rounding, whatever the halo
(>= the radius), the tile size or the batch.

:func:`zone_stream` is the one loop. It takes a stream of images (:class:`TileSource`), so the
tiles of several small images share a model call (a folder of 256 x 256 images is the common
case: one call per image wastes most of the device). Each zone goes to the
:class:`ImageOutputs` of its image, which derives labels and uncertainty once, accumulates the
per-image uncertainty scores once, and hands the results to its sinks: arrays in memory
(:class:`ArraySink`, also over a ``.npy`` memory map), tiled OME BigTIFFs or OME-Zarr images written
while predicting (:mod:`lib.inference.sinks`), a confusion matrix against a mask (:class:`ConfusionSink`).
:func:`predict_image`, :func:`predict_to_tiff`, :func:`predict_maps_to_memmap` and
:func:`predict_volume` are that loop with different sinks.

Axes: images ``(H, W, C)``, batches of tiles ``(B, T_y, T_x, C)``, maps ``(H, W, K)``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from ..model_folder import probability_planes
from ..scoring.metrics import confusion_matrix
from ..store.images import smallest_uint
from ..store.tiling import TilePlan, default_batch_size, inference_plan, read_window, round_up
from .predictor import Predictor
from .sinks import file_sink

# Above this normalised entropy a pixel counts as uncertain in the per-image score.
UNCERTAIN_ENTROPY = 0.5
# Edge of the tiles of the BigTIFFs written while predicting (zlib-compressed; handed to the sinks).
TIFF_TILE = 256


def plan_for(predictor: Predictor, height: int, width: int, halo: int | None = None,
             tile_size: int | None = None) -> TilePlan:
    """The tile plan of ``predictor`` on an ``height x width`` image (:func:`lib.store.tiling.inference_plan`).

    ``halo`` defaults to the receptive-field radius (exact). Raises ``ValueError`` for a
    ``tile_size`` that does not fit.
    """
    halo = predictor.receptive_field_radius if halo is None else halo
    return inference_plan(height, width, predictor.size_divisor, halo, tile_size, predictor.precision)


def label_dtype(number_classes: int) -> np.dtype:
    """The smallest unsigned dtype holding labels ``0 .. number_classes - 1``."""
    return smallest_uint(number_classes - 1)


def image_statistics(image, rows_per_chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation ``((C,), (C,))`` float64 of ``image`` (H, W, C), read by row chunks."""
    channels = image.shape[2]
    total = np.zeros(channels)
    square = np.zeros(channels)
    count = 0
    for y in range(0, image.shape[0], rows_per_chunk):
        block = np.asarray(image[y:y + rows_per_chunk], dtype=np.float64).reshape(-1, channels)
        total += block.sum(axis=0)
        square += (block * block).sum(axis=0)
        count += block.shape[0]
    mean = total / max(count, 1)
    return mean, np.sqrt(np.maximum(square / max(count, 1) - mean * mean, 0.0))


# Uncertainty


def normalized_entropy(probabilities: np.ndarray) -> np.ndarray:
    """Entropy of ``probabilities`` (..., K) over the last axis divided by log K: (...) float32 in [0, 1]."""
    p = np.clip(probabilities, 1e-12, 1.0)
    return (-(probabilities * np.log(p)).sum(axis=-1) / np.log(probabilities.shape[-1])).astype(np.float32)


def binary_entropy(maps: np.ndarray, binary: Sequence[bool]) -> np.ndarray:
    """Mean over the ``binary`` channels of ``maps`` (..., K) of their entropy in bits: (...) float32 in [0, 1].

    The uncertainty of an instance model's sigmoid channels (distance channels carry none);
    zeros when no channel is binary.
    """
    chosen = np.flatnonzero(np.asarray(binary, bool))
    if not chosen.size:
        return np.zeros(maps.shape[:-1], np.float32)
    p = np.clip(maps[..., chosen], 1e-12, 1 - 1e-7)
    bits = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    return bits.mean(axis=-1).astype(np.float32)


def pixel_uncertainty(predictor: Predictor, maps: np.ndarray) -> np.ndarray:
    """Per-pixel uncertainty in [0, 1] of a predictor's maps (..., K): :func:`normalized_entropy` of the
    class probabilities (semantic) or :func:`binary_entropy` of the binary channels (instance)."""
    if predictor.label_kind == "semantic":
        return normalized_entropy(maps)
    return binary_entropy(maps, probability_planes(predictor.channel_names, predictor.channel_kinds))


class UncertaintyScores:
    """The per-image uncertainty scores, accumulated zone by zone (the one place they are summed)."""

    def __init__(self, with_spread: bool):
        self.with_spread = with_spread
        self.entropy = self.uncertain = self.spread = 0.0

    def add(self, entropy: np.ndarray, spread: np.ndarray | None) -> None:
        self.entropy += float(entropy.sum(dtype=np.float64))
        self.uncertain += float((entropy > UNCERTAIN_ENTROPY).sum())
        if spread is not None:
            self.spread += float(spread.sum(dtype=np.float64))

    def as_dict(self, pixels: int) -> dict[str, float]:
        """``mean_entropy``, ``uncertain_fraction`` (entropy above ``UNCERTAIN_ENTROPY``), ``mean_spread`` (NaN
        for a single sample)."""
        pixels = float(max(pixels, 1))
        return {"mean_entropy": self.entropy / pixels, "uncertain_fraction": self.uncertain / pixels,
                "mean_spread": self.spread / pixels if self.with_spread else float("nan")}


# The zone loop


@dataclasses.dataclass
class ZoneResult:
    """Prediction of one zone: ``box = (y0, y1, x0, x1)`` in image pixels.

    ``probabilities``: (y1 - y0, x1 - x0, K) float32; ``spread``: (y1 - y0, x1 - x0) float32 or None.
    """

    box: tuple[int, int, int, int]
    probabilities: np.ndarray
    spread: np.ndarray | None


@dataclasses.dataclass
class TileSource:
    """One image entering :func:`zone_stream`: ``image`` (H, W, C) array-like (a memory map is read
    window by window), its ``plan``, its (mean, std) ``statistics`` for "tile"-normalised members
    (computed when None), and ``tag``, the caller's, handed back with each of its zones."""

    image: Any
    plan: TilePlan
    statistics: tuple[np.ndarray, np.ndarray] | None = None
    tag: Any = None


def zone_stream(predictor: Predictor, sources: Iterable[TileSource], batch_size: int | None = None,
                spread: bool = False) -> Iterator[tuple[TileSource, ZoneResult]]:
    """Predict the tiles of every source in batches; yield ``(source, zone)`` in order, zone by zone.

    Consecutive sources whose tiles have one shape share batches (outputs are those of one image
    at a time: each tile is computed alone by a convolutional model). ``batch_size`` defaults to
    :func:`lib.store.tiling.default_batch_size` of the tile shape. Sources are read lazily: an
    image is opened when its first tile enters a batch, and every zone of a batch is yielded
    before the next batch is read. Memory: one batch of tiles and its maps.
    """
    pending: list[tuple[TileSource, tuple[int, int, int, int]]] = []
    tiles: list[np.ndarray] = []
    with_statistics = predictor.needs_image_statistics

    def flush() -> Iterator[tuple[TileSource, ZoneResult]]:
        statistics = None
        if with_statistics:
            statistics = (np.stack([s.statistics[0] for s, _ in pending]),
                          np.stack([s.statistics[1] for s, _ in pending]))
        maps, spreads = predictor.predict_batch(np.stack(tiles), statistics, spread=spread)
        done = list(pending)
        pending.clear()
        tiles.clear()
        for index, (source, (y0, y1, x0, x1)) in enumerate(done):
            m = source.plan.margin
            window = (slice(m, m + y1 - y0), slice(m, m + x1 - x0))
            yield source, ZoneResult((y0, y1, x0, x1), maps[index][window],
                                     None if spreads is None else spreads[index][window])

    shape = size = None
    for source in sources:
        plan = source.plan
        if with_statistics and source.statistics is None:
            source.statistics = predictor.image_statistics(source.image)
        wanted = batch_size or default_batch_size(plan)
        if pending and ((plan.tile_height, plan.tile_width) != shape or wanted != size):
            yield from flush()
        shape, size = (plan.tile_height, plan.tile_width), wanted
        for zone in plan.zones():
            tiles.append(read_window(source.image, *plan.tile_window(zone)))
            pending.append((source, zone))
            if len(pending) >= size:
                yield from flush()
    if pending:
        yield from flush()


# Sinks: where the zones of one image go


class ArraySink:
    """Writes one field of each zone into ``array`` (H, W[, K]) (a numpy array or a ``.npy`` memory map).

    ``step`` > 1 keeps every ``step``-th row and column (an overview for pictures of huge images):
    ``array`` is then ``(ceil(H / step), ceil(W / step)[, K])``.
    """

    def __init__(self, field: str, array: np.ndarray, step: int = 1):
        self.field, self.array, self.step = field, array, step

    def put(self, box: tuple[int, int, int, int], data: np.ndarray) -> None:
        y0, y1, x0, x1 = box
        if self.step == 1:
            self.array[y0:y1, x0:x1] = data
            return
        fy, fx = round_up(y0, self.step), round_up(x0, self.step)
        picked = data[fy - y0::self.step, fx - x0::self.step]
        self.array[fy // self.step:fy // self.step + picked.shape[0],
                   fx // self.step:fx // self.step + picked.shape[1]] = picked

    def close(self, ok: bool) -> None:
        if isinstance(self.array, np.memmap) and ok:
            self.array.flush()


class ConfusionSink:
    """Counts the labels of each zone against ``mask`` (H, W): ``matrix`` (K, K) int64, rows true."""

    field = "labels"

    def __init__(self, mask: np.ndarray, classes: int):
        self.mask, self.classes = mask, classes
        self.matrix = np.zeros((classes, classes), np.int64)

    def put(self, box: tuple[int, int, int, int], data: np.ndarray) -> None:
        y0, y1, x0, x1 = box
        self.matrix += confusion_matrix(np.asarray(self.mask[y0:y1, x0:x1]), data, self.classes)

    def close(self, ok: bool) -> None:
        pass


def write_tiled_tiff(path: Path, array, pixel_size: tuple[float, float] | None = None) -> None:
    """Write ``array`` (H, W) or (H, W, C) (a memory map is read strip by strip) as a tiled OME BigTIFF (an
    OME-Zarr image for a ``.zarr`` path), atomically, with ``pixel_size`` (y, x) in µm when known."""
    height, width = array.shape[:2]
    sink = file_sink("data", path, tuple(array.shape), array.dtype, pixel_size, tile=TIFF_TILE)
    ok = False
    try:
        for y in range(0, height, TIFF_TILE):
            sink.put((y, min(y + TIFF_TILE, height), 0, width), np.asarray(array[y:y + TIFF_TILE]))
        ok = True
    finally:
        sink.close(ok)


# Releasing the pages of a memory-mapped image


def _mapping_of(array):
    """The ``mmap.mmap`` behind a numpy memory map (or a view of one), else None."""
    import mmap

    base = array
    for _ in range(8):
        mapped = getattr(base, "_mmap", None)
        if isinstance(mapped, mmap.mmap):
            return mapped
        if isinstance(base, mmap.mmap):
            return base
        base = getattr(base, "base", None)
        if base is None:
            return None
    return None


def release_rows(image, stop: int) -> bool:
    """Drop the resident pages of rows ``[0, stop)`` of a memory-mapped, C-contiguous ``image``.

    Reading a memory-mapped image window by window leaves every page read resident (counted in
    the process's memory) until the map closes; rows already predicted are never read again,
    so their pages are released (``madvise(MADV_DONTNEED)``: a read-only file mapping rereads
    them from the file if touched). Returns False where this does not apply (not a map, not
    contiguous, no ``madvise``).
    """
    import mmap

    mapped = _mapping_of(image)
    if mapped is None or stop <= 0 or not getattr(image, "flags", None) or not image.flags.c_contiguous \
            or not hasattr(mapped, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return False
    try:
        start_address = np.frombuffer(mapped, dtype=np.uint8).ctypes.data
    except (TypeError, ValueError):
        return False
    row_bytes = image.strides[0]
    end = image.ctypes.data - start_address + min(stop, image.shape[0]) * row_bytes
    end = end // mmap.PAGESIZE * mmap.PAGESIZE
    if end <= 0:
        return False
    try:
        mapped.madvise(mmap.MADV_DONTNEED, 0, end)
    except (OSError, ValueError):
        return False
    return True


# The outputs of one image


class ImageOutputs:
    """Receives the zones of one image: derives its labels (semantic) and uncertainty once per zone,
    accumulates its uncertainty scores, and writes each field into its sinks.

    ``release``: after each full row of zones, release the rows of the (memory-mapped) ``image``
    that no later tile reads (:func:`release_rows`), so streaming a huge image keeps memory flat.
    """

    def __init__(self, predictor: Predictor, plan: TilePlan, sinks: Sequence, image=None, release: bool = False):
        self.predictor, self.plan, self.sinks = predictor, plan, list(sinks)
        self.image, self.release = image, release
        self.semantic = predictor.label_kind == "semantic"
        self.dtype = label_dtype(predictor.number_classes)
        self.scores = UncertaintyScores(predictor.samples > 1)
        self.done = 0

    @property
    def complete(self) -> bool:
        return self.done == self.plan.n_tiles

    def add(self, zone: ZoneResult) -> None:
        entropy = pixel_uncertainty(self.predictor, zone.probabilities)
        self.scores.add(entropy, zone.spread)
        fields = {"probabilities": zone.probabilities, "entropy": entropy, "spread": zone.spread}
        if self.semantic:
            fields["labels"] = zone.probabilities.argmax(axis=-1).astype(self.dtype)
        for sink in self.sinks:
            sink.put(zone.box, fields[sink.field])
        self.done += 1
        if self.release and zone.box[3] == self.plan.width:
            release_rows(self.image, zone.box[1] - self.plan.margin)  # the next zones read from there on

    def score_dict(self) -> dict[str, float]:
        return self.scores.as_dict(self.plan.height * self.plan.width)

    def close(self, ok: bool) -> None:
        """Close every sink (commit the files when ``ok``, else remove their temporaries)."""
        error = None
        for sink in self.sinks:
            try:
                sink.close(ok)
            except BaseException as exc:  # close the others first
                error = error or exc
        if error is not None:
            raise error

    def sink(self, field: str):
        """The first sink of ``field`` (None when there is none)."""
        return next((s for s in self.sinks if getattr(s, "field", None) == field), None)


def memory_sinks(predictor: Predictor, plan: TilePlan, keep_probabilities: bool, keep_uncertainty: bool) -> list:
    """Array sinks of an image predicted in memory: labels (semantic), probabilities (always for an
    instance model), entropy and spread (ensembles / TTA) when ``keep_uncertainty``."""
    height, width = plan.height, plan.width
    semantic = predictor.label_kind == "semantic"
    sinks = []
    if semantic:
        sinks.append(ArraySink("labels", np.empty((height, width), label_dtype(predictor.number_classes))))
    if keep_probabilities or not semantic:
        sinks.append(ArraySink("probabilities", np.empty((height, width, predictor.output_channels), np.float32)))
    if keep_uncertainty:
        sinks.append(ArraySink("entropy", np.empty((height, width), np.float32)))
        if predictor.samples > 1:
            sinks.append(ArraySink("spread", np.empty((height, width), np.float32)))
    return sinks


@dataclasses.dataclass
class Prediction:
    """Prediction of one 2D image of ``H x W`` pixels.

    labels : (H, W) smallest unsigned dtype holding ``number_classes - 1``; None for an
        instance model (its labels come from :func:`lib.inference.instances_glue.segment_instances`)
    probabilities : (H, W, K) float32 (class probabilities, or an instance model's channel
        maps: always kept), or None when not kept
    entropy : (H, W) float32 uncertainty (:func:`pixel_uncertainty`), or None when not kept
    spread : (H, W) float32 spread of the samples (ensemble/TTA), or None
    scores : per-image uncertainty scores (``mean_entropy``, ``uncertain_fraction``, ``mean_spread``)
    plan : the tiles used
    """

    labels: np.ndarray | None
    probabilities: np.ndarray | None
    entropy: np.ndarray | None
    spread: np.ndarray | None
    scores: dict[str, float]
    plan: TilePlan

    @classmethod
    def from_outputs(cls, outputs: ImageOutputs) -> "Prediction":
        """The arrays of ``outputs``' array sinks."""
        def array(field):
            sink = outputs.sink(field)
            return None if sink is None else sink.array

        return cls(array("labels"), array("probabilities"), array("entropy"), array("spread"),
                   outputs.score_dict(), outputs.plan)


def _run(predictor: Predictor, outputs: ImageOutputs, image, batch_size: int | None) -> ImageOutputs:
    """Predict one image into ``outputs``; close its sinks (committing files only on success)."""
    ok = False
    try:
        for _, zone in zone_stream(predictor, [TileSource(image, outputs.plan)], batch_size,
                                   spread=predictor.samples > 1):
            outputs.add(zone)
        ok = True
    finally:
        outputs.close(ok)
    return outputs


# Entry points: one image


def predict_image(predictor: Predictor, image, tile_size: int | None = None, halo: int | None = None,
                  batch_size: int | None = None, keep_probabilities: bool = False,
                  keep_uncertainty: bool = False) -> Prediction:
    """Exact tiled prediction of one image ``(H, W, C)`` held in memory (or memory-mapped).

    ``halo`` defaults to the predictor's receptive-field radius (tiled == whole-image);
    ``tile_size`` and ``batch_size`` default to :func:`plan_for` and
    :func:`lib.store.tiling.default_batch_size`. For an instance model the maps are always kept
    and ``labels`` is None. Raises ``ValueError`` for a tile size that does not fit.
    """
    plan = plan_for(predictor, image.shape[0], image.shape[1], halo, tile_size)
    outputs = ImageOutputs(predictor, plan, memory_sinks(predictor, plan, keep_probabilities, keep_uncertainty))
    return Prediction.from_outputs(_run(predictor, outputs, image, batch_size))


def predict_whole(predictor: Predictor, image: np.ndarray, halo: int | None = None) -> np.ndarray:
    """Reference: the whole image in one model call. Returns probabilities (or instance maps) (H, W, K) float32.

    The image is extended by reflection as the tiles of :func:`predict_image` see it: by the
    halo (default the receptive-field radius) rounded up to the divisor above and left, and by
    at least the halo below and right, up to a multiple of the divisor.
    """
    height, width = image.shape[:2]
    halo = predictor.receptive_field_radius if halo is None else halo
    divisor = predictor.size_divisor
    margin = round_up(halo, divisor)
    padded = read_window(image, -margin, round_up(margin + height + halo, divisor) - margin,
                         -margin, round_up(margin + width + halo, divisor) - margin)
    statistics = predictor.image_statistics(image) if predictor.needs_image_statistics else None
    probabilities, _ = predictor.predict_batch(padded[np.newaxis], statistics)
    return probabilities[0, margin:margin + height, margin:margin + width]


@dataclasses.dataclass(frozen=True)
class TiffOutputs:
    """Where :func:`predict_to_tiff` writes: labels, and optionally probabilities, entropy and spread
    (tiled OME BigTIFFs, or OME-Zarr images for paths ending in ``.zarr``); ``mask`` (H, W) to count a
    confusion matrix; ``overview_step`` for the subsampled labels returned (pictures of huge images);
    ``pixel_size`` (y, x) in µm for the files' metadata (None: unknown)."""

    labels: Path
    probabilities: Path | None = None
    entropy: Path | None = None
    spread: Path | None = None
    mask: np.ndarray | None = None
    overview_step: int = 1
    pixel_size: tuple[float, float] | None = None


@dataclasses.dataclass
class StreamedPrediction:
    """What :func:`predict_to_tiff` returns besides its files."""

    scores: dict[str, float]
    plan: TilePlan
    confusion: np.ndarray | None  # (K, K) against the mask, or None
    overview: np.ndarray  # labels[::step, ::step]


def tiff_sinks(predictor: Predictor, plan: TilePlan, outputs: TiffOutputs) -> list:
    """The sinks of a semantic image streamed to tiled BigTIFFs or OME-Zarr images (see :class:`TiffOutputs`)."""
    if predictor.label_kind != "semantic":
        raise ValueError("predictor must be a semantic model to stream labels; got an instance model (use "
                         "predict_maps_to_memmap, then segment_instances)")
    shape = (plan.height, plan.width)
    dtype = label_dtype(predictor.number_classes)
    step = outputs.overview_step
    sinks: list = [ArraySink("labels", np.empty((-(-shape[0] // step), -(-shape[1] // step)), dtype), step)]
    if outputs.mask is not None:
        sinks.append(ConfusionSink(outputs.mask, predictor.number_classes))
    wanted = [("labels", outputs.labels, shape, dtype),
              ("probabilities", outputs.probabilities, shape + (predictor.number_classes,), np.float32),
              ("entropy", outputs.entropy, shape, np.float32),
              ("spread", outputs.spread if predictor.samples > 1 else None, shape, np.float32)]
    try:
        for field, path, field_shape, field_dtype in wanted:
            if path is not None:
                sinks.append(file_sink(field, path, field_shape, field_dtype, outputs.pixel_size, TIFF_TILE))
    except BaseException:
        for sink in sinks:
            sink.close(False)
        raise
    return sinks


def streamed_result(outputs: ImageOutputs) -> StreamedPrediction:
    confusion = outputs.sink("labels")  # the overview comes first
    matrix = next((s.matrix for s in outputs.sinks if isinstance(s, ConfusionSink)), None)
    return StreamedPrediction(outputs.score_dict(), outputs.plan, matrix, confusion.array)


def predict_to_tiff(predictor: Predictor, image, outputs: TiffOutputs | Path, plan: TilePlan | None = None,
                    batch_size: int | None = None) -> StreamedPrediction:
    """Exact tiled prediction of an image of any size ``(H, W, C)`` streamed to tiled BigTIFFs.

    Memory holds one batch of tiles and one row of zones of the outputs, whatever the image
    size; ``image`` should be memory-mapped for bounded memory (its rows are released as they
    are done). Outputs (``outputs``: a :class:`TiffOutputs`, or the labels' path alone): labels
    (H, W) in the smallest dtype, optional probabilities (H, W, K) float32, entropy and spread
    (H, W) float32, zlib-compressed 256x256 tiles with OME-XML and, above 8192 px, a SubIFD pyramid
    (OME-Zarr images for ``.zarr`` paths), each written atomically. ``plan`` defaults to
    :func:`plan_for`. Raises ``ValueError`` for an instance model.
    """
    outputs = outputs if isinstance(outputs, TiffOutputs) else TiffOutputs(Path(outputs))
    plan = plan or plan_for(predictor, image.shape[0], image.shape[1])
    collected = ImageOutputs(predictor, plan, tiff_sinks(predictor, plan, outputs), image, release=True)
    return streamed_result(_run(predictor, collected, image, batch_size))


def predict_maps_to_memmap(predictor: Predictor, image, path: Path, plan: TilePlan | None = None,
                           batch_size: int | None = None) -> tuple[np.ndarray, TilePlan, dict]:
    """Exact tiled prediction of a large image into a ``.npy`` memory map ``(H, W, K)`` float32 at ``path``.

    For instance models on images too large for memory: the maps are written zone by zone and
    post-processed afterwards (window by window) from the file. Returns ``(maps, plan, scores)``.
    """
    plan = plan or plan_for(predictor, image.shape[0], image.shape[1])
    maps = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32,
                                     shape=(plan.height, plan.width, predictor.output_channels))
    outputs = _run(predictor, ImageOutputs(predictor, plan, [ArraySink("probabilities", maps)], image,
                                           release=True), image, batch_size)
    return maps, plan, outputs.score_dict()


# 3D stacks


def predict_volume(predictor: Predictor, volume, z_filter: int = 0, keep_probabilities: bool = False,
                   keep_uncertainty: bool = False, plan: TilePlan | None = None, batch_size: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, dict[str, float]]:
    """Predict a stack ``(Z, Y, X, C)`` plane by plane (the tiles of several planes share batches).

    ``z_filter`` > 1: median filter of that size along z on the probabilities, then argmax
    (smooths labels that flicker between planes). ``plan``: the tiles of one plane (default
    :func:`plan_for`).

    Returns ``(labels (Z, Y, X), probabilities (Z, Y, X, K) float32 or None,
    entropy (Z, Y, X) float32 or None, scores)`` (scores: the mean over planes).
    """
    if predictor.label_kind != "semantic":
        raise ValueError("predictor must be a semantic model to label a stack plane by plane; got an instance model "
                         "(its post-processing is 2D: segment each plane's maps with segment_instances)")
    keep = keep_probabilities or z_filter > 1
    plan = plan or plan_for(predictor, volume.shape[1], volume.shape[2])
    planes = [ImageOutputs(predictor, plan, memory_sinks(predictor, plan, keep, keep_uncertainty))
              for _ in range(volume.shape[0])]
    sources = (TileSource(volume[z], plan, tag=z) for z in range(volume.shape[0]))
    for source, zone in zone_stream(predictor, sources, batch_size, spread=predictor.samples > 1):
        planes[source.tag].add(zone)
    results = [Prediction.from_outputs(p) for p in planes]
    entropy = np.stack([p.entropy for p in results]) if keep_uncertainty else None
    probabilities = np.stack([p.probabilities for p in results]) if keep else None
    if z_filter > 1:
        from scipy.ndimage import median_filter

        probabilities = median_filter(probabilities, size=(z_filter, 1, 1, 1), mode="nearest")
        labels = probabilities.argmax(axis=-1).astype(label_dtype(predictor.number_classes))
    else:
        labels = np.stack([p.labels for p in results])
    scores = {k: float(np.mean([p.scores[k] for p in results])) for k in results[0].scores}
    return labels, (probabilities if keep_probabilities else None), entropy, scores

