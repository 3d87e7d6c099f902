"""FCN-32s / 16s / 8s (Long, Shelhamer and Darrell, CVPR 2015) on a VGG16 encoder.

Encoder: five blocks ``block1`` ... ``block5`` of 2, 2, 3, 3, 3 3x3 convolutions (64, 128, 256,
512, 512 filters, times ``width``) with ReLU, each followed by 2x2 max-pooling
``block{i}_pool``; ``fc6`` (7x7) and ``fc7`` (1x1) are VGG16's fully connected layers as
convolutions, each with ReLU and dropout 0.5. Layer names are those of ``keras.applications.VGG16``
(and ``fc6``/``fc7`` for its ``fc1``/``fc2``), so ImageNet weights load by name.

Decoder: ``score_fr`` (1x1 conv to K scores at stride 32), then

- FCN-32s: ``head_logits``, a 64x64 stride-32 transposed conv back to full resolution;
- FCN-16s: ``upscore2`` (4x4 stride 2) + ``score_pool4`` (1x1 on ``block4_pool``) ->
  ``fuse_pool4``, then ``head_logits`` (32x32 stride 16);
- FCN-8s: as 16s, then ``upscore_pool4`` (4x4 stride 2) + ``score_pool3`` -> ``fuse_pool3``,
  then ``head_logits`` (16x16 stride 8).

As in the paper, upsampling layers are transposed convolutions without bias initialised to
bilinear interpolation and then learned, and the skip score layers start at zero (the net starts
as FCN-32s). The last upsampling is the logits head: it is linear and float32 even under a
mixed-precision policy (a 1x1 convolution after it would only repeat ``score_fr``).

Geometry
--------
- Size divisor: 32; with 'same' padding the output has the input's size when the input's height
  and width are multiples of 32. Otherwise FCN-16s and 8s fail with a shape error at
  ``fuse_pool4``/``fuse_pool3``, and FCN-32s silently returns a map of 32 * floor(size / 32)
  pixels: call :func:`lib.models.check_input_size` first.
- Receptive-field radius (see :func:`fcn_geometry`): 233 (32s), 241 (16s), 245 (8s) with the 7x7
  fc6.
"""

from __future__ import annotations

import re
from pathlib import Path

import keras
import numpy as np

from .blocks import (
    KERNEL_INITIALIZER,
    Extent,
    bilinear_kernel,
    check_bool,
    check_choice,
    check_int,
    check_rate,
    image_input,
    logits_dtype,
)
from .layers import FastDropout

VARIANTS = (32, 16, 8)
VGG16_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
VGG16_CONVS = tuple(f"block{block}_conv{index}" for block, (_, count) in enumerate(VGG16_BLOCKS, 1)
                    for index in range(1, count + 1))
WEIGHT_SUFFIXES = (".h5", ".weights.h5", ".npz")


def fcn_defaults() -> dict:
    """Default options of :func:`build_fcn` (the paper's VGG16, trained from scratch)."""
    return {"width": 1.0, "fc_filters": None, "fc6_kernel": 7, "dropout": 0.5, "batch_norm": False,
            "backbone_weights": None}


def _validate(width, fc_filters, fc6_kernel, dropout, batch_norm, backbone_weights) -> None:
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
        raise ValueError(f"width must be a positive number (multiplier of VGG16's filter counts); got {width!r}.")
    if fc_filters is not None:
        check_int("fc_filters", fc_filters, hint="VGG16 uses 4096; None means 4096 * width.")
    check_int("fc6_kernel", fc6_kernel, hint="VGG16 uses 7.")
    check_rate("dropout", dropout)
    check_bool("batch_norm", batch_norm)
    if backbone_weights is not None and not isinstance(backbone_weights, (str, Path)):
        raise ValueError(f"backbone_weights must be None or the path of a weights file; got {backbone_weights!r}.")


def fcn_geometry(variant: int = 8, *, width: float = 1.0, fc_filters: int | None = None, fc6_kernel: int = 7,
                 dropout: float = 0.5, batch_norm: bool = False, backbone_weights=None) -> tuple[int, int]:
    """Size divisor and receptive-field radius of :func:`build_fcn` with these options.

    Walks the deep path (encoder, fc6, 2x upsamplings, last upsampling) with
    :class:`~lib.models.blocks.Extent`, merging the pool4 and pool3 branches.

    Returns
    -------
    (divisor, radius) : (int, int)
    """
    check_choice("variant", variant, VARIANTS)
    _validate(width, fc_filters, fc6_kernel, dropout, batch_norm, backbone_weights)
    extent = Extent()
    pools = []
    # Encoder
    for _, count in VGG16_BLOCKS:
        extent = extent.convs(3, count).pool(2)
        pools.append(extent)
    extent = extent.conv(fc6_kernel).conv(1).conv(1)  # fc6, fc7, score_fr
    # Skip fusion at stride 16 (16s, 8s) and 8 (8s)
    for pool in {32: [], 16: [pools[3]], 8: [pools[3], pools[2]]}[variant]:  # pool4, then pool3
        extent = extent.transposed_conv(4, 2).union(pool.conv(1))
    stride = extent.jump
    return 32, extent.transposed_conv(2 * stride, stride).radius


def _filters(base: int, width: float) -> int:
    return max(1, int(round(base * width)))


def build_fcn(input_channels: int, n_outputs: int, *, variant: int = 8, width: float = 1.0,
              fc_filters: int | None = None, fc6_kernel: int = 7, dropout: float = 0.5, batch_norm: bool = False,
              backbone_weights: str | Path | None = None) -> keras.Model:
    """Build an FCN-32s, 16s or 8s that maps images to per-pixel logits.

    Parameters
    ----------
    input_channels : int
        Channels C of the input image.
    n_outputs : int
        Channels K of the output (classes, or instance target channels).
    variant : {32, 16, 8}
        Stride of the coarsest prediction fused: FCN-32s, FCN-16s (adds pool4), FCN-8s (adds pool3).
    width : float
        Multiplier of the encoder's filter counts (1.0 is VGG16; 1/16 gives a tiny test model).
    fc_filters : int, optional
        Filters of fc6 and fc7; None: ``4096 * width`` (4096 in VGG16).
    fc6_kernel : int
        Kernel size of fc6 (7 in VGG16).
    dropout : float
        Dropout rate after fc6 and after fc7.
    batch_norm : bool
        Batch-norm after every encoder convolution and fc6/fc7 (not in VGG16; helps training from
        scratch).
    backbone_weights : str or Path, optional
        Local file of VGG16 ImageNet weights (see :func:`load_vgg16_weights`); None: random
        initialisation. Nothing is ever downloaded.

    Returns
    -------
    keras.Model
        Input ``image``: (B, H, W, C) float; output: (B, H, W, K) float32 logits (no activation).
        H and W must be multiples of 32.

    Raises
    ------
    ValueError
        If an option is out of range, or the weights file does not fit the encoder.
    FileNotFoundError
        If ``backbone_weights`` does not exist.
    """
    check_int("input_channels", input_channels)
    check_int("n_outputs", n_outputs)
    check_choice("variant", variant, VARIANTS)
    _validate(width, fc_filters, fc6_kernel, dropout, batch_norm, backbone_weights)

    def conv(x, filters, kernel_size, name):
        x = keras.layers.Conv2D(filters, kernel_size, padding="same", use_bias=not batch_norm,
                                kernel_initializer=KERNEL_INITIALIZER, name=name)(x)
        if batch_norm:
            x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
        return keras.layers.ReLU(name=f"{name}_relu")(x)

    inputs = image_input(input_channels)
    x = inputs
    # Encoder (VGG16)
    pools = {}
    for block, (filters, count) in enumerate(VGG16_BLOCKS, 1):
        for index in range(1, count + 1):
            x = conv(x, _filters(filters, width), 3, f"block{block}_conv{index}")
        x = pools[block] = keras.layers.MaxPooling2D(2, name=f"block{block}_pool")(x)
    for name, kernel_size in (("fc6", fc6_kernel), ("fc7", 1)):
        x = conv(x, fc_filters or _filters(4096, width), kernel_size, name)
        if dropout > 0:
            x = FastDropout(dropout, name=f"{name}_dropout")(x)

    # Decoder: scores at stride 32, fused with pool4 and pool3 scores on the way up
    upsamplers = []
    x = keras.layers.Conv2D(n_outputs, 1, name="score_fr")(x)
    for block, name in ((4, "upscore2"), (3, "upscore_pool4"))[:{32: 0, 16: 1, 8: 2}[variant]]:
        up = keras.layers.Conv2DTranspose(n_outputs, 4, strides=2, padding="same", use_bias=False, name=name)
        upsamplers.append(up)
        score = keras.layers.Conv2D(n_outputs, 1, kernel_initializer="zeros", name=f"score_pool{block}")(pools[block])
        x = keras.layers.Add(name=f"fuse_pool{block}")([up(x), score])
    head = keras.layers.Conv2DTranspose(n_outputs, 2 * variant, strides=variant, padding="same", use_bias=False,
                                        dtype=logits_dtype(), name="head_logits")
    upsamplers.append(head)
    outputs = head(x)
    model = keras.Model(inputs, outputs, name=f"fcn{variant}s")

    for layer in upsamplers:
        layer.kernel.assign(bilinear_kernel(layer.kernel_size[0], n_outputs))
    if backbone_weights is not None:
        load_vgg16_weights(model, backbone_weights)
    return model


def _read_weights_file(path: Path) -> dict[str, list[np.ndarray]]:
    """Arrays [kernel, bias] per layer name from a legacy .h5, Keras 3 .weights.h5 or .npz file."""
    if path.name.endswith(".npz"):
        layers: dict[str, list] = {}
        with np.load(path, allow_pickle=False) as archive:
            for key in archive.files:
                layer, _, variable = key.rpartition("/")
                if variable not in ("kernel", "bias"):
                    raise ValueError(f"every key of a .npz weights file must be '<layer>/kernel' or '<layer>/bias'; "
                                     f"got {key!r} in {path}.")
                layers.setdefault(layer, [None, None])[variable == "bias"] = archive[key]
        return {layer: [a for a in arrays if a is not None] for layer, arrays in layers.items()}

    import h5py

    with h5py.File(path, "r") as handle:
        if "layers" in handle and "layer_names" not in handle.attrs:
            # Keras 3 .weights.h5: groups are named after layer classes in model order (conv2d,
            # conv2d_1, ..., dense, dense_1), so VGG16's layers are recognised by their order.
            def order(key):
                match = re.fullmatch(r"(conv2d|dense)(?:_(\d+))?", key)
                return (match.group(1), int(match.group(2) or 0)) if match else None
            keys = sorted((order(k), k) for k in handle["layers"] if order(k) is not None)
            convs = [k for (kind, _), k in keys if kind == "conv2d"]
            denses = [k for (kind, _), k in keys if kind == "dense"]
            names = list(VGG16_CONVS[:len(convs)]) + ["fc1", "fc2", "predictions"][:len(denses)]
            groups = convs + denses
            return {name: [handle["layers"][g]["vars"][str(i)][()] for i in range(len(handle["layers"][g]["vars"]))]
                    for name, g in zip(names, groups)}
        # Legacy Keras .h5 (keras.applications' vgg16_weights_tf_dim_ordering_tf_kernels*.h5)
        root = handle["model_weights"] if "model_weights" in handle else handle
        result = {}
        for name in root.attrs.get("layer_names", []):
            name = name.decode() if isinstance(name, bytes) else str(name)
            group = root[name]
            weight_names = [w.decode() if isinstance(w, bytes) else str(w) for w in group.attrs.get("weight_names", [])]
            if weight_names:
                result[name] = [group[w][()] for w in weight_names]
        return result


def load_vgg16_weights(model: keras.Model, path: str | Path) -> list[str]:
    """Load VGG16 ImageNet weights from a local file into the encoder of an FCN, by layer name.

    Accepted files: the legacy Keras ``.h5`` files of ``keras.applications.VGG16`` (with or
    without top; groups ``block1_conv1`` ... ``fc1``, ``fc2``), a Keras 3 ``.weights.h5`` saved
    from ``keras.applications.VGG16`` (layers recognised by their order), or a ``.npz`` with keys
    ``<layer>/kernel`` and ``<layer>/bias``. The 13 convolutions are required; ``fc1``/``fc2``
    (Dense) or ``fc6``/``fc7`` are reshaped into the fc6/fc7 convolutions when present, left at
    random initialisation otherwise. For a one-channel model, ``block1_conv1``'s RGB kernel is
    summed over its input channels. ImageNet weights expect Caffe-style inputs (BGR, mean
    subtracted, 0-255); fine-tuning adapts them to the normalised inputs of this pipeline.

    Returns
    -------
    list of str
        Names of the model's layers that were loaded.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file has another suffix, lacks a VGG16 convolution, or a shape does not match.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone_weights must be an existing file; got {str(path)!r}. "
                                "Nothing is downloaded: fetch VGG16 ImageNet weights yourself, or pass None.")
    if not path.name.endswith(WEIGHT_SUFFIXES):
        raise ValueError(f"backbone_weights must end with {', '.join(WEIGHT_SUFFIXES)}; got {str(path)!r}.")
    stored = _read_weights_file(path)
    missing = [name for name in VGG16_CONVS if name not in stored]
    if missing:
        raise ValueError(f"backbone_weights must hold every VGG16 convolution; {', '.join(missing)} missing in {path} "
                         f"(found: {', '.join(sorted(stored)) or 'nothing'}).")
    loaded = []
    for name in VGG16_CONVS + ("fc6", "fc7"):
        source = {"fc6": ("fc6", "fc1"), "fc7": ("fc7", "fc2")}.get(name, (name,))
        arrays = next((stored[s] for s in source if s in stored), None)
        if arrays is None:
            continue
        layer = model.get_layer(name)
        expected = [tuple(v.shape) for v in layer.weights]
        kernel = np.asarray(arrays[0])
        if kernel.ndim == 2:  # Dense fc1 (flattened 7x7xC) or fc2 -> convolution kernel
            kernel_size = layer.kernel_size[0]
            kernel = kernel.reshape(kernel_size, kernel_size, -1, kernel.shape[-1]) \
                if kernel.shape[0] % (kernel_size * kernel_size) == 0 else kernel
        if name == "block1_conv1" and kernel.ndim == 4 and kernel.shape[2] == 3 and expected[0][2] == 1:
            kernel = kernel.sum(axis=2, keepdims=True)
        values = [kernel] + [np.asarray(a) for a in arrays[1:]]
        got = [tuple(v.shape) for v in values]
        if got != expected:
            if name == "block1_conv1" and got[0][2:3] != expected[0][2:3]:
                hint = "ImageNet weights have 3 input channels (1 is adapted by summing)."
            else:
                hint = ("Use width=1.0, fc_filters=None or 4096, fc6_kernel=7, batch_norm=False with ImageNet "
                        "weights, or a file without the top (fc) layers.")
            raise ValueError(f"backbone layer {name} must have weight shapes {expected}; got {got} in {path}. {hint}")
        layer.set_weights(values)
        loaded.append(name)
    return loaded
