"""Folder runs (``inference.py``): settings resolved once, one :class:`ImageJob` per image, one stream of tiles.

A run reads its settings (:class:`InferenceConfig`, validated once), loads the predictor, and
plans every image up front: an :class:`ImageJob` holds the image's resolved halo, its tile plan
(:func:`lib.inference.tiled.plan_for`, the one rule), its outputs and its layout (a plane held in
memory, a huge plane streamed to tiled BigTIFFs, or a stack). The progress bars, the record
written for the image and the prediction all read that one plan, so the tiles announced are
the tiles predicted.

The 2D jobs feed one stream of tiles (:func:`lib.inference.tiled.zone_stream`): tiles of
consecutive images with one tile shape share model calls. Folders of small images are the
common case (NIST's data: 256 x 256 files); predicted alone, each costs a call for one tile
(with the UNet's 107-px halo a 480 x 480 tile, 3.5x its pixels): 40 such images took 73.7 s
(0.04 Mpixel/s) with the default UNet. Outputs are identical to one image at a time.

An image that cannot be read or does not fit the model is named in ``failed`` and the others
are processed; the run then exits 1 (:class:`lib.common.errors.SomeFailed`, raised by the CLI).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..common import files
from ..common.device import PRECISIONS
from ..common.errors import ToolkitError
from ..common.pictures import OVERLAY_MAX_SIDE
from ..common.pictures import semantic_overlay as overlay
from ..common.settings import ConfigError
from ..instances.measure import measurement_columns
from ..instances.postprocess import PostProcessConfig, parse_refinement
from ..instances.rules import parse_rules
from ..scoring.reports import evaluate_labels, metrics_row
from ..store.images import ImageInfo, list_images, pair_images_masks, read_info, read_mask, read_volume
from ..store.tiling import TilePlan, check_tile_size
from . import instances_glue, ownership, report
from .folder_files import SETTINGS_FILE, announce, check_settings, run_settings, shard_suffix, summaries
from .instances_glue import POSTPROCESS_OVERLAP, POSTPROCESS_WINDOW
from .intensity import COLUMN as INTENSITY_COLUMN
from .intensity import flag_image
from .outputs import save_image, save_json
from .predictor import InputMismatch, Predictor, check_finite, load_predictor
from .sources import OUTPUT_FORMATS, open_image, output_pixel_size, semantic_paths
from .tiled import (
    ArraySink,
    ImageOutputs,
    Prediction,
    TiffOutputs,
    TileSource,
    memory_sinks,
    plan_for,
    predict_volume,
    streamed_result,
    tiff_sinks,
    zone_stream,
)

# Images above this many pixels are predicted zone row by zone row into tiled BigTIFFs
# (instance models: into a memory-mapped scratch file of maps, post-processed window by window).
STREAM_PIXELS = 2 ** 26
# Batch logs (stderr not a terminal, so no progress bars) get a progress line at least this often.
HEARTBEAT_SECONDS = 60.0
# Images of at least this many tiles get a progress bar of their own (over tiles).
TILE_BAR_MIN_TILES = 4
# Settings that only instance models use (refused for a semantic model rather than ignored).


@dataclasses.dataclass(frozen=True)
class InferenceConfig:
    """Settings of one ``inference.py`` run; see the CLI help for each field."""

    model: str
    image_folder: str
    output_folder: str
    mask_folder: str | None = None
    mask_suffix: str | None = None
    image_format: str | None = None
    batch_size: int | None = None
    tile_size: int | None = None
    halo: int | None = None
    output_format: str = "tif"
    probabilities: bool = False
    uncertainty: bool = False
    tta: bool = False
    z_filter: int = 0
    overwrite: bool = False
    shard: tuple[int, int] | None = None  # (K, N): every N-th image starting at K
    precision: str = "float32"  # float32, bfloat16 or auto (bfloat16 where native)
    # Instance models only (see instances_glue.postprocess_settings, segment_instances):
    thresholds: dict[str, float | str] | None = None  # seed thresholds by channel, "growth"
    refinements: tuple[str, ...] | None = None  # replace model.json's refinements
    pixel_size: float | None = None  # physical side of a pixel, for the measurements
    filter_rules: str | None = None  # lib.instances.rules.parse_rules text: instances to remove
    class_mask_folder: str | None = None  # true classes beside one-channel instance masks (same file names)
    save_intermediates: bool = False  # seeds, surface and growth mask
    matching_thresholds: tuple[float, ...] = (0.3, 0.5, 0.75)  # IoU thresholds of the evaluation
    postprocess_window: int = POSTPROCESS_WINDOW
    postprocess_overlap: int = POSTPROCESS_OVERLAP
    # Tiles of consecutive images with one tile shape share model calls (same outputs; False: one
    # image at a time, the behaviour before, kept for benchmarks/bench_inference.py --folder).
    batch_images: bool = True

    def validate(self) -> "InferenceConfig":
        """Return self, or raise ``lib.common.settings.ConfigError`` listing every invalid field."""
        v = self.violations()
        if v:
            raise ConfigError(v)
        return self

    def violations(self, filesystem: bool = True) -> list[str]:
        """Every rule the settings break, one line each (``filesystem``: also check the folders)."""
        v = []
        if filesystem:
            if not Path(self.image_folder).is_dir():
                v.append(f"image_folder must be an existing folder; got {self.image_folder!r}")
            if self.mask_folder is not None and not Path(self.mask_folder).is_dir():
                v.append(f"mask_folder must be an existing folder; got {self.mask_folder!r}")
            if self.class_mask_folder is not None and not Path(self.class_mask_folder).is_dir():
                v.append(f"class_mask_folder must be an existing folder; got {self.class_mask_folder!r}")
            for name in ("image_folder", "mask_folder", "class_mask_folder"):  # predicted KEY.tif would replace the input KEY.tif
                folder = getattr(self, name)
                if folder is not None and Path(folder).is_dir() and (
                        files.is_inside(self.output_folder, folder) or files.is_inside(folder, self.output_folder)):
                    v.append(f"output_folder must not be, contain or lie inside {name} (outputs would replace "
                             f"inputs); got {self.output_folder!r} and {folder!r}. Choose a new folder")
        if self.class_mask_folder is not None and self.mask_folder is None:
            v.append("class_mask_folder needs mask_folder: the class masks sit beside the instance masks, one per "
                     f"instance mask with the same file name; got class_mask_folder {self.class_mask_folder!r} alone")
        for name in ("batch_size", "tile_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                v.append(f"{name} must be >= 1 (or left unset for automatic); got {value}")
        if self.halo is not None and self.halo < 0:
            v.append(f"halo must be >= 0 pixels; got {self.halo}")
        if self.output_format not in OUTPUT_FORMATS:
            v.append(f"output_format must be one of {', '.join(OUTPUT_FORMATS)}; got {self.output_format!r}")
        if self.z_filter < 0 or self.z_filter == 1 or (self.z_filter and self.z_filter % 2 == 0):
            v.append(f"z_filter must be 0 (off) or an odd size >= 3; got {self.z_filter}")
        if self.precision not in PRECISIONS:
            v.append(f"precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}")
        v += self._instance_violations()
        if self.shard is not None:
            k, n = self.shard
            if not (n >= 1 and 0 <= k < n):
                v.append(f"shard must be K/N with 0 <= K < N; got {k}/{n}")
        return v

    def _instance_violations(self) -> list[str]:
        v = []
        if self.pixel_size is not None and not (isinstance(self.pixel_size, (int, float))
                                                and math.isfinite(self.pixel_size) and self.pixel_size > 0):
            v.append(f"pixel_size must be a positive number (physical units per pixel); got {self.pixel_size!r}")
        if self.filter_rules is not None:
            try:
                parse_rules(self.filter_rules, measurement_columns(self.pixel_size))  # lib.instances.measure.measure's
            except ValueError as exc:
                v.append(f"filter_rules must be valid rules; got {self.filter_rules!r}: {' '.join(str(exc).split())}")
        for step in self.refinements or ():
            try:
                parse_refinement(step)
            except ValueError as exc:
                v.append(str(exc))
        for name, value in (self.thresholds or {}).items():
            if value != "auto" and not (isinstance(value, (int, float)) and 0 <= value <= 1):
                v.append(f"thresholds[{name!r}] must be a number in [0, 1] or 'auto'; got {value!r}")
        levels = list(self.matching_thresholds)
        if not levels or len(set(levels)) != len(levels) or not all(0 < t <= 1 for t in levels):
            v.append(f"matching_thresholds must be distinct IoU thresholds in (0, 1]; got {levels}")
        if self.postprocess_window < 1 or not 0 <= self.postprocess_overlap < self.postprocess_window:
            v.append(f"postprocess_overlap must be >= 0 and below postprocess_window >= 1; got window "
                     f"{self.postprocess_window}, overlap {self.postprocess_overlap}")
        return v

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class InferenceResult:
    """What a run did. ``failed`` maps image key -> one-line reason."""

    output_folder: Path
    predicted: list[str]
    skipped: list[str]
    failed: dict[str, str]
    overall: dict[str, object] | None  # metrics over all evaluated images, or None
    metrics_csv: Path | None
    uncertainty_csv: Path | None
    seconds: float
    megapixels: float  # of the images predicted in this run
    halo: int
    exact: bool
    instance_overall: dict | None = None  # pooled matching statistics {threshold: MatchStats}, or None
    instance_metrics_csv: Path | None = None


@dataclasses.dataclass
class RunContext:
    """What every image of a run shares: settings, predictor, output folder, resolved halo, post-processing."""

    config: InferenceConfig
    predictor: Predictor
    out: Path
    halo: int
    post: PostProcessConfig | None  # None: a semantic model
    log: Callable[[str], None] = print
    progress: bool = False


@dataclasses.dataclass
class ImageJob:
    """One image of a run, planned once, up front.

    ``layout``: "plane" (2D, predicted in memory), "streamed" (2D above ``STREAM_PIXELS``:
    written tile row by tile row) or "volume" (a stack, plane by plane). ``plan`` is the plan of
    one plane; ``tiles`` counts every tile the image will be predicted with.
    """

    key: str
    image_path: Path
    mask_path: Path | None
    info: ImageInfo
    layout: str
    plan: TilePlan
    paths: dict[str, Path]
    pixel_size: tuple[float, float] | None = None  # (y, x) in µm for the outputs' metadata

    @property
    def planes(self) -> int:
        return self.info.shape[0] if self.layout == "volume" else 1

    @property
    def tiles(self) -> int:
        return self.plan.n_tiles * self.planes

    @property
    def pixels(self) -> int:
        return self.plan.height * self.plan.width * self.planes

    def plan_record(self) -> dict:
        record = {**self.plan.as_record(), "tiles": self.tiles}
        if self.layout == "volume":
            record["planes"] = self.planes
        else:
            record["streamed"] = self.layout == "streamed"
        return record

    def new_record(self, halo: int) -> dict[str, Any]:
        return {"image": str(self.image_path), "shape": list(self.info.shape), "dtype": self.info.dtype,
                "halo": halo, "plan": self.plan_record(), "pixel_size": self.pixel_size}


def _select(keys: list[str], shard: tuple[int, int] | None) -> list[str]:
    return keys if shard is None else keys[shard[0]::shard[1]]


def plan_job(context: RunContext, key: str, image_path: Path, mask_path: Path | None) -> ImageJob | None:
    """The job of one image, or None when its outputs all exist (done before) and not ``overwrite``.

    Raises for an image that cannot be read or does not fit the model.
    """
    info = read_info(image_path)
    volume = info.is_volume
    height, width = info.shape[-3:-1] if volume else info.shape[:2]
    layout = "volume" if volume else "streamed" if height * width > STREAM_PIXELS else "plane"
    if context.post is None:
        paths = semantic_paths(context, key, layout, mask_path is not None)
    else:
        paths = instances_glue.instance_paths(context, key, (height, width), layout == "streamed",
                                              mask_path is not None)
    if not context.config.overwrite and all(p.exists() for p in paths.values()):  # .ome.zarr: folders
        return None
    context.predictor.check_image(info.shape, info.dtype, str(image_path))
    if context.post is not None and volume:
        raise InputMismatch(f"image must be 2D for an instance model (post-processing is 2D); got a stack of shape "
                            f"(Z, Y, X, C) = {info.shape} in {image_path}. Predict its planes as separate images")
    plan = plan_for(context.predictor, height, width, context.halo, context.config.tile_size)
    return ImageJob(key, image_path, mask_path, info, layout, plan, paths,
                    output_pixel_size(context.config, image_path))


# Failures a user's file or setting can cause (ImageReadError is a ToolkitError): told in one line.
# Anything else is a bug: its traceback is shown too.
USER_CAUSED = (ToolkitError, ValueError, OSError)


def _failure_reason(exc: BaseException) -> str:
    # Our own errors carry a full sentence; anything else gets its type for a bug report.
    message = str(exc) if isinstance(exc, USER_CAUSED) else \
        f"{type(exc).__name__}: {exc}"
    return message.splitlines()[0] if message else type(exc).__name__


# Running jobs


@dataclasses.dataclass
class _Running:
    """A 2D job whose tiles are in the stream."""

    job: ImageJob
    image: Any
    outputs: ImageOutputs
    started: float
    bar: Any = None
    scratch: Path | None = None
    mask: np.ndarray | None = None
    step: int = 1


class _Run:
    """The execution of a run's jobs: the 2D ones through one stream of tiles, stacks alone; outcomes reported
    to the image bar."""

    def __init__(self, context: RunContext, image_bar, total: int = 0):
        self.context = context
        self.image_bar = image_bar
        self.predicted: list[str] = []
        self.failed: dict[str, str] = {}
        self.megapixels = 0.0
        self.total, self.ticks = total, 0
        self.started = self.last_heartbeat = time.perf_counter()
        # With the bar off (stderr not a terminal: a batch log), a progress line at least this often.
        quiet_bar = image_bar is not None and getattr(image_bar, "disable", False)
        self.heartbeat_every = HEARTBEAT_SECONDS if quiet_bar else None

    def write(self, message: str) -> None:
        (self.image_bar.write if self.image_bar is not None else self.context.log)(message)

    def fail(self, job: ImageJob, exc: BaseException) -> None:
        self.failed[job.key] = _failure_reason(exc)
        self.write(f"error: {job.image_path.name}: {self.failed[job.key]} (skipped)")
        if not isinstance(exc, USER_CAUSED):
            self.write("".join(traceback.format_exception(exc)).rstrip())
        self.tick()

    def done(self, job: ImageJob) -> None:
        self.predicted.append(job.key)
        self.megapixels += job.pixels / 1e6
        self.tick()

    def tick(self) -> None:
        self.ticks += 1
        if self.image_bar is not None:
            self.image_bar.update(1)
        now = time.perf_counter()
        if self.heartbeat_every is not None and (now - self.last_heartbeat >= self.heartbeat_every
                                                 or self.ticks == self.total):
            rate = self.ticks / max(now - self.started, 1e-9)
            self.context.log(f"inference: {self.ticks}/{self.total} images ({len(self.failed)} failed), "
                             f"{self.megapixels / max(now - self.started, 1e-9):.2f} Mpixel/s, about "
                             f"{(self.total - self.ticks) / max(rate, 1e-9) / 60:.0f} min left")
            self.last_heartbeat = now

    def tile_bar(self, job: ImageJob):
        """A progress bar over the tiles of one image when it has many (None otherwise)."""
        if not self.context.progress or job.tiles < TILE_BAR_MIN_TILES:
            return None
        from tqdm import tqdm

        return tqdm(total=job.tiles, unit="tile", desc=job.key, dynamic_ncols=True, leave=False, position=1,
                    disable=None)

    def run(self, jobs: list[ImageJob]) -> None:
        for volume, group in itertools.groupby(jobs, key=lambda job: job.layout == "volume"):
            if volume:
                for job in group:
                    self._volume(job)
            elif self.context.config.batch_images:
                self._stream(list(group))
            else:
                for job in group:
                    self._stream([job])

    # Stacks

    def _volume(self, job: ImageJob) -> None:
        context, config, paths = self.context, self.context.config, job.paths
        started = time.perf_counter()
        try:
            volume = read_volume(job.image_path)
            check_finite(volume, job.image_path)
            ownership.claim(context.out, paths)
            labels, probabilities, entropy, scores = predict_volume(
                context.predictor, volume, config.z_filter, config.probabilities,
                config.uncertainty, job.plan, config.batch_size)
            save_image(paths["labels"], labels[..., np.newaxis], job.pixel_size, volume=True)
            if probabilities is not None:
                save_image(paths["probabilities"], probabilities, job.pixel_size, volume=True)
            if entropy is not None:
                save_image(paths["entropy"], entropy[..., np.newaxis], job.pixel_size, volume=True)
            if job.mask_path is not None:
                context.log(f"warning: {job.image_path.name} is a stack; evaluation takes 2D images only "
                            "(not evaluated)")
            self._record(job, job.new_record(context.halo), scores, started)
        except Exception as exc:  # one bad image must not stop an unattended run
            self.fail(job, exc)
        else:
            self.done(job)

    # 2D images: one stream of tiles

    def _stream(self, jobs: list[ImageJob]) -> None:
        queue = list(jobs)
        running: dict[str, _Running] = {}

        def sources():
            while queue:
                job = queue.pop(0)
                try:
                    state = self._start(job)
                except Exception as exc:  # noqa: BLE001 (named in the run's failures)
                    self.fail(job, exc)
                    continue
                running[job.key] = state
                yield TileSource(state.image, job.plan, tag=state)

        predictor = self.context.predictor
        while queue:
            try:
                for source, zone in zone_stream(predictor, sources(), self.context.config.batch_size,
                                                spread=predictor.samples > 1):
                    state = source.tag
                    if state.job.key not in running:
                        continue  # failed earlier: the rest of its tiles is dropped
                    try:
                        state.outputs.add(zone)
                        if state.bar is not None:
                            state.bar.update(1)
                        if state.outputs.complete:
                            del running[state.job.key]
                            self._finish(state)
                    except Exception as exc:
                        running.pop(state.job.key, None)
                        self._abandon(state, exc)
            except Exception as exc:  # a batch failed: every image in flight fails with it
                for state in list(running.values()):
                    self._abandon(state, exc)
                running.clear()

    def _start(self, job: ImageJob) -> _Running:
        """Open the image of a 2D job and make its sinks."""
        context, config, paths = self.context, self.context.config, job.paths
        predictor, plan = context.predictor, job.plan
        image = open_image(job.image_path, job.info)
        check_finite(image, job.image_path)
        ownership.claim(context.out, paths)
        streamed = job.layout == "streamed"
        state = _Running(job, image, None, time.perf_counter())
        if context.post is not None and streamed:
            # The maps of a very large image live in a file; post-processing reads it window by window.
            state.scratch = files.temporary_beside(context.out / f"{job.image_path.stem}.maps.npy", ".npy")
            maps = np.lib.format.open_memmap(state.scratch, mode="w+", dtype=np.float32,
                                             shape=(plan.height, plan.width, predictor.output_channels))
            sinks = [ArraySink("probabilities", maps)]
        elif streamed:
            if config.output_format == "png":
                context.log(f"note: {job.image_path.name} has {job.pixels / 1e6:.0f} Mpixel; its labels are "
                            "streamed to a tiled BigTIFF (.tif), not PNG")
            if job.mask_path is not None:
                state.mask = read_mask(job.mask_path)
                if state.mask.shape != (plan.height, plan.width):
                    raise ValueError(f"mask size must equal the image size; got {state.mask.shape} for "
                                     f"{(plan.height, plan.width)} in {job.mask_path}")
            state.step = max(1, -(-max(plan.height, plan.width) // OVERLAY_MAX_SIDE))
            sinks = tiff_sinks(predictor, plan, TiffOutputs(
                paths["labels"], paths.get("probabilities"), paths.get("entropy"), paths.get("spread"),
                state.mask, state.step, job.pixel_size))
        else:
            keep_probabilities = config.probabilities or context.post is not None
            sinks = memory_sinks(predictor, plan, keep_probabilities, config.uncertainty)
        state.outputs = ImageOutputs(predictor, plan, sinks, image, release=streamed)
        state.bar = self.tile_bar(job)
        return state

    def _abandon(self, state: _Running, exc: BaseException) -> None:
        try:
            state.outputs.close(False)
        finally:
            self._cleanup(state)
            self.fail(state.job, exc)

    def _cleanup(self, state: _Running) -> None:
        if state.bar is not None:
            state.bar.close()
        if state.scratch is not None:
            state.outputs = None  # closes the memory map before its file goes
            state.scratch.unlink(missing_ok=True)

    def _finish(self, state: _Running) -> None:
        """Write the outputs of a 2D job whose zones are all predicted, evaluate it; the record last."""
        job, context = state.job, self.context
        record = job.new_record(context.halo)
        try:
            state.outputs.close(True)
            if context.post is not None:
                prediction = Prediction.from_outputs(state.outputs)
                record.update(instances_glue.finish_instances(context, job, prediction, state.image))
                scores = prediction.scores
            elif job.layout == "streamed":
                result = streamed_result(state.outputs)
                scores = result.scores
                if result.confusion is not None:
                    step = state.step
                    save_image(job.paths["overlay"], overlay(np.asarray(state.image[::step, ::step]), result.overview,
                                                             state.mask[::step, ::step], readable=True))
                    record.update(_metrics_entries(job.mask_path, result.confusion))
            else:
                prediction = Prediction.from_outputs(state.outputs)
                scores = prediction.scores
                self._write_plane(job, prediction)
                if job.mask_path is not None:
                    record.update(_evaluate_plane(job, state.image, prediction.labels,
                                                  context.predictor.number_classes))
            scores[INTENSITY_COLUMN] = flag_image(state.image, context.predictor, job.image_path.name, context.log)
            self._record(job, record, scores, state.started)
        except Exception as exc:
            self._cleanup(state)
            self.fail(job, exc)
            return
        self._cleanup(state)
        self.done(job)

    def _write_plane(self, job: ImageJob, prediction: Prediction) -> None:
        paths = job.paths
        save_image(paths["labels"], prediction.labels, job.pixel_size)
        for name in ("probabilities", "entropy", "spread"):
            array = getattr(prediction, name)
            if array is not None and name in paths:
                save_image(paths[name], array, job.pixel_size)

    def _record(self, job: ImageJob, record: dict, scores: dict, started: float) -> None:
        record["scores"] = scores
        record["seconds"] = time.perf_counter() - started
        record["outputs"] = {name: str(p.relative_to(self.context.out)) for name, p in job.paths.items()
                             if name != "record"}
        save_json(job.paths["record"], record)
        ownership.release(job.paths)


def _metrics_entries(mask_path: Path, cm: np.ndarray) -> dict:
    row = metrics_row("", cm)
    return {"mask": str(mask_path), "confusion_matrix": cm.tolist(),
            "metrics": {k: v for k, v in row.items() if k != "image"}}


def _evaluate_plane(job: ImageJob, image, labels: np.ndarray, classes: int) -> dict:
    mask = read_mask(job.mask_path)
    try:
        cm = evaluate_labels(labels, mask, classes)
    except ValueError as exc:
        raise ValueError(f"{exc} in {job.mask_path}") from None
    save_image(job.paths["overlay"], overlay(image, labels, mask, readable=True))
    return _metrics_entries(job.mask_path, cm)


# The run


def run_inference(config: InferenceConfig, log: Callable[[str], None] = print, progress: bool = True,
                  predictor: Predictor | None = None) -> InferenceResult:
    """Predict every image of ``config.image_folder`` (or one shard of it) into ``config.output_folder``.

    Per image ``KEY``: ``KEY.tif|png|ome.zarr`` labels (smallest integer dtype; stacks never png; TIFFs with
    OME-XML, see :mod:`lib.inference.sources`),
    ``probabilities/KEY.tif`` (H, W, K) float32, ``uncertainty/KEY_entropy.tif`` (and
    ``KEY_spread.tif`` for ensembles/TTA), ``overlays/KEY.png`` when evaluating, and
    ``records/KEY.json`` (plan, timings, uncertainty scores, confusion matrix), each written
    atomically with the umask's mode; the record last. An image whose outputs all exist is
    skipped unless ``overwrite``. At the end ``uncertainty.csv`` (images ranked by mean
    entropy) and, with masks, ``metrics.csv`` (per image and ``ALL``) are written from the
    records (suffixed ``-shardKofN`` for a shard). Images that cannot be read or do not fit the
    model are reported in ``failed`` and the others are processed.

    Instance models: the maps of each whole image are post-processed
    (:func:`lib.inference.instances_glue.postprocess_settings`, :func:`~lib.inference.instances_glue.segment_instances`)
    into ``KEY.tif`` (uint16, or uint32 above 65535 objects), with ``KEY_instances.csv`` (one
    row of measurements per instance, with a ``status`` column when ``filter_rules`` removed
    some), ``probabilities/KEY_<channel>.tif`` (H, W) float32 per channel,
    ``intermediates/KEY_{seeds,surface,growth}.tif`` with ``save_intermediates``; with masks
    (instance label images) ``associations/KEY.csv``, ``overlays/KEY.png``,
    ``instance_metrics.csv`` (per image and pooled ``ALL`` rows at each of
    ``matching_thresholds``) and ``metrics.csv`` of the foreground (labels > 0 against mask > 0).
    Images above ``STREAM_PIXELS`` keep their maps in a memory-mapped scratch file and write
    tiled BigTIFFs.

    Raises ``ConfigError`` (settings), :class:`lib.model_folder.ModelError` (model),
    :class:`lib.common.errors.OutputError` (an output folder of other settings or a model of other bytes, or
    one holding files this tool did not write where it would write: see :mod:`lib.inference.ownership`), or
    :class:`lib.common.errors.BadInput` (no images), all before writing anything.
    """
    started = time.perf_counter()
    config.validate()
    image_files, problems = list_images(config.image_folder, config.image_format)
    for problem in problems:
        log(f"warning: {problem}")
    if not image_files:
        raise ConfigError([f"image_folder must hold images ({config.image_format or 'tif, png, jpg, bmp, ome-zarr'}); "
                           f"got none in {config.image_folder}"])
    keys = _select(sorted(image_files), config.shard)
    masks: dict[str, Path] = {}
    if config.mask_folder is not None:
        mask_files, mask_problems = list_images(config.mask_folder)
        pairs, pair_problems = pair_images_masks({k: image_files[k] for k in keys}, mask_files, config.mask_suffix)
        masks = {p.key: p.mask for p in pairs}
        for problem in mask_problems + [p for p in pair_problems if config.shard is None or "no mask" in p]:
            log(f"warning: {problem}; those images are predicted but not evaluated"
                if "no mask" in problem else f"warning: {problem}")
    if predictor is None:
        predictor = load_predictor(config.model, tta=config.tta, precision=config.precision)
    halo = predictor.receptive_field_radius if config.halo is None else config.halo
    if config.tile_size is not None:
        try:
            check_tile_size(config.tile_size, halo, predictor.size_divisor)  # fails before any image
        except ValueError as exc:
            raise ConfigError([str(exc)]) from None
    context = RunContext(config, predictor, Path(config.output_folder), halo,
                         instances_glue.instance_settings(predictor, config), log, progress)
    check_settings(context.out, run_settings(context), config.overwrite)
    planned: dict[str, ImageJob | None | Exception] = {}
    for key in keys:  # every image planned up front, before anything is written
        try:
            planned[key] = plan_job(context, key, image_files[key], masks.get(key))
        except Exception as exc:  # one bad image must not stop an unattended run
            planned[key] = exc
    if not config.overwrite:
        ownership.check_foreign(context.out, SETTINGS_FILE, shard_suffix(config),
                                [job.paths for job in planned.values() if isinstance(job, ImageJob)])
    files.make_folder(context.out)
    if not (context.out / SETTINGS_FILE).is_file() or config.overwrite:
        save_json(context.out / SETTINGS_FILE, run_settings(context))
    announce(context, len(keys), len(masks))
    image_bar = None
    if progress:
        from tqdm import tqdm

        image_bar = tqdm(total=len(keys), unit="image", dynamic_ncols=True, disable=None)  # None: quiet off a TTY
    execution = _Run(context, image_bar, len(keys))
    try:
        for key, job in planned.items():
            if isinstance(job, Exception):
                execution.failed[key] = _failure_reason(job)
                execution.write(f"error: {image_files[key].name}: {execution.failed[key]} (skipped)")
            if not isinstance(job, ImageJob):
                execution.tick()
        execution.run([job for job in planned.values() if isinstance(job, ImageJob)])
    finally:
        if image_bar is not None:
            image_bar.close()
    skipped = [key for key, job in planned.items() if job is None]
    failed = {key: execution.failed[key] for key in keys if key in execution.failed}
    predicted = [key for key in keys if key in set(execution.predicted)]
    found = summaries(context, keys, failed)
    report.write_report(context.out, log)
    return InferenceResult(context.out, predicted, skipped, failed, found["overall"], found["metrics_csv"],
                           found["uncertainty_csv"], time.perf_counter() - started, execution.megapixels, halo,
                           halo >= predictor.receptive_field_radius, found["instance_overall"],
                           found["instance_metrics_csv"])
