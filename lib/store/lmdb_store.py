"""The LMDB record format: writer, reader and metadata. Nothing else writes these databases.

A database is an LMDB directory (``train-NAME.lmdb/data.mdb``) holding

* one record per tile under the key ``b"%010d" % index`` (0 .. n_records - 1). The value is
  a fixed 32-byte header followed by the raw C-order image bytes ``(H, W, C)`` and the raw
  label bytes ``(H, W)`` or ``(H, W, L)``::

      magic b"SGTL" | record version u16 | H u32 | W u32 | C u16 | image dtype u8 |
      label dtype u8 | label channels u16 | 12 reserved bytes          (little-endian)

  No pickle anywhere: a database from an untrusted source is safe to open.
* one metadata record under ``b"__metadata__"``: UTF-8 JSON, described by
  :data:`METADATA_KEYS` (format version, tile size, channels, dtypes, label kind, number of
  classes, per-class pixel counts and tile lists, per-channel mean/std, tile provenance,
  split and fold of every source image, build command).

Reads are zero-copy: the arrays returned by :meth:`LmdbReader.__getitem__` are
``np.frombuffer`` views of LMDB's memory map, read-only, valid until the reader is closed.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from ..common.errors import BadInput

FORMAT_VERSION = 1
RECORD_VERSION = 1
MAGIC = b"SGTL"
HEADER = struct.Struct("<4sHIIHBBH12x")
METADATA_KEY = b"__metadata__"
DATA_FILE = "data.mdb"
# Mode LMDB creates its files with; open(2) applies the umask, so they get 0o666 & ~umask like
# every other output (py-lmdb's default 0o755 loses group/other write bits the umask grants).
FILE_MODE = 0o666

DTYPE_CODES = {1: np.dtype("uint8"), 2: np.dtype("uint16"), 3: np.dtype("int32"), 4: np.dtype("float32"),
               5: np.dtype("uint32"), 6: np.dtype("int16"), 7: np.dtype("float16")}
CODE_OF_DTYPE = {v: k for k, v in DTYPE_CODES.items()}

METADATA_KEYS = {
    "format_version": "int: version of this format; readers refuse newer versions",
    "dataset_name": "str",
    "split": "'train' | 'test'",
    "n_records": "int: number of tile records",
    "tile_size": "int | null: tile edge in pixels (null when whole images are stored)",
    "stride": "int | null: step between tile origins",
    "channels": "int: image channels C",
    "image_dtype": "str: numpy dtype name of the stored image bytes",
    "label_dtype": "str: numpy dtype name of the stored label bytes",
    "label_kind": "'semantic' | 'instance'",
    "number_classes": "int: semantic classes (instance: 2, background and object)",
    "class_pixel_counts": "list[int]: pixels of each class over the valid region of this split's images",
    "class_tiles": "list[list[int]]: for each class, the records whose valid region contains it",
    "channel_mean": "list[float]: per-channel mean over this split's images",
    "channel_std": "list[float]: per-channel standard deviation over this split's images",
    "sources": "list[dict]: every source image of the dataset: key, image, mask, height, width, split, fold, "
               "percentiles (per channel, at percentile_grid, over the whole image; null in older builds)",
    "percentile_grid": "list[float]: the percentiles of each source's percentiles table",
    "tiles": "dict of equal-length lists: source (index into sources), y, x (origin in the source), "
             "valid_h, valid_w (unpadded extent inside the tile)",
    "folds": "int: number of folds of the k-fold assignment (0 = none)",
    "build_command": "str: the command line that built the database",
    "created": "str: ISO 8601 time of the build",
    "toolkit_version": "str",
}
# Present only in instance databases with a class per instance (lib/store/instance_classes.py); their
# records hold labels (H, W, 2): instance ids, then the class of each pixel (0 on background).
CLASS_METADATA_KEYS = {
    "label_channels": "int: 2 (instance ids, classes)",
    "instance_classes": "int: K, the object classes 1..K (the class head predicts K + 1 with background)",
    "instance_class_counts": "list[int]: instances of each class 0..K over both splits",
    "class_names": "list[str]: a name for each class 0..K ('background', 'class 1', ...)",
}


class StoreError(BadInput):
    """A database that cannot be opened or read: missing, corrupt, or of an unknown version (exit 2)."""


def encode_record(image: np.ndarray, label: np.ndarray | None) -> bytes:
    """One record: header + image bytes + label bytes.

    ``image``: ``(H, W, C)``; ``label``: ``(H, W)``, ``(H, W, L)`` or None.
    Raises ``ValueError`` for shapes or dtypes the format cannot hold.
    """
    if image.ndim != 3:
        raise ValueError(f"image must be (H, W, C); got shape {image.shape}")
    if image.dtype not in CODE_OF_DTYPE:
        raise ValueError(f"image dtype must be one of {sorted(d.name for d in CODE_OF_DTYPE)}; got {image.dtype}")
    h, w, c = image.shape
    label_channels, label_code, label_bytes = 0, 0, b""
    if label is not None:
        if label.shape[:2] != (h, w) or label.ndim not in (2, 3):
            raise ValueError(f"label must be (H, W) or (H, W, L) with H, W = {h}, {w}; got {label.shape}")
        if label.dtype not in CODE_OF_DTYPE:
            raise ValueError(f"label dtype must be one of {sorted(d.name for d in CODE_OF_DTYPE)}; got {label.dtype}")
        label_channels = 1 if label.ndim == 2 else label.shape[2]
        label_code = CODE_OF_DTYPE[label.dtype]
        label_bytes = np.ascontiguousarray(label).tobytes()
    header = HEADER.pack(MAGIC, RECORD_VERSION, h, w, c, CODE_OF_DTYPE[image.dtype], label_code, label_channels)
    return header + np.ascontiguousarray(image).tobytes() + label_bytes


def decode_record(buffer, where: str = "record") -> tuple[np.ndarray, np.ndarray | None]:
    """Zero-copy views ``(image (H, W, C), label (H, W) | (H, W, L) | None)`` of a record buffer.

    Raises ``StoreError`` for a buffer that is not a record of a known version.
    """
    if len(buffer) < HEADER.size:
        raise StoreError(f"{where} is {len(buffer)} bytes, shorter than a record header; the database is corrupt")
    magic, version, h, w, c, image_code, label_code, label_channels = HEADER.unpack_from(buffer)
    if magic != MAGIC:
        raise StoreError(f"{where} does not start with {MAGIC!r}; this is not a segmentation-toolkit database")
    if version > RECORD_VERSION:
        raise StoreError(f"{where} has record version {version}; this toolkit reads up to {RECORD_VERSION}. "
                         "Upgrade the toolkit")
    image_dtype = DTYPE_CODES.get(image_code)
    if image_dtype is None or (label_channels and label_code not in DTYPE_CODES):
        raise StoreError(f"{where} has unknown dtype codes ({image_code}, {label_code}); the database is corrupt")
    n_image = h * w * c * image_dtype.itemsize
    image = np.frombuffer(buffer, dtype=image_dtype, count=h * w * c, offset=HEADER.size).reshape(h, w, c)
    label = None
    if label_channels:
        label_dtype = DTYPE_CODES[label_code]
        count = h * w * label_channels
        expected = HEADER.size + n_image + count * label_dtype.itemsize
        if len(buffer) != expected:
            raise StoreError(f"{where} is {len(buffer)} bytes, expected {expected}; the database is corrupt")
        label = np.frombuffer(buffer, dtype=label_dtype, count=count, offset=HEADER.size + n_image)
        label = label.reshape((h, w) if label_channels == 1 else (h, w, label_channels))
    return image, label


def record_key(index: int) -> bytes:
    return b"%010d" % index


class LmdbWriter:
    """Writes records and the metadata of one database; used as a context manager.

    Writes go in large transactions (``commit_bytes``) with syncing deferred to ``close``,
    which flushes everything to disk. The map grows on demand. The folder and LMDB's files
    get their modes from the umask (0755 and 0644 under umask 022).
    """

    def __init__(self, path: str | os.PathLike, map_size: int = 1 << 30, commit_bytes: int = 256 << 20):
        import lmdb

        self.path = Path(path)
        # Made here, not by py-lmdb, which would give the folder 0o755 & ~umask.
        self.path.mkdir(parents=True, exist_ok=True)
        self._env = lmdb.open(str(self.path), map_size=max(int(map_size), 1 << 20), subdir=True,
                              sync=False, metasync=False, lock=True, max_dbs=0, mode=FILE_MODE)
        self._txn = self._env.begin(write=True)
        self._pending = 0
        self._commit_bytes = commit_bytes
        self.n_records = 0

    def _put(self, key: bytes, value: bytes) -> None:
        import lmdb

        try:
            self._txn.put(key, value)
        except lmdb.MapFullError:
            self._txn.abort()
            # _ensure_room grows the map before every put: reaching this is a bug, not bad input.
            raise RuntimeError("internal: LMDB map full inside a transaction") from None
        self._pending += len(value)
        if self._pending >= self._commit_bytes:
            self._commit()

    def _commit(self) -> None:
        self._txn.commit()
        self._pending = 0
        self._txn = self._env.begin(write=True)

    def _ensure_room(self, nbytes: int) -> None:
        # Grow the map before a transaction could overflow it (LMDB cannot grow mid-transaction).
        info = self._env.info()
        stat = self._env.stat()
        used = info["last_pgno"] * stat["psize"]
        if used + self._pending + 2 * nbytes + (64 << 20) > info["map_size"]:
            self._txn.commit()
            self._pending = 0
            self._env.set_mapsize(max(info["map_size"] * 2, used + 4 * nbytes + (256 << 20)))
            self._txn = self._env.begin(write=True)

    def put_record(self, index: int, record: bytes) -> None:
        """Store an encoded record (:func:`encode_record`) under ``index``."""
        self._ensure_room(len(record) + self._commit_bytes)
        self._put(record_key(index), record)
        self.n_records = max(self.n_records, index + 1)

    def put(self, index: int, image: np.ndarray, label: np.ndarray | None) -> None:
        self.put_record(index, encode_record(image, label))

    def put_metadata(self, metadata: dict[str, Any]) -> None:
        data = json.dumps(metadata, separators=(",", ":")).encode("utf-8")
        self._ensure_room(len(data))
        self._put(METADATA_KEY, data)

    def close(self) -> None:
        if self._env is None:
            return
        self._txn.commit()
        self._env.sync(True)
        self._env.close()
        self._env = None

    def abort(self) -> None:
        if self._env is None:
            return
        self._txn.abort()
        self._env.close()
        self._env = None

    def __enter__(self) -> "LmdbWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# py-lmdb refuses to open one environment twice in a process, so readers of the same
# database share it (reference-counted); each reader has its own read transaction.
_ENVS: dict[tuple[str, int], list] = {}


def _acquire_env(path: Path):
    import lmdb

    key = (str(path.resolve()), os.getpid())
    # Environments inherited through fork must not be used, and py-lmdb refuses to open their
    # paths again while they look open: close them in this (child) process first.
    for inherited in [k for k in _ENVS if k[1] != key[1]]:
        try:
            _ENVS.pop(inherited)[0].close()
        except lmdb.Error:
            pass
    entry = _ENVS.get(key)
    if entry is None:
        try:
            env = lmdb.open(key[0], readonly=True, lock=False, readahead=False, subdir=True, max_readers=512)
        except lmdb.Error as exc:
            raise _damaged(path, exc) from None
        try:
            _check_size(path, env)
        except BaseException:
            env.close()
            raise
        entry = _ENVS[key] = [env, 0]
    entry[1] += 1
    return entry[0]


def _damaged(path: Path, detail: object) -> StoreError:
    """The error for a database file that LMDB cannot use: names the file and the way forward."""
    return StoreError(f"database must be a complete LMDB file; {path / DATA_FILE} is damaged ({detail}). "
                      "Rebuild it with build_lmdb.py (the same command writes it again)")


def _check_size(path: Path, env) -> None:
    """Refuse a data file shorter than its own meta page says (a truncated copy).

    Reading such a file through LMDB's memory map would kill the process with SIGBUS.
    """
    expected = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    actual = (path / DATA_FILE).stat().st_size
    if actual < expected:
        raise _damaged(path, f"{actual} bytes where its header says at least {expected}: truncated")


def _release_env(path: Path) -> None:
    key = (str(path.resolve()), os.getpid())
    entry = _ENVS.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] <= 0:
        entry[0].close()
        del _ENVS[key]


class LmdbReader:
    """Random access to the records of a database, with its metadata.

    ``len(reader)`` records; ``reader[i]`` gives zero-copy read-only views
    ``(image (H, W, C), label)`` valid until :meth:`close`. Safe to share across ``fork``:
    a process that did not open the environment reopens it on first use. Picklable (by path),
    so it can be handed to ``spawn`` workers.

    Raises ``StoreError`` when the path is not a database, the metadata is missing or the
    format version is newer than this toolkit reads.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not (self.path / DATA_FILE).is_file():
            raise StoreError(f"database must be an LMDB folder holding {DATA_FILE}; got {str(self.path)!r}. "
                             "Build one with build_lmdb.py")
        self._env = None
        self._txn = None
        self._pid = None
        try:
            self.metadata = self._read_metadata()
        except BaseException:
            self.close()
            raise
        self._n = int(self.metadata["n_records"])

    def _open(self) -> None:
        self._env = _acquire_env(self.path)
        self._txn = self._env.begin(buffers=True)
        self._pid = os.getpid()

    def _ensure_open(self) -> None:
        if self._env is None or self._pid != os.getpid():
            # An environment inherited through fork must not be used: open our own.
            self._env = None
            self._open()

    def _read_metadata(self) -> dict[str, Any]:
        import lmdb

        self._ensure_open()
        try:
            raw = self._txn.get(METADATA_KEY)
            raw = None if raw is None else bytes(raw)
        except lmdb.Error as exc:
            raise _damaged(self.path, exc) from None
        if raw is None:
            raise StoreError(f"{self.path} has no metadata record; it was not written by build_lmdb.py or the "
                             "build did not finish. Rebuild it")
        try:
            metadata = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StoreError(f"{self.path} has corrupt metadata ({exc}); rebuild it") from None
        if not isinstance(metadata, dict) or not isinstance(metadata.get("n_records"), int):
            raise StoreError(f"{self.path} metadata has no integer n_records; the database is damaged. Rebuild it "
                             "with build_lmdb.py")
        version = metadata.get("format_version")
        if not isinstance(version, int):
            raise StoreError(f"{self.path} metadata has no integer format_version; rebuild it")
        if version > FORMAT_VERSION:
            raise StoreError(f"{self.path} was written with database format version {version}; this toolkit "
                             f"reads versions up to {FORMAT_VERSION}. Upgrade the toolkit or rebuild the database")
        return metadata

    def __len__(self) -> int:
        return self._n

    def raw(self, index: int) -> memoryview:
        """The record buffer of ``index`` (zero-copy)."""
        if not 0 <= index < self._n:
            raise IndexError(f"record index must be in [0, {self._n}); got {index}")
        import lmdb

        self._ensure_open()
        try:
            buffer = self._txn.get(record_key(index))
        except lmdb.Error as exc:
            raise _damaged(self.path, f"record {index}: {exc}") from None
        if buffer is None:
            raise StoreError(f"{self.path} has no record {index} although metadata says {self._n}; rebuild it")
        return buffer

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        return decode_record(self.raw(index), where=f"record {index} of {self.path}")

    def tile_info(self, index: int) -> dict[str, Any]:
        """Provenance of record ``index``: source key and file, origin ``y, x``, valid extent."""
        tiles = self.metadata["tiles"]
        source = self.metadata["sources"][tiles["source"][index]]
        return {"key": source["key"], "image": source["image"], "mask": source["mask"],
                "y": tiles["y"][index], "x": tiles["x"][index],
                "valid_h": tiles["valid_h"][index], "valid_w": tiles["valid_w"][index]}

    def close(self) -> None:
        if self._env is not None and self._pid == os.getpid():
            self._txn.abort()
            _release_env(self.path)
        self._env = self._txn = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])

    def __enter__(self) -> "LmdbReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def summarize(path: str | os.PathLike) -> str:
    """A few lines describing a database: records, tiles, classes, statistics, provenance."""
    with LmdbReader(path) as reader:
        m = reader.metadata
        counts = np.asarray(m["class_pixel_counts"], dtype=np.float64)
        fractions = ", ".join(f"{i}: {c / max(counts.sum(), 1):.1%}" for i, c in enumerate(counts))
        n_sources = len(set(m["tiles"]["source"]))
        image, label = reader[0] if len(reader) else (None, None)
        shape = f"{image.shape} {image.dtype}, label {label.dtype}" if image is not None else "empty"
        return "\n".join([
            f"{path}: {len(reader)} records from {n_sources} images ({m['split']}), tile {shape}",
            f"  {m['label_kind']} labels, {m['number_classes']} classes, pixel fractions {{{fractions}}}",
            f"  tiles containing each class: {[len(t) for t in m['class_tiles']]}",
            "  channel mean " + ", ".join(f"{v:.1f}" for v in m["channel_mean"])
            + "; std " + ", ".join(f"{v:.1f}" for v in m["channel_std"])
            + (f"; {m['folds']} folds" if m.get("folds") else ""),
        ])
