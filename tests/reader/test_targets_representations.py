"""Targets of issue 17 (R, H, V, D, Dc, Dn, B, A): hand-computed cases, a per-pixel reference for
the rays, plane expansion and the refusal of channel sets that cannot be post-processed."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lib.common.settings import ConfigError
from lib.reader.targets import TargetSpec, make_targets, parse_instance_channels
from lib.reader.targets_fields import affinities, centre_offsets, neighbour_distance
from lib.reader.targets_stardist import RAY_SCALE, decode_rays, encode_rays, ray_directions, star_distances


def slow_rays(labels: np.ndarray, n_rays: int) -> np.ndarray:
    """Per pixel and ray, step by step: the definition of targets_stardist written plainly."""
    h, w = labels.shape
    dy, dx = ray_directions(n_rays)
    out = np.zeros((h, w, n_rays), np.float32)
    for y in range(h):
        for x in range(w):
            if labels[y, x] == 0:
                continue
            for k in range(n_rays):
                t = 0
                while True:
                    t += 1
                    yy, xx = y + math.floor(t * dy[k] + 0.5), x + math.floor(t * dx[k] + 0.5)
                    if not (0 <= yy < h and 0 <= xx < w) or labels[yy, xx] != labels[y, x]:
                        break
                out[y, x, k] = t - 1 + 0.5 / max(abs(dy[k]), abs(dx[k]))
    return out


def test_rays_of_a_square_by_hand():
    # 11 x 11 square: from its centre, axis rays end on the square's edges (5.5 px); diagonal
    # samples at t * 0.7071 rounded stay inside up to t = 7 (4.95 -> 5) and leave at t = 8
    # (5.66 -> 6): 7 + 0.5 / 0.7071 = 7.71 px (the corner is at 7.78).
    labels = np.zeros((21, 21), np.int32)
    labels[5:16, 5:16] = 1
    rays = star_distances(labels, 8)[10, 10]
    np.testing.assert_allclose(rays, [5.5, 7.0 + 0.5 / math.sqrt(0.5)] * 4, atol=1e-5)
    # From the pixel next to the right edge: 0.5 px to the right, 9.5 px to the left.
    assert star_distances(labels, 4)[10, 14].tolist() == [1.5, 5.5, 9.5, 5.5]
    assert star_distances(labels, 4)[10, 15].tolist() == [0.5, 5.5, 10.5, 5.5]


def test_rays_of_a_disc_are_its_radius():
    yy, xx = np.mgrid[:41, :41]
    disc = ((yy - 20) ** 2 + (xx - 20) ** 2 <= 12 ** 2).astype(np.uint8)
    rays = star_distances(disc, 32)[20, 20]
    # the edge of the digital disc of radius 12 is 12.5 px from its centre along the axes; the
    # rounded samples of oblique rays leave up to one pixel early (11.5 px at 11.25 degrees)
    assert rays[0] == rays[8] == rays[16] == rays[24] == 12.5
    assert np.all(np.abs(rays - 12.5) <= 1.0), rays


def test_rays_match_the_plain_definition_on_touching_objects():
    rng = np.random.default_rng(3)
    coarse = rng.integers(0, 4, (5, 6))
    labels = np.kron(coarse, np.ones((4, 5), np.int64))
    labels[rng.random(labels.shape) < 0.05] = 7
    np.testing.assert_allclose(star_distances(labels, 12), slow_rays(labels, 12), atol=1e-5)
    # the grid option computes every other row and column only, the same values there
    grid = star_distances(labels, 12, grid=2)
    np.testing.assert_allclose(grid[::2, ::2], slow_rays(labels, 12)[::2, ::2], atol=1e-5)
    assert not grid[1::2].any() and not grid[:, 1::2].any()
    # another offset: the other parities, the same values there
    shifted = star_distances(labels, 12, grid=2, offset=(1, 0))
    np.testing.assert_allclose(shifted[1::2, ::2], slow_rays(labels, 12)[1::2, ::2], atol=1e-5)
    assert not shifted[::2].any() and not shifted[:, 1::2].any()
    with pytest.raises(ValueError, match="offset"):
        star_distances(labels, 12, grid=2, offset=(2, 0))


def test_ray_targets_supervise_every_pixel_parity():
    """The reader's ray grid moves from patch to patch: over many patches every (row, column)
    parity carries ray targets about equally often (a fixed grid left 3 pixels in 4 unsupervised,
    and the network returned arbitrary rays there)."""
    from data.generate import synthesize

    spec = parse_instance_channels("F,R", None, n_rays=8)
    rng = np.random.default_rng(0)
    counts = np.zeros((2, 2))
    for _ in range(80):
        labels = synthesize(rng, 48, 48, n_objects=(3, 6))[1]
        rays = make_targets(labels, spec)[..., 1:]
        supervised = rays.max(axis=-1) > 0
        for dy in range(2):
            for dx in range(2):
                counts[dy, dx] += supervised[dy::2, dx::2].sum()
    assert counts.min() > 0.12 * counts.sum()  # 0.25 each when even; a fixed grid gives 0


def test_ray_encoding_round_trips():
    d = np.array([0.0, 0.5, 3.0, 16.0, 200.0], np.float32)
    np.testing.assert_allclose(encode_rays(d), d / (d + RAY_SCALE))
    np.testing.assert_allclose(decode_rays(encode_rays(d)), d, rtol=1e-4)


def test_centre_offsets_by_hand():
    labels = np.zeros((5, 9), np.int32)
    labels[1:4, 1:6] = 1  # centre of mass (2, 3): x offsets -2..2, y offsets -1..1
    h, v = centre_offsets(labels)
    np.testing.assert_allclose(h[2, 1:6], [0.0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(v[1:4, 3], [0.0, 0.5, 1.0])
    assert h[0, 0] == 0.5 and v[4, 8] == 0.5


def test_signed_and_centre_distances_by_hand():
    labels = np.zeros((9, 9), np.int32)
    labels[2:7, 2:7] = 1  # 5 x 5: boundary distance 1, 2, 3 towards the centre
    spec = TargetSpec(channels=("D", "Dc"), d_alpha=2.0, d_beta=4.0)
    targets = make_targets(labels, spec)
    d, dc = targets[..., 0], targets[..., 1]
    assert d[4, 4] == pytest.approx(0.5 + 0.5 * math.tanh(3 / 2))
    assert d[2, 4] == pytest.approx(0.5 + 0.5 * math.tanh(1 / 2))
    assert d[0, 4] == pytest.approx(0.5 - 0.5 * math.tanh(2 / 4))  # 2 px from the object
    assert dc[4, 4] == 1.0 and dc[2, 2] == 0.0 and dc[4, 2] == pytest.approx(1 - 2 / math.sqrt(8))
    assert dc[0, 0] == 0.0


def test_neighbour_distance_and_background():
    labels = np.zeros((6, 12), np.int32)
    labels[1:5, 1:6] = 1
    labels[1:5, 6:11] = 2
    dn = neighbour_distance(labels, 4.0)
    np.testing.assert_allclose(dn[2, 1:11], [0, 0, 0.25, 0.5, 0.75, 0.75, 0.5, 0.25, 0, 0])
    lone = np.zeros((6, 6), np.int32)
    lone[1:5, 1:5] = 3
    assert not neighbour_distance(lone, 4.0).any()
    b = make_targets(labels, TargetSpec(channels=("B",)))[..., 0]
    np.testing.assert_array_equal(b, labels == 0)


def test_affinities_by_hand():
    labels = np.array([[1, 1, 2],
                       [1, 0, 2],
                       [3, 3, 2]])
    a = affinities(labels, [(0, 1), (1, 0), (0, -2)])
    np.testing.assert_array_equal(a[..., 0], [[1, 0, 0], [0, 0, 0], [1, 0, 0]])
    np.testing.assert_array_equal(a[..., 1], [[1, 0, 1], [0, 0, 1], [0, 0, 0]])
    np.testing.assert_array_equal(a[..., 2], [[0, 0, 0], [0, 0, 0], [0, 0, 0]])


def test_shorthands_expand_to_planes_and_weights():
    spec = parse_instance_channels("F,R", "1,0.5", n_rays=8)
    assert spec.channels == ("F", "R0", "R1", "R2", "R3", "R4", "R5", "R6", "R7")
    assert spec.kinds == ("binary",) + ("ray",) * 8 and spec.loss_weights == (1.0,) + (0.5,) * 8
    spec = parse_instance_channels("A,A0_4,A4_0")
    assert spec.channels == ("A0_1", "A1_0", "A0_4", "A4_0") and set(spec.kinds) == {"binary"}
    assert TargetSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ConfigError, match="n_rays=8 ray planes R0..R7 in order"):
        TargetSpec(channels=("F", "R0", "R2"), n_rays=8).validate()
    with pytest.raises(ConfigError, match="n_rays must be an integer in"):
        parse_instance_channels("F,R", n_rays=2)


@pytest.mark.parametrize("text, message", [
    ("R", "R \\(star-convex polygons\\) need F"),
    ("F,V", "H and V \\(HoVer-Net offsets\\) go together"),
    ("H,V", "need F"),
    ("C,T", "to build seeds from"),
    ("P", "to build the growth mask from"),
])
def test_sets_that_cannot_be_post_processed_are_refused(text, message):
    with pytest.raises(ConfigError, match=message) as error:
        parse_instance_channels(text)
    assert "Sets that work: F,C,Db (the default)" in str(error.value) and "F,R; F,H,V" in str(error.value)


@pytest.mark.parametrize("text", ["F,R", "F,H,V", "F,D", "D", "A", "F,Dc,Dn,B", "F,C,Db,R"])
def test_working_sets_make_targets_in_range(text):
    from data.generate import synthesize

    _, labels = synthesize(np.random.default_rng(0), 64, 64)
    spec = parse_instance_channels(text, n_rays=8)
    targets = make_targets(labels, spec)
    assert targets.shape == (64, 64, len(spec.channels)) and targets.dtype == np.float32
    assert targets.min() >= 0.0 and targets.max() <= 1.0


@pytest.mark.parametrize("text, message", [
    ("F,C,Db,E", "E make the instances by clustering alone: the other channels \\(F,C,Db\\)"),
    ("F,R,E", "R \\(polygons\\) and E \\(embedding clustering\\) each make the instances"),
])
def test_embedding_planes_are_refused_when_split_or_mixed(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_instance_channels(text)
    # a spec written by hand (model.json) is checked too
    with pytest.raises(ConfigError, match="embedding planes Ey,Ex,Esy,Esx,Eseed side by side and in order"):
        TargetSpec(channels=("Ey", "Ex", "K0", "Esy", "Esx", "Eseed")).validate()

