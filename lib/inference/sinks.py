"""Sinks that stream the zones of one image into files while it is predicted: tiled (Big)TIFFs with OME-XML
(:class:`TiffSink`) and OME-Zarr images (:class:`ZarrSink`), both with a resolution pyramid when large.

Zones arrive in row-major order (:func:`lib.inference.tiled.zone_stream`); a sink gathers one row
of zones into a full-width strip and hands it to a :class:`lib.store.ome_pyramid.StripPyramid`,
which emits strips of whole tile (chunk) rows of every level. Memory: one row of zones plus a
tile row of each level, whatever the image height.

TIFF pyramids (when the longest side exceeds ``lib.store.ome_tiff.PYRAMID_ABOVE``) go into
SubIFDs of the first page, as OME-TIFF readers (QuPath, Fiji/Bio-Formats, napari, tifffile)
expect; their levels are appended row strip by row strip to scratch files beside the output (a third
of level 0's size) while level 0 is written, and copied into the file band by band at the end (no
memory map: its dirty pages would count in the process's memory). Labels
(integer dtypes) are downsampled by nearest neighbour, maps (floats) by the 2 x 2 mean.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Iterator

import numpy as np

from ..common import files
from ..store.ome_pyramid import StripPyramid, level_count, level_shapes
from ..store.ome_tiff import PYRAMID_ABOVE, ome_metadata
from ..store.ome_zarr import OmeZarrWriter

# Default edge of the tiles of the BigTIFFs written while predicting (zlib-compressed).
TIFF_TILE = 256


def pyramid_method(dtype) -> str:
    """Nearest neighbour for labels (integer dtypes), the 2 x 2 mean for maps (floats)."""
    return "mean" if np.dtype(dtype).kind == "f" else "nearest"


class _ScratchLevel:
    """One sub-resolution level of a TIFF pyramid in a scratch file: rows appended in order, read back in bands
    of tiles."""

    def __init__(self, beside: Path, shape: tuple[int, ...], dtype):
        self.path = files.temporary_beside(beside, ".raw")
        self.shape, self.dtype = shape, np.dtype(dtype)
        self.handle = open(self.path, "wb")

    def append(self, strip: np.ndarray) -> None:
        self.handle.write(np.ascontiguousarray(strip, dtype=self.dtype).tobytes())

    def finish(self) -> None:
        if not self.handle.closed:
            self.handle.close()

    def tiles(self, tile: int) -> Iterator[np.ndarray]:
        row = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        with open(self.path, "rb") as handle:
            for y in range(0, self.shape[0], tile):
                rows = min(tile, self.shape[0] - y)
                band = np.frombuffer(handle.read(rows * row), self.dtype).reshape((rows,) + self.shape[1:])
                for x in range(0, self.shape[1], tile):
                    yield band[:, x:x + tile]

    def remove(self) -> None:
        self.finish()
        self.path.unlink(missing_ok=True)


class _TiffWriter:
    """A tiled OME BigTIFF written by a thread from tiles of level 0 put in row-major order, then its
    sub-resolution levels (SubIFDs) from ``levels`` (arrays filled by the producer meanwhile); committed on close
    through :mod:`lib.common.files` (unique temporary name beside it, fsync, umask mode, rename)."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype, tile: int | None = None,
                 pixel_size: tuple[float, float] | None = None, levels: list | None = None):
        self.path = Path(path)
        self.tmp = files.temporary_beside(self.path, ".tif")
        self.queue: queue.Queue = queue.Queue(maxsize=16)
        self.error: BaseException | None = None
        self.shape, self.dtype, self.tile = shape, np.dtype(dtype), tile or TIFF_TILE
        self.pixel_size, self.levels = pixel_size, levels or []
        self.levels_ready = threading.Event()
        self.thread = threading.Thread(target=self._write, daemon=True)
        self.thread.start()

    def _write(self) -> None:
        import tifffile

        channels = len(self.shape) == 3
        options = {"dtype": self.dtype, "tile": (self.tile, self.tile), "compression": "zlib",
                   "photometric": "minisblack", "planarconfig": "contig" if channels else None}
        try:
            with tifffile.TiffWriter(self.tmp, bigtiff=True, ome=True) as tif:
                tif.write(self._tiles(), shape=self.shape, subifds=len(self.levels) or None,
                          metadata=ome_metadata("YXS" if channels else "YX", self.pixel_size), **options)
                self.levels_ready.wait()
                for level in self.levels:
                    tif.write(level.tiles(self.tile), shape=level.shape, subfiletype=1, **options)
        except BaseException as exc:  # reported to the producer by put/close
            self.error = exc
            while self.queue.get() is not None:  # drain so that the producer never blocks
                pass

    def _tiles(self) -> Iterator[np.ndarray]:
        while (tile := self.queue.get()) is not None:
            yield tile

    def put(self, tile: np.ndarray) -> None:
        if self.error is not None:
            raise OSError(f"cannot write {self.path}: {self.error}")
        self.queue.put(tile)

    def close(self, ok: bool) -> None:
        if self.thread.is_alive():
            self.queue.put(None)
        self.levels_ready.set()
        self.thread.join()
        if ok and self.error is None:
            files.commit(self.tmp, self.path)
            return
        self.tmp.unlink(missing_ok=True)
        if ok:
            raise OSError(f"cannot write {self.path}: {self.error}")


class _RowSink:
    """Gathers the zones of one row into a full-width strip for :meth:`_strip`."""

    def __init__(self, field: str, shape: tuple[int, ...]):
        self.field = field
        self.height, self.width = shape[:2]
        self.row: list[np.ndarray] = []

    def put(self, box: tuple[int, int, int, int], data: np.ndarray) -> None:
        self.row.append(data)
        if box[3] < self.width:
            return
        strip = np.concatenate(self.row, axis=1) if len(self.row) > 1 else self.row[0]
        self.row = []
        self._strip(strip)

    def _strip(self, strip: np.ndarray) -> None:
        raise NotImplementedError


class TiffSink(_RowSink):
    """Streams one field of the zones into a tiled OME BigTIFF at ``path`` (``TIFF_TILE`` tiles, zlib), with
    ``PhysicalSizeY/X`` when ``pixel_size`` (y, x) in µm is known, and a SubIFD pyramid when the longest side
    exceeds ``PYRAMID_ABOVE`` (``pyramid`` False: never). Memory: one row of zones and a tile row per level."""

    def __init__(self, field: str, path: Path, shape: tuple[int, ...], dtype,
                 pixel_size: tuple[float, float] | None = None, pyramid: bool = True, tile: int = TIFF_TILE):
        super().__init__(field, shape)
        levels = level_count(self.height, self.width) if pyramid and max(shape[:2]) > PYRAMID_ABOVE else 1
        self.scratch: list[_ScratchLevel] = []
        try:
            for h, w in level_shapes(self.height, self.width, levels)[1:]:
                self.scratch.append(_ScratchLevel(Path(path), (h, w) + tuple(shape[2:]), dtype))
            self.writer = _TiffWriter(path, shape, dtype, tile, pixel_size=pixel_size, levels=self.scratch)
        except BaseException:
            self._remove_scratch()
            raise
        self.pyramid = StripPyramid(self.height, levels, pyramid_method(dtype), self.writer.tile, self._emit)

    def _emit(self, level: int, y0: int, strip: np.ndarray) -> None:
        if level == 0:
            tile = self.writer.tile
            for y in range(0, strip.shape[0], tile):
                for x in range(0, self.width, tile):
                    self.writer.put(strip[y:y + tile, x:x + tile])
        else:
            self.scratch[level - 1].append(strip)  # strips of a level come in row order

    def _strip(self, strip: np.ndarray) -> None:
        self.pyramid.put(strip)

    def _remove_scratch(self) -> None:
        for level in self.scratch:
            level.remove()

    def close(self, ok: bool) -> None:
        try:
            for level in self.scratch:
                level.finish()  # written out before the writer reads them
            self.writer.close(ok)
        finally:
            self._remove_scratch()


class ZarrSink(_RowSink):
    """Streams one field of the zones into an OME-Zarr image at ``path`` (:class:`lib.store.ome_zarr.OmeZarrWriter`:
    a pyramid, nearest neighbour for labels, 2 x 2 mean for maps). Memory: one row of zones and a chunk row per
    level."""

    def __init__(self, field: str, path: Path, shape: tuple[int, ...], dtype,
                 pixel_size: tuple[float, float] | None = None):
        super().__init__(field, shape)
        self.writer = OmeZarrWriter(Path(path), shape, dtype, labels=pyramid_method(dtype) == "nearest",
                                    pixel_size=pixel_size)

    def _strip(self, strip: np.ndarray) -> None:
        self.writer.put(strip)

    def close(self, ok: bool) -> None:
        self.writer.close(ok)


def file_sink(field: str, path: Path, shape: tuple[int, ...], dtype, pixel_size=None, tile: int = TIFF_TILE):
    """The sink that streams ``field`` into ``path``: OME-Zarr for a ``.zarr`` folder, else a tiled OME BigTIFF
    of ``tile`` x ``tile`` tiles."""
    if Path(path).name.lower().endswith(".zarr"):
        return ZarrSink(field, path, shape, dtype, pixel_size)
    return TiffSink(field, path, shape, dtype, pixel_size, tile=tile)
