"""Multiprocess training and test readers over an LMDB database, feeding batches through shared memory.

    with ImageReader("db/train-cells.lmdb", batch_size=8, reader_count=4, seed=1) as reader:
        for batch in reader.epoch():        # batch.images (B, h, w, C) float32, batch.labels (B, h, w) uint8
            loss = train_step(batch.images, batch.labels)
        print(reader.input_stats())          # how much of the time the consumer waited for data

Design (see ARCHITECTURE.md, "Reader batch"):

* ``reader_count`` worker processes each open the database themselves and make batches
  (:class:`lib.reader.batches.BatchProducer`: sample, crop, augment, targets, normalise), writing **whole batches** into a ring of slots in one
  ``multiprocessing.shared_memory`` segment. Only ``(slot, batch index)`` messages cross the
  pipes; the consumer reads numpy views of the slot and hands the slot back when it asks for
  the next batch. Each worker owns its own slots, so batches can be delivered in a fixed
  order (batch ``j`` comes from worker ``j % reader_count``) without deadlock.
* Randomness: worker ``w`` draws from ``SeedSequence([seed, w, epoch])`` (:mod:`lib.reader.batches`),
  so a run resumed at ``start_epoch`` repeats the batches of an uninterrupted one.
* The test reader (``mode="test"``) visits every record exactly once per pass, in record
  order, in batches of ``batch_size`` (the last may be short), whatever the worker count.
* Starvation monitor: when the consumer has to wait for a batch the log says
  ``Input Queue Starvation`` (once), and ``Input Queue Starvation Over`` once half a ring's
  worth of batches (at least 2) in a row was ready on time; :meth:`ImageReader.input_stats` gives the
  fraction of time spent waiting (the trainer's "input-bound %").
* Lifecycle: a context manager. Every wait has a timeout and watches the workers' process
  sentinels, so a worker that raises or is killed surfaces in the consumer within a second;
  on any exit the workers are stopped (terminated, then killed, if they do not stop), and the
  shared memory is unlinked. ``reader_count=0`` does all the work in the calling process.

Nothing here imports TensorFlow except :func:`as_tf_dataset`.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import time
import traceback
import weakref
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..common.errors import BadInput, ToolkitError
from ..common.normalization import DEFAULT_PERCENTILES, percentile_problems
from ..store.images import smallest_uint
from ..store.lmdb_store import LmdbReader, StoreError
from .augment import AugmentParams
from .batches import MODES, NORMALIZATIONS, SAMPLINGS, BatchProducer, ReaderSpec, source_percentile_ranges
from .targets import TargetSpec

logger = logging.getLogger(__name__)

START_METHODS = ("fork", "forkserver", "spawn")
STARVATION_MESSAGE = "Input Queue Starvation"
STARVATION_OVER_MESSAGE = "Input Queue Starvation Over"
# How often blocked processes look up from a wait to check stop flags and liveness.
POLL_SECONDS = 0.25
_ALIGN = 64


class ReaderError(RuntimeError):
    """The reader cannot deliver batches: a worker failed or died, or no batch came in time.

    A failure caused by the data or the settings is a :class:`ReaderInputError` (exit 2);
    anything else is a bug or a crash and keeps the worker's traceback as its cause.
    """


class ReaderInputError(ReaderError, BadInput):
    """The reader cannot run on this input: bad labels in a worker, too little shared memory (exit 2)."""


class RemoteTraceback(Exception):
    """The formatted traceback of an exception raised in a reader worker (the ``__cause__``)."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return "\n\nTraceback in the reader worker:\n" + self.text


@dataclasses.dataclass(frozen=True)
class SlotLayout:
    """Byte layout of one ring slot: images, labels and record indices of a batch."""

    batch_size: int
    image_shape: tuple[int, ...]   # (h, w, C)
    label_shape: tuple[int, ...]   # (h, w) or (h, w, L)
    label_dtype: str

    @property
    def image_bytes(self) -> int:
        return _aligned(self.batch_size * math.prod(self.image_shape) * 4)

    @property
    def label_bytes(self) -> int:
        return _aligned(self.batch_size * math.prod(self.label_shape) * np.dtype(self.label_dtype).itemsize)

    @property
    def record_bytes(self) -> int:
        return _aligned(self.batch_size * 8)

    @property
    def slot_bytes(self) -> int:
        return self.image_bytes + self.label_bytes + self.record_bytes

    def views(self, buffer, slot: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(images (B, h, w, C) float32, labels (B, h, w[, L]), records (B,) int64)`` views of a slot."""
        offset = slot * self.slot_bytes
        images = np.ndarray((self.batch_size,) + self.image_shape, np.float32, buffer, offset)
        offset += self.image_bytes
        labels = np.ndarray((self.batch_size,) + self.label_shape, np.dtype(self.label_dtype), buffer, offset)
        offset += self.label_bytes
        records = np.ndarray((self.batch_size,), np.int64, buffer, offset)
        return images, labels, records


def _aligned(nbytes: int) -> int:
    return (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN


# Worker processes


@dataclasses.dataclass(frozen=True)
class WorkerJob:
    """What one worker process is given: its spec and ring, its first batch, and its ends of the pipes.

    ``ready`` sends ``("batch", slot, index, count)`` or ``("error", message, traceback)`` to
    the consumer; ``free`` receives slots handed back (``None``: stop); ``stop`` is the shared
    stop event. Picklable for spawned workers (multiprocessing pickles the pipe ends and the
    event while it starts the process).
    """

    spec: ReaderSpec
    layout: SlotLayout
    worker_id: int
    start: int
    slots: tuple[int, ...]
    shm_name: str
    ready: Any
    free: Any
    stop: Any


def _worker_main(job: WorkerJob) -> None:
    """Body of a worker process: fill free slots with batches until told to stop."""
    spec, layout, ready, free, stop = job.spec, job.layout, job.ready, job.free, job.stop
    # Ctrl-C reaches the whole process group; the consumer decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import cv2

    # One OpenCV thread per worker: the parallelism is the workers themselves.
    cv2.setNumThreads(1)
    shm = producer = None
    parent = multiprocessing.parent_process()
    try:
        shm = shared_memory.SharedMemory(name=job.shm_name)
        producer = BatchProducer(spec, job.worker_id)
        available = collections.deque(job.slots)
        for index in producer.indices(job.start):
            while not available:
                if stop.is_set() or (parent is not None and not parent.is_alive()):
                    return
                if free.poll(POLL_SECONDS):
                    slot = free.recv()
                    if slot is None:
                        return
                    available.append(slot)
            if stop.is_set():
                return
            slot = available.popleft()
            images, labels, records = layout.views(shm.buf, slot)
            count = producer.fill(index, images, labels, records)
            del images, labels, records  # release the buffer exports before the segment closes
            ready.send(("batch", slot, index, count))
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the consumer
        try:
            ready.send(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc(),
                        isinstance(exc, ToolkitError)))
        except (OSError, ValueError):
            pass  # the consumer is gone; nobody is left to tell
        raise SystemExit(1)
    finally:
        if producer is not None:
            producer.close()
        if shm is not None:
            try:
                shm.close()
            except BufferError:
                pass  # views still referenced by the traceback; the process is exiting anyway


# The consumer


@dataclasses.dataclass
class Batch:
    """One batch, as views of a shared-memory slot (valid until the next batch is requested).

    ``images``: ``(n, h, w, C)`` float32, normalised; ``labels``: ``(n, h, w)`` (or ``(n, h, w, L)``)
    in the smallest integer dtype; ``records``: ``(n,)`` int64 database records used. ``n`` is
    the batch size except for the last batch of a test pass. ``index``: global batch number;
    ``epoch``: its epoch (test pass).
    """

    images: np.ndarray
    labels: np.ndarray
    records: np.ndarray
    index: int
    epoch: int
    _release: Any = dataclasses.field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def copy(self) -> "Batch":
        """A batch owning its arrays (no longer tied to the ring)."""
        return Batch(self.images.copy(), self.labels.copy(), self.records.copy(), self.index, self.epoch)

    def release(self) -> None:
        """Hand the slot back to its worker; the views must not be used afterwards."""
        release, self._release = self._release, None
        if release is not None:
            release()


@dataclasses.dataclass(frozen=True)
class InputStats:
    """How the consumer fared since the last reset: ``waiting_fraction`` is the share of wall time
    spent blocked waiting for a batch (the trainer's "input-bound %" is 100 times it)."""

    batches: int
    examples: int
    elapsed_s: float
    wait_s: float
    waiting_fraction: float
    examples_per_s: float
    starved: bool
    starvation_events: int


class _Shutdown:
    """What must be cleaned up, held apart from the reader so a finalizer can run it at GC or exit."""

    def __init__(self):
        self.processes: list = []
        self.connections: list = []
        self.stop = None
        self.free: list = []
        self.shm: shared_memory.SharedMemory | None = None
        self.producer: BatchProducer | None = None

    def __call__(self, timeout: float = 3.0) -> None:
        if self.stop is not None:
            self.stop.set()
        for connection in self.free:
            try:
                connection.send(None)
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + timeout
        for process in self.processes:
            process.join(max(deadline - time.monotonic(), 0.05))
        for process in self.processes:
            if process.is_alive():
                process.terminate()
                process.join(1.0)
            if process.is_alive():
                process.kill()
                process.join(1.0)
        for connection in self.connections:
            connection.close()
        for process in self.processes:
            try:
                process.close()
            except ValueError:
                pass  # a process that refused even SIGKILL; the OS reaps it
        self.processes, self.connections, self.free = [], [], []
        if self.shm is not None:
            shm, self.shm = self.shm, None
            try:
                shm.unlink()
            except FileNotFoundError:
                pass
            try:
                shm.close()
            except BufferError:
                # The caller still holds views of a batch. The name is gone already; drop our
                # handles so the mapping lives exactly as long as those views, and close the fd.
                shm._buf = shm._mmap = None
                shm.close()
        if self.producer is not None:
            self.producer.close()
            self.producer = None


class ImageReader:
    """Batches of augmented, normalised examples from an LMDB database, made by worker processes.

    Parameters
    ----------
    database : path of an LMDB database written by ``build_lmdb.py``
    batch_size : examples per batch
    mode : "train" (random sampling and augmentation, endless) or "test" (every record exactly
        once per pass, in record order, no augmentation; the last batch of a pass may be short)
    patch_shape : (h, w) of the examples; default the stored tile shape. Smaller gives random
        crops (train) or centre crops (test).
    augment_params : AugmentParams, default NIST's; ``AugmentParams.none()`` switches it off
    sampling : "uniform" over records, "balanced" (a class uniformly, then a record holding it,
        from the metadata's ``class_tiles``), or "foreground" (uniform records, crop centres
        weighted by the inverse frequency of their pixel's class)
    normalization : "dataset" (z-score per channel with the metadata's ``channel_mean``/``channel_std``)
        or "tile" (z-score per channel with each augmented patch's own statistics), or "percentile"
        (``(x - low) / (high - low)`` with the low and high ``percentiles`` of the patch's whole source image)
    percentiles : (low, high) for ``normalization="percentile"``, default (1, 99.8)
    reader_count : worker processes; 0 produces batches in the calling process (debugging)
    seed : base seed; worker ``w`` in epoch ``e`` draws from ``SeedSequence([seed, w, e])``
    start_epoch : first epoch (resuming a run repeats the batches of an uninterrupted one)
    batches_per_epoch : default ``max(1, n_records // batch_size)`` (train), a full pass (test)
    records : indices of the records to use (e.g. the tiles of some folds); default all
    slots_per_worker : ring slots each worker owns (>= 2); more absorbs jitter, costs shared memory
    start_method : "forkserver" (default on Linux), "spawn" or "fork"
    timeout : seconds ``get_batch`` waits while the workers are alive but silent before raising
    check_labels : verify each semantic label is below ``number_classes`` (one max per example)
    channel_stats : ``(mean, std)`` per channel for ``normalization="dataset"`` instead of this
        database's own (a test reader normalises with the training statistics)
    targets : for an instance database, ``lib.reader.targets.TargetSpec.to_dict()``: labels become
        ``(h, w, K + 1)`` float32, the K target channels computed after augmentation, then
        the instance ids

    Raises
    ------
    ValueError for invalid arguments (every problem at once); StoreError for a database that
    cannot be read or lacks the metadata needed; ReaderError from ``get_batch`` when a worker
    fails (with its traceback), dies, or stays silent longer than ``timeout``.
    """

    def __init__(self, database: str | os.PathLike, batch_size: int, *, mode: str = "train",
                 patch_shape: Sequence[int] | int | None = None, augment_params: AugmentParams | None = None,
                 sampling: str = "uniform", normalization: str = "dataset", reader_count: int = 1, seed: int = 0,
                 start_epoch: int = 0, batches_per_epoch: int | None = None, slots_per_worker: int = 3,
                 start_method: str | None = None, timeout: float = 120.0, check_labels: bool = True,
                 channel_stats: tuple[Sequence[float], Sequence[float]] | None = None,
                 records: Sequence[int] | None = None, targets: dict | None = None,
                 percentiles: Sequence[float] = DEFAULT_PERCENTILES):
        self.database = Path(database)
        problems = []
        if mode not in MODES:
            problems.append(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
        if sampling not in SAMPLINGS:
            problems.append(f"sampling must be one of {', '.join(SAMPLINGS)}; got {sampling!r}")
        if normalization not in NORMALIZATIONS:
            problems.append(f"normalization must be one of {', '.join(NORMALIZATIONS)}; got {normalization!r}")
        if normalization == "percentile":
            problems += percentile_problems(percentiles)
        for name, value, low in (("batch_size", batch_size, 1), ("reader_count", reader_count, 0),
                                 ("start_epoch", start_epoch, 0), ("slots_per_worker", slots_per_worker, 2)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
                problems.append(f"{name} must be an integer >= {low}; got {value!r}")
        if batches_per_epoch is not None and (not isinstance(batches_per_epoch, (int, np.integer))
                                              or batches_per_epoch < 1):
            problems.append(f"batches_per_epoch must be an integer >= 1 or None; got {batches_per_epoch!r}")
        if start_method is not None and start_method not in multiprocessing.get_all_start_methods():
            problems.append(f"start_method must be one of {', '.join(multiprocessing.get_all_start_methods())}; "
                            f"got {start_method!r}")
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            problems.append(f"timeout must be a positive number of seconds; got {timeout!r}")
        if patch_shape is not None:
            patch_shape = (patch_shape, patch_shape) if isinstance(patch_shape, (int, np.integer)) else patch_shape
            patch_shape = tuple(patch_shape)
            if len(patch_shape) != 2 or not all(isinstance(s, (int, np.integer)) and s >= 1 for s in patch_shape):
                problems.append(f"patch_shape must be two positive integers (h, w); got {patch_shape!r}")
        if problems:
            raise ValueError("Invalid reader settings:\n" + "\n".join(f"  - {p}" for p in problems))

        with LmdbReader(self.database) as db:
            metadata = dict(db.metadata)
            if len(db) == 0:
                raise StoreError(f"database must hold at least one record; got 0 in {self.database}. "
                                 "Check the split (train_fraction) used to build it")
            image0, label0 = db[0]
            image_shape0 = image0.shape
            if label0 is None:
                raise StoreError(f"database must hold labels; record 0 of {self.database} has none")
            label_tail, stored_label_dtype = label0.shape[2:], label0.dtype
            n_records = len(db)
        if records is not None:
            records = tuple(sorted(set(int(r) for r in records)))
            if not records or records[0] < 0 or records[-1] >= n_records:
                raise ValueError(f"records must be a non-empty subset of [0, {n_records}) in {self.database}; got "
                                 f"{len(records)} indices" + (f" from {records[0]} to {records[-1]}" if records else ""))
        n_used = n_records if records is None else len(records)
        patch_shape = tuple(int(s) for s in (patch_shape or image_shape0[:2]))
        channels = int(image_shape0[2])
        label_kind = metadata.get("label_kind", "semantic")
        number_classes = int(metadata.get("number_classes") or 0)
        needed = ["channel_mean", "channel_std"] if normalization == "dataset" else []
        needed += ["class_tiles"] if sampling == "balanced" and mode == "train" else []
        needed += ["number_classes"] if label_kind == "semantic" else []
        missing = [k for k in needed if not metadata.get(k)]
        if missing:
            raise StoreError(f"database metadata must hold {', '.join(missing)} for these settings; missing in "
                             f"{self.database}. Rebuild it with build_lmdb.py")
        if channel_stats is not None:
            mean, std = (tuple(float(v) for v in values) for values in channel_stats)
        else:
            mean = tuple(float(v) for v in metadata.get("channel_mean") or [0.0] * channels)
            std = tuple(float(v) for v in metadata.get("channel_std") or [1.0] * channels)
        if normalization == "dataset" and (len(mean) != channels or len(std) != channels):
            raise StoreError(f"channel_mean and channel_std must have one value per channel ({channels}); got "
                             f"{len(mean)} and {len(std)} in {self.database}. Rebuild the database")
        ranges = None
        if normalization == "percentile":
            ranges = source_percentile_ranges(str(self.database), metadata, tuple(float(p) for p in percentiles))
        if label_kind == "semantic":
            label_dtype = smallest_uint(max(number_classes - 1, 0))
            check = check_labels
        else:
            # Instance ids keep their stored width: their largest value is not recorded.
            label_dtype, check = stored_label_dtype, False
        if targets is not None:
            if label_kind != "instance":
                raise ValueError(f"targets need a database of instance labels (build_lmdb.py --mask_type instance); "
                                 f"got {label_kind!r} labels in {self.database}")
            target_spec = TargetSpec.from_dict(targets).validate()
            label_tail, label_dtype = (len(target_spec.channels) + 1,), np.dtype(np.float32)
            wanted = 2 if target_spec.n_class_planes else 1  # instance ids (and the class of each pixel)
            if (label0.shape[2] if len(label0.shape) == 3 else 1) != wanted:
                raise ValueError(f"targets need {wanted} label channel(s) (instance ids{', classes' * (wanted == 2)}); "
                                 f"got labels of shape {label0.shape} in {self.database}")
        if mode == "test":
            per_epoch = math.ceil(n_used / batch_size)
        else:
            per_epoch = batches_per_epoch or max(1, n_used // batch_size)
        self.spec = ReaderSpec(
            database=str(self.database), mode=mode, batch_size=int(batch_size), patch_shape=patch_shape,
            channels=channels, label_tail=tuple(label_tail), label_dtype=np.dtype(label_dtype).name,
            augment=AugmentParams() if augment_params is None else augment_params,
            sampling=sampling, normalization=normalization, mean=mean, std=std, seed=int(seed),
            reader_count=int(reader_count), batches_per_epoch=int(per_epoch), n_records=n_records, records=records,
            number_classes=number_classes, label_kind=label_kind, check_labels=check,
            targets=None if targets is None else dict(targets), percentile_ranges=ranges)
        self.metadata = metadata
        self.layout = SlotLayout(self.spec.batch_size, patch_shape + (channels,), patch_shape + tuple(label_tail),
                                 self.spec.label_dtype)
        self.slots_per_worker = int(slots_per_worker)
        self.start_method = start_method or ("forkserver" if "forkserver" in multiprocessing.get_all_start_methods()
                                             else "spawn")
        self.timeout = float(timeout)
        self._next = int(start_epoch) * self.spec.batches_per_epoch
        self._start = self._next
        self._shutdown = _Shutdown()
        self._finalizer = weakref.finalize(self, self._shutdown)
        self._ready: dict[int, collections.deque] = {}
        self._ready_conns: list = []
        self._sentinels: dict[int, int] = {}
        self._current: Batch | None = None
        self._buffers: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._started = False
        self._closed = False
        self._shm_name: str | None = None
        self._pids: list[int] = []
        # Starvation monitor
        self._starved = False
        self._starvation_events = 0
        self._delivered = 0
        self._served_without_wait = 0
        self._reset_stats()

    # Properties the trainer and tests use

    @property
    def batch_size(self) -> int:
        return self.spec.batch_size

    @property
    def batches_per_epoch(self) -> int:
        return self.spec.batches_per_epoch

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(h, w, C)`` of one example."""
        return self.layout.image_shape

    @property
    def label_shape(self) -> tuple[int, ...]:
        return self.layout.label_shape

    @property
    def label_dtype(self) -> np.dtype:
        return np.dtype(self.spec.label_dtype)

    @property
    def capacity(self) -> int:
        """Batches the ring holds."""
        return self.spec.workers * self.slots_per_worker

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the workers (kept after close, to check that they are gone)."""
        return list(self._pids)

    @property
    def shm_name(self) -> str | None:
        """Name of the shared-memory segment (kept after close, to check that it was unlinked)."""
        return self._shm_name

    # Lifecycle

    def start(self) -> "ImageReader":
        """Start the workers (called by ``with`` and by the first ``get_batch``)."""
        if self._closed:
            raise ReaderError("the reader must be open to start; got a closed reader. Make a new ImageReader")
        if self._started:
            return self
        self._started = True
        state = self._shutdown
        if self.spec.reader_count == 0:
            state.producer = BatchProducer(self.spec, 0)
            shape = (self.spec.batch_size,)
            self._buffers = (np.empty(shape + self.layout.image_shape, np.float32),
                             np.empty(shape + self.layout.label_shape, self.label_dtype),
                             np.empty(shape, np.int64))
            self._reset_stats()
            return self
        total = self.capacity * self.layout.slot_bytes
        self._check_shared_memory(total)
        context = multiprocessing.get_context(self.start_method)
        if self.start_method == "forkserver":
            # Workers forked from a server that already imported NumPy, OpenCV and LMDB start at once.
            context.set_forkserver_preload(["__main__", __name__])
        state.shm = shared_memory.SharedMemory(create=True, size=total)
        self._shm_name = state.shm.name
        state.stop = context.Event()
        try:
            for worker in range(self.spec.reader_count):
                ready_recv, ready_send = context.Pipe(duplex=False)
                free_recv, free_send = context.Pipe(duplex=False)
                slots = tuple(range(worker * self.slots_per_worker, (worker + 1) * self.slots_per_worker))
                job = WorkerJob(spec=self.spec, layout=self.layout, worker_id=worker, start=self._next, slots=slots,
                                shm_name=state.shm.name, ready=ready_send, free=free_recv, stop=state.stop)
                process = context.Process(target=_worker_main, name=f"ImageReader-{worker}", daemon=True, args=(job,))
                process.start()
                # The worker holds its own ends now; closing ours lets EOF mean "worker gone".
                ready_send.close()
                free_recv.close()
                state.processes.append(process)
                self._pids.append(process.pid)
                state.connections += [ready_recv, free_send]
                state.free.append(free_send)
                self._ready_conns.append(ready_recv)
                self._ready[worker] = collections.deque()
                self._sentinels[process.sentinel] = worker
        except BaseException:
            self.close()
            raise
        self._reset_stats()
        return self

    def _check_shared_memory(self, nbytes: int) -> None:
        if not os.path.isdir("/dev/shm"):
            return
        free = shutil.disk_usage("/dev/shm").free
        if nbytes > free:
            raise ReaderInputError(
                f"shared memory must hold the batch ring ({nbytes / 2**20:.0f} MiB = {self.capacity} slots of "
                f"{self.layout.slot_bytes / 2**20:.1f} MiB); got {free / 2**20:.0f} MiB free in /dev/shm. Lower "
                "batch_size, reader_count or slots_per_worker, or enlarge /dev/shm (docker --shm-size)")

    def close(self) -> None:
        """Stop the workers and unlink the shared memory (idempotent; safe after any failure)."""
        self._closed = True
        self._current = None
        self._buffers = None
        self._ready_conns = []
        self._finalizer()

    def __enter__(self) -> "ImageReader":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    # Consuming

    def get_batch(self, timeout: float | None = None) -> Batch:
        """The next batch, in order. The previous batch's slot is released first.

        Raises ``ReaderError`` when a worker failed (its traceback is the ``__cause__``), died,
        or no batch arrived within ``timeout`` seconds (default: the reader's ``timeout``).
        """
        if not self._started:
            self.start()
        if self._closed:
            raise ReaderError("the reader must be open to deliver batches; got a closed reader")
        if self._current is not None:
            self._current.release()
            self._current = None
        index = self._next
        if self._buffers is not None:
            batch = self._produce_in_process(index)
        else:
            batch = self._receive(index, self.timeout if timeout is None else timeout)
        self._next += 1
        self._delivered += 1
        self._batches += 1
        self._examples += len(batch)
        self._current = batch
        return batch

    def _produce_in_process(self, index: int) -> Batch:
        images, labels, records = self._buffers
        started = time.perf_counter()
        count = self._shutdown.producer.fill(index, images, labels, records)
        self._wait_s += time.perf_counter() - started
        return Batch(images[:count], labels[:count], records[:count], index, self.spec.epoch_of(index))

    def _read_messages(self, worker: int) -> None:
        """Move every message waiting from ``worker`` into its ready queue; raise on its error report."""
        connection = self._ready_conns[worker]
        while True:
            try:
                if not connection.poll():
                    return
                message = connection.recv()
            except (EOFError, OSError):
                return  # the worker closed its end: it exited, which the caller checks next
            if message[0] == "error":
                self.close()
                error = ReaderInputError if len(message) > 3 and message[3] else ReaderError
                raise error(f"reader worker {worker} failed: {message[1]}") from RemoteTraceback(message[2])
            self._ready[worker].append(message)

    def _drain(self, timeout: float) -> None:
        """Read every waiting message (blocking up to ``timeout`` for one); raise if a worker has died."""
        waitables = self._ready_conns + list(self._sentinels)
        woken = multiprocessing.connection.wait(waitables, timeout)
        for worker, connection in enumerate(self._ready_conns):
            if connection in woken:
                self._read_messages(worker)
        for worker, process in enumerate(self._shutdown.processes):
            if process.exitcode is None:
                continue
            # A worker that failed wrote its report just before exiting: read it first.
            self._read_messages(worker)
            code = process.exitcode
            how = f"was killed by signal {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
            hint = " (SIGKILL often means the out-of-memory killer)" if code == -signal.SIGKILL else ""
            pid = process.pid
            self.close()
            raise ReaderError(f"reader worker {worker} (pid {pid}) {how}{hint}; the reader stopped")

    def _receive(self, index: int, timeout: float) -> Batch:
        worker = index % self.spec.workers
        queue = self._ready[worker]
        self._drain(0)
        if not queue:
            self._served_without_wait = 0
            if not self._starved and self._delivered >= self.spec.workers:
                self._starved = True
                self._starvation_events += 1
                logger.warning("%s: waiting for batch %d (reader_count=%d, %d slots); more workers or lighter "
                               "augmentation would help", STARVATION_MESSAGE, index, self.spec.reader_count,
                               self.capacity)
            started = time.perf_counter()
            deadline = time.monotonic() + timeout
            try:
                while not queue:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        alive = sum(p.is_alive() for p in self._shutdown.processes)
                        self.close()
                        raise ReaderError(f"a batch must arrive within timeout={timeout:g} s; got none for batch "
                                          f"{index} with {alive} of {self.spec.reader_count} workers alive. Is "
                                          "the database on a stalled file system?")
                    self._drain(min(remaining, POLL_SECONDS))
            finally:
                self._wait_s += time.perf_counter() - started
        else:
            self._served_without_wait += 1
            # Over only once half a ring's worth of batches in a row was ready on time, so a lucky
            # batch in the middle of a starved stretch does not flip the state back and forth.
            if self._starved and self._served_without_wait >= max(2, self.capacity // 2):
                self._starved = False
                ready_now = sum(len(q) for q in self._ready.values())
                logger.warning("%s: %d batches in a row were ready on time, %d of %d slots ready now",
                               STARVATION_OVER_MESSAGE, self._served_without_wait, ready_now, self.capacity)
        _, slot, produced, count = queue.popleft()
        if produced != index:
            self.close()
            raise ReaderError(f"internal: worker {worker} sent batch {produced} where {index} was due")
        images, labels, records = self.layout.views(self._shutdown.shm.buf, slot)
        free = self._shutdown.free[worker]

        def release() -> None:
            try:
                free.send(slot)
            except (OSError, ValueError):
                pass  # the reader is closing; the slot is no longer needed

        return Batch(images[:count], labels[:count], records[:count], index, self.spec.epoch_of(index), release)

    def epoch(self, copy: bool = False) -> Iterator[Batch]:
        """The batches of the current epoch (train: those left in it; test: one whole pass).

        A test pass abandoned half-way is skipped to its end first, so every pass starts at
        record 0. Each batch's views are valid until the next one is requested; ``copy=True``
        gives batches that own their arrays.
        """
        per_epoch = self.spec.batches_per_epoch
        if self.spec.mode == "test" and self._next % per_epoch:
            while self._next % per_epoch:
                self.get_batch()
        end = (self._next // per_epoch + 1) * per_epoch
        while self._next < end:
            batch = self.get_batch()
            yield batch.copy() if copy else batch

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch()

    # Starvation monitor

    def _reset_stats(self) -> None:
        self._stats_since = time.perf_counter()
        self._wait_s = 0.0
        self._batches = 0
        self._examples = 0
        self._events_at_reset = self._starvation_events

    def input_stats(self, reset: bool = True) -> InputStats:
        """Consumer statistics since the last reset (``reset=True`` starts a new period)."""
        elapsed = max(time.perf_counter() - self._stats_since, 1e-9)
        stats = InputStats(batches=self._batches, examples=self._examples, elapsed_s=elapsed, wait_s=self._wait_s,
                           waiting_fraction=min(self._wait_s / elapsed, 1.0), examples_per_s=self._examples / elapsed,
                           starved=self._starved, starvation_events=self._starvation_events - self._events_at_reset)
        if reset:
            self._reset_stats()
        return stats

    @property
    def waiting_fraction(self) -> float:
        """Share of the time since the last reset that the consumer spent waiting for data."""
        return self.input_stats(reset=False).waiting_fraction


# TensorFlow


def as_tf_dataset(reader: ImageReader):
    """A ``tf.data.Dataset`` over the reader; each iteration of it is one epoch (:meth:`ImageReader.epoch`).

    Elements are ``(images (B, h, w, C) float32, labels (B, h, w[, L]) integer)``; the batch
    axis is ``None`` for a test reader (its last batch may be short). Ready for
    ``strategy.experimental_distribute_dataset``. The arrays are copied out of shared memory:
    TensorFlow may keep a zero-copy reference to a NumPy buffer after the generator moves on,
    and the slot is rewritten as soon as it is released. Iterate it from one thread only.
    """
    import tensorflow as tf

    batch = reader.batch_size if reader.spec.mode == "train" else None
    signature = (tf.TensorSpec((batch,) + tuple(reader.image_shape), tf.float32),
                 tf.TensorSpec((batch,) + tuple(reader.label_shape), tf.as_dtype(reader.label_dtype)))

    def generate():
        for item in reader.epoch():
            yield np.array(item.images), np.array(item.labels)

    return tf.data.Dataset.from_generator(generate, output_signature=signature)
