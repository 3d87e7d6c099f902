"""The model-folder contract: file names, the ``model.json`` schema, reading and writing them.

A model folder (written by ``train_unet.py`` / ``train_fcn.py``, given to ``inference.py``)::

    model.keras          best model (lowest test loss)
    model.json           architecture, classes or instance channels, input channels and dtype,
                         normalisation, receptive field and divisor, training settings and data
                         provenance, best metrics, post-processing, run state (versioned schema)
    saved_model/         TF SavedModel export of the best model
    train_config.json    the resolved settings (a rerun with the same ones resumes)
    checkpoint/          last state (weights, optimizer, step, sampler epoch) for resuming
    checkpoint.previous/ the one before it, used when checkpoint/ is damaged
    log.csv, charts.png, tensorboard/   the training record (written by lib/training/outputs.py)

This module is the one place that knows those names, reads and writes ``model.json`` (its
``format_version`` is checked on every read: a newer one is refused, an older one upgraded by
:func:`upgrade_model_json`), saves the model, exports it and writes the checkpoint. Training
writes through it and inference reads through it.

Run state: ``model.json`` says whether the run that wrote it is ``running``, was
``interrupted`` (``stopped_because`` a signal or max_minutes: rerun to resume), ``failed``
(non_finite_loss, non_finite_input), or ``finished`` (max_steps, early_stopping), so a killed
run's folder is told apart from a finished one by the file, not guessed.

Checkpoints: ``checkpoint/`` is the newest, ``checkpoint.previous/`` the one it replaced.
:func:`load_checkpoint` falls back to the previous one when a file of the newest is damaged,
and otherwise names the damaged files and what to remove to start over.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import __version__
from .common.errors import BadInput
from .common.files import write_json, write_with
from .common.normalization import MODES as NORMALIZATION_MODES
from .common.normalization import percentile_problems
from .export.keras_standard import save_standard, standard_model
from .export.package_reader import extract_package
from .export.savedmodel import write_savedmodel

# File names of a model folder
MODEL_FILE = "model.keras"
MODEL_JSON = "model.json"
SAVED_MODEL = "saved_model"
TRAIN_CONFIG = "train_config.json"
CHECKPOINT = "checkpoint"
CHECKPOINT_PREVIOUS = "checkpoint.previous"
LOG_CSV = "log.csv"
CHARTS = "charts.png"
TENSORBOARD = "tensorboard"
# In a k-fold output folder: ENSEMBLE/<member>/ model folders and the table comparing them.
ENSEMBLE = "ensemble"
FOLDS_CSV = "folds.csv"
# Inside checkpoint/
CHECKPOINT_WEIGHTS = "model.weights.h5"
CHECKPOINT_OPTIMIZER = "optimizer.npz"
CHECKPOINT_STATE = "state.json"

# Version 1: no run state. Version 2: run_state and stopped_because.
MODEL_JSON_VERSION = 2
RUN_STATES = ("running", "interrupted", "failed", "finished")


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
    run_state: str = "finished"
    stopped_because: str | None = None
    meta: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @property
    def output_channels(self) -> int:
        """Channels of the model's logits: classes (semantic) or instance target channels."""
        return len(self.channel_names) if self.label_kind == "instance" else self.number_classes

    @classmethod
    def from_dict(cls, meta: dict, path: str = "<memory>") -> "ModelInfo":
        """Validate a model.json dict (upgraded first when older); raise :class:`ModelError` listing every problem."""
        meta = upgrade_model_json(meta, path)
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
        run_state = need("run_state", lambda v: v in RUN_STATES, f"be one of {', '.join(RUN_STATES)}")
        stopped = meta.get("stopped_because")
        if stopped is not None and not isinstance(stopped, str):
            problems.append(f"stopped_because must be a string or null; got {stopped!r}")
        norm = need("normalization", lambda v: isinstance(v, dict), "be an object {mode, mean, std}") or {}
        mode = norm.get("mode", "dataset")
        mean, std = norm.get("mean"), norm.get("std")
        if mode not in NORMALIZATION_MODES:
            problems.append(f"normalization.mode must be one of {', '.join(NORMALIZATION_MODES)}; got {mode!r}")
        elif mode == "percentile":
            problems.extend(f"normalization.{p}" for p in percentile_problems(norm.get("percentiles")))
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
                   label_kind=kind, channel_names=names, channel_kinds=kinds, run_state=run_state,
                   stopped_because=stopped, meta=meta)


LABEL_KINDS = ("semantic", "instance")


CHANNEL_KINDS = ("binary", "distance", "ray", "embedding", "class")  # lib.reader.targets.channel_kind


def probability_planes(names, kinds) -> list[bool]:
    """Which instance planes are probabilities (worth an entropy, a preview, a threshold at 0.5): the
    binary ones and the embeddings' seediness ``Eseed`` (the other embedding planes are offsets and
    bandwidths through a sigmoid)."""
    return [kind == "binary" or name == "Eseed" for name, kind in zip(names, kinds)]


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


# Schema versions


def upgrade_model_json(meta: dict, path: str | os.PathLike = "<memory>") -> dict:
    """``meta`` in the current schema (:data:`MODEL_JSON_VERSION`): a copy, upgraded step by step.

    A file without ``format_version`` is version 1. Version 1 -> 2 adds the run state: such a
    file was written by a toolkit that did not record it, so it reads as ``finished`` with
    ``stopped_because`` ``"unknown"``. Raises :class:`ModelError` for a newer or a malformed
    version.
    """
    version = meta.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ModelError(f"format_version must be an integer >= 1; got {version!r} in {path}")
    if version > MODEL_JSON_VERSION:
        raise ModelError(f"format_version must be at most {MODEL_JSON_VERSION} (the newest this toolkit reads); got "
                         f"{version} in {path}. It was written by a newer version of the toolkit: update it")
    if version == MODEL_JSON_VERSION:
        return meta
    meta = copy.deepcopy(meta)
    if version == 1:
        meta.setdefault("run_state", "finished")
        meta.setdefault("stopped_because", "unknown")
    meta["format_version"] = MODEL_JSON_VERSION
    return meta


# Reading


def read_model_meta(path: str | os.PathLike) -> dict:
    """The ``model.json`` dict at ``path`` in the current schema (not validated beyond its version)."""
    path = Path(path)
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"model.json must exist beside the model; got none at {path}. Every model folder "
                         "written by train_unet.py holds one") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"model.json must be readable JSON; got {type(exc).__name__}: {exc} in {path}") from None
    if not isinstance(meta, dict):
        raise ModelError(f"model.json must hold a JSON object; got {type(meta).__name__} in {path}")
    return upgrade_model_json(meta, path)


def read_model_json(path: str | os.PathLike) -> ModelInfo:
    """The validated :class:`ModelInfo` of the ``model.json`` at ``path``; raises :class:`ModelError`."""
    return ModelInfo.from_dict(read_model_meta(path), str(path))


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
    if path.is_file() and path.suffix == ".zip":
        model_file, meta_file = extract_package(path)  # a bioimage.io package written by export_model.py
        found = [(model_file, read_model_json(meta_file))]
    elif path.is_file():
        if path.suffix != ".keras":
            raise ModelError(f"model file must be a .keras file or a bioimage.io package (.zip) exported by "
                             f"export_model.py; got {str(path)!r}. Pass the model folder")
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
        if _per_image_normalization(info) != _per_image_normalization(first):
            raise ModelError(f"ensemble members must agree on their per-image normalisation (mode and percentiles: "
                             f"each image's statistics are computed once for all members); got "
                             f"{_per_image_normalization(first)} in {names[0]} and {_per_image_normalization(info)} "
                             f"in {name}. Ensemble models trained with the same --normalization")


def _per_image_normalization(info: ModelInfo) -> str:
    """'dataset' (each member uses its own training statistics), or the per-image mode with its percentiles."""
    if info.normalization == "percentile":
        percentiles = (info.meta.get("normalization") or {}).get("percentiles") or (1.0, 99.8)
        return f"percentile {float(percentiles[0]):g}-{float(percentiles[1]):g}"
    return info.normalization


def load_model(model_path: Path):
    """The model at ``model_path``: a ``.keras`` file loaded in safe mode (no Python code from the
    file runs; the toolkit's layers registered first), or a SavedModel folder as a ``TFSMLayer``.

    A ``.keras`` file with Keras' own batch normalisation and dropout (how :func:`save_model`
    writes it) loads with them: in float32 they are as fast as the toolkit's; a predictor in
    bfloat16 swaps the toolkit's back in (:func:`lib.inference.predictor.with_precision`). One
    written by older versions holds the toolkit's layers. Raises :class:`ModelError` naming
    the file when it does not load.
    """
    import keras

    from . import models  # noqa: F401  (registers the toolkit's layers before deserialising)

    if model_path.is_dir():
        # A TF SavedModel: a graph, no Python code is executed.
        layer = keras.layers.TFSMLayer(str(model_path), call_endpoint="serving_default")
        return layer
    try:
        model = keras.models.load_model(model_path, safe_mode=True, compile=False)
    except Exception as exc:  # a damaged or foreign file: say which one
        raise ModelError(f"model must load with Keras in safe mode; got {type(exc).__name__}: {exc} in "
                         f"{model_path}") from None
    return model


# Writing (training)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_model_json(folder: str | os.PathLike, description: dict, run_state: str = "running",
                     stopped_because: str | None = None) -> Path:
    """Write ``folder/model.json`` from a model ``description`` (architecture, classes, channels, ...).

    The schema fields (``format_version``, run state, ``created``, ``toolkit_version``) are
    added here, and the result is validated as a reader would (:meth:`ModelInfo.from_dict`)
    before it is written, so no folder holds a model.json that inference refuses. Atomic.
    """
    meta = {**description, "format_version": MODEL_JSON_VERSION, "run_state": run_state,
            "stopped_because": stopped_because, "created": _now(), "toolkit_version": __version__}
    path = Path(folder) / MODEL_JSON
    ModelInfo.from_dict(meta, str(path))
    return write_json(path, meta)


def update_model_json(folder: str | os.PathLike, change: Callable[[dict], None]) -> dict:
    """Read ``folder/model.json``, let ``change`` edit the dict in place, validate, write it back; return it."""
    path = Path(folder) / MODEL_JSON
    meta = read_model_meta(path)
    change(meta)
    ModelInfo.from_dict(meta, str(path))
    write_json(path, meta)
    return meta


def set_run_state(folder: str | os.PathLike, run_state: str, stopped_because: str | None = None) -> bool:
    """Record the run state in ``folder/model.json`` if it exists (no best model yet: nothing to mark).

    Returns whether a file was updated.
    """
    if run_state not in RUN_STATES:
        raise ValueError(f"run_state must be one of {', '.join(RUN_STATES)}; got {run_state!r}")
    if not (Path(folder) / MODEL_JSON).is_file():
        return False

    def change(meta: dict) -> None:
        meta["run_state"] = run_state
        meta["stopped_because"] = stopped_because
        meta["updated"] = _now()

    update_model_json(folder, change)
    return True


def save_model(folder: str | os.PathLike, model) -> Path:
    """Save a Keras model as ``folder/model.keras``, atomically, with Keras' own layers in float32.

    The toolkit's speed layers are swapped for ``BatchNormalization`` / ``Dropout`` (same weights
    and statistics) and every layer computes in float32, so the file loads with
    ``keras.saving.load_model`` alone (:func:`lib.export.keras_standard.standard_model`).
    """
    return write_with(Path(folder) / MODEL_FILE, lambda tmp: save_standard(model, tmp))


def read_train_config(folder: str | os.PathLike) -> dict | None:
    """The settings a run recorded in ``folder/train_config.json``, None when there are none.

    Raises :class:`CheckpointError` naming the file when it is not a JSON object.
    """
    path = Path(folder) / TRAIN_CONFIG
    if not path.exists():
        return None
    try:
        settings = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        settings = exc
    if not isinstance(settings, dict):
        got = f"{type(settings).__name__}: {settings}" if isinstance(settings, Exception) else type(settings).__name__
        raise CheckpointError(f"{TRAIN_CONFIG} must be a JSON object of settings; got {got} in {path}. It is "
                              f"damaged: remove it (and {CHECKPOINT}/, {CHECKPOINT_PREVIOUS}/ beside it) to start "
                              "this run over, or choose another --output_dir")
    return settings


def write_train_config(folder: str | os.PathLike, settings: dict) -> Path:
    return write_json(Path(folder) / TRAIN_CONFIG, settings)


def export_saved_model(folder: str | os.PathLike, log: Callable[[str], None] = print) -> bool:
    """Export ``folder/model.keras`` as a TF SavedModel in ``folder/saved_model/``; return whether it worked.

    The graph has Keras' own layers and computes in float32 whatever precision the model was
    trained in (:func:`lib.export.keras_standard.standard_model`); its endpoints return
    ``{"logits": ...}`` (:func:`lib.export.savedmodel.write_savedmodel`). The export is a folder: it is written beside under a temporary name, then swapped in.
    A failure is reported through ``log`` (model.keras stays the reference).
    """
    import keras

    folder = Path(folder)
    from . import models  # noqa: F401  (an older model.keras holds the toolkit's layers)

    model = standard_model(keras.models.load_model(folder / MODEL_FILE, safe_mode=True, compile=False))
    tmp = folder / f".{SAVED_MODEL}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_savedmodel(model, tmp)
    except Exception as exc:  # the Keras model stays the reference; say why the export is missing
        shutil.rmtree(tmp, ignore_errors=True)
        log(f"warning: SavedModel export failed ({type(exc).__name__}: {exc}); {MODEL_FILE} is complete")
        return False
    _swap_folder(tmp, folder / SAVED_MODEL)
    return True


# Checkpoint: part of the folder contract, since rerunning the same command resumes from it.


class CheckpointError(BadInput, ValueError):
    """A checkpoint (or train_config.json) that is damaged or does not fit the model being resumed."""


def _swap_folder(tmp: Path, final: Path) -> None:
    """Put the finished folder ``tmp`` in place of ``final`` (the old one kept aside until the swap is done)."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(folder: str | os.PathLike, model, optimizer, state: dict) -> Path:
    """Write weights, optimizer variables and ``state`` to ``folder/checkpoint/``.

    Each file is written atomically into a temporary folder, which is then swapped in
    whole; the checkpoint it replaces becomes ``checkpoint.previous/`` (the fallback of
    :func:`load_checkpoint` when the newest one is damaged). A run killed at any moment
    leaves the previous checkpoint or the new one.
    """
    folder = Path(folder)
    final = folder / CHECKPOINT
    previous = folder / CHECKPOINT_PREVIOUS
    tmp = final.with_name(f".{CHECKPOINT}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # Keras names the format by the suffix: the temporary file must end in .weights.h5 too.
    write_with(tmp / CHECKPOINT_WEIGHTS, lambda path: model.save_weights(path), suffix=".weights.h5")
    variables = {f"v{i:05d}": np.asarray(v.numpy()) for i, v in enumerate(optimizer.variables)}
    write_with(tmp / CHECKPOINT_OPTIMIZER, lambda path: np.savez(path, **variables))
    write_json(tmp / CHECKPOINT_STATE, state)
    if final.exists():
        _swap_folder(final, previous)
    _swap_folder(tmp, final)
    return final


class _Mismatch(CheckpointError):
    """A whole checkpoint of another model (not damaged: falling back would not help)."""


def _checkpoints(folder: str | os.PathLike) -> list[Path]:
    """The checkpoint folders of a model folder, newest first (those that exist)."""
    folder = Path(folder)
    return [p for p in (folder / CHECKPOINT, folder / CHECKPOINT_PREVIOUS) if p.is_dir()]


def _damaged(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path.name} must be {what}; got a damaged file {path}")


def _read_state(checkpoint: Path) -> dict:
    """The state.json of one checkpoint folder; raises :class:`CheckpointError` naming the file."""
    path = checkpoint / CHECKPOINT_STATE
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _damaged(path, f"readable JSON ({type(exc).__name__}: {exc})") from None
    step = state.get("step") if isinstance(state, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise _damaged(path, "a JSON object with the step reached")
    return state


def checkpoint_state(folder: str | os.PathLike) -> dict | None:
    """The state saved with the newest checkpoint in ``folder`` whose state.json reads; None when there is none.

    Raises :class:`CheckpointError` when checkpoints exist but none has a readable state
    (the message names the files and how to start over).
    """
    problems = []
    for checkpoint in _checkpoints(folder):
        try:
            return _read_state(checkpoint)
        except CheckpointError as exc:
            problems.append(str(exc))
    if problems:
        raise _unusable(folder, problems)
    return None


def _unusable(folder: str | os.PathLike, problems: list[str]) -> CheckpointError:
    folder = Path(folder)
    return CheckpointError(f"a checkpoint in {folder} must be whole to resume; none is:\n"
                           + "\n".join(f"  - {p}" for p in problems)
                           + f"\nRemove {folder / CHECKPOINT} and {folder / CHECKPOINT_PREVIOUS} to start this run "
                           "over from step 0 (its log and best model are replaced as it trains), or choose another "
                           "--output_dir")


def _load_one(checkpoint: Path, model, optimizer) -> dict:
    """Restore one checkpoint folder; raise :class:`CheckpointError` naming the file that does not load."""
    import zipfile

    state = _read_state(checkpoint)
    weights = checkpoint / CHECKPOINT_WEIGHTS
    path = checkpoint / CHECKPOINT_OPTIMIZER
    try:
        with np.load(path, allow_pickle=False) as data:
            values = [data[k] for k in sorted(data.files)]
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise _damaged(path, f"the optimizer variables saved by numpy ({type(exc).__name__}: {exc})") from None
    if len(values) != len(optimizer.variables):
        raise _Mismatch(f"checkpoint in {checkpoint} has {len(values)} optimizer variables, the model needs "
                              f"{len(optimizer.variables)}; it belongs to a different model")
    for variable, value in zip(optimizer.variables, values):
        if tuple(variable.shape) != value.shape:
            raise _Mismatch(f"checkpoint in {checkpoint} has an optimizer variable of shape {value.shape} where "
                                  f"the model needs {tuple(variable.shape)}; it belongs to a different model")
    try:
        model.load_weights(weights)
    except Exception as exc:  # h5py and Keras raise many types for a truncated or foreign file
        raise _damaged(weights, f"the model weights saved by Keras ({type(exc).__name__}: {exc})") from None
    for variable, value in zip(optimizer.variables, values):
        variable.assign(value)
    return state


def load_checkpoint(folder: str | os.PathLike, model, optimizer,
                    log: Callable[[str], None] | None = None) -> dict:
    """Restore weights and optimizer variables from ``folder/checkpoint/``; return its state.

    When a file of it is damaged, ``checkpoint.previous/`` is restored instead and ``log``
    says so. Raises :class:`CheckpointError` (naming each damaged file and what to remove to
    start over) when no checkpoint restores, or when the optimizer variables do not fit the model.
    """
    problems = []
    for checkpoint in _checkpoints(folder):
        try:
            state = _load_one(checkpoint, model, optimizer)
        except CheckpointError as exc:
            if isinstance(exc, _Mismatch):
                raise
            problems.append(str(exc))
            continue
        if problems and log is not None:
            log(f"warning: {problems[0]}; fell back to the previous checkpoint {checkpoint} (step {state['step']})")
        return state
    if not problems:
        problems.append(f"{CHECKPOINT}/ must exist to resume; got none in {folder}")
    raise _unusable(folder, problems)
