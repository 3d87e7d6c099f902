"""Reading and writing microscopy images, pairing images with masks, validating a dataset.

Axes conventions: a 2D image is returned as ``(H, W, C)`` ("YXC"), a mask as ``(H, W)``,
a 3D stack as ``(Z, Y, X, C)``. TIFF files are read with tifffile, PNG/JPEG/BMP with Pillow,
OME-Zarr folders (``NAME.zarr``, ``NAME.ome.zarr``: one image each) with zarr (:mod:`lib.store.ome_zarr`,
full-resolution level).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import struct
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ..common.errors import BadInput
from ..common.files import atomic_path
from .ome_tiff import ome_metadata, tiff_pixel_size
from .ome_zarr import OmeZarrError, is_zarr_path, open_ome_zarr, read_zarr_array, zarr_key, zarr_shape_axes

IMAGE_EXTENSIONS = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")
TIFF_EXTENSIONS = (".tif", ".tiff")
# --image_format values that select OME-Zarr folders (NAME.zarr, NAME.ome.zarr).
ZARR_FORMATS = ("zarr", "ome.zarr", "ome-zarr", "ome_zarr")
IMAGE_DTYPES = ("uint8", "uint16", "int32", "float32")
MASK_DTYPES = ("uint8", "uint16", "int32", "uint32")
# TIFF compressions that change pixel values (tag 259): JPEG (old and new), WebP, JPEG XL.
LOSSY_TIFF_COMPRESSIONS = {6: "JPEG", 7: "JPEG", 34892: "JPEG", 50001: "WebP", 50002: "JPEG XL"}
# A dimension this small next to two large ones is taken for channels, not for space.
MAX_CHANNELS = 16


class ImageReadError(BadInput):
    """A file could not be read as an image (unreadable, truncated, or of an unusable layout)."""


class ImageWriteError(BadInput, ValueError):
    """An array that the chosen output format cannot hold (e.g. float32 as PNG); nothing is written."""


class FolderNotFoundError(BadInput, FileNotFoundError):
    """An input folder that does not exist."""


class DatasetError(BadInput):
    """Every problem found in a dataset, reported at once (exit 2: nothing was written).

    ``problems`` is the list of one-line messages; ``str(error)`` is the full report.
    """

    def __init__(self, problems: list[str], title: str = "The dataset has problems"):
        self.problems = list(problems)
        lines = [f"{title} ({len(self.problems)}); nothing was written:"]
        lines += [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    """What a file holds, read from its header where the format allows it.

    ``shape`` is ``(H, W, C)`` for a 2D image (C = 1 for greyscale) or ``(Z, Y, X, C)`` for a stack.
    """

    shape: tuple[int, ...]
    dtype: str
    axes: str

    @property
    def is_volume(self) -> bool:
        return len(self.shape) == 4


# Axes


def _squeeze_axes(shape: tuple[int, ...], axes: str | None) -> tuple[tuple[int, ...], str | None]:
    """Drop length-1 dimensions other than Y and X; forget axes that name unknown dimensions."""
    if axes is None or len(axes) != len(shape):
        keep = [i for i, n in enumerate(shape) if n != 1] if len(shape) > 2 else list(range(len(shape)))
        if len(keep) < 2:
            keep = list(range(len(shape)))[-2:]
        return tuple(shape[i] for i in keep), None
    keep = [i for i, (a, n) in enumerate(zip(axes.upper(), shape)) if n != 1 or a in "YX"]
    axes = "".join(axes.upper()[i] for i in keep)
    shape = tuple(shape[i] for i in keep)
    # Q and I are tifffile's "unknown": the sizes say more than the name.
    return shape, (None if any(a in "QI" for a in axes) else axes)


def _canonical_axes(shape: tuple[int, ...], axes: str | None, path: Path) -> str:
    """The axes of a (squeezed) array as a string of Y, X, C (channels) and Z (planes)."""
    ndim = len(shape)
    if axes:
        mapped = "".join("C" if a in "SC" else a if a in "YX" else "Z" for a in axes)
        if mapped.count("Y") == 1 and mapped.count("X") == 1 and mapped.count("C") <= 1 and mapped.count("Z") <= 1:
            return mapped
        raise ImageReadError(f"{path} has axes {axes} (shape {shape}); save one 2D image (YX, YXC) or one stack "
                             "(ZYX, ZYXC) per file")
    # No usable axes metadata: guess from the sizes.
    if ndim == 2:
        return "YX"
    if ndim == 3:
        if shape[-1] <= MAX_CHANNELS < min(shape[0], shape[1]):
            return "YXC"
        if shape[0] <= MAX_CHANNELS < min(shape[1], shape[2]):
            return "CYX"
        return "ZYX"
    if ndim == 4:
        if shape[-1] <= MAX_CHANNELS:
            return "ZYXC"
        if shape[1] <= MAX_CHANNELS:
            return "ZCYX"
    raise ImageReadError(f"cannot tell the axes of an array of shape {shape} in {path}; "
                         "save 2D images as YX or YXC and stacks as ZYX or ZYXC")


def _to_canonical(array: np.ndarray, axes: str) -> np.ndarray:
    """Reorder a squeezed ``array`` with canonical ``axes`` to ``(Y, X, C)`` or ``(Z, Y, X, C)``."""
    if "C" not in axes:
        array = array[..., np.newaxis]
        axes = axes + "C"
    target = "ZYXC" if "Z" in axes else "YXC"
    order = [axes.index(a) for a in target]
    return np.ascontiguousarray(np.transpose(array, order)) if order != list(range(len(order))) else array


# Reading


def _pil_open(path: Path):
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # microscopy images are legitimately huge
    return Image.open(path)


@contextlib.contextmanager
def _quiet_tifffile() -> Iterator[None]:
    """Hold back tifffile's log lines (``invalid offset to first page``) while a file is read.

    A damaged file is reported once, as an :class:`ImageReadError` naming it.
    """
    logger = logging.getLogger("tifffile")
    previous = logger.disabled
    logger.disabled = True
    try:
        yield
    finally:
        logger.disabled = previous


def _read_error(path: Path, exc: Exception) -> ImageReadError:
    """The error for a file no decoder could read: names it, says what to do."""
    if isinstance(exc, (IndexError, EOFError, OSError, ValueError, struct.error)) or "TiffFileError" in type(
            exc).__name__ or "corrupt" in str(exc).lower() or "truncat" in str(exc).lower():
        return ImageReadError(f"cannot read {path}: the file is truncated or damaged ({type(exc).__name__}: "
                              f"{exc}). Copy or export it again")
    return ImageReadError(f"cannot read {path}: {type(exc).__name__}: {exc}")


def read_info(path: str | os.PathLike) -> ImageInfo:
    """Shape, dtype and axes of an image file, from its header (pixels are not decoded).

    Raises ``ImageReadError`` when the file is not a readable image.
    """
    path = Path(path)
    try:
        if is_zarr_path(path):
            shape, dtype, axes = zarr_shape_axes(path)
        elif path.suffix.lower() in TIFF_EXTENSIONS:
            import tifffile

            with _quiet_tifffile(), tifffile.TiffFile(path) as tif:
                series = _first_series(tif)
                shape, dtype, axes = tuple(series.shape), np.dtype(series.dtype), series.axes
        else:
            with _pil_open(path) as im:
                shape, dtype, axes = _pil_shape_dtype(im)
    except ImageReadError:
        raise
    except OmeZarrError as exc:
        raise ImageReadError(str(exc)) from None
    except Exception as exc:  # any decoder failure means the same thing to the user
        raise _read_error(path, exc) from None
    shape, axes = _squeeze_axes(shape, axes)
    canon = _canonical_axes(shape, axes, path)
    sizes = dict(zip(canon, shape))
    channels = sizes.get("C", 1)
    if "Z" in sizes:
        out_shape = (sizes["Z"], sizes["Y"], sizes["X"], channels)
    else:
        out_shape = (sizes["Y"], sizes["X"], channels)
    return ImageInfo(shape=tuple(int(s) for s in out_shape), dtype=dtype.name, axes=canon)


def _first_series(tif):
    """The first image series of an open TIFF; a file without one is truncated or damaged."""
    series = tif.series
    if not series:
        raise EOFError("no image in the file (its first page is missing)")
    return series[0]


def lossy_format(path: str | os.PathLike) -> str | None:
    """``"JPEG"`` when ``path`` stores pixels lossily (a .jpg, or a JPEG-compressed TIFF), else None.

    Masks saved so hold ringing values near every edge, which would become spurious classes.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".jpg", ".jpeg"):
        return "JPEG"
    if suffix in TIFF_EXTENSIONS:
        try:
            import tifffile

            with _quiet_tifffile(), tifffile.TiffFile(path) as tif:
                compression = int(tif.pages[0].compression) if len(tif.pages) else 1
        except Exception:  # unreadable: reported by the header check
            return None
        if compression in LOSSY_TIFF_COMPRESSIONS:
            return LOSSY_TIFF_COMPRESSIONS[compression]
    return None


def _pil_shape_dtype(im) -> tuple[tuple[int, ...], np.dtype, str]:
    width, height = im.size
    mode = im.mode
    table = {"1": ("bool", 1), "L": ("uint8", 1), "P": ("uint8", 1), "LA": ("uint8", 2),
             "RGB": ("uint8", 3), "RGBA": ("uint8", 4), "CMYK": ("uint8", 4), "YCbCr": ("uint8", 3),
             "I;16": ("uint16", 1), "I;16B": ("uint16", 1), "I;16L": ("uint16", 1),
             "I": ("int32", 1), "F": ("float32", 1)}
    if mode not in table:
        raise ImageReadError(f"unsupported image mode {mode!r}")
    dtype, channels = table[mode]
    if channels == 1:
        return (height, width), np.dtype(dtype), "YX"
    return (height, width, channels), np.dtype(dtype), "YXS"


def _read_raw(path: Path) -> tuple[np.ndarray, str | None]:
    """Decode the whole file: the array as stored and its axes (None when unknown)."""
    if is_zarr_path(path):
        return read_zarr_array(path)
    if path.suffix.lower() in TIFF_EXTENSIONS:
        import tifffile

        with _quiet_tifffile(), tifffile.TiffFile(path) as tif:
            series = _first_series(tif)
            return series.asarray(), series.axes
    with _pil_open(path) as im:
        im.load()
        if im.mode == "P":
            im = im.convert("L")
        if im.mode in ("I;16", "I;16B", "I;16L"):
            array = np.array(im, dtype=np.uint16)
        elif im.mode == "CMYK" or im.mode == "YCbCr":
            array = np.array(im.convert("RGB"))
        else:
            array = np.array(im)
    return array, ("YX" if array.ndim == 2 else "YXS")


def read_any(path: str | os.PathLike) -> np.ndarray:
    """Read a 2D image or a 3D stack: ``(H, W, C)`` or ``(Z, Y, X, C)``.

    Raises ``ImageReadError`` for unreadable or truncated files and unknown layouts.
    """
    path = Path(path)
    try:
        array, axes = _read_raw(path)
    except OmeZarrError as exc:
        raise ImageReadError(str(exc)) from None
    except Exception as exc:
        raise _read_error(path, exc) from None
    shape, axes = _squeeze_axes(array.shape, axes)
    array = array.reshape(shape)
    return _to_canonical(array, _canonical_axes(shape, axes, path))


def pixel_size_of(path: str | os.PathLike) -> tuple[float, float] | None:
    """The physical ``(y, x)`` size of a pixel in µm from the file's metadata (OME-Zarr ``scale`` with a
    spatial unit, OME-TIFF ``PhysicalSizeY/X``), or None when the file does not say."""
    path = Path(path)
    if is_zarr_path(path):
        try:
            return open_ome_zarr(path).pixel_size
        except OmeZarrError:
            return None
    if path.suffix.lower() in TIFF_EXTENSIONS:
        return tiff_pixel_size(path)
    return None


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read a 2D image as ``(H, W, C)`` in its stored dtype (C = 1 for greyscale).

    Raises ``ImageReadError`` when the file is unreadable or holds a 3D stack.
    """
    array = read_any(path)
    if array.ndim != 3:
        raise ImageReadError(f"{path} holds a stack of shape (Z, Y, X, C) = {array.shape}, "
                             "not a 2D image; use read_volume for stacks")
    return array


def read_volume(path: str | os.PathLike) -> np.ndarray:
    """Read a 3D stack as ``(Z, Y, X, C)``; a 2D image becomes a stack of one plane."""
    array = read_any(path)
    return array[np.newaxis] if array.ndim == 3 else array


def read_mask(path: str | os.PathLike, binary_255: bool = True) -> np.ndarray:
    """Read a label mask as ``(H, W)`` integers.

    A mask whose values are exactly {0, 255} (or {255}) becomes 0/1 when ``binary_255``
    (masks saved by image editors). A boolean mask becomes uint8. A float mask whose values
    are all non-negative integers is converted to the smallest fitting unsigned dtype.
    RGB masks are accepted when their channels are identical.

    Raises ``ImageReadError`` for unreadable files, multi-channel masks, negative or
    non-integer values and unsupported dtypes.
    """
    path = Path(path)
    array = read_image(path)
    if array.shape[2] > 1:
        first = array[..., :1]
        # grey + alpha or RGB + alpha: the alpha channel carries no label
        colour = array[..., :-1] if array.shape[2] in (2, 4) else array
        if not np.all(colour == colour[..., :1]):
            raise ImageReadError(f"mask must have one channel; got {array.shape[2]} channels in {path}. "
                                 "Save label masks as single-channel images")
        array = first
    mask = array[..., 0]
    mask = _integer_mask(mask, path)
    if binary_255 and mask.dtype == np.uint8 and mask.size and int(mask.max()) == 255:
        if not np.any((mask != 0) & (mask != 255)):
            mask = (mask == 255).astype(np.uint8)
    return mask


def _integer_mask(mask: np.ndarray, path: Path) -> np.ndarray:
    if mask.dtype == bool:
        return mask.astype(np.uint8)
    if mask.dtype.kind == "f":
        if not np.all(np.isfinite(mask)) or not np.all(mask == np.round(mask)):
            raise ImageReadError(f"mask values must be integers; got non-integer values in {path}. "
                                 "Save masks with integer labels (uint8/uint16)")
        if mask.size and mask.min() < 0:
            raise ImageReadError(f"mask values must be >= 0; got {mask.min():g} in {path}")
        return mask.astype(smallest_uint(int(mask.max()) if mask.size else 0))
    if mask.dtype.kind not in "ui":
        raise ImageReadError(f"mask dtype must be one of {', '.join(MASK_DTYPES)}; got {mask.dtype} in {path}")
    if mask.dtype.kind == "i" and mask.size and mask.min() < 0:
        raise ImageReadError(f"mask values must be >= 0; got {int(mask.min())} in {path}. "
                             "Labels are 0 (background) to N")
    if mask.dtype.name not in MASK_DTYPES:
        top = int(mask.max()) if mask.size else 0
        return mask.astype(smallest_uint(top))
    return mask


def smallest_uint(max_value: int) -> np.dtype:
    """The smallest unsigned dtype holding ``max_value``: uint8, uint16, uint32 or uint64."""
    for dtype in (np.uint8, np.uint16, np.uint32, np.uint64):
        if max_value <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"label value {max_value} does not fit in uint64")


# Writing


def write_image(path: str | os.PathLike, array: np.ndarray, compression: str | None = None, ome: bool = False,
                pixel_size: tuple[float, float] | None = None) -> Path:
    """Write a 2D image ``(H, W)`` / ``(H, W, C)`` or a stack ``(Z, Y, X[, C])`` atomically.

    ``ome`` (TIFF only): an OME-TIFF whose OME-XML names the axes (``YX``, ``CYX`` for several channels,
    ``YXS`` for RGB, ``ZYX``, ``ZCYX``) and, when ``pixel_size`` (y, x) in µm is given, ``PhysicalSizeY/X``.

    The file goes through :func:`lib.common.files.atomic_path`: a unique temporary name beside
    ``path``, fsync, mode ``0o666 & ~umask`` (0644 under umask 022), then a rename, so a reader
    never sees half an image. TIFF keeps any dtype; PNG takes uint8/uint16 with 1, 3 or 4 channels.
    Raises :class:`ImageWriteError` (a ``ValueError``) for a format that cannot hold the array;
    nothing is written then.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in IMAGE_EXTENSIONS:
        raise ImageWriteError(f"output format must be one of {', '.join(IMAGE_EXTENSIONS)}; got {path.name!r}")
    array = np.asarray(array)
    pillow_data = None if suffix in TIFF_EXTENSIONS else _pillow_array(path, array)  # refuse before writing
    with atomic_path(path) as tmp:
        if pillow_data is None:
            _write_tiff(tmp, array, compression, pixel_size if ome else False)
        else:
            from PIL import Image

            image_format = {".jpg": "JPEG", ".jpeg": "JPEG"}.get(suffix, suffix[1:].upper())
            Image.fromarray(pillow_data).save(tmp, format=image_format)
    return path


def _pillow_array(path: Path, array: np.ndarray) -> np.ndarray:
    """The array Pillow writes for a PNG/JPEG/BMP ``path``; raises :class:`ImageWriteError` if none fits."""
    suffix = path.suffix.lower()
    squeezed = array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array
    if squeezed.dtype.name not in ("uint8", "uint16", "bool") or squeezed.ndim not in (2, 3):
        raise ImageWriteError(f"{suffix} holds 2D uint8/uint16 images; got {array.dtype} of shape {array.shape} "
                              f"for {path}. Use .tif")
    if squeezed.dtype == np.uint16 and squeezed.ndim == 3:
        raise ImageWriteError(f"{suffix} cannot hold multi-channel uint16 images; got shape {array.shape} for "
                              f"{path}. Use .tif")
    return squeezed.astype(np.uint8) if squeezed.dtype == bool else squeezed


def _write_tiff(path: Path, array: np.ndarray, compression: str | None,
                ome_pixel_size: tuple[float, float] | None | bool = False) -> None:
    """``ome_pixel_size`` False: a plain TIFF; None or (y, x): an OME-TIFF (with that pixel size)."""
    import tifffile

    ome = ome_pixel_size is not False
    data, options, axes = array, {"photometric": "minisblack"}, "YX"
    if array.ndim == 3 and array.shape[2] == 1:
        data = array[..., 0]
    elif array.ndim == 3 and array.shape[2] in (3, 4) and array.dtype == np.uint8:
        options, axes = {"photometric": "rgb"}, "YXS"
    elif array.ndim == 3:
        # Planes of a channel-first image, named so that readers do not take them for Z.
        data, options["metadata"] = np.moveaxis(array, -1, 0), {"axes": "CYX"}
        axes = "CYX"
    elif array.ndim == 4:
        options["metadata"] = {"axes": "ZYXC"} if array.shape[3] > 1 else {"axes": "ZYX"}
        data = array if array.shape[3] > 1 else array[..., 0]
        axes = "ZYX"
        if ome and array.shape[3] > 1:  # OME orders channels before Y and X
            data, axes = np.moveaxis(array, -1, 1), "ZCYX"
    if ome:
        options["metadata"] = ome_metadata(axes, ome_pixel_size or None)
        options["ome"] = True
    tifffile.imwrite(path, data, compression=compression, bigtiff=array.nbytes > 2**31, **options)


# Folders and pairing


def list_images(folder: str | os.PathLike, image_format: str | None = None) -> tuple[dict[str, Path], list[str]]:
    """Image files of a folder by key (file stem).

    ``image_format`` restricts the extension ("tif" also takes ".tiff"; "zarr" or "ome-zarr": OME-Zarr
    folders only). An OME-Zarr folder ``NAME.zarr`` / ``NAME.ome.zarr`` is one image of key ``NAME``. Returns
    ``(files, problems)``; two files with the same stem are a problem (ambiguous key).
    Raises :class:`FolderNotFoundError` (a ``FileNotFoundError``) when the folder does not exist.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FolderNotFoundError(f"folder must exist; got {str(folder)!r} (not a directory)")
    extensions, zarr = IMAGE_EXTENSIONS, True
    if image_format:
        zarr = image_format.lower().lstrip(".") in ZARR_FORMATS
        fmt = "." + image_format.lower().lstrip(".")
        extensions = () if zarr else TIFF_EXTENSIONS if fmt in TIFF_EXTENSIONS else (".jpg", ".jpeg") \
            if fmt in (".jpg", ".jpeg") else (fmt,)
    files: dict[str, Path] = {}
    problems = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if zarr and is_zarr_path(entry) and entry.is_dir():
            key = zarr_key(entry)  # an OME-Zarr folder is one image
        elif entry.is_file() and entry.suffix.lower() in extensions:
            key = entry.stem
        else:
            continue
        if key in files:
            problems.append(f"two files share the key {key!r} in {folder}: {files[key].name} and "
                            f"{entry.name}; keep one")
            continue
        files[key] = entry
    return files, problems


@dataclasses.dataclass(frozen=True)
class Pair:
    key: str
    image: Path
    mask: Path


def infer_mask_suffix(image_keys: Iterable[str], mask_keys: Iterable[str]) -> str:
    """The suffix that turns image keys into mask keys ("" when the stems are equal).

    Looks at mask keys that start with an image key followed by a separator ("_", "-", ".")
    and takes the most common remainder ("_mask" for ``0001.tif`` / ``0001_mask.png``).
    """
    image_keys = set(image_keys)
    mask_keys = set(mask_keys)
    exact = len(image_keys & mask_keys)
    counts: collections.Counter[str] = collections.Counter()
    for mask_key in mask_keys - image_keys:
        for cut in range(1, len(mask_key)):
            if mask_key[cut] in "_-." and mask_key[:cut] in image_keys:
                counts[mask_key[cut:]] += 1
    if counts:
        suffix, n = counts.most_common(1)[0]
        if n > exact:
            return suffix
    return ""


def pair_images_masks(images: dict[str, Path], masks: dict[str, Path],
                      mask_suffix: str | None = None) -> tuple[list[Pair], list[str]]:
    """Pair images with masks by key, never by position.

    ``mask_suffix`` None: inferred with :func:`infer_mask_suffix`. A mask key is the image key
    plus the suffix; with an inferred suffix an exact stem match is accepted too.
    Returns ``(pairs, problems)`` where problems name every image without a mask and every
    mask without an image.
    """
    problems = []
    if set(map(_resolved, images.values())) & set(map(_resolved, masks.values())):
        images, masks, mask_suffix, problems = _split_shared_folder(images, masks, mask_suffix)
        if problems:
            return [], problems
    explicit = mask_suffix is not None
    suffix = mask_suffix if explicit else infer_mask_suffix(images, masks)
    pairs, used, refused = [], set(), set()
    for key, image_path in images.items():
        mask_key = key + suffix
        if mask_key not in masks and not explicit and key in masks:
            mask_key = key
        if mask_key in masks and _resolved(masks[mask_key]) == _resolved(image_path):
            problems.append(f"mask must be another file than its image; got {image_path} for both. Name masks "
                            "NAME + a suffix (--mask_suffix) or keep them in their own --mask_folder")
            used.add(mask_key)
            refused.add(key)
        elif mask_key in masks:
            pairs.append(Pair(key, image_path, masks[mask_key]))
            used.add(mask_key)
    paired = {p.key for p in pairs} | refused
    orphans_img = [images[k].name for k in images if k not in paired]
    orphans_mask = [masks[k].name for k in masks if k not in used]
    hint = f" (mask key = image key + {suffix!r})" if suffix else ""
    if orphans_img:
        problems.append(f"{len(orphans_img)} image(s) have no mask{hint}: {', '.join(orphans_img)}")
    if orphans_mask:
        problems.append(f"{len(orphans_mask)} mask(s) have no image{hint}: {', '.join(orphans_mask)}")
    return pairs, problems


def _resolved(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _split_shared_folder(images: dict[str, Path], masks: dict[str, Path], mask_suffix: str | None
                         ) -> tuple[dict[str, Path], dict[str, Path], str, list[str]]:
    """Images and masks that live in one folder: masks are the files named NAME + suffix.

    The suffix is ``mask_suffix`` or the most common ``_x``/``-x``/``.x`` ending that turns one
    file's key into another's. Returns ``(images, masks, suffix, problems)``; a mask is never
    taken for an image, and no file is paired with itself.
    """
    folder = next(iter(images.values())).parent
    suffix = mask_suffix
    if suffix is None:
        counts: collections.Counter[str] = collections.Counter()
        for mask_key in masks:
            for cut in range(1, len(mask_key)):
                if mask_key[cut] in "_-." and mask_key[:cut] in images:
                    counts[mask_key[cut:]] += 1
        suffix = counts.most_common(1)[0][0] if counts else ""
    if not suffix:
        how = "--mask_suffix ''" if mask_suffix is not None else "no file is named like another plus a suffix"
        return {}, {}, "", [f"mask_suffix must tell masks from images when --image_folder and --mask_folder are the "
                            f"same folder ({folder}); got {how}, so every file would be its own mask. Name masks "
                            "NAME_mask.png and pass --mask_suffix _mask, or keep them in their own folder"]
    mask_keys = {k for k in masks if k.endswith(suffix) and len(k) > len(suffix)}
    return ({k: p for k, p in images.items() if k not in mask_keys}, {k: masks[k] for k in mask_keys}, suffix, [])


# Validation


@dataclasses.dataclass
class PairCheck:
    """The outcome of checking one image/mask pair."""

    key: str
    problems: list[str]
    image_shape: tuple[int, ...] | None = None  # (H, W, C)
    image_dtype: str | None = None
    mask_shape: tuple[int, ...] | None = None  # (H, W)
    mask_dtype: str | None = None


def check_pair_headers(pair: Pair) -> PairCheck:
    """Check a pair from file headers only: readability, layout, dtypes, sizes."""
    check = PairCheck(pair.key, [])
    try:
        info = read_info(pair.image)
        if info.is_volume:
            check.problems.append(f"image must be 2D; got a stack of shape (Z, Y, X, C) = {info.shape} "
                                  f"in {pair.image}")
        elif info.dtype not in IMAGE_DTYPES:
            check.problems.append(f"image dtype must be one of {', '.join(IMAGE_DTYPES)}; got {info.dtype} in "
                                  f"{pair.image}. Convert it (e.g. float64 -> float32)")
        else:
            check.image_shape, check.image_dtype = info.shape, info.dtype
    except ImageReadError as exc:
        check.problems.append(f"unreadable image: {exc}")
    try:
        minfo = read_info(pair.mask)
        if minfo.is_volume:
            check.problems.append(f"mask must be 2D; got a stack of shape {minfo.shape} in {pair.mask}")
        else:
            check.mask_shape, check.mask_dtype = minfo.shape[:2], minfo.dtype
            if minfo.shape[2] > 1 and minfo.shape[2] not in (2, 3, 4):
                check.problems.append(f"mask must have one channel; got {minfo.shape[2]} in {pair.mask}")
        lossy = lossy_format(pair.mask)
        if lossy:
            check.problems.append(f"mask must be saved in a lossless format; got {lossy} in {pair.mask}, whose "
                                  "compression adds stray values along every edge (they would become classes). "
                                  "Save masks as PNG or TIFF from the original labels")
    except ImageReadError as exc:
        check.problems.append(f"unreadable mask: {exc}")
    if check.image_shape and check.mask_shape and check.image_shape[:2] != check.mask_shape:
        check.problems.append(f"image and mask sizes differ: {pair.image} is {check.image_shape[0]}x"
                              f"{check.image_shape[1]} (HxW), {pair.mask} is {check.mask_shape[0]}x"
                              f"{check.mask_shape[1]}")
    return check


def check_mask_values(mask: np.ndarray, path: Path, number_classes: int | None,
                      mask_type: str, top: int | None = None) -> list[str]:
    """Problems with the values of a decoded mask (classes out of range). ``top``: mask.max() if known."""
    if mask_type == "semantic" and number_classes is not None and mask.size:
        top = int(mask.max()) if top is None else top
        if top >= number_classes:
            values = np.unique(mask)
            bad = values[values >= number_classes]
            shown = ", ".join(str(v) for v in bad[:10]) + (" ..." if len(bad) > 10 else "")
            return [f"mask values must be < number_classes={number_classes}; got {shown} in {path}. "
                    "Raise --number_classes or fix the mask"]
    return []


def cross_check(checks: list[PairCheck]) -> list[str]:
    """Problems that involve several images: differing channel counts and image dtypes."""
    problems = []
    for what, get in (("channel count", lambda c: c.image_shape[2]), ("image dtype", lambda c: c.image_dtype)):
        groups: dict[object, list[str]] = collections.defaultdict(list)
        for c in checks:
            if c.image_shape is not None:
                groups[get(c)].append(c.key)
        if len(groups) > 1:
            parts = []
            for value, keys in sorted(groups.items(), key=lambda kv: -len(kv[1])):
                shown = ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
                parts.append(f"{value} in {len(keys)} image(s) ({shown})")
            problems.append(f"{what} must be the same for all images; got " + "; ".join(parts))
    return problems
