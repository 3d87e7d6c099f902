"""OME-Zarr (OME-NGFF) images in and out, through ``zarr``.

Reading: a folder ``NAME.zarr`` / ``NAME.ome.zarr`` holding an NGFF image (``multiscales``
metadata, versions 0.4 in ``.zattrs`` or 0.5 in ``zarr.json``'s ``ome`` attributes). Only the
full-resolution level (the first dataset, path ``"0"`` by convention) is read, through a lazy
view (:class:`OmeZarrView`) that reads only the chunks a window touches: tiled inference never
loads the whole array. Axes come from the ``axes`` metadata (t, c, z, y, x); the physical pixel
size from the ``scale`` coordinate transformations of that level (:attr:`OmeZarrImage.pixel_size`).

Writing: :class:`OmeZarrWriter` writes one NGFF 0.4 image (Zarr format 2, ``/``-separated
chunk keys, Blosc-LZ4 chunks of ``CHUNK`` x ``CHUNK`` pixels, one channel per chunk) with a
resolution pyramid (:mod:`lib.store.ome_pyramid`: nearest neighbour for labels, 2 x 2 mean for
maps) from full-width strips of rows, so an image of any size streams with memory for
``CHUNK`` rows per level. Labels also carry the ``image-label`` metadata (napari opens them as
a labels layer). The image is written into a hidden temporary folder beside its target and
renamed onto it when complete (:func:`commit_folder`): a reader never sees half an image.

Axes: canonical arrays as in :mod:`lib.store.images` (``(H, W, C)``, ``(Z, Y, X, C)``); stored
arrays in NGFF order (``c`` before ``z``, ``y``, ``x``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..common import files
from ..common.errors import BadInput
from .ome_pyramid import StripPyramid, level_count, level_shapes

ZARR_SUFFIXES = (".ome.zarr", ".zarr")
NGFF_VERSION = "0.4"
CHUNK = 512
# Units of the NGFF spec that this toolkit converts to micrometres (the unit of --pixel_size).
MICROMETRES_PER_UNIT = {"micrometer": 1.0, "micron": 1.0, "um": 1.0, "µm": 1.0, "nanometer": 1e-3, "nm": 1e-3,
                        "millimeter": 1e3, "mm": 1e3, "meter": 1e6, "m": 1e6, "centimeter": 1e4, "cm": 1e4,
                        "angstrom": 1e-4}
AXIS_TYPES = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}


class OmeZarrError(BadInput):
    """A folder that is not a readable OME-Zarr image (no multiscales metadata, unknown axes, ...)."""


def is_zarr_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` is named like a Zarr folder (``.zarr``, ``.ome.zarr``)."""
    return Path(path).name.lower().endswith(".zarr")


def zarr_key(path: str | os.PathLike) -> str:
    """The key (name without ``.ome.zarr`` / ``.zarr``) of a Zarr folder: ``a.ome.zarr`` -> ``a``."""
    name = Path(path).name
    for suffix in ZARR_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[:-len(suffix)]
    return Path(path).stem


# Reading


def _multiscales(group, path: Path) -> dict:
    attrs = dict(group.attrs)
    if "ome" in attrs and isinstance(attrs["ome"], dict):  # NGFF 0.5 (Zarr format 3)
        attrs = attrs["ome"]
    scales = attrs.get("multiscales")
    if not scales or not isinstance(scales, list) or not isinstance(scales[0], dict) or \
            not scales[0].get("datasets"):
        raise OmeZarrError(f"OME-Zarr image must have 'multiscales' metadata with datasets; got none in {path}. "
                           "Open a folder that holds one image (not a plate or a collection)")
    return scales[0]


def _axes(multiscale: dict, ndim: int, path: Path) -> tuple[str, list[str | None]]:
    """Axes letters (t, c, z, y, x) and units of a multiscale; 0.1/0.2 files (no axes) are TCZYX."""
    axes = multiscale.get("axes")
    if axes is None:
        names, units = list("tczyx"[-ndim:]), [None] * ndim
    else:
        names = [a if isinstance(a, str) else a.get("name", "") for a in axes]
        units = [None if isinstance(a, str) else a.get("unit") for a in axes]
    names = [n.lower() for n in names]
    if len(names) != ndim or any(n not in AXIS_TYPES for n in names) or len(set(names)) != len(names) \
            or "y" not in names or "x" not in names:
        raise OmeZarrError(f"OME-Zarr axes must be distinct names among t, c, z, y, x (with y and x) for the "
                           f"{ndim} dimensions; got {names} in {path}")
    return "".join(names), units


def _scale(transforms: list | None, ndim: int) -> np.ndarray:
    scale = np.ones(ndim)
    for transform in transforms or []:
        if isinstance(transform, dict) and transform.get("type") == "scale" and "scale" in transform:
            scale = scale * np.asarray(transform["scale"], dtype=float)
    return scale


@dataclasses.dataclass
class OmeZarrImage:
    """The full-resolution level of an OME-Zarr image.

    ``array``: the zarr array as stored; ``axes``: its axes letters (e.g. ``"cyx"``);
    ``pixel_size``: ``(y, x)`` in micrometres when the metadata gives a known unit, else None;
    ``scale``: the raw scale of each axis; ``units``: the unit of each axis (None when unnamed).
    """

    path: Path
    array: Any
    axes: str
    scale: tuple[float, ...]
    units: tuple[str | None, ...]

    @property
    def pixel_size(self) -> tuple[float, float] | None:
        sizes = []
        for letter in "yx":
            i = self.axes.index(letter)
            unit = self.units[i]
            if unit is None or unit.lower() not in MICROMETRES_PER_UNIT:
                return None
            sizes.append(float(self.scale[i]) * MICROMETRES_PER_UNIT[unit.lower()])
        return sizes[0], sizes[1]

    @property
    def z_size(self) -> float | None:
        """The z step in micrometres, or None when unknown (no z axis or no unit)."""
        if "z" not in self.axes:
            return None
        i = self.axes.index("z")
        unit = self.units[i]
        if unit is None or unit.lower() not in MICROMETRES_PER_UNIT:
            return None
        return float(self.scale[i]) * MICROMETRES_PER_UNIT[unit.lower()]


def open_ome_zarr(path: str | os.PathLike) -> OmeZarrImage:
    """Open the full-resolution level of the OME-Zarr image in folder ``path`` (nothing decoded).

    Raises :class:`OmeZarrError` when the folder is not an NGFF image.
    """
    import zarr

    path = Path(path)
    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception as exc:  # any store failure means the same to the user
        raise OmeZarrError(f"cannot open {path} as an OME-Zarr image ({type(exc).__name__}: {exc}). Check that "
                           "the folder holds an NGFF image (.zattrs/.zgroup or zarr.json)") from None
    multiscale = _multiscales(group, path)
    dataset = multiscale["datasets"][0]
    try:
        array = group[str(dataset["path"])]
    except Exception as exc:
        raise OmeZarrError(f"OME-Zarr level {dataset.get('path')!r} must exist; got {type(exc).__name__}: {exc} "
                           f"in {path}") from None
    axes, units = _axes(multiscale, array.ndim, path)
    scale = _scale(dataset.get("coordinateTransformations"), array.ndim) * \
        _scale(multiscale.get("coordinateTransformations"), array.ndim)
    return OmeZarrImage(path, array, axes, tuple(float(s) for s in scale), tuple(units))


def zarr_shape_axes(path: str | os.PathLike) -> tuple[tuple[int, ...], np.dtype, str]:
    """Shape, dtype and axes (upper-case tifffile-style letters: T, C, Z, Y, X) of an OME-Zarr image's level 0."""
    image = open_ome_zarr(path)
    return tuple(int(n) for n in image.array.shape), np.dtype(image.array.dtype), image.axes.upper()


def read_zarr_array(path: str | os.PathLike) -> tuple[np.ndarray, str]:
    """The whole level-0 array as stored, and its axes (upper case)."""
    image = open_ome_zarr(path)
    return np.asarray(image.array[...]), image.axes.upper()


class OmeZarrView:
    """A 2D plane of an OME-Zarr image seen as ``(H, W, C)``, read lazily: ``view[y0:y1, x0:x1]`` reads only
    the chunks of that window (steps allowed). ``plane`` selects a z index of a stack; other axes of length 1
    are dropped. ``np.asarray(view)`` reads the whole plane."""

    def __init__(self, image: OmeZarrImage, plane: int | None = None):
        self.image, self.plane = image, plane
        array, axes = image.array, image.axes
        sizes = dict(zip(axes, array.shape))
        for letter in "tz":
            if sizes.get(letter, 1) > 1 and not (letter == "z" and plane is not None):
                raise OmeZarrError(f"OME-Zarr image must be one 2D plane here; got {letter} of size "
                                   f"{sizes[letter]} in {image.path}")
        self.shape = (int(sizes["y"]), int(sizes["x"]), int(sizes.get("c", 1)))
        self.dtype = np.dtype(array.dtype)
        self.ndim = 3

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        rows = key[0] if len(key) > 0 else slice(None)
        cols = key[1] if len(key) > 1 else slice(None)
        if not isinstance(rows, slice) or not isinstance(cols, slice) or len(key) > 2:
            raise TypeError(f"OmeZarrView takes [rows, cols] slices; got {key!r}")
        index, kept = [], []
        for letter in self.image.axes:
            if letter == "y":
                index.append(rows)
            elif letter == "x":
                index.append(cols)
            elif letter == "c":
                index.append(slice(None))
            else:
                index.append(self.plane if letter == "z" and self.plane is not None else 0)
                continue
            kept.append(letter)
        block = np.asarray(self.image.array[tuple(index)])
        if "c" not in kept:
            block, kept = block[..., np.newaxis], kept + ["c"]
        order = [kept.index(letter) for letter in "yxc"]
        return np.ascontiguousarray(np.transpose(block, order)) if order != [0, 1, 2] else block

    def __array__(self, dtype=None, copy=None):
        block = self[:, :]
        return block if dtype is None else block.astype(dtype)


# Writing


def temporary_folder_beside(path: Path) -> Path:
    """A new, empty, uniquely named hidden folder beside ``path`` (mode from the umask)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    os.chmod(tmp, files.folder_mode())
    return tmp


def commit_folder(tmp: Path, path: Path) -> Path:
    """Move a finished temporary folder onto ``path``: every file fsync'ed, then renamed; an older ``path``
    (a folder or file this tool wrote; the caller checks --overwrite) is moved aside first and removed."""
    for root, _, names in os.walk(tmp):
        for name in names:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    old = None
    if path.exists() or path.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
        os.rmdir(old)
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return path


def _axes_metadata(axes: str, unit: str | None) -> list[dict]:
    out = []
    for letter in axes:
        entry = {"name": letter, "type": AXIS_TYPES[letter]}
        if unit is not None and AXIS_TYPES[letter] == "space":
            entry["unit"] = unit
        out.append(entry)
    return out


def multiscales_metadata(name: str, axes: str, level_sizes: list[tuple[int, int]], pixel_size: tuple[float, float] |
                         None, method: str, z_size: float | None = None) -> dict:
    """The ``multiscales`` attributes (NGFF 0.4) of an image whose levels have ``level_sizes`` (H, W).

    Scales are in micrometres when ``pixel_size`` (y, x) is known (else pixels, no unit); mean-downsampled
    levels are shifted by half a block so that each pixel sits at the centre of the pixels it averages.
    """
    py, px = pixel_size if pixel_size is not None else (1.0, 1.0)
    height, width = level_sizes[0]
    datasets = []
    for level, (h, w) in enumerate(level_sizes):
        fy, fx = 2 ** level, 2 ** level
        scale, shift = [], []
        for letter in axes:
            if letter == "y":
                scale.append(py * fy)
                shift.append(py * (fy - 1) / 2)
            elif letter == "x":
                scale.append(px * fx)
                shift.append(px * (fx - 1) / 2)
            elif letter == "z":
                scale.append(z_size if z_size is not None else 1.0)
                shift.append(0.0)
            else:
                scale.append(1.0)
                shift.append(0.0)
        transforms = [{"type": "scale", "scale": scale}]
        if method == "mean" and level > 0:
            transforms.append({"type": "translation", "translation": shift})
        datasets.append({"path": str(level), "coordinateTransformations": transforms})
    unit = "micrometer" if pixel_size is not None else None
    return {"version": NGFF_VERSION, "name": name, "axes": _axes_metadata(axes, unit), "datasets": datasets,
            "type": "nearest" if method == "nearest" else "mean",
            "metadata": {"method": "every second pixel (nearest neighbour)" if method == "nearest"
                         else "mean of 2 x 2 blocks", "size": [height, width]}}


class OmeZarrWriter:
    """Writes one OME-Zarr image of ``shape`` ((H, W), (H, W, C) or (Z, H, W[, C]) canonical) from full-width
    strips of rows (:meth:`put`; :meth:`put_plane` for a stack), into a temporary folder beside ``path``,
    renamed onto ``path`` by :meth:`close` (``ok``) or removed.

    ``labels``: nearest-neighbour pyramid and ``image-label`` metadata; else a 2 x 2 mean pyramid.
    ``volume``: the first axis of ``shape`` is z. Memory: ``CHUNK`` rows of each level.
    """

    def __init__(self, path: Path, shape: tuple[int, ...], dtype, labels: bool, pixel_size=None,
                 volume: bool = False, z_size: float | None = None):
        import numcodecs
        import zarr

        self.path = Path(path)
        self.volume = volume
        spatial = shape[1:3] if volume else shape[:2]
        channels = shape[3 if volume else 2] if len(shape) > (3 if volume else 2) else None
        self.channels = channels
        self.levels = level_count(*spatial)
        self.sizes = level_shapes(spatial[0], spatial[1], self.levels)
        self.method = "nearest" if labels else "mean"
        self.axes = ("c" if channels is not None else "") + ("z" if volume else "") + "yx"
        self.tmp = temporary_folder_beside(self.path)
        try:
            group = zarr.open_group(str(self.tmp), mode="w", zarr_format=2)
            self.arrays = []
            for h, w in self.sizes:
                lead = ((channels,) if channels is not None else ()) + ((shape[0],) if volume else ())
                chunks = tuple(1 for _ in lead) + (min(CHUNK, h), min(CHUNK, w))
                self.arrays.append(group.create_array(
                    str(len(self.arrays)), shape=lead + (h, w), chunks=chunks, dtype=np.dtype(dtype),
                    compressors=numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE),
                    chunk_key_encoding={"name": "v2", "separator": "/"}, fill_value=0))
            attrs: dict[str, Any] = {"multiscales": [multiscales_metadata(
                zarr_key(self.path), self.axes, self.sizes, pixel_size, self.method, z_size)]}
            if labels:
                attrs["image-label"] = {"version": NGFF_VERSION}  # standalone labels: no source image
            group.attrs.update(attrs)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        self.plane = 0
        self.pyramid = self._new_pyramid()

    def _new_pyramid(self) -> StripPyramid:
        return StripPyramid(self.sizes[0][0], self.levels, self.method, CHUNK, self._emit)

    def _emit(self, level: int, y0: int, strip: np.ndarray) -> None:
        data = np.moveaxis(strip, -1, 0) if self.channels is not None else strip  # (C, h, W)
        rows = slice(y0, y0 + strip.shape[0])
        if self.channels is not None and self.volume:
            self.arrays[level][:, self.plane, rows] = data
        elif self.volume:
            self.arrays[level][self.plane, rows] = data
        elif self.channels is not None:
            self.arrays[level][:, rows] = data
        else:
            self.arrays[level][rows] = data

    def put(self, strip: np.ndarray) -> None:
        """The next full-width rows ``(h, W[, C])`` of the image (of the current plane for a stack)."""
        self.pyramid.put(strip)
        if self.volume and self.pyramid.complete:
            self.plane += 1
            self.pyramid = self._new_pyramid()

    def put_plane(self, plane: np.ndarray) -> None:
        """A whole plane (H, W[, C]) of a stack, or the whole image, in strips of ``CHUNK`` rows."""
        for y in range(0, plane.shape[0], CHUNK):
            self.put(plane[y:y + CHUNK])

    def close(self, ok: bool) -> None:
        if ok:
            commit_folder(self.tmp, self.path)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


def write_ome_zarr(path: str | os.PathLike, array: np.ndarray, labels: bool, pixel_size=None,
                   volume: bool = False, z_size: float | None = None) -> Path:
    """Write ``array`` ((H, W), (H, W, C), or with ``volume`` (Z, H, W[, C])) as an OME-Zarr image, atomically."""
    array = np.asarray(array)
    writer = OmeZarrWriter(Path(path), array.shape, array.dtype, labels, pixel_size, volume, z_size)
    ok = False
    try:
        for plane in (array if volume else [array]):
            writer.put_plane(plane)
        ok = True
    finally:
        writer.close(ok)
    return Path(path)
