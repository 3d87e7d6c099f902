"""lib.reader.imagereader: batch contract, exact test passes for any worker count, reproducible and
independent worker streams, sampling, lifecycle under failures, starvation monitor, TF adapter."""

import argparse
import logging
import os
import signal
import time

import numpy as np
import pytest

from lib.common.errors import BadInput
from lib.reader import imagereader
from lib.reader.augment import AugmentParams
from lib.reader.imagereader import (
    STARVATION_MESSAGE,
    STARVATION_OVER_MESSAGE,
    ImageReader,
    ReaderError,
    RemoteTraceback,
    as_tf_dataset,
)
from lib.reader.samples import save_augmentation_samples
from lib.store.lmdb_store import LmdbWriter, StoreError, encode_record
from tests.conftest import ROOT
from train_unet import add_reader_arguments, reader_options_from_args

MEAN, STD = 2000.0, 1000.0


def write_db(path, n=11, size=32, channels=1, classes=3, seed=0, same_image=False, label_fn=None,
             label_kind="semantic", label_dtype=np.uint8, bad_record=None, **extra):
    """A database of ``n`` tiles; pixel (0, 0) of channel 0 holds the record index when tiles differ."""
    rng = np.random.default_rng(seed)
    class_tiles = [[] for _ in range(classes)]
    counts = np.zeros(classes, np.int64)
    base = rng.integers(0, 4000, (size, size, channels)).astype(np.uint16)
    with LmdbWriter(path) as writer:
        for i in range(n):
            image = base.copy() if same_image else rng.integers(0, 4000, (size, size, channels)).astype(np.uint16)
            if not same_image:
                image[0, 0, 0] = i
            label = label_fn(i, rng) if label_fn else rng.integers(0, classes, (size, size)).astype(label_dtype)
            if i == bad_record:
                writer.put_record(i, b"not a record")
                continue
            writer.put(i, image, label)
            if label_kind == "semantic":
                for c in np.unique(label[label < classes]):
                    class_tiles[int(c)].append(i)
                counts += np.bincount(label.ravel(), minlength=classes)[:classes]
        metadata = dict(format_version=1, n_records=n, channel_mean=[MEAN] * channels, channel_std=[STD] * channels,
                        class_tiles=class_tiles, class_pixel_counts=counts.tolist(), number_classes=classes,
                        label_kind=label_kind, tile_size=size, channels=channels, image_dtype="uint16",
                        label_dtype=np.dtype(label_dtype).name)
        metadata.update(extra)
        writer.put_metadata(metadata)
    return path


@pytest.fixture
def db(tmp_path):
    return write_db(tmp_path / "db")


def reader(database, batch_size=4, **kwargs):
    # Not fork: this test process has run multithreaded OpenCV, and a forked child can inherit
    # its thread pool mid-operation and hang (fork has its own test, in a clean process).
    kwargs.setdefault("start_method", "forkserver")
    return ImageReader(database, batch_size, **kwargs)


def assert_cleaned_up(pids, shm_name, within=5.0):
    deadline = time.monotonic() + within
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if _exists(pid)]
        time.sleep(0.05)
    assert not alive, f"worker processes left behind: {alive}"
    if shm_name is not None:
        assert not os.path.exists(f"/dev/shm/{shm_name.lstrip('/')}")


def _exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def stored_tile(database, record):
    from lib.store.lmdb_store import LmdbReader

    with LmdbReader(database) as source:
        image, label = source[record]
        return image.astype(np.float32), label.copy()


# The test reader


@pytest.mark.parametrize("reader_count", [0, 1, 2, 3])
def test_test_reader_visits_every_tile_once_in_order(db, reader_count):
    with reader(db, batch_size=4, mode="test", reader_count=reader_count) as r:
        assert r.batches_per_epoch == 3
        for _ in range(2):
            batches = list(r.epoch(copy=True))
            assert [len(b) for b in batches] == [4, 4, 3]
            records = np.concatenate([b.records for b in batches])
            assert records.tolist() == list(range(11))
            images = np.concatenate([b.images for b in batches])
            labels = np.concatenate([b.labels for b in batches])
            for record in (0, 5, 10):
                image, label = stored_tile(db, record)
                np.testing.assert_allclose(images[record], (image - MEAN) / STD, rtol=0, atol=1e-6)
                np.testing.assert_array_equal(labels[record], label)
        pids, name = r.worker_pids, r.shm_name
    assert len(pids) == reader_count
    assert_cleaned_up(pids, name)


def test_abandoned_test_pass_restarts_at_record_zero(db):
    with reader(db, batch_size=4, mode="test", reader_count=2) as r:
        next(iter(r.epoch()))
        assert np.concatenate([b.records.copy() for b in r.epoch()]).tolist() == list(range(11))


def test_spawn_gives_the_same_batches_as_forkserver(db):
    with reader(db, mode="test", reader_count=2) as r:
        expected = [b.images.copy() for b in r.epoch()]
    with reader(db, reader_count=2, seed=4) as train:
        first = train.get_batch().images.copy()
    with reader(db, mode="test", reader_count=2, start_method="spawn") as r:
        got = [b.images.copy() for b in r.epoch()]
    with reader(db, reader_count=2, start_method="spawn", seed=4) as train:
        np.testing.assert_array_equal(train.get_batch().images, first)
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_array_equal(a, b)


FORK_SCRIPT = """
import sys, numpy as np
from lib.reader.imagereader import ImageReader
with ImageReader(sys.argv[1], 4, mode="test", reader_count=2, start_method="fork") as r:
    assert np.concatenate([b.records.copy() for b in r.epoch()]).tolist() == list(range(11))
with ImageReader(sys.argv[1], 4, reader_count=2, start_method="fork", seed=4) as r:
    np.save(sys.argv[2], r.get_batch().images)
"""


def test_fork_start_method_in_a_clean_process(db, tmp_path):
    import subprocess
    import sys

    root = str(ROOT)  # the repository (this file moved into tests/reader/)
    out = tmp_path / "first.npy"
    subprocess.run([sys.executable, "-c", FORK_SCRIPT, str(db), str(out)], cwd=root, check=True, timeout=60)
    with reader(db, reader_count=2, seed=4) as train:
        np.testing.assert_array_equal(train.get_batch().images, np.load(out))


# Training batches


def test_train_batch_contract(tmp_path):
    database = write_db(tmp_path / "db", size=40, channels=2)
    with reader(database, batch_size=5, reader_count=2, patch_shape=24) as r:
        batch = r.get_batch()
        assert batch.images.shape == (5, 24, 24, 2) and batch.images.dtype == np.float32
        assert batch.labels.shape == (5, 24, 24) and batch.labels.dtype == np.uint8
        assert batch.index == 0 and batch.epoch == 0 and len(batch) == 5
        assert set(np.unique(batch.labels)) <= {0, 1, 2}
        assert abs(float(batch.images.mean())) < 0.3  # z-scored with the dataset statistics
        assert r.batches_per_epoch == 11 // 5


def test_same_seed_reproduces_and_in_process_matches_one_worker(db):
    def first_batches(seed, reader_count, n=5):
        with reader(db, seed=seed, reader_count=reader_count, patch_shape=24) as r:
            return [(b.images.copy(), b.labels.copy(), b.records.copy()) for b in (r.get_batch() for _ in range(n))]

    a, b, c = first_batches(7, 2), first_batches(7, 2), first_batches(8, 2)
    for x, y in zip(a, b):
        for u, v in zip(x, y):
            np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a[0][0], c[0][0])
    for x, y in zip(first_batches(7, 0), first_batches(7, 1)):
        np.testing.assert_array_equal(x[0], y[0])
        np.testing.assert_array_equal(x[2], y[2])


def test_two_workers_draw_different_augmentations(tmp_path):
    # Every record is the same picture, so any difference comes from the augmentation streams.
    database = write_db(tmp_path / "db", n=4, same_image=True, label_fn=lambda i, rng: np.zeros((32, 32), np.uint8))
    with reader(database, batch_size=2, reader_count=2) as r:
        from_worker_0 = r.get_batch().images.copy()
        from_worker_1 = r.get_batch().images.copy()
    assert not np.array_equal(from_worker_0, from_worker_1)
    assert not np.array_equal(from_worker_0[0], from_worker_0[1])


def test_resumed_epoch_repeats_the_uninterrupted_run(db):
    with reader(db, batch_size=3, reader_count=2, seed=1) as r:
        list(r.epoch())
        expected = [b.images.copy() for b in r.epoch()]
    with reader(db, batch_size=3, reader_count=2, seed=1, start_epoch=1) as r:
        got = [b.images.copy() for b in r.epoch()]
    assert len(got) == 3
    for x, y in zip(expected, got, strict=True):
        np.testing.assert_array_equal(x, y)


def test_per_tile_normalization(db):
    with reader(db, batch_size=4, reader_count=0, normalization="tile") as r:
        images = r.get_batch().images
        np.testing.assert_allclose(images.mean(axis=(1, 2, 3)), 0, atol=1e-4)
        np.testing.assert_allclose(images.std(axis=(1, 2, 3)), 1, atol=1e-3)


def test_balanced_sampling_follows_class_tiles(tmp_path):
    # Class 2 is in record 0 only: uniform sampling sees it in 1/20 of the draws, balanced in 1/3.
    def label_fn(i, rng):
        label = rng.integers(0, 2, (32, 32)).astype(np.uint8)
        if i == 0:
            label[:4, :4] = 2
        return label

    database = write_db(tmp_path / "db", n=20, label_fn=label_fn)
    shares = {}
    for sampling in ("uniform", "balanced"):
        with reader(database, batch_size=50, reader_count=1, sampling=sampling, augment_params=AugmentParams.none()) as r:
            records = np.concatenate([r.get_batch().records.copy() for _ in range(6)])
        shares[sampling] = np.mean(records == 0)
    assert shares["uniform"] < 0.12
    assert 0.25 < shares["balanced"] < 0.42


def test_foreground_sampling_centres_crops_on_rare_classes(tmp_path):
    def label_fn(i, rng):
        label = np.zeros((64, 64), np.uint8)
        y, x = rng.integers(0, 56, size=2)
        label[y:y + 6, x:x + 6] = 1
        return label

    database = write_db(tmp_path / "db", n=8, size=64, classes=2, label_fn=label_fn)
    shares = {}
    for sampling in ("uniform", "foreground"):
        with reader(database, batch_size=32, reader_count=0, sampling=sampling, patch_shape=16,
                    augment_params=AugmentParams.none()) as r:
            labels = np.concatenate([r.get_batch().labels.copy() for _ in range(4)])
        shares[sampling] = np.mean(labels[:, 6:10, 6:10] == 1)
    assert shares["foreground"] > 0.4 and shares["foreground"] > 5 * shares["uniform"]


def test_instance_labels_keep_their_ids_and_dtype(tmp_path):
    ids = np.array([0, 70000, 123456], np.uint32)
    database = write_db(tmp_path / "db", label_kind="instance", classes=2, label_dtype=np.uint32,
                        label_fn=lambda i, rng: ids[rng.integers(0, 3, (32, 32))])
    with reader(database, reader_count=1) as r:
        labels = r.get_batch().labels
        assert labels.dtype == np.uint32 and set(np.unique(labels)) <= set(ids.tolist())


def test_instance_ids_beyond_float32_stay_apart_beside_the_targets(tmp_path):
    """The ids ride beside the targets in float32 (exact below 2**24): larger ids are renumbered per
    patch, so neighbouring objects with ids 2**24 and 2**24 + 1 stay two objects (for the
    embedding loss and the matching)."""
    ids = np.array([0, 1 << 24, (1 << 24) + 1], np.uint32)

    def label_fn(i, rng):
        label = np.zeros((32, 32), np.uint32)
        label[4:14, 4:28], label[14:24, 4:28] = ids[1], ids[2]
        return label

    database = write_db(tmp_path / "db", label_kind="instance", classes=2, label_dtype=np.uint32, label_fn=label_fn)
    with reader(database, reader_count=0, mode="test", targets={"channels": ["F"]},
                augment_params=AugmentParams.none()) as r:
        labels = next(iter(r.epoch())).labels
    assert labels.dtype == np.float32 and labels.shape[-1] == 2
    for example in labels[..., 1]:
        assert len(np.unique(example[example > 0])) == 2


# Lifecycle and failures


def test_worker_exception_reaches_the_consumer_with_its_traceback(tmp_path):
    def label_fn(i, rng):
        return np.full((32, 32), 9 if i == 6 else 1, np.uint8)

    database = write_db(tmp_path / "db", label_fn=label_fn)
    r = reader(database, mode="test", reader_count=2).start()
    started = time.monotonic()
    with pytest.raises(ReaderError, match=r"label values must be in \[0, number_classes=3\); got 9 in record 6") as info:
        list(r.epoch())
    assert time.monotonic() - started < 5
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "Traceback" in info.value.__cause__.text and "_store" in info.value.__cause__.text
    assert isinstance(info.value, BadInput) and info.value.exit_code == 2  # the data is wrong, not the code
    assert_cleaned_up(r.worker_pids, r.shm_name)


def test_corrupt_record_is_reported(tmp_path):
    database = write_db(tmp_path / "db", bad_record=3)
    with pytest.raises(ReaderError, match="record 3 of .* shorter than a record header") as info:
        with reader(database, mode="test", reader_count=1) as r:
            list(r.epoch())
    assert isinstance(info.value, BadInput)
    assert_cleaned_up(r.worker_pids, r.shm_name)


def test_killed_worker_is_detected_within_seconds(db):
    r = reader(db, reader_count=2, slots_per_worker=2).start()
    r.get_batch()
    os.kill(r.worker_pids[1], signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(ReaderError, match="killed by signal SIGKILL") as info:
        for _ in range(100):
            r.get_batch()
    assert not isinstance(info.value, BadInput)  # a crash, not a user's input
    assert time.monotonic() - started < 5
    assert_cleaned_up(r.worker_pids, r.shm_name)


def test_silent_worker_times_out(db):
    r = reader(db, reader_count=1, slots_per_worker=2).start()
    r.get_batch()
    os.kill(r.worker_pids[0], signal.SIGSTOP)
    started = time.monotonic()
    with pytest.raises(ReaderError, match=r"within timeout=0.5 s.*1 of 1 workers alive"):
        for _ in range(5):
            r.get_batch(timeout=0.5)
    assert time.monotonic() - started < 10  # includes killing the stopped worker
    assert_cleaned_up(r.worker_pids, r.shm_name)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_consumer_exception_or_ctrl_c_stops_everything(db, error):
    started = time.monotonic()
    with pytest.raises(error):
        with reader(db, reader_count=2) as r:
            batch = r.get_batch()
            raise error("stop")
    assert time.monotonic() - started < 5
    assert_cleaned_up(r.worker_pids, r.shm_name)
    assert batch.images.shape[0] == 4  # views held past close stay readable; the name is gone


def test_closed_reader_refuses(db):
    r = reader(db, reader_count=0)
    r.close()
    with pytest.raises(ReaderError, match="must be open"):
        r.get_batch()


# Starvation monitor


def test_starvation_messages_and_waiting_fraction(tmp_path, caplog):
    # Batches of 32 augmented 128x128 tiles take one worker tens of ms; the consumer takes none.
    database = write_db(tmp_path / "db", size=128)
    caplog.set_level(logging.WARNING, logger="lib.reader.imagereader")
    with reader(database, batch_size=32, reader_count=1, slots_per_worker=3) as r:
        for _ in range(6):
            r.get_batch()
        starved = r.input_stats()
        messages = [rec.getMessage() for rec in caplog.records]
        assert sum(m.startswith(STARVATION_MESSAGE + ":") for m in messages) == 1
        assert not any(m.startswith(STARVATION_OVER_MESSAGE) for m in messages)
        assert starved.starved and starved.waiting_fraction > 0.5 and starved.starvation_events == 1
        time.sleep(1.5)  # the worker fills the slots the consumer does not hold meanwhile
        for _ in range(r.capacity - 1):
            r.get_batch()
        assert any(rec.getMessage().startswith(STARVATION_OVER_MESSAGE) for rec in caplog.records)
        recovered = r.input_stats()
        assert not recovered.starved and recovered.waiting_fraction < 0.5 and recovered.batches == 2


# Settings


@pytest.mark.parametrize("kwargs, message", [
    ({"mode": "eval"}, "mode must be one of train, test; got 'eval'"),
    ({"sampling": "random"}, "sampling must be one of uniform, balanced, foreground; got 'random'"),
    ({"normalization": "minmax"}, "normalization must be one of dataset, tile, percentile; got 'minmax'"),
    ({"reader_count": -1}, "reader_count must be an integer >= 0; got -1"),
    ({"slots_per_worker": 1}, "slots_per_worker must be an integer >= 2; got 1"),
    ({"patch_shape": (8, 0)}, "patch_shape must be two positive integers (h, w); got (8, 0)"),
    ({"start_method": "thread"}, "start_method must be one of"),
    ({"timeout": 0}, "timeout must be a positive number of seconds; got 0"),
    ({"batches_per_epoch": 0}, "batches_per_epoch must be an integer >= 1 or None; got 0"),
    ({"start_epoch": -2}, "start_epoch must be an integer >= 0; got -2"),
])
def test_invalid_settings_are_reported(db, kwargs, message):
    with pytest.raises(ValueError) as info:
        ImageReader(db, 4, **kwargs)
    assert message in str(info.value)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1; got 0"):
        ImageReader(db, 0)


def test_database_problems_are_reported(tmp_path):
    with pytest.raises(StoreError, match="must be an LMDB folder"):
        ImageReader(tmp_path / "missing", 4)
    database = write_db(tmp_path / "db", channel_mean=None)
    with pytest.raises(StoreError, match="must hold channel_mean for these settings"):
        ImageReader(database, 4)
    assert ImageReader(database, 4, normalization="tile").image_shape == (32, 32, 1)
    database = write_db(tmp_path / "db2", channels=2, channel_std=[1.0])
    with pytest.raises(StoreError, match="one value per channel"):
        ImageReader(database, 4)
    empty = tmp_path / "empty"
    with LmdbWriter(empty) as writer:
        writer.put_metadata({"format_version": 1, "n_records": 0})
    with pytest.raises(StoreError, match="at least one record"):
        ImageReader(empty, 4)
    unlabelled = tmp_path / "unlabelled"
    with LmdbWriter(unlabelled) as writer:
        writer.put_record(0, encode_record(np.zeros((8, 8, 1), np.uint8), None))
        writer.put_metadata({"format_version": 1, "n_records": 1})
    with pytest.raises(StoreError, match="must hold labels"):
        ImageReader(unlabelled, 4)


def test_shared_memory_shortage_is_explained(db, monkeypatch):
    monkeypatch.setattr(imagereader.shutil, "disk_usage", lambda path: argparse.Namespace(free=1000))
    with pytest.raises(ReaderError, match=r"shared memory must hold the batch ring .* /dev/shm\. .*docker --shm-size"):
        reader(db, reader_count=1).start()


def test_reader_flags():
    parser = argparse.ArgumentParser()
    add_reader_arguments(parser)
    args = parser.parse_args(["--reader_count", "3", "--balance_classes", "--save_aug_samples", "pics"])
    assert reader_options_from_args(args) == {"reader_count": 3, "normalization": "percentile", "sampling": "balanced"}
    assert args.save_aug_samples == "pics"
    bad = parser.parse_args(["--balance_classes", "--sampling", "foreground", "--reader_count", "-1"])
    with pytest.raises(ValueError, match="reader_count must be >= 0; got -1; --balance_classes must not"):
        reader_options_from_args(bad)
    with pytest.raises(SystemExit):
        reader_options_from_args(bad, parser)


# Pictures and TensorFlow


def test_save_augmentation_samples(db, tmp_path):
    from PIL import Image

    with reader(db, reader_count=0, patch_shape=24) as r:
        paths = save_augmentation_samples(r, tmp_path / "pics", n=3, seed=1)
    assert [p.name for p in paths] == ["aug_sample_00.png", "aug_sample_01.png", "aug_sample_02.png"]
    picture = np.asarray(Image.open(paths[0]))
    assert picture.shape == (24, 24 + 4 + 24, 3) and picture.dtype == np.uint8
    label_part = picture[:, 28:]
    assert len({tuple(c) for c in label_part.reshape(-1, 3)}) == 3  # three classes, three colours
    again = save_augmentation_samples(db, tmp_path / "again", n=1, params=AugmentParams.none())
    assert np.asarray(Image.open(again[0])).shape == (32, 68, 3)
    with pytest.raises(ValueError, match="n must be a positive number of samples; got 0"):
        save_augmentation_samples(db, tmp_path, n=0)


def test_tf_dataset_adapter(db):
    import tensorflow as tf

    with reader(db, batch_size=4, mode="test", reader_count=1) as r:
        dataset = as_tf_dataset(r)
        assert dataset.element_spec[0].shape.as_list() == [None, 32, 32, 1]
        assert dataset.element_spec[1].dtype == tf.uint8
        for _ in range(2):
            shapes = [(images.shape[0], labels.shape[0]) for images, labels in dataset]
            assert shapes == [(4, 4), (4, 4), (3, 3)]
    with reader(db, batch_size=4, reader_count=1) as r:
        dataset = as_tf_dataset(r)
        assert dataset.element_spec[0].shape.as_list() == [4, 32, 32, 1]
        images, labels = next(iter(dataset))
        assert images.dtype == tf.float32 and labels.shape == (4, 32, 32)
