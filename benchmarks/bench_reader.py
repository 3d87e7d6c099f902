"""Benchmark of lib/reader/imagereader.py against keras.utils.PyDataset: augmented examples per second.

    .venv/bin/python benchmarks/bench_reader.py [--workers 1,2,4] [--batches 150] [--repeats 3]

Data: the NIST phase-contrast images (``../shared/data/nist_phase_contrast``, 256x256 uint16,
one channel) built into a temporary LMDB database with ``lib.store.build`` (256x256 tiles, 80% train).
Both pipelines run the same work per example: read the tile from LMDB, ``lib.reader.augment.augment``
with the default (NIST) parameters, z-score with the database statistics, labels as uint8;
batch 8. Ours: ``ImageReader(reader_count=N)`` (forkserver workers, shared-memory ring).
Off-the-shelf: the same per-example code in ``keras.utils.PyDataset.__getitem__`` with
``workers=N, use_multiprocessing=True``, iterated the way ``Model.fit`` does (Keras'
``PyDatasetAdapter``, an internal class), so batches are pickled back through a process pool.

Timing: the consumer does nothing but take batches; the first ``--warmup`` batches of each
run (process start, first reads) are not timed; then ``--batches`` batches are. Runs of the
two pipelines alternate and each figure is the median of ``--repeats`` runs, because this
machine is shared. ``reader_count=0`` (in-process) gives the cost of one core doing it all.
The last line printed is one JSON object of figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib.reader.augment import AugmentParams, augment
from lib.reader.imagereader import ImageReader
from lib.store.lmdb_store import LmdbReader

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "nist_phase_contrast"
BATCH_SIZE = 8
# NIST's reference reader on this machine (from issue 3), for context only: not re-measured here.
NIST_REFERENCE = {"1": 128.0, "2": 195.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", default=str(DATA), help="folder with images/ and masks/")
    parser.add_argument("--workers", default="1,2,4", help="comma-separated worker counts")
    parser.add_argument("--batches", type=int, default=150, help="timed batches per run")
    parser.add_argument("--warmup", type=int, default=12, help="untimed batches at the start of each run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--skip_pydataset", action="store_true", help="measure ImageReader only (no Keras import)")
    args = parser.parse_args(argv)
    try:
        args.worker_counts = [int(w) for w in args.workers.split(",")]
    except ValueError:
        parser.error(f"--workers must be comma-separated integers; got {args.workers!r}")
    if any(w < 1 for w in args.worker_counts):
        parser.error(f"--workers must be >= 1 each; got {args.workers!r}")
    for name in ("batches", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1; got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0; got {args.warmup}")
    if not (Path(args.data) / "images").is_dir():
        parser.error(f"--data must hold an images/ folder; got {args.data!r}")
    return args


def build_database(data: Path, folder: Path) -> Path:
    from lib.store.build import BuildConfig, build_databases

    config = BuildConfig(image_folder=str(data / "images"), mask_folder=str(data / "masks"),
                         output_folder=str(folder), dataset_name="nist", train_fraction=0.8, tile_size=256)
    build_databases(config, command="bench_reader.py", progress=False, log=lambda line: None)
    return folder / "train-nist.lmdb"


def time_imagereader(database: Path, reader_count: int, batches: int, warmup: int, seed: int) -> float:
    with ImageReader(database, BATCH_SIZE, reader_count=reader_count, seed=seed) as reader:
        for _ in range(warmup):
            reader.get_batch()
        started = time.perf_counter()
        for _ in range(batches):
            reader.get_batch()
        return batches * BATCH_SIZE / (time.perf_counter() - started)


def make_pydataset_class():
    import keras

    class AugmentedPyDataset(keras.utils.PyDataset):
        """The same per-example work as ImageReader, behind Keras' PyDataset."""

        def __init__(self, database: str, n_batches: int, seed: int, **kwargs):
            super().__init__(**kwargs)
            self.database, self.n_batches, self.seed = database, n_batches, seed
            self.db = None
            self.params = AugmentParams()
            with LmdbReader(database) as db:
                self.n_records = len(db)
                self.mean = np.asarray(db.metadata["channel_mean"], np.float32)
                self.inverse_std = 1.0 / np.asarray(db.metadata["channel_std"], np.float32)

        def __len__(self) -> int:
            return self.n_batches

        def __getitem__(self, index: int):
            import cv2

            if self.db is None:
                cv2.setNumThreads(1)  # as in ImageReader's workers: the processes are the parallelism
                self.db = LmdbReader(self.database)
            rng = np.random.default_rng([self.seed, index])
            images = np.empty((BATCH_SIZE, 256, 256, 1), np.float32)
            labels = np.empty((BATCH_SIZE, 256, 256), np.uint8)
            for b in range(BATCH_SIZE):
                image, label = self.db[int(rng.integers(self.n_records))]
                image, label = augment(image, label, rng, self.params)
                np.subtract(image, self.mean, out=images[b])
                images[b] *= self.inverse_std
                labels[b] = label
            return images, labels

    return AugmentedPyDataset


def time_pydataset(dataset_class, database: Path, workers: int, batches: int, warmup: int, seed: int) -> float:
    from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter

    dataset = dataset_class(str(database), batches + warmup, seed, workers=workers, use_multiprocessing=True)
    adapter = PyDatasetAdapter(dataset, shuffle=False)
    iterator = iter(adapter.get_numpy_iterator())
    for _ in range(warmup):
        next(iterator)
    started = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    rate = batches * BATCH_SIZE / (time.perf_counter() - started)
    for _ in iterator:
        pass  # let the adapter finish its epoch and stop its pool
    return rate


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import cv2

    # One OpenCV thread here too: then reader_count=0 measures one core, and the fork-based Keras
    # pool never inherits a half-used OpenCV thread pool (a child doing so can hang for ever).
    cv2.setNumThreads(1)
    logging.basicConfig(level=logging.ERROR)  # starvation is the expected state here: the consumer is idle
    runs: dict[str, dict[str, list[float]]] = {"imagereader": {}, "pydataset": {}}
    with tempfile.TemporaryDirectory(prefix="bench_reader_") as folder:
        started = time.perf_counter()
        database = build_database(Path(args.data), Path(folder))
        with LmdbReader(database) as db:
            n_records, tile = len(db), db[0][0]
        print(f"database: {n_records} tiles {tile.shape} {tile.dtype} built in {time.perf_counter() - started:.1f} s")
        dataset_class = None if args.skip_pydataset else make_pydataset_class()
        for repeat in range(args.repeats):
            for workers in [0] + args.worker_counts:
                rate = time_imagereader(database, workers, args.batches, args.warmup, seed=repeat)
                runs["imagereader"].setdefault(str(workers), []).append(rate)
                line = f"repeat {repeat}: workers {workers}: ImageReader {rate:7.0f} examples/s"
                if dataset_class is not None and workers > 0:
                    rate = time_pydataset(dataset_class, database, workers, args.batches, args.warmup, seed=repeat)
                    runs["pydataset"].setdefault(str(workers), []).append(rate)
                    line += f", PyDataset {rate:7.0f} examples/s"
                print(line, flush=True)

    medians = {name: {w: round(statistics.median(v), 1) for w, v in by_workers.items()}
               for name, by_workers in runs.items()}
    speedup = {w: round(medians["imagereader"][w] / medians["pydataset"][w], 2)
               for w in medians["pydataset"]}
    figures = {
        "benchmark": "reader",
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs",
        "loadavg_1min": round(os.getloadavg()[0], 2),
        "tiles": f"{n_records} x 256x256x1 uint16 (NIST phase contrast)",
        "batch_size": BATCH_SIZE,
        "augmentation": "default (NIST)",
        "timed_batches": args.batches,
        "repeats": args.repeats,
        "imagereader_examples_per_s": medians["imagereader"],
        "pydataset_examples_per_s": medians["pydataset"],
        "speedup_vs_pydataset": speedup,
        "speedup_vs_nist_reference": {w: round(medians["imagereader"][w] / r, 2)
                                      for w, r in NIST_REFERENCE.items() if w in medians["imagereader"]},
        "all_runs": {name: {w: [round(r, 1) for r in v] for w, v in by_workers.items()}
                     for name, by_workers in runs.items()},
    }
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
