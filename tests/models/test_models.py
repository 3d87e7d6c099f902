"""Models: output shapes, logits, geometry measured with impulses, registry errors, names, saving,
VGG16 weight files. Tiny configurations only."""

from __future__ import annotations

import h5py
import keras
import numpy as np
import pytest

from lib.models import (
    ARCHITECTURES,
    build_model,
    check_input_size,
    default_options,
    load_vgg16_weights,
    model_geometry,
    resolve_options,
)
from lib.models.blocks import Extent
from lib.models.fc_densenet import fc_densenet_defaults
from lib.models.fcn import VGG16_CONVS, build_fcn

SMALL = {
    "unet": {"base_filters": 4, "depth": 2},
    "fc-densenet56": {"growth_rate": 4, "stem_filters": 8, "n_layers_per_block": 2},
    "fc-densenet67": {"growth_rate": 4, "stem_filters": 8, "n_layers_per_block": 1, "n_pool": 3},
    "fc-densenet103": {"growth_rate": 2, "stem_filters": 4, "n_layers_per_block": [1, 1, 2, 1, 1, 2]},
    "fcn8": {"width": 1 / 16},
    "fcn16": {"width": 1 / 16},
    "fcn32": {"width": 1 / 16},
}

DEFAULT_GEOMETRY = {"unet": (16, 107), "fc-densenet56": (32, 439), "fc-densenet67": (32, 533),
                    "fc-densenet103": (32, 1171), "fcn32": (32, 233), "fcn16": (32, 241), "fcn8": (32, 245)}


@pytest.fixture(autouse=True)
def fresh_session():
    # free_memory=False skips a full garbage collection that would cost 0.3 s per test
    keras.backend.clear_session(free_memory=False)
    keras.utils.set_random_seed(0)
    yield
    keras.config.set_dtype_policy("float32")


def _image(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype("float32")


# Shapes and logits

@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_output_is_linear_float32_logits_of_input_size(architecture, channels):
    model = build_model(architecture, channels, 3, **SMALL[architecture])
    divisor, _ = model_geometry(architecture, **SMALL[architecture])
    height, width = 2 * divisor, divisor
    logits = keras.ops.convert_to_numpy(model(_image((2, height, width, channels)), training=False))
    assert logits.shape == (2, height, width, 3)
    assert logits.dtype == np.float32
    assert logits.min() < 0 < logits.max()  # no softmax/sigmoid/ReLU on the logits
    head = model.layers[-1]
    assert head.name == "head_logits" and model.outputs[0] is head.output
    assert isinstance(head, (keras.layers.Conv2D, keras.layers.Conv2DTranspose))
    assert head.activation is keras.activations.linear
    if not architecture.startswith("fcn"):
        assert isinstance(head, keras.layers.Conv2D) and head.kernel_size == (1, 1)


@pytest.mark.parametrize("architecture, first", [("unet", "down1_conv1"), ("fcn8", "block1_conv1")])
def test_logits_stay_float32_under_mixed_precision(architecture, first):
    keras.config.set_dtype_policy("mixed_bfloat16")
    model = build_model(architecture, 1, 2, **SMALL[architecture])
    assert model.get_layer(first).compute_dtype == "bfloat16"
    assert model.get_layer("head_logits").compute_dtype == "float32"
    assert keras.ops.convert_to_numpy(model(_image((1, 32, 32, 1)))).dtype == np.float32


def test_default_unet_follows_nist():
    model = build_model("unet", 1, 2)
    assert model.get_layer("down1_conv1").filters == 64
    assert model.get_layer("bottom_conv2").filters == 1024
    assert model.get_layer("bottom_dropout").rate == 0.5
    assert isinstance(model.get_layer("down4_bn2"), keras.layers.BatchNormalization)
    assert isinstance(model.get_layer("up1_upconv"), keras.layers.Conv2DTranspose)


def test_fc_densenet103_block_structure_follows_the_paper():
    model = build_model("fc-densenet103", 1, 2, stem_filters=4, growth_rate=1)
    names = {layer.name for layer in model.layers}
    layers_per_block = [sum(f"{block}_layer{i}_conv" in names for i in range(1, 20))
                        for block in ["down1", "down2", "down3", "down4", "down5", "bottleneck",
                                      "up5", "up4", "up3", "up2", "up1"]]
    assert layers_per_block == [4, 5, 7, 10, 12, 15, 12, 10, 7, 5, 4]
    convs = sum(isinstance(layer, (keras.layers.Conv2D, keras.layers.Conv2DTranspose)) for layer in model.layers)
    assert convs == 103  # stem + 91 dense layers + 5 transitions down + 5 transitions up + head: the name
    assert model.get_layer("up5_tu").filters == 15  # growth_rate x layers of the bottleneck (new maps only)
    assert model.get_layer("down1_td_conv").filters == 4 + 4  # transition down keeps all channels


def test_fcn_is_vgg16_with_bilinear_upsampling():
    model = build_model("fcn8", 3, 2, fc_filters=16)
    filters = [model.get_layer(name).filters for name in ("block1_conv1", "block3_conv3", "block5_conv3")]
    assert filters == [64, 256, 512]
    assert model.get_layer("fc6").kernel_size == (7, 7) and model.get_layer("fc7").filters == 16
    kernel = keras.ops.convert_to_numpy(model.get_layer("upscore2").kernel)
    np.testing.assert_allclose(kernel[:, :, 0, 0], np.outer([.25, .75, .75, .25], [.25, .75, .75, .25]))
    assert not kernel[:, :, 0, 1].any()
    assert not keras.ops.convert_to_numpy(model.get_layer("score_pool4").kernel).any()
    assert model.get_layer("head_logits").strides == (8, 8)


# Geometry

def test_geometry_at_defaults_matches_the_documented_table():
    assert {architecture: model_geometry(architecture) for architecture in ARCHITECTURES} == DEFAULT_GEOMETRY


@pytest.mark.parametrize("depth", range(1, 7))
def test_unet_radius_closed_form(depth):
    assert model_geometry("unet", depth=depth) == (2 ** depth, 7 * 2 ** depth - 5)
    assert model_geometry("unet", depth=depth, upsampling="nearest") == (2 ** depth, 8 * 2 ** depth - 6)


def _measured_extent(model, divisor, radius, channels=1):
    """Farthest output pixel reached by a delta, as (most negative, most positive) offset along y.

    One image per phase of the delta modulo ``divisor``, so that every pooling-grid alignment is
    seen. Input zero except the delta, all kernels positive, biases zero, batch-norm in inference
    mode: an output pixel is non-zero exactly when a path of layers links it to the delta, so
    neither ReLU dead zones nor float rounding can hide a dependence.
    """
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Conv2DTranspose)):
            shape = tuple(layer.kernel.shape)
            layer.kernel.assign(rng.uniform(0.5, 1.0, shape) / np.prod(shape[:-1]))
            if layer.bias is not None:
                layer.bias.assign(np.zeros(layer.bias.shape))
    height = (2 * radius + 3 * divisor) // divisor * divisor
    center = height // 2 - divisor // 2
    lowest, highest = 0, 0
    for start in range(0, divisor, 16):  # small eager batches: much faster than one large one on CPU
        phases = range(start, min(start + 16, divisor))
        batch = np.zeros((len(phases), height, divisor, channels))
        for i, phase in enumerate(phases):
            batch[i, center + phase, divisor // 2, 0] = 1.0
        reached = keras.ops.convert_to_numpy(model(batch, training=False)) != 0
        for i, phase in enumerate(phases):
            rows = np.nonzero(reached[i].any(axis=(1, 2)))[0] - (center + phase)
            lowest, highest = min(lowest, rows.min()), max(highest, rows.max())
    return lowest, highest


@pytest.mark.parametrize("architecture, options", [
    ("unet", {"base_filters": 2, "depth": 2}),
    ("unet", {"base_filters": 2, "depth": 4, "batch_norm": False}),
    ("unet", {"base_filters": 2, "depth": 2, "upsampling": "nearest"}),
    ("fc-densenet56", {"growth_rate": 1, "stem_filters": 1}),  # widths do not change which pixels connect
    ("fc-densenet103", {"growth_rate": 1, "stem_filters": 2, "n_layers_per_block": [4, 2, 3], "n_pool": 2}),
    ("fcn32", {"width": 1 / 16}),
    ("fcn16", {"width": 1 / 16}),
    ("fcn8", {"width": 1 / 16, "fc6_kernel": 3}),
])
def test_receptive_field_radius_measured_with_an_impulse(architecture, options):
    divisor, radius = model_geometry(architecture, **options)
    keras.config.set_dtype_policy("float64")  # positive weights over ~50 layers: float32 would underflow
    model = build_model(architecture, 1, 2, **options)
    lowest, highest = _measured_extent(model, divisor, radius)
    assert max(-lowest, highest) == radius


def test_output_change_of_a_one_pixel_change_stays_within_radius():
    """Realistic random weights in float32: a one-pixel change moves no output farther than the radius."""
    options = SMALL["unet"]
    divisor, radius = model_geometry("unet", **options)
    model = build_model("unet", 2, 2, **options)
    size = 4 * radius // divisor * divisor
    base = _image((1, size, size, 2))
    changed = base.copy()
    changed[0, size // 2, size // 2 + 1, 1] += 10.0
    outputs = keras.ops.convert_to_numpy(model(np.concatenate([base, changed]), training=False))
    rows, cols = np.nonzero((outputs[0] != outputs[1]).any(axis=-1))
    assert rows.size and max(np.abs(rows - size // 2).max(), np.abs(cols - size // 2 - 1).max()) <= radius


@pytest.mark.parametrize("architecture, height, width, options, error", [
    ("unet", 256, 512, {}, None),
    ("unet", 48, 16, {}, None),
    ("unet", 250, 256, {}, "height must be a multiple of 16 for unet with these options; got 250. "
                           "Pad to 256 or crop to 240"),
    ("unet", 6, 8, {"depth": 2}, "height must be a multiple of 4 .* got 6"),
    ("unet", 8, 10, {"depth": 2}, "width must be a multiple of 4 .* got 10"),
    ("unet", 8, 8, {"depth": 4}, "height must be a multiple of 16 .* got 8. Pad to 16 pixels"),
    ("fc-densenet56", 256, 96, {}, None),
    ("fc-densenet56", 256, 80, {}, "width must be a multiple of 32"),
    ("fc-densenet56", 64, 64, {"n_pool": 3}, None),
    ("fcn8", 224, 224, {}, None),
    ("fcn32", 100, 224, {}, "height must be a multiple of 32"),
    ("unet", 0, 16, {}, "height must be an integer >= 1; got 0"),
    ("unet", 16.0, 16, {}, "height must be an integer"),
    ("unte", 16, 16, {}, "architecture must be one of unet, fc-densenet56"),
])
def test_check_input_size(architecture, height, width, options, error):
    if error is None:
        check_input_size(architecture, height, width, **options)
    else:
        with pytest.raises(ValueError, match=error):
            check_input_size(architecture, height, width, **options)


def test_what_a_non_multiple_input_does():
    """Documented behaviour without check_input_size: a shape error, or (FCN-32s) a smaller output."""
    unet = build_model("unet", 1, 2, **SMALL["unet"])
    with pytest.raises(Exception, match="up2_concat|[Ii]ncompatible|shape|[Dd]imension"):
        unet(_image((1, 6, 8, 1)))
    fcn32 = build_model("fcn32", 1, 2, **SMALL["fcn32"])
    assert tuple(fcn32(_image((1, 40, 32, 1))).shape) == (1, 32, 32, 2)


# Registry

def test_registry_builds_every_architecture_by_call_and_by_name():
    assert list(ARCHITECTURES) == ["unet", "fc-densenet56", "fc-densenet67", "fc-densenet103", "fcn8", "fcn16",
                                   "fcn32"]
    model = ARCHITECTURES["fc-densenet56"](2, 4, **SMALL["fc-densenet56"])
    assert model.name == "fc_densenet56" and model.input_shape == (None, None, None, 2)
    assert build_model("fcn16", 1, 2, **SMALL["fcn16"]).name == "fcn16s"


def test_default_options_are_fresh_and_resolved():
    options = default_options("fc-densenet103")
    assert options == {"stem_filters": 48, "growth_rate": 16, "n_layers_per_block": [4, 5, 7, 10, 12, 15],
                       "n_pool": 5, "dropout": 0.2, "bn_momentum": 0.9}
    options["n_layers_per_block"].append(1)
    assert default_options("fc-densenet103")["n_layers_per_block"] == [4, 5, 7, 10, 12, 15]
    assert default_options("fc-densenet56")["growth_rate"] == 12
    assert default_options("fc-densenet67")["n_layers_per_block"] == 5
    assert default_options("unet") == {"base_filters": 64, "depth": 4, "batch_norm": True, "dropout": 0.5,
                                       "upsampling": "transpose", "bn_momentum": 0.9}
    assert resolve_options("fcn8", width=0.5)["width"] == 0.5


@pytest.mark.parametrize("call, error", [
    (lambda: build_model("unte", 1, 2), r"architecture must be one of unet, fc-densenet56, fc-densenet67, "
                                        r"fc-densenet103, fcn8, fcn16, fcn32; got 'unte'"),
    (lambda: model_geometry("fcn"), "architecture must be one of"),
    (lambda: default_options("UNet"), "architecture must be one of"),
    (lambda: build_model("unet", 1, 2, depht=3), "options of unet must be among base_filters, batch_norm, "
                                                 "bn_momentum, depth, dropout, upsampling; got 'depht'"),
    (lambda: build_model("fcn8", 1, 2, variant=16), "options of fcn8 must be among .*; got 'variant'"),
    (lambda: model_geometry("fc-densenet56", depth=3), "got 'depth'"),
    (lambda: build_model("unet", 0, 2), "input_channels must be an integer >= 1; got 0"),
    (lambda: build_model("unet", 1, 0), "n_outputs must be an integer >= 1; got 0"),
    (lambda: build_model("unet", 1, 2, depth=0), "depth must be an integer >= 1; got 0. depth is the number"),
    (lambda: build_model("unet", 1, 2, base_filters=2.5), "base_filters must be an integer >= 1; got 2.5"),
    (lambda: build_model("unet", 1, 2, dropout=1.0), r"dropout must be a number in \[0, 1\); got 1.0"),
    (lambda: build_model("unet", 1, 2, batch_norm="yes"), "batch_norm must be True or False; got 'yes'"),
    (lambda: build_model("unet", 1, 2, upsampling="bilinear"), "upsampling must be one of 'transpose', 'nearest'"),
    (lambda: model_geometry("unet", depth=True), "depth must be an integer"),
    (lambda: build_model("fc-densenet56", 1, 2, growth_rate=0), "growth_rate must be an integer >= 1; got 0"),
    (lambda: build_model("fc-densenet56", 1, 2, stem_filters=0), "stem_filters must be an integer >= 1"),
    (lambda: build_model("fc-densenet103", 1, 2, n_pool=3), r"n_layers_per_block must be an int or a list of "
                                                             r"n_pool \+ 1 = 4 or 2 \* n_pool \+ 1 = 7 ints; got "
                                                             r"\[4, 5, 7, 10, 12, 15\]. Pass n_layers_per_block"),
    (lambda: model_geometry("fc-densenet56", n_layers_per_block=[2, 0, 2], n_pool=1),
     "every entry of n_layers_per_block must be an integer >= 1; got 0"),
    (lambda: model_geometry("fc-densenet56", n_pool=0), "n_pool must be an integer >= 1; got 0"),
    (lambda: fc_densenet_defaults("57"), "variant must be one of 56, 67, 103; got '57'"),
    (lambda: build_model("fcn8", 1, 2, width=0), "width must be a positive number"),
    (lambda: build_model("fcn8", 1, 2, fc_filters=0), "fc_filters must be an integer >= 1; got 0. VGG16 uses 4096"),
    (lambda: model_geometry("fcn8", fc6_kernel=0), "fc6_kernel must be an integer >= 1"),
    (lambda: model_geometry("fcn8", backbone_weights=3), "backbone_weights must be None or the path"),
    (lambda: build_fcn(1, 2, variant=4), "variant must be one of 32, 16, 8; got 4"),
    (lambda: Extent(jump=2).transposed_conv(4, 4), "stride must divide the current jump 2; got 4"),
    (lambda: Extent(jump=1).upsample(2), "size must divide the current jump 1; got 2"),
    (lambda: Extent(jump=2).union(Extent(jump=4)), "jump must agree to merge two branches; got 2 and 4"),
])
def test_errors_name_the_rule_and_the_value(call, error):
    with pytest.raises(ValueError, match=error):
        call()


def test_fc_densenet_block_lists_mirror():
    short = model_geometry("fc-densenet56", n_layers_per_block=[1, 2, 3], n_pool=2)
    explicit = model_geometry("fc-densenet56", n_layers_per_block=[1, 2, 3, 2, 1], n_pool=2)
    assert short == explicit


# Names and saving

@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_layer_names_are_deterministic(architecture):
    first = [layer.name for layer in build_model(architecture, 1, 2, **SMALL[architecture]).layers]
    keras.backend.clear_session(free_memory=False)
    build_model("unet", 1, 2, **SMALL["unet"])  # another model in between must not shift any name
    second = [layer.name for layer in build_model(architecture, 1, 2, **SMALL[architecture]).layers]
    assert first == second and len(set(first)) == len(first)
    assert first[0] == "image" and first[-1] == "head_logits"


def test_unet_layer_names_read_like_the_paper():
    names = [layer.name for layer in build_model("unet", 1, 2, **SMALL["unet"]).layers]
    assert names == ["image", "down1_conv1", "down1_bn1", "down1_relu1", "down1_conv2", "down1_bn2", "down1_relu2",
                     "down1_pool", "down2_conv1", "down2_bn1", "down2_relu1", "down2_conv2", "down2_bn2",
                     "down2_relu2", "down2_pool", "bottom_conv1", "bottom_bn1", "bottom_relu1", "bottom_conv2",
                     "bottom_bn2", "bottom_relu2", "bottom_dropout", "up2_upconv", "up2_concat", "up2_conv1",
                     "up2_bn1", "up2_relu1", "up2_conv2", "up2_bn2", "up2_relu2", "up1_upconv", "up1_concat",
                     "up1_conv1", "up1_bn1", "up1_relu1", "up1_conv2", "up1_bn2", "up1_relu2", "head_logits"]


@pytest.mark.parametrize("architecture, options", [
    ("unet", {**SMALL["unet"], "upsampling": "nearest"}),
    ("fc-densenet56", SMALL["fc-densenet56"]),
    ("fcn8", SMALL["fcn8"]),
])
def test_save_and_safe_load_give_identical_outputs(tmp_path, architecture, options):
    model = build_model(architecture, 3, 2, **options)
    image = _image((2, 64, 32, 3))
    expected = keras.ops.convert_to_numpy(model(image, training=False))
    model.save(tmp_path / "model.keras")
    keras.backend.clear_session(free_memory=False)
    loaded = keras.models.load_model(tmp_path / "model.keras", safe_mode=True)
    assert [layer.name for layer in loaded.layers] == [layer.name for layer in model.layers]
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded(image, training=False)), expected)


# VGG16 weight files

WIDTH = 1 / 16  # block filters 4, 8, 16, 32, 32; fc 256


def _vgg_arrays(rng, fc=True):
    """{layer: [kernel, bias]} for a VGG16 of WIDTH with 3 input channels, fc as Dense like keras.applications."""
    arrays, channels = {}, 3
    for name in VGG16_CONVS:
        block = int(name[5])
        filters = {1: 4, 2: 8, 3: 16, 4: 32, 5: 32}[block]
        arrays[name] = [rng.standard_normal((3, 3, channels, filters)).astype("float32"),
                        rng.standard_normal(filters).astype("float32")]
        channels = filters
    if fc:
        arrays["fc1"] = [rng.standard_normal((7 * 7 * 32, 256)).astype("float32"),
                         rng.standard_normal(256).astype("float32")]
        arrays["fc2"] = [rng.standard_normal((256, 256)).astype("float32"), rng.standard_normal(256).astype("float32")]
        arrays["predictions"] = [rng.standard_normal((256, 10)).astype("float32"), np.zeros(10, "float32")]
    return arrays


def _write_legacy_h5(path, arrays):
    with h5py.File(path, "w") as handle:
        handle.attrs["layer_names"] = [name.encode() for name in arrays]
        for name, (kernel, bias) in arrays.items():
            group = handle.create_group(name)
            group.attrs["weight_names"] = [f"{name}/kernel:0".encode(), f"{name}/bias:0".encode()]
            group[f"{name}/kernel:0"] = kernel
            group[f"{name}/bias:0"] = bias


def _assert_loaded(model, arrays, channels=3):
    for name in VGG16_CONVS:
        kernel = arrays[name][0] if name != "block1_conv1" or channels == 3 else arrays[name][0].sum(2, keepdims=True)
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(model.get_layer(name).kernel), kernel)
    fc6 = keras.ops.convert_to_numpy(model.get_layer("fc6").kernel)
    np.testing.assert_array_equal(fc6, arrays["fc1"][0].reshape(7, 7, 32, 256))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model.get_layer("fc7").bias), arrays["fc2"][1])


@pytest.mark.parametrize("channels", [3, 1])
def test_backbone_weights_from_a_legacy_h5_file(tmp_path, channels):
    arrays = _vgg_arrays(np.random.default_rng(1))
    _write_legacy_h5(tmp_path / "vgg16.h5", arrays)
    model = build_model("fcn16", channels, 2, width=WIDTH, backbone_weights=str(tmp_path / "vgg16.h5"))
    _assert_loaded(model, arrays, channels)


def test_backbone_weights_from_npz_and_keras3_weights_files(tmp_path):
    arrays = _vgg_arrays(np.random.default_rng(2))
    np.savez(tmp_path / "vgg16.npz", **{f"{name}/{var}": value for name, (kernel, bias) in arrays.items()
                                        for var, value in (("kernel", kernel), ("bias", bias))})
    model = build_model("fcn32", 3, 2, width=WIDTH)
    assert load_vgg16_weights(model, tmp_path / "vgg16.npz") == list(VGG16_CONVS) + ["fc6", "fc7"]
    _assert_loaded(model, arrays)

    # A Keras 3 .weights.h5 names its groups by layer class and order (conv2d, conv2d_1, ..., dense)
    layers = [keras.Input((7, 7, 3))] + [keras.layers.Conv2D(arrays[n][0].shape[-1], 3, padding="same")
                                         for n in VGG16_CONVS]
    vgg = keras.Sequential(layers + [keras.layers.Flatten(), keras.layers.Dense(256), keras.layers.Dense(256),
                                     keras.layers.Dense(10)])
    for layer, name in zip([l for l in vgg.layers if l.weights], list(VGG16_CONVS) + ["fc1", "fc2", "predictions"]):
        layer.set_weights(arrays[name])
    vgg.save_weights(tmp_path / "vgg16.weights.h5")
    model = build_model("fcn32", 3, 2, width=WIDTH, backbone_weights=str(tmp_path / "vgg16.weights.h5"))
    _assert_loaded(model, arrays)


def test_backbone_weights_without_top_leave_fc_random(tmp_path):
    arrays = _vgg_arrays(np.random.default_rng(3), fc=False)
    _write_legacy_h5(tmp_path / "notop.h5", arrays)
    model = build_model("fcn8", 3, 2, width=WIDTH)
    assert load_vgg16_weights(model, tmp_path / "notop.h5") == list(VGG16_CONVS)


def test_backbone_weights_errors(tmp_path):
    model = build_model("fcn32", 3, 2, width=WIDTH)
    with pytest.raises(FileNotFoundError, match="backbone_weights must be an existing file; got .*nowhere.h5.* "
                                                "Nothing is downloaded"):
        load_vgg16_weights(model, tmp_path / "nowhere.h5")
    (tmp_path / "vgg16.pth").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"backbone_weights must end with .h5, .weights.h5, .npz; got"):
        load_vgg16_weights(model, tmp_path / "vgg16.pth")

    arrays = _vgg_arrays(np.random.default_rng(4))
    del arrays["block5_conv3"]
    _write_legacy_h5(tmp_path / "partial.h5", arrays)
    with pytest.raises(ValueError, match="must hold every VGG16 convolution; block5_conv3 missing in"):
        load_vgg16_weights(model, tmp_path / "partial.h5")

    _write_legacy_h5(tmp_path / "vgg16.h5", _vgg_arrays(np.random.default_rng(5)))
    with pytest.raises(ValueError, match=r"backbone layer block1_conv1 must have weight shapes \[\(3, 3, 3, 8\), "
                                         r"\(8,\)\]; got \[\(3, 3, 3, 4\), \(4,\)\] in .*vgg16.h5. Use width=1.0"):
        build_model("fcn32", 3, 2, width=2 * WIDTH, backbone_weights=str(tmp_path / "vgg16.h5"))
    with pytest.raises(ValueError, match="backbone layer block1_conv1 .* ImageNet weights have 3 input channels"):
        build_model("fcn32", 2, 2, width=WIDTH, backbone_weights=str(tmp_path / "vgg16.h5"))
    with pytest.raises(ValueError, match="backbone layer fc6 must have weight shapes"):
        build_model("fcn32", 3, 2, width=WIDTH, fc_filters=8, backbone_weights=str(tmp_path / "vgg16.h5"))

    np.savez(tmp_path / "bad.npz", **{"block1_conv1/W": np.zeros(3)})
    with pytest.raises(ValueError, match=r"every key of a .npz weights file must be '<layer>/kernel' or "
                                         r"'<layer>/bias'; got 'block1_conv1/W'"):
        load_vgg16_weights(model, tmp_path / "bad.npz")


@pytest.mark.parametrize("architecture, layer", [("unet", "down1_bn1"), ("fc-densenet56", "down1_layer1_bn")])
def test_batch_norm_momentum_is_an_option(architecture, layer):
    small = {"unet": {"base_filters": 4, "depth": 2}, "fc-densenet56": SMALL["fc-densenet56"]}[architecture]
    assert build_model(architecture, 1, 2, **small).get_layer(layer).momentum == pytest.approx(0.9)
    assert build_model(architecture, 1, 2, bn_momentum=0.99, **small).get_layer(layer).momentum == pytest.approx(0.99)
    with pytest.raises(ValueError, match=r"bn_momentum must be a number in \[0, 1\); got 1.5"):
        build_model(architecture, 1, 2, bn_momentum=1.5, **small)
