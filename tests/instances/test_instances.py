"""Tests of lib/instances/ (postprocess, measure, rules, classical): perfect maps back to their instances, hand-made refinements,
windowed against whole-image post-processing, measurements, rules and the classical baseline."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.segmentation import find_boundaries

from lib.common.settings import ConfigError
from lib.instances.classical import classical_baseline
from lib.instances.labels import choose_label_dtype
from lib.instances.measure import MEASUREMENT_COLUMNS, MEASUREMENT_COLUMNS_3D, measure, measure_3d, measurement_columns
from lib.instances.postprocess import PostProcessConfig, postprocess, postprocess_windowed, refine
from lib.instances.rules import filter_instances, parse_rules

# Synthetic instances and their perfect channel maps (made here: lib/reader/targets.py is not used)


def touching_cells(n: int = 12, spacing: int = 17, radii=(8.5, 10.0), jitter: float = 1.5, seed: int = 0) -> np.ndarray:
    """(H, W) int32 labels: an n x n jittered grid of disks, each overlap split between the two
    nearest centres, so neighbours touch along straight seams; H = W = (n + 2) * spacing.

    Disks overlap their 4 grid neighbours (2 r > spacing) but not the diagonal ones
    (2 r < spacing * sqrt(2)), so three objects never meet. Then every contour pixel that
    touches another object without a 4-neighbour in its own object's interior is set to 0:
    such a pixel (the tip of a one-pixel spur into the neighbour, where both contours have the
    same ``Db``) is ambiguous in the maps themselves, and either answer would be as right.
    """
    rng = np.random.default_rng(seed)
    size = (n + 2) * spacing
    labels = np.zeros((size, size), np.int32)
    best = np.full((size, size), np.inf)
    yy, xx = np.mgrid[:size, :size]
    for k in range(n * n):
        cy = (k // n + 1.5) * spacing + rng.uniform(-jitter, jitter)
        cx = (k % n + 1.5) * spacing + rng.uniform(-jitter, jitter)
        r = rng.uniform(*radii)
        box = (slice(int(cy - r) - 1, int(cy + r) + 2), slice(int(cx - r) - 1, int(cx + r) + 2))
        d = (yy[box] - cy) ** 2 + (xx[box] - cx) ** 2
        closer = (d <= r * r) & (d < best[box])
        best[box][closer] = d[closer]
        labels[box][closer] = k + 1
    while True:
        ambiguous = ambiguous_pixels(labels)
        if not ambiguous.any():
            return labels
        labels[ambiguous] = 0


def ambiguous_pixels(labels: np.ndarray) -> np.ndarray:
    pad = np.pad(labels, 1)
    centre = pad[1:-1, 1:-1]
    neighbours = [pad[:-2, 1:-1], pad[2:, 1:-1], pad[1:-1, :-2], pad[1:-1, 2:]]
    contour = (centre > 0) & np.any([n != centre for n in neighbours], axis=0)
    interior = np.pad((centre > 0) & ~contour, 1)
    inner = [interior[:-2, 1:-1], interior[2:, 1:-1], interior[1:-1, :-2], interior[1:-1, 2:]]
    own_interior = np.any([i & (n == centre) for i, n in zip(inner, neighbours)], axis=0)
    foreign = np.any([(n > 0) & (n != centre) for n in neighbours], axis=0)
    return contour & foreign & ~own_interior


def perfect_maps(labels: np.ndarray, channels) -> np.ndarray:
    """(H, W, K) float32: F = foreground, C = thick boundaries, Db = per-object distance to the
    nearest pixel not of the object, divided by the object's maximum; P = disk of radius 2 at the
    pixel of largest distance."""
    maps = {"F": (labels > 0).astype(np.float32),
            "C": find_boundaries(labels, mode="thick").astype(np.float32),
            "Db": np.zeros(labels.shape, np.float32), "P": np.zeros(labels.shape, np.float32)}
    for label, box in enumerate(ndi.find_objects(labels), 1):
        if box is None:
            continue
        box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
        own = labels[box] == label
        distance = ndi.distance_transform_edt(own)
        maps["Db"][box][own] = (distance / distance.max())[own]
        cy, cx = np.unravel_index(np.argmax(distance), own.shape)
        yy, xx = np.mgrid[:own.shape[0], :own.shape[1]]
        maps["P"][box][own & ((yy - cy) ** 2 + (xx - cx) ** 2 <= 4)] = 1.0
    return np.stack([maps[c] for c in channels], axis=-1)


def assert_same_instances(expected: np.ndarray, got: np.ndarray) -> None:
    """Equal up to renumbering: same foreground and a one-to-one map between the ids."""
    np.testing.assert_array_equal(expected > 0, got > 0)
    pairs = np.unique(np.stack([expected[expected > 0], got[got > 0]]), axis=1)
    assert pairs.shape[1] == len(np.unique(pairs[0])) == len(np.unique(pairs[1]))


@pytest.fixture(scope="module")
def cells() -> np.ndarray:
    return touching_cells(seed=0)


# Perfect maps back to their instances


def test_fixture_has_many_touching_objects(cells):
    assert len(np.unique(cells)) - 1 == 144
    touching = (cells[:, :-1] != cells[:, 1:]) & (cells[:, :-1] > 0) & (cells[:, 1:] > 0)
    assert touching.sum() > 500


@pytest.mark.parametrize("channels", [("F", "C", "Db"), ("F", "Db"), ("Db", "C", "F"), ("F", "C"),
                                      ("F", "C", "Db", "P")])
def test_default_for_recovers_perfect_instances(cells, channels):
    config = PostProcessConfig.default_for(channels)
    labels = postprocess(perfect_maps(cells, channels), config)
    assert labels.dtype == np.uint16
    assert_same_instances(cells, labels)
    assert labels.max() == 144 and len(np.unique(labels)) == 145  # numbered 1..N


def test_labels_are_numbered_in_raster_order():
    truth = np.zeros((14, 14), np.int32)
    truth[8:13, 1:6] = 1  # lower left: first pixel (8, 1)
    truth[1:6, 7:12] = 2  # upper right: first pixel (1, 7)
    truth[8:13, 8:13] = 3  # lower right: first pixel (8, 8)
    config = PostProcessConfig.default_for(("F", "C", "Db"))
    labels = postprocess(perfect_maps(truth, ("F", "C", "Db")), config)
    np.testing.assert_array_equal(labels, np.select([truth == 2, truth == 1, truth == 3], [1, 2, 3], 0))


def test_intermediates(cells):
    maps = perfect_maps(cells, ("F", "C", "Db"))
    config = PostProcessConfig.default_for(("F", "C", "Db"))
    labels, extra = postprocess(maps, config, return_intermediates=True)
    assert set(extra) == {"seeds", "surface", "growth", "thresholds"}
    assert extra["seeds"].dtype == np.int32 and extra["seeds"].max() == 144
    seeds = extra["seeds"] > 0
    np.testing.assert_array_equal(seeds, (maps[..., 0] > 0.5) & (maps[..., 1] < 0.5) & (maps[..., 2] > 0.5))
    assert extra["surface"].dtype == np.float32
    np.testing.assert_array_equal(extra["surface"], maps[..., 1])  # surface C
    np.testing.assert_array_equal(extra["growth"], cells > 0)
    assert extra["thresholds"] == {"F": 0.5, "C": 0.5, "Db": 0.5, "growth": 0.5}
    assert (labels[seeds] > 0).all()

    _, extra = postprocess(maps[..., [0, 2]], PostProcessConfig.default_for(("F", "Db")), True)
    np.testing.assert_array_equal(extra["surface"], -maps[..., 2])


def test_surface_f_is_negative_distance_transform():
    truth = np.zeros((9, 9), np.int32)
    truth[2:7, 2:7] = 1
    _, extra = postprocess(perfect_maps(truth, ("F",)), PostProcessConfig.default_for(("F",)), True)
    # 5 x 5 square: distance 1 on its edge ring, 2 inside it, 3 at the centre
    expected = np.zeros((9, 9), np.float32)
    expected[2:7, 2:7] = -1
    expected[3:6, 3:6] = -2
    expected[4, 4] = -3
    np.testing.assert_array_equal(extra["surface"], expected)


def test_auto_thresholds_are_otsu_on_the_map():
    truth = np.zeros((20, 30), np.int32)
    truth[3:9, 3:9] = 1
    truth[10:17, 15:25] = 2
    f = np.where(truth > 0, 0.9, 0.1).astype(np.float32)[..., None]
    config = PostProcessConfig(channels=("F",), thresholds={"F": "auto"}, seed_channels=("F",), surface_channel="F",
                               growth_threshold="auto")
    labels, extra = postprocess(f, config, return_intermediates=True)
    # bins (k/256, (k+1)/256]: 0.1 falls in bin 25, 0.9 in bin 230; every split between them is
    # as good, the first is taken, and the threshold is that bin's upper edge
    assert extra["thresholds"] == {"F": 26 / 256, "growth": 26 / 256}
    assert_same_instances(truth, labels)


def test_auto_threshold_of_constant_map_raises():
    config = PostProcessConfig(channels=("F",), thresholds={"F": "auto"}, seed_channels=("F",), surface_channel="F")
    with pytest.raises(ValueError, match=r"'auto' threshold of 'F' must see at least two distinct values"):
        postprocess(np.full((5, 5, 1), 0.7, np.float32), config)


@pytest.mark.parametrize("shape, message", [
    ((10, 10), r"maps must have shape \(H, W, K\) with K = 3 channels \(F, C, Db\); got shape \(10, 10\)"),
    ((10, 10, 2), r"K = 3 channels .* got shape \(10, 10, 2\)"),
    ((0, 10, 3), r"got shape \(0, 10, 3\)"),
])
def test_postprocess_rejects_bad_maps(shape, message):
    with pytest.raises(ValueError, match=message):
        postprocess(np.zeros(shape, np.float32), PostProcessConfig.default_for(("F", "C", "Db")))


def test_no_seed_gives_empty_labels():
    maps = np.zeros((8, 8, 2), np.float32)
    maps[2:6, 2:6, 0] = 1.0  # foreground, but Db is 0 everywhere: no seed
    labels = postprocess(maps, PostProcessConfig.default_for(("F", "Db")))
    assert labels.dtype == np.uint16 and not labels.any()


# Seeds


def dumbbell() -> np.ndarray:
    """Two 7 x 7 squares joined by a 1-pixel bridge of 3 pixels."""
    f = np.zeros((11, 21), np.float32)
    f[2:9, 2:9] = 1
    f[2:9, 12:19] = 1
    f[5, 9:12] = 1
    return f[..., None]


def test_seed_erosion_cuts_a_bridge():
    config = PostProcessConfig.default_for(("F",))
    assert postprocess(dumbbell(), config).max() == 1
    labels = postprocess(dumbbell(), dataclasses.replace(config, seed_erosion=1))
    assert labels.max() == 2
    assert (labels[2:9, 2:9] == 1).all() and (labels[2:9, 12:19] == 2).all()
    assert set(labels[5, 9:12].tolist()) <= {1, 2}


@pytest.mark.parametrize("points, min_seed_size, seed_dilation, expected", [
    ([(2, 3), (2, 5)], 0, 0, 2),  # two one-pixel seeds, one pixel apart
    ([(2, 3), (2, 5)], 0, 1, 1),  # dilated by a radius-1 disk, they meet at (2, 4)
    ([(2, 3), (2, 5)], 2, 0, 0),  # both smaller than 2 px: dropped, nothing grows
    ([(2, 3), (2, 5)], 2, 1, 1),  # dilated first (9 px), then kept
])
def test_seed_dilation_and_min_seed_size(points, min_seed_size, seed_dilation, expected):
    maps = np.zeros((5, 11, 2), np.float32)
    maps[..., 0] = 1.0  # F: the whole image
    for y, x in points:
        maps[y, x, 1] = 1.0  # P
    config = dataclasses.replace(PostProcessConfig.default_for(("F", "P")), min_seed_size=min_seed_size,
                                 seed_dilation=seed_dilation)
    labels = postprocess(maps, config)
    assert labels.max() == expected
    assert (labels > 0).all() == (expected > 0)  # a seed floods the whole growth mask


def test_min_seed_size_drops_small_seeds_of_real_objects(cells):
    maps = perfect_maps(cells, ("F", "C", "Db"))
    config = PostProcessConfig.default_for(("F", "C", "Db"))
    _, extra = postprocess(maps, config, True)
    sizes = np.bincount(extra["seeds"].ravel())[1:]
    cut = int(np.sort(sizes)[10])  # the 10 smallest seeds are below this size
    labels = postprocess(maps, dataclasses.replace(config, min_seed_size=cut))
    assert labels.max() == 144 - int((sizes < cut).sum())


# Refinements


def grid(rows: str) -> np.ndarray:
    return np.array([[int(c) for c in row] for row in rows.split()], np.int32)


@pytest.mark.parametrize("steps, before, after", [
    (["fill_holes"], "00000 01110 01010 01110 00002", "00000 01110 01110 01110 00002"),
    (["fill_holes"], "11111 10201 11111", "11111 10201 11111"),  # hole holds another object: kept
    (["fill_holes"], "1111 1201 1111", "1111 1201 1111"),
    (["clear_border"], "1100 0000 0220 0003", "0000 0000 0220 0000"),
    (["remove_small_objects 3"], "1100 0000 2220 0003", "0000 0000 2220 0000"),
    (["remove_large_objects 3"], "2220 0000 3333 0010", "2220 0000 0000 0010"),
    (["dilation 1"], "00000 01000 00000 00022 00000", "01000 11100 01022 00222 00022"),
    (["dilation 1"], "1122 0000", "1122 1122"),  # touching labels grow into background only
    (["dilation 2"], "1000002", "1110222"),  # the middle pixel is 3 px from both: stays 0
    (["erosion 1"], "00000000 01112220 01112220 01112220 01112220 01112220 00000000",
                    "00000000 00000000 00100200 00100200 00100200 00000000 00000000"),
    (["erosion 1"], "1110 1110 1110", "1100 1100 1100"),  # the image edge does not erode
    (["remove_small_objects 2", "dilation 1"], "10002 00000 00002", "00022 00002 00022"),  # 2: 2 px, apart
    (["dilation 1", "remove_small_objects 2"], "10002 00000 00002", "11022 10002 00022"),
])
def test_refinements(steps, before, after):
    labels = grid(before).astype(np.uint16)
    out = refine(labels, steps)
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, grid(after))


def test_refinements_in_postprocess(cells):
    config = dataclasses.replace(PostProcessConfig.default_for(("F", "C", "Db")), refinements=("clear_border",))
    labels = postprocess(perfect_maps(cells, ("F", "C", "Db")), config)
    expected = cells.copy()
    for edge in (cells[0], cells[-1], cells[:, 0], cells[:, -1]):
        expected[np.isin(cells, edge[edge > 0])] = 0
    assert_same_instances(expected, labels)


@pytest.mark.parametrize("labels, steps, message", [
    (np.zeros((3, 3), np.float32), [], r"labels must be a \(H, W\) integer array; got shape \(3, 3\), dtype float32"),
    (np.zeros((3, 3, 3), np.int32), [], r"labels must be a \(H, W\) integer array"),
    (-np.ones((3, 3), np.int32), [], r"labels must be >= 0 \(0 = background\); got minimum -1"),
    (np.zeros((3, 3), np.int32), ["dilate 2"], r"refinement must be one of fill_holes, clear_border"),
    (np.zeros((3, 3), np.int32), ["fill_holes 2"], r"refinement 'fill_holes' must have no argument"),
    (np.zeros((3, 3), np.int32), ["erosion"], r"'erosion' must be followed by one integer >= 1 \(radius in pixels\)"),
    (np.zeros((3, 3), np.int32), ["remove_small_objects 0"], r"one integer >= 1 \(pixels\)"),
    (np.zeros((3, 3), np.int32), ["dilation 1.5"], r"one integer >= 1"),
    (np.zeros((3, 3), np.int32), [3], r"refinement must be one of"),
])
def test_refine_rejects(labels, steps, message):
    with pytest.raises(ValueError, match=message):
        refine(labels, steps)


# Settings


def config_fc(**overrides) -> PostProcessConfig:
    base = dict(channels=("F", "C"), thresholds={"F": 0.5, "C": 0.5}, seed_channels=("F", "C"), surface_channel="C")
    return PostProcessConfig(**{**base, **overrides})


@pytest.mark.parametrize("overrides, message", [
    ({}, None),
    ({"channels": ["F", "C"], "seed_channels": ["F", "C"], "refinements": ["fill_holes"]}, None),  # lists (JSON)
    ({"thresholds": {"F": "auto", "C": 0}, "growth_threshold": 1}, None),
    ({"channels": ()}, "channels must be a non-empty tuple of names from F, C, Db, P, T; got ()"),
    ({"channels": "FC"}, "channels must be a non-empty tuple"),
    ({"channels": ("F", "C", "X")}, "channels must be names from F, C, Db, P, T; got 'X' in ('F', 'C', 'X')"),
    ({"channels": ("F", "C", "F")}, "channels must not repeat a name; got ('F', 'C', 'F')"),
    ({"seed_channels": ()}, "seed_channels must be a non-empty tuple of channel names; got ()"),
    ({"seed_channels": ("F", "Db"), "thresholds": {"F": 0.5, "Db": 0.5}},
     "seed_channels must be among channels ('F', 'C'); got 'Db'"),
    ({"seed_channels": ("C",), "thresholds": {"C": 0.5}}, "seed_channels must include one of F, Db, P; got ('C',)"),
    ({"surface_channel": "P"}, "surface_channel must be one of C, Db, F; got 'P'"),
    ({"surface_channel": "Db"}, "surface_channel must be one of the channels ('F', 'C'); got 'Db'"),
    ({"thresholds": {"F": 0.5}}, "thresholds must give a value for 'C' (a seed channel); got keys ['F']"),
    ({"seed_channels": ("C", "Db"), "channels": ("C", "Db", "F"), "thresholds": {"C": 0.5, "Db": 0.5},
      "surface_channel": "F"}, "thresholds must give a value for 'F' (the F mask of the surface)"),
    ({"thresholds": {"F": 0.5, "C": 0.5, "T": 0.5}}, "thresholds must only name seed channels (C, F); got 'T'"),
    ({"thresholds": {"F": 1.5, "C": 0.5}}, "thresholds['F'] must be a number in [0, 1] or 'auto'; got 1.5"),
    ({"thresholds": {"F": "otsu", "C": 0.5}}, "thresholds['F'] must be a number in [0, 1] or 'auto'; got 'otsu'"),
    ({"thresholds": {"F": True, "C": 0.5}}, "thresholds['F'] must be a number in [0, 1] or 'auto'; got True"),
    ({"thresholds": [("F", 0.5)]}, "thresholds must be a dict {channel: number or 'auto'}"),
    ({"growth_channel": "C"}, "growth_channel must be one of F, Db, P; got 'C'"),
    ({"growth_channel": "Db"}, "growth_channel must be one of the channels ('F', 'C'); got 'Db'"),
    ({"growth_threshold": -0.1}, "growth_threshold must be a number in [0, 1] or 'auto'; got -0.1"),
    ({"seed_erosion": -1}, "seed_erosion must be an integer >= 0 (pixels); got -1"),
    ({"seed_dilation": 1.5}, "seed_dilation must be an integer >= 0 (pixels); got 1.5"),
    ({"min_seed_size": True}, "min_seed_size must be an integer >= 0 (pixels); got True"),
    ({"refinements": "fill_holes"}, "refinements must be a tuple of steps; got 'fill_holes'"),
    ({"refinements": ("fill_holes", "dilation")}, "refinement 'dilation' must be followed by one integer >= 1"),
    ({"label_dtype": "int32"}, "label_dtype must be one of auto, uint16, uint32; got 'int32'"),
])
def test_config_validate(overrides, message):
    config = config_fc(**overrides)
    if message is None:
        assert config.validate() is config
        assert isinstance(config.channels, tuple) and isinstance(config.refinements, tuple)
        return
    with pytest.raises(ConfigError) as error:
        config.validate()
    assert any(message in v for v in error.value.violations), error.value.violations


def test_config_validate_lists_every_problem_at_once():
    config = config_fc(surface_channel="P", seed_erosion=-1, label_dtype="int8", refinements=("blur 2",))
    with pytest.raises(ConfigError) as error:
        config.validate()
    assert len(error.value.violations) == 4
    assert isinstance(error.value, ValueError)


def test_config_round_trip_through_json():
    config = dataclasses.replace(PostProcessConfig.default_for(("F", "C", "Db")),
                                 refinements=("fill_holes", "dilation 1"))
    d = json.loads(json.dumps(config.to_dict()))
    assert d["channels"] == ["F", "C", "Db"]
    assert PostProcessConfig.from_dict(d) == config


@pytest.mark.parametrize("d, message", [
    ({**config_fc().to_dict(), "threshold": 0.5}, "unknown setting 'threshold' for PostProcessConfig; known: channels"),
    ({k: v for k, v in config_fc().to_dict().items() if k != "channels"}, "setting 'channels' must be given"),
    ([("channels", ["F"])], "post-processing settings must be a dict (as written by to_dict); got list"),
    ({**config_fc().to_dict(), "label_dtype": "int8"}, "label_dtype must be one of auto, uint16, uint32"),
])
def test_config_from_dict_rejects(d, message):
    with pytest.raises(ConfigError) as error:
        PostProcessConfig.from_dict(d)
    assert any(message in v for v in error.value.violations), error.value.violations


@pytest.mark.parametrize("channels, seeds, surface, growth", [
    (("F", "C", "Db"), ("F", "C", "Db"), "C", ("F", 0.5)),
    (("Db", "F"), ("F", "Db"), "Db", ("F", 0.5)),
    (("F", "C"), ("F", "C"), "C", ("F", 0.5)),
    (("F",), ("F",), "F", ("F", 0.5)),
    (("Db",), ("Db",), "Db", ("Db", 0.02)),
    (("T", "P", "F"), ("F", "P", "T"), "F", ("F", 0.5)),
    (("Db", "P", "C", "T", "F"), ("F", "C", "Db", "P", "T"), "C", ("F", 0.5)),
])
def test_default_for(channels, seeds, surface, growth):
    config = PostProcessConfig.default_for(channels)
    assert config.channels == channels
    assert config.seed_channels == seeds
    assert config.thresholds == {c: 0.5 for c in seeds}
    assert config.surface_channel == surface
    assert (config.growth_channel, config.growth_threshold) == growth
    assert (config.min_seed_size, config.seed_erosion, config.seed_dilation, config.refinements) == (5, 0, 0, ())


@pytest.mark.parametrize("channels, messages", [
    (("C",), ["channels must include F, Db or P to build seeds from; got ('C',)",
              "channels must include F or Db to build the growth mask from; got ('C',)"]),
    (("P", "C"), ["channels must include F or Db to build the growth mask from; got ('P', 'C')"]),
    ((), ["channels must include F, Db or P to build seeds from; got ()",
          "channels must include F or Db to build the growth mask from; got ()"]),
    (("F", "X"), ["channels must be names from F, C, Db, P, T; got 'X' in ('F', 'X')"]),
    (("F", "F"), ["channels must not repeat a name; got ('F', 'F')"]),
])
def test_default_for_rejects(channels, messages):
    with pytest.raises(ConfigError) as error:
        PostProcessConfig.default_for(channels)
    assert error.value.violations == messages


@pytest.mark.parametrize("n_labels, label_dtype, expected", [
    (0, "auto", np.uint16),
    (65535, "auto", np.uint16),
    (65536, "auto", np.uint32),
    (3, "uint32", np.uint32),
    (65535, "uint16", np.uint16),
    (2 ** 32 - 1, "uint32", np.uint32),
    (65536, "uint16", "label_dtype 'uint16' must hold every label; got 65536 labels (at most 65535 fit)"),
    (2 ** 32, "auto", "the number of labels must be at most 4294967295 to fit uint32; got 4294967296"),
    (3, "int32", "label_dtype must be one of auto, uint16, uint32; got 'int32'"),
])
def test_choose_label_dtype(n_labels, label_dtype, expected):
    if isinstance(expected, str):
        with pytest.raises(ValueError) as error:
            choose_label_dtype(n_labels, label_dtype)
        assert expected in str(error.value)
    else:
        assert choose_label_dtype(n_labels, label_dtype) == np.dtype(expected)


def test_label_dtype_setting(cells):
    config = dataclasses.replace(PostProcessConfig.default_for(("F", "C", "Db")), label_dtype="uint32")
    labels = postprocess(perfect_maps(cells, ("F", "C", "Db")), config)
    assert labels.dtype == np.uint32
    assert_same_instances(cells, labels)


# Windows


@pytest.fixture(scope="module")
def many_cells() -> np.ndarray:
    return touching_cells(n=24, seed=1)  # 576 objects, 442 x 442


@pytest.mark.parametrize("channels, refinements, noise", [
    (("F", "C", "Db"), (), 0.0),
    (("F", "Db"), ("clear_border", "dilation 1", "remove_small_objects 250"), 0.0),
    (("F", "C", "Db"), ("fill_holes", "erosion 1"), 0.15),
])
def test_windowed_equals_whole(many_cells, channels, refinements, noise):
    rng = np.random.default_rng(7)
    maps = perfect_maps(many_cells, channels)
    maps = np.clip(maps + rng.normal(0.0, noise, maps.shape), 0, 1).astype(np.float32) if noise else maps
    config = dataclasses.replace(PostProcessConfig.default_for(channels), refinements=refinements)
    whole = postprocess(maps, config)
    said = []
    windowed = postprocess_windowed(maps, config, window=128, overlap=64, log=said.append)
    assert said == []  # no object may be lost
    np.testing.assert_array_equal(windowed, whole)  # same numbering too: raster order
    assert whole.max() > 500
    if not noise and not refinements:
        assert_same_instances(many_cells, windowed)


def test_windowed_reads_a_memmap(many_cells, tmp_path):
    maps = perfect_maps(many_cells, ("F", "C", "Db"))
    stored = np.lib.format.open_memmap(tmp_path / "maps.npy", mode="w+", dtype=np.float32, shape=maps.shape)
    stored[:] = maps
    stored.flush()
    config = PostProcessConfig.default_for(("F", "C", "Db"))
    windowed = postprocess_windowed(np.load(tmp_path / "maps.npy", mmap_mode="r"), config, window=160, overlap=70)
    np.testing.assert_array_equal(windowed, postprocess(maps, config))


def test_windowed_auto_thresholds_use_the_whole_image():
    # dim objects (0.3) on the left, bright ones (0.9) on the right, background 0.1. Otsu on the
    # left window alone would split 0.1 | 0.3 and find the dim objects; on the whole image it
    # splits 0.3 | 0.9 (between-class variance 0.0363 against 0.0273), and so must every window
    truth = np.zeros((40, 80), np.int32)
    truth[5:15, 5:15], truth[25:35, 20:30], truth[5:15, 50:60], truth[25:35, 65:75] = 1, 2, 3, 4
    f = np.where(truth > 0, np.where(np.arange(80) < 40, 0.3, 0.9), 0.1).astype(np.float32)[..., None]
    config = PostProcessConfig(channels=("F",), thresholds={"F": "auto"}, seed_channels=("F",), surface_channel="F",
                               growth_threshold="auto")
    whole = postprocess(f, config)
    np.testing.assert_array_equal(postprocess_windowed(f, config, window=40, overlap=20), whole)
    assert_same_instances(np.where(truth > 2, truth, 0), whole)


def test_windowed_single_window_is_postprocess(cells):
    maps = perfect_maps(cells, ("F", "C", "Db"))
    config = PostProcessConfig.default_for(("F", "C", "Db"))
    np.testing.assert_array_equal(postprocess_windowed(maps, config, window=cells.shape[0], overlap=0),
                                  postprocess(maps, config))


def test_windowed_warns_when_an_object_exceeds_the_overlap():
    yy, xx = np.mgrid[:200, :200]
    truth = ((yy - 100) ** 2 + (xx - 100) ** 2 <= 60 ** 2).astype(np.int32)  # 121 px wide
    maps = perfect_maps(truth, ("F", "Db"))
    config = PostProcessConfig.default_for(("F", "Db"))
    said = []
    labels = postprocess_windowed(maps, config, window=100, overlap=20, log=said.append)
    assert len(said) == 1
    assert re.search(r"^warning: .*pixels that windows labelled are unlabelled .* overlap=20 px", said[0])
    assert labels.max() == 0  # it touches an inner edge of every window
    assert postprocess_windowed(maps, config, window=180, overlap=150).max() == 1


@pytest.mark.parametrize("window, overlap, message", [
    (0, 0, "window must be an integer >= 1 (pixels); got 0"),
    (64.0, 8, "window must be an integer >= 1 (pixels); got 64.0"),
    (64, -1, "overlap must be an integer >= 0 (pixels); got -1"),
    (64, 64, "overlap must be smaller than window=64; got 64. Windows would not advance"),
])
def test_windowed_rejects(window, overlap, message):
    with pytest.raises(ValueError) as error:
        postprocess_windowed(np.zeros((8, 8, 2), np.float32), PostProcessConfig.default_for(("F", "Db")),
                                       window=window, overlap=overlap)
    assert message in str(error.value)


# Measurements


def test_measure_disk():
    # (every column against regionprops: tests/instances/test_measure_regionprops.py)
    r = 20
    yy, xx = np.mgrid[:50, :60]
    labels = (((yy - 24) ** 2 + (xx - 31) ** 2) <= r * r).astype(np.uint16) * 7
    row, = measure(labels)
    assert list(row) == list(MEASUREMENT_COLUMNS)
    assert row["label"] == 7
    assert abs(row["npixels"] - math.pi * r * r) < 0.01 * math.pi * r * r
    assert row["area_px2"] == row["npixels"]
    assert (row["centroid_y_px"], row["centroid_x_px"]) == (24.0, 31.0)
    assert 2 * r <= row["feret_min_px"] <= 2 * r + 1 <= row["feret_max_px"] <= 2 * r + 2
    assert abs(row["perimeter_px"] - 2 * math.pi * r) < 0.06 * 2 * math.pi * r  # the boundary-pixel estimate
    assert 0.88 <= row["circularity"] <= 0.95  # measured 0.908


def test_measure_square_with_pixel_size():
    s = 30
    labels = np.zeros((40, 40), np.int32)
    labels[5:5 + s, 7:7 + s] = 1
    row, = measure(labels)
    perimeter = 4 * (s - 1)  # through the centres of the boundary pixels
    assert row["npixels"] == s * s
    assert row["perimeter_px"] == pytest.approx(perimeter)
    assert row["circularity"] == pytest.approx(4 * math.pi * s * s / perimeter ** 2)
    assert (row["centroid_y_px"], row["centroid_x_px"], row["feret_min_px"]) == (19.5, 21.5, 30.0)
    scaled, = measure(labels, pixel_size=0.5)
    assert list(scaled) == list(measurement_columns(0.5))
    assert scaled["area_um2"] == s * s * 0.25
    assert scaled["perimeter_um"] == pytest.approx(perimeter * 0.5)
    assert scaled["feret_min_um"] == 15.0
    assert scaled["circularity"] == pytest.approx(row["circularity"])
    assert (scaled["centroid_y_um"], scaled["centroid_x_um"]) == (19.5 * 0.5, 21.5 * 0.5)


def test_measure_rows_per_label_and_undefined_circularity():
    labels = grid("3000 0000 0055 0055")
    rows = measure(labels)
    assert [r["label"] for r in rows] == [3, 5]
    assert [r["npixels"] for r in rows] == [1, 4]
    assert math.isnan(rows[0]["circularity"])  # a pixel has perimeter 0: undefined, an empty CSV cell
    assert rows[1]["centroid_y_px"] == 2.5
    assert measure(np.zeros((4, 4), np.uint8)) == []


def test_measure_3d_ball_and_cube():
    r = 10
    zz, yy, xx = np.mgrid[:25, :25, :25] - 12
    ball = ((zz ** 2 + yy ** 2 + xx ** 2) <= r * r).astype(np.uint16)
    row, = measure_3d(ball)
    assert list(row) == list(MEASUREMENT_COLUMNS_3D)
    assert abs(row["nvoxels"] - 4 / 3 * math.pi * r ** 3) < 0.01 * 4 / 3 * math.pi * r ** 3
    assert (row["centroid_z_px"], row["centroid_y_px"], row["centroid_x_px"]) == (12.0, 12.0, 12.0)
    assert row["equivalent_diameter_px"] == pytest.approx(2 * r, rel=0.02)
    assert 0.88 <= row["sphericity"] <= 1.0  # measured 0.913: the mesh follows the voxel staircase
    stretched, = measure_3d(ball, voxel_size=(2.0, 1.0, 1.0))
    assert stretched["volume_um3"] == 2 * row["nvoxels"]
    assert stretched["centroid_z_um"] == 24.0

    s = 10
    cube = np.zeros((s + 2, s + 2, s + 2), np.int32)
    cube[1:-1, 1:-1, 1:-1] = 4
    row, = measure_3d(cube)
    # the 0.5 iso-surface: 6 faces (s-1)^2, 12 edge strips (s-1) x sqrt(2)/2, 8 corner triangles sqrt(3)/8
    area = 6 * (s - 1) ** 2 + 6 * math.sqrt(2) * (s - 1) + math.sqrt(3)
    assert row["label"] == 4 and row["volume_px3"] == s ** 3
    assert row["surface_area_px2"] == pytest.approx(area, rel=1e-5)
    assert row["sphericity"] == pytest.approx(math.pi ** (1 / 3) * (6 * s ** 3) ** (2 / 3) / area, rel=1e-5)


@pytest.mark.parametrize("call, message", [
    (lambda: measure(np.zeros((4, 4), bool)), r"labels must be a \(H, W\) integer array; got shape \(4, 4\), "
                                                        r"dtype bool. A boolean mask must be labelled first"),
    (lambda: measure(np.zeros((4, 4, 4), np.int32)), r"labels must be a \(H, W\) integer array"),
    (lambda: measure([[1]]), r"labels must be a \(H, W\) integer array; got shape None, dtype list"),
    (lambda: measure(-np.ones((2, 2), np.int16)), r"labels must be >= 0"),
    (lambda: measure(np.ones((2, 2), np.int16), pixel_size=0), r"pixel_size must be a positive number "
                                                                          r"or None; got 0"),
    (lambda: measure(np.ones((2, 2), np.int16), pixel_size=True), r"pixel_size must be .*; got True"),
    (lambda: measure(np.ones((2, 2), np.int16), pixel_size="1"), r"pixel_size must be .*; got '1'"),
    (lambda: measure(np.ones((2, 2), np.int16), pixel_size=math.nan), r"pixel_size must be .*; got nan"),
    (lambda: measure_3d(np.ones((2, 2), np.int16)), r"labels must be a \(Z, Y, X\) integer array"),
    (lambda: measure_3d(np.ones((2, 2, 2), np.int16), voxel_size=(1, 1)),
     r"voxel_size must be 3 positive numbers \(z, y, x\) or None; got \(1, 1\)"),
    (lambda: measure_3d(np.ones((2, 2, 2), np.int16), voxel_size=1.0), r"voxel_size must be 3 positive"),
    (lambda: measure_3d(np.ones((2, 2, 2), np.int16), voxel_size=(1, -1, 1)), r"voxel_size must be 3"),
])
def test_measure_rejects(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# Rules


@pytest.mark.parametrize("text, expected, error", [
    ("npixels < 100 and circularity <= 0.7; area_px2 > 5000", "npixels < 100 and circularity <= 0.7; area_px2 > 5000",
     None),
    (["npixels >= 3", "label == 2"], "npixels >= 3; label == 2", None),
    ("npixels != 1e2", "npixels != 100", None),
    ("circularity>.5 AND npixels<-1", "circularity > 0.5 and npixels < -1", None),
    ("  sphericity >= 0.8  ", "sphericity >= 0.8", None),
    ("npixel < 100", None, "property must be one of label, npixels, area_px2, centroid_y_px, centroid_x_px, "
                           "perimeter_px, equivalent_diameter_px, feret_max_px, feret_min_px, major_axis_px, "
                           "minor_axis_px, eccentricity, solidity, circularity, area_um2, centroid_y_um, "
                           "centroid_x_um, perimeter_um"),
    ("npixel < 100", None, "sphericity, volume_um3, centroid_z_um, surface_area_um2; got 'npixel'"),
    ("npixels =< 100", None, "condition must be '<property> <op> <number>' with op one of < <= > >= == !=, or "
                             "'class == NAME' / 'class != NAME', joined by 'and' (groups by ';'); got 'npixels =< 100'"),
    ("class == 'class 1' and npixels < 5; class != long", "class == class 1 and npixels < 5; class != long", None),
    ("class < 3", None, "got 'class < 3'"),
    ("npixels < ", None, "got 'npixels <'"),
    ("npixels < 100 or area > 5", None, "got 'npixels < 100 or area > 5'"),
    ("npixels < abs(1)", None, "got 'npixels < abs(1)'"),
    ("NPIXELS < 1", None, "got 'NPIXELS'"),
    ("", None, "rules must contain at least one condition such as 'npixels < 100'; got ''"),
    ([" ", ""], None, "rules must contain at least one condition"),
    ("npixels < 1;", None, "group 2 must contain a condition; got an empty group in 'npixels < 1;' (a doubled or "
                           "trailing ';'?)"),
    (42, None, "rules must be a string or a list of strings; got 42"),
    (["npixels < 1", 3], None, "rules must be a string or a list of strings"),
])
def test_parse_rules(text, expected, error):
    if error is None:
        assert str(parse_rules(text)) == expected
        return
    with pytest.raises(ValueError) as raised:
        parse_rules(text)
    assert error in str(raised.value)


def test_parse_rules_lists_every_problem_and_takes_property_names():
    with pytest.raises(ValueError) as error:
        parse_rules("foo < 1 and npixels =< 2; ; bar > 3")
    message = str(error.value)
    assert message.count("\n  - ") == 4 and "'foo'" in message and "'bar'" in message and "group 2" in message
    rules = parse_rules("intensity > 3", properties=("label", "intensity"))
    assert rules.properties == ("intensity",)
    with pytest.raises(ValueError, match="property must be one of label, intensity; got 'npixels'"):
        parse_rules("npixels > 3", properties=("label", "intensity"))


@pytest.mark.parametrize("row, expected", [
    ({"npixels": 50, "circularity": 0.5, "area_px2": 50}, True),  # first group
    ({"npixels": 50, "circularity": 0.9, "area_px2": 50}, False),  # first group fails on circularity
    ({"npixels": 6000, "circularity": 0.9, "area_px2": 6000}, True),  # second group
    ({"npixels": 100, "circularity": 0.7, "area_px2": 5000}, False),  # both bounds exclusive where written so
    ({"npixels": 99, "circularity": 0.7, "area_px2": 0}, True),  # <= includes
    ({"npixels": 50, "circularity": math.nan, "area_px2": 50}, False),  # NaN satisfies no comparison
])
def test_rules_match(row, expected):
    rules = parse_rules("npixels < 100 and circularity <= 0.7; area_px2 > 5000")
    assert rules.matches(row) is expected
    assert rules.properties == ("npixels", "circularity", "area_px2")


# Filtering


def three_objects() -> np.ndarray:
    labels = np.zeros((6, 8), np.uint16)
    labels[0, 0] = 1  # 1 px
    labels[2:4, 2:4] = 2  # 4 px
    labels[1:4, 5:8] = 3  # 9 px
    return labels


@pytest.mark.parametrize("rules, action, removed", [
    ("npixels < 5", "remove", {1, 2}),
    ("npixels < 5", "keep", {3}),
    ("npixels < 2; npixels > 5", "remove", {1, 3}),
    (["npixels > 2 and npixels < 5"], "remove", {2}),
    ("npixels > 100", "remove", set()),
])
def test_filter_instances(rules, action, removed):
    labels = three_objects()
    rows = measure(labels)
    kept, status = filter_instances(labels, rows, rules, action=action)
    assert kept.dtype == labels.dtype
    np.testing.assert_array_equal(kept, np.where(np.isin(labels, list(removed)), 0, labels))  # ids unchanged
    assert [r["status"] for r in status] == ["removed" if r["label"] in removed else "kept" for r in rows]
    assert all("status" not in r for r in rows)  # the input rows are not modified
    assert [{k: v for k, v in r.items() if k != "status"} for r in status] == rows


def test_filter_instances_takes_parsed_rules():
    labels = three_objects()
    kept, _ = filter_instances(labels, measure(labels), parse_rules("label == 2"))
    assert set(np.unique(kept)) == {0, 1, 3}


@pytest.mark.parametrize("rows, rules, action, message", [
    (lambda r: r, "npixels < 5", "drop", "action must be 'remove' or 'keep'; got 'drop'"),
    (lambda r: r[:2], "npixels < 5", "remove", "rows must have a row for every label in labels; missing rows for 3"),
    (lambda r: r + [{**r[0], "label": 9}], "npixels < 5", "remove", "got rows for absent labels 9"),
    (lambda r: r + [r[0]], "npixels < 5", "remove", "rows must have one row per label; got repeated labels 1"),
    (lambda r: [{k: v for k, v in x.items() if k != "area_px2"} for x in r], "area_px2 < 5", "remove",
     "row 0 must have label, area_px2; missing area_px2 (has label, npixels,"),
    (lambda r: r, "npixels < 5;", "remove", "group 2 must contain a condition"),
])
def test_filter_instances_rejects(rows, rules, action, message):
    labels = three_objects()
    with pytest.raises(ValueError) as error:
        filter_instances(labels, rows(measure(labels)), rules, action=action)
    assert message in str(error.value)


def test_filter_instances_rejects_float_labels():
    with pytest.raises(ValueError, match="labels must be an integer array; got float32"):
        filter_instances(np.zeros((2, 2), np.float32), [], "npixels < 5")


# Classical baseline


def two_touching_disks(seed: int = 0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :96]
    left = (yy - 32) ** 2 + (xx - 34) ** 2 <= 14 ** 2
    right = (yy - 32) ** 2 + (xx - 60) ** 2 <= 14 ** 2
    truth = np.where(left & (~right | (xx < 47)), 1, np.where(right, 2, 0))
    image = (left | right).astype(np.float64) + rng.normal(0.0, 0.15, yy.shape)
    return truth, image


def best_iou(truth: np.ndarray, labels: np.ndarray, label: int) -> float:
    own = truth == label
    return max(np.sum(own & (labels == k)) / np.sum(own | (labels == k)) for k in range(1, labels.max() + 1))


@pytest.mark.parametrize("transform, invert", [
    (lambda im: im, False),
    (lambda im: 1.0 - im, True),
    (lambda im: np.stack([im, im, im], axis=-1), False),
    (lambda im: np.round(im * 1000 + 2000).astype(np.uint16), False),
])
def test_classical_baseline_splits_touching_disks(transform, invert):
    truth, image = two_touching_disks()
    labels = classical_baseline(transform(image), min_distance=8, sigma=1.5, invert=invert)
    assert labels.dtype == np.uint16 and labels.max() == 2
    assert best_iou(truth, labels, 1) > 0.9 and best_iou(truth, labels, 2) > 0.9


@pytest.mark.parametrize("image, kwargs, message", [
    (np.ones((10, 10)), {}, "image must not be constant to be thresholded; got every value 1"),
    (np.ones((2, 2, 2, 2)), {}, "image must be an (H, W) or (H, W, C) numeric array; got shape (2, 2, 2, 2)"),
    (np.zeros((4, 4), bool), {}, "dtype bool"),
    (np.zeros((0, 4)), {}, "got shape (0, 4)"),
    (np.eye(4), {"min_distance": 0}, "min_distance must be an integer >= 1 (pixels); got 0"),
    (np.eye(4), {"sigma": -1}, "sigma must be a number >= 0 (pixels); got -1"),
    (np.eye(4), {"sigma": True}, "sigma must be a number >= 0 (pixels); got True"),
    (np.eye(4), {"label_dtype": "int32"}, "label_dtype must be one of auto, uint16, uint32; got 'int32'"),
])
def test_classical_baseline_rejects(image, kwargs, message):
    with pytest.raises(ValueError) as error:
        classical_baseline(image, **kwargs)
    assert message in str(error.value)
