"""Where a run's images come from and where their outputs go: the image opened for the tile stream (a
memory-mapped TIFF, a lazy OME-Zarr view, or the decoded array), the physical pixel size of its
outputs, and the paths of a semantic model's outputs in the chosen format.

Output formats (``--output_format``): ``tif`` (OME-TIFF; tiled BigTIFF with a pyramid for images
streamed above ``STREAM_PIXELS``), ``png`` (labels of 2D images held in memory; other outputs
TIFF), ``ome-zarr`` (every output of every image an OME-Zarr folder ``NAME.ome.zarr``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..store.images import TIFF_EXTENSIONS, ImageInfo, pixel_size_of, read_image
from ..store.ome_zarr import OmeZarrView, is_zarr_path, open_ome_zarr

if TYPE_CHECKING:
    from .runner import InferenceConfig, RunContext

# Images above this many pixels are memory-mapped (TIFF) or read window by window (OME-Zarr).
MEMMAP_PIXELS = 2 ** 24
OUTPUT_FORMATS = ("tif", "png", "ome-zarr")


def open_image(path: Path, info: ImageInfo):
    """The image as (H, W, C): memory-mapped when large and an uncompressed contiguous YX/YXC TIFF, a lazy
    view reading only the chunks each tile needs when large and OME-Zarr, else decoded."""
    large = info.shape[0] * info.shape[1] > MEMMAP_PIXELS
    if is_zarr_path(path) and large and not info.is_volume:
        return OmeZarrView(open_ome_zarr(path))
    if path.suffix.lower() in TIFF_EXTENSIONS and info.axes in ("YX", "YXC") and large:
        import tifffile

        try:
            mapped = tifffile.memmap(path, mode="r")
        except (ValueError, OSError, TypeError, IndexError):
            mapped = None
        if mapped is not None:
            if mapped.size == int(np.prod(info.shape)):
                return mapped.reshape(info.shape)
    return read_image(path)


def output_pixel_size(config: InferenceConfig, image_path: Path) -> tuple[float, float] | None:
    """``(y, x)`` pixel size in µm for the outputs' metadata: ``--pixel_size``, else the input's metadata
    (OME-Zarr scale, OME-TIFF PhysicalSize), else None (unknown)."""
    if config.pixel_size is not None:
        return float(config.pixel_size), float(config.pixel_size)
    return pixel_size_of(image_path)


def output_name(key: str, fmt: str) -> str:
    """``KEY.tif``, ``KEY.png`` or ``KEY.ome.zarr``."""
    return f"{key}.ome.zarr" if fmt == "ome-zarr" else f"{key}.{fmt}"


def semantic_paths(context: RunContext, key: str, layout: str, evaluate: bool) -> dict[str, Path]:
    """Every file one image of a semantic model produces; the record is written last and marks the image done."""
    config, out = context.config, context.out
    zarr = config.output_format == "ome-zarr"
    maps = "ome-zarr" if zarr else "tif"
    fmt = config.output_format if layout == "plane" or zarr else "tif"  # stacks and streamed images: not png
    paths = {"labels": out / output_name(key, fmt)}
    if config.probabilities:
        paths["probabilities"] = out / "probabilities" / output_name(key, maps)
    if config.uncertainty:
        paths["entropy"] = out / "uncertainty" / output_name(f"{key}_entropy", maps)
        if context.predictor.samples > 1 and layout != "volume":
            paths["spread"] = out / "uncertainty" / output_name(f"{key}_spread", maps)
    if evaluate and layout != "volume":
        paths["overlay"] = out / "overlays" / f"{key}.png"
    paths["record"] = out / "records" / f"{key}.json"
    return paths
