"""The predictor: one model or an ensemble, with test-time augmentation, a compute precision and
the normalisation each member was trained with.

A *predictor* maps a batch of raw tiles ``(B, T_y, T_x, C)`` (the image's dtype, not
normalised) to maps ``(B, T_y, T_x, K)`` float32: the mean of its members' class probabilities
(semantic models) or channel maps (instance models: a sigmoid for "binary" channels (F, C, P,
T), a clip to [0, 1] for "distance" channels (Db)), optionally averaged over the 8 flips and
rotations by 90 degrees (test-time augmentation), computed in float32 or bfloat16
(:func:`with_precision`). Where the pixels come from and where the maps go is
:mod:`lib.inference.tiled`'s business.

Nothing here imports TensorFlow at import time; :func:`load_predictor` and
:func:`predictor_from_models` do.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..common.device import resolve_precision
from ..common.errors import BadInput
from ..common.normalization import DEFAULT_PERCENTILES, image_statistics
from ..export.keras_standard import TO_FAST, swap_layers
from ..export.savedmodel import computed_precision
from ..model_folder import ModelError, ModelInfo, check_members, find_models, load_model
from .intensity import dtype_decision
from .ownership import model_fingerprint
from .tta import apply_plan, channel_plan, transforms, tta_problem


class InputMismatch(BadInput, ValueError):
    """An image that does not fit the model (channels, dtype, layout)."""


# Precision


def _policy_name(layer_config: dict) -> str | None:
    dtype = layer_config.get("dtype")
    if isinstance(dtype, dict):
        return dtype.get("config", {}).get("name")
    return dtype if isinstance(dtype, str) else None


def _set_policies(config: dict, precision: str, keep: set[str]) -> bool:
    """Set the dtype policy of every layer in a functional ``config`` (nested models too), in place.

    Layers named in ``keep`` (the outputs) become float32 whatever ``precision``. Returns
    whether anything changed.
    """
    changed = False
    for layer in config.get("layers", []):
        inner = layer.get("config", {})
        if layer.get("class_name") == "InputLayer":
            continue
        if "layers" in inner:  # a nested functional model: its own outputs are not the model's
            changed |= _set_policies(inner, precision, set())
            continue
        if _policy_name(inner) in (None, "float64", "int32", "int64", "bool"):
            continue  # a layer without a float policy of its own, or a deliberate float64 one
        wanted = "float32" if precision == "float32" or inner.get("name") in keep else "mixed_bfloat16"
        if _policy_name(inner) != wanted:
            inner["dtype"] = {"module": "keras", "class_name": "DTypePolicy", "config": {"name": wanted},
                              "registered_name": None}
            changed = True
    return changed


def with_precision(model, precision: str, name: str = "<memory>"):
    """``model`` computing in ``precision`` (``"float32"`` or ``"bfloat16"``), with the same weights.

    bfloat16: every layer runs under Keras' ``mixed_bfloat16`` policy (float32 weights,
    bfloat16 arithmetic) except the layers producing the model's outputs (the linear logits
    head), which stay float32, and Keras' batch normalisation and dropout become the toolkit's
    (:mod:`lib.models.layers`: 1.8x faster in bfloat16 on a CPU); activations are then computed
    from float32 logits. float32:
    every layer float32 (a model trained under mixed precision and saved by older versions has
    bfloat16 layers and would otherwise predict in bfloat16). A model already in that precision
    is returned as is, and so is a SavedModel, which computes as it was exported (older toolkit
    versions exported mixed-precision models in bfloat16): :func:`predictor_from_models`
    records what it computes in (:func:`lib.export.savedmodel.computed_precision`). Raises :class:`ModelError` when the model cannot be rebuilt from its configuration
    (a SavedModel, a subclassed model) and would have to change precision.
    """
    import keras

    try:
        config = model.get_config()
        outputs = config["output_layers"]
    except (NotImplementedError, KeyError, TypeError, AttributeError):
        if precision in ("float32", computed_precision(model)):
            return model  # a SavedModel graph: it computes as it was exported (the predictor records which)
        raise ModelError(f"precision bfloat16 needs a functional Keras model (model.keras); got "
                         f"{type(model).__name__} from {name}. Use --precision float32 for a SavedModel") from None
    outputs = [outputs] if outputs and isinstance(outputs[0], str) else outputs
    if not _set_policies(config, precision, {entry[0] for entry in outputs}):
        return model
    if precision == "bfloat16":  # Keras' batch-norm upcasts bfloat16 to float32 and back: ours does not
        swap_layers(config, TO_FAST, float32=False)
    rebuilt = keras.Model.from_config(config)
    rebuilt.set_weights(model.get_weights())
    return rebuilt


# Predictor


@dataclasses.dataclass
class Member:
    """One model of a predictor: its metadata and a compiled ``forward(x) -> (sum p, sum p**2)``."""

    info: ModelInfo
    model: Any
    forward: Callable


def _make_forward(model, info: ModelInfo, tta: bool, squares: bool) -> Callable:
    """A tf.function ``(B, Ty, Tx, C) float32 -> (sum of maps, sum of their squares or None)``.

    The maps are the activations of the float32 logits: softmax over the classes for a
    semantic model; per channel for an instance model, sigmoid for "binary" channels and a
    clip to [0, 1] for "distance" channels. The sums run over the test-time augmentations (1
    or 8 samples). Dynamic shapes in the signature: tiles of any size and a short last batch do
    not retrace.
    """
    import tensorflow as tf

    binary = [kind in ("binary", "embedding") for kind in info.channel_kinds]  # through a sigmoid
    # instance channels that hold directions are turned back too (lib/inference/tta.py)
    plans = {t: channel_plan(info.channel_names, *t) for t in transforms()} \
        if tta and info.label_kind == "instance" else {}

    def probabilities(x):
        logits = model(x, training=False)
        if isinstance(logits, dict):  # a SavedModel endpoint returns its outputs by name
            logits = next(iter(logits.values()))
        logits = tf.cast(logits, tf.float32)
        if info.label_kind == "semantic":
            return tf.nn.softmax(logits, axis=-1)
        maps = tf.where(tf.constant(binary), tf.sigmoid(logits), tf.clip_by_value(logits, 0.0, 1.0))
        n_class = sum(kind == "class" for kind in info.channel_kinds)  # a class head: softmax over its planes
        if n_class:
            maps = tf.concat([maps[..., :-n_class], tf.nn.softmax(logits[..., -n_class:], axis=-1)], axis=-1)
        return maps

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, info.input_channels], tf.float32)])
    def forward(x):
        if not tta:
            p = probabilities(x)
            return p, (p * p if squares else tf.zeros([0]))
        total = square = None
        for k in range(4):
            for flip in (False, True):
                xt = tf.image.rot90(x, k)
                if flip:
                    xt = tf.reverse(xt, [2])
                p = probabilities(xt)
                if flip:
                    p = tf.reverse(p, [2])
                p = tf.image.rot90(p, (4 - k) % 4)
                if plans:
                    p = apply_plan(p, plans[(k, flip)])
                total = p if total is None else total + p
                if squares:
                    square = p * p if square is None else square + p * p
        return total, (square if squares else tf.zeros([0]))

    return forward


@dataclasses.dataclass
class Predictor:
    """One model or an ensemble, ready to predict batches of tiles.

    Attributes
    ----------
    members : list of Member
    tta : bool
        Average over the 8 flips / rotations by 90 degrees.
    source : str
        What was loaded (for the record).
    fingerprint : str or None
        SHA-256 of every member's model.json and model file (None for models built in memory):
        an output folder's results are reused only by a predictor of the same fingerprint.
    """

    members: list[Member]
    tta: bool = False
    source: str = "<memory>"
    precision: str = "float32"
    fingerprint: str | None = None

    @property
    def samples(self) -> int:
        """Probability maps averaged per pixel (members x augmentations)."""
        return len(self.members) * (8 if self.tta else 1)

    @property
    def number_classes(self) -> int:
        """Semantic classes (for an instance model: 2, background and object)."""
        return self.members[0].info.number_classes

    @property
    def label_kind(self) -> str:
        return self.members[0].info.label_kind

    @property
    def output_channels(self) -> int:
        """Channels K of the predicted maps: classes, or instance channels."""
        return self.members[0].info.output_channels

    @property
    def channel_names(self) -> tuple[str, ...]:
        """Instance channel names in output order (empty for a semantic model)."""
        return self.members[0].info.channel_names

    @property
    def channel_kinds(self) -> tuple[str, ...]:
        return self.members[0].info.channel_kinds

    @property
    def input_channels(self) -> int:
        return self.members[0].info.input_channels

    @property
    def input_dtype(self) -> str:
        return self.members[0].info.input_dtype

    @property
    def size_divisor(self) -> int:
        """Least common multiple of the members' divisors: tiles fit every member."""
        return math.lcm(*(m.info.size_divisor for m in self.members))

    @property
    def receptive_field_radius(self) -> int:
        return max(m.info.receptive_field_radius for m in self.members)

    @property
    def needs_image_statistics(self) -> bool:
        return any(m.info.normalization in ("tile", "percentile") for m in self.members)

    def image_statistics(self, image) -> tuple[np.ndarray, np.ndarray] | None:
        """The per-image statistics :func:`normalize` needs for the members' mode (None for "dataset")."""
        info = self.members[0].info
        percentiles = (info.meta.get("normalization") or {}).get("percentiles") or DEFAULT_PERCENTILES
        return image_statistics(image, info.normalization, percentiles)

    def check_image(self, shape: tuple[int, ...], dtype: str, name: str) -> None:
        """Raise :class:`InputMismatch` unless an image ``(H, W, C)`` of ``dtype`` fits the model."""
        channels = shape[-1]
        if channels != self.input_channels:
            raise InputMismatch(f"image channels must be {self.input_channels} (the model's input_channels); got "
                                f"{channels} in {name}. Convert the image to the layout the model was trained on")
        warning, error = dtype_decision(self.input_dtype, dtype, [m.info.normalization for m in self.members], name)
        if error:
            raise InputMismatch(error)
        if warning:
            print(f"warning: {warning}", flush=True)

    def predict_batch(self, tiles: np.ndarray, statistics: tuple[np.ndarray, np.ndarray] | None = None,
                      spread: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Mean probabilities of a batch of raw tiles.

        Parameters
        ----------
        tiles : (B, Ty, Tx, C) array in the image's dtype (not normalised)
        statistics : ((C,), (C,)) float64 mean and std of the whole image, for members with
            "tile" normalisation; or ((B, C), (B, C)), one pair per tile, when the tiles come
            from several images.
        spread : also return the per-pixel standard deviation over the samples.

        Returns
        -------
        probabilities : (B, Ty, Tx, K) float32
        spread : (B, Ty, Tx) float32 (the mean over classes of the standard deviation of the
            samples' probabilities), or None.
        """
        tiles = np.asarray(tiles)
        total = square = None
        for member in self.members:
            x = normalize(tiles, member.info, statistics)
            p, q = member.forward(x)
            p = np.asarray(p)
            total = p if total is None else total + p
            if spread:
                q = np.asarray(q)
                square = q if square is None else square + q
        mean = total / self.samples
        if not spread:
            return mean, None
        variance = np.maximum(square / self.samples - mean * mean, 0.0)
        return mean, np.sqrt(variance).mean(axis=-1).astype(np.float32)


def normalize(tiles: np.ndarray, info: ModelInfo, statistics: tuple[np.ndarray, np.ndarray] | None = None
              ) -> np.ndarray:
    """Normalise ``tiles`` (..., C) per channel as in training: float32 ``(x - offset) / scale``.

    "dataset" uses the model's mean and std; "tile" uses ``statistics`` = the image's own mean
    and std; "percentile" uses ``statistics`` = the image's own low and high percentiles (the
    model's ``normalization.percentiles``: :func:`lib.common.normalization.image_statistics`),
    offset low, scale high - low, not clipped. ``statistics`` are ``(C,)`` arrays, or ``(B, C)``
    arrays with one row per tile of ``tiles`` (B, ..., C). A zero scale divides by 1.
    """
    if info.normalization in ("tile", "percentile"):
        if statistics is None:
            raise ValueError(f"statistics must be given for a model with normalization mode {info.normalization!r}; "
                             "got None")
        offset, scale = (np.asarray(v, np.float64) for v in statistics)
        if offset.ndim == 2:  # one row per tile: broadcast over the tile's pixels
            shape = (offset.shape[0],) + (1,) * (tiles.ndim - 2) + (offset.shape[1],)
            offset, scale = offset.reshape(shape), scale.reshape(shape)
        if info.normalization == "percentile":  # (low, high): lib.common.normalization.percentile_offset_scale
            scale = scale - offset
    else:
        offset, scale = np.asarray(info.mean, np.float64), np.asarray(info.std, np.float64)
    # As lib.common.normalization.apply (the reader's arithmetic): a scale below 1e-6 divides by 1.
    inverse = np.where(scale < 1e-6, 1.0, 1.0 / np.maximum(scale, 1e-6)).astype(np.float32)
    out = np.subtract(tiles, np.asarray(offset, np.float32), dtype=np.float32)
    out *= inverse
    return out


def predictor_from_models(models: Sequence[tuple[Any, dict | ModelInfo]], tta: bool = False,
                          spread: bool | None = None, source: str = "<memory>", precision: str = "float32"
                          ) -> Predictor:
    """A predictor from in-memory Keras models and their model.json dicts.

    ``spread``: compile the sum of squared maps too (default: when samples > 1).
    ``precision``: "float32", "bfloat16" or "auto" (:func:`resolve_precision`, :func:`with_precision`).
    Raises :class:`ModelError` when the members disagree (:func:`check_members`).
    """
    infos = [m if isinstance(m, ModelInfo) else ModelInfo.from_dict(m) for _, m in models]
    check_members(infos)
    problem = tta_problem(infos[0].channel_names) if tta and infos[0].label_kind == "instance" else None
    if problem:
        raise ModelError(f"--tta cannot be used with {source}: {problem}. Predict without --tta")
    precision = resolve_precision(precision)
    samples = len(models) * (8 if tta else 1)
    squares = samples > 1 if spread is None else spread
    members = []
    for (model, _), info in zip(models, infos):
        model = with_precision(model, precision, info.path)
        members.append(Member(info, model, _make_forward(model, info, tta, squares)))
    computed = {computed_precision(member.model) for member in members}
    # The precision recorded is the one computed: a SavedModel exported in bfloat16 stays bfloat16.
    precision = next((p for p in ("bfloat16", "float16") if p in computed), precision)
    return Predictor(members, tta=tta, source=source, precision=precision)


def load_predictor(path: str | os.PathLike, tta: bool = False, precision: str = "float32") -> Predictor:
    """Load a model folder, an ensemble folder, a ``.keras`` file or a SavedModel (see :func:`find_models`).

    Models are loaded in Keras safe mode (no arbitrary code, no pickle) without compiling, and
    set to compute in ``precision`` (:func:`with_precision`). Raises :class:`ModelError`, naming the
    file, for a ``.keras`` file that is damaged or truncated (checked as a zip archive first).
    """
    found = find_models(path)
    for model_path, _ in found:
        check_keras_file(model_path)
    models = [(load_model(model_path), info) for model_path, info in found]
    for (model_path, info), (model, _) in zip(found, models):
        output_shape = getattr(model, "output_shape", None)
        expected = info.output_channels
        if isinstance(output_shape, tuple) and output_shape and output_shape[-1] not in (None, expected):
            what = "number_classes" if info.label_kind == "semantic" else "output_channels"
            raise ModelError(f"model outputs must have {what}={expected} channels (model.json); "
                             f"got {output_shape[-1]} in {model_path}")
    predictor = predictor_from_models(models, tta=tta, source=str(Path(path).resolve()), precision=precision)
    predictor.fingerprint = model_fingerprint([p for model_path, info in found for p in (info.path, model_path)])
    return predictor


def check_keras_file(model_path: Path) -> None:
    """Raise :class:`ModelError` when a ``.keras`` file (a zip archive) is cut short or damaged (CRCs checked)."""
    import zipfile
    import zlib

    if Path(model_path).is_dir():
        return  # a SavedModel folder
    with open(model_path, "rb") as handle:
        if handle.read(4) != b"PK\x03\x04":
            return  # not a zip at all: Keras says what it is (lib.model_folder.load_model)
    try:
        with zipfile.ZipFile(model_path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError) as exc:
        bad = f"{type(exc).__name__}: {exc}"
    else:
        bad = None if bad is None else f"member {bad} fails its CRC"
    if bad is not None:
        raise ModelError(f"model file must be a complete .keras archive; got a damaged or truncated file "
                         f"{model_path} ({bad}). Copy it again from where the training wrote it, or retrain")


def check_finite(image, path: Path) -> None:
    """:class:`InputMismatch` naming the file when a float image holds NaN or infinite pixels (their labels
    would be arbitrary); checked in bands of rows, so a memory-mapped image is never copied whole."""
    if not np.issubdtype(image.dtype, np.floating):
        return
    bad = sum(int(np.size(band) - np.count_nonzero(np.isfinite(band))) for band in
              (image[i:i + 1024] for i in range(0, len(image), 1024)))
    if bad:
        raise InputMismatch(f"image pixels must be finite numbers; got {bad} NaN or infinite pixel(s) in {path}. "
                            "Replace them (e.g. with the background value) and rerun")
