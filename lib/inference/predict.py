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
with test-time augmentation over the 8 flips and rotations by 90 degrees, computing in float32
or bfloat16 (:func:`with_precision`).

Instance models (``label_kind: "instance"`` in model.json) predict channel maps instead of
class probabilities: a sigmoid for "binary" channels (F, C, P, T), a clip to [0, 1] for
"distance" channels (Db). Tiling, ensembles and TTA treat them like probabilities; instance
labels come from :func:`segment_instances`, always on the stitched maps of the whole image
(an object crossing a tile border stays one object).

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

from ..common.device import PRECISIONS, resolve_precision
from ..model_folder import ModelError, ModelInfo, check_members, find_models, load_model

# Pixels per batch of tiles when --batch_size is not given: measured on FC-DenseNet56, batches of
# one 704-px tile are as fast as batches of four and use a third of the memory (5.7 -> 1.9 GiB).
DEFAULT_BATCH_PIXELS = 2 ** 20
# Smallest default zone of responsibility. Per pixel of tile, FC-DenseNet56 runs as fast on
# 896-px tiles as on 704-px ones (measured), so larger zones only cut the work spent on halos:
# on 2048 x 2048 with a 96-px halo, 9 tiles of 896 px (7.2 Mpixel) instead of 16 of 704 (7.9).
DEFAULT_MIN_ZONE = 768
STREAM_MIN_ZONE = 512  # zones of images streamed to tiled BigTIFF (predict_to_tiff)
BFLOAT16_TILE_AREA = 1.3  # default tile area in bfloat16 relative to float32 (default_tile_pixels)


class InputMismatch(ValueError):
    """An image that does not fit the model (channels, dtype, layout)."""


# Model folders


# Output channel kinds of instance models and their activation: binary -> sigmoid, distance -> clip to [0, 1].


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
    head), which stay float32; activations are then computed from float32 logits. float32:
    every layer float32 (a model trained under mixed precision is saved with bfloat16 layers
    and would otherwise predict in bfloat16). A model already in that precision is returned
    as is. Raises :class:`ModelError` when the model cannot be rebuilt from its configuration
    (a SavedModel, a subclassed model) and would have to change precision.
    """
    import keras

    try:
        config = model.get_config()
        outputs = config["output_layers"]
    except (NotImplementedError, KeyError, TypeError, AttributeError):
        if precision == "float32":
            return model  # a SavedModel graph: it computes as it was exported
        raise ModelError(f"precision bfloat16 needs a functional Keras model (model.keras); got "
                         f"{type(model).__name__} from {name}. Use --precision float32 for a SavedModel") from None
    outputs = [outputs] if outputs and isinstance(outputs[0], str) else outputs
    if not _set_policies(config, precision, {entry[0] for entry in outputs}):
        return model
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

    binary = [kind == "binary" for kind in info.channel_kinds]

    def probabilities(x):
        logits = model(x, training=False)
        if isinstance(logits, dict):  # a SavedModel endpoint returns its outputs by name
            logits = next(iter(logits.values()))
        logits = tf.cast(logits, tf.float32)
        if info.label_kind == "semantic":
            return tf.nn.softmax(logits, axis=-1)
        return tf.where(tf.constant(binary), tf.sigmoid(logits), tf.clip_by_value(logits, 0.0, 1.0))

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
    precision: str = "float32"

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
                          spread: bool | None = None, source: str = "<memory>", precision: str = "float32"
                          ) -> Predictor:
    """A predictor from in-memory Keras models and their model.json dicts.

    ``spread``: compile the sum of squared maps too (default: when samples > 1).
    ``precision``: "float32", "bfloat16" or "auto" (:func:`resolve_precision`, :func:`with_precision`).
    Raises :class:`ModelError` when the members disagree (:func:`check_members`).
    """
    infos = [m if isinstance(m, ModelInfo) else ModelInfo.from_dict(m) for _, m in models]
    check_members(infos)
    precision = resolve_precision(precision)
    samples = len(models) * (8 if tta else 1)
    squares = samples > 1 if spread is None else spread
    members = []
    for (model, _), info in zip(models, infos):
        model = with_precision(model, precision, info.path)
        members.append(Member(info, model, _make_forward(model, info, tta, squares)))
    return Predictor(members, tta=tta, source=source, precision=precision)


def load_predictor(path: str | os.PathLike, tta: bool = False, precision: str = "float32") -> Predictor:
    """Load a model folder, an ensemble folder, a ``.keras`` file or a SavedModel (see :func:`find_models`).

    Models are loaded in Keras safe mode (no arbitrary code, no pickle) without compiling, and
    set to compute in ``precision`` (:func:`with_precision`). Raises :class:`ModelError`.
    """
    found = find_models(path)
    models = [(load_model(model_path), info) for model_path, info in found]
    for (model_path, info), (model, _) in zip(found, models):
        output_shape = getattr(model, "output_shape", None)
        expected = info.output_channels
        if isinstance(output_shape, tuple) and output_shape and output_shape[-1] not in (None, expected):
            what = "number_classes" if info.label_kind == "semantic" else "output_channels"
            raise ModelError(f"model outputs must have {what}={expected} channels (model.json); "
                             f"got {output_shape[-1]} in {model_path}")
    return predictor_from_models(models, tta=tta, source=str(Path(path).resolve()), precision=precision)


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


def default_tile_size(halo: int, divisor: int, min_zone: int | None = None) -> int:
    """Tile edge used when none is given: a zone of at least ``min_zone`` (default ``DEFAULT_MIN_ZONE``) px
    and at least twice the halo."""
    min_zone = DEFAULT_MIN_ZONE if min_zone is None else min_zone
    return _round_up(max(min_zone, 2 * halo) + 2 * halo, divisor)


def _plan_axis(length: int, tile: int, halo: int, divisor: int) -> tuple[int, int]:
    """(tile, zone) along one axis; zones as equal as the divisor allows, tiles no larger than needed."""
    whole = _round_up(length + 2 * halo, divisor)
    if tile >= whole:
        return whole, length
    zone = (tile - 2 * halo) // divisor * divisor
    count = -(-length // zone)
    zone = _round_up(-(-length // count), divisor)  # same number of tiles, less padding in the last
    return _round_up(zone + 2 * halo, divisor), zone


def default_tile_pixels(halo: int, divisor: int, precision: str = "float32") -> int:
    """Largest tile area (pixels) of a default plan: a default square tile's area, 1.3x that in bfloat16.

    The tile's activations are what cost the memory. FC-DenseNet56 (measured, 2048 x 2048,
    halo 96): resident memory grows by 3.3 GiB per tile megapixel in float32 and 2.3 GiB in
    bfloat16, so a bfloat16 tile 1.3x larger still costs less than the float32 one.
    """
    area = default_tile_size(halo, divisor) ** 2
    return int(area * BFLOAT16_TILE_AREA) if precision == "bfloat16" else area


def _budget_plan(height: int, width: int, divisor: int, halo: int, max_pixels: int) -> tuple[int, int, int, int]:
    """(tile_height, tile_width, zone_height, zone_width) computing the fewest pixels with tiles of at most
    ``max_pixels`` pixels (then the fewest tiles). Rectangular tiles fit a grid to the image: 2048 x 2048
    with a 96-px halo in tiles of at most 1.2 Mpixel is 2 x 3 tiles of 1216 x 896 (6.5 Mpixel computed)
    where squares of 896 need 3 x 3 (7.2 Mpixel)."""
    smallest = _round_up(2 * halo + divisor, divisor)
    top = max(smallest, min(_round_up(height + 2 * halo, divisor), max_pixels // smallest // divisor * divisor))
    best: tuple | None = None
    seen: set[tuple[int, int]] = set()
    for candidate in range(smallest, top + 1, divisor):
        tile_height, zone_height = _plan_axis(height, candidate, halo, divisor)
        if (tile_height, zone_height) in seen:
            continue
        seen.add((tile_height, zone_height))
        allowed = max(smallest, max_pixels // tile_height // divisor * divisor)
        tile_width, zone_width = _plan_axis(width, allowed, halo, divisor)
        if tile_height * tile_width > max_pixels and best is not None:
            continue
        tiles = -(-height // zone_height) * -(-width // zone_width)
        key = (tile_height * tile_width > max_pixels, tiles * tile_height * tile_width, tiles)
        if best is None or key < best[0]:
            best = (key, tile_height, tile_width, zone_height, zone_width)
    assert best is not None
    return best[1:]


def plan_tiles(height: int, width: int, divisor: int, halo: int, tile_size: int | None = None,
               max_tile_pixels: int | None = None) -> TilePlan:
    """Plan the tiles of an image.

    Parameters
    ----------
    height, width : image size in pixels (any size >= 1).
    divisor : the model's size divisor; tile sizes and zone origins are multiples of it.
    halo : pixels of context on each side of a zone (the receptive-field radius for exact output).
    tile_size : largest tile edge, a multiple of ``divisor``: square tiles, as equal zones as the
        divisor allows. A smaller image gets one smaller tile per axis.
    max_tile_pixels : when ``tile_size`` is None, the largest tile area; tiles may then be
        rectangular, chosen to compute the fewest pixels (default: the area of
        :func:`default_tile_size`, see :func:`default_tile_pixels`).

    Raises ``ValueError`` when ``tile_size`` is not a multiple of ``divisor`` or leaves no zone.
    """
    for name, value, minimum in (("height", height, 1), ("width", width, 1), ("divisor", divisor, 1),
                                 ("halo", halo, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    if tile_size is None:
        budget = default_tile_pixels(halo, divisor) if max_tile_pixels is None else int(max_tile_pixels)
        tile_height, tile_width, zone_height, zone_width = _budget_plan(height, width, divisor, halo, budget)
        return TilePlan(height, width, tile_height, tile_width, zone_height, zone_width, halo, divisor)
    tile = tile_size
    if tile % divisor:
        raise ValueError(f"tile_size must be a multiple of the model's size divisor {divisor}; got {tile}. "
                         f"Use {tile // divisor * divisor or divisor} or {_round_up(tile, divisor)}")
    if tile < 2 * halo + divisor:
        raise ValueError(f"tile_size must be >= 2 * halo + divisor = {2 * halo + divisor} so that a zone "
                         f"remains; got {tile} (halo {halo}). Raise --tile_size or lower --halo")
    tile_height, zone_height = _plan_axis(height, tile, halo, divisor)
    tile_width, zone_width = _plan_axis(width, tile, halo, divisor)
    return TilePlan(height, width, tile_height, tile_width, zone_height, zone_width, halo, divisor)


def plan_for(predictor: "Predictor", height: int, width: int, halo: int, tile_size: int | None = None) -> TilePlan:
    """The tile plan of ``predictor`` on an image: ``tile_size`` squares, or by default rectangular
    tiles within :func:`default_tile_pixels` for the predictor's precision."""
    budget = default_tile_pixels(halo, predictor.size_divisor, predictor.precision)
    return plan_tiles(height, width, predictor.size_divisor, halo, tile_size, budget)


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
    """Tiles per batch when none is given: about 1 megapixel per batch, at most the tile count."""
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


def binary_entropy(maps: np.ndarray, binary: Sequence[bool]) -> np.ndarray:
    """Mean over the ``binary`` channels of ``maps`` (..., K) of their entropy in bits: (...) float32 in [0, 1].

    The uncertainty of an instance model's sigmoid channels (distance channels carry none);
    zeros when no channel is binary.
    """
    chosen = np.flatnonzero(np.asarray(binary, bool))
    if not chosen.size:
        return np.zeros(maps.shape[:-1], np.float32)
    p = np.clip(maps[..., chosen], 1e-12, 1 - 1e-7)
    bits = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    return bits.mean(axis=-1).astype(np.float32)


def pixel_uncertainty(predictor: Predictor, maps: np.ndarray) -> np.ndarray:
    """Per-pixel uncertainty in [0, 1] of a predictor's maps (..., K): :func:`normalized_entropy` of the
    class probabilities (semantic) or :func:`binary_entropy` of the binary channels (instance)."""
    if predictor.label_kind == "semantic":
        return normalized_entropy(maps)
    return binary_entropy(maps, [kind == "binary" for kind in predictor.channel_kinds])


@dataclasses.dataclass
class Prediction:
    """Prediction of one 2D image of ``H x W`` pixels.

    labels : (H, W) smallest unsigned dtype holding ``number_classes - 1``; None for an
        instance model (its labels come from :func:`segment_instances` on the maps)
    probabilities : (H, W, K) float32 (class probabilities, or an instance model's channel
        maps: always kept), or None when not kept
    entropy : (H, W) float32 uncertainty (:func:`pixel_uncertainty`), or None when not kept
    spread : (H, W) float32 spread of the samples (ensemble/TTA), or None
    scores : per-image uncertainty scores (``mean_entropy``, ``uncertain_fraction``, ``mean_spread``)
    plan : the tiles used
    """

    labels: np.ndarray | None
    probabilities: np.ndarray | None
    entropy: np.ndarray | None
    spread: np.ndarray | None
    scores: dict[str, float]
    plan: TilePlan


# Above this normalised entropy a pixel counts as uncertain in the per-image score.
UNCERTAIN_ENTROPY = 0.5


def label_dtype(number_classes: int) -> np.dtype:
    from ..store.images import smallest_uint

    return smallest_uint(number_classes - 1)


def predict_image(predictor: Predictor, image, tile_size: int | None = None, halo: int | None = None,
                  batch_size: int | None = None, keep_probabilities: bool = False,
                  keep_uncertainty: bool = False, on_batch: Callable[[int], None] | None = None) -> Prediction:
    """Exact tiled prediction of one image ``(H, W, C)`` held in memory (or memory-mapped).

    ``halo`` defaults to the predictor's receptive-field radius (tiled == whole-image);
    ``tile_size`` and ``batch_size`` default to :func:`default_tile_size` and
    :func:`default_batch_size`. For an instance model the maps are always kept and
    ``labels`` is None. Raises ``ValueError`` for a tile size that does not fit.
    """
    height, width = image.shape[:2]
    halo = predictor.receptive_field_radius if halo is None else halo
    plan = plan_for(predictor, height, width, halo, tile_size)
    semantic = predictor.label_kind == "semantic"
    channels = predictor.output_channels
    want_spread = predictor.samples > 1
    labels = np.empty((height, width), label_dtype(predictor.number_classes)) if semantic else None
    keep_probabilities = keep_probabilities or not semantic
    probabilities = np.empty((height, width, channels), np.float32) if keep_probabilities else None
    entropy_map = np.empty((height, width), np.float32) if keep_uncertainty else None
    spread_map = np.empty((height, width), np.float32) if keep_uncertainty and want_spread else None
    entropy_sum = uncertain = spread_sum = 0.0
    for zone in predict_zones(predictor, image, plan, batch_size, spread=want_spread, on_batch=on_batch):
        y0, y1, x0, x1 = zone.box
        if labels is not None:
            labels[y0:y1, x0:x1] = zone.probabilities.argmax(axis=-1)
        entropy = pixel_uncertainty(predictor, zone.probabilities)
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
    """Reference: the whole image in one model call. Returns probabilities (or instance maps) (H, W, K) float32.

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


# Images of any size: streaming to tiled BigTIFF

# Images above this many pixels are predicted zone row by zone row into tiled BigTIFFs.
STREAM_PIXELS = 2 ** 26
TIFF_TILE = 256


class _TiledTiffSink:
    """A tiled (Big)TIFF written by a thread from tiles put in row-major order; renamed into place on close."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype, tile: int | None = None):
        import queue
        import tempfile
        import threading

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{self.path.stem}.", suffix=".partial.tif", dir=self.path.parent)
        os.close(fd)
        self.queue: queue.Queue = queue.Queue(maxsize=16)
        self.error: BaseException | None = None
        self.shape, self.dtype, self.tile = shape, np.dtype(dtype), tile or TIFF_TILE
        self.thread = threading.Thread(target=self._write, daemon=True)
        self.thread.start()

    def _write(self) -> None:
        import tifffile

        try:
            tifffile.imwrite(self.tmp, data=self._tiles(), shape=self.shape, dtype=self.dtype,
                             tile=(self.tile, self.tile), bigtiff=True, compression="zlib",
                             photometric="minisblack", planarconfig="contig" if len(self.shape) == 3 else None)
        except BaseException as exc:  # reported to the producer by put/close
            self.error = exc
            while self.queue.get() is not None:  # drain so that the producer never blocks
                pass

    def _tiles(self) -> Iterator[np.ndarray]:
        while (tile := self.queue.get()) is not None:
            yield tile

    def put(self, tile: np.ndarray | None) -> None:
        if self.error is not None:
            raise OSError(f"cannot write {self.path}: {self.error}")
        self.queue.put(tile)

    def close(self, ok: bool) -> None:
        if self.thread.is_alive():
            self.queue.put(None)
        self.thread.join()
        if ok and self.error is None:
            os.replace(self.tmp, self.path)
            return
        Path(self.tmp).unlink(missing_ok=True)
        if ok:
            raise OSError(f"cannot write {self.path}: {self.error}")


class _RowTiler:
    """Collects full-width row strips and hands complete rows of TIFF tiles to a sink."""

    def __init__(self, sink: _TiledTiffSink, width: int):
        self.sink, self.width, self.rows = sink, width, []

    def feed(self, strip: np.ndarray, last: bool = False) -> None:
        self.rows.append(strip)
        buffered = np.concatenate(self.rows) if len(self.rows) > 1 else self.rows[0]
        tile = self.sink.tile
        full = buffered.shape[0] // tile * tile
        if last:
            full = buffered.shape[0]
        for y in range(0, full, tile):
            for x in range(0, self.width, tile):
                self.sink.put(buffered[y:y + tile, x:x + tile])
        self.rows = [buffered[full:]] if full < buffered.shape[0] else []


def _mapping_of(array):
    """The ``mmap.mmap`` behind a numpy memory map (or a view of one), else None."""
    import mmap

    base = array
    for _ in range(8):
        mapped = getattr(base, "_mmap", None)
        if isinstance(mapped, mmap.mmap):
            return mapped
        if isinstance(base, mmap.mmap):
            return base
        base = getattr(base, "base", None)
        if base is None:
            return None
    return None


def release_rows(image, stop: int) -> bool:
    """Drop the resident pages of rows ``[0, stop)`` of a memory-mapped, C-contiguous ``image``.

    Reading a memory-mapped image window by window leaves every page read resident (counted in
    the process's memory) until the map closes; rows already predicted are never read again,
    so their pages are released (``madvise(MADV_DONTNEED)``: a read-only file mapping rereads
    them from the file if touched). Returns False where this does not apply (not a map, not
    contiguous, no ``madvise``).
    """
    import mmap

    mapped = _mapping_of(image)
    if mapped is None or stop <= 0 or not getattr(image, "flags", None) or not image.flags.c_contiguous \
            or not hasattr(mapped, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return False
    try:
        start_address = np.frombuffer(mapped, dtype=np.uint8).ctypes.data
    except (TypeError, ValueError):
        return False
    row_bytes = image.strides[0]
    end = image.ctypes.data - start_address + min(stop, image.shape[0]) * row_bytes
    end = end // mmap.PAGESIZE * mmap.PAGESIZE
    if end <= 0:
        return False
    try:
        mapped.madvise(mmap.MADV_DONTNEED, 0, end)
    except (OSError, ValueError):
        return False
    return True


def predict_to_tiff(predictor: Predictor, image, labels_path: Path, tile_size: int | None = None,
                    halo: int | None = None, batch_size: int | None = None,
                    probabilities_path: Path | None = None, entropy_path: Path | None = None,
                    spread_path: Path | None = None, mask: np.ndarray | None = None,
                    on_batch: Callable[[int], None] | None = None, overview_step: int = 1
                    ) -> tuple[dict[str, float], TilePlan, np.ndarray | None, np.ndarray]:
    """Exact tiled prediction of an image of any size ``(H, W, C)`` streamed to tiled BigTIFFs.

    Memory holds one batch of tiles and one row of zones of the outputs, whatever the image
    size; ``image`` should be memory-mapped for bounded memory. Outputs: labels (H, W) in the
    smallest dtype, optional probabilities (H, W, K) float32, entropy and spread (H, W) float32,
    zlib-compressed 256x256 tiles, each written atomically.

    ``mask`` (H, W): also return the confusion matrix ``(K, K)``. Returns ``(scores, plan,
    confusion matrix or None, labels[::overview_step, ::overview_step])``.
    """
    from ..scoring.metrics import confusion_matrix

    if predictor.label_kind != "semantic":
        raise ValueError("predictor must be a semantic model to stream labels; got an instance model (use "
                         "predict_maps_to_memmap, then segment_instances)")
    height, width = image.shape[:2]
    halo = predictor.receptive_field_radius if halo is None else halo
    if tile_size is None:
        # Streaming holds a whole row of zones of every output: smaller zones keep the peak low
        # (16384x16384, small UNet: 1.96 GiB with 512-px zones, 2.14 GiB with 768).
        tile_size = default_tile_size(halo, predictor.size_divisor, STREAM_MIN_ZONE)
    plan = plan_tiles(height, width, predictor.size_divisor, halo, tile_size)
    classes = predictor.number_classes
    want_spread = predictor.samples > 1
    dtype = label_dtype(classes)
    sinks = {"labels": _TiledTiffSink(labels_path, (height, width), dtype)}
    if probabilities_path is not None:
        sinks["probabilities"] = _TiledTiffSink(probabilities_path, (height, width, classes), np.float32)
    if entropy_path is not None:
        sinks["entropy"] = _TiledTiffSink(entropy_path, (height, width), np.float32)
    if spread_path is not None and want_spread:
        sinks["spread"] = _TiledTiffSink(spread_path, (height, width), np.float32)
    tilers = {name: _RowTiler(sink, width) for name, sink in sinks.items()}
    cm = np.zeros((classes, classes), np.int64) if mask is not None else None
    overview = []
    entropy_sum = uncertain = spread_sum = 0.0
    ok = False
    try:
        row: list[ZoneResult] = []
        rows_done = 0
        for zone in predict_zones(predictor, image, plan, batch_size, spread=want_spread, on_batch=on_batch):
            row.append(zone)
            if zone.box[3] < width:
                continue
            y0, y1 = zone.box[:2]
            strips = {"probabilities": np.concatenate([z.probabilities for z in row], axis=1)}
            strips["labels"] = strips["probabilities"].argmax(axis=-1).astype(dtype)
            strips["entropy"] = normalized_entropy(strips["probabilities"])
            if want_spread:
                strips["spread"] = np.concatenate([z.spread for z in row], axis=1)
                spread_sum += float(strips["spread"].sum(dtype=np.float64))
            entropy_sum += float(strips["entropy"].sum(dtype=np.float64))
            uncertain += float((strips["entropy"] > UNCERTAIN_ENTROPY).sum())
            for name, tiler in tilers.items():
                tiler.feed(strips[name], last=y1 == height)
            if cm is not None:
                cm += confusion_matrix(np.asarray(mask[y0:y1]), strips["labels"], classes)
            first = -(-max(rows_done, y0) // overview_step) * overview_step
            overview.append(strips["labels"][first - y0::overview_step, ::overview_step])
            rows_done = y1
            row = []
            release_rows(image, y1 - halo)  # the next zones read from y1 - halo on
        ok = True
    finally:
        for sink in sinks.values():
            sink.close(ok)
    pixels = float(height * width)
    scores = {"mean_entropy": entropy_sum / pixels, "uncertain_fraction": uncertain / pixels,
              "mean_spread": spread_sum / pixels if want_spread else float("nan")}
    return scores, plan, cm, np.concatenate(overview)


# 3D stacks


def predict_volume(predictor: Predictor, volume, tile_size: int | None = None, halo: int | None = None,
                   batch_size: int | None = None, z_filter: int = 0, keep_probabilities: bool = False,
                   keep_uncertainty: bool = False, on_batch: Callable[[int], None] | None = None
                   ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, dict[str, float]]:
    """Predict a stack ``(Z, Y, X, C)`` plane by plane.

    ``z_filter`` > 1: median filter of that size along z on the probabilities, then argmax
    (smooths labels that flicker between planes).

    Returns ``(labels (Z, Y, X), probabilities (Z, Y, X, K) float32 or None,
    entropy (Z, Y, X) float32 or None, scores)``.
    """
    if predictor.label_kind != "semantic":
        raise ValueError("predictor must be a semantic model to label a stack plane by plane; got an instance model "
                         "(its post-processing is 2D: segment each plane's maps with segment_instances)")
    keep = keep_probabilities or z_filter > 1
    planes = [predict_image(predictor, volume[z], tile_size, halo, batch_size, keep_probabilities=keep,
                            keep_uncertainty=keep_uncertainty, on_batch=on_batch) for z in range(volume.shape[0])]
    entropy = np.stack([p.entropy for p in planes]) if keep_uncertainty else None
    probabilities = np.stack([p.probabilities for p in planes]) if keep else None
    if z_filter > 1:
        from scipy.ndimage import median_filter

        probabilities = median_filter(probabilities, size=(z_filter, 1, 1, 1), mode="nearest")
        labels = probabilities.argmax(axis=-1).astype(label_dtype(predictor.number_classes))
    else:
        labels = np.stack([p.labels for p in planes])
    scores = {k: float(np.mean([p.scores[k] for p in planes])) for k in planes[0].scores}
    return labels, (probabilities if keep_probabilities else None), entropy, scores


# Instance models: post-processing of the stitched maps

# Images whose height or width exceeds this are post-processed window by window
# (lib.instances.postprocess.postprocess_windowed); objects up to about a third of the overlap are then
# labelled exactly as on the whole image.
POSTPROCESS_WINDOW = 4096
POSTPROCESS_OVERLAP = 256


@dataclasses.dataclass
class InstanceSegmentation:
    """Instance labels of one image.

    labels : (H, W) uint16 or uint32, 0 = background, objects numbered in raster order
    intermediates : ``{"seeds": (H, W) int32, "surface": (H, W) float32, "growth": (H, W) bool,
        "thresholds": {name: number}}`` when asked for and the image was post-processed whole;
        else None
    windowed : whether the image was post-processed window by window
    """

    labels: np.ndarray
    intermediates: dict | None
    windowed: bool


def parse_thresholds(text: str) -> dict[str, float | str]:
    """``"F=0.5,Db=auto,growth=0.3"`` -> ``{"F": 0.5, "Db": "auto", "growth": 0.3}``.

    Names are channel names (seed thresholds) or ``growth`` (the growth mask's threshold);
    values are numbers in [0, 1] or ``auto`` (Otsu). Raises ``ValueError`` naming every bad item.
    """
    out: dict[str, float | str] = {}
    problems = []
    for item in [part.strip() for part in text.split(",")]:
        name, sep, value = (piece.strip() for piece in item.partition("="))
        if not sep or not name or not value:
            problems.append(f"each threshold must be NAME=VALUE (e.g. F=0.5 or Db=auto); got {item!r}")
            continue
        if name in out:
            problems.append(f"each threshold must be given once; got {name!r} twice")
        if value == "auto":
            out[name] = "auto"
            continue
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not 0.0 <= number <= 1.0:
            problems.append(f"threshold {name} must be a number in [0, 1] or auto; got {value!r}")
            continue
        out[name] = number
    if problems:
        raise ValueError("; ".join(problems))
    return out


def parse_refinements(text: str) -> tuple[str, ...]:
    """``"fill_holes,remove_small_objects 20"`` -> ``("fill_holes", "remove_small_objects 20")``; ``"none"`` -> ()."""
    if text.strip().lower() in ("", "none"):
        return ()
    return tuple(" ".join(step.split()) for step in text.split(","))


def postprocess_settings(predictor: Predictor, thresholds: dict[str, float | str] | None = None,
                         refinements: Sequence[str] | None = None):
    """The post-processing of an instance predictor: model.json's, with overrides on top.

    The base is ``instance.postprocess`` of the first member's model.json
    (:meth:`lib.instances.postprocess.PostProcessConfig.default_for` its channels when absent).
    ``thresholds`` replace or add seed thresholds by channel name; the key ``growth`` sets the
    growth mask's threshold. ``refinements`` replace the model's list.

    Returns a validated :class:`lib.instances.postprocess.PostProcessConfig`. Raises :class:`ModelError`
    for a bad block in model.json, ``lib.common.settings.ConfigError`` for overrides that do not fit.
    """
    from ..common.settings import ConfigError
    from ..instances.postprocess import PostProcessConfig

    info = predictor.members[0].info
    block = info.meta.get("instance", {}).get("postprocess")
    try:
        base = PostProcessConfig.default_for(info.channel_names) if block is None else \
            PostProcessConfig.from_dict(block)
    except ConfigError as exc:
        raise ModelError(f"instance.postprocess must hold valid post-processing settings; got in {info.path}:\n"
                         + "\n".join(f"  - {p}" for p in exc.violations)) from None
    if tuple(base.channels) != info.channel_names:
        raise ModelError(f"instance.postprocess.channels must equal instance.channels {list(info.channel_names)}; "
                         f"got {list(base.channels)} in {info.path}")
    changes: dict[str, Any] = {}
    if thresholds:
        seeds = {k: v for k, v in thresholds.items() if k != "growth"}
        changes["thresholds"] = {**base.thresholds, **seeds}
        if "growth" in thresholds:
            changes["growth_threshold"] = thresholds["growth"]
    if refinements is not None:
        changes["refinements"] = tuple(refinements)
    config = dataclasses.replace(base, **changes)
    try:
        return config.validate()
    except ConfigError as exc:
        raise ConfigError([f"post-processing (model.json with --thresholds/--refinements) {v}"
                           for v in exc.violations]) from None


def segment_instances(maps, config, window: int = POSTPROCESS_WINDOW, overlap: int = POSTPROCESS_OVERLAP,
                      intermediates: bool = False) -> InstanceSegmentation:
    """Instance labels from the stitched channel maps ``(H, W, K)`` of a whole image.

    Post-processing always runs on the maps of the whole image, never tile by tile: an
    object crossing a tile border is one object. Images larger than ``window`` along an
    axis go through :func:`lib.instances.postprocess.postprocess_windowed` (``maps`` may then be a
    memory map); smaller ones through :func:`lib.instances.postprocess.postprocess`.
    ``config``: :class:`lib.instances.postprocess.PostProcessConfig` (:func:`postprocess_settings`).
    """
    from ..instances.postprocess import postprocess, postprocess_windowed

    if maps.shape[0] > window or maps.shape[1] > window:
        return InstanceSegmentation(postprocess_windowed(maps, config, window=window, overlap=overlap), None, True)
    if intermediates:
        labels, extra = postprocess(np.asarray(maps), config, return_intermediates=True)
        return InstanceSegmentation(labels, extra, False)
    return InstanceSegmentation(postprocess(np.asarray(maps), config), None, False)


def predict_maps_to_memmap(predictor: Predictor, image, path: Path, tile_size: int | None = None,
                           halo: int | None = None, batch_size: int | None = None,
                           on_batch: Callable[[int], None] | None = None) -> tuple[np.ndarray, TilePlan, dict]:
    """Exact tiled prediction of a large image into a ``.npy`` memory map ``(H, W, K)`` float32 at ``path``.

    For instance models on images too large for memory: the maps are written zone by zone and
    post-processed afterwards (window by window) from the file. Returns ``(maps, plan, scores)``.
    """
    height, width = image.shape[:2]
    halo = predictor.receptive_field_radius if halo is None else halo
    plan = plan_for(predictor, height, width, halo, tile_size)
    want_spread = predictor.samples > 1
    maps = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32,
                                     shape=(height, width, predictor.output_channels))
    entropy_sum = uncertain = spread_sum = 0.0
    for zone in predict_zones(predictor, image, plan, batch_size, spread=want_spread, on_batch=on_batch):
        y0, y1, x0, x1 = zone.box
        maps[y0:y1, x0:x1] = zone.probabilities
        entropy = pixel_uncertainty(predictor, zone.probabilities)
        entropy_sum += float(entropy.sum(dtype=np.float64))
        uncertain += float((entropy > UNCERTAIN_ENTROPY).sum())
        if zone.spread is not None:
            spread_sum += float(zone.spread.sum(dtype=np.float64))
    maps.flush()
    pixels = float(height * width)
    scores = {"mean_entropy": entropy_sum / pixels, "uncertain_fraction": uncertain / pixels,
              "mean_spread": spread_sum / pixels if want_spread else float("nan")}
    return maps, plan, scores


def write_tiled_tiff(path: Path, array) -> None:
    """Write ``array`` (H, W) or (H, W, C) (a memory map is read strip by strip) as a tiled BigTIFF, atomically."""
    sink = _TiledTiffSink(path, tuple(array.shape), array.dtype)
    tiler = _RowTiler(sink, array.shape[1])
    ok = False
    try:
        for y in range(0, array.shape[0], sink.tile):
            tiler.feed(np.asarray(array[y:y + sink.tile]), last=y + sink.tile >= array.shape[0])
        ok = True
    finally:
        sink.close(ok)


# Folder runs (inference.py)


@dataclasses.dataclass(frozen=True)
class InferenceConfig:
    """Settings of one ``inference.py`` run; see the CLI help for each field."""

    model: str
    image_folder: str
    output_folder: str
    mask_folder: str | None = None
    mask_suffix: str | None = None
    image_format: str | None = None
    batch_size: int | None = None
    tile_size: int | None = None
    halo: int | None = None
    output_format: str = "tif"
    probabilities: bool = False
    uncertainty: bool = False
    tta: bool = False
    z_filter: int = 0
    overwrite: bool = False
    shard: tuple[int, int] | None = None  # (K, N): every N-th image starting at K
    precision: str = "float32"  # float32, bfloat16 or auto (bfloat16 where native)
    # Instance models only (see postprocess_settings, segment_instances):
    thresholds: dict[str, float | str] | None = None  # seed thresholds by channel, "growth"
    refinements: tuple[str, ...] | None = None  # replace model.json's refinements
    pixel_size: float | None = None  # physical side of a pixel, for the measurements
    filter_rules: str | None = None  # lib.instances.postprocess.parse_rules text: instances to remove
    save_intermediates: bool = False  # seeds, surface and growth mask
    matching_thresholds: tuple[float, ...] = (0.3, 0.5, 0.75)  # IoU thresholds of the evaluation
    postprocess_window: int = POSTPROCESS_WINDOW
    postprocess_overlap: int = POSTPROCESS_OVERLAP

    def validate(self) -> "InferenceConfig":
        """Return self, or raise ``lib.common.settings.ConfigError`` listing every invalid field."""
        from ..common.settings import ConfigError

        v = []
        if not Path(self.image_folder).is_dir():
            v.append(f"image_folder must be an existing folder; got {self.image_folder!r}")
        elif Path(self.output_folder).resolve() == Path(self.image_folder).resolve():
            v.append(f"output_folder must differ from image_folder (outputs would replace inputs); got "
                     f"{self.output_folder!r} for both")
        if self.mask_folder is not None and not Path(self.mask_folder).is_dir():
            v.append(f"mask_folder must be an existing folder; got {self.mask_folder!r}")
        for name in ("batch_size", "tile_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                v.append(f"{name} must be >= 1 (or left unset for automatic); got {value}")
        if self.halo is not None and self.halo < 0:
            v.append(f"halo must be >= 0 pixels; got {self.halo}")
        if self.output_format not in ("tif", "png"):
            v.append(f"output_format must be 'tif' or 'png'; got {self.output_format!r}")
        if self.z_filter < 0 or self.z_filter == 1 or (self.z_filter and self.z_filter % 2 == 0):
            v.append(f"z_filter must be 0 (off) or an odd size >= 3; got {self.z_filter}")
        if self.precision not in PRECISIONS:
            v.append(f"precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}")
        v += self._instance_violations()
        if self.shard is not None:
            k, n = self.shard
            if not (n >= 1 and 0 <= k < n):
                v.append(f"shard must be K/N with 0 <= K < N; got {k}/{n}")
        if v:
            raise ConfigError(v)
        return self

    def _instance_violations(self) -> list[str]:
        from ..instances.measure import MEASUREMENT_COLUMNS
        from ..instances.postprocess import parse_refinement
        from ..instances.rules import parse_rules

        v = []
        if self.pixel_size is not None and not (isinstance(self.pixel_size, (int, float))
                                                and math.isfinite(self.pixel_size) and self.pixel_size > 0):
            v.append(f"pixel_size must be a positive number (physical units per pixel); got {self.pixel_size!r}")
        if self.filter_rules is not None:
            try:
                parse_rules(self.filter_rules, MEASUREMENT_COLUMNS)  # the columns of lib.instances.postprocess.measure
            except ValueError as exc:
                v.append(f"filter_rules must be valid rules; got {self.filter_rules!r}: {exc}")
        for step in self.refinements or ():
            try:
                parse_refinement(step)
            except ValueError as exc:
                v.append(str(exc))
        for name, value in (self.thresholds or {}).items():
            if value != "auto" and not (isinstance(value, (int, float)) and 0 <= value <= 1):
                v.append(f"thresholds[{name!r}] must be a number in [0, 1] or 'auto'; got {value!r}")
        levels = list(self.matching_thresholds)
        if not levels or len(set(levels)) != len(levels) or not all(0 < t <= 1 for t in levels):
            v.append(f"matching_thresholds must be distinct IoU thresholds in (0, 1]; got {levels}")
        if self.postprocess_window < 1 or not 0 <= self.postprocess_overlap < self.postprocess_window:
            v.append(f"postprocess_overlap must be >= 0 and < postprocess_window >= 1; got window "
                     f"{self.postprocess_window}, overlap {self.postprocess_overlap}")
        return v

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class InferenceResult:
    """What a run did. ``failed`` maps image key -> one-line reason."""

    output_folder: Path
    predicted: list[str]
    skipped: list[str]
    failed: dict[str, str]
    overall: dict[str, object] | None  # metrics over all evaluated images, or None
    metrics_csv: Path | None
    uncertainty_csv: Path | None
    seconds: float
    megapixels: float  # of the images predicted in this run
    halo: int
    exact: bool
    instance_overall: dict | None = None  # pooled matching statistics {threshold: MatchStats}, or None
    instance_metrics_csv: Path | None = None


SETTINGS_FILE = "inference.json"
# Settings that only instance models use (refused for a semantic model rather than ignored).
INSTANCE_SETTINGS = ("thresholds", "refinements", "pixel_size", "filter_rules", "save_intermediates")
# Values of settings that folders written before they were recorded were made with.
LEGACY_COMPARED = {"precision": "float32"}
# Images of at least this many tiles get a progress bar of their own (over tiles).
TILE_BAR_MIN_TILES = 4


def _suffix(config: InferenceConfig) -> str:
    return "" if config.shard is None else f"-shard{config.shard[0]}of{config.shard[1]}"


def _outputs(out: Path, key: str, config: InferenceConfig, tif: bool, evaluate: bool) -> dict[str, Path]:
    """Every file one image produces; the record is written last and marks the image as done.

    ``tif``: labels as tif whatever the output format (stacks, streamed images).
    """
    fmt = "tif" if tif else config.output_format
    paths = {"labels": out / f"{key}.{fmt}"}
    if config.probabilities:
        paths["probabilities"] = out / "probabilities" / f"{key}.tif"
    if config.uncertainty:
        paths["entropy"] = out / "uncertainty" / f"{key}_entropy.tif"
    if evaluate:
        paths["overlay"] = out / "overlays" / f"{key}.png"
    paths["record"] = out / "records" / f"{key}.json"
    return paths


def _write_json(path: Path, value: dict) -> None:
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".partial.json", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(value, handle, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_settings(out: Path, settings: dict, overwrite: bool) -> None:
    """Refuse to mix outputs of different models or halos in one folder (unless overwriting)."""
    path = out / SETTINGS_FILE
    if overwrite or not path.is_file():
        return
    try:
        previous = json.loads(path.read_text()).get("compared", {})
    except (OSError, json.JSONDecodeError, AttributeError):
        return
    previous = {**LEGACY_COMPARED, **previous}
    differing = [k for k in settings["compared"] if previous.get(k) != settings["compared"][k]]
    if differing:
        shown = "; ".join(f"{k}: {previous.get(k)!r} -> {settings['compared'][k]!r}" for k in differing)
        raise FileExistsError(f"output_folder must hold outputs of these settings only; got a folder {out} made with "
                              f"others ({shown}). Use another --output_folder, or --overwrite to redo every image")


def _select(keys: list[str], shard: tuple[int, int] | None) -> list[str]:
    return keys if shard is None else keys[shard[0]::shard[1]]


def run_inference(config: InferenceConfig, log: Callable[[str], None] = print, progress: bool = True,
                  predictor: Predictor | None = None) -> InferenceResult:
    """Predict every image of ``config.image_folder`` (or one shard of it) into ``config.output_folder``.

    Per image ``KEY``: ``KEY.tif|png`` labels (smallest integer dtype; stacks always tif),
    ``probabilities/KEY.tif`` (H, W, K) float32, ``uncertainty/KEY_entropy.tif`` (and
    ``KEY_spread.tif`` for ensembles/TTA), ``overlays/KEY.png`` when evaluating, and
    ``records/KEY.json`` (plan, timings, uncertainty scores, confusion matrix), each written
    atomically; the record last. An image whose outputs all exist is skipped unless
    ``overwrite``. At the end ``uncertainty.csv`` (images ranked by mean entropy) and, with
    masks, ``metrics.csv`` (per image and ``ALL``) are written from the records (suffixed
    ``-shardKofN`` for a shard). Images that cannot be read or do not fit the model are
    reported in ``failed`` and the others are processed.

    Instance models: the maps of each whole image are post-processed (:func:`postprocess_settings`,
    :func:`segment_instances`) into ``KEY.tif`` (uint16, or uint32 above 65535 objects), with
    ``KEY_instances.csv`` (one row of measurements per instance, with a ``status`` column when
    ``filter_rules`` removed some), ``probabilities/KEY_<channel>.tif`` (H, W) float32 per
    channel, ``intermediates/KEY_{seeds,surface,growth}.tif`` with ``save_intermediates``; with
    masks (instance label images) ``associations/KEY.csv``, ``overlays/KEY.png`` (matched
    outlines green, missed objects red, false positives blue), ``instance_metrics.csv`` (per
    image and pooled ``ALL`` rows at each of ``matching_thresholds``) and ``metrics.csv`` of the
    foreground (labels > 0 against mask > 0). Images above ``STREAM_PIXELS`` keep their maps in
    a memory-mapped scratch file and write tiled BigTIFFs.

    Raises ``ConfigError`` (settings), :class:`ModelError` (model), ``FileExistsError``
    (an output folder of other settings), ``FileNotFoundError``.
    """
    import time

    from ..scoring.reports import metrics_row, write_csv
    from ..store.images import ImageReadError, list_images, pair_images_masks

    started = time.perf_counter()
    config.validate()
    files, problems = list_images(config.image_folder, config.image_format)
    failed: dict[str, str] = {}
    for problem in problems:
        log(f"warning: {problem}")
    if not files:
        raise FileNotFoundError(f"image_folder must hold images ({config.image_format or 'tif, png, jpg, bmp'}); "
                                f"got none in {config.image_folder}")
    keys = _select(sorted(files), config.shard)
    masks: dict[str, Path] = {}
    if config.mask_folder is not None:
        mask_files, mask_problems = list_images(config.mask_folder)
        pairs, pair_problems = pair_images_masks({k: files[k] for k in keys}, mask_files, config.mask_suffix)
        masks = {p.key: p.mask for p in pairs}
        for problem in mask_problems + [p for p in pair_problems if config.shard is None or "no mask" in p]:
            log(f"warning: {problem}; those images are predicted but not evaluated"
                if "no mask" in problem else f"warning: {problem}")
    if predictor is None:
        predictor = load_predictor(config.model, tta=config.tta, precision=config.precision)
    post = _instance_settings(predictor, config)
    radius, divisor = predictor.receptive_field_radius, predictor.size_divisor
    halo = radius if config.halo is None else config.halo
    exact = halo >= radius
    plan_tiles(1, 1, divisor, halo, config.tile_size)  # a bad tile size fails before any image
    out = Path(config.output_folder)
    settings = {
        "compared": {"model": predictor.source, "halo": halo, "tta": config.tta,
                     "tile_size": None if exact else config.tile_size, "precision": predictor.precision},
        "precision": predictor.precision,
        "config": config.to_dict(), "members": [m.info.path for m in predictor.members],
        "receptive_field_radius": radius, "size_divisor": divisor, "exact": exact,
        "label_kind": predictor.label_kind, "number_classes": predictor.number_classes,
        "tile_size_used": config.tile_size,  # None: rectangular tiles of at most tile_pixels_max (records/)
        "tile_pixels_max": (config.tile_size or 0) ** 2 or default_tile_pixels(halo, divisor, predictor.precision),
    }
    if post is not None:
        instance = {"channels": list(predictor.channel_names), "kinds": list(predictor.channel_kinds),
                    "postprocess": post.to_dict(), "filter_rules": config.filter_rules,
                    "pixel_size": config.pixel_size, "matching_thresholds": list(config.matching_thresholds),
                    "postprocess_window": config.postprocess_window,
                    "postprocess_overlap": config.postprocess_overlap}
        settings["compared"]["instance"] = settings["instance"] = instance
    _check_settings(out, settings, config.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / SETTINGS_FILE).is_file() or config.overwrite:
        _write_json(out / SETTINGS_FILE, settings)
    kind = (f"{predictor.number_classes} classes" if post is None else
            f"instance channels {', '.join(f'{n} ({k})' for n, k in zip(predictor.channel_names, predictor.channel_kinds))}")
    log(f"model {predictor.source}: {len(predictor.members)} member(s), {kind}, "
        f"divisor {divisor}, receptive-field radius {radius}; halo {halo} px "
        + ("(exact: tiled == whole-image)" if exact else f"(< radius {radius}: approximate near tile borders)")
        + (", test-time augmentation x8" if config.tta else "")
        + f"; {predictor.precision}" + (" (auto)" if config.precision == "auto" else ""))
    if post is not None:
        log("post-processing of the stitched maps: " + ", ".join(f"{k}={v}" for k, v in post.to_dict().items())
            + (f"; filter: remove {config.filter_rules}" if config.filter_rules else ""))
    log(f"{len(keys)} image(s) in {config.image_folder}" + (f" (shard {config.shard[0]}/{config.shard[1]})"
                                                            if config.shard else "")
        + (f", {len(masks)} with masks" if config.mask_folder else "") + f" -> {out}")

    predicted, skipped, megapixels = [], [], 0.0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(keys), unit="image", dynamic_ncols=True, disable=None)  # None: quiet off a TTY
    try:
        for key in keys:
            try:
                done, pixels = _process_one(predictor, key, files[key], masks.get(key), out, config, halo, log,
                                            progress, post)
            except Exception as exc:  # one bad image must not stop an unattended run
                # Our own errors carry a full sentence; anything else gets its type for a bug report.
                message = str(exc) if isinstance(exc, (ImageReadError, ValueError, OSError)) else \
                    f"{type(exc).__name__}: {exc}"
                failed[key] = message.splitlines()[0] if message else type(exc).__name__
                (bar.write if bar else log)(f"error: {files[key].name}: {failed[key]} (skipped)")
            else:
                (predicted if done else skipped).append(key)
                megapixels += pixels / 1e6
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()

    records = {}
    for key in keys:
        path = out / "records" / f"{key}.json"
        if key not in failed and path.is_file():
            records[key] = json.loads(path.read_text())
    uncertainty_rows = sorted(({"image": key, **record["scores"]} for key, record in records.items()),
                              key=lambda row: -row["mean_entropy"])
    uncertainty_csv = write_csv(out / f"uncertainty{_suffix(config)}.csv", uncertainty_rows) if records else None
    overall = metrics_csv = None
    evaluated = {k: np.asarray(r["confusion_matrix"]) for k, r in records.items() if r.get("confusion_matrix")}
    if evaluated:
        rows = [metrics_row(key, cm) for key, cm in evaluated.items()]
        overall = metrics_row("ALL", sum(evaluated.values()))
        metrics_csv = write_csv(out / f"metrics{_suffix(config)}.csv", rows + [overall])
    instance_overall = instance_csv = None
    matched = {k: r["instance_stats"] for k, r in records.items() if r.get("instance_stats")}
    if matched:
        from ..scoring.reports import instance_metrics_rows
        from ..scoring.metrics import MatchStats, pool_stats

        tables = {k: {float(t): MatchStats(**d) for t, d in v.items()} for k, v in matched.items()}
        instance_overall = pool_stats(list(tables.values()))
        rows = [row for key, table in tables.items() for row in instance_metrics_rows(key, table)]
        instance_csv = write_csv(out / f"instance_metrics{_suffix(config)}.csv",
                                 rows + instance_metrics_rows("ALL", instance_overall))
    return InferenceResult(out, predicted, skipped, failed, overall, metrics_csv, uncertainty_csv,
                           time.perf_counter() - started, megapixels, halo, exact, instance_overall, instance_csv)


def _instance_settings(predictor: Predictor, config: InferenceConfig):
    """The post-processing of an instance predictor (None for a semantic one, refusing instance-only settings)."""
    from ..common.settings import ConfigError

    if predictor.label_kind == "semantic":
        given = [f"{name} applies to instance models only; got {getattr(config, name)!r} with a semantic model "
                 f"({predictor.source})" for name in INSTANCE_SETTINGS if getattr(config, name) not in (None, False)]
        if given:
            raise ConfigError(given)
        return None
    if config.output_format != "tif":
        raise ConfigError([f"output_format must be tif for an instance model (its labels may need uint32, which "
                           f"PNG cannot hold); got {config.output_format!r}"])
    return postprocess_settings(predictor, config.thresholds, config.refinements)


def _tile_bar(predictor: Predictor, info, config: InferenceConfig, halo: int, name: str, progress: bool):
    """A progress bar over the tiles of one image when it has many (None otherwise)."""
    if not progress:
        return None
    height, width = info.shape[-3:-1] if info.is_volume else info.shape[:2]
    tiles = plan_for(predictor, height, width, halo, config.tile_size).n_tiles
    tiles *= info.shape[0] if info.is_volume else 1
    if tiles < TILE_BAR_MIN_TILES:
        return None
    from tqdm import tqdm

    return tqdm(total=tiles, unit="tile", desc=name, dynamic_ncols=True, leave=False, position=1, disable=None)


def _process_one(predictor: Predictor, key: str, image_path: Path, mask_path: Path | None, out: Path,
                 config: InferenceConfig, halo: int, log: Callable[[str], None], progress: bool = False,
                 post=None) -> tuple[bool, int]:
    """Predict, write and evaluate one image. Returns (predicted now, pixels); False: skipped (done before).

    ``progress``: show a bar over the tiles of an image of at least ``TILE_BAR_MIN_TILES`` tiles.
    ``post``: the post-processing settings of an instance predictor (None: semantic).
    """
    from ..store.images import read_info

    info = read_info(image_path)
    volume = info.is_volume
    streamed = not volume and info.shape[0] * info.shape[1] > STREAM_PIXELS
    if post is None:
        paths = _outputs(out, key, config, volume or streamed, mask_path is not None and not volume)
    else:
        paths = _instance_outputs(out, key, predictor, config, info, mask_path is not None)
    if predictor.samples > 1 and config.uncertainty and not (post is not None and streamed):
        paths["spread"] = out / "uncertainty" / f"{key}_spread.tif"
    if not config.overwrite and all(p.is_file() for p in paths.values()):
        return False, 0
    predictor.check_image(info.shape, info.dtype, str(image_path))
    if post is not None and volume:
        raise InputMismatch(f"image must be 2D for an instance model (post-processing is 2D); got a stack of shape "
                            f"(Z, Y, X, C) = {info.shape} in {image_path}. Predict its planes as separate images")
    bar = _tile_bar(predictor, info, config, halo, key, progress)
    try:
        on_batch = None if bar is None else bar.update
        if post is not None:
            return True, _predict_instances_one(predictor, image_path, info, mask_path, out, paths, config, halo,
                                                log, on_batch, post)
        return True, _predict_one(predictor, image_path, info, mask_path, out, paths, config, halo, log, on_batch)
    finally:
        if bar is not None:
            bar.close()


def _instance_outputs(out: Path, key: str, predictor: Predictor, config: InferenceConfig, info,
                      evaluate: bool) -> dict[str, Path]:
    """Every file one image of an instance model produces (see :func:`run_inference`); the record last."""
    height, width = info.shape[:2]
    streamed = height * width > STREAM_PIXELS
    windowed = height > config.postprocess_window or width > config.postprocess_window
    paths = {"labels": out / f"{key}.tif", "measurements": out / f"{key}_instances.csv"}
    if config.probabilities:
        for name in predictor.channel_names:
            paths[f"probabilities_{name}"] = out / "probabilities" / f"{key}_{name}.tif"
    if config.uncertainty and not streamed:
        paths["entropy"] = out / "uncertainty" / f"{key}_entropy.tif"
    if config.save_intermediates and not windowed:
        for name in INTERMEDIATES:
            paths[name] = out / "intermediates" / f"{key}_{name}.tif"
    if evaluate:
        paths["associations"] = out / "associations" / f"{key}.csv"
        if not streamed:
            paths["overlay"] = out / "overlays" / f"{key}.png"
    paths["record"] = out / "records" / f"{key}.json"
    return paths


# Intermediate images of the post-processing written by --save_intermediates.
INTERMEDIATES = ("seeds", "surface", "growth")


def _predict_instances_one(predictor: Predictor, image_path: Path, info, mask_path: Path | None, out: Path,
                           paths: dict[str, Path], config: InferenceConfig, halo: int, log: Callable[[str], None],
                           on_batch: Callable[[int], None] | None, post) -> int:
    """Predict one image with an instance model: maps of the whole image, post-processing, measurements,
    optional filtering and evaluation; the record last. Returns its pixels."""
    import tempfile
    import time

    from ..instances.measure import MEASUREMENT_COLUMNS, measure
    from ..instances.rules import filter_instances
    from ..scoring.reports import write_csv as write_table
    from ..store.images import write_image

    started = time.perf_counter()
    height, width = info.shape[:2]
    pixels = height * width
    streamed = pixels > STREAM_PIXELS
    record: dict[str, Any] = {"image": str(image_path), "shape": list(info.shape), "dtype": info.dtype, "halo": halo}
    image = _open_image(image_path, info)
    scratch = maps = None
    try:
        if streamed:
            # The maps of a very large image live in a file; post-processing reads it window by window.
            fd, scratch = tempfile.mkstemp(prefix=f".{image_path.stem}.maps.", suffix=".partial.npy", dir=out)
            os.close(fd)
            maps, plan, scores = predict_maps_to_memmap(predictor, image, Path(scratch), config.tile_size, halo,
                                                        config.batch_size, on_batch)
            if config.uncertainty:
                log(f"note: {image_path.name} has {pixels / 1e6:.0f} Mpixel; its uncertainty maps are not written "
                    "(scores only)")
        else:
            prediction = predict_image(predictor, image, config.tile_size, halo, config.batch_size,
                                       keep_uncertainty=config.uncertainty, on_batch=on_batch)
            maps, plan, scores = prediction.probabilities, prediction.plan, prediction.scores
            if prediction.entropy is not None:
                write_image(paths["entropy"], prediction.entropy)
            if prediction.spread is not None and "spread" in paths:
                write_image(paths["spread"], prediction.spread)
        record["plan"] = {"tile": [plan.tile_height, plan.tile_width], "zone": [plan.zone_height, plan.zone_width],
                          "tiles": plan.n_tiles, "streamed": streamed}
        segmentation = segment_instances(maps, post, config.postprocess_window, config.postprocess_overlap,
                                         intermediates=config.save_intermediates)
        if config.save_intermediates and segmentation.windowed:
            log(f"note: {image_path.name} was post-processed window by window (larger than "
                f"{config.postprocess_window} px); its intermediates are not written")
        labels = segmentation.labels
        rows = measure(labels, config.pixel_size)
        columns = list(MEASUREMENT_COLUMNS)
        found = len(rows)
        if config.filter_rules:
            labels, rows = filter_instances(labels, rows, config.filter_rules)
            columns.append("status")
        write_table(paths["measurements"], rows, columns)
        (write_tiled_tiff if streamed else write_image)(paths["labels"], labels)
        for k, name in enumerate(predictor.channel_names):
            if f"probabilities_{name}" in paths:
                (write_tiled_tiff if streamed else write_image)(paths[f"probabilities_{name}"], maps[..., k])
        if segmentation.intermediates is not None:
            extra = segmentation.intermediates
            write_image(paths["seeds"], extra["seeds"].astype(np.uint32))
            write_image(paths["surface"], extra["surface"].astype(np.float32))
            write_image(paths["growth"], extra["growth"].astype(np.uint8))
            record["resolved_thresholds"] = extra["thresholds"]
        kept = sum(row.get("status", "kept") == "kept" for row in rows)
        record["instances"] = {"found": found, "kept": kept, "removed": found - kept,
                               "label_dtype": labels.dtype.name, "windowed": segmentation.windowed}
        if mask_path is not None:
            record.update(_evaluate_instances_one(image, labels, mask_path, paths, config, streamed, log))
    finally:
        if scratch is not None:
            maps = None  # closes the memory map before its file goes
            Path(scratch).unlink(missing_ok=True)
    record["scores"] = scores
    record["seconds"] = time.perf_counter() - started
    record["outputs"] = {name: str(p.relative_to(out)) for name, p in paths.items() if name != "record"}
    _write_json(paths["record"], record)
    return pixels


def _evaluate_instances_one(image, labels: np.ndarray, mask_path: Path, paths: dict[str, Path],
                            config: InferenceConfig, streamed: bool, log: Callable[[str], None]) -> dict:
    """Match the instances of one image with its instance mask; write its associations (and overlay)."""
    from ..scoring.reports import evaluate_instances, metrics_row
    from ..scoring.reports import associations_rows, matching_overlay, write_associations
    from ..common.pictures import save_png
    from ..store.images import read_mask

    mask = read_mask(mask_path, binary_255=False)
    try:
        matching, cm = evaluate_instances(labels, mask, config.matching_thresholds)
    except ValueError as exc:
        raise ValueError(f"{exc} in {mask_path}") from None
    rows = [row for t in matching.thresholds for row in associations_rows(matching, paths["labels"].stem, t)]
    write_associations(paths["associations"], rows)
    if not streamed:
        levels = matching.thresholds
        shown = 0.5 if 0.5 in levels else levels[len(levels) // 2]
        save_png(paths["overlay"], matching_overlay(np.asarray(image), mask, labels, matching, threshold=shown))
    else:
        log(f"note: {mask_path.name}: no overlay for an image of {labels.size / 1e6:.0f} Mpixel")
    row = metrics_row("", cm)
    return {"mask": str(mask_path), "confusion_matrix": cm.tolist(),
            "metrics": {k: v for k, v in row.items() if k != "image"},
            "instance_stats": {str(t): s.as_dict() for t, s in matching.stats.items()}}


def _predict_one(predictor: Predictor, image_path: Path, info, mask_path: Path | None, out: Path,
                 paths: dict[str, Path], config: InferenceConfig, halo: int, log: Callable[[str], None],
                 on_batch: Callable[[int], None] | None) -> int:
    """Predict one image into ``paths`` and evaluate it; the record last. Returns its pixels."""
    import time

    from ..store.images import read_volume, write_image

    volume = info.is_volume
    streamed = not volume and info.shape[0] * info.shape[1] > STREAM_PIXELS
    started = time.perf_counter()
    record: dict[str, Any] = {"image": str(image_path), "shape": list(info.shape), "dtype": info.dtype, "halo": halo}
    classes = predictor.number_classes
    if volume:
        stack = read_volume(image_path)
        labels, probabilities, entropy, scores = predict_volume(
            predictor, stack, config.tile_size, halo, config.batch_size, config.z_filter,
            keep_probabilities=config.probabilities, keep_uncertainty=config.uncertainty, on_batch=on_batch)
        spread = None
        pixels = int(np.prod(info.shape[:3]))
        write_image(paths["labels"], labels[..., np.newaxis])
        if probabilities is not None:
            write_image(paths["probabilities"], probabilities)
        if entropy is not None:
            write_image(paths["entropy"], entropy[..., np.newaxis])
        paths.pop("spread", None)
        if mask_path is not None:
            log(f"warning: {image_path.name} is a stack; evaluation takes 2D images only (not evaluated)")
    elif streamed:
        pixels = info.shape[0] * info.shape[1]
        image = _open_image(image_path, info)
        if config.output_format != "tif":
            log(f"note: {image_path.name} has {pixels / 1e6:.0f} Mpixel; its labels are streamed to a tiled "
                "BigTIFF (.tif) whatever --output_format")
        mask = None
        if mask_path is not None:
            from ..store.images import read_mask

            mask = read_mask(mask_path)
            if mask.shape != tuple(info.shape[:2]):
                raise ValueError(f"mask size must equal the image size; got {mask.shape} for {info.shape[:2]} in "
                                 f"{mask_path}")
        from ..common.pictures import OVERLAY_MAX_SIDE

        step = max(1, -(-max(info.shape[:2]) // OVERLAY_MAX_SIDE))
        scores, plan, cm, overview = predict_to_tiff(
            predictor, image, paths["labels"], config.tile_size, halo, config.batch_size,
            probabilities_path=paths.get("probabilities"), entropy_path=paths.get("entropy"),
            spread_path=paths.get("spread"), mask=mask, overview_step=step, on_batch=on_batch)
        record["plan"] = {"tile": [plan.tile_height, plan.tile_width], "zone": [plan.zone_height, plan.zone_width],
                          "tiles": plan.n_tiles, "streamed": True}
        if cm is not None:
            from ..scoring.reports import metrics_row
            from ..common.pictures import semantic_overlay as overlay
            from ..store.images import write_image as write

            write(paths["overlay"], overlay(np.asarray(image[::step, ::step]), overview, mask[::step, ::step]))
            row = metrics_row("", cm)
            record.update({"mask": str(mask_path), "confusion_matrix": cm.tolist(),
                           "metrics": {k: v for k, v in row.items() if k != "image"}})
    else:
        image = _open_image(image_path, info)
        prediction = predict_image(predictor, image, config.tile_size, halo, config.batch_size,
                                   keep_probabilities=config.probabilities, keep_uncertainty=config.uncertainty,
                                   on_batch=on_batch)
        labels, scores, pixels = prediction.labels, prediction.scores, info.shape[0] * info.shape[1]
        plan = prediction.plan
        record["plan"] = {"tile": [plan.tile_height, plan.tile_width], "zone": [plan.zone_height, plan.zone_width],
                          "tiles": plan.n_tiles}
        write_image(paths["labels"], labels)
        if prediction.probabilities is not None:
            write_image(paths["probabilities"], prediction.probabilities)
        if prediction.entropy is not None:
            write_image(paths["entropy"], prediction.entropy)
        if prediction.spread is not None and "spread" in paths:
            write_image(paths["spread"], prediction.spread)
        if mask_path is not None:
            record.update(_evaluate_one(image, labels, mask_path, classes, paths["overlay"]))
    record["scores"] = scores
    record["seconds"] = time.perf_counter() - started
    record["outputs"] = {name: str(p.relative_to(out)) for name, p in paths.items() if name != "record"}
    _write_json(paths["record"], record)
    return pixels


# Images above this many pixels are memory-mapped when the file allows it.
MEMMAP_PIXELS = 2 ** 24


def _open_image(path: Path, info):
    """The image as (H, W, C): memory-mapped when large and an uncompressed contiguous YX/YXC TIFF, else decoded."""
    from ..store.images import TIFF_EXTENSIONS, read_image

    if path.suffix.lower() in TIFF_EXTENSIONS and info.axes in ("YX", "YXC") and \
            info.shape[0] * info.shape[1] > MEMMAP_PIXELS:
        import tifffile

        try:
            mapped = tifffile.memmap(path, mode="r")
        except (ValueError, OSError, TypeError, IndexError):
            mapped = None
        if mapped is not None:
            if mapped.size == int(np.prod(info.shape)):
                return mapped.reshape(info.shape)
    return read_image(path)


def _evaluate_one(image, labels: np.ndarray, mask_path: Path, classes: int, overlay_path: Path) -> dict:
    from ..scoring.reports import evaluate_labels, metrics_row
    from ..common.pictures import semantic_overlay as overlay
    from ..store.images import read_mask, write_image

    mask = read_mask(mask_path)
    try:
        cm = evaluate_labels(labels, mask, classes)
    except ValueError as exc:
        raise ValueError(f"{exc} in {mask_path}") from None
    write_image(overlay_path, overlay(image, labels, mask))
    row = metrics_row("", cm)
    return {"mask": str(mask_path), "confusion_matrix": cm.tolist(),
            "metrics": {k: v for k, v in row.items() if k != "image"}}
