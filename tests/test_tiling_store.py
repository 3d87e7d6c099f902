"""Tile grids and the LMDB record format."""

from __future__ import annotations

import json

import lmdb
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lib.store.lmdb_store import (
    FORMAT_VERSION,
    METADATA_KEY,
    LmdbReader,
    LmdbWriter,
    StoreError,
    decode_record,
    encode_record,
)
from lib.store.tiling import pad_to, tile_grid, tile_starts


@given(length=st.integers(1, 700), tile=st.integers(1, 300), data=st.data())
@settings(max_examples=200, deadline=None)
def test_tile_starts_cover_every_pixel_inside_the_image(length, tile, data):
    stride = data.draw(st.integers(1, tile))
    starts = tile_starts(length, tile, stride)
    covered = np.zeros(length, bool)
    for s in starts:
        covered[s:s + tile] = True
        assert s >= 0 and (s + tile <= length or (s == 0 and length < tile))
    assert covered.all()
    assert starts == sorted(set(starts))
    assert all(b - a <= stride for a, b in zip(starts, starts[1:]))


@pytest.mark.parametrize("length, tile, stride, expected", [
    (10, 4, 4, [0, 4, 6]),
    (8, 4, 4, [0, 4]),
    (3, 4, 4, [0]),
    (10, 4, 2, [0, 2, 4, 6]),
    (5, 4, 0, ValueError),
    (5, 4, 5, ValueError),
])
def test_tile_starts_table(length, tile, stride, expected):
    if expected is ValueError:
        with pytest.raises(ValueError, match="stride must be"):
            tile_starts(length, tile, stride)
    else:
        assert tile_starts(length, tile, stride) == expected


def test_tile_grid_is_row_major():
    assert tile_grid(6, 5, 4, 4) == [(0, 0), (0, 1), (2, 0), (2, 1)]


def test_pad_to_reflects_images_and_zeroes_masks():
    image = np.arange(6, dtype=np.uint16).reshape(2, 3)
    padded = pad_to(image, 4, 5, "reflect")
    assert padded.shape == (4, 5)
    np.testing.assert_array_equal(padded[:2, :3], image)
    np.testing.assert_array_equal(padded[0], [0, 1, 2, 1, 0])
    mask = pad_to(np.ones((2, 3), np.uint8), 4, 5, "zero")
    assert mask.sum() == 6 and mask[2:].sum() == 0
    assert pad_to(np.ones((1, 1, 2)), 3, 3, "reflect").shape == (3, 3, 2)
    with pytest.raises(ValueError, match="mode must be"):
        pad_to(image, 4, 4, "wrap")


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
