"""Building the train/test LMDB databases from image and mask folders.

The build runs in three steps:

1. pairing by key and a header check of every file (no pixels decoded), so that layout problems are reported
   in seconds;
2. a split of the source images (seeded), a k-fold assignment of the training images and the tile grid of
   every image, all known before any pixel is read;
3. one pass over the pairs in a process pool: each worker decodes a pair, checks its values, cuts its tiles
   and writes them straight into the database of its split (LMDB serialises the writers).

Everything is written in a hidden folder beside the outputs, renamed into place only when complete; any
problem, exception or signal removes it: a killed build never leaves a database that looks valid.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import datetime
import math
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from .. import __version__
from ..common.errors import OutputError
from ..common.files import is_inside, write_with
from ..common.settings import ConfigError, from_dict
from . import instance_classes, mask_checks
from .images import (
    DatasetError,
    ImageReadError,
    Pair,
    PairCheck,
    check_mask_values,
    check_pair_headers,
    cross_check,
    list_images,
    pair_images_masks,
    read_image,
)
from .intensity_stats import PERCENTILE_GRID, moments, percentile_table
from .lmdb_store import FILE_MODE, FORMAT_VERSION, HEADER, LmdbWriter, encode_record, record_key
from .tiling import pad_to, tile_grid
from .user_split import check_test_folders, pairs_of_test_folders, resolved_train_fraction, user_split


def default_workers() -> int:
    """Processes of a build unless told otherwise: one per core, at most 8 (disk-bound beyond)."""
    return min(os.cpu_count() or 1, 8)


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    """Settings of a database build; ``build_lmdb.py`` maps its flags onto these, defaults included."""

    image_folder: str
    mask_folder: str
    output_folder: str
    dataset_name: str
    train_fraction: float | None = None  # None: 0.8, or 1 with test folders (lib.store.user_split)
    image_format: str | None = None
    use_tiling: bool = True
    tile_size: int = 256
    stride: int | None = None  # None: equal to tile_size (no overlap)
    mask_suffix: str | None = None
    number_classes: int | None = None
    mask_type: str = "semantic"
    seed: int = 0
    folds: int = 0
    workers: int = dataclasses.field(default_factory=default_workers)  # 0: in this process
    overwrite: bool = False
    test_image_folder: str | None = None  # the user's test set (all of it becomes the test database)
    test_mask_folder: str | None = None
    class_mask_folder: str | None = None  # a class per instance (lib.store.instance_classes)

    def __post_init__(self) -> None:
        object.__setattr__(self, "train_fraction", resolved_train_fraction(self.train_fraction,
                                                                           self.test_image_folder))

    @property
    def effective_stride(self) -> int:
        return self.tile_size if self.stride is None else self.stride

    def validate(self) -> "BuildConfig":
        """Return self, or raise ``ConfigError`` listing every invalid field."""
        v = []
        if not Path(self.image_folder).is_dir():
            v.append(f"image_folder must be an existing folder; got {self.image_folder!r}")
        if not Path(self.mask_folder).is_dir():
            v.append(f"mask_folder must be an existing folder; got {self.mask_folder!r}")
        out = Path(self.output_folder)
        if out.exists() and not out.is_dir():
            v.append(f"output_folder must be a folder; got {self.output_folder!r}, which is a file")
        if not self.dataset_name or any(c in self.dataset_name for c in "/\\\0") or self.dataset_name.startswith("."):
            v.append(f"dataset_name must be a plain file-name part (no '/', not starting with '.'); "
                     f"got {self.dataset_name!r}")
        v += check_test_folders(self) + instance_classes.config_problems(self)
        if self.tile_size < 1:
            v.append(f"tile_size must be a positive number of pixels; got {self.tile_size}")
        if self.stride is not None and not 1 <= self.stride <= max(self.tile_size, 1):
            v.append(f"stride must be in [1, tile_size={self.tile_size}] so that tiles cover each image; "
                     f"got {self.stride}")
        if self.number_classes is not None and self.number_classes < 2:
            v.append(f"number_classes must be >= 2 (background and at least one class); got {self.number_classes}")
        if self.mask_type not in ("semantic", "instance"):
            v.append(f"mask_type must be 'semantic' or 'instance'; got {self.mask_type!r}")
        if self.folds < 0 or self.folds == 1:
            v.append(f"folds must be 0 (no k-fold assignment) or >= 2; got {self.folds}")
        # Into an input folder, a database could sit among (and be paired with) the inputs; a parent
        # of the inputs (--output_folder . beside images/ and masks/) is fine: the build writes only
        # train-/test-NAME.lmdb and split-NAME.csv there.
        for name in ("image_folder", "mask_folder"):
            folder = getattr(self, name)
            if Path(folder).is_dir() and is_inside(out, folder):
                v.append(f"output_folder must not be or lie inside {name}; got {self.output_folder!r} in "
                         f"{folder!r}; choose a new folder")
        if self.workers < 0:
            v.append(f"workers must be >= 0 (0 = in this process); got {self.workers}")
        if v:
            raise ConfigError(v)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "BuildConfig":
        return from_dict(cls, values)


class BuildTerminated(KeyboardInterrupt):
    """SIGTERM during a build: nothing published, the CLI exits 3 (a KeyboardInterrupt: never swallowed)."""


class OutputExistsError(OutputError, FileExistsError):
    """An output database or split file exists and ``overwrite`` is false (exit 2, nothing written)."""


TMP_PREFIX = ".building-"
SMALL_BUILD_BYTES = 32 << 20  # below this many bytes of records, decode in this process
PAGE = 4096


@dataclasses.dataclass
class BuildResult:
    """What a build wrote."""

    databases: dict[str, Path]  # split -> database folder
    split_csv: Path
    n_records: dict[str, int]
    n_images: dict[str, int]
    seconds: float
    input_bytes: int
    warnings: list[str]


@dataclasses.dataclass(frozen=True)
class _Job:
    """Everything a worker needs to process one pair."""

    index: int
    pair: Pair
    split: str  # "train" | "test" | "" (validate only)
    first_record: int
    grid: tuple[tuple[int, int], ...]
    tile_h: int
    tile_w: int


# Worker side. Module-level state is set by the pool initializer, once per worker.
_WORKER: dict[str, Any] = {}


def _init_worker(db_paths: dict[str, str], map_size: dict[str, int], settings: dict[str, Any]) -> None:
    import lmdb

    _die_with_parent(settings.get("parent_pid"))  # set for pool workers only
    # A build interrupted by the user is cleaned up by the parent; workers just stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _WORKER["settings"] = settings
    # No writemap: on a fresh file its page faults cost more than LMDB's write() at commit.
    _WORKER["envs"] = {split: lmdb.open(path, map_size=map_size[split], subdir=True, sync=False, metasync=False,
                                        mode=FILE_MODE) for split, path in db_paths.items()}


def _die_with_parent(parent_pid: int | None) -> None:
    """End this worker when the build's process dies, even by SIGKILL (no orphan holds the database).

    Linux: the kernel sends SIGKILL on the parent's death (``PR_SET_PDEATHSIG``). Elsewhere a
    daemon thread watches the parent's pid. Either way a parent already gone ends the worker now.
    """
    if parent_pid is None:
        return
    armed = False
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(1, signal.SIGKILL, 0, 0, 0) == 0  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            armed = False
    start_parent = os.getppid()
    if not _pid_alive(parent_pid) or (start_parent == 1 and parent_pid != 1):
        os._exit(1)
    if not armed:
        def _watch() -> None:
            while _pid_alive(parent_pid) and os.getppid() == start_parent:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=_watch, name="parent-watch", daemon=True).start()


def _close_worker_envs() -> None:
    for env in _WORKER.get("envs", {}).values():
        env.close()
    _WORKER.clear()


def _process(job: _Job) -> dict[str, Any]:
    """Decode, check, tile and (unless validating only) write one pair. Returns statistics."""
    s = _WORKER["settings"]
    out: dict[str, Any] = {"index": job.index, "problems": [], "input_bytes": 0}
    try:
        image = read_image(job.pair.image)
    except ImageReadError as exc:
        out["problems"].append(f"unreadable image: {exc}")
        image = None
    try:
        mask, classes = instance_classes.read_labels(job.pair, s)
    except ImageReadError as exc:
        out["problems"].append(f"unreadable or invalid mask: {exc}")
        mask = None
    if image is not None and image.dtype.kind == "f":
        out["problems"] += mask_checks.non_finite(image, job.pair.image)
    counts = None
    if mask is not None:
        top = int(mask.max()) if mask.size else 0
        out["problems"] += check_mask_values(mask, job.pair.mask, s["number_classes"], s["mask_type"], top)
        out["problems"] += instance_classes.check(mask, classes, job.pair.mask, s["label_dtype"], out)
        if top > np.iinfo(s["label_dtype"]).max:
            out["problems"].append(f"mask values must fit in {s['label_dtype']}; got {top} in {job.pair.mask}")
        elif s["mask_type"] == "semantic":
            # One count of every value: the class statistics and the plausibility checks share it.
            counts = np.bincount(mask.ravel(), minlength=s["n_classes"])
            if s["number_classes"] is None:
                stray = mask_checks.stray_values(counts, job.pair.mask)
                out["problems"] += stray
                if not stray:  # a mask already named for its stray values does not count twice
                    out["value_counts"] = counts
                    out["object_like"] = mask_checks.object_like(mask, counts)
            else:  # classes stated: object ids are only warned about (mask_checks.object_id_warnings)
                out["object_like"] = mask_checks.object_like(mask, counts)
    if image is not None and mask is not None and image.shape[:2] != mask.shape:
        out["problems"].append(f"image and mask sizes differ: {job.pair.image} is {image.shape[0]}x{image.shape[1]}"
                               f" (HxW), {job.pair.mask} is {mask.shape[0]}x{mask.shape[1]}")
    if out["problems"] or not job.split:
        return out
    out["input_bytes"] = image.nbytes + mask.nbytes
    label = instance_classes.stack(mask.astype(s["label_dtype"], copy=False), mask, classes)
    n_classes = s["n_classes"]
    height, width = mask.shape
    # Statistics over the image itself (tiles overlap; the image does not).
    out["stats"] = moments(image)
    out["percentiles"] = percentile_table(image)
    semantic_view = label if s["mask_type"] == "semantic" else (mask > 0).astype(np.uint8)
    out["class_counts"] = (counts if counts is not None
                           else np.bincount(semantic_view.ravel(), minlength=n_classes)).tolist()
    image_p = pad_to(image, job.tile_h, job.tile_w, "reflect")
    label_p = pad_to(label, job.tile_h, job.tile_w, "zero")
    tiles, records = [], []
    for y, x in job.grid:
        valid_h, valid_w = min(job.tile_h, height - y), min(job.tile_w, width - x)
        present = np.bincount(semantic_view[y:y + valid_h, x:x + valid_w].ravel(), minlength=n_classes)
        tiles.append((y, x, valid_h, valid_w, np.flatnonzero(present).tolist()))
        records.append(encode_record(image_p[y:y + job.tile_h, x:x + job.tile_w],
                                     label_p[y:y + job.tile_h, x:x + job.tile_w]))
    # The write lock is shared by all workers: hold it only for the copies into LMDB.
    with _WORKER["envs"][job.split].begin(write=True) as txn:
        for i, record in enumerate(records):
            txn.put(record_key(job.first_record + i), record)
    out["tiles"] = tiles
    return out


# Main side


def _stale_cleanup(output: Path) -> None:
    """Remove temporary build folders left by builds that were killed (their process is gone)."""
    for entry in output.glob(TMP_PREFIX + "*"):
        pid = entry.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


def _split(keys: list[str], train_fraction: float, seed: int, folds: int) -> tuple[dict[str, str], dict[str, int]]:
    """Seeded split of source images by key, and a k-fold assignment of the training images.

    Returns ``(split, fold)``: split[key] in {"train", "test"}; fold[key] in 0..K-1 for
    training images when ``folds`` >= 2 (K = min(folds, number of training images)), else -1.
    """
    rng = np.random.default_rng(seed)
    order = [keys[i] for i in rng.permutation(len(keys))]
    n_train = int(round(train_fraction * len(keys)))
    if train_fraction < 1.0 and len(keys) >= 2:
        n_train = min(max(n_train, 1), len(keys) - 1)
    split = {k: ("train" if i < n_train else "test") for i, k in enumerate(order)}
    fold = {k: -1 for k in keys}
    train_keys = order[:n_train]
    n_folds = min(folds, len(train_keys)) if folds >= 2 else 0
    if n_folds >= 2:
        fold_order = [train_keys[i] for i in np.random.default_rng([seed, 1]).permutation(len(train_keys))]
        for i, k in enumerate(fold_order):
            fold[k] = i % n_folds
    return split, fold


def _label_dtype(mask_dtypes: list[str], mask_type: str, number_classes: int | None) -> np.dtype:
    if mask_type == "semantic" and number_classes is not None:
        return np.dtype(np.uint8 if number_classes <= 256 else np.uint16)
    widest = max((np.dtype(d).itemsize for d in mask_dtypes), default=1)
    if widest <= 1:
        return np.dtype(np.uint8)
    if widest == 2 or mask_type == "semantic":
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


def _map_size(jobs: list[_Job], record_bytes: dict[int, int]) -> int:
    # Each value lives in its own overflow pages; add room for the B-tree, metadata and slack.
    pages = sum(len(j.grid) * (math.ceil((record_bytes[j.index] + 64) / PAGE) + 1) for j in jobs)
    return int(pages * PAGE * 1.25) + (64 << 20)


def _run_jobs(jobs: list[_Job], workers: int, db_paths: dict[str, str], map_sizes: dict[str, int],
              settings: dict[str, Any], progress: bool) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    bar = tqdm(total=len(jobs), unit="image", desc="building" if db_paths else "checking", disable=not progress,
               file=sys.stderr, mininterval=0.5)
    try:
        if workers <= 1 or len(jobs) <= 1:
            sigint, sigterm = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
            _init_worker(db_paths, map_sizes, settings)
            signal.signal(signal.SIGINT, sigint)
            signal.signal(signal.SIGTERM, sigterm)
            try:
                for job in jobs:
                    results.append(_process(job))
                    bar.update()
            finally:
                _close_worker_envs()
        else:
            # fork is cheap and build_lmdb loads neither TensorFlow nor OpenCV, whose threads can
            # deadlock a forked child; a caller that has them loaded gets forkserver.
            method = "forkserver" if {"tensorflow", "cv2"} & set(sys.modules) else "fork"
            ctx = multiprocessing.get_context(method)
            # An executor, not multiprocessing.Pool: a worker that dies (out of memory, killed)
            # raises BrokenProcessPool here instead of leaving the build waiting for ever.
            settings = {**settings, "parent_pid": os.getpid()}
            with concurrent.futures.ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx,
                                                        initializer=_init_worker,
                                                        initargs=(db_paths, map_sizes, settings)) as pool:
                try:
                    for future in concurrent.futures.as_completed([pool.submit(_process, job) for job in jobs]):
                        results.append(future.result())
                        bar.update()
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
    finally:
        bar.close()
    results.sort(key=lambda r: r["index"])
    return results


@dataclasses.dataclass
class _Plan:
    """Everything decided before any pixel is read: pairs, split, folds, tile grids, dtypes."""

    config: BuildConfig
    pairs: list[Pair]
    checks: list[PairCheck]
    split: dict[str, str]  # key -> "train" | "test"
    fold: dict[str, int]  # key -> 0..K-1 for training images with folds, else -1
    jobs: list[_Job]
    record_bytes: dict[int, int]  # job index -> bytes of one of its records
    n_records: dict[str, int]  # split -> records
    settings: dict[str, Any]  # what workers need: mask_type, number_classes, label_dtype, n_classes
    command: str
    created: str  # ISO 8601 time of the build

    @property
    def splits(self) -> list[str]:
        return [s for s in ("train", "test") if self.n_records[s] > 0]

    @property
    def channels(self) -> int:
        return self.checks[0].image_shape[2]

    @property
    def n_folds(self) -> int:
        return max(self.fold.values()) + 1 if self.fold and max(self.fold.values()) >= 0 else 0


def _size_warnings(config: BuildConfig, checks: list[PairCheck]) -> list[str]:
    """Warnings about images smaller than the tile (they are padded)."""
    if not config.use_tiling or not checks:
        return []
    small = [c.key for c in checks if min(c.image_shape[:2]) < config.tile_size]
    if len(small) == len(checks):
        return [f"tile_size {config.tile_size} is larger than every image (largest "
                f"{max(max(c.image_shape[:2]) for c in checks)} px); all tiles will be padded. "
                "A smaller --tile_size stores less padding"]
    if small:
        return [f"{len(small)} image(s) are smaller than tile_size {config.tile_size} along an axis and "
                f"are padded (reflection for the image, background for the mask): "
                f"{', '.join(small[:10])}{' ...' if len(small) > 10 else ''}"]
    return []


def _check_dataset(config: BuildConfig, progress: bool,
                   log: Callable[[str], None]) -> tuple[list[Pair], list[PairCheck], list[str], dict[str, Any]]:
    """Step 1: pair by key and check every header. Returns ``(pairs, checks, warnings, settings)``.

    Raises :class:`DatasetError` listing every problem; the pairs whose headers are fine are
    then decoded too (without writing), so that the report is complete.
    """
    images, problems = list_images(config.image_folder, config.image_format)
    masks, mask_problems = list_images(config.mask_folder)
    problems += mask_problems
    if not images:
        fmt = f" with format {config.image_format!r}" if config.image_format else ""
        problems.append(f"image_folder must hold images{fmt} (.tif, .tiff, .png, .jpg, .bmp); found none in "
                        f"{config.image_folder}")
    pairs, pair_problems = pair_images_masks(images, masks, config.mask_suffix)
    test_pairs, test_problems = pairs_of_test_folders(config, pairs)
    pairs += test_pairs
    problems += pair_problems + test_problems
    checks = [check_pair_headers(p) for p in pairs]
    for c in checks:
        problems += c.problems
    problems += cross_check(checks)
    warnings = _size_warnings(config, [c for c in checks if c.image_shape is not None and c.mask_shape is not None])
    for w in warnings:
        log(f"warning: {w}")
    label_dtype = _label_dtype([c.mask_dtype for c in checks if c.mask_dtype], config.mask_type,
                               config.number_classes)
    # None: the number of classes is learnt from the masks (largest value + 1).
    n_classes = 2 if config.mask_type == "instance" else config.number_classes
    settings = {"mask_type": config.mask_type, "number_classes": config.number_classes,
                "label_dtype": label_dtype, "n_classes": n_classes or 0}
    problems += instance_classes.prepare(config, pairs, settings)
    if problems:
        jobs = [_Job(i, p, "", 0, (), 0, 0) for i, (p, c) in enumerate(zip(pairs, checks)) if not c.problems]
        results = _run_jobs(jobs, config.workers, {}, {}, settings, progress)
        for r in results:
            problems += r["problems"]
        problems += _value_problems([pairs[j.index] for j in jobs], results)
        raise DatasetError(problems)
    return pairs, checks, warnings, settings


def _value_problems(pairs: list[Pair], results: list[dict[str, Any]]) -> list[str]:
    """Dataset-wide plausibility of the mask values (semantic builds without --number_classes)."""
    rows = [(p.mask, r["value_counts"], r["object_like"]) for p, r in zip(pairs, results) if "value_counts" in r]
    if not rows:
        return []
    return mask_checks.dataset_problems(*map(list, zip(*rows)))


def _make_plan(config: BuildConfig, pairs: list[Pair], checks: list[PairCheck], settings: dict[str, Any],
               command: str) -> _Plan:
    """Step 2: the seeded split, the folds and the tile grid (hence record numbers) of every image."""
    split, fold = _split([p.key for p in pairs], config.train_fraction, config.seed, config.folds)
    if config.test_image_folder is not None:
        test = Path(config.test_image_folder).resolve()
        split = user_split([p.key for p in pairs], {p.key for p in pairs if p.image.parent.resolve() == test})
        _, fold = _split([k for k in split if split[k] == "train"], 1.0, config.seed, config.folds)
        fold = {k: fold.get(k, -1) for k in split}
    jobs, next_record, record_bytes = [], {"train": 0, "test": 0}, {}
    pixel_bytes = checks[0].image_shape[2] * np.dtype(checks[0].image_dtype).itemsize \
        + settings["label_dtype"].itemsize * instance_classes.label_channels(settings)
    for i, (pair, check) in enumerate(zip(pairs, checks)):
        h, w = check.image_shape[:2]
        if config.use_tiling:
            tile_h = tile_w = config.tile_size
            grid = tuple(tile_grid(h, w, config.tile_size, config.effective_stride))
        else:
            tile_h, tile_w, grid = h, w, ((0, 0),)
        s = split[pair.key]
        jobs.append(_Job(i, pair, s, next_record[s], grid, tile_h, tile_w))
        next_record[s] += len(grid)
        record_bytes[i] = HEADER.size + tile_h * tile_w * pixel_bytes
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return _Plan(config, pairs, checks, split, fold, jobs, record_bytes, next_record, settings, command, created)


def _output_paths(config: BuildConfig) -> tuple[dict[str, Path], Path]:
    """``({split: database folder}, split CSV)`` of a build."""
    output, name = Path(config.output_folder), config.dataset_name
    return {s: output / f"{s}-{name}.lmdb" for s in ("train", "test")}, output / f"split-{name}.csv"


def build_databases(config: BuildConfig, command: str = "", progress: bool = True,
                    log: Callable[[str], None] = print) -> BuildResult:
    """Validate the dataset of ``config`` and write ``train-NAME.lmdb`` / ``test-NAME.lmdb``.

    ``command``: the command line recorded in the metadata; ``progress``: a progress bar on
    stderr; ``log``: where warnings and notes go (one line each).

    Raises ``ConfigError`` for invalid settings, ``DatasetError`` listing every problem of the
    input folders (nothing is written then), :class:`OutputExistsError` (a ``FileExistsError``)
    when an output exists and ``config.overwrite`` is false. All three exit 2 in a CLI.
    """
    start = time.perf_counter()
    config.validate()
    finals, split_csv = _output_paths(config)
    existing = [p for p in (*finals.values(), split_csv) if p.exists()]
    if existing and not config.overwrite:
        raise OutputExistsError(f"output must not exist; found {', '.join(str(p) for p in existing)}. "
                                "Pass --overwrite to replace it, or choose another --output_folder/--dataset_name")
    pairs, checks, warnings, settings = _check_dataset(config, progress, log)
    plan = _make_plan(config, pairs, checks, settings, command)
    if "test" not in plan.splits:
        log("note: train_fraction 1.0 leaves no test images; no test database is written")
    results = _write_outputs(plan, finals, split_csv, progress)
    for w in mask_checks.object_id_warnings([p.mask for p in plan.pairs], results, config.number_classes):
        log(f"warning: {w}")
        warnings.append(w)
    return BuildResult(databases={s: finals[s] for s in plan.splits}, split_csv=split_csv,
                       n_records={s: plan.n_records[s] for s in plan.splits},
                       n_images={s: sum(1 for j in plan.jobs if j.split == s) for s in plan.splits},
                       seconds=time.perf_counter() - start,
                       input_bytes=sum(r["input_bytes"] for r in results), warnings=warnings)


def _write_outputs(plan: _Plan, finals: dict[str, Path], split_csv: Path, progress: bool) -> list[dict[str, Any]]:
    """Step 3: write everything into a hidden folder beside the outputs, then rename into place.

    Any problem, exception or SIGTERM removes the folder, so a database that looks valid at
    an output path is always complete. Returns the workers' results in job order.
    """
    output = split_csv.parent
    output.mkdir(parents=True, exist_ok=True)
    _stale_cleanup(output)
    tmp = output / f"{TMP_PREFIX}{plan.config.dataset_name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    previous_term = signal.getsignal(signal.SIGTERM)
    in_main_thread = threading.current_thread() is threading.main_thread()

    def _on_term(signum, frame):
        raise BuildTerminated(f"signal {signum}")

    try:
        if in_main_thread:
            signal.signal(signal.SIGTERM, _on_term)
        results = _fill_databases(plan, {s: tmp / finals[s].name for s in plan.splits}, progress)
        write_with(tmp / split_csv.name, lambda path: _write_split_csv(path, plan))
        # Publish: replace old outputs only now that the new ones are complete.
        trash = tmp / ".old"
        trash.mkdir()
        for final in (*[finals[s] for s in plan.splits], split_csv):
            if final.exists():
                os.replace(final, trash / final.name)
            os.replace(tmp / final.name, final)
        for s in ("train", "test"):
            if s not in plan.splits and finals[s].exists():  # a stale database from an older build
                os.replace(finals[s], trash / finals[s].name)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_term)
        shutil.rmtree(tmp, ignore_errors=True)
    return results


def _fill_databases(plan: _Plan, databases: dict[str, Path], progress: bool) -> list[dict[str, Any]]:
    """Create the databases at ``databases`` (split -> folder), write every record, then the metadata."""
    db_paths = {s: str(path) for s, path in databases.items()}
    map_sizes = {s: _map_size([j for j in plan.jobs if j.split == s], plan.record_bytes) for s in plan.splits}
    for s in plan.splits:
        # Create the environments here so workers only open them.
        LmdbWriter(db_paths[s], map_size=map_sizes[s]).close()
    # A pool pays for its start-up only when there is enough to decode.
    total = sum(len(j.grid) * plan.record_bytes[j.index] for j in plan.jobs)
    workers = plan.config.workers if total >= SMALL_BUILD_BYTES else 0
    results = _run_jobs(plan.jobs, workers, db_paths, map_sizes, plan.settings, progress)
    problems = [p for r in results for p in r["problems"]]
    problems += _value_problems(plan.pairs, results)
    if problems:
        raise DatasetError(problems)
    # Largest value seen in any mask + 1 when not given, the same for both databases.
    n_classes = plan.settings["n_classes"] or max([2] + [len(r["class_counts"]) for r in results])
    for s in plan.splits:
        metadata = _metadata(plan, s, results, n_classes)
        with LmdbWriter(db_paths[s], map_size=map_sizes[s]) as writer:
            writer.put_metadata(metadata)
    return results


def _metadata(plan: _Plan, split: str, results: list[dict[str, Any]], n_classes: int) -> dict[str, Any]:
    """The metadata record of the ``split`` database (:data:`lib.store.lmdb_store.METADATA_KEYS`)."""
    config, channels = plan.config, plan.channels
    # Pool per-image (n, mean, M2) into dataset statistics (Chan et al.'s parallel variance).
    n_total, mean, m2 = 0, np.zeros(channels), np.zeros(channels)
    class_counts = np.zeros(n_classes, dtype=np.int64)  # workers' counts may be shorter: pad
    class_tiles: list[list[int]] = [[] for _ in range(n_classes)]
    tiles: dict[str, list[int]] = {"source": [], "y": [], "x": [], "valid_h": [], "valid_w": []}
    for job, r in zip(plan.jobs, results):
        if job.split != split:
            continue
        n, m, s2 = r["stats"]
        m, s2 = np.asarray(m), np.asarray(s2)
        delta = m - mean
        total = n_total + n
        mean = mean + delta * n / total
        m2 = m2 + s2 + delta ** 2 * n_total * n / total
        n_total = total
        counts = np.asarray(r["class_counts"], dtype=np.int64)
        class_counts[:len(counts)] += counts
        for i, (y, x, vh, vw, present) in enumerate(r["tiles"]):
            index = job.first_record + i
            for c in present:
                class_tiles[c].append(index)
            tiles["source"].append(job.index)
            tiles["y"].append(y)
            tiles["x"].append(x)
            tiles["valid_h"].append(vh)
            tiles["valid_w"].append(vw)
    std = np.sqrt(m2 / max(n_total, 1))
    for c in class_tiles:
        c.sort()
    table = {job.index: r.get("percentiles") for job, r in zip(plan.jobs, results)}
    sources = [{"key": p.key, "image": str(p.image.resolve()), "mask": str(p.mask.resolve()),
                "height": c.image_shape[0], "width": c.image_shape[1], "split": plan.split[p.key],
                "fold": plan.fold[p.key], "percentiles": table.get(i)}
               for i, (p, c) in enumerate(zip(plan.pairs, plan.checks))]
    return {
        "format_version": FORMAT_VERSION,
        "dataset_name": config.dataset_name,
        "split": split,
        "n_records": len(tiles["source"]),
        "tile_size": config.tile_size if config.use_tiling else None,
        "stride": config.effective_stride if config.use_tiling else None,
        "channels": channels,
        "image_dtype": plan.checks[0].image_dtype,
        "label_dtype": plan.settings["label_dtype"].name,
        "label_kind": config.mask_type,
        "number_classes": n_classes,
        "class_pixel_counts": class_counts.tolist(),
        "class_tiles": class_tiles,
        "channel_mean": mean.tolist(),
        "channel_std": std.tolist(),
        "sources": sources,
        "percentile_grid": list(PERCENTILE_GRID),
        "tiles": tiles,
        "folds": plan.n_folds,
        "build_command": plan.command,
        "build_config": config.to_dict(),
        "created": plan.created,
        "toolkit_version": __version__, **instance_classes.metadata(plan.settings, results),
    }


def _write_split_csv(path: Path, plan: _Plan) -> None:
    """One row per source image: where it went (split, fold) and which records hold it."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["key", "image", "mask", "height", "width", "channels", "split", "fold", "n_tiles",
                         "first_record"])
        for pair, check, job in zip(plan.pairs, plan.checks, plan.jobs):
            writer.writerow([pair.key, pair.image, pair.mask, check.image_shape[0], check.image_shape[1],
                             check.image_shape[2], plan.split[pair.key], plan.fold[pair.key], len(job.grid),
                             job.first_record])
