"""Star-convex polygon targets (StarDist): per pixel, the distance to its object's boundary along
N evenly spaced rays.

Ray ``k`` of ``N`` points at angle ``2 pi k / N`` measured from the +x axis (column) towards +y
(row, downwards): direction ``(dy, dx) = (sin, cos)``. From an object pixel, the ray is sampled at
``t = 1, 2, ...`` pixels, each sample rounded to the nearest pixel (halves up). The first sample
that falls on another id (background, another object, or outside the patch) ends the ray at
step ``t``; the distance is ``t - 1 + 0.5 / max(|dy|, |dx|)``: the last sample inside plus half a
pixel along the dominant axis (so along an axis the ray ends on the edge of the last pixel, a
square of side ``2a + 1`` has distance ``a + 0.5`` from its centre). Background pixels have 0.

The network learns the distances encoded into [0, 1) as ``d / (d + RAY_SCALE)`` (one fixed scale,
so that post-processing can decode them without knowing the run: inference clips non-binary
channels to [0, 1]); :func:`decode_rays` is the inverse. Rays in pixels are not capped.

Vectorised: the rays of a pixel are handled in groups of 4 consecutive rays (fewer when ``N`` is not
a multiple of 4); one row per (pixel, group), rows ordered by group, so that one step's 4 sample
offsets are the same for a whole run of rows. Every step gathers the label under each row's
samples at once (one ``np.take`` on the flattened, padded labels), and keeps per ray an "alive"
flag (every sample so far on the object) and its count of samples inside. Every 4 steps the rows
whose 4 rays have all ended are written out and dropped, so the work is about the sum over rows
of the longest ray of the group (rays of nearby angles have similar lengths) plus at most 3
steps; the ended rays of a running row keep stepping, but no longer count. ``grid`` 2 computes every other row and column only
(StarDist's ``grid``), a quarter of the work.
"""

from __future__ import annotations

import numpy as np

RAY_SCALE = 16.0  # px: a distance d is learnt as d / (d + RAY_SCALE)
RAY_PREFIX = "R"
_EVERY = 4  # steps between two compactions of the rays still running


def ray_directions(n_rays: int) -> tuple[np.ndarray, np.ndarray]:
    """``(dy, dx)``, each ``(n_rays,)`` float64: unit vectors at angles ``2 pi k / n_rays``."""
    angles = 2.0 * np.pi * np.arange(n_rays) / n_rays
    dy, dx = np.sin(angles), np.cos(angles)
    # exact zeros and ones on the axes (sin(pi) is 1.2e-16, which would round differently)
    dy[np.abs(dy) < 1e-12] = 0.0
    dx[np.abs(dx) < 1e-12] = 0.0
    return dy, dx


def star_distances(labels: np.ndarray, n_rays: int = 32, grid: int = 1, offset: tuple[int, int] = (0, 0)
                   ) -> np.ndarray:
    """Distances in pixels from every object pixel to its object's boundary along ``n_rays`` rays.

    Parameters
    ----------
    labels : (H, W) integer labels, 0 = background (any non-negative ids; objects may touch).
    n_rays : number of rays (>= 3).
    grid : compute the rays of every ``grid``-th pixel along each axis only (rows
        ``offset[0] + k grid``, columns ``offset[1] + k grid``), as StarDist's ``grid`` option; the
        others stay 0 and the ray loss ignores them (it weights by ``distance > 0``). 2 makes this
        4 times faster.
    offset : ``(row, column)`` of the first grid pixel, each in ``[0, grid)``. The reader varies it
        from patch to patch (:func:`grid_offset`): a network sees every pixel parity supervised.
        With a fixed offset, a UNet (whose pooling makes its output depend on the position modulo
        16) learnt the rays on the grid pixels only and returned arbitrary rays between them, which
        made every polygon of a 5-minute run far too large or empty.

    Returns
    -------
    (H, W, n_rays) float32, 0 on background.
    """
    h, w = labels.shape
    out = np.zeros((h, w, n_rays), np.float32)
    oy, ox = (int(v) for v in offset)
    if not (0 <= oy < grid and 0 <= ox < grid):
        raise ValueError(f"offset must be in [0, grid={grid}) along each axis; got {offset}")
    gy, gx = np.nonzero(labels[oy::grid, ox::grid])
    if gy.size == 0:
        return out
    ys, xs = gy * grid + oy, gx * grid + ox
    # A one-pixel sentinel ring around the patch: each step moves at most one pixel per axis,
    # so a ray that leaves the patch ends on the ring.
    padded = np.full((h + 2, w + 2), -1, np.int64 if labels.max() >= 2 ** 31 else np.int32)
    padded[1:-1, 1:-1] = labels
    flat = padded.ravel()
    wp = w + 2
    dy, dx = ray_directions(n_rays)
    max_steps = h + w + 2
    t = np.arange(1, max_steps + 1)
    offsets = (np.floor(t * dy[:, None] + 0.5).astype(np.intp) * wp
               + np.floor(t * dx[:, None] + 0.5).astype(np.intp))  # (n_rays, max_steps), flat in padded

    # rows: (pixel, group of `lanes` consecutive rays), group-major, so that a step's offsets are one
    # constant run per group; a row is dropped (every `_EVERY` steps) once all its rays have ended
    lanes = next((g for g in (4, 3, 2) if n_rays % g == 0), 1)
    groups = n_rays // lanes
    table = np.ascontiguousarray(offsets.reshape(groups, lanes, max_steps).transpose(2, 1, 0))  # (step, lane, group)
    n = ys.size
    rows = groups * n
    start0 = ((ys + 1) * wp + xs + 1).astype(np.intp)
    start = np.tile(start0, groups)[None]
    own = np.tile(flat[start0], groups)[None]
    row_id = np.arange(rows)  # group * n + pixel, stays sorted
    counts = np.full(groups, n)
    count_type = np.uint16 if max_steps < 2 ** 16 else np.int32
    inside_count = np.zeros((lanes, rows), count_type)  # samples inside so far, while alive
    alive = np.ones((lanes, rows), bool)
    result = np.zeros((lanes, rows), count_type)
    lane_base = (np.arange(lanes) * rows)[:, None]
    label_buffer, inside_buffer = np.empty(lanes * rows, flat.dtype), np.empty(lanes * rows, bool)
    for step in range(max_steps):
        at = np.repeat(table[step], counts, axis=1)
        at += start
        size = at.size
        # rays that ended step on past the ring: 'wrap' keeps their (ignored) samples in the array
        sample = np.take(flat, at, mode="wrap", out=label_buffer[:size].reshape(at.shape))
        alive &= np.equal(sample, own, out=inside_buffer[:size].reshape(at.shape))
        inside_count += alive
        if step % _EVERY == _EVERY - 1:
            keep = np.logical_or.reduce(alive, 0)
            if not keep.all():
                done = np.flatnonzero(~keep)
                np.put(result, row_id[done] + lane_base, np.take(inside_count, done, axis=1))
                kept = np.flatnonzero(keep)
                if kept.size == 0:
                    break
                start, own, row_id = np.take(start, kept, axis=1), np.take(own, kept, axis=1), row_id[kept]
                inside_count, alive = np.take(inside_count, kept, axis=1), np.take(alive, kept, axis=1)
                counts = np.diff(np.searchsorted(row_id, np.arange(groups + 1) * n))
    else:
        np.put(result, row_id + lane_base, inside_count)
    # the ray left at sample (count + 1); the boundary is taken half a pixel (along the dominant
    # axis) beyond the last sample inside
    correction = (0.5 / np.maximum(np.abs(dy), np.abs(dx))).astype(np.float32)
    survived = result.reshape(lanes, groups, n).transpose(2, 1, 0).reshape(n, n_rays)
    out[ys, xs] = survived.astype(np.float32) + correction
    return out


def grid_offset(labels: np.ndarray, grid: int) -> tuple[int, int]:
    """The ray grid's offset for one patch: its object pixel count, modulo ``grid**2``, as
    ``(row, column)``. Deterministic (the same patch gets the same targets) and spread evenly over
    the ``grid**2`` parities by the augmentation's random crops, flips and scales."""
    if grid <= 1:
        return 0, 0
    k = int(np.count_nonzero(labels)) % (grid * grid)
    return k // grid, k % grid


def encode_rays(distances: np.ndarray) -> np.ndarray:
    """Distances in px -> the learnt values ``d / (d + RAY_SCALE)`` in [0, 1)."""
    distances = np.asarray(distances, np.float32)
    return distances / (distances + np.float32(RAY_SCALE))


def decode_rays(values: np.ndarray) -> np.ndarray:
    """Learnt values in [0, 1] -> distances in px (values are clipped to [0, 1 - 1e-6] first)."""
    values = np.clip(np.asarray(values, np.float32), 0.0, 1.0 - 1e-6)
    return np.float32(RAY_SCALE) * values / (1.0 - values)


def ray_names(n_rays: int) -> tuple[str, ...]:
    """The plane names of ``n_rays`` rays: ``R0``, ``R1``, ..."""
    return tuple(f"{RAY_PREFIX}{k}" for k in range(n_rays))


def ray_count(names) -> int:
    """How many ray planes ``R0``.. ``names`` holds (0 when none)."""
    return sum(1 for name in names if is_ray_name(name))


def is_ray_name(name) -> bool:
    return isinstance(name, str) and len(name) > 1 and name[0] == RAY_PREFIX and name[1:].isdigit() \
        and (name[1:] == "0" or name[1] != "0")


