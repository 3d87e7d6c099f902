"""Invariants of lib.reader.augment: labels keep their values, identity is identity, exact flips and
quarter turns, per-channel blur, determinism, and the CLI flags."""

import argparse

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lib.reader.augment import (
    AugmentParams,
    Transform,
    affine_matrix,
    apply_transform,
    augment,
    crop_centre,
    gaussian_blur,
    sample_transform,
)
from train_unet import add_augmentation_arguments, augment_params_from_args


def make_pair(seed=0, shape=(48, 40), channels=2, label_dtype=np.uint8, n_values=4):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 4000, size=shape + (channels,)).astype(np.uint16)
    label = rng.integers(0, n_values, size=shape).astype(label_dtype)
    return image, label


def centred(shape, **kwargs):
    return Transform(centre_y=(shape[0] - 1) / 2, centre_x=(shape[1] - 1) / 2, **kwargs)


@pytest.mark.parametrize("label_dtype", [np.uint8, np.uint16, np.int32, np.uint32, np.int64, np.bool_])
def test_identity_params_give_identity(label_dtype):
    image, label = make_pair(label_dtype=label_dtype, n_values=2)
    out_image, out_label = augment(image, label, np.random.default_rng(1), AugmentParams.none())
    assert out_image.dtype == np.float32 and out_image.shape == image.shape
    np.testing.assert_array_equal(out_image, image.astype(np.float32))
    assert out_label.dtype == label.dtype
    np.testing.assert_array_equal(out_label, label)


def test_identity_params_with_smaller_patch_is_an_exact_crop():
    image, label = make_pair(shape=(40, 40), channels=1)
    for seed in range(5):
        out_image, out_label = augment(image, label, np.random.default_rng(seed), AugmentParams.none(),
                                       patch_shape=(16, 24))
        assert out_image.shape == (16, 24, 1) and out_label.shape == (16, 24)
        matches = [(y, x) for y in range(40 - 16 + 1) for x in range(40 - 24 + 1)
                   if np.array_equal(out_image[..., 0], image[y:y + 16, x:x + 24, 0])]
        assert len(matches) == 1
        y, x = matches[0]
        np.testing.assert_array_equal(out_label, label[y:y + 16, x:x + 24])


@pytest.mark.parametrize("flip_x, flip_y, expected", [
    (True, False, lambda a: a[:, ::-1]),
    (False, True, lambda a: a[::-1, :]),
    (True, True, lambda a: a[::-1, ::-1]),
])
def test_flips_match_numpy_exactly(flip_x, flip_y, expected):
    image, label = make_pair(shape=(32, 20))
    out_image, out_label = apply_transform(image, label, centred(image.shape, flip_x=flip_x, flip_y=flip_y))
    np.testing.assert_array_equal(out_image, expected(image).astype(np.float32))
    np.testing.assert_array_equal(out_label, expected(label))


@pytest.mark.parametrize("angle, k", [(90, 1), (180, 2), (270, 3), (360, 0), (-90, 3)])
def test_quarter_turns_match_rot90_exactly(angle, k):
    # Square, so a quarter turn keeps the shape; both even and odd sizes centre on pixel grids.
    for size in (24, 25):
        image, label = make_pair(shape=(size, size), channels=3, label_dtype=np.uint32, n_values=1000)
        out_image, out_label = apply_transform(image, label, centred(image.shape, angle=angle))
        np.testing.assert_array_equal(out_image, np.rot90(image, k).astype(np.float32))
        np.testing.assert_array_equal(out_label, np.rot90(label, k))


def test_jitter_moves_content_by_the_shift():
    image = np.zeros((30, 30, 1), np.float32)
    image[10, 12] = 1.0
    out, _ = apply_transform(image, None, centred(image.shape, shift_x=3.0, shift_y=-2.0))
    assert np.argwhere(out[..., 0] == 1.0).tolist() == [[8, 15]]


def test_scale_magnifies_about_the_centre():
    image = np.zeros((41, 41, 1), np.float32)
    image[20, 30] = image[35, 20] = 1.0  # 10 px right of and 15 px below the centre (20, 20)
    out, _ = apply_transform(image, None, centred(image.shape, scale_x=1.2, scale_y=0.8))
    # Bilinear spreads a dot; its intensity-weighted position is where the forward map sends it.
    ys, xs = np.mgrid[:41, :41]
    right, below = out[..., 0] * (xs > 25), out[..., 0] * (ys > 28)
    assert np.sum(xs * right) / right.sum() == pytest.approx(20 + 12, abs=0.05)
    assert np.sum(ys * below) / below.sum() == pytest.approx(20 + 12, abs=0.05)


label_cases = st.sampled_from([(np.uint8, 5), (np.uint16, 3000), (np.uint32, 2**31), (np.int64, 2**40)])


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), case=label_cases, patch=st.sampled_from([None, (20, 28), (64, 64)]),
       label_channels=st.sampled_from([0, 2]))
def test_augmented_labels_only_hold_input_values(seed, case, patch, label_channels):
    dtype, high = case
    rng = np.random.default_rng(seed)
    image = rng.random((40, 36, 2)).astype(np.float32)
    shape = (40, 36) + ((label_channels,) if label_channels else ())
    # Instance-like labels: a few large ids in blobs, so nearest-neighbour has edges to get wrong.
    ids = rng.integers(0, high, size=6, dtype=np.int64).astype(dtype)
    label = ids[rng.integers(0, 6, size=shape)]
    params = AugmentParams(intensity=0.1)
    out_image, out_label = augment(image, label, rng, params, patch_shape=patch)
    expected_hw = (40, 36) if patch is None else patch
    assert out_image.shape == expected_hw + (2,) and out_image.dtype == np.float32
    assert out_label.shape == expected_hw + shape[2:] and out_label.dtype == label.dtype
    assert set(np.unique(out_label)) <= set(np.unique(label))


def test_blur_never_mixes_channels():
    rng = np.random.default_rng(3)
    image = np.zeros((32, 32, 3), np.float32)
    image[..., 1] = rng.random((32, 32)) * 100
    out = gaussian_blur(image, 2.0)
    assert np.all(out[..., 0] == 0) and np.all(out[..., 2] == 0)
    expected = cv2.GaussianBlur(image[..., 1].copy(), (0, 0), 2.0, borderType=cv2.BORDER_REFLECT)
    np.testing.assert_array_equal(out[..., 1], expected)
    # The same holds through the whole augmentation, with many channels (more than OpenCV's 4).
    image = np.zeros((32, 32, 6), np.float32)
    image[..., 4] = rng.random((32, 32))
    out, _ = augment(image, None, rng, AugmentParams(noise=0.0, blur_max_sigma=3.0))
    assert np.all(out[..., [0, 1, 2, 3, 5]] == 0) and out[..., 4].std() > 0


def test_noise_and_intensity_follow_the_dynamic_range():
    image = np.zeros((128, 128, 2), np.float32)
    image[:, 64:, 0] = 1000.0  # range 1000
    image[:, 64:, 1] = 10.0    # range 10
    out, _ = apply_transform(image, None, centred(image.shape, noise_sigma=0.02, noise_seed=7))
    residual = out - image
    assert residual[..., 0].std() == pytest.approx(20.0, rel=0.05)
    assert residual[..., 1].std() == pytest.approx(0.2, rel=0.05)
    out, _ = apply_transform(image, None, centred(image.shape, intensity_shift=-0.1))
    np.testing.assert_allclose(out - image, np.broadcast_to([-100.0, -1.0], image.shape))


def test_same_seed_same_result_and_different_seeds_differ():
    image, label = make_pair(shape=(64, 64))
    params = AugmentParams(intensity=0.05)
    a = augment(image, label, np.random.default_rng(11), params, patch_shape=(32, 32))
    b = augment(image, label, np.random.default_rng(11), params, patch_shape=(32, 32))
    c = augment(image, label, np.random.default_rng(12), params, patch_shape=(32, 32))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_sampled_transforms_respect_the_parameters():
    rng = np.random.default_rng(5)
    params = AugmentParams(jitter=0.1, scale=0.2, noise=0.03, blur_max_sigma=2.0, intensity=0.05)
    transforms = [sample_transform(rng, params, (100, 100), (50, 50)) for _ in range(2000)]
    angles = np.array([t.angle for t in transforms])
    assert angles.min() >= 0 and angles.max() < 360 and np.ptp(angles) > 350
    scales = np.array([[t.scale_x, t.scale_y] for t in transforms])
    assert scales.min() >= 0.8 and scales.max() <= 1.2
    shifts = np.array([[t.shift_x, t.shift_y] for t in transforms])
    assert np.abs(shifts).max() <= 5.0
    assert 0.45 < np.mean([t.flip_x for t in transforms]) < 0.55
    assert 0.45 < np.mean([t.blur_sigma == 0 for t in transforms]) < 0.55
    assert max(t.blur_sigma for t in transforms) <= 2.0
    assert max(t.noise_sigma for t in transforms) <= 0.03
    assert max(abs(t.intensity_shift) for t in transforms) <= 0.05
    centres = np.array([[t.centre_y, t.centre_x] for t in transforms])
    assert centres.min() >= 24.5 and centres.max() <= 74.5
    none = sample_transform(rng, AugmentParams.none(), (100, 100))
    assert affine_matrix(none, (100, 100)).tolist() == [[1, 0, 0], [0, 1, 0]]


def test_crop_stays_in_the_valid_region_when_it_fits():
    rng = np.random.default_rng(0)
    for _ in range(200):
        t = sample_transform(rng, AugmentParams.none(), (64, 64), (32, 32), valid_shape=(40, 64))
        top = t.centre_y - 15.5
        assert 0 <= top <= 8
    assert crop_centre((64, 64), (32, 32), 0, 0) == (15.5, 15.5)


def test_source_smaller_than_patch_is_reflected_around_the_centre():
    image, label = make_pair(shape=(10, 10), channels=1)
    out_image, out_label = augment(image, label, np.random.default_rng(0), AugmentParams.none(),
                                   patch_shape=(16, 16))
    np.testing.assert_array_equal(out_image[3:13, 3:13, 0], image[..., 0].astype(np.float32))
    np.testing.assert_array_equal(out_label[3:13, 3:13], label)
    np.testing.assert_array_equal(out_label[2, 3:13], label[0])  # BORDER_REFLECT repeats the edge


@pytest.mark.parametrize("kwargs, message", [
    ({}, None),
    ({"jitter": 1.0}, "jitter must be a fraction in [0, 1); got 1.0"),
    ({"scale": -0.1}, "scale must be a fraction in [0, 1); got -0.1"),
    ({"noise": float("nan")}, "noise must be a fraction"),
    ({"intensity": "0.1"}, "intensity must be a fraction in [0, 1); got '0.1'"),
    ({"blur_max_sigma": -1}, "blur_max_sigma must be a number of pixels in [0, 64]; got -1"),
    ({"reflection": 1}, "reflection must be a bool; got 1"),
])
def test_augment_params_validation(kwargs, message):
    if message is None:
        assert AugmentParams(**kwargs).to_dict()["jitter"] == 0.1
        return
    with pytest.raises(ValueError) as info:
        AugmentParams(**kwargs)
    assert message in str(info.value)


def test_every_invalid_field_is_reported_at_once():
    with pytest.raises(ValueError) as info:
        AugmentParams(jitter=2.0, noise=-1.0)
    assert "jitter must" in str(info.value) and "noise must" in str(info.value)


@pytest.mark.parametrize("image_shape, label_shape", [((4, 4, 1, 1), None), ((8, 8, 1), (8, 7))])
def test_bad_shapes_raise(image_shape, label_shape):
    label = None if label_shape is None else np.zeros(label_shape, np.uint8)
    with pytest.raises(ValueError, match="must be"):
        augment(np.zeros(image_shape, np.float32), label, np.random.default_rng(0), AugmentParams())


def test_cli_flags_round_trip():
    parser = argparse.ArgumentParser()
    add_augmentation_arguments(parser)
    assert augment_params_from_args(parser.parse_args([]), parser) == AugmentParams()
    args = parser.parse_args(["--no_rotation", "--scale_augmentation_severity", "0.3",
                              "--intensity_augmentation_severity", "0.05", "--blur_augmentation_max_sigma", "1"])
    assert augment_params_from_args(args) == AugmentParams(rotation=False, scale=0.3, intensity=0.05,
                                                           blur_max_sigma=1.0)
    assert augment_params_from_args(parser.parse_args(["--no_augmentation"])).is_identity
    bad = parser.parse_args(["--noise_augmentation_severity", "1.5"])
    with pytest.raises(ValueError, match="noise must"):
        augment_params_from_args(bad)
    with pytest.raises(SystemExit) as info:
        augment_params_from_args(bad, parser)
    assert info.value.code == 2
