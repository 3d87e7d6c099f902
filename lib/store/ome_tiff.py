"""OME-TIFF metadata: the OME-XML that tifffile writes (``ome=True``) with axes and the physical pixel size,
and the pixel size read back from a TIFF's OME-XML.

Pixel sizes are ``(y, x)`` in micrometres (the unit of ``inference.py --pixel_size``).
Pyramids (SubIFDs) of large outputs are written by :class:`lib.inference.sinks.TiffSink`.
"""

from __future__ import annotations

import os
from pathlib import Path

# OME units (PhysicalSizeXUnit) in micrometres.
OME_UNITS = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6, "Å": 1e-4, "pm": 1e-6}
# BigTIFF outputs whose longest side exceeds this get a pyramid of sub-resolutions (SubIFDs).
PYRAMID_ABOVE = 8192


def ome_metadata(axes: str, pixel_size: tuple[float, float] | None) -> dict:
    """tifffile ``metadata`` for an OME-TIFF of ``axes`` (e.g. ``"YX"``, ``"CYX"``, ``"YXS"``, ``"ZYX"``),
    with ``PhysicalSizeY``/``PhysicalSizeX`` in µm when ``pixel_size`` (y, x) is known."""
    metadata: dict = {"axes": axes}
    if pixel_size is not None:
        metadata.update({"PhysicalSizeY": float(pixel_size[0]), "PhysicalSizeYUnit": "µm",
                         "PhysicalSizeX": float(pixel_size[1]), "PhysicalSizeXUnit": "µm"})
    return metadata


def tiff_pixel_size(path: str | os.PathLike) -> tuple[float, float] | None:
    """``(y, x)`` pixel size in µm from the OME-XML of a TIFF, or None when it has none (or no unit we know)."""
    import tifffile

    try:
        with tifffile.TiffFile(Path(path)) as tif:
            xml = tif.ome_metadata
        if not xml:
            return None
        pixels = tifffile.xml2dict(xml)["OME"]["Image"]
        pixels = (pixels[0] if isinstance(pixels, list) else pixels)["Pixels"]
        sizes = []
        for axis in "YX":
            value = pixels.get(f"PhysicalSize{axis}")
            unit = pixels.get(f"PhysicalSize{axis}Unit", "µm")
            if value is None or unit not in OME_UNITS:
                return None
            sizes.append(float(value) * OME_UNITS[unit])
        return sizes[0], sizes[1]
    except Exception:  # no readable OME-XML: the size is unknown, the image itself is checked elsewhere
        return None
