"""Exact tiled prediction, model folders, ensembles, TTA and evaluation (lib/inference, lib/store/tiling.py,
lib/scoring/reports.py)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

keras = pytest.importorskip("keras")

from lib.common.device import resolve_precision
from lib.common.pictures import semantic_overlay as overlay
from lib.inference.predictor import InputMismatch, load_predictor, predictor_from_models, with_precision
from lib.inference.tiled import predict_image, predict_volume, predict_whole
from lib.model_folder import ModelError, ModelInfo, find_models
from lib.models import build_model, model_geometry  # noqa: E402
from lib.scoring.reports import evaluate_labels, metrics_row
from lib.store.tiling import (
    default_tile_pixels,
    default_tile_size,
    min_tile_size,
    plan_tiles,
    read_window,
    reflect_indices,
)


def model_json(architecture: str, options: dict, classes: int = 3, channels: int = 1, mode: str = "dataset",
               dtype: str = "uint16") -> dict:
    divisor, radius = model_geometry(architecture, **options)
    return {"architecture": architecture, "model_options": options, "label_kind": "semantic",
            "number_classes": classes, "input_channels": channels, "input_dtype": dtype,
            "normalization": {"mode": mode, "mean": [300.0] * channels, "std": [90.0] * channels},
            "size_divisor": divisor, "receptive_field_radius": radius}


def tiny(architecture: str, options: dict, classes: int = 3, channels: int = 1, seed: int = 0, **json_options):
    """A tiny model and its model.json dict (clears the Keras session of earlier tests first)."""
    if seed == 0:
        keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    return build_model(architecture, channels, classes, **options), model_json(architecture, options, classes,
                                                                               channels, **json_options)


def random_image(shape, seed: int = 1, dtype=np.uint16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 600, size=shape).astype(dtype)


def save_model_folder(folder, model, meta: dict):
    folder.mkdir(parents=True, exist_ok=True)
    model.save(folder / "model.keras")
    (folder / "model.json").write_text(json.dumps(meta))
    return folder


UNET = ("unet", {"base_filters": 4, "depth": 2})
ARCHITECTURES = [
    UNET,
    ("unet", {"base_filters": 4, "depth": 1, "upsampling": "nearest", "dropout": 0.0}),
    ("fc-densenet56", {"stem_filters": 4, "growth_rate": 2, "n_layers_per_block": 1, "n_pool": 2}),
    ("fcn8", {"width": 0.0625, "fc_filters": 8, "fc6_kernel": 3}),
]


# Tiling geometry


@pytest.mark.parametrize("length", [1, 2, 5, 17])
def test_reflect_indices_match_numpy_reflect(length):
    values = np.arange(length)
    pad = 3 * length + 4
    expected = np.pad(values, pad, mode="reflect") if length > 1 else np.zeros(2 * pad + 1, int)
    assert np.array_equal(reflect_indices(np.arange(-pad, length + pad), length), expected)


def test_read_window_reflects_and_slices():
    image = np.arange(5 * 7).reshape(5, 7, 1)
    window = read_window(image, -2, 8, -3, 9)
    assert np.array_equal(window, np.pad(image, ((2, 3), (3, 2), (0, 0)), mode="reflect"))
    assert np.array_equal(read_window(image, 1, 3, 2, 5), image[1:3, 2:5])


@pytest.mark.parametrize("height, width, divisor, halo, tile, expected", [
    (77, 131, 4, 23, 100, (88, 92, 40, 44)),        # several tiles, zones equalised
    (77, 131, 4, 23, 1000, (124, 180, 77, 131)),    # one tile covering the image and its halo
    (10, 10, 16, 0, 16, (16, 16, 10, 10)),          # an image smaller than a tile is padded
])
def test_plan_tiles(height, width, divisor, halo, tile, expected):
    plan = plan_tiles(height, width, divisor, halo, tile)
    assert (plan.tile_height, plan.tile_width, plan.zone_height, plan.zone_width) == expected
    covered = np.zeros((height, width), int)
    for y0, y1, x0, x1 in plan.zones():
        covered[y0:y1, x0:x1] += 1
        assert y0 % divisor == 0 and x0 % divisor == 0
    assert (covered == 1).all()
    assert plan.tile_height % divisor == 0 and plan.tile_width % divisor == 0
    assert plan.tile_height >= plan.zone_height + 2 * halo


@pytest.mark.parametrize("args, message", [
    ((77, 131, 4, 23, 50), "multiple of the model's size divisor 4"),
    ((77, 131, 4, 23, 48), r"tile_size must be >= 2 \* halo \+ divisor = 50"),
    ((0, 131, 4, 23, 48), "height must be an integer >= 1"),
    ((7, 131, 4, -1, 48), "halo must be an integer >= 0"),
])
def test_plan_tiles_errors(args, message):
    with pytest.raises(ValueError, match=message):
        plan_tiles(*args)


@pytest.mark.parametrize("height, width, divisor, halo, budget", [
    (2048, 2048, 32, 96, None), (2048, 2048, 32, 96, 1_200_000), (1500, 3001, 16, 40, 500_000),
    (77, 131, 4, 23, 100 * 100), (10, 10, 16, 0, None), (5000, 300, 8, 0, 256 * 256), (5, 3, 16, 10, None),
    (1, 1, 32, 96, None),
])
def test_budget_plan_covers_within_budget_and_beats_squares(height, width, divisor, halo, budget):
    plan = plan_tiles(height, width, divisor, halo, max_tile_pixels=budget)
    limit = budget or default_tile_size(halo, divisor) ** 2
    assert plan.tile_height * plan.tile_width <= limit
    assert plan.tile_height % divisor == 0 and plan.tile_width % divisor == 0
    assert plan.tile_height >= plan.zone_height + 2 * halo and plan.tile_width >= plan.zone_width + 2 * halo
    covered = np.zeros((height, width), int)
    for y0, y1, x0, x1 in plan.zones():
        covered[y0:y1, x0:x1] += 1
        assert y0 % divisor == 0 and x0 % divisor == 0
    assert (covered == 1).all()
    # never more computed pixels than the largest square tile within the same budget
    square = int(np.sqrt(limit)) // divisor * divisor
    if square >= 2 * halo + divisor:
        reference = plan_tiles(height, width, divisor, halo, square)
        computed = plan.n_tiles * plan.tile_height * plan.tile_width
        assert computed <= reference.n_tiles * reference.tile_height * reference.tile_width


def test_budget_plan_rectangles_on_2048_with_nist_halo():
    # FC-DenseNet56 case of issue 5: squares of 896 need 3 x 3 tiles (7.2 Mpixel computed); within
    # 1.2 Mpixel per tile, 2 x 3 tiles of 1216 x 896 compute 6.5 Mpixel.
    plan = plan_tiles(2048, 2048, 32, 96, max_tile_pixels=1_200_000)
    assert sorted((plan.tile_height, plan.tile_width)) == [896, 1216]
    assert plan.n_tiles == 6
    assert default_tile_pixels(96, 32, "bfloat16") > default_tile_pixels(96, 32) == 960 ** 2


def test_budget_plan_below_the_smallest_tile_uses_the_smallest():
    # The smallest tile: the halo rounded up to the divisor above (16), one divisor of zone (8)
    # and the halo below (10), rounded up to the divisor.
    plan = plan_tiles(100, 100, 8, 10, max_tile_pixels=10)
    assert (plan.tile_height, plan.tile_width) == (40, 40)
    assert (plan.zone_height, plan.zone_width) == (8, 8)


# Exactness


@pytest.mark.parametrize("architecture, options", ARCHITECTURES)
def test_tiled_equals_whole_image(architecture, options):
    model, meta = tiny(architecture, options, channels=2)
    predictor = predictor_from_models([(model, meta)])
    divisor, radius = meta["size_divisor"], meta["receptive_field_radius"]
    image = random_image((77, 131, 2))
    whole = predict_whole(predictor, image)
    smallest = min_tile_size(radius, divisor)  # the halo above and left rounded up to the divisor
    for tile_size, batch_size in ((smallest, 3), (smallest + 2 * divisor, 1), (None, None)):
        prediction = predict_image(predictor, image, tile_size=tile_size, batch_size=batch_size,
                                   keep_probabilities=True)
        if tile_size is not None and architecture == "unet":
            assert prediction.plan.n_tiles > 1
        assert np.abs(prediction.probabilities - whole).max() < 1e-4
        assert np.array_equal(prediction.labels, whole.argmax(-1))
        assert prediction.labels.dtype == np.uint8


def test_tile_normalisation_uses_whole_image_statistics():
    model, meta = tiny(*UNET, mode="tile")
    predictor = predictor_from_models([(model, meta)])
    image = random_image((45, 61, 1), seed=3)
    whole = predict_whole(predictor, image)
    prediction = predict_image(predictor, image, tile_size=52, batch_size=2, keep_probabilities=True)
    assert prediction.plan.n_tiles > 1
    assert np.abs(prediction.probabilities - whole).max() < 1e-4


def test_small_halo_is_approximate_but_runs():
    model, meta = tiny(*UNET)
    predictor = predictor_from_models([(model, meta)])
    image = random_image((40, 40, 1))
    prediction = predict_image(predictor, image, tile_size=16, halo=4)
    assert prediction.labels.shape == (40, 40) and prediction.plan.halo == 4


# Ensembles and test-time augmentation


def test_ensemble_of_one_equals_the_model_and_two_average():
    model_a, meta = tiny(*UNET, seed=0)
    model_b, _ = tiny(*UNET, seed=1)
    image = random_image((33, 50, 1))
    single = predict_whole(predictor_from_models([(model_a, meta)]), image)
    one = predictor_from_models([(model_a, meta)], spread=True)
    prediction = predict_image(one, image, keep_probabilities=True, keep_uncertainty=True)
    assert np.abs(prediction.probabilities - single).max() < 1e-6
    other = predict_whole(predictor_from_models([(model_b, meta)]), image)
    pair = predictor_from_models([(model_a, meta), (model_b, meta)])
    both = predict_image(pair, image, tile_size=52, keep_probabilities=True, keep_uncertainty=True)
    assert np.abs(both.probabilities - (single + other) / 2).max() < 1e-5
    expected_spread = np.abs(single - other).mean(axis=-1) / 2  # std of two samples = half their distance
    assert np.abs(both.spread - expected_spread).max() < 1e-3
    assert both.scores["mean_spread"] > 0 and 0 <= both.scores["mean_entropy"] <= 1


def symmetric_model(channels: int = 1, classes: int = 3):
    """A model equivariant under flips and rotations by 90 degrees: D4-symmetric 3x3 kernels, then 1x1."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(4)
    inputs = keras.Input((None, None, channels), name="image")
    conv = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="sym_conv")
    x = conv(inputs)
    kernel, bias = conv.get_weights()
    orbit = [np.rot90(kernel, k, axes=(0, 1)) for k in range(4)]
    orbit += [np.flip(k, axis=1) for k in orbit]
    conv.set_weights([np.mean(orbit, axis=0), bias])
    outputs = keras.layers.Conv2D(classes, 1, name="head_logits")(x)
    meta = {"architecture": "test", "number_classes": classes, "input_channels": channels,
            "input_dtype": "uint16", "normalization": {"mode": "dataset", "mean": [300.0], "std": [90.0]},
            "size_divisor": 1, "receptive_field_radius": 1}
    return keras.Model(inputs, outputs), meta


def test_tta_of_an_equivariant_model_is_the_identity():
    model, meta = symmetric_model()
    image = random_image((29, 41, 1))
    plain = predict_image(predictor_from_models([(model, meta)]), image, tile_size=12, keep_probabilities=True)
    tta = predict_image(predictor_from_models([(model, meta)], tta=True), image, tile_size=12,
                        keep_probabilities=True, keep_uncertainty=True)
    assert np.abs(tta.probabilities - plain.probabilities).max() < 1e-5
    assert tta.spread.max() < 1e-3


def test_tta_changes_a_non_equivariant_model_and_keeps_the_shape():
    model, meta = tiny(*UNET)
    image = random_image((30, 44, 1))
    tta = predict_image(predictor_from_models([(model, meta)], tta=True), image, keep_probabilities=True)
    plain = predict_image(predictor_from_models([(model, meta)]), image, keep_probabilities=True)
    assert tta.probabilities.shape == plain.probabilities.shape
    assert np.abs(tta.probabilities.sum(-1) - 1).max() < 1e-5


# Model folders


def test_load_model_folder_file_and_ensemble(tmp_path):
    model_a, meta = tiny(*UNET, seed=0)
    model_b, _ = tiny(*UNET, seed=1)
    save_model_folder(tmp_path / "ens" / "fold0", model_a, meta)
    save_model_folder(tmp_path / "ens" / "fold1", model_b, meta)
    image = random_image((40, 37, 1))
    expected = predict_whole(predictor_from_models([(model_a, meta)]), image)
    for source in (tmp_path / "ens" / "fold0", tmp_path / "ens" / "fold0" / "model.keras"):
        loaded = load_predictor(source)
        assert np.abs(predict_whole(loaded, image) - expected).max() < 1e-6
    ensemble = load_predictor(tmp_path / "ens")
    assert len(ensemble.members) == 2 and ensemble.samples == 2


def test_load_saved_model_export(tmp_path):
    model, meta = tiny(*UNET)
    folder = save_model_folder(tmp_path / "run", model, meta)
    model.export(str(folder / "saved_model"), format="tf_saved_model", verbose=False)
    image = random_image((24, 40, 1))
    expected = predict_whole(predictor_from_models([(model, meta)]), image)
    loaded = load_predictor(folder / "saved_model")
    assert np.abs(predict_whole(loaded, image) - expected).max() < 1e-5


@pytest.mark.parametrize("layout, message", [
    ("missing", "not found"),
    ("empty", "holds neither"),
    ("txt", "must be a .keras file"),
    ("no_json", "model.json must exist"),
    ("bad_json", "must be readable JSON"),
    ("bad_fields", "number_classes must be an integer >= 2"),
    ("disagree", "must agree on number_classes"),
])
def test_find_models_errors(tmp_path, layout, message):
    target = tmp_path / "m"
    if layout == "empty":
        target.mkdir()
    elif layout == "txt":
        target = tmp_path / "m.txt"
        target.write_text("x")
    elif layout in ("no_json", "bad_json", "bad_fields"):
        target.mkdir()
        (target / "model.keras").write_bytes(b"")
        if layout == "bad_json":
            (target / "model.json").write_text("{")
        if layout == "bad_fields":
            (target / "model.json").write_text(json.dumps({**model_json(*UNET), "number_classes": 1}))
    elif layout == "disagree":
        for name, classes in (("a", 3), ("b", 2)):
            (target / name).mkdir(parents=True)
            (target / name / "model.keras").write_bytes(b"")
            (target / name / "model.json").write_text(json.dumps(model_json(*UNET, classes=classes)))
    with pytest.raises(ModelError, match=message):
        find_models(target)


def test_model_info_reports_every_problem():
    meta = {**model_json(*UNET), "label_kind": "panoptic", "normalization": {"mode": "x", "mean": [1.0, 2.0],
                                                                              "std": None}}
    with pytest.raises(ModelError) as info:
        ModelInfo.from_dict(meta)
    text = str(info.value)
    for part in ("label_kind must be one of semantic, instance", "normalization.mode must be",
                 "normalization.mean must be", "normalization.std must be"):
        assert part in text


def test_damaged_model_file_is_a_model_error(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "model.keras").write_bytes(b"not a zip")
    (folder / "model.json").write_text(json.dumps(model_json(*UNET)))
    with pytest.raises(ModelError, match="must load with Keras in safe mode"):
        load_predictor(folder)


@pytest.mark.parametrize("shape, dtype, message", [
    ((10, 10, 3), "uint16", "image channels must be 1"),
    ((10, 10, 1), "uint8", "image dtype must be uint16"),
])
def test_check_image_mismatch(shape, dtype, message):
    model, meta = tiny(*UNET)
    with pytest.raises(InputMismatch, match=message):
        predictor_from_models([(model, meta)]).check_image(shape, dtype, "x.tif")


def test_float_images_fit_a_float_model():
    model, meta = tiny(*UNET, dtype="float32")
    predictor_from_models([(model, meta)]).check_image((5, 5, 1), "float64", "x.tif")


# Precision


def test_bfloat16_labels_agree_with_float32_on_most_pixels():
    # Measured with this seed: 99.67 % of the labels equal, probabilities within 0.017 (random
    # weights put many pixels near a tie between classes; trained models have fewer).
    model, meta = tiny(*UNET)
    image = random_image((96, 128, 1))
    single = predict_image(predictor_from_models([(model, meta)]), image, keep_probabilities=True)
    half = predictor_from_models([(model, meta)], precision="bfloat16")
    assert half.precision == "bfloat16"
    policies = {layer.name: layer.dtype_policy.name for layer in half.members[0].model.layers[1:]}
    assert policies.pop("head_logits") == "float32" and set(policies.values()) == {"mixed_bfloat16"}
    prediction = predict_image(half, image, tile_size=64, keep_probabilities=True)
    assert (prediction.labels == single.labels).mean() > 0.99
    assert np.abs(prediction.probabilities - single.probabilities).max() < 0.05
    assert prediction.probabilities.dtype == np.float32
    assert np.abs(prediction.probabilities.sum(-1) - 1).max() < 1e-5  # softmax of float32 logits
    assert np.abs(prediction.probabilities - predict_whole(half, image)).max() < 1e-3


def test_float32_precision_undoes_a_mixed_precision_model():
    keras.backend.clear_session()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        keras.utils.set_random_seed(0)
        mixed = build_model(*UNET[:1], 1, 3, **UNET[1])
    finally:
        keras.config.set_dtype_policy("float32")
    keras.utils.set_random_seed(0)
    plain = build_model(*UNET[:1], 1, 3, **UNET[1])
    plain.set_weights(mixed.get_weights())
    assert with_precision(plain, "float32") is plain  # nothing to change: no rebuild
    restored = with_precision(mixed, "float32")
    assert {layer.dtype_policy.name for layer in restored.layers[1:]} == {"float32"}
    x = np.random.default_rng(0).standard_normal((1, 32, 32, 1)).astype(np.float32)
    assert np.array_equal(np.asarray(restored(x)), np.asarray(plain(x)))


def test_precision_errors(tmp_path):
    with pytest.raises(ValueError, match="precision must be one of float32, bfloat16, auto; got 'half'"):
        resolve_precision("half")
    assert resolve_precision("auto") in ("float32", "bfloat16")
    model, meta = tiny(*UNET)
    folder = save_model_folder(tmp_path / "run", model, meta)
    model.export(str(folder / "saved_model"), format="tf_saved_model", verbose=False)
    with pytest.raises(ModelError, match="precision bfloat16 needs a functional Keras model"):
        load_predictor(folder / "saved_model", precision="bfloat16")


# Stacks


def test_predict_volume_plane_by_plane_and_z_filter():
    model, meta = tiny(*UNET)
    predictor = predictor_from_models([(model, meta)])
    stack = random_image((3, 20, 28, 1))
    labels, probabilities, entropy, _ = predict_volume(predictor, stack, keep_probabilities=True,
                                                       keep_uncertainty=True)
    assert labels.shape == (3, 20, 28) and probabilities.shape == (3, 20, 28, 3) and entropy.shape == (3, 20, 28)
    assert np.array_equal(labels[1], predict_image(predictor, stack[1]).labels)
    filtered, _, _, _ = predict_volume(predictor, stack, z_filter=3)
    expected = np.median(probabilities, axis=0).argmax(-1)
    assert np.array_equal(filtered[1], expected)


# Evaluation


def test_evaluate_labels_hand_computed():
    mask = np.array([[0, 0, 1], [1, 2, 2]])
    labels = np.array([[0, 1, 1], [0, 2, 1]])
    cm = evaluate_labels(labels, mask, 3)
    assert cm.tolist() == [[1, 1, 0], [1, 1, 0], [0, 1, 1]]
    row = metrics_row("x", cm)
    assert row["pixel_accuracy"] == pytest.approx(3 / 6)
    assert row["iou_0"] == pytest.approx(1 / 3) and row["iou_2"] == pytest.approx(1 / 2)
    assert row["iou_1"] == pytest.approx(1 / 4)


@pytest.mark.parametrize("labels, mask, message", [
    (np.zeros((2, 3), np.uint8), np.zeros((3, 2), np.uint8), "mask size must equal the image size"),
    (np.zeros((2, 2), np.uint8), np.full((2, 2), 3, np.uint8), "mask values must be < number_classes=3"),
])
def test_evaluate_labels_errors(labels, mask, message):
    with pytest.raises(ValueError, match=message):
        evaluate_labels(labels, mask, 3)


def test_overlay_colours():
    image = np.zeros((1, 4, 1), np.uint16)
    mask = np.array([[1, 0, 1, 1]])
    labels = np.array([[1, 1, 0, 2]])
    picture = overlay(image, labels, mask)
    assert picture.shape == (1, 4, 3) and picture.dtype == np.uint8
    green, magenta, blue, yellow = picture[0]
    assert green[1] > green[0] and green[1] > green[2]
    assert magenta[0] > 0 and magenta[2] > 0 and magenta[1] == 0
    assert blue[2] > blue[0]
    assert yellow[0] > 0 and yellow[1] > 0 and yellow[2] == 0


def test_release_rows_keeps_a_memory_mapped_image_readable(tmp_path):
    import tifffile

    from lib.inference.tiled import release_rows

    data = np.random.default_rng(0).integers(0, 60000, (300, 5000), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", data)
    mapped = tifffile.memmap(tmp_path / "a.tif", mode="r")
    view = mapped.reshape(300, 5000, 1)
    assert int(view[:, :, 0].sum(dtype=np.int64)) == int(data.sum(dtype=np.int64))  # every page resident
    assert release_rows(view, 200)
    assert np.array_equal(view[:, :, 0], data)  # released pages are read again from the file
    assert not release_rows(np.zeros((10, 10)), 5)  # not a map: nothing to do
    assert not release_rows(view, 0)
    del view, mapped
