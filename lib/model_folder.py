"""The model-folder contract: file names, ``model.json``, and loading a model safely.

A model folder (written by ``train_unet.py`` / ``train_fcn.py``) holds ``model.keras``,
``saved_model/`` and ``model.json``. This module is the one place that knows those names and
the ``model.json`` schema; training writes through it and inference reads through it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from .common.errors import BadInput

MODEL_FILE = "model.keras"


MODEL_JSON = "model.json"


class ModelError(BadInput, ValueError):
    """A model folder that cannot be used: missing files, a bad model.json, members that disagree."""


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What inference needs from a ``model.json`` (the trainer's contract).

    ``mean`` and ``std`` have one value per input channel; ``normalization`` is "dataset"
    (use ``mean``/``std``) or "tile" (each image with its own statistics).
    """

    path: str
    architecture: str
    number_classes: int
    input_channels: int
    input_dtype: str
    normalization: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    size_divisor: int
    receptive_field_radius: int
    label_kind: str = "semantic"
    channel_names: tuple[str, ...] = ()
    channel_kinds: tuple[str, ...] = ()
    meta: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @property
    def output_channels(self) -> int:
        """Channels of the model's logits: classes (semantic) or instance target channels."""
        return len(self.channel_names) if self.label_kind == "instance" else self.number_classes

    @classmethod
    def from_dict(cls, meta: dict, path: str = "<memory>") -> "ModelInfo":
        """Validate a model.json dict; raise :class:`ModelError` listing every problem."""
        problems = []

        def need(key: str, check: Callable[[Any], bool], rule: str) -> Any:
            value = meta.get(key)
            if key not in meta or not check(value):
                problems.append(f"{key} must {rule}; got {value!r}")
                return None
            return value

        def is_int(minimum: int) -> Callable[[Any], bool]:
            return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= minimum

        kind = meta.get("label_kind", "semantic")
        names: tuple[str, ...] = ()
        kinds: tuple[str, ...] = ()
        if kind not in LABEL_KINDS:
            problems.append(f"label_kind must be one of {', '.join(LABEL_KINDS)}; got {kind!r}")
        elif kind == "instance":
            names, kinds = _instance_channels(meta, problems)
        architecture = need("architecture", lambda v: isinstance(v, str), "be a string")
        classes = need("number_classes", is_int(2), "be an integer >= 2")
        channels = need("input_channels", is_int(1), "be an integer >= 1")
        dtype = need("input_dtype", lambda v: isinstance(v, str), "be a dtype name")
        divisor = need("size_divisor", is_int(1), "be an integer >= 1")
        radius = need("receptive_field_radius", is_int(0), "be an integer >= 0")
        norm = need("normalization", lambda v: isinstance(v, dict), "be an object {mode, mean, std}") or {}
        mode = norm.get("mode", "dataset")
        mean, std = norm.get("mean"), norm.get("std")
        if mode not in ("dataset", "tile"):
            problems.append(f"normalization.mode must be 'dataset' or 'tile'; got {mode!r}")
        for name, values in (("mean", mean), ("std", std)):
            if not isinstance(values, list) or (channels and len(values) != channels) or not all(
                    isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                problems.append(f"normalization.{name} must be a list of {channels} finite numbers (one per "
                                f"channel); got {values!r}")
        if problems:
            raise ModelError(f"{path} is not a usable model.json:\n" + "\n".join(f"  - {p}" for p in problems)
                             + "\nIt is written by train_unet.py / train_fcn.py; retrain or fix the file.")
        return cls(path=path, architecture=architecture, number_classes=classes, input_channels=channels,
                   input_dtype=dtype, normalization=mode, mean=tuple(float(v) for v in mean),
                   std=tuple(float(v) for v in std), size_divisor=divisor, receptive_field_radius=radius,
                   label_kind=kind, channel_names=names, channel_kinds=kinds, meta=meta)


LABEL_KINDS = ("semantic", "instance")


CHANNEL_KINDS = ("binary", "distance")


def _instance_channels(meta: dict, problems: list[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Validate the ``instance`` block of an instance model's model.json; append problems; return (names, kinds)."""
    block = meta.get("instance")
    if not isinstance(block, dict):
        problems.append(f"instance must be an object {{channels, kinds, targets, postprocess}} for label_kind "
                        f"'instance'; got {block!r}")
        return (), ()
    names, kinds = block.get("channels"), block.get("kinds")
    if not (isinstance(names, list) and names and all(isinstance(n, str) and n for n in names)
            and len(set(names)) == len(names)):
        problems.append(f"instance.channels must be a non-empty list of distinct channel names; got {names!r}")
        names = None
    if not (isinstance(kinds, list) and all(k in CHANNEL_KINDS for k in kinds)):
        problems.append(f"instance.kinds must be a list of {' or '.join(CHANNEL_KINDS)}, one per channel; got "
                        f"{kinds!r}")
        kinds = None
    if names is not None and kinds is not None and len(kinds) != len(names):
        problems.append(f"instance.kinds must have one entry per channel ({len(names)}: {', '.join(names)}); got "
                        f"{len(kinds)}")
        kinds = None
    output = meta.get("output_channels")
    if names is not None and output != len(names):
        problems.append(f"output_channels must equal the number of instance.channels ({len(names)}); got {output!r}")
    for key in ("targets", "postprocess"):
        if key in block and not isinstance(block[key], dict):
            problems.append(f"instance.{key} must be an object; got {block[key]!r}")
    if names is None or kinds is None:
        return (), ()
    return tuple(names), tuple(kinds)


def read_model_json(path: Path) -> ModelInfo:
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"model.json must exist beside the model; got none at {path}. Every model folder "
                         "written by train_unet.py holds one") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"model.json must be readable JSON; got {type(exc).__name__}: {exc} in {path}") from None
    if not isinstance(meta, dict):
        raise ModelError(f"model.json must hold a JSON object; got {type(meta).__name__} in {path}")
    return ModelInfo.from_dict(meta, str(path))


def find_models(path: str | os.PathLike) -> list[tuple[Path, ModelInfo]]:
    """Resolve ``path`` to model files and their metadata, without loading any model.

    ``path`` may be a model folder (``model.keras`` + ``model.json``), a folder whose
    sub-folders are model folders (an ensemble, e.g. k-fold output), a ``.keras`` file with
    ``model.json`` beside it, or a SavedModel directory (``saved_model.pb``) with ``model.json``
    beside it or in its parent folder.

    Returns ``[(model_path, info), ...]`` sorted by path (one entry for a single model).
    Raises :class:`ModelError` when nothing usable is found or ensemble members disagree.
    """
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model must be an existing model folder, ensemble folder or .keras file; got {str(path)!r} "
                         "(not found)")
    if path.is_file():
        if path.suffix != ".keras":
            raise ModelError(f"model file must be a .keras file; got {str(path)!r}. Pass the model folder")
        found = [(path, read_model_json(path.parent / MODEL_JSON))]
    elif (path / MODEL_FILE).is_file():
        found = [(path / MODEL_FILE, read_model_json(path / MODEL_JSON))]
    elif (path / "saved_model.pb").is_file():
        beside = path / MODEL_JSON if (path / MODEL_JSON).is_file() else path.parent / MODEL_JSON
        found = [(path, read_model_json(beside))]
    else:
        members = sorted(p for p in path.iterdir() if p.is_dir() and (p / MODEL_FILE).is_file())
        if not members:
            raise ModelError(f"model must be a folder holding {MODEL_FILE} and {MODEL_JSON}, or a folder of such "
                             f"folders (an ensemble); got {str(path)!r}, which holds neither. Pass the folder "
                             "given to train_unet.py as --output_dir")
        found = [(p / MODEL_FILE, read_model_json(p / MODEL_JSON)) for p in members]
    check_members([info for _, info in found], [str(p.parent) for p, _ in found])
    return found


def check_members(infos: Sequence[ModelInfo], names: Sequence[str] | None = None) -> None:
    """Raise :class:`ModelError` unless ensemble members agree on what they predict.

    They must share the label kind, the number of classes and input channels, and, for
    instance models, the list of output channels and their kinds (their maps are averaged).
    """
    names = list(names) if names is not None else [info.path for info in infos]
    first = infos[0]
    for info, name in zip(infos[1:], names[1:]):
        if info.label_kind != first.label_kind:
            raise ModelError(f"ensemble members must all be semantic or all instance models; got "
                             f"{first.label_kind} in {names[0]} and {info.label_kind} in {name}")
        for key in ("number_classes", "input_channels", "channel_names", "channel_kinds"):
            if getattr(info, key) != getattr(first, key):
                shown = {k: (",".join(v) if isinstance(v, tuple) else v) for k, v in
                         ((0, getattr(first, key)), (1, getattr(info, key)))}
                raise ModelError(f"ensemble members must agree on {key}; got {shown[0]} in {names[0]} and "
                                 f"{shown[1]} in {name}. Their outputs are averaged channel by channel")


def load_model(model_path: Path):
    import keras

    from . import models  # noqa: F401  (registers the toolkit's layers before deserialising)

    if model_path.is_dir():
        # A TF SavedModel: a graph, no Python code is executed.
        layer = keras.layers.TFSMLayer(str(model_path), call_endpoint="serving_default")
        return layer
    try:
        return keras.models.load_model(model_path, safe_mode=True, compile=False)
    except Exception as exc:  # a damaged or foreign file: say which one
        raise ModelError(f"model must load with Keras in safe mode; got {type(exc).__name__}: {exc} in "
                         f"{model_path}") from None

