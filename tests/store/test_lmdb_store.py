"""The LMDB record format: records, writer, reader, metadata, version checks, file modes."""

from __future__ import annotations

import json
import os

import lmdb
import numpy as np
import pytest

from lib.common.errors import BadInput
from lib.store.lmdb_store import (
    FORMAT_VERSION,
    METADATA_KEY,
    LmdbReader,
    LmdbWriter,
    StoreError,
    decode_record,
    encode_record,
)


@pytest.mark.parametrize("image_dtype", ["uint8", "uint16", "int32", "float32"])
@pytest.mark.parametrize("label", [None, "uint8", "uint16", "uint32", "stack"])
def test_record_round_trip(image_dtype, label):
    rng = np.random.default_rng(0)
    image = (rng.random((5, 7, 3)) * 100).astype(image_dtype)
    lab = None if label is None else rng.integers(0, 9, (5, 7, 2) if label == "stack" else (5, 7)).astype(
        "uint8" if label == "stack" else label)
    img2, lab2 = decode_record(encode_record(image, lab))
    np.testing.assert_array_equal(img2, image)
    assert img2.dtype == image.dtype
    if lab is None:
        assert lab2 is None
    else:
        np.testing.assert_array_equal(lab2, lab)
        assert lab2.dtype == lab.dtype


@pytest.mark.parametrize("make, message", [
    (lambda: encode_record(np.zeros((4, 4)), None), r"image must be \(H, W, C\)"),
    (lambda: encode_record(np.zeros((4, 4, 1), np.float64), None), "image dtype must be"),
    (lambda: encode_record(np.zeros((4, 4, 1), np.uint8), np.zeros((4, 5), np.uint8)), "label must be"),
    (lambda: encode_record(np.zeros((4, 4, 1), np.uint8), np.zeros((4, 4), np.int64)), "label dtype must be"),
])
def test_encode_rejects_what_the_format_cannot_hold(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b[:10], "shorter than a record header"),
    (lambda b: b"XXXX" + b[4:], "not a segmentation-toolkit database"),
    (lambda b: b[:4] + (99).to_bytes(2, "little") + b[6:], "record version 99"),
    (lambda b: b[:-1], "expected"),
])
def test_decode_rejects_corrupt_records(mutate, message):
    record = encode_record(np.zeros((4, 4, 1), np.uint16), np.zeros((4, 4), np.uint8))
    with pytest.raises(StoreError, match=message):
        decode_record(mutate(record))


def _write_db(path, n=3, version=FORMAT_VERSION):
    with LmdbWriter(path, map_size=1 << 22, commit_bytes=100) as writer:
        for i in range(n):
            writer.put(i, np.full((4, 4, 1), i, np.uint16), np.full((4, 4), i % 2, np.uint8))
        writer.put_metadata({"format_version": version, "n_records": n})


def test_reader_random_access_is_zero_copy_and_read_only(tmp_path):
    _write_db(tmp_path / "db", n=5)
    with LmdbReader(tmp_path / "db") as reader:
        assert len(reader) == 5
        image, label = reader[3]
        assert image[0, 0, 0] == 3 and label[0, 0] == 1
        assert not image.flags.writeable and not image.flags.owndata
        # The view points into LMDB's memory map: no copy was made.
        assert np.shares_memory(image, np.frombuffer(reader.raw(3), np.uint8))
        with pytest.raises(IndexError, match="record index must be in"):
            reader[5]


def test_reader_map_grows_beyond_the_initial_size(tmp_path):
    with LmdbWriter(tmp_path / "db", map_size=1 << 20, commit_bytes=1 << 20) as writer:
        for i in range(12):
            writer.put(i, np.full((256, 256, 1), i, np.uint16), None)  # 12 x 128 KiB > 1 MiB
        writer.put_metadata({"format_version": FORMAT_VERSION, "n_records": 12})
    with LmdbReader(tmp_path / "db") as reader:
        assert all(reader[i][0][5, 5, 0] == i for i in range(12))


def test_reader_refuses_newer_versions_missing_metadata_and_non_databases(tmp_path):
    _write_db(tmp_path / "new", version=FORMAT_VERSION + 1)
    with pytest.raises(StoreError, match=f"format version {FORMAT_VERSION + 1}.*Upgrade"):
        LmdbReader(tmp_path / "new")
    with pytest.raises(StoreError, match="must be an LMDB folder"):
        LmdbReader(tmp_path / "nothing")
    env = lmdb.open(str(tmp_path / "bare"), map_size=1 << 20)
    env.close()
    with pytest.raises(StoreError, match="no metadata record"):
        LmdbReader(tmp_path / "bare")
    env = lmdb.open(str(tmp_path / "badjson"), map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(METADATA_KEY, b"{not json")
    env.close()
    with pytest.raises(StoreError, match="corrupt metadata"):
        LmdbReader(tmp_path / "badjson")
    env = lmdb.open(str(tmp_path / "noversion"), map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(METADATA_KEY, json.dumps({"n_records": 0}).encode())
    env.close()
    with pytest.raises(StoreError, match="no integer format_version"):
        LmdbReader(tmp_path / "noversion")


def test_reader_missing_record_is_reported(tmp_path):
    with LmdbWriter(tmp_path / "db", map_size=1 << 20) as writer:
        writer.put_metadata({"format_version": FORMAT_VERSION, "n_records": 2})
        writer.put(0, np.zeros((2, 2, 1), np.uint8), None)
    with LmdbReader(tmp_path / "db") as reader:
        with pytest.raises(StoreError, match="no record 1"):
            reader[1]


FORK_SCRIPT = """
import multiprocessing, pickle, sys
sys.path.insert(0, sys.argv[1])
from lib.store.lmdb_store import LmdbReader

def read_value(reader, index):
    return int(reader[index][0][0, 0, 0])

if __name__ == "__main__":
    reader = LmdbReader(sys.argv[2])
    assert reader[1][0][0, 0, 0] == 1          # the parent has the environment open
    clone = pickle.loads(pickle.dumps(reader))  # by path, in the same process: shares it
    assert clone[2][0][0, 0, 0] == 2
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply(read_value, (reader, 3)) == 3   # the child reopens it
    assert reader[1][0][0, 0, 0] == 1
    print("ok")
"""


def test_reader_pickles_by_path_and_survives_fork(tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    _write_db(tmp_path / "db", n=4)
    # A fresh interpreter: forking this test process after TensorFlow started its threads can deadlock.
    result = subprocess.run([sys.executable, "-c", FORK_SCRIPT, str(ROOT), str(tmp_path / "db")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_store_error_is_bad_input():
    assert issubclass(StoreError, BadInput) and StoreError.exit_code == 2


@pytest.mark.parametrize("umask", [0o022, 0o007])
def test_writer_files_get_their_modes_from_the_umask(tmp_path, umask):
    # py-lmdb's default mode (0o755) would give data.mdb 0o640 under umask 007, not 0o660.
    previous = os.umask(umask)
    try:
        _write_db(tmp_path / "db")
    finally:
        os.umask(previous)
    assert (tmp_path / "db").stat().st_mode & 0o777 == 0o777 & ~umask
    names = sorted(p.name for p in (tmp_path / "db").iterdir())
    assert names == ["data.mdb", "lock.mdb"]
    for name in names:
        assert (tmp_path / "db" / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
