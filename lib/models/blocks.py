"""Building blocks shared by the model builders, and the geometry they imply.

Blocks are small factories: each returns a closure ``tensor -> tensor`` whose layers carry
deterministic names derived from a ``prefix`` (``down2_conv1``, ``up1_concat``), so that two
builds give identical layer lists, ``model.summary()`` reads like the paper, and weights load
by name.

:class:`Extent` is plain Python (no TensorFlow): the builders' geometry functions walk their
longest path through it to get the size divisor and the receptive-field radius analytically.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable

import keras
import numpy as np

from .layers import FastDropout, FusedBatchNormalization

KERNEL_INITIALIZER = "he_normal"  # every ReLU conv; the logits head keeps Keras' glorot default


# Validation helpers (messages follow "<name> must <rule>; got <value>. <hint>")

def check_int(name: str, value: Any, minimum: int = 1, hint: str = "") -> int:
    """Return ``value`` as int, or raise ValueError if it is not an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}.{' ' + hint if hint else ''}")
    return int(value)


def check_rate(name: str, value: Any, hint: str = "") -> float:
    """Return ``value`` as float, or raise ValueError if it is not a number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1); got {value!r}.{' ' + hint if hint else ''}")
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    """Return ``value``, or raise ValueError if it is not a bool."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False; got {value!r}.")
    return value


def check_choice(name: str, value: Any, choices: tuple) -> Any:
    """Return ``value``, or raise ValueError if it is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}.")
    return value


# Geometry

@dataclasses.dataclass(frozen=True)
class Extent:
    """Input pixels that one feature pixel depends on, along one axis.

    A feature map with ``jump`` input pixels per feature pixel; feature pixel ``i`` depends on
    input pixels ``jump * i + lo`` ... ``jump * i + hi`` (the bounds taken over all positions
    ``i``). Layers map an extent to the next one; all layers use Keras 'same' padding, so a
    stride-``s`` layer maps size ``n`` to ``n / s`` (or ``n * s`` when transposed).

    The rules are exact (they give the farthest dependence that some output pixel has) for
    chains in which every pooling comes before every upsampling, as in all builders here, and an
    upper bound otherwise.
    """

    lo: int = 0
    hi: int = 0
    jump: int = 1

    @property
    def radius(self) -> int:
        """Largest distance, in input pixels, between an output pixel and an input it depends on."""
        return max(-self.lo, self.hi)

    def conv(self, kernel_size: int) -> "Extent":
        """Stride-1 'same' convolution (TensorFlow puts the extra pad of an even kernel after)."""
        before = (kernel_size - 1) // 2
        return Extent(self.lo - before * self.jump, self.hi + (kernel_size - 1 - before) * self.jump, self.jump)

    def convs(self, kernel_size: int, count: int) -> "Extent":
        """``count`` stacked stride-1 'same' convolutions."""
        extent = self
        for _ in range(count):
            extent = extent.conv(kernel_size)
        return extent

    def pool(self, size: int = 2) -> "Extent":
        """Max-pooling of window and stride ``size``: pixel ``i`` reads ``size*i`` ... ``size*i + size-1``."""
        return Extent(self.lo, self.hi + (size - 1) * self.jump, self.jump * size)

    def transposed_conv(self, kernel_size: int, stride: int) -> "Extent":
        """Transposed 'same' convolution: the adjoint of a stride-``stride`` 'same' convolution.

        That convolution pads ``kernel_size - stride`` pixels, ``before = (kernel_size - stride) // 2``
        of them first, so output pixel ``o`` receives input pixel ``m`` when
        ``o + before - (kernel_size - 1) <= stride * m <= o + before``.
        """
        if self.jump % stride:
            raise ValueError(f"stride must divide the current jump {self.jump}; got {stride}.")
        jump = self.jump // stride
        before = max(kernel_size - stride, 0) // 2
        return Extent(self.lo - (kernel_size - 1 - before) * jump, self.hi + before * jump, jump)

    def upsample(self, size: int = 2) -> "Extent":
        """Nearest-neighbour upsampling: output pixel ``o`` copies input pixel ``o // size``."""
        if self.jump % size:
            raise ValueError(f"size must divide the current jump {self.jump}; got {size}.")
        jump = self.jump // size
        return Extent(self.lo - (size - 1) * jump, self.hi, jump)

    def union(self, other: "Extent") -> "Extent":
        """Extent of a concatenation or sum of two feature maps of the same jump."""
        if self.jump != other.jump:
            raise ValueError(f"jump must agree to merge two branches; got {self.jump} and {other.jump}.")
        return Extent(min(self.lo, other.lo), max(self.hi, other.hi), self.jump)


# Layers

def conv_bn_relu(filters: int, prefix: str, index: int, batch_norm: bool,
                 kernel_size: int = 3, bn_momentum: float = 0.99) -> Callable:
    """Conv ('same') -> optional batch-norm -> ReLU, layers named ``{prefix}_conv{index}`` etc.

    The convolution has no bias when batch-norm follows it (the norm's offset replaces it).
    ``bn_momentum``: weight of the old value in the moving mean and variance.
    """
    def apply(x):
        x = keras.layers.Conv2D(filters, kernel_size, padding="same", use_bias=not batch_norm,
                                kernel_initializer=KERNEL_INITIALIZER, name=f"{prefix}_conv{index}")(x)
        if batch_norm:
            x = FusedBatchNormalization(momentum=bn_momentum, name=f"{prefix}_bn{index}")(x)
        return keras.layers.ReLU(name=f"{prefix}_relu{index}")(x)
    return apply


def bn_relu_conv(filters: int, kernel_size: int, dropout: float, prefix: str, bn_momentum: float = 0.99
                 ) -> Callable:
    """Pre-activation unit of FC-DenseNet: BN -> ReLU -> conv ('same') -> dropout.

    Layers are named ``{prefix}_bn``, ``{prefix}_relu``, ``{prefix}_conv``, ``{prefix}_dropout``.
    """
    def apply(x):
        x = FusedBatchNormalization(momentum=bn_momentum, name=f"{prefix}_bn")(x)
        x = keras.layers.ReLU(name=f"{prefix}_relu")(x)
        x = keras.layers.Conv2D(filters, kernel_size, padding="same", kernel_initializer=KERNEL_INITIALIZER,
                                name=f"{prefix}_conv")(x)
        if dropout > 0:
            x = FastDropout(dropout, name=f"{prefix}_dropout")(x)
        return x
    return apply


def logits_dtype() -> str:
    """Dtype of the logits head: float32 under float16/bfloat16/float32 policies, float64 under float64."""
    return "float64" if keras.config.dtype_policy().compute_dtype == "float64" else "float32"


def logits_head(n_outputs: int) -> Callable:
    """Final 1x1 convolution ``head_logits``: linear, float32 even under a mixed-precision policy."""
    def apply(x):
        return keras.layers.Conv2D(n_outputs, 1, activation=None, dtype=logits_dtype(), name="head_logits")(x)
    return apply


def image_input(input_channels: int) -> keras.KerasTensor:
    """Input ``image`` of shape (batch, None, None, input_channels), channels-last."""
    return keras.Input(shape=(None, None, input_channels), name="image")


def bilinear_kernel(kernel_size: int, channels: int) -> np.ndarray:
    """Kernel of a transposed convolution that upsamples each channel bilinearly.

    Returns
    -------
    kernel : (kernel_size, kernel_size, channels, channels) float32
        Keras ``Conv2DTranspose`` layout (height, width, out, in); zero between channels.
    """
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    taps = 1.0 - np.abs(np.arange(kernel_size) - center) / factor
    kernel = np.zeros((kernel_size, kernel_size, channels, channels), dtype=np.float32)
    for channel in range(channels):
        kernel[:, :, channel, channel] = np.outer(taps, taps)
    return kernel
