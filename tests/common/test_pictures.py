"""Tests of lib/common/pictures.py: one display stretch, one colour vocabulary, overlays, PNGs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lib.common import pictures

ROOT = Path(__file__).resolve().parents[2]


def test_false_positive_and_missed_pixels_look_the_same_in_semantic_and_instance_overlays():
    # One image, one false-positive pixel (0, 1) and one missed pixel (0, 3) in both kinds of overlay.
    image = np.array([[10, 200, 30, 120, 60, 90]], np.uint16)
    truth = np.array([[0, 0, 0, 1, 0, 0]])
    predicted = np.array([[0, 1, 0, 0, 0, 0]])
    semantic = pictures.semantic_overlay(image[..., None], predicted, truth)
    instance = pictures.instance_overlay(image, truth, predicted, matched_ids=np.array([], int),
                                         false_positive_ids=np.array([1]), missed_ids=np.array([1]))
    # The instance outline is opaque; a one-pixel object is all outline. Compare the tint on a
    # larger false positive too, below.
    assert tuple(instance[0, 1]) == pictures.FALSE_POSITIVE
    assert tuple(semantic[0, 3]) == tuple(instance[0, 3])  # missed: the same blue tint
    assert tuple(semantic[0, 0]) == tuple(instance[0, 0])  # background: the same display stretch

    image = np.arange(25, dtype=np.float32).reshape(5, 5)
    truth = np.zeros((5, 5), np.int32)
    predicted = np.zeros((5, 5), np.int32)
    predicted[1:4, 1:4] = 7  # a 3x3 false positive: its centre (2, 2) is tinted, not outlined
    truth[4, 4] = 3  # missed
    semantic = pictures.semantic_overlay(image, (predicted > 0).astype(np.uint8), (truth > 0).astype(np.uint8))
    instance = pictures.instance_overlay(image, truth, predicted, np.array([], int), np.array([7]), np.array([3]))
    assert tuple(semantic[2, 2]) == tuple(instance[2, 2]) != tuple(semantic[0, 0])
    assert tuple(semantic[4, 4]) == tuple(instance[4, 4]) != tuple(semantic[0, 0])
    # and the tint is the vocabulary's colour, blended OVERLAY_ALPHA into the image
    grey = pictures.display_image(image)[2, 2].astype(np.float64)
    expected = np.round((1 - pictures.OVERLAY_ALPHA) * grey + pictures.OVERLAY_ALPHA * np.array(pictures.FALSE_POSITIVE))
    assert tuple(instance[2, 2]) == tuple(expected.astype(np.uint8))


def test_semantic_overlay_colours_each_case():
    image = np.zeros((1, 5, 1), np.uint8)
    mask = np.array([[1, 0, 1, 2, 0]])
    labels = np.array([[1, 1, 0, 1, 0]])
    picture = pictures.semantic_overlay(image, labels, mask).astype(np.float64)
    alpha = pictures.OVERLAY_ALPHA
    for x, colour in enumerate((pictures.TRUE_POSITIVE, pictures.FALSE_POSITIVE, pictures.FALSE_NEGATIVE,
                                pictures.WRONG_CLASS)):
        np.testing.assert_array_equal(picture[0, x], np.round(alpha * np.array(colour)))
    np.testing.assert_array_equal(picture[0, 4], [0, 0, 0])


def test_semantic_overlay_subsamples_long_images():
    side = pictures.OVERLAY_MAX_SIDE + 1
    picture = pictures.semantic_overlay(np.zeros((1, side, 1), np.uint8), np.zeros((1, side), np.uint8),
                                        np.zeros((1, side), np.uint8))
    assert picture.shape == (1, (side + 1) // 2, 3)


def test_display_stretch():
    # 201 values 0..200: the 0.5th percentile is 1, the 99.5th 199; 100 -> 99/198 = 0.5 -> 127.5 -> 128.
    values = np.arange(201, dtype=np.uint16).reshape(1, 201)
    grey = pictures.display_image(values)
    assert grey.shape == (1, 201, 3) and (grey[..., 0] == grey[..., 2]).all()
    assert tuple(grey[0, [0, 1, 100, 199, 200], 0]) == (0, 0, 128, 255, 255)
    two = pictures.display_image(np.stack([values, 200 - values], axis=2))
    assert tuple(two[0, 0]) == (0, 255, 0) and tuple(two[0, 200]) == (255, 0, 0)  # red, green, no blue
    four = np.random.default_rng(0).random((4, 4, 4))
    np.testing.assert_array_equal(pictures.display_image(four), pictures.stretch(four[..., :3]))
    np.testing.assert_array_equal(pictures.display_image(np.full((2, 2), 7.5)), np.zeros((2, 2, 3)))
    with pytest.raises(ValueError, match=r"image must be \(H, W\) or \(H, W, C\); got shape \(1, 1, 1, 1\)"):
        pictures.display_image(np.zeros((1, 1, 1, 1)))


def test_colour_labels():
    label = np.array([[0, 1, 2], [2, 0, 300]])
    rgb = pictures.colour_labels(label)
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    assert (rgb[label == 0] == 0).all() and (rgb[label > 0] >= 64).all()
    np.testing.assert_array_equal(rgb[0, 2], rgb[1, 0])  # one id, one colour
    assert len({tuple(rgb[0, 1]), tuple(rgb[0, 2]), tuple(rgb[1, 2])}) == 3


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_save_png_is_atomic_with_the_umask_mode(tmp_path, monkeypatch, mask, mode):
    from PIL import Image

    previous = os.umask(mask)
    try:
        rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
        path = pictures.save_png(tmp_path / "sub" / "picture.png", rgb)
    finally:
        os.umask(previous)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), rgb)
    assert os.stat(path).st_mode & 0o777 == mode
    assert [p.name for p in path.parent.iterdir()] == ["picture.png"]
    with pytest.raises(ValueError, match=r"rgb must be an \(H, W, 3\) uint8 picture; got float32"):
        pictures.save_png(tmp_path / "bad.png", np.zeros((2, 2, 3), np.float32))
    assert not (tmp_path / "bad.png").exists()


def test_instance_overlay_rejects_different_sizes():
    with pytest.raises(ValueError, match="must have one height and width"):
        pictures.instance_overlay(np.zeros((2, 3)), np.zeros((2, 2), int), np.zeros((2, 2), int), [], [], [])


def test_pictures_import_no_other_lib_package():
    code = ("import sys, lib.common.pictures\n"
            "other = sorted(m for m in sys.modules if m.startswith('lib.') and not m.startswith('lib.common'))\n"
            "assert not other, other")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("points", [1, 2, 5])
def test_charts_are_one_png_with_a_panel_each(tmp_path, points):
    from PIL import Image

    steps = list(range(100, 100 * (points + 1), 100))
    panels = [pictures.Panel("loss", "loss", {"train": (steps, [1.0 / s for s in steps])}, log_scale=True),
              pictures.Panel("quality", "score", {"IoU": (steps, [0.5] * points)}, y_limits=(0, 1))]
    path = pictures.save_charts(tmp_path / "charts.png", panels)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (800, 320)  # 5 x 4 inches a panel at 80 dpi
    assert sorted(p.name for p in tmp_path.iterdir()) == ["charts.png"]
