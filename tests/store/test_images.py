"""Image I/O, axes, masks and pairing by key."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile

from lib.common.errors import BadInput
from lib.store.images import (
    DatasetError,
    FolderNotFoundError,
    ImageReadError,
    ImageWriteError,
    check_pair_headers,
    cross_check,
    infer_mask_suffix,
    list_images,
    pair_images_masks,
    read_image,
    read_info,
    read_mask,
    read_volume,
    write_image,
)


@pytest.mark.parametrize("suffix", [".tif", ".png"])
@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int32", "float32"])
@pytest.mark.parametrize("channels", [0, 1, 3])
def test_write_read_round_trip(tmp_path, suffix, dtype, channels):
    rng = np.random.default_rng(1)
    shape = (17, 23) if channels == 0 else (17, 23, channels)
    array = (rng.random(shape) * 200).astype(dtype)
    path = tmp_path / f"a{suffix}"
    png_ok = dtype in ("uint8", "uint16") and not (dtype == "uint16" and channels == 3)
    if suffix == ".png" and not png_ok:
        with pytest.raises(ValueError, match="Use .tif"):
            write_image(path, array)
        assert not list(tmp_path.iterdir()), "a refused write must leave nothing behind"
        return
    write_image(path, array)
    back = read_image(path)
    assert back.dtype == np.dtype(dtype)
    assert back.shape == (17, 23, max(channels, 1))
    np.testing.assert_array_equal(back.reshape(shape), array)
    assert read_info(path).shape == back.shape
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_channel_first_tiff_is_recognised(tmp_path):
    array = np.arange(2 * 40 * 50, dtype=np.uint16).reshape(2, 40, 50)
    tifffile.imwrite(tmp_path / "cyx.tif", array, photometric="minisblack", metadata={"axes": "CYX"})
    np.testing.assert_array_equal(read_image(tmp_path / "cyx.tif"), np.moveaxis(array, 0, -1))
    # Without axes metadata the small leading dimension is taken for channels too.
    tifffile.imwrite(tmp_path / "plain.tif", array, photometric="minisblack", metadata=None)
    assert read_image(tmp_path / "plain.tif").shape == (40, 50, 2)


def test_stacks_read_as_zyxc_and_refused_as_2d(tmp_path):
    stack = np.random.default_rng(0).integers(0, 1000, (20, 32, 48), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "zyx.tif", stack, metadata={"axes": "ZYX"})
    volume = read_volume(tmp_path / "zyx.tif")
    assert volume.shape == (20, 32, 48, 1)
    np.testing.assert_array_equal(volume[..., 0], stack)
    with pytest.raises(ImageReadError, match="stack"):
        read_image(tmp_path / "zyx.tif")
    assert read_info(tmp_path / "zyx.tif").shape == (20, 32, 48, 1)
    zyxc = np.zeros((5, 16, 16, 3), np.uint8)
    tifffile.imwrite(tmp_path / "zyxc.tif", zyxc, metadata={"axes": "ZYXC"})
    assert read_volume(tmp_path / "zyxc.tif").shape == (5, 16, 16, 3)


def test_binary_255_masks_become_0_1(tmp_path):
    mask = np.zeros((10, 10), np.uint8)
    mask[2:5, 3:7] = 255
    write_image(tmp_path / "m.png", mask)
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png"), (mask > 0).astype(np.uint8))
    # A mask with other values keeps them: 255 is then a genuine class.
    mask[0, 0] = 3
    write_image(tmp_path / "k.png", mask)
    assert read_mask(tmp_path / "k.png").max() == 255


def test_rgb_mask_with_equal_channels_is_accepted_and_colour_mask_refused(tmp_path):
    grey = np.random.default_rng(0).integers(0, 4, (8, 9), dtype=np.uint8)
    write_image(tmp_path / "rgb.png", np.stack([grey] * 3, axis=-1))
    np.testing.assert_array_equal(read_mask(tmp_path / "rgb.png"), grey)
    colour = np.stack([grey, grey, grey + 1], axis=-1)
    write_image(tmp_path / "colour.png", colour)
    with pytest.raises(ImageReadError, match="one channel.*colour.png"):
        read_mask(tmp_path / "colour.png")


@pytest.mark.parametrize("values, message", [
    (np.array([[0, 1.5]], np.float32), "must be integers"),
    (np.array([[0, -2]], np.int32), "must be >= 0"),
    (np.array([[0.0, 2.0]], np.float32), None),
])
def test_mask_value_rules(tmp_path, values, message):
    path = tmp_path / "m.tif"
    tifffile.imwrite(path, values)
    if message is None:
        np.testing.assert_array_equal(read_mask(path), values.astype(np.uint8))
        assert read_mask(path).dtype == np.uint8
    else:
        with pytest.raises(ImageReadError, match=message):
            read_mask(path)


def test_truncated_and_garbage_files_are_named(tmp_path):
    image = np.random.default_rng(0).integers(0, 60000, (64, 64), dtype=np.uint16)
    write_image(tmp_path / "whole.tif", image)
    data = (tmp_path / "whole.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    for name in ("cut.tif", "junk.png"):
        with pytest.raises(ImageReadError, match=name):
            read_image(tmp_path / name)


@pytest.mark.parametrize("image_keys, mask_keys, expected", [
    (["a", "b"], ["a", "b"], ""),
    (["0001", "0002"], ["0001_mask", "0002_mask"], "_mask"),
    (["img_1", "img_10"], ["img_1", "img_10"], ""),
    (["x1", "x2", "x3"], ["x1-label", "x2-label", "x3"], "-label"),
])
def test_infer_mask_suffix(image_keys, mask_keys, expected):
    assert infer_mask_suffix(image_keys, mask_keys) == expected


def test_pairing_is_by_key_so_a_missing_mask_shifts_nothing(tmp_path):
    images = {k: Path(f"{k}.tif") for k in ("a", "b", "c", "d")}
    masks = {f"{k}_mask": Path(f"{k}_mask.png") for k in ("a", "c", "d", "e")}
    pairs, problems = pair_images_masks(images, masks)
    assert [(p.key, p.mask.name) for p in pairs] == [("a", "a_mask.png"), ("c", "c_mask.png"),
                                                     ("d", "d_mask.png")]
    assert any("image(s) have no mask" in p and "b.tif" in p for p in problems)
    assert any("mask(s) have no image" in p and "e_mask.png" in p for p in problems)
    pairs, problems = pair_images_masks(images, masks, mask_suffix="_seg")
    assert pairs == [] and len(problems) == 2


def test_list_images_filters_format_and_reports_duplicate_keys(tmp_path):
    for name in ("a.tif", "b.tiff", "c.png", ".hidden.tif", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    files, problems = list_images(tmp_path, "tif")
    assert sorted(files) == ["a", "b"] and problems == []
    (tmp_path / "a.png").write_bytes(b"")
    files, problems = list_images(tmp_path)
    assert sorted(files) == ["a", "b", "c"]
    assert len(problems) == 1 and "a.png" in problems[0] and "a.tif" in problems[0]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_images(tmp_path / "nowhere")


def test_header_checks_and_cross_checks(tmp_path):
    from lib.store.images import Pair

    write_image(tmp_path / "i1.tif", np.zeros((20, 30), np.uint16))
    write_image(tmp_path / "m1.png", np.zeros((20, 31), np.uint8))
    write_image(tmp_path / "i2.tif", np.zeros((20, 30, 3), np.uint16))
    write_image(tmp_path / "i3.tif", np.zeros((20, 30), np.float64))
    write_image(tmp_path / "m2.png", np.zeros((20, 30), np.uint8))
    c1 = check_pair_headers(Pair("1", tmp_path / "i1.tif", tmp_path / "m1.png"))
    assert len(c1.problems) == 1 and "20x30" in c1.problems[0] and "20x31" in c1.problems[0]
    c2 = check_pair_headers(Pair("2", tmp_path / "i2.tif", tmp_path / "m2.png"))
    assert c2.problems == []
    c3 = check_pair_headers(Pair("3", tmp_path / "i3.tif", tmp_path / "m2.png"))
    assert "float64" in c3.problems[0] and "i3.tif" in c3.problems[0]
    problems = cross_check([c1, c2])
    assert len(problems) == 1 and "channel count" in problems[0]


def test_dataset_error_lists_every_problem():
    error = DatasetError(["first thing", "second thing"])
    assert error.problems == ["first thing", "second thing"]
    assert "(2)" in str(error) and "first thing" in str(error) and "second thing" in str(error)


@pytest.fixture
def umask_022(monkeypatch):
    """Run under umask 022 (and make lib.common.files read it afresh)."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


@pytest.mark.parametrize("name", ["a.tif", "a.png", "a.jpg", "a.bmp"])
def test_write_image_mode_follows_the_umask(tmp_path, umask_022, name):
    # The old mkstemp writer left every image 0600 whatever the umask.
    write_image(tmp_path / name, np.zeros((8, 9), np.uint8))
    assert (tmp_path / name).stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == [name], "no temporary file is left behind"


def test_write_image_replaces_a_file_atomically(tmp_path):
    path = tmp_path / "a.tif"
    write_image(path, np.zeros((8, 9), np.uint16))
    write_image(path, np.ones((4, 5), np.uint16))
    np.testing.assert_array_equal(read_image(path)[..., 0], np.ones((4, 5), np.uint16))
    assert [p.name for p in tmp_path.iterdir()] == ["a.tif"]


@pytest.mark.parametrize("error, second_base", [(ImageReadError, None), (DatasetError, None),
                                                (ImageWriteError, ValueError),
                                                (FolderNotFoundError, FileNotFoundError)])
def test_errors_are_bad_input_with_exit_code_2(error, second_base):
    assert issubclass(error, BadInput) and error.exit_code == 2
    if second_base is not None:
        assert issubclass(error, second_base)


def test_write_image_refuses_unknown_formats_and_writes_nothing(tmp_path):
    with pytest.raises(ImageWriteError, match="output format must be one of"):
        write_image(tmp_path / "a.gif", np.zeros((4, 4), np.uint8))
    with pytest.raises(ImageWriteError, match="Use .tif"):
        write_image(tmp_path / "a.png", np.zeros((4, 4, 3), np.uint16))
    assert list(tmp_path.iterdir()) == []
