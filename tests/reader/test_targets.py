"""Instance-segmentation targets: hand-computed cases, references from skimage / scipy, validation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.segmentation import find_boundaries

from lib.common.settings import ConfigError
from lib.reader.targets import (
    CHANNELS,
    CONTOUR_MODES,
    TargetSpec,
    contours,
    make_targets,
    parse_instance_channels,
    touching_areas,
)

ALL = ("F", "C", "Db", "P", "T")


def channel(targets: np.ndarray, spec: TargetSpec, name: str) -> np.ndarray:
    return targets[..., spec.channels.index(name)]


def two_squares(left: int = 3, right: int = 7, dtype=np.uint16) -> np.ndarray:
    """(11, 20): two 9 x 9 squares side by side, touching along columns 9 | 10, one pixel of
    background around them. Centres (5, 5) and (5, 14)."""
    labels = np.zeros((11, 20), dtype)
    labels[1:10, 1:10] = left
    labels[1:10, 10:19] = right
    return labels


def random_labels(seed: int, shape=(24, 30), block: int = 3, n_ids: int = 6) -> np.ndarray:
    """Blocks of random ids (0 included), so objects touch one another in every direction."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, n_ids, size=(shape[0] // block, shape[1] // block))
    labels = np.kron(coarse, np.ones((block, block), np.int64))
    # Sprinkle single pixels so that thin and diagonal contacts occur too.
    flips = rng.random(labels.shape) < 0.05
    labels[flips] = rng.integers(0, n_ids, size=int(flips.sum()))
    return labels


# Two touching squares, every value computed by hand

def test_two_touching_squares_every_channel():
    labels = two_squares()
    spec = TargetSpec(channels=ALL, point_radius=3, touch_width=2).validate()
    targets = make_targets(labels, spec)
    assert targets.shape == (11, 20, 5) and targets.dtype == np.float32

    np.testing.assert_array_equal(channel(targets, spec, "F"), labels > 0)

    contour = channel(targets, spec, "C")
    np.testing.assert_array_equal(contour, find_boundaries(labels, mode="thick"))
    assert contour[1:10, 9:11].all()          # the seam between the squares
    assert not contour[2:9, 2:8].any()        # the squares' interiors

    # Nearest pixel outside a rectangle lies straight across its nearest side: the left square's
    # outside rows are 0 and 10, columns 0 and 10 (the right square); its maximum is 5.
    rows, cols = np.mgrid[:11, :20]
    expected = np.zeros((11, 20))
    left, right = labels == 3, labels == 7
    expected[left] = (np.minimum(np.minimum(rows, 10 - rows), np.minimum(cols, 10 - cols)) / 5)[left]
    expected[right] = (np.minimum(np.minimum(rows, 10 - rows), np.minimum(cols - 9, 19 - cols)) / 5)[right]
    distance = channel(targets, spec, "Db")
    np.testing.assert_allclose(distance, expected, rtol=1e-6, atol=0)
    assert distance[5, 5] == 1 and distance[5, 14] == 1
    assert (distance[labels == 0] == 0).all()
    np.testing.assert_allclose(distance[1:10, 9:11][1:-1], 0.2, rtol=1e-6)  # seam: 1 px of 5

    disks = ((rows - 5) ** 2 + (cols - 5) ** 2 <= 9) | ((rows - 5) ** 2 + (cols - 14) ** 2 <= 9)
    np.testing.assert_array_equal(channel(targets, spec, "P"), disks)

    # Contact pixels are columns 9 and 10; width 2 adds one column on each side.
    touch = np.zeros((11, 20), bool)
    touch[1:10, 8:12] = True
    np.testing.assert_array_equal(channel(targets, spec, "T"), touch)


@pytest.mark.parametrize("touch_width, columns", [(1, (9, 11)), (2, (8, 12)), (3, (7, 13))])
def test_touch_band_width(touch_width, columns):
    band = touching_areas(two_squares(), touch_width)
    expected = np.zeros((11, 20), bool)
    # Rows 1 and 9 end the seam; a disk of radius < 3 around their contacts stays in rows 1..9
    # once restricted to the foreground.
    expected[1:10, columns[0]:columns[1]] = True
    np.testing.assert_array_equal(band, expected)


def test_diagonal_contact_is_touching_and_far_pixels_are_not():
    labels = np.zeros((8, 8), np.uint8)
    labels[1:4, 1:4] = 1
    labels[4:7, 4:7] = 2        # meets object 1 only at the corner (3, 3) / (4, 4)
    labels[0, 7] = 3            # alone
    band = touching_areas(labels, 1)
    expected = np.zeros((8, 8), bool)
    expected[3, 3] = expected[4, 4] = True
    np.testing.assert_array_equal(band, expected)
    assert not touching_areas(labels, 2)[0, 7]


# C is find_boundaries

@pytest.mark.parametrize("mode", CONTOUR_MODES)
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.uint16])
def test_contour_equals_find_boundaries(mode, seed, dtype):
    labels = random_labels(seed).astype(dtype)
    if dtype == np.uint8:  # the top id of the dtype is what find_boundaries' outer mode marks background with
        labels[labels == 5] = 255
    spec = TargetSpec(channels=("C",), contour_mode=mode)
    expected = find_boundaries(labels, mode=mode)
    np.testing.assert_array_equal(make_targets(labels, spec)[..., 0], expected)
    np.testing.assert_array_equal(contours(labels, mode), expected)


# Db and P against a whole-image reference

@pytest.mark.parametrize("seed", range(3))
def test_distance_matches_whole_image_transform(seed):
    # scipy's transform of the whole patch only sees non-object pixels inside the patch, which is
    # the edge rule; the bounding-box shortcut must give the same numbers.
    labels = random_labels(seed, shape=(40, 36), block=4, n_ids=5)  # an id may have several pieces
    spec = TargetSpec(channels=("Db", "P"), point_radius=0)
    targets = make_targets(labels, spec)
    expected = np.zeros(labels.shape)
    for i in np.unique(labels[labels > 0]):
        mask = labels == i
        d = ndi.distance_transform_edt(mask)
        expected[mask] = d[mask] / d.max()
        # P with radius 0 is one pixel per object, at a maximum of its distance.
        points = targets[..., 1] * mask
        assert points.sum() == 1
        assert expected[points == 1][0] == 1
    np.testing.assert_allclose(targets[..., 0], expected, rtol=1e-6, atol=1e-7)


def test_crop_edge_is_not_a_boundary():
    # A band along the top edge: its only boundary is below, so distances 3, 2, 1 from the top.
    labels = np.zeros((6, 5), np.int32)
    labels[0:3] = 4
    distance = make_targets(labels, TargetSpec(channels=("Db",)))[..., 0]
    np.testing.assert_allclose(distance[0:3], np.repeat([[1.0], [2 / 3], [1 / 3]], 5, axis=1), rtol=1e-6)
    assert (distance[3:] == 0).all()


def test_object_cut_by_the_left_edge():
    labels = np.zeros((7, 8), np.uint8)
    labels[1:6, 0:4] = 9        # 5 rows, cut at column 0: boundary above, below and at column 4
    distance = make_targets(labels, TargetSpec(channels=("Db",)))[..., 0]
    # Rows 1..5 are at 1, 2, 3, 2, 1 from the top/bottom; columns 0..3 at 4, 3, 2, 1 from column 4.
    rows, cols = np.mgrid[1:6, 0:4]
    expected = np.minimum(np.minimum(rows, 6 - rows), 4 - cols) / 3
    np.testing.assert_allclose(distance[1:6, 0:4], expected, rtol=1e-6)
    assert (distance[1:6, 0] > 0.3).all()


def test_object_filling_the_patch():
    labels = np.full((7, 7), 2, np.uint16)
    spec = TargetSpec(channels=ALL, point_radius=1)
    targets = make_targets(labels, spec)
    assert (channel(targets, spec, "F") == 1).all()
    assert (channel(targets, spec, "C") == 0).all()
    assert (channel(targets, spec, "Db") == 1).all()
    assert (channel(targets, spec, "T") == 0).all()
    plus = np.zeros((7, 7))
    plus[3, 2:5] = plus[2:5, 3] = 1
    np.testing.assert_array_equal(channel(targets, spec, "P"), plus)


@pytest.mark.parametrize("box, centre", [
    ((slice(1, 4), slice(1, 10)), (2, 5)),    # 3 x 9: a ridge of equal maxima along row 2; its middle
    ((slice(1, 5), slice(1, 5)), (2, 2)),     # 4 x 4: four tied pixels; the first in raster order
    ((slice(2, 3), slice(3, 4)), (2, 3)),     # one pixel
])
def test_centre_ties_are_broken_deterministically(box, centre):
    labels = np.zeros((6, 11), np.uint8)
    labels[box] = 1
    points = make_targets(labels, TargetSpec(channels=("P",), point_radius=0))[..., 0]
    assert list(zip(*np.nonzero(points))) == [centre]


def test_centre_of_a_non_convex_object_lies_inside_it():
    labels = np.zeros((15, 15), np.uint8)
    labels[2:13, 2:6] = 1       # a C shape whose centroid is in the background
    labels[2:6, 2:13] = 1
    labels[9:13, 2:13] = 1
    spec = TargetSpec(channels=("P",), point_radius=2)
    points = make_targets(labels, spec)[..., 0]
    centroid = np.round(ndi.center_of_mass(labels)).astype(int)
    assert labels[tuple(centroid)] == 0
    assert points.sum() > 0 and (labels[points == 1] == 1).all()


# Inputs, ids and the output buffer

@pytest.mark.parametrize("ids, dtype", [
    ((5, 60000), np.uint16),                   # sparse ids, found directly
    ((4097, 65535), np.uint32),                # above the direct limit: renumbered by a lookup table
    ((70000, 4_000_000_000), np.uint64),       # huge ids: renumbered by sorting
    ((2, 1), np.int8),
])
def test_large_and_non_consecutive_ids_give_the_same_targets(ids, dtype):
    spec = TargetSpec(channels=ALL)
    expected = make_targets(two_squares(1, 2), spec)
    np.testing.assert_array_equal(make_targets(two_squares(*ids, dtype=dtype), spec), expected)


def test_large_ids_without_background():
    labels = np.full((6, 8), 70000, np.uint32)
    labels[:, 4:] = 5_000_000
    expected = make_targets(np.where(labels == 70000, 1, 2), TargetSpec(channels=ALL))
    np.testing.assert_array_equal(make_targets(labels, TargetSpec(channels=ALL)), expected)


@pytest.mark.parametrize("convert", [lambda a: a.astype(np.float32), lambda a: a.astype(np.float64)])
def test_float_labels_holding_integers(convert):
    labels = two_squares()
    spec = TargetSpec(channels=ALL)
    np.testing.assert_array_equal(make_targets(convert(labels), spec), make_targets(labels, spec))


def test_bool_labels_are_one_object():
    labels = two_squares() > 0
    targets = make_targets(labels, TargetSpec(channels=("T", "Db")))
    assert (targets[..., 0] == 0).all()      # one object: nothing touches
    assert targets[..., 1].max() == 1


def test_empty_patch_gives_zero_targets():
    targets = make_targets(np.zeros((16, 12), np.uint16), TargetSpec(channels=ALL))
    assert targets.shape == (16, 12, 5) and not targets.any()


def test_out_is_written_in_place():
    labels = two_squares()
    spec = TargetSpec(channels=("T", "Db", "F", "P", "C"))
    buffer = np.full((2, 11, 20, 5), 7, np.float32)   # stale values everywhere
    out = buffer[1]
    result = make_targets(labels, spec, out=out)
    assert result is out
    np.testing.assert_array_equal(buffer[1], make_targets(labels, spec))
    assert (buffer[0] == 7).all()


@pytest.mark.parametrize("out, message", [
    (np.zeros((11, 20, 2), np.float32), r"out must be a float32 array of shape \(11, 20, 3\)"),
    (np.zeros((11, 20, 3), np.float64), "float64"),
    ([0.0], "list"),
])
def test_bad_out_raises(out, message):
    with pytest.raises(ValueError, match=message):
        make_targets(two_squares(), TargetSpec(), out=out)


@pytest.mark.parametrize("instances, message", [
    (np.zeros((4, 4, 1), np.uint16), r"2-D \(H, W\) label image; got shape \(4, 4, 1\)"),
    (np.zeros(5, np.uint16), "2-D"),
    (np.array([[0, -2], [1, 1]], np.int32), "must be >= 0.*minimum -2"),
    (np.array([[0, -2.0], [1, 1]]), "must be >= 0"),
    (np.array([[0, 0.5], [1, 1]]), "whole-number ids"),
    (np.array([[0, np.nan], [1, 1]]), "whole-number ids"),
    (np.array([["a", "b"]]), "integer, bool or float dtype"),
])
def test_bad_instances_raise(instances, message):
    with pytest.raises(ValueError, match=message):
        make_targets(instances, TargetSpec())


def test_helpers_reject_bad_settings():
    with pytest.raises(ValueError, match="mode must be one of thick, inner, outer; got 'thin'"):
        contours(two_squares(), "thin")
    with pytest.raises(ValueError, match="touch_width must be an integer >= 1; got 0"):
        touching_areas(two_squares(), 0)


# Spec: validation, kinds, weights, serialisation, parsing

def test_channel_table():
    assert CHANNELS == {"F": "binary", "C": "binary", "Db": "distance", "P": "binary", "T": "binary"}
    spec = TargetSpec(channels=("Db", "F", "T"), weights=(0.5, 1, 2))
    assert spec.kinds == ("distance", "binary", "binary")
    assert spec.loss_weights == (0.5, 1.0, 2.0)
    assert TargetSpec(channels=("F", "P")).loss_weights == (1.0, 1.0)


@pytest.mark.parametrize("kwargs, message", [
    ({}, None),
    ({"channels": ALL, "weights": (1, 0, 0.5, 2, 0)}, None),
    ({"channels": ["F", "Db"], "weights": [1, 2]}, None),    # lists, as read from JSON
    ({"channels": ("F", "X")}, r"channels must be names from F, C, Db, P, T \(case-sensitive\); got 'X'"),
    ({"channels": ("F", "db")}, "got 'db'. Did you mean 'Db'"),
    ({"channels": ("F", "C", "F")}, "must not repeat a name; got F more than once"),
    ({"channels": ()}, "at least one channel"),
    ({"channels": "F,C"}, "tuple of channel names.*parse_instance_channels"),
    ({"weights": (1, 1)}, r"one number per channel \(3: F,C,Db\); got 2"),
    ({"weights": (1, -1, 1)}, "finite numbers >= 0; got -1"),
    ({"weights": (1, float("nan"), 1)}, "finite numbers >= 0; got nan"),
    ({"weights": (1, "2", 1)}, "finite numbers >= 0; got '2'"),
    ({"weights": (0, 0, 0)}, "must not all be 0"),
    ({"weights": 1.0}, "weights must be a tuple"),
    ({"contour_mode": "thin"}, "contour_mode must be one of thick, inner, outer; got 'thin'"),
    ({"point_radius": -1}, "point_radius must be an integer >= 0.*got -1"),
    ({"point_radius": 1.5}, "point_radius must be an integer >= 0.*got 1.5"),
    ({"touch_width": 0}, "touch_width must be an integer >= 1.*got 0"),
    ({"touch_width": True}, "touch_width must be an integer >= 1.*got True"),
    ({"distance_loss": "huber"}, "distance_loss must be one of l1, mse; got 'huber'"),
])
def test_spec_validation(kwargs, message):
    spec = TargetSpec(**kwargs)
    if message is None:
        assert spec.validate() is spec
    else:
        with pytest.raises(ConfigError, match=message):
            spec.validate()


def test_every_invalid_field_is_reported_at_once():
    spec = TargetSpec(channels=("F", "Q"), weights=(1,), contour_mode="x", point_radius=-1, touch_width=0,
                      distance_loss="l2")
    with pytest.raises(ValueError) as info:
        spec.validate()
    assert len(info.value.violations) == 6
    for name in ("channels", "weights", "contour_mode", "point_radius", "touch_width", "distance_loss"):
        assert f"{name} must" in str(info.value)


def test_make_targets_validates_the_spec():
    with pytest.raises(ConfigError, match="contour_mode must"):
        make_targets(two_squares(), TargetSpec(contour_mode="thin"))


@pytest.mark.parametrize("spec", [
    TargetSpec(),
    TargetSpec(channels=ALL, weights=(1, 1, 0.5, 2, 0.25), contour_mode="inner", point_radius=0,
               touch_width=4, distance_loss="mse"),
])
def test_dict_round_trip_through_json(spec):
    d = json.loads(json.dumps(spec.to_dict()))
    assert TargetSpec.from_dict(d) == spec
    assert TargetSpec.from_dict({"channels": ["F"]}) == TargetSpec(channels=("F",))


@pytest.mark.parametrize("d, message", [
    ({"channels": ["F"], "colour": 1}, "unknown setting 'colour' for TargetSpec; known: channels, weights"),
    ({"channels": ["F", "Z"]}, "got 'Z'"),
    (["F"], "must be a dict.*got list"),
])
def test_from_dict_rejects_bad_input(d, message):
    with pytest.raises(ConfigError, match=message):
        TargetSpec.from_dict(d)


@pytest.mark.parametrize("text, weights, options, expected", [
    ("F,C,Db", None, {}, TargetSpec(channels=("F", "C", "Db"))),
    (" F , C,Db ", "1, 1,0.5", {}, TargetSpec(channels=("F", "C", "Db"), weights=(1.0, 1.0, 0.5))),
    ("Db", None, {"distance_loss": "mse"}, TargetSpec(channels=("Db",), distance_loss="mse")),
    ("F,P,T", None, {"point_radius": 2, "touch_width": 3},
     TargetSpec(channels=("F", "P", "T"), point_radius=2, touch_width=3)),
])
def test_parse_instance_channels(text, weights, options, expected):
    assert parse_instance_channels(text, weights, **options) == expected


@pytest.mark.parametrize("text, weights, options, message", [
    ("F,,C", None, {}, "with none empty; got 'F,,C'"),
    ("", None, {}, "with none empty"),
    ("F,X", None, {}, "got 'X'"),
    ("f,c", None, {}, "Did you mean 'F'"),
    ("F,C", "1,a", {}, "comma-separated numbers.*got '1,a'"),
    ("F,C", "1", {}, "one number per channel"),
    ("F,C", None, {"radius": 2}, "unknown option 'radius'.*known: contour_mode"),
    ("F,C", None, {"contour_mode": "thin"}, "contour_mode must"),
])
def test_parse_instance_channels_errors(text, weights, options, message):
    with pytest.raises(ConfigError, match=message):
        parse_instance_channels(text, weights, **options)
