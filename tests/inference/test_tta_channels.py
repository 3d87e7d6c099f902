"""Test-time augmentation turns direction-carrying channels back (lib/inference/tta.py): the maps of
a transformed label image, turned back, equal the maps of the original for every flip and quarter
turn; models whose channels cannot be turned are refused --tta."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from lib.inference.tta import apply_plan, channel_plan, transforms, tta_problem  # noqa: E402
from lib.reader.targets import make_targets, parse_instance_channels  # noqa: E402


def labels_image() -> np.ndarray:
    """Asymmetric objects (an L, an ellipse, a rectangle touching it) on a non-square image."""
    labels = np.zeros((40, 52), np.int32)
    yy, xx = np.mgrid[:40, :52]
    labels[((yy - 12) / 7.0) ** 2 + ((xx - 14) / 10.0) ** 2 <= 1] = 1
    labels[22:36, 6:11] = 2
    labels[31:36, 6:22] = 2
    labels[8:30, 30:37] = 3
    labels[8:14, 37:47] = 4
    return labels


def forward(image: np.ndarray, k: int, flip: bool) -> np.ndarray:
    out = np.rot90(image, k)
    return out[:, ::-1] if flip else out


def backward(maps: np.ndarray, k: int, flip: bool) -> np.ndarray:
    if flip:
        maps = maps[:, ::-1]
    return np.rot90(maps, -k)


def test_numpy_turns_match_tensorflow():
    x = np.arange(20, dtype=np.float32).reshape(1, 4, 5, 1)
    for k, flip in transforms():
        xt = tf.image.rot90(x, k)
        if flip:
            xt = tf.reverse(xt, [2])
        np.testing.assert_array_equal(xt.numpy()[0, ..., 0], forward(x[0, ..., 0], k, flip))


@pytest.mark.parametrize("channels, options, tolerance", [
    ("F,H,V", {}, 1e-6),
    ("E", {}, 1e-6),
    ("A0_1,A1_0", {}, 0),
    ("A0_2,A2_0,A0_-2,A-2_0", {}, 0),
    ("F,R", {"n_rays": 8, "ray_grid": 1}, 0.02),
    ("F,R", {"n_rays": 32, "ray_grid": 1}, 0.02),
])
def test_turned_back_maps_equal_the_original_ones(channels, options, tolerance):
    spec = parse_instance_channels(channels, **options)
    labels = labels_image()
    original = make_targets(labels, spec)
    for k, flip in transforms():
        turned = make_targets(np.ascontiguousarray(forward(labels, k, flip)), spec)
        back = np.ascontiguousarray(backward(turned, k, flip))
        fixed = apply_plan(tf.constant(back[None]), channel_plan(spec.channels, k, flip)).numpy()[0]
        error = np.abs(fixed - original)
        if "R0" in spec.channels:  # rays sample pixels with rounding halves up: close, not exact
            on_objects = labels > 0
            assert error[on_objects].mean() < tolerance, (k, flip, error[on_objects].mean())
            if (k, flip) != (0, False):  # without the plan the rays point elsewhere
                assert np.abs(back - original)[on_objects].mean() > 3 * tolerance
        else:
            assert error.max() <= tolerance, (k, flip, channels, error.max())
            if (k, flip) != (0, False) and channels != "E":
                assert np.abs(back - original).max() > 0.1  # the test can fail: turning matters


@pytest.mark.parametrize("channels, options, message", [
    ("F,R", {"n_rays": 6}, "divisible by 4"),
    ("A0_2", {}, "turned offset"),
])
def test_channels_that_cannot_be_turned_are_named(channels, options, message):
    spec = parse_instance_channels(channels, **options)
    assert message in tta_problem(spec.channels)
    assert tta_problem(parse_instance_channels("F,C,Db").channels) is None


def test_predictor_refuses_tta_for_such_a_model():
    import keras

    from lib.inference.predictor import predictor_from_models
    from lib.model_folder import ModelError

    spec = parse_instance_channels("F,R", n_rays=6)
    inputs = keras.Input((None, None, 1))
    model = keras.Model(inputs, keras.layers.Conv2D(len(spec.channels), 1)(inputs))
    meta = {"architecture": "unet", "label_kind": "instance", "number_classes": 2,
            "output_channels": len(spec.channels), "input_channels": 1, "size_divisor": 1,
            "input_dtype": "float32", "receptive_field_radius": 0,
            "normalization": {"mean": [0.0], "std": [1.0]},
            "instance": {"channels": list(spec.channels), "kinds": list(spec.kinds)}}
    predictor_from_models([(model, meta)], tta=False)
    with pytest.raises(ModelError, match="--tta cannot be used .*divisible by 4"):
        predictor_from_models([(model, meta)], tta=True)


def test_bandwidths_swap_planes_when_the_axes_swap():
    """Per-axis bandwidths (Esy, Esx) move to each other's plane under quarter turns, not under flips
    (the ideal maps above have Esy == Esx, so this is checked on its own)."""
    names = parse_instance_channels("E").channels
    esy, esx = names.index("Esy"), names.index("Esx")
    maps = np.zeros((1, 6, 6, 5), np.float32)
    maps[..., esy], maps[..., esx] = 0.2, 0.7
    for k, flip in transforms():
        fixed = apply_plan(tf.constant(maps), channel_plan(names, k, flip)).numpy()
        swapped = k % 2 == 1
        assert np.allclose(fixed[..., esy], 0.7 if swapped else 0.2)
        assert np.allclose(fixed[..., esx], 0.2 if swapped else 0.7)
