"""All tile geometry: grids of fixed-size tiles for building databases, and the tile plans of inference.

Build grids (:func:`tile_grid`): a grid covers every pixel. Tiles step by ``stride``; a last tile that would run past the
edge is shifted inside so that it ends on the edge. An image smaller than the tile along an
axis gets one tile there, and is padded up to the tile size (see :func:`pad_to`).
"""

from __future__ import annotations

import dataclasses

import numpy as np


def tile_starts(length: int, tile_size: int, stride: int) -> list[int]:
    """Origins of the tiles along one axis of ``length`` pixels.

    Raises ``ValueError`` unless ``length >= 1`` and ``1 <= stride <= tile_size``.
    """
    if length < 1 or tile_size < 1:
        raise ValueError(f"length and tile_size must be >= 1; got {length} and {tile_size}")
    if not 1 <= stride <= tile_size:
        raise ValueError(f"stride must be in [1, tile_size={tile_size}] so that tiles cover the image; got {stride}")
    if length <= tile_size:
        return [0]
    starts = list(range(0, length - tile_size + 1, stride))
    if starts[-1] + tile_size < length:
        starts.append(length - tile_size)
    return starts


def tile_grid(height: int, width: int, tile_size: int, stride: int) -> list[tuple[int, int]]:
    """Tile origins ``(y, x)`` in row-major order covering a ``height x width`` image."""
    return [(y, x) for y in tile_starts(height, tile_size, stride) for x in tile_starts(width, tile_size, stride)]


def pad_to(array: np.ndarray, height: int, width: int, mode: str) -> np.ndarray:
    """Pad ``array`` (H, W[, C]) at the bottom and right up to ``height x width``.

    ``mode``: "reflect" (images; mirror without repeating the edge pixel, repeated as needed
    for images much smaller than the tile) or "zero" (masks: background).
    """
    pad_h, pad_w = max(height - array.shape[0], 0), max(width - array.shape[1], 0)
    if pad_h == 0 and pad_w == 0:
        return array
    widths = [(0, pad_h), (0, pad_w)] + [(0, 0)] * (array.ndim - 2)
    if mode == "zero":
        return np.pad(array, widths, mode="constant")
    if mode != "reflect":
        raise ValueError(f"mode must be 'reflect' or 'zero'; got {mode!r}")
    if min(array.shape[:2]) == 1:
        return np.pad(array, widths, mode="edge")
    # np.pad's reflect handles pads wider than the array by reflecting repeatedly.
    return np.pad(array, widths, mode="reflect")


# Inference tile plans
#
# Exact tiled prediction (Majurski and Bajcsy, J. Res. NIST 126:126009, 2021): an image is cut
# into *zones of responsibility*; each zone is predicted from a tile holding the zone plus
# context on every side, and only the zone is kept. Two rules make the tiled output equal to
# one whole-image pass:
#
# * context of at least the receptive-field radius on every side (the ``halo``), so an output
#   pixel sees the pixels it sees in the whole image and never the zero "same" padding at a
#   tile's border;
# * every tile starts on a multiple of the model's size divisor *in image coordinates*, so the
#   pooling grid of every tile is the pooling grid of the image itself. The top and left
#   context is therefore the halo rounded up to the divisor (``TilePlan.margin``); zones start
#   on multiples of the divisor. (Until 2025 tiles started on multiples of the divisor in the
#   coordinates of the image extended by the halo, so the output depended on ``halo mod
#   divisor``: halos 107 and 112, both at least the UNet's radius, gave 1.4 % different labels.)
#
# Outside the image, tiles read its reflection (numpy's "reflect": mirror without repeating the
# edge pixel), as the whole-image reference does (:func:`lib.inference.tiled.predict_whole`).

# Pixels per batch of tiles when --batch_size is not given: measured on FC-DenseNet56, batches of
# one 704-px tile are as fast as batches of four and use a third of the memory (5.7 -> 1.9 GiB).
DEFAULT_BATCH_PIXELS = 2 ** 20
# Smallest default zone of responsibility. Per pixel of tile, FC-DenseNet56 runs as fast on
# 896-px tiles as on 704-px ones (measured), so larger zones only cut the work spent on halos:
# on 2048 x 2048 with a 96-px halo, 9 tiles of 896 px (7.2 Mpixel) instead of 16 of 704 (7.9).
# One default rule for every image, in memory or streamed to disk: the streamed writer used
# squares with 512-px zones to lower its peak (16384 x 16384, small UNet: 1.96 GiB with 512-px
# zones, 2.14 GiB with 768), but its own plan differed from the one the progress bar counted
# (475 tiles announced, 1,024 predicted); 9 % of peak is not worth two rules.
DEFAULT_MIN_ZONE = 768
BFLOAT16_TILE_AREA = 1.3  # default tile area in bfloat16 relative to float32 (default_tile_pixels)


def round_up(value: int, multiple: int) -> int:
    """``value`` rounded up to a multiple of ``multiple``."""
    return -(-value // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class TilePlan:
    """Tiles covering an ``height x width`` image.

    Zone ``(i, j)`` covers rows ``[i * zone_height, min((i + 1) * zone_height, height))`` (and the
    same for columns); its tile is the ``tile_height x tile_width`` window of the reflected image
    starting ``margin`` pixels above and left of the zone, where ``margin`` is ``halo`` rounded up
    to ``divisor``: tiles start on the image's own pooling grid. Tile sizes, zone sizes and
    zone origins are multiples of ``divisor``; each tile holds at least ``halo`` pixels of
    context below and right of its zone.
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
    def margin(self) -> int:
        """Context above and left of each zone: the halo rounded up to the divisor."""
        return round_up(self.halo, self.divisor)

    @property
    def grid(self) -> tuple[int, int]:
        return -(-self.height // self.zone_height), -(-self.width // self.zone_width)

    @property
    def n_tiles(self) -> int:
        rows, cols = self.grid
        return rows * cols

    @property
    def tile_pixels(self) -> int:
        return self.tile_height * self.tile_width

    def zones(self) -> list[tuple[int, int, int, int]]:
        """``(y0, y1, x0, x1)`` of every zone in row-major order."""
        rows, cols = self.grid
        return [(i * self.zone_height, min((i + 1) * self.zone_height, self.height),
                 j * self.zone_width, min((j + 1) * self.zone_width, self.width))
                for i in range(rows) for j in range(cols)]

    def tile_window(self, zone: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        """``(y0, y1, x0, x1)`` of the tile of ``zone`` in the coordinates of the image (may lie outside it)."""
        y0, x0 = zone[0] - self.margin, zone[2] - self.margin
        return y0, y0 + self.tile_height, x0, x0 + self.tile_width

    def as_record(self) -> dict:
        """The plan as written in an image's record (JSON)."""
        return {"tile": [self.tile_height, self.tile_width], "zone": [self.zone_height, self.zone_width],
                "tiles": self.n_tiles, "margin": self.margin}


def min_tile_size(halo: int, divisor: int) -> int:
    """Smallest tile edge that leaves a zone: the margin, one divisor and the halo, rounded up to the divisor."""
    return round_up(round_up(halo, divisor) + divisor + halo, divisor)


def _tile_for(zone: int, halo: int, divisor: int) -> int:
    return round_up(round_up(halo, divisor) + zone + halo, divisor)


def default_tile_size(halo: int, divisor: int, min_zone: int | None = None) -> int:
    """Tile edge used when none is given: a zone of at least ``min_zone`` (default ``DEFAULT_MIN_ZONE``) px
    and at least twice the halo, with its context."""
    min_zone = DEFAULT_MIN_ZONE if min_zone is None else min_zone
    return _tile_for(round_up(max(min_zone, 2 * halo), divisor), halo, divisor)


def _plan_axis(length: int, tile: int, halo: int, divisor: int) -> tuple[int, int]:
    """(tile, zone) along one axis; zones as equal as the divisor allows, tiles no larger than needed."""
    whole = _tile_for(length, halo, divisor)
    if tile >= whole:
        return whole, length
    zone = (tile - round_up(halo, divisor) - halo) // divisor * divisor
    count = -(-length // zone)
    zone = round_up(-(-length // count), divisor)  # same number of tiles, less padding in the last
    return _tile_for(zone, halo, divisor), zone


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
    smallest = min_tile_size(halo, divisor)
    top = max(smallest, min(_tile_for(height, halo, divisor), max_pixels // smallest // divisor * divisor))
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
    return best[1:]  # the first candidate always sets best


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
    check_tile_size(tile_size, halo, divisor)
    tile_height, zone_height = _plan_axis(height, tile_size, halo, divisor)
    tile_width, zone_width = _plan_axis(width, tile_size, halo, divisor)
    return TilePlan(height, width, tile_height, tile_width, zone_height, zone_width, halo, divisor)


def check_tile_size(tile_size: int, halo: int, divisor: int) -> None:
    """Raise ``ValueError`` unless ``tile_size`` is a multiple of ``divisor`` that leaves a zone with ``halo``."""
    if tile_size % divisor:
        raise ValueError(f"tile_size must be a multiple of the model's size divisor {divisor}; got {tile_size}. "
                         f"Use {tile_size // divisor * divisor or divisor} or {round_up(tile_size, divisor)}")
    smallest = min_tile_size(halo, divisor)
    if tile_size < smallest:
        raise ValueError(f"tile_size must be >= 2 * halo + divisor = {2 * halo + divisor} (with the halo above and "
                         f"left rounded up to the divisor: {smallest}) so that a zone remains; got {tile_size} "
                         f"(halo {halo}). Raise --tile_size or lower --halo")


def inference_plan(height: int, width: int, divisor: int, halo: int, tile_size: int | None = None,
                   precision: str = "float32") -> TilePlan:
    """THE plan of an image at inference, whatever its size or how its outputs are written.

    ``tile_size`` given: squares of that edge (:func:`plan_tiles`). By default: rectangular
    tiles of at most :func:`default_tile_pixels` for the compute ``precision``.
    """
    budget = default_tile_pixels(halo, divisor, precision)
    return plan_tiles(height, width, divisor, halo, tile_size, budget)


def default_batch_size(plan: TilePlan) -> int:
    """Tiles per batch when none is given: about ``DEFAULT_BATCH_PIXELS`` per batch (at least one tile).

    Tiles of several images share a batch (:func:`lib.inference.tiled.zone_stream`), so the count
    is not capped by one image's tiles.
    """
    return int(max(1, DEFAULT_BATCH_PIXELS // plan.tile_pixels))


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
