"""FC-DenseNet (Jegou et al., CVPR-W 2017, "The One Hundred Layers Tiramisu").

``stem_conv`` (3x3, 48 filters); down path ``down1`` ... ``down{n_pool}``: a dense block (each
layer BN -> ReLU -> 3x3 conv of ``growth_rate`` filters -> dropout 0.2, its output concatenated
to its input) then a transition down (BN -> ReLU -> 1x1 conv keeping the channel count ->
dropout -> 2x2 max-pooling); ``bottleneck`` dense block; up path ``up{n_pool}`` ... ``up1``: a
transition up (3x3 stride-2 transposed conv applied only to the feature maps created by the
previous dense block, with as many filters as there are such maps), concatenation with the skip
of the same level, dense block; ``head_logits``: 1x1 convolution of the last stack to logits.

Variants (layers per dense block, growth rate): FC-DenseNet56 (4 everywhere, 12),
FC-DenseNet67 (5 everywhere, 16), FC-DenseNet103 (4, 5, 7, 10, 12 down, 15 bottleneck, mirrored
up, 16).

Geometry
--------
- Size divisor: ``2**n_pool`` (32 for the paper's 5 poolings). Inputs whose height or width is
  not a multiple of it fail inside the model with a shape error at ``up*_concat``;
  :func:`lib.models.check_input_size` says so before.
- Receptive-field radius (see :func:`fc_densenet_geometry`): 439 for FC-DenseNet56, 533 for
  FC-DenseNet67, 1171 for FC-DenseNet103. The dependence is asymmetric (the 3x3 stride-2
  transposed conv reaches two coarse pixels on one side), the radius is the larger side.
"""

from __future__ import annotations

import numbers

import keras

from .blocks import Extent, bn_relu_conv, check_int, check_rate, image_input, logits_head
from .unet import BN_MOMENTUM

VARIANTS = {
    "56": {"stem_filters": 48, "growth_rate": 12, "n_layers_per_block": 4, "n_pool": 5, "dropout": 0.2},
    "67": {"stem_filters": 48, "growth_rate": 16, "n_layers_per_block": 5, "n_pool": 5, "dropout": 0.2},
    "103": {"stem_filters": 48, "growth_rate": 16, "n_layers_per_block": [4, 5, 7, 10, 12, 15], "n_pool": 5,
            "dropout": 0.2},
}


def fc_densenet_defaults(variant: str) -> dict:
    """Default options of FC-DenseNet ``variant`` ("56", "67" or "103"), a fresh dict."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}; got {variant!r}.")
    defaults = {key: (list(value) if isinstance(value, list) else value) for key, value in VARIANTS[variant].items()}
    return {**defaults, "bn_momentum": BN_MOMENTUM}


def block_sizes(n_layers_per_block, n_pool: int) -> list[int]:
    """Layers of every dense block, down path then bottleneck then up path (``2 * n_pool + 1`` entries).

    ``n_layers_per_block`` is one int for all blocks, ``n_pool + 1`` ints (down path and
    bottleneck; the up path mirrors the down path), or ``2 * n_pool + 1`` ints.
    """
    n_pool = check_int("n_pool", n_pool, hint="n_pool is the number of 2x poolings (5 in the paper).")
    if isinstance(n_layers_per_block, numbers.Integral) and not isinstance(n_layers_per_block, bool):
        sizes = [n_layers_per_block] * (2 * n_pool + 1)
    elif isinstance(n_layers_per_block, (list, tuple)) and len(n_layers_per_block) == n_pool + 1:
        sizes = list(n_layers_per_block) + list(n_layers_per_block[-2::-1])
    elif isinstance(n_layers_per_block, (list, tuple)) and len(n_layers_per_block) == 2 * n_pool + 1:
        sizes = list(n_layers_per_block)
    else:
        raise ValueError(f"n_layers_per_block must be an int or a list of n_pool + 1 = {n_pool + 1} or "
                         f"2 * n_pool + 1 = {2 * n_pool + 1} ints; got {n_layers_per_block!r}. "
                         "Pass n_layers_per_block as well when changing n_pool.")
    for size in sizes:
        check_int("every entry of n_layers_per_block", size)
    return [int(size) for size in sizes]


def _validate(stem_filters, growth_rate, n_layers_per_block, n_pool, dropout, bn_momentum=BN_MOMENTUM) -> list[int]:
    check_rate("bn_momentum", bn_momentum)
    check_int("stem_filters", stem_filters)
    check_int("growth_rate", growth_rate)
    check_rate("dropout", dropout)
    return block_sizes(n_layers_per_block, n_pool)


def fc_densenet_geometry(*, stem_filters: int = 48, growth_rate: int = 12, n_layers_per_block=4,
                         n_pool: int = 5, dropout: float = 0.2, bn_momentum: float = BN_MOMENTUM) -> tuple[int, int]:
    """Size divisor and receptive-field radius of :func:`build_fc_densenet` with these options.

    The longest path runs through the stem, every layer of every dense block (each layer sees
    all previous ones), every transition; walked with :class:`~lib.models.blocks.Extent`.

    Returns
    -------
    (divisor, radius) : (int, int)
    """
    sizes = _validate(stem_filters, growth_rate, n_layers_per_block, n_pool, dropout, bn_momentum)
    extent = Extent().conv(3)
    # Down path: dense block, then 1x1 conv and 2x2 pooling
    for size in sizes[:n_pool]:
        extent = extent.convs(3, size).conv(1).pool(2)
    # Bottleneck
    extent = extent.convs(3, sizes[n_pool])
    # Up path: 3x3 stride-2 transposed conv, then dense block
    for size in sizes[n_pool + 1:]:
        extent = extent.transposed_conv(3, 2).convs(3, size)
    return 2 ** n_pool, extent.conv(1).radius


def _dense_block(x, n_layers: int, growth_rate: int, dropout: float, prefix: str, bn_momentum: float = BN_MOMENTUM):
    """Dense block ``prefix``; returns (stack of input and new maps, list of the new maps)."""
    new_maps = []
    for index in range(1, n_layers + 1):
        layer = bn_relu_conv(growth_rate, 3, dropout, f"{prefix}_layer{index}", bn_momentum)(x)
        new_maps.append(layer)
        x = keras.layers.Concatenate(name=f"{prefix}_layer{index}_concat")([x, layer])
    return x, new_maps


def build_fc_densenet(input_channels: int, n_outputs: int, *, stem_filters: int = 48, growth_rate: int = 12,
                      n_layers_per_block=4, n_pool: int = 5, dropout: float = 0.2,
                      bn_momentum: float = BN_MOMENTUM, name: str = "fc_densenet") -> keras.Model:
    """Build an FC-DenseNet that maps images to per-pixel logits.

    Parameters
    ----------
    input_channels : int
        Channels C of the input image.
    n_outputs : int
        Channels K of the output (classes, or instance target channels).
    stem_filters : int
        Filters of the first 3x3 convolution (48 in the paper).
    growth_rate : int
        Feature maps added by each dense layer (12 for 56, 16 for 67 and 103).
    n_layers_per_block : int or list of int
        Layers per dense block: one int, ``n_pool + 1`` ints (down path and bottleneck, mirrored
        for the up path) or ``2 * n_pool + 1`` ints.
    n_pool : int
        Number of 2x poolings (size divisor ``2**n_pool``).
    dropout : float
        Dropout rate after every convolution of the dense layers and transitions down.
    bn_momentum : float
        Momentum of the batch-norm moving statistics (see ``lib.models.unet.BN_MOMENTUM``).
    name : str
        Name of the Keras model.

    Returns
    -------
    keras.Model
        Input ``image``: (B, H, W, C) float; output: (B, H, W, K) float32 logits (no activation).
        H and W must be multiples of ``2**n_pool``.

    Raises
    ------
    ValueError
        If an option is out of range.
    """
    check_int("input_channels", input_channels)
    check_int("n_outputs", n_outputs)
    sizes = _validate(stem_filters, growth_rate, n_layers_per_block, n_pool, dropout, bn_momentum)

    inputs = image_input(input_channels)
    x = keras.layers.Conv2D(stem_filters, 3, padding="same", kernel_initializer="he_normal",
                            name="stem_conv")(inputs)
    channels = stem_filters

    # Down path: set aside each block's full stack for the skip connection
    skips = []
    for level in range(1, n_pool + 1):
        x, _ = _dense_block(x, sizes[level - 1], growth_rate, dropout, f"down{level}", bn_momentum)
        channels += growth_rate * sizes[level - 1]
        skips.append(x)
        x = bn_relu_conv(channels, 1, dropout, f"down{level}_td", bn_momentum)(x)
        x = keras.layers.MaxPooling2D(2, name=f"down{level}_td_pool")(x)

    # Bottleneck: only its new maps go up
    _, new_maps = _dense_block(x, sizes[n_pool], growth_rate, dropout, "bottleneck", bn_momentum)

    # Up path
    for position, level in enumerate(range(n_pool, 0, -1)):
        previous = sizes[n_pool + position]
        block_input = (keras.layers.Concatenate(name=f"up{level}_tu_input")(new_maps) if len(new_maps) > 1
                       else new_maps[0])
        x = keras.layers.Conv2DTranspose(growth_rate * previous, 3, strides=2, padding="same",
                                         kernel_initializer="he_normal", name=f"up{level}_tu")(block_input)
        x = keras.layers.Concatenate(name=f"up{level}_concat")([x, skips[level - 1]])
        x, new_maps = _dense_block(x, sizes[n_pool + position + 1], growth_rate, dropout, f"up{level}",
                                   bn_momentum)

    outputs = logits_head(n_outputs)(x)
    return keras.Model(inputs, outputs, name=name)
