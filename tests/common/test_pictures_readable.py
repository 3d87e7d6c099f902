"""Readable pictures of lib/common/pictures.py: enlargement, legend strip, colour-mapped previews."""

from __future__ import annotations

import numpy as np
import pytest

from lib.common import pictures


def _scene(side=256):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 4000, (side, side)).astype(np.uint16)
    yy, xx = np.mgrid[:side, :side]
    truth = ((yy - 100) ** 2 + (xx - 100) ** 2 < 40 ** 2).astype(np.int32) + 2 * ((yy - 180) ** 2 + (xx - 60) ** 2 < 400)
    predicted = ((yy - 105) ** 2 + (xx - 100) ** 2 < 40 ** 2).astype(np.int32) + ((yy - 180) ** 2 + (xx - 60) ** 2 < 400)
    return image, predicted, truth


def _swatch_pixels(strip, colour):
    return int((strip == np.array(colour, np.uint8)).all(axis=2).sum())


def test_a_256_px_semantic_overlay_is_enlarged_3x_with_every_colour_in_its_legend():
    image, predicted, truth = _scene()
    plain = pictures.semantic_overlay(image, predicted, truth)
    readable = pictures.semantic_overlay(image, predicted, truth, readable=True)
    assert plain.shape == (256, 256, 3)  # the default stays pixel for pixel
    assert readable.shape[1] == 768 and readable.shape[0] > 768 and readable.dtype == np.uint8
    np.testing.assert_array_equal(readable[:768:3, ::3], plain)  # nearest neighbour: every pixel a 3 x 3 square
    np.testing.assert_array_equal(readable[1:768:3, 2::3], plain)
    strip = readable[768:]
    assert (strip[:, -20:] == 255).all()  # white strip
    for name, colour in pictures.SEMANTIC_LEGEND:
        assert _swatch_pixels(strip, colour) >= pictures.LEGEND_FONT_PX ** 2 * 0.8, name  # a filled square each


def test_instance_overlay_legend_and_a_tiny_image_gets_room_for_its_legend():
    image, predicted, truth = _scene(40)
    readable = pictures.instance_overlay(image, truth, predicted, np.array([1]), np.array([]), np.array([2]),
                                         readable=True)
    factor = 16  # 40 px: ceil(768 / 40) = 20, capped at MAX_ENLARGEMENT
    assert pictures.MAX_ENLARGEMENT == factor and readable.shape[1] == 40 * factor
    plain = pictures.instance_overlay(image, truth, predicted, np.array([1]), np.array([]), np.array([2]))
    np.testing.assert_array_equal(readable[:40 * factor:factor, ::factor], plain)
    for name, colour in pictures.INSTANCE_LEGEND:
        assert _swatch_pixels(readable[40 * factor:], colour) >= 200, name
    narrow = pictures.with_legend(np.zeros((1, 6, 3), np.uint8), pictures.INSTANCE_LEGEND, title="one row")
    assert narrow.shape[1] == pictures.LEGEND_MIN_WIDTH and (narrow[:16, 96:] == 255).all()  # white margin


@pytest.mark.parametrize("side, factor", [(256, 3), (768, 1), (1000, 1), (100, 8), (5, 16)])
def test_enlarge_by_whole_factors(side, factor):
    picture = np.arange(side * 2, dtype=np.uint8).reshape(2, side)
    assert pictures.enlarge(picture).shape == (2 * factor, side * factor)


def test_preview_levels_get_their_own_colours_and_bad_shapes_are_refused():
    counts = np.repeat(np.arange(4, dtype=np.uint8), 64).reshape(1, 256).repeat(8, axis=0)
    picture = pictures.preview(counts, "agreement", levels=["0", "1", "2", "3"])
    colours = {tuple(picture[0, 64 * k * 3 + 10]) for k in range(4)}
    assert len(colours) == 4 and all(_swatch_pixels(picture[24:], c) >= 200 for c in colours)
    big = pictures.preview(np.zeros((pictures.PREVIEW_MAX_SIDE * 2, 3)), "tall")  # every 2nd row
    assert big.shape[0] > pictures.PREVIEW_MAX_SIDE and big.shape[0] < pictures.PREVIEW_MAX_SIDE + 100  # subsampled
    with pytest.raises(ValueError, match=r"values must be a 2-D map \(H, W\); got shape \(2, 2, 2\)"):
        pictures.preview(np.zeros((2, 2, 2)), "x")
