"""Segmentation models: a registry of Keras 3 functional builders.

Every model takes ``image`` (B, H, W, C) float, channels-last, with H and W any multiples of the
model's size divisor, and returns per-pixel logits (B, H, W, K) float32 from a linear layer
named ``head_logits`` (no activation, no batch-norm on the logits; float32 even under a
mixed-precision policy).

    >>> model = build_model("unet", input_channels=1, n_outputs=2, base_filters=8, depth=2)
    >>> model_geometry("unet", depth=2)
    (4, 23)

========================  =======  ======  ==================================================
architecture              divisor  radius  reference
========================  =======  ======  ==================================================
unet                      16       107     Ronneberger et al. 2015 (NIST defaults)
fc-densenet56             32       439     Jegou et al. 2017
fc-densenet67             32       533     Jegou et al. 2017
fc-densenet103            32       1171    Jegou et al. 2017
fcn32                     32       233     Long et al. 2015
fcn16                     32       241     Long et al. 2015
fcn8                      32       245     Long et al. 2015
========================  =======  ======  ==================================================

(defaults; :func:`model_geometry` computes them from the options.)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import keras

from .blocks import check_int
from .fc_densenet import build_fc_densenet, fc_densenet_defaults, fc_densenet_geometry
from .fcn import build_fcn, fcn_defaults, fcn_geometry, load_vgg16_weights
from .unet import build_unet, unet_defaults, unet_geometry

__all__ = ["ARCHITECTURES", "Architecture", "build_model", "check_input_size", "default_options",
           "load_vgg16_weights", "model_geometry", "resolve_options"]


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One registry entry: calling it builds the model, like :func:`build_model`.

    Attributes
    ----------
    name : str
        Registry key, e.g. ``"fc-densenet56"``.
    builder : callable
        ``builder(input_channels, n_outputs, **options) -> keras.Model``.
    geometry : callable
        ``geometry(**options) -> (divisor, radius)``.
    defaults : callable
        ``defaults() -> dict`` of every accepted option and its default.
    """

    name: str
    builder: Callable[..., keras.Model]
    geometry: Callable[..., tuple[int, int]]
    defaults: Callable[[], dict]

    def __call__(self, input_channels: int, n_outputs: int, **options: Any) -> keras.Model:
        return build_model(self.name, input_channels, n_outputs, **options)


def _fc_densenet(variant: str) -> Architecture:
    return Architecture(f"fc-densenet{variant}",
                        functools.partial(build_fc_densenet, name=f"fc_densenet{variant}"),
                        fc_densenet_geometry, functools.partial(fc_densenet_defaults, variant))


def _fcn(variant: int) -> Architecture:
    return Architecture(f"fcn{variant}", functools.partial(build_fcn, variant=variant),
                        functools.partial(fcn_geometry, variant), fcn_defaults)


ARCHITECTURES: dict[str, Architecture] = {
    "unet": Architecture("unet", build_unet, unet_geometry, unet_defaults),
    "fc-densenet56": _fc_densenet("56"),
    "fc-densenet67": _fc_densenet("67"),
    "fc-densenet103": _fc_densenet("103"),
    "fcn8": _fcn(8),
    "fcn16": _fcn(16),
    "fcn32": _fcn(32),
}


def _entry(architecture: str) -> Architecture:
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {', '.join(ARCHITECTURES)}; got {architecture!r}.")
    return ARCHITECTURES[architecture]


def default_options(architecture: str) -> dict:
    """Every option ``architecture`` accepts, with its default (a fresh dict).

    Raises
    ------
    ValueError
        If ``architecture`` is not in :data:`ARCHITECTURES`.
    """
    return _entry(architecture).defaults()


def resolve_options(architecture: str, **options: Any) -> dict:
    """The defaults of ``architecture`` updated with ``options``: the full config to record.

    Raises
    ------
    ValueError
        If ``architecture`` is unknown, or an option is not one it accepts (the message lists them).
    """
    resolved = default_options(architecture)
    unknown = sorted(set(options) - set(resolved))
    if unknown:
        raise ValueError(f"options of {architecture} must be among {', '.join(sorted(resolved))}; "
                         f"got {', '.join(repr(k) for k in unknown)}.")
    resolved.update(options)
    return resolved


def build_model(architecture: str, input_channels: int, n_outputs: int, **options: Any) -> keras.Model:
    """Build ``architecture`` for images of ``input_channels`` channels and ``n_outputs`` logit channels.

    Parameters
    ----------
    architecture : str
        A key of :data:`ARCHITECTURES`.
    input_channels : int
        Channels C of the input images.
    n_outputs : int
        Channels K of the logits (classes, or instance target channels).
    **options
        Options of the architecture; :func:`default_options` lists them.

    Returns
    -------
    keras.Model
        ``image`` (B, H, W, C) -> logits (B, H, W, K) float32, H and W multiples of the divisor.

    Raises
    ------
    ValueError
        Unknown architecture or option, or an option out of range.
    """
    entry = _entry(architecture)
    return entry.builder(input_channels, n_outputs, **resolve_options(architecture, **options))


def model_geometry(architecture: str, **options: Any) -> tuple[int, int]:
    """Size divisor and receptive-field radius of ``architecture`` with ``options``, computed analytically.

    Returns
    -------
    (divisor, radius) : (int, int)
        Height and width must be multiples of ``divisor``. An output pixel depends only on input
        pixels at most ``radius`` pixels away along each axis (and somewhere on the image one does
        depend on a pixel that far): a tile needs a halo of ``radius`` pixels, and tiles must start
        at multiples of ``divisor`` so that pooling grids line up, for tiled prediction to equal
        whole-image prediction.

    Raises
    ------
    ValueError
        As :func:`build_model`.
    """
    entry = _entry(architecture)
    return entry.geometry(**resolve_options(architecture, **options))


def check_input_size(architecture: str, height: int, width: int, **options: Any) -> None:
    """Raise ValueError unless an image of ``height`` x ``width`` pixels fits ``architecture``.

    The models accept any size that is a positive multiple of their divisor. With another size,
    U-Net, FC-DenseNet and FCN-16s/8s fail inside Keras with a shape error at a concatenation or a
    sum, and FCN-32s returns logits smaller than the input: check first.

    Raises
    ------
    ValueError
        If ``height`` or ``width`` is not a positive multiple of the divisor (the message gives the
        nearest sizes that fit), or as :func:`build_model`.
    """
    divisor, _ = model_geometry(architecture, **options)
    for name, size in (("height", height), ("width", width)):
        check_int(name, size)
        if size % divisor:
            below, above = size // divisor * divisor, (size // divisor + 1) * divisor
            raise ValueError(f"{name} must be a multiple of {divisor} for {architecture} with these options; "
                             f"got {size}. Pad to {above}" + (f" or crop to {below}" if below else "")
                             + " pixels (tiled prediction pads by itself).")
