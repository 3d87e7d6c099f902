"""Tile grids used by the database build (lib.store.tiling)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lib.store.tiling import pad_to, tile_grid, tile_starts


@given(length=st.integers(1, 700), tile=st.integers(1, 300), data=st.data())
@settings(max_examples=200, deadline=None)
def test_tile_starts_cover_every_pixel_inside_the_image(length, tile, data):
    stride = data.draw(st.integers(1, tile))
    starts = tile_starts(length, tile, stride)
    covered = np.zeros(length, bool)
    for s in starts:
        covered[s:s + tile] = True
        assert s >= 0 and (s + tile <= length or (s == 0 and length < tile))
    assert covered.all()
    assert starts == sorted(set(starts))
    assert all(b - a <= stride for a, b in zip(starts, starts[1:]))


@pytest.mark.parametrize("length, tile, stride, expected", [
    (10, 4, 4, [0, 4, 6]),
    (8, 4, 4, [0, 4]),
    (3, 4, 4, [0]),
    (10, 4, 2, [0, 2, 4, 6]),
    (5, 4, 0, ValueError),
    (5, 4, 5, ValueError),
])
def test_tile_starts_table(length, tile, stride, expected):
    if expected is ValueError:
        with pytest.raises(ValueError, match="stride must be"):
            tile_starts(length, tile, stride)
    else:
        assert tile_starts(length, tile, stride) == expected


def test_tile_grid_is_row_major():
    assert tile_grid(6, 5, 4, 4) == [(0, 0), (0, 1), (2, 0), (2, 1)]


def test_pad_to_reflects_images_and_zeroes_masks():
    image = np.arange(6, dtype=np.uint16).reshape(2, 3)
    padded = pad_to(image, 4, 5, "reflect")
    assert padded.shape == (4, 5)
    np.testing.assert_array_equal(padded[:2, :3], image)
    np.testing.assert_array_equal(padded[0], [0, 1, 2, 1, 0])
    mask = pad_to(np.ones((2, 3), np.uint8), 4, 5, "zero")
    assert mask.sum() == 6 and mask[2:].sum() == 0
    assert pad_to(np.ones((1, 1, 2)), 3, 3, "reflect").shape == (3, 3, 2)
    with pytest.raises(ValueError, match="mode must be"):
        pad_to(image, 4, 4, "wrap")
