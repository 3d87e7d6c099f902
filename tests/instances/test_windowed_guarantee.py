"""The exact guarantee of postprocess_windowed (its docstring): windows much smaller than the image, objects and
clumps of touching objects crossing window borders, every surface, including the non-local distance transform of F."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from lib.instances.postprocess import PostProcessConfig, postprocess, postprocess_windowed
from tests.instances.test_instances import perfect_maps


def scattered_clumps(size: int = 240, seed: int = 3) -> np.ndarray:
    """Clumps of one to three touching discs (radius 4-6 px), each clump within 16 px of its centre, 40 px apart."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((size, size), np.int32)
    yy, xx = np.mgrid[:size, :size]
    n = 0
    for cy in range(18, size - 18, 40):
        for cx in range(18, size - 18, 40):
            cy_, cx_ = cy + int(rng.integers(-3, 4)), cx + int(rng.integers(-3, 4))
            for k in range(int(rng.integers(1, 4))):
                oy, ox = (0, 0) if k == 0 else (int(rng.integers(-8, 9)), 8 * k)
                r = float(rng.uniform(4, 6))
                disc = ((yy - cy_ - oy) ** 2 + (xx - cx_ - ox) ** 2 <= r * r) & (labels == 0)
                n += 1
                labels[disc] = n
    return labels


@pytest.mark.parametrize("channels", [("F",), ("F", "Db"), ("F", "C", "Db")])
@pytest.mark.parametrize("window, overlap", [(64, 56), (80, 64)])
def test_windowed_equals_whole_when_every_clump_fits_the_guarantee(channels, window, overlap):
    truth = scattered_clumps()
    maps = perfect_maps(truth, channels)
    config = PostProcessConfig.default_for(channels)
    whole = postprocess(maps, config)
    said = []
    windowed = postprocess_windowed(maps, config, window=window, overlap=overlap, log=said.append)
    assert said == [] and whole.max() > 30
    np.testing.assert_array_equal(windowed, whole)  # labels and numbering


@pytest.mark.parametrize("channels, min_seed_size, found", [
    (("F", "C", "Db"), 5, [0, 0, 9, 9]), (("F", "C", "Db"), 0, [9, 9, 9, 9]),
    (("F", "Db"), 5, [9, 0, 9, 9]), (("F", "Db"), 0, [9, 9, 9, 9]), (("F",), 5, [9, 9, 9, 9]),
])
def test_small_objects_limit_is_as_documented(channels, min_seed_size, found):
    # nine discs of radius 1, 1.5, 2, 3 px from perfect maps: min_seed_size decides whether the smallest survive
    yy, xx = np.mgrid[:40, :200]
    counts = []
    for radius in (1.0, 1.5, 2.0, 3.0):
        truth = np.zeros((40, 200), np.int32)
        for i, cx in enumerate(range(10, 190, 20), 1):
            truth[(yy - 20) ** 2 + (xx - cx) ** 2 <= radius * radius] = i
        config = dataclasses.replace(PostProcessConfig.default_for(channels), min_seed_size=min_seed_size)
        counts.append(int(postprocess(perfect_maps(truth, channels), config).max()))
    assert counts == found


@pytest.mark.parametrize("channels, found", [(("F", "C", "Db"), 1), (("F", "Db"), 2)])
def test_two_pixel_slivers_need_no_contour_seed(channels, found):
    truth = np.zeros((40, 100), np.int32)
    truth[5:35, 20:22], truth[5:35, 60:63] = 1, 2  # 2 px and 3 px wide
    config = dataclasses.replace(PostProcessConfig.default_for(channels), min_seed_size=0)
    assert int(postprocess(perfect_maps(truth, channels), config).max()) == found
