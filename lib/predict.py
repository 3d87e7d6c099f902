"""Model loading and exact tiled prediction (Majurski and Bajcsy, J. Res. NIST 126:126009, 2021).

An image of any size is cut into tiles: each tile is a *zone of responsibility* plus a *halo*
on every side. The image is extended by reflection (numpy's "reflect": mirror without repeating
the edge pixel) as far as tiles need; tiles start at multiples of the model's size divisor in the
coordinates of that extended image, so the pooling grids of every tile line up with those of the
whole image. Only each zone is kept. With a halo at least the receptive-field radius, an output
pixel sees exactly the pixels it sees in whole-image prediction (:func:`predict_whole`), and the
zero "same" padding at a tile's border is too far away to reach it: tiled output equals
whole-image output up to float rounding.

Axes: images ``(H, W, C)``, batches of tiles ``(B, T_y, T_x, C)``, probabilities ``(H, W, K)``.
A *predictor* is one model or an ensemble (the mean of its members' probabilities), optionally
with test-time augmentation over the 8 flips and rotations by 90 degrees.

Nothing here imports TensorFlow at import time; :func:`load_predictor` does.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

MODEL_FILE = "model.keras"
MODEL_JSON = "model.json"
# Pixels per batch of tiles when --batch_size is not given (float32 activations of a
# UNet-64 at this size stay within a few GB).
DEFAULT_BATCH_PIXELS = 2 ** 21
# Smallest default zone of responsibility, so that the halo costs at most about 4x.
DEFAULT_MIN_ZONE = 512


class ModelError(ValueError):
    """A model folder that cannot be used: missing files, a bad model.json, members that disagree."""


class InputMismatch(ValueError):
    """An image that does not fit the model (channels, dtype, layout)."""


# Model folders


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
    meta: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

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
        if kind != "semantic":
            problems.append(f"label_kind must be 'semantic' (the only kind inference.py predicts); got {kind!r}")
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
                   meta=meta)


def _read_model_json(path: Path) -> ModelInfo:
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
        found = [(path, _read_model_json(path.parent / MODEL_JSON))]
    elif (path / MODEL_FILE).is_file():
        found = [(path / MODEL_FILE, _read_model_json(path / MODEL_JSON))]
    elif (path / "saved_model.pb").is_file():
        beside = path / MODEL_JSON if (path / MODEL_JSON).is_file() else path.parent / MODEL_JSON
        found = [(path, _read_model_json(beside))]
    else:
        members = sorted(p for p in path.iterdir() if p.is_dir() and (p / MODEL_FILE).is_file())
        if not members:
            raise ModelError(f"model must be a folder holding {MODEL_FILE} and {MODEL_JSON}, or a folder of such "
                             f"folders (an ensemble); got {str(path)!r}, which holds neither. Pass the folder "
                             "given to train_unet.py as --output_dir")
        found = [(p / MODEL_FILE, _read_model_json(p / MODEL_JSON)) for p in members]
    first = found[0][1]
    for model_path, info in found[1:]:
        for key in ("number_classes", "input_channels"):
            if getattr(info, key) != getattr(first, key):
                raise ModelError(f"ensemble members must agree on {key}; got {getattr(first, key)} in "
                                 f"{found[0][0].parent} and {getattr(info, key)} in {model_path.parent}")
    return found


def _load_one(model_path: Path):
    import keras

    import lib.models  # noqa: F401  (registers the toolkit's layers before deserialising)

    if model_path.is_dir():
        # A TF SavedModel: a graph, no Python code is executed.
        layer = keras.layers.TFSMLayer(str(model_path), call_endpoint="serving_default")
        return layer
    try:
        return keras.models.load_model(model_path, safe_mode=True, compile=False)
    except Exception as exc:  # a damaged or foreign file: say which one
        raise ModelError(f"model must load with Keras in safe mode; got {type(exc).__name__}: {exc} in "
                         f"{model_path}") from None


# Predictor


@dataclasses.dataclass
class Member:
    """One model of a predictor: its metadata and a compiled ``forward(x) -> (sum p, sum p**2)``."""

    info: ModelInfo
    model: Any
    forward: Callable


def _make_forward(model, input_channels: int, tta: bool, squares: bool) -> Callable:
    """A tf.function ``(B, Ty, Tx, C) float32 -> (sum of probabilities, sum of their squares or None)``.

    The sums run over the test-time augmentations (1 or 8 samples). Dynamic shapes in the
    signature: tiles of any size and a short last batch do not retrace.
    """
    import tensorflow as tf

    def probabilities(x):
        logits = model(x, training=False)
        if isinstance(logits, dict):  # a SavedModel endpoint returns its outputs by name
            logits = next(iter(logits.values()))
        return tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, input_channels], tf.float32)])
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
    """

    members: list[Member]
    tta: bool = False
    source: str = "<memory>"

    @property
    def samples(self) -> int:
        """Probability maps averaged per pixel (members x augmentations)."""
        return len(self.members) * (8 if self.tta else 1)

    @property
    def number_classes(self) -> int:
        return self.members[0].info.number_classes

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
        return any(m.info.normalization == "tile" for m in self.members)

    def check_image(self, shape: tuple[int, ...], dtype: str, name: str) -> None:
        """Raise :class:`InputMismatch` unless an image ``(H, W, C)`` of ``dtype`` fits the model."""
        channels = shape[-1]
        if channels != self.input_channels:
            raise InputMismatch(f"image channels must be {self.input_channels} (the model's input_channels); got "
                                f"{channels} in {name}. Convert the image to the layout the model was trained on")
        expected = np.dtype(self.input_dtype)
        got = np.dtype(dtype)
        if got != expected and not (got.kind == "f" and expected.kind == "f"):
            raise InputMismatch(f"image dtype must be {expected.name} (the model's input_dtype; its normalisation "
                                f"statistics are in those units); got {got.name} in {name}. Convert the image")

    def predict_batch(self, tiles: np.ndarray, statistics: tuple[np.ndarray, np.ndarray] | None = None,
                      spread: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Mean probabilities of a batch of raw tiles.

        Parameters
        ----------
        tiles : (B, Ty, Tx, C) array in the image's dtype (not normalised)
        statistics : ((C,), (C,)) float64 mean and std of the whole image, for members with
            "tile" normalisation.
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
            p = p.numpy()
            total = p if total is None else total + p
            if spread:
                q = q.numpy()
                square = q if square is None else square + q
        mean = total / self.samples
        if not spread:
            return mean, None
        variance = np.maximum(square / self.samples - mean * mean, 0.0)
        return mean, np.sqrt(variance).mean(axis=-1).astype(np.float32)


def normalize(tiles: np.ndarray, info: ModelInfo, statistics: tuple[np.ndarray, np.ndarray] | None = None
              ) -> np.ndarray:
    """Z-score ``tiles`` (..., C) per channel as in training: float32 ``(x - mean) / std``.

    "dataset" uses the model's statistics; "tile" uses ``statistics`` (the image's own).
    A zero standard deviation divides by 1.
    """
    if info.normalization == "tile":
        if statistics is None:
            raise ValueError("statistics must be given for a model with normalization mode 'tile'; got None")
        mean, std = statistics
    else:
        mean, std = np.asarray(info.mean), np.asarray(info.std)
    std = np.where(np.asarray(std) > 0, std, 1.0)
    return ((tiles.astype(np.float32) - np.float32(mean)) / np.float32(std)).astype(np.float32)


def predictor_from_models(models: Sequence[tuple[Any, dict | ModelInfo]], tta: bool = False,
                          spread: bool | None = None, source: str = "<memory>") -> Predictor:
    """A predictor from in-memory Keras models and their model.json dicts.

    ``spread``: compile the sum of squared probabilities too (default: when samples > 1).
    """
    infos = [m if isinstance(m, ModelInfo) else ModelInfo.from_dict(m) for _, m in models]
    samples = len(models) * (8 if tta else 1)
    squares = samples > 1 if spread is None else spread
    members = [Member(info, model, _make_forward(model, info.input_channels, tta, squares))
               for (model, _), info in zip(models, infos)]
    return Predictor(members, tta=tta, source=source)


def load_predictor(path: str | os.PathLike, tta: bool = False) -> Predictor:
    """Load a model folder, an ensemble folder, a ``.keras`` file or a SavedModel (see :func:`find_models`).

    Models are loaded in Keras safe mode (no arbitrary code, no pickle) without compiling.
    Raises :class:`ModelError`.
    """
    found = find_models(path)
    models = [(_load_one(model_path), info) for model_path, info in found]
    for (model_path, info), (model, _) in zip(found, models):
        output_shape = getattr(model, "output_shape", None)
        if isinstance(output_shape, tuple) and output_shape and output_shape[-1] not in (None, info.number_classes):
            raise ModelError(f"model outputs must have number_classes={info.number_classes} channels (model.json); "
                             f"got {output_shape[-1]} in {model_path}")
    return predictor_from_models(models, tta=tta, source=str(Path(path).resolve()))


# Tiling


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class TilePlan:
    """Tiles covering an ``height x width`` image.

    Zone ``(i, j)`` covers rows ``[i * zone_height, min((i + 1) * zone_height, height))`` (and the
    same for columns); its tile is the ``tile_height x tile_width`` window of the reflected image
    starting ``halo`` pixels above and left of the zone. Tile sizes are multiples of ``divisor``.
    """

    height: int
    width: int
    tile_height: int
    tile_width: int
    zone_height: int
    zone_width: int
    halo: int
    divisor: int

    @property
    def grid(self) -> tuple[int, int]:
        return -(-self.height // self.zone_height), -(-self.width // self.zone_width)

    @property
    def n_tiles(self) -> int:
        rows, cols = self.grid
        return rows * cols

    def zones(self) -> list[tuple[int, int, int, int]]:
        """``(y0, y1, x0, x1)`` of every zone in row-major order."""
        rows, cols = self.grid
        return [(i * self.zone_height, min((i + 1) * self.zone_height, self.height),
                 j * self.zone_width, min((j + 1) * self.zone_width, self.width))
                for i in range(rows) for j in range(cols)]


def default_tile_size(halo: int, divisor: int) -> int:
    """Tile edge used when none is given: a zone of at least 512 px and at least twice the halo."""
    return _round_up(max(DEFAULT_MIN_ZONE, 2 * halo) + 2 * halo, divisor)


def _plan_axis(length: int, tile: int, halo: int, divisor: int) -> tuple[int, int]:
    """(tile, zone) along one axis; zones as equal as the divisor allows, tiles no larger than needed."""
    whole = _round_up(length + 2 * halo, divisor)
    if tile >= whole:
        return whole, length
    zone = (tile - 2 * halo) // divisor * divisor
    count = -(-length // zone)
    zone = _round_up(-(-length // count), divisor)  # same number of tiles, less padding in the last
    return _round_up(zone + 2 * halo, divisor), zone


def plan_tiles(height: int, width: int, divisor: int, halo: int, tile_size: int | None = None) -> TilePlan:
    """Plan the tiles of an image.

    Parameters
    ----------
    height, width : image size in pixels (any size >= 1).
    divisor : the model's size divisor; tile sizes and zone origins are multiples of it.
    halo : pixels of context on each side of a zone (the receptive-field radius for exact output).
    tile_size : largest tile edge, a multiple of ``divisor`` (default :func:`default_tile_size`).
        A smaller image gets one smaller tile per axis.

    Raises ``ValueError`` when ``tile_size`` is not a multiple of ``divisor`` or leaves no zone.
    """
    for name, value, minimum in (("height", height, 1), ("width", width, 1), ("divisor", divisor, 1),
                                 ("halo", halo, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    tile = default_tile_size(halo, divisor) if tile_size is None else tile_size
    if tile % divisor:
        raise ValueError(f"tile_size must be a multiple of the model's size divisor {divisor}; got {tile}. "
                         f"Use {tile // divisor * divisor or divisor} or {_round_up(tile, divisor)}")
    if tile < 2 * halo + divisor:
        raise ValueError(f"tile_size must be >= 2 * halo + divisor = {2 * halo + divisor} so that a zone "
                         f"remains; got {tile} (halo {halo}). Raise --tile_size or lower --halo")
    tile_height, zone_height = _plan_axis(height, tile, halo, divisor)
    tile_width, zone_width = _plan_axis(width, tile, halo, divisor)
    return TilePlan(height, width, tile_height, tile_width, zone_height, zone_width, halo, divisor)


def reflect_indices(indices: np.ndarray, length: int) -> np.ndarray:
    """Map any integer coordinates into ``[0, length)`` by repeated reflection (numpy's "reflect")."""
    indices = np.asarray(indices)
    if length == 1:
        return np.zeros_like(indices)
    period = 2 * (length - 1)
    folded = np.mod(indices, period)
    return np.where(folded < length, folded, period - folded)


def read_window(image, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Rows ``[y0, y1)`` and columns ``[x0, x1)`` of the reflection-extended ``image`` (H, W, C).

    ``image`` may be any array-like that slices (a numpy array, a memory map); only the
    in-bounds block the window needs is read from it.
    """
    height, width = image.shape[:2]
    rows = reflect_indices(np.arange(y0, y1), height)
    cols = reflect_indices(np.arange(x0, x1), width)
    r0, r1, c0, c1 = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
    block = np.asarray(image[r0:r1, c0:c1])
    if r0 == y0 and r1 == y1 and c0 == x0 and c1 == x1:
        return block
    return block[rows - r0][:, cols - c0]


def image_statistics(image, rows_per_chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation ``((C,), (C,))`` float64 of ``image`` (H, W, C), read by row chunks."""
    channels = image.shape[2]
    total = np.zeros(channels)
    square = np.zeros(channels)
    count = 0
    for y in range(0, image.shape[0], rows_per_chunk):
        block = np.asarray(image[y:y + rows_per_chunk], dtype=np.float64).reshape(-1, channels)
        total += block.sum(axis=0)
        square += (block * block).sum(axis=0)
        count += block.shape[0]
    mean = total / max(count, 1)
    return mean, np.sqrt(np.maximum(square / max(count, 1) - mean * mean, 0.0))


def default_batch_size(plan: TilePlan) -> int:
    """Tiles per batch when none is given: about 2 megapixels per batch, at most the tile count."""
    return int(max(1, min(plan.n_tiles, DEFAULT_BATCH_PIXELS // (plan.tile_height * plan.tile_width))))


@dataclasses.dataclass
class ZoneResult:
    """Prediction of one zone: ``box = (y0, y1, x0, x1)`` in image pixels.

    ``probabilities``: (y1 - y0, x1 - x0, K) float32; ``spread``: (y1 - y0, x1 - x0) float32 or None.
    """

    box: tuple[int, int, int, int]
    probabilities: np.ndarray
    spread: np.ndarray | None


def predict_zones(predictor: Predictor, image, plan: TilePlan, batch_size: int | None = None,
                  spread: bool = False, statistics: tuple[np.ndarray, np.ndarray] | None = None,
                  on_batch: Callable[[int], None] | None = None) -> Iterator[ZoneResult]:
    """Predict ``image`` (H, W, C) tile by tile, in batches; yield every zone in row-major order.

    ``statistics``: the image's (mean, std) for "tile"-normalised members (computed if None).
    ``on_batch(n)`` is called after each batch of ``n`` tiles (progress bars).
    Memory: one batch of tiles and its probabilities, whatever the image size.
    """
    if predictor.needs_image_statistics and statistics is None:
        statistics = image_statistics(image)
    batch_size = batch_size or default_batch_size(plan)
    zones = plan.zones()
    for start in range(0, len(zones), batch_size):
        chunk = zones[start:start + batch_size]
        tiles = np.stack([read_window(image, y0 - plan.halo, y0 - plan.halo + plan.tile_height,
                                      x0 - plan.halo, x0 - plan.halo + plan.tile_width)
                          for y0, _, x0, _ in chunk])
        probabilities, spreads = predictor.predict_batch(tiles, statistics, spread=spread)
        for index, (y0, y1, x0, x1) in enumerate(chunk):
            window = (slice(plan.halo, plan.halo + y1 - y0), slice(plan.halo, plan.halo + x1 - x0))
            yield ZoneResult((y0, y1, x0, x1), probabilities[index][window],
                             None if spreads is None else spreads[index][window])
        if on_batch is not None:
            on_batch(len(chunk))


def normalized_entropy(probabilities: np.ndarray) -> np.ndarray:
    """Entropy of ``probabilities`` (..., K) over the last axis divided by log K: (...) float32 in [0, 1]."""
    p = np.clip(probabilities, 1e-12, 1.0)
    return (-(probabilities * np.log(p)).sum(axis=-1) / np.log(probabilities.shape[-1])).astype(np.float32)


@dataclasses.dataclass
class Prediction:
    """Prediction of one 2D image of ``H x W`` pixels.

    labels : (H, W) smallest unsigned dtype holding ``number_classes - 1``
    probabilities : (H, W, K) float32, or None when not kept
    entropy : (H, W) float32 normalised entropy of the mean probabilities, or None when not kept
    spread : (H, W) float32 spread of the samples (ensemble/TTA), or None
    scores : per-image uncertainty scores (``mean_entropy``, ``uncertain_fraction``, ``mean_spread``)
    plan : the tiles used
    """

    labels: np.ndarray
    probabilities: np.ndarray | None
    entropy: np.ndarray | None
    spread: np.ndarray | None
    scores: dict[str, float]
    plan: TilePlan


# Above this normalised entropy a pixel counts as uncertain in the per-image score.
UNCERTAIN_ENTROPY = 0.5


def label_dtype(number_classes: int) -> np.dtype:
    from lib.images import smallest_uint

    return smallest_uint(number_classes - 1)


def predict_image(predictor: Predictor, image, tile_size: int | None = None, halo: int | None = None,
                  batch_size: int | None = None, keep_probabilities: bool = False,
                  keep_uncertainty: bool = False, on_batch: Callable[[int], None] | None = None) -> Prediction:
    """Exact tiled prediction of one image ``(H, W, C)`` held in memory (or memory-mapped).

    ``halo`` defaults to the predictor's receptive-field radius (tiled == whole-image);
    ``tile_size`` and ``batch_size`` default to :func:`default_tile_size` and
    :func:`default_batch_size`. Raises ``ValueError`` for a tile size that does not fit.
    """
    height, width = image.shape[:2]
    halo = predictor.receptive_field_radius if halo is None else halo
    plan = plan_tiles(height, width, predictor.size_divisor, halo, tile_size)
    classes = predictor.number_classes
    want_spread = predictor.samples > 1
    labels = np.empty((height, width), label_dtype(classes))
    probabilities = np.empty((height, width, classes), np.float32) if keep_probabilities else None
    entropy_map = np.empty((height, width), np.float32) if keep_uncertainty else None
    spread_map = np.empty((height, width), np.float32) if keep_uncertainty and want_spread else None
    entropy_sum = uncertain = spread_sum = 0.0
    for zone in predict_zones(predictor, image, plan, batch_size, spread=want_spread, on_batch=on_batch):
        y0, y1, x0, x1 = zone.box
        labels[y0:y1, x0:x1] = zone.probabilities.argmax(axis=-1)
        entropy = normalized_entropy(zone.probabilities)
        entropy_sum += float(entropy.sum(dtype=np.float64))
        uncertain += float((entropy > UNCERTAIN_ENTROPY).sum())
        if probabilities is not None:
            probabilities[y0:y1, x0:x1] = zone.probabilities
        if entropy_map is not None:
            entropy_map[y0:y1, x0:x1] = entropy
        if zone.spread is not None:
            spread_sum += float(zone.spread.sum(dtype=np.float64))
            if spread_map is not None:
                spread_map[y0:y1, x0:x1] = zone.spread
    pixels = float(height * width)
    scores = {"mean_entropy": entropy_sum / pixels, "uncertain_fraction": uncertain / pixels,
              "mean_spread": spread_sum / pixels if want_spread else float("nan")}
    return Prediction(labels, probabilities, entropy_map, spread_map, scores, plan)


def predict_whole(predictor: Predictor, image: np.ndarray, halo: int | None = None) -> np.ndarray:
    """Reference: the whole image in one model call. Returns probabilities (H, W, K) float32.

    The image is extended by reflection by ``halo`` (default the receptive-field radius) on
    every side and up to a multiple of the divisor at the bottom and right, exactly as the
    tiles of :func:`predict_image` see it.
    """
    height, width = image.shape[:2]
    halo = predictor.receptive_field_radius if halo is None else halo
    divisor = predictor.size_divisor
    padded = read_window(image, -halo, _round_up(height + 2 * halo, divisor) - halo,
                         -halo, _round_up(width + 2 * halo, divisor) - halo)
    statistics = image_statistics(image) if predictor.needs_image_statistics else None
    probabilities, _ = predictor.predict_batch(padded[np.newaxis], statistics)
    return probabilities[0, halo:halo + height, halo:halo + width]
