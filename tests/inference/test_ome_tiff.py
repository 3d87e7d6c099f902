"""OME-TIFF outputs: label and probability TIFFs carry OME-XML with axes and the physical pixel size, and
BigTIFFs larger than 8192 px carry a SubIFD pyramid (nearest neighbour for labels, 2 x 2 mean for maps).
(inference.py's own OME-TIFFs: tests/inference/test_ome_inference.py.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lib.inference.sinks import TiffSink
from lib.inference.tiled import write_tiled_tiff
from lib.store.images import pixel_size_of, read_image, write_image
from lib.store.ome_pyramid import downsample

tifffile = pytest.importorskip("tifffile")


def _pixels(path: Path) -> dict:
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome
        image = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]
        return (image[0] if isinstance(image, list) else image)["Pixels"]


def test_ome_tiff_writer_records_axes_and_pixel_size(tmp_path):
    labels = np.arange(60 * 40, dtype=np.uint16).reshape(60, 40) % 7
    write_image(tmp_path / "labels.tif", labels, ome=True, pixel_size=(0.25, 0.5))
    with tifffile.TiffFile(tmp_path / "labels.tif") as tif:
        assert tif.series[0].axes == "YX"
    pixels = _pixels(tmp_path / "labels.tif")
    assert pixels["PhysicalSizeX"] == 0.5 and pixels["PhysicalSizeY"] == 0.25 and pixels["PhysicalSizeXUnit"] == "µm"
    assert pixel_size_of(tmp_path / "labels.tif") == (0.25, 0.5)
    assert np.array_equal(read_image(tmp_path / "labels.tif")[..., 0], labels)
    maps = np.random.default_rng(0).random((30, 20, 3)).astype(np.float32)
    write_image(tmp_path / "maps.tif", maps, ome=True)  # pixel size unknown: axes only
    with tifffile.TiffFile(tmp_path / "maps.tif") as tif:
        assert tif.series[0].axes == "CYX" and tif.series[0].shape == (3, 30, 20)
    assert "PhysicalSizeX" not in _pixels(tmp_path / "maps.tif") and pixel_size_of(tmp_path / "maps.tif") is None
    assert np.array_equal(read_image(tmp_path / "maps.tif"), maps)
    stack = np.random.default_rng(1).random((2, 8, 9, 3)).astype(np.float32)
    write_image(tmp_path / "stack.tif", stack, ome=True, pixel_size=(1.0, 1.0))
    with tifffile.TiffFile(tmp_path / "stack.tif") as tif:
        assert tif.series[0].axes == "ZCYX"
    write_image(tmp_path / "plain.tif", labels)  # the default stays a plain TIFF
    with tifffile.TiffFile(tmp_path / "plain.tif") as tif:
        assert not tif.is_ome


def test_a_bigtiff_above_8192_px_gets_a_pyramid(tmp_path):
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 5, (8200, 300)).astype(np.uint8)
    write_tiled_tiff(tmp_path / "labels.tif", labels)
    with tifffile.TiffFile(tmp_path / "labels.tif") as tif:
        series = tif.series[0]
        assert tif.is_bigtiff and tif.is_ome and len(series.levels) == 6
        assert [level.shape for level in series.levels] == [(8200, 300), (4100, 150), (2050, 75), (1025, 38),
                                                            (513, 19), (257, 10)]
        assert np.array_equal(series.levels[0].asarray(), labels)
        assert np.array_equal(series.levels[3].asarray(), labels[::8, ::8])  # nearest neighbour
    assert not list(tmp_path.glob(".*"))  # scratch levels and temporaries removed
    maps = rng.random((300, 8300, 2)).astype(np.float32)
    sink = TiffSink("probabilities", tmp_path / "maps.tif", maps.shape, np.float32, pixel_size=(0.3, 0.3))
    for y in range(0, 300, 70):  # rows of zones as the zone loop puts them
        sink.put((y, min(y + 70, 300), 0, 4000), maps[y:y + 70, :4000])
        sink.put((y, min(y + 70, 300), 4000, 8300), maps[y:y + 70, 4000:])
    sink.close(True)
    with tifffile.TiffFile(tmp_path / "maps.tif") as tif:
        series = tif.series[0]
        assert series.axes == "YXS" and len(series.levels) == 6
        assert np.allclose(series.levels[1].asarray(), downsample(maps, "mean"))
        assert np.allclose(series.levels[1].asarray()[:2, :2], maps[:4, :4].reshape(2, 2, 2, 2, 2).mean(axis=(1, 3)))
    assert _pixels(tmp_path / "maps.tif")["PhysicalSizeX"] == 0.3
    small = rng.integers(0, 3, (500, 8000)).astype(np.uint8)  # not above 8192 px: no pyramid
    write_tiled_tiff(tmp_path / "small.tif", small)
    with tifffile.TiffFile(tmp_path / "small.tif") as tif:
        assert len(tif.series[0].levels) == 1
