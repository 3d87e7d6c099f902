"""One training or test batch: sample records, crop, augment, make targets, normalise.

:class:`BatchProducer` is the work of one reader worker; the same code runs in the worker
processes of :class:`lib.reader.imagereader.ImageReader` and in the calling process
(``reader_count=0``). It writes each example straight into the caller's arrays (a slot of the
shared-memory ring), so a batch is never copied or pickled.

Randomness: worker ``w`` reseeds ``np.random.default_rng(SeedSequence([seed, w, epoch]))`` at
the start of every epoch, so no two workers share a stream, a run is reproducible for a fixed
seed and worker count, and a run resumed at an epoch repeats the same batches.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from ..common import normalization as norm
from ..common.errors import BadInput
from ..store.lmdb_store import LmdbReader, StoreError
from .augment import AugmentParams, Transform, apply_transform, augment, crop_centre
from .targets import TargetSpec, make_targets
from .targets_fields import consecutive

# Instance ids ride beside the targets in float32, exact below 2**24: larger ids are renumbered per patch.
_FLOAT32_EXACT = 1 << 24


class LabelValueError(BadInput, ValueError):
    """A database label outside ``[0, number_classes)``: the data or the setting is wrong (exit 2)."""

MODES = ("train", "test")
SAMPLINGS = ("uniform", "balanced", "foreground")
NORMALIZATIONS = norm.MODES
# A channel whose standard deviation is below this is only centred, never divided.
MIN_STD = norm.MIN_SCALE


@dataclasses.dataclass(frozen=True)
class ReaderSpec:
    """Everything a worker needs to produce batches; picklable, so it travels to spawned workers."""

    database: str
    mode: str
    batch_size: int
    patch_shape: tuple[int, int]
    channels: int
    label_tail: tuple[int, ...]
    label_dtype: str
    augment: AugmentParams
    sampling: str
    normalization: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    seed: int
    reader_count: int
    batches_per_epoch: int
    n_records: int
    number_classes: int
    label_kind: str
    check_labels: bool
    records: tuple[int, ...] | None = None  # the subset of records to use (k-fold); None = all
    targets: dict | None = None  # instance training: lib.reader.targets.TargetSpec.to_dict(); None = labels as stored
    # normalization "percentile": (offsets, scales) per source image (index into metadata "sources")
    percentile_ranges: tuple | None = None

    @property
    def workers(self) -> int:
        return max(self.reader_count, 1)

    def epoch_of(self, index: int) -> int:
        return index // self.batches_per_epoch


class BatchProducer:
    """Fills batches for one worker; the same code runs in worker processes and in-process."""

    def __init__(self, spec: ReaderSpec, worker_id: int):
        self.spec = spec
        self.worker_id = worker_id
        self.db = LmdbReader(spec.database)
        metadata = self.db.metadata
        self.mean = np.asarray(spec.mean, np.float32)
        self.inverse_std = (1.0 / np.maximum(np.asarray(spec.std, np.float32), MIN_STD)).astype(np.float32)
        self.inverse_std[np.asarray(spec.std) < MIN_STD] = 1.0
        tiles = metadata.get("tiles") or {}
        self.valid = None
        self.record_source = np.asarray(tiles.get("source") or [], np.int64)
        if len(tiles.get("valid_h", ())) == spec.n_records:
            self.valid = np.stack([tiles["valid_h"], tiles["valid_w"]], axis=1).astype(np.int64)
        self.subset = None if spec.records is None else np.asarray(spec.records, np.int64)
        class_tiles = [np.asarray(t, np.int64) for t in metadata.get("class_tiles") or []]
        if self.subset is not None:
            class_tiles = [np.intersect1d(t, self.subset) for t in class_tiles]
        self.class_tiles = [t for t in class_tiles if len(t)]
        counts = np.asarray(metadata.get("class_pixel_counts") or [1] * spec.number_classes, np.float64)
        # Inverse class frequency: every class gets the same share of crop centres on average.
        self.class_weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / len(counts), 0.0)
        self.rng: np.random.Generator | None = None
        self.rng_epoch = -1
        self.target_spec = None
        if spec.targets is not None:
            self.target_spec = TargetSpec.from_dict(spec.targets)

    def close(self) -> None:
        self.db.close()

    def indices(self, start: int) -> Iterator[int]:
        """Global batch indices this worker makes, from the first one at or after ``start``."""
        n = self.spec.workers
        index = start + (self.worker_id - start) % n
        while True:
            yield index
            index += n

    def fill(self, index: int, images: np.ndarray, labels: np.ndarray, records: np.ndarray) -> int:
        """Write batch ``index`` into the given ``(B, ...)`` arrays; return how many examples it holds."""
        spec = self.spec
        if spec.mode == "test":
            first = (index % spec.batches_per_epoch) * spec.batch_size
            order = range(spec.n_records) if self.subset is None else self.subset
            chosen = [int(r) for r in order[first:first + spec.batch_size]]
        else:
            epoch = spec.epoch_of(index)
            if epoch != self.rng_epoch:
                self.rng = np.random.default_rng(np.random.SeedSequence([spec.seed, self.worker_id, epoch]))
                self.rng_epoch = epoch
            chosen = [self._sample_record() for _ in range(spec.batch_size)]
        for b, record in enumerate(chosen):
            records[b] = record
            image, label = self._example(record)
            self._store(image, label, record, images[b], labels[b])
        return len(chosen)

    def _sample_record(self) -> int:
        if self.spec.sampling == "balanced" and self.class_tiles:
            tiles = self.class_tiles[int(self.rng.integers(len(self.class_tiles)))]
            return int(tiles[int(self.rng.integers(len(tiles)))])
        if self.subset is not None:
            return int(self.subset[int(self.rng.integers(len(self.subset)))])
        return int(self.rng.integers(self.spec.n_records))

    def _example(self, record: int) -> tuple[np.ndarray, np.ndarray]:
        spec = self.spec
        image, label = self.db[record]
        if label is None:
            raise StoreError(f"record {record} of {spec.database} has no label; a training database needs masks")
        valid = None if self.valid is None else tuple(self.valid[record])
        if spec.mode == "test":
            # Centre crop (or reflect-pad) to the patch, nothing random.
            top = (image.shape[0] - spec.patch_shape[0]) // 2
            left = (image.shape[1] - spec.patch_shape[1]) // 2
            centre = crop_centre(image.shape, spec.patch_shape, top, left)
            return apply_transform(image, label, Transform(*centre), spec.patch_shape)
        centre = None
        if spec.sampling == "foreground":
            centre = self._foreground_centre(label, valid)
        return augment(image, label, self.rng, spec.augment, spec.patch_shape, centre=centre, valid_shape=valid)

    def _foreground_centre(self, label: np.ndarray, valid: tuple[int, int] | None) -> tuple[float, float]:
        """A crop centre drawn with probability proportional to the inverse frequency of its pixel's class."""
        ph, pw = self.spec.patch_shape
        height, width = label.shape[:2]
        if valid is not None:
            height = valid[0] if valid[0] >= ph else height
            width = valid[1] if valid[1] >= pw else width
        semantic = label if label.ndim == 2 else label[:, :, 0]
        if self.spec.label_kind == "instance":
            semantic = semantic > 0
        # Pixel (y, x) is the centre of the patch whose top-left is (y - ph // 2, x - pw // 2).
        rows = slice(ph // 2, max(height - ph, 0) + ph // 2 + 1)
        cols = slice(pw // 2, max(width - pw, 0) + pw // 2 + 1)
        region = semantic[rows, cols]
        weights = self.class_weights[np.minimum(region, len(self.class_weights) - 1).astype(np.intp)].ravel()
        cumulative = np.cumsum(weights)
        if region.size == 0 or cumulative[-1] <= 0:
            pick = int(self.rng.integers(max(region.size, 1)))
        else:
            pick = int(np.searchsorted(cumulative, self.rng.random() * cumulative[-1], side="right"))
            pick = min(pick, region.size - 1)
        y, x = divmod(pick, max(region.shape[1], 1))
        top, left = y, x  # region offsets are patch origins by construction
        if height < ph or width < pw:
            top = top if height >= ph else (height - ph) // 2
            left = left if width >= pw else (width - pw) // 2
        return crop_centre(label.shape, (ph, pw), top, left)

    def _store(self, image: np.ndarray, label: np.ndarray, record: int, image_out: np.ndarray,
               label_out: np.ndarray) -> None:
        spec = self.spec
        if spec.normalization == "tile":
            flat = image.reshape(-1, image.shape[2])
            mean = flat.mean(axis=0, dtype=np.float64).astype(np.float32)
            std = flat.std(axis=0, dtype=np.float64)
            inverse_std = np.where(std < MIN_STD, 1.0, 1.0 / np.maximum(std, MIN_STD)).astype(np.float32)
        elif spec.normalization == "percentile":
            # The whole source image's percentiles (never the patch's), computed once per database.
            offset, scale = spec.percentile_ranges[int(self.record_source[record])]
            norm.apply(image, offset, scale, out=image_out)
            mean = None
        else:
            mean, inverse_std = self.mean, self.inverse_std
        if mean is not None:
            np.subtract(image, mean, out=image_out)
            image_out *= inverse_std
        if self.target_spec is not None:
            # Targets from the augmented instance ids; the ids ride along as the last channel
            # (exact in float32 below 2**24) for matching statistics at evaluation.
            instances = label if label.ndim == 2 else label[:, :, 0]
            if instances.size and instances.max() >= _FLOAT32_EXACT:  # float32 would merge neighbouring ids
                instances = consecutive(instances)[0]
            n_targets = label_out.shape[-1] - 1
            classes = label[:, :, 1] if label.ndim == 3 and label.shape[2] > 1 else None
            make_targets(instances, self.target_spec, out=label_out[:, :, :n_targets], classes=classes)
            label_out[:, :, n_targets] = instances
            return
        if spec.check_labels and label.size:
            top = int(label.max())
            if top >= spec.number_classes or (label.dtype.kind == "i" and int(label.min()) < 0):
                raise LabelValueError(f"label values must be in [0, number_classes={spec.number_classes}); got "
                                 f"{top if top >= spec.number_classes else int(label.min())} in record {record} of "
                                 f"{spec.database}. Rebuild the database or pass the right number_classes")
        np.copyto(label_out, label, casting="unsafe")


def source_percentile_ranges(database: str, metadata: dict, percentiles: tuple[float, float]) -> tuple:
    """``((offset, scale), ...)`` per source image of ``metadata["sources"]`` for percentile normalisation.

    Read from the percentile tables build_lmdb.py stores (exact for percentiles on
    :data:`lib.common.normalization.PERCENTILE_GRID`); otherwise (older databases, other
    percentiles) computed here from the valid region of every record of each source.
    """
    sources = metadata.get("sources") or []
    grid = metadata.get("percentile_grid")
    tiles = metadata.get("tiles") or {}
    record_source = list(tiles.get("source") or [])
    ranges: list = [None] * max(len(sources), max(record_source, default=-1) + 1)
    missing = set(record_source)
    if grid:
        for i, source in enumerate(sources):
            table = source.get("percentiles")
            values = None if table is None else norm.from_table(table, grid, percentiles)
            if values is not None:
                ranges[i] = tuple(tuple(float(v) for v in a) for a in norm.percentile_offset_scale(*values))
                missing.discard(i)
    if missing:
        pixels: dict[int, list[np.ndarray]] = {i: [] for i in missing}
        with LmdbReader(database) as db:
            for record, source in enumerate(record_source):
                if source in pixels:
                    image, _ = db[record]
                    vh = tiles["valid_h"][record] if "valid_h" in tiles else image.shape[0]
                    vw = tiles["valid_w"][record] if "valid_w" in tiles else image.shape[1]
                    # a copy: the record is a view of LMDB's memory map, gone when the reader closes
                    pixels[source].append(np.array(image[:vh, :vw]).reshape(-1, image.shape[2]))
        for source, parts in pixels.items():
            low, high = norm.image_percentiles(np.concatenate(parts)[:, np.newaxis, :], percentiles)
            ranges[source] = tuple(tuple(float(v) for v in a) for a in norm.percentile_offset_scale(low, high))
    return tuple(ranges)
