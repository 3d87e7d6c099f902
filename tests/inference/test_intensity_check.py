"""Inference side of the normalisation: normalize() per mode, the intensity flag, the dtype rule."""

from __future__ import annotations

import numpy as np

from lib.common import normalization as norm
from lib.inference.intensity import COLUMN, check_predicted_image, dtype_decision, flag_image, intensity_check
from lib.inference.predictor import normalize
from lib.model_folder import ModelInfo


def _info(mode, mean=(100.0,), std=(10.0,), **block):
    return ModelInfo(path="m", architecture="unet", number_classes=2, input_channels=1, input_dtype="uint16",
                     normalization=mode, mean=mean, std=std, size_divisor=1, receptive_field_radius=0,
                     meta={"normalization": {"mode": mode, "mean": list(mean), "std": list(std), **block}})


def _cells(seed=0, size=96):
    """A phase-contrast-like uint16 image: background about 2000, bright blobs up to about 9000."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    image = 2000 + rng.normal(0, 150, (size, size))
    for y, x in rng.integers(10, size - 10, (8, 2)):
        image += 7000 * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / 30.0)
    return np.clip(image, 0, 65535).astype(np.uint16)[..., None]


def _reference(images):
    grid = norm.PERCENTILE_GRID
    return norm.intensity_reference([norm.image_percentiles(i, grid).tolist() for i in images], grid)


def test_percentile_normalize_cancels_exposure_and_dataset_does_not():
    image = _cells()
    info = _info("percentile", percentiles=[1.0, 99.8])
    one = normalize(image, info, norm.image_statistics(image, "percentile", (1.0, 99.8)))
    low, high = np.percentile(image.astype(np.float64), [1.0, 99.8])
    np.testing.assert_allclose(one, (image - low) / (high - low), rtol=1e-5, atol=1e-5)
    brighter = (image.astype(np.float64) * 3).astype(np.float32)  # another exposure, not clipped
    three = normalize(brighter, info, norm.image_statistics(brighter, "percentile", (1.0, 99.8)))
    np.testing.assert_allclose(three, one, atol=1e-4)
    assert one.min() < 0 or one.max() > 1  # not clipped
    dataset = _info("dataset", mean=(2500.0,), std=(1000.0,))
    assert np.abs(normalize(brighter, dataset) - normalize(image, dataset)).max() > 1
    # one row of statistics per tile, as zone_stream batches tiles of several images
    tiles = np.stack([image, brighter.astype(np.float32)])
    rows = [norm.image_statistics(t, "percentile") for t in tiles]
    both = normalize(tiles, info, (np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])))
    np.testing.assert_allclose(both[1], both[0], atol=1e-4)


def test_images_far_from_the_training_intensities_are_flagged():
    training = [_cells(seed) for seed in range(4)]
    reference = _reference(training)
    dataset = {"mode": "dataset", "training_images": reference}
    percentile = {"mode": "percentile", "training_images": reference}
    test = _cells(9)
    assert intensity_check(test, dataset, "t.tif").flag == ""
    x200 = (test.astype(np.float64) * 200).astype(np.float32)
    flagged = intensity_check(x200, dataset, "x200.tif")
    assert "contrast_high" in flagged.flag and "brighter" in flagged.flag
    assert flagged.warning.startswith("x200.tif: intensity unlike the training images")
    assert "--normalization percentile" in flagged.warning
    # a percentile model does not care about the units, only about the histogram's shape
    assert intensity_check(x200, percentile, "x200.tif").flag == ""
    saturated = np.clip(test.astype(np.float64) * 200, 0, 65535).astype(np.uint16)
    check = intensity_check(saturated, percentile, "sat.tif")
    assert "saturated" in check.flag and "flat" in check.flag and "65535" in check.warning
    inverted = (65535 - test.astype(np.int64)).astype(np.uint16)  # dark objects on a bright background
    assert "histogram_shape" in intensity_check(inverted, percentile, "inv.tif").flag
    # a model trained before the reference was recorded (or with another layout of it) still gets
    # the saturation check
    assert "saturated" in intensity_check(saturated, {"mode": "dataset"}, "sat.tif").flag
    odd = {"mode": "dataset", "training_images": {"percentiles": [1, 50, 99.8], "min": [[1.0]]}}
    assert intensity_check(saturated, odd, "sat.tif").flag == "saturated+flat"
    assert COLUMN == "intensity_flag"

    class Member:
        info = _info("dataset", training_images=reference)

    class Predictor:
        members = [Member()]

    assert check_predicted_image(x200, Predictor(), "x200.tif") == flagged
    logged = []
    assert flag_image(x200, Predictor(), "x200.tif", logged.append) == flagged.flag
    assert logged == [f"warning: {flagged.warning}"]
    assert flag_image(test, Predictor(), "t.tif", logged.append) == "" and len(logged) == 1


def test_an_8_bit_image_is_accepted_only_where_units_do_not_matter():
    assert dtype_decision("uint16", "uint16", ["dataset"], "a.tif") == (None, None)
    assert dtype_decision("float32", "float64", ["dataset"], "a.tif") == (None, None)
    warning, error = dtype_decision("uint16", "uint8", ["percentile", "tile"], "a.png")
    assert error is None and "a.png is uint8, the model was trained on uint16 images; accepted" in warning
    warning, error = dtype_decision("uint16", "uint8", ["dataset", "percentile"], "a.png")
    assert warning is None
    assert error.startswith("image dtype must be uint16") and "got uint8 in a.png" in error
    assert "--normalization percentile" in error
