"""OME-Zarr images in and out (lib.store.ome_zarr): round trips, foreign NGFF files (ome-zarr's own writer,
0.4 and 0.5), lazy windows that read only their chunks, pyramids that meet the reader's and napari's
conventions, folders as images in list_images / pairing / build_lmdb, and damaged folders told in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lib.store.images import (
    ImageReadError,
    list_images,
    pair_images_masks,
    pixel_size_of,
    read_image,
    read_info,
    read_mask,
    read_volume,
    write_image,
)
from lib.store.ome_pyramid import StripPyramid, downsample, level_count, level_shapes
from lib.store.ome_zarr import OmeZarrView, open_ome_zarr, write_ome_zarr

zarr = pytest.importorskip("zarr")
pytestmark = pytest.mark.filterwarnings("ignore:Call to deprecated class Scaler")  # ome-zarr's own default


def _foreign(path: Path, array: np.ndarray, axes: str, scale: list[float], fmt: str = "0.4") -> Path:
    """An NGFF image written by ome-zarr's own writer (not ours): its default pyramid (levels s0, s1, ...),
    spatial axes in micrometres."""
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_image as ome_write_image

    version = FormatV04() if fmt == "0.4" else FormatV05()
    root = zarr.open_group(str(path), mode="w", zarr_format=2 if fmt == "0.4" else 3)
    ome_write_image(array, root, axes=axes, fmt=version, scale=dict(zip(axes, scale)),
                    axes_units={a: "micrometer" for a in axes if a in "zyx"})
    return path


def test_round_trip_of_labels_maps_and_stacks_with_pyramids(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, (1100, 700)).astype(np.uint8)
    write_ome_zarr(tmp_path / "labels.ome.zarr", labels, labels=True, pixel_size=(0.4, 0.5))
    assert np.array_equal(read_image(tmp_path / "labels.ome.zarr")[..., 0], labels)
    assert read_info(tmp_path / "labels.ome.zarr").shape == (1100, 700, 1)
    assert pixel_size_of(tmp_path / "labels.ome.zarr") == (0.4, 0.5)
    group = zarr.open_group(str(tmp_path / "labels.ome.zarr"), mode="r")
    assert [group[str(i)].shape for i in range(3)] == [(1100, 700), (550, 350), (275, 175)]
    assert np.array_equal(group["2"][...], labels[::4, ::4])  # nearest neighbour: every 4th pixel
    maps = rng.random((300, 260, 3)).astype(np.float32)
    write_ome_zarr(tmp_path / "maps.zarr", maps, labels=False)
    back = read_image(tmp_path / "maps.zarr")
    assert back.dtype == np.float32 and np.array_equal(back, maps)
    assert open_ome_zarr(tmp_path / "maps.zarr").axes == "cyx" and pixel_size_of(tmp_path / "maps.zarr") is None
    stack = rng.integers(0, 3, (4, 90, 70)).astype(np.uint16)
    write_ome_zarr(tmp_path / "stack.ome.zarr", stack, labels=True, volume=True)
    assert np.array_equal(read_volume(tmp_path / "stack.ome.zarr")[..., 0], stack)
    assert not list(tmp_path.glob(".*partial*"))


def test_pyramid_strips_equal_whole_image_downsampling():
    rng = np.random.default_rng(1)
    image = rng.random((131, 77, 2)).astype(np.float32)
    levels = level_count(131, 77, smallest=20)
    assert level_shapes(131, 77, levels)[-1] == (17, 10) and levels == 4
    got: dict[int, list] = {}
    pyramid = StripPyramid(131, levels, "mean", 8, lambda level, y0, strip: got.setdefault(level, []).append(
        (y0, strip.copy())))
    for y in range(0, 131, 13):  # strips of rows that do not match the pyramid's
        pyramid.put(image[y:y + 13])
    assert pyramid.complete
    expected = image
    for level in range(levels):
        parts = got[level]
        assert [y0 for y0, _ in parts] == list(np.cumsum([0] + [p.shape[0] for _, p in parts])[:-1])
        assert np.allclose(np.concatenate([p for _, p in parts]), expected, atol=1e-6)
        expected = downsample(expected, "mean")
    assert np.allclose(downsample(image[:2, :2], "mean"), image[:2, :2].mean(axis=(0, 1)))


def test_foreign_ngff_images_0_4_and_0_5_are_read_with_axes_and_pixel_size(tmp_path):
    rng = np.random.default_rng(2)
    cyx = rng.integers(0, 4000, (2, 60, 50)).astype(np.uint16)
    _foreign(tmp_path / "a.ome.zarr", cyx, "cyx", [1.0, 0.325, 0.325])
    info = read_info(tmp_path / "a.ome.zarr")
    assert info.shape == (60, 50, 2) and info.dtype == "uint16" and info.axes == "CYX"
    assert np.array_equal(read_image(tmp_path / "a.ome.zarr"), np.moveaxis(cyx, 0, -1))
    assert pixel_size_of(tmp_path / "a.ome.zarr") == (0.325, 0.325)
    tczyx = rng.integers(0, 255, (1, 1, 3, 40, 30)).astype(np.uint8)
    _foreign(tmp_path / "b.zarr", tczyx, "tczyx", [1.0, 1.0, 2.0, 0.5, 0.25], fmt="0.5")
    assert read_info(tmp_path / "b.zarr").shape == (3, 40, 30, 1)
    assert np.array_equal(read_volume(tmp_path / "b.zarr")[..., 0], tczyx[0, 0])
    assert pixel_size_of(tmp_path / "b.zarr") == (0.5, 0.25) and open_ome_zarr(tmp_path / "b.zarr").z_size == 2.0


def test_a_window_reads_only_its_chunks(tmp_path):
    """The chunks outside a window are overwritten with garbage: reading the window must not touch them."""
    rng = np.random.default_rng(3)
    image = rng.integers(0, 60000, (1500, 1200)).astype(np.uint16)
    path = write_ome_zarr(tmp_path / "big.ome.zarr", image, labels=False)
    view = OmeZarrView(open_ome_zarr(path))
    assert view.shape == (1500, 1200, 1) and len(view) == 1500
    for chunk in (path / "0").glob("*/*"):  # level 0 chunks are 0/ROW/COL (512 px)
        if (int(chunk.parent.name), int(chunk.name)) != (1, 1):
            chunk.write_bytes(b"garbage" * 10)
    assert np.array_equal(view[520:1000, 600:1020][..., 0], image[520:1000, 600:1020])
    with pytest.raises(Exception):
        view[0:10, 0:10]


def test_ome_zarr_reader_and_napari_conventions(tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    labels = np.random.default_rng(4).integers(0, 3, (1200, 900)).astype(np.uint8)
    write_ome_zarr(tmp_path / "cells.ome.zarr", labels, labels=True, pixel_size=(0.65, 0.65))
    node = next(iter(Reader(parse_url(str(tmp_path / "cells.ome.zarr")))()))
    axes = node.metadata["axes"]
    assert [(a["name"], a["type"], a.get("unit")) for a in axes] == [("y", "space", "micrometer"),
                                                                      ("x", "space", "micrometer")]
    scales = [t[0]["scale"] for t in node.metadata["coordinateTransformations"]]
    assert scales == [[0.65, 0.65], [1.3, 1.3], [2.6, 2.6]]
    shapes = [tuple(level.shape) for level in node.data]
    assert shapes == sorted(shapes, reverse=True) and shapes[0] == (1200, 900)  # full resolution first
    assert np.array_equal(np.asarray(node.data[0]), labels)
    assert any(type(spec).__name__ == "Label" for spec in node.specs)  # napari: a labels layer
    attrs = json.loads((tmp_path / "cells.ome.zarr" / ".zattrs").read_text())
    assert attrs["multiscales"][0]["version"] == "0.4" and attrs["image-label"]["version"] == "0.4"


def test_folders_are_images_in_listing_pairing_and_build_lmdb(tmp_path):
    import build_lmdb

    rng = np.random.default_rng(5)
    for i in range(4):
        image = rng.integers(0, 60000, (64, 64)).astype(np.uint16)
        mask = rng.integers(0, 3, (64, 64)).astype(np.uint8)
        write_ome_zarr(tmp_path / "images" / f"img_{i}.ome.zarr", image, labels=False)
        if i % 2:
            write_ome_zarr(tmp_path / "masks" / f"img_{i}_mask.zarr", mask, labels=True)
        else:
            write_image(tmp_path / "masks" / f"img_{i}_mask.png", mask)
    images, problems = list_images(tmp_path / "images")
    assert sorted(images) == [f"img_{i}" for i in range(4)] and not problems
    assert list_images(tmp_path / "images", "zarr")[0] == images and not list_images(tmp_path / "images", "tif")[0]
    pairs, problems = pair_images_masks(images, list_images(tmp_path / "masks")[0])
    assert len(pairs) == 4 and not problems
    assert read_mask(pairs[1].mask).shape == (64, 64)
    code = build_lmdb.main(["--image_folder", str(tmp_path / "images"), "--mask_folder", str(tmp_path / "masks"),
                            "--output_folder", str(tmp_path / "db"), "--dataset_name", "z", "--tile_size", "32",
                            "--number_classes", "3", "--workers", "0"])
    assert code == 0 and (tmp_path / "db" / "train-z.lmdb").is_dir()


def test_a_zarr_folder_that_is_not_an_image_is_named(tmp_path):
    bad = tmp_path / "images" / "empty.zarr"
    bad.mkdir(parents=True)
    with pytest.raises(ImageReadError, match=r"empty\.zarr"):
        read_info(bad)
    group = zarr.open_group(str(tmp_path / "images" / "plain.zarr"), mode="w", zarr_format=2)
    group.create_array("0", shape=(10, 10), dtype="uint8")
    with pytest.raises(ImageReadError, match=r"must have 'multiscales' metadata.*plain\.zarr"):
        read_image(tmp_path / "images" / "plain.zarr")
