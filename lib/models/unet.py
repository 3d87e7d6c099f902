"""U-Net (Ronneberger, Fischer and Brox, MICCAI 2015) with the defaults of NIST's reference code.

Encoder levels ``down1`` ... ``down{depth}``: two 3x3 'same' convolutions (each conv ->
batch-norm -> ReLU) then a 2x2 max-pooling; ``bottom``: two convolutions then dropout;
decoder levels ``up{depth}`` ... ``up1``: 2x upsampling (2x2 transposed convolution, or
nearest-neighbour upsampling followed by a 3x3 convolution), concatenation with the encoder
features of the same level, two convolutions; ``head_logits``: 1x1 convolution to per-pixel
logits. Filters double at each level: ``base_filters * 2**level`` (64 ... 1024 by default).

Geometry
--------
- Size divisor: ``2**depth`` (16 at the default depth 4). Inputs whose height or width is not a
  multiple of it fail inside the model with a shape error at ``up*_concat``;
  :func:`lib.models.check_input_size` says so before.
- Receptive-field radius: ``7 * 2**depth - 5`` with transposed convolutions (107 at depth 4),
  ``8 * 2**depth - 6`` with nearest upsampling (122). See :func:`unet_geometry`.
"""

from __future__ import annotations

import keras

from .blocks import Extent, check_bool, check_choice, check_int, check_rate, conv_bn_relu, image_input, logits_head
from .layers import FastDropout

UPSAMPLING_MODES = ("transpose", "nearest")
# Moving-statistics momentum of the batch-norm layers. Keras' 0.99 averages over ~100 steps, so
# after a few hundred steps of a short run the statistics used at test time still lag the
# weights; 0.9 (PyTorch's default) follows them within ~10 steps.
BN_MOMENTUM = 0.9


def unet_defaults() -> dict:
    """Default options of :func:`build_unet` (NIST: 64 base filters, 4 poolings, batch-norm, dropout 0.5)."""
    return {"base_filters": 64, "depth": 4, "batch_norm": True, "dropout": 0.5, "upsampling": "transpose",
            "bn_momentum": BN_MOMENTUM}


def _validate(base_filters, depth, batch_norm, dropout, upsampling, bn_momentum=BN_MOMENTUM) -> None:
    check_int("base_filters", base_filters)
    check_int("depth", depth, hint="depth is the number of 2x poolings (NIST uses 4).")
    check_bool("batch_norm", batch_norm)
    check_rate("dropout", dropout)
    check_choice("upsampling", upsampling, UPSAMPLING_MODES)
    check_rate("bn_momentum", bn_momentum)


def unet_geometry(*, base_filters: int = 64, depth: int = 4, batch_norm: bool = True, dropout: float = 0.5,
                  upsampling: str = "transpose", bn_momentum: float = BN_MOMENTUM) -> tuple[int, int]:
    """Size divisor and receptive-field radius of :func:`build_unet` with these options.

    Walks the longest path (down every level, through the bottom, up every level) with
    :class:`~lib.models.blocks.Extent`. Closed form: radius ``7 * 2**depth - 5`` (transpose) or
    ``8 * 2**depth - 6`` (nearest).

    Returns
    -------
    (divisor, radius) : (int, int)
        Height and width must be multiples of ``divisor``; an output pixel depends on input pixels
        at most ``radius`` pixels away along each axis.
    """
    _validate(base_filters, depth, batch_norm, dropout, upsampling, bn_momentum)
    extent = Extent()
    # Encoder
    for _ in range(depth):
        extent = extent.convs(3, 2).pool(2)
    # Bottom
    extent = extent.convs(3, 2)
    # Decoder
    for _ in range(depth):
        extent = extent.transposed_conv(2, 2) if upsampling == "transpose" else extent.upsample(2).conv(3)
        extent = extent.convs(3, 2)
    return 2 ** depth, extent.radius


def build_unet(input_channels: int, n_outputs: int, *, base_filters: int = 64, depth: int = 4,
               batch_norm: bool = True, dropout: float = 0.5, upsampling: str = "transpose",
               bn_momentum: float = BN_MOMENTUM) -> keras.Model:
    """Build a U-Net that maps images to per-pixel logits.

    Parameters
    ----------
    input_channels : int
        Channels C of the input image.
    n_outputs : int
        Channels K of the output (classes, or instance target channels).
    base_filters : int
        Filters of the first level; level ``l`` has ``base_filters * 2**l``.
    depth : int
        Number of 2x poolings (size divisor ``2**depth``).
    batch_norm : bool
        Batch-norm after every 3x3 convolution (never on the logits).
    dropout : float
        Dropout rate after the bottom convolutions; 0 disables it.
    upsampling : {"transpose", "nearest"}
        2x2 stride-2 transposed convolution, or nearest upsampling followed by a 3x3 convolution.
    bn_momentum : float
        Momentum of the batch-norm moving statistics (:data:`BN_MOMENTUM`, Keras' default is 0.99).

    Returns
    -------
    keras.Model
        Input ``image``: (B, H, W, C) float; output: (B, H, W, K) float32 logits (no activation).
        H and W must be multiples of ``2**depth``.

    Raises
    ------
    ValueError
        If an option is out of range.
    """
    check_int("input_channels", input_channels)
    check_int("n_outputs", n_outputs)
    _validate(base_filters, depth, batch_norm, dropout, upsampling, bn_momentum)

    inputs = image_input(input_channels)
    x = inputs
    # Encoder: set aside each level's features for the skip connection
    skips = []
    for level in range(1, depth + 1):
        filters = base_filters * 2 ** (level - 1)
        for index in (1, 2):
            x = conv_bn_relu(filters, f"down{level}", index, batch_norm, bn_momentum=bn_momentum)(x)
        skips.append(x)
        x = keras.layers.MaxPooling2D(2, name=f"down{level}_pool")(x)

    # Bottom
    for index in (1, 2):
        x = conv_bn_relu(base_filters * 2 ** depth, "bottom", index, batch_norm, bn_momentum=bn_momentum)(x)
    if dropout > 0:
        x = FastDropout(dropout, name="bottom_dropout")(x)

    # Decoder
    for level in range(depth, 0, -1):
        filters = base_filters * 2 ** (level - 1)
        if upsampling == "transpose":
            x = keras.layers.Conv2DTranspose(filters, 2, strides=2, padding="same", name=f"up{level}_upconv")(x)
        else:
            x = keras.layers.UpSampling2D(2, interpolation="nearest", name=f"up{level}_upsample")(x)
            x = keras.layers.Conv2D(filters, 3, padding="same", name=f"up{level}_upconv")(x)
        x = keras.layers.Concatenate(name=f"up{level}_concat")([skips[level - 1], x])
        for index in (1, 2):
            x = conv_bn_relu(filters, f"up{level}", index, batch_norm, bn_momentum=bn_momentum)(x)

    outputs = logits_head(n_outputs)(x)
    return keras.Model(inputs, outputs, name="unet")
