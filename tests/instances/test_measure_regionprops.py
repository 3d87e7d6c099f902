"""lib/instances/measure.py against scikit-image's regionprops and hand-computed shapes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lib.instances.measure import (
    MEASUREMENT_COLUMNS,
    MEASUREMENT_COLUMNS_3D_UM,
    feret_diameters,
    measure,
    measure_3d,
    measurement_columns,
)
from tests.conftest import SHARED_DATA

# our column (pixel units) -> regionprops property
REGIONPROPS = {"area_px2": "area", "perimeter_px": "perimeter", "equivalent_diameter_px": "equivalent_diameter_area",
               "feret_max_px": "feret_diameter_max", "major_axis_px": "axis_major_length",
               "minor_axis_px": "axis_minor_length", "eccentricity": "eccentricity", "solidity": "solidity"}


def _hand_made() -> np.ndarray:
    labels = np.zeros((90, 100), np.int32)
    yy, xx = np.mgrid[:90, :100]
    labels[((yy - 25) / 15) ** 2 + ((xx - 30) / 9) ** 2 <= 1] = 1  # an upright ellipse
    rotated = ((yy - 60) * 0.8 + (xx - 70) * 0.6) / 14, (-(yy - 60) * 0.6 + (xx - 70) * 0.8) / 6
    labels[rotated[0] ** 2 + rotated[1] ** 2 <= 1] = 2  # a tilted one
    labels[70:75, 5:27] = 3  # a rectangle
    labels[3, 3] = 4  # a pixel
    labels[40:60, 50:56] = 5
    labels[45:50, 52:54] = 0  # a rectangle with a hole
    labels[(yy - 75) ** 2 + (xx - 45) ** 2 <= 36] = 6  # a disc of radius 6
    labels[75, 40:51] = 0  # cut through by a line: a concave pair of half discs, one label
    return labels


def _compare(labels: np.ndarray) -> int:
    from skimage.measure import regionprops

    rows, props = measure(labels), regionprops(labels)
    assert [r["label"] for r in rows] == [p.label for p in props]
    for row, prop in zip(rows, props):
        assert (row["centroid_y_px"], row["centroid_x_px"]) == pytest.approx(prop.centroid, abs=1e-9)
        for ours, theirs in REGIONPROPS.items():
            assert row[ours] == pytest.approx(float(getattr(prop, theirs)), rel=1e-9, abs=1e-9), (row["label"], ours)
        assert row["npixels"] == prop.area
    return len(rows)


def test_hand_made_objects_match_regionprops():
    assert _compare(_hand_made()) == 6


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared NIST data not beside the checkout")
def test_objects_of_real_expert_masks_match_regionprops():
    from skimage.measure import label

    from lib.store.images import read_mask

    counted = 0
    for path in sorted((SHARED_DATA / "masks").glob("*.tif"))[:4]:
        counted += _compare(label(read_mask(path) > 0, connectivity=2).astype(np.int32))
    assert counted >= 4


def test_pixel_size_scales_lengths_and_areas_and_names_the_unit():
    from skimage.measure import regionprops

    labels = _hand_made()
    pixel, micro = measure(labels), measure(labels, pixel_size=0.65)
    assert list(pixel[0]) == list(MEASUREMENT_COLUMNS) == list(measurement_columns(None))
    assert list(micro[0]) == list(measurement_columns(0.65))
    assert {"area_um2", "centroid_x_um", "centroid_y_um", "feret_min_um", "perimeter_um"} <= set(micro[0])
    assert not {"diameter", "elongation", "area", "perimeter"} & set(micro[0])
    for p, m, prop in zip(pixel, micro, regionprops(labels, spacing=(0.65, 0.65))):
        for name in MEASUREMENT_COLUMNS:
            unit = name.replace("_px2", "_um2").replace("_px", "_um")
            factor = 0.65 ** 2 if name.endswith("_px2") else 0.65 if name.endswith("_px") else 1.0
            assert m[unit] == pytest.approx(p[name] * factor, nan_ok=True), name
        assert (m["centroid_y_um"], m["centroid_x_um"]) == pytest.approx(prop.centroid)
        assert m["area_um2"] == pytest.approx(prop.area)
        assert m["feret_max_um"] == pytest.approx(prop.feret_diameter_max)


@pytest.mark.parametrize("height, width", [(5, 22), (12, 12), (3, 40)])
def test_feret_diameters_of_rectangles_by_hand(height, width):
    labels = np.zeros((60, 60), np.int32)
    labels[4:4 + height, 9:9 + width] = 1
    row, = measure(labels)
    # The outline is the 0.5 iso-contour: the rectangle's sides at -0.5 and n - 0.5 with corners cut
    # diagonally through the pixel-edge midpoints, so the width across is exactly the side.
    assert row["feret_min_px"] == pytest.approx(min(height, width))
    longest = max(math.hypot(height - 1, width), math.hypot(height, width - 1))
    assert row["feret_max_px"] == pytest.approx(longest)
    assert row["solidity"] == 1.0 and row["area_px2"] == height * width
    assert row["centroid_y_px"] == 4 + (height - 1) / 2 and row["centroid_x_px"] == 9 + (width - 1) / 2


def test_feret_of_a_tilted_rectangle_and_of_a_disc():
    # Exact polygons: a 10 x 4 rectangle turned by 30 degrees; a regular 360-gon of radius 7.
    angle = math.radians(30)
    turn = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    corners = np.array([[0, 0], [10, 0], [10, 4], [0, 4]], float) @ turn.T
    assert feret_diameters(corners) == pytest.approx((math.hypot(10, 4), 4.0))
    circle = 7 * np.stack([np.cos(np.linspace(0, 2 * math.pi, 360, endpoint=False)),
                           np.sin(np.linspace(0, 2 * math.pi, 360, endpoint=False))], axis=1)
    longest, shortest = feret_diameters(circle)
    assert longest == pytest.approx(14.0) and 14 * math.cos(math.pi / 360) - 1e-9 <= shortest <= 14.0
    assert feret_diameters(np.array([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])) == pytest.approx((10.0, 0.0))
    # A digital disc of radius r spans 2r + 1 pixels along the axes; across other directions its
    # outline (corners cut) is at most a pixel narrower or wider (measured 40.3 and 41.4 at r = 20).
    r = 20
    yy, xx = np.mgrid[:50, :50]
    row, = measure(((yy - 25) ** 2 + (xx - 25) ** 2 <= r * r).astype(np.uint8))
    assert 2 * r <= row["feret_min_px"] <= 2 * r + 1 <= row["feret_max_px"] <= 2 * r + 2
    assert row["equivalent_diameter_px"] == pytest.approx(2 * r, rel=0.02)
    assert row["eccentricity"] < 0.05 and row["solidity"] > 0.95
    assert 0.88 < row["circularity"] < 0.95  # 0.908: the boundary-pixel perimeter is ~5 % long on a disc


def test_degenerate_objects_and_empty_images():
    labels = np.zeros((8, 12), np.int32)
    labels[1, 1] = 1
    labels[4, 2:10] = 2  # a one-pixel-wide line
    point, line = measure(labels)
    assert point["perimeter_px"] == 0.0 and math.isnan(point["circularity"])  # undefined, an empty CSV cell
    assert point["feret_max_px"] == 1.0 and point["major_axis_px"] == 0.0 and point["eccentricity"] == 0.0
    assert line["feret_max_px"] == 8.0 and line["feret_min_px"] == 1.0 and line["eccentricity"] == 1.0
    assert measure(np.zeros((4, 4), np.uint8)) == []


def test_3d_columns_carry_units_and_match_regionprops():
    from skimage.measure import regionprops

    zz, yy, xx = np.mgrid[:25, :25, :25]
    ball = ((zz - 12) ** 2 + (yy - 12) ** 2 + (xx - 12) ** 2 <= 64).astype(np.uint8)
    row, = measure_3d(ball, voxel_size=(2.0, 0.5, 0.5))
    assert list(row) == list(MEASUREMENT_COLUMNS_3D_UM)
    prop, = regionprops(ball, spacing=(2.0, 0.5, 0.5))
    assert row["volume_um3"] == pytest.approx(prop.area)
    assert (row["centroid_z_um"], row["centroid_y_um"], row["centroid_x_um"]) == pytest.approx(prop.centroid)
    assert row["equivalent_diameter_um"] == pytest.approx(prop.equivalent_diameter_area)
    plain, = measure_3d(ball)
    assert plain["equivalent_diameter_px"] == pytest.approx(regionprops(ball)[0].equivalent_diameter_area)
    assert 0.85 < plain["sphericity"] <= 1.0 and "diameter" not in plain
