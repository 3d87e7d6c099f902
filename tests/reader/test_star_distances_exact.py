"""star_distances (grouped, compacting rays) against the former implementation, kept here as the
oracle: bit-for-bit equal float32 on random label images of every kind the reader can meet."""

from __future__ import annotations

import numpy as np
import pytest

from data.generate import synthesize
from lib.reader.targets_stardist import ray_directions, star_distances


def reference_star_distances(labels: np.ndarray, n_rays: int = 32, grid: int = 1,
                             offset: tuple[int, int] = (0, 0)) -> np.ndarray:
    """The former star_distances, unchanged: all (pixel, ray) pairs step together, a pair leaving
    the active set at its first sample off its object."""
    h, w = labels.shape
    out = np.zeros((h, w, n_rays), np.float32)
    on_grid = np.zeros((h, w), bool)
    oy, ox = (int(v) for v in offset)
    if not (0 <= oy < grid and 0 <= ox < grid):
        raise ValueError(f"offset must be in [0, grid={grid}) along each axis; got {offset}")
    on_grid[oy::grid, ox::grid] = True
    ys, xs = np.nonzero((labels != 0) & on_grid)
    if ys.size == 0:
        return out
    padded = np.full((h + 2, w + 2), -1, np.int64 if labels.max() >= 2 ** 31 else np.int32)
    padded[1:-1, 1:-1] = labels
    flat = padded.ravel()
    wp = w + 2
    dy, dx = ray_directions(n_rays)
    max_steps = h + w + 2
    t = np.arange(1, max_steps + 1)[None, :]
    offsets = (np.floor(t * dy[:, None] + 0.5).astype(np.int64) * wp
               + np.floor(t * dx[:, None] + 0.5).astype(np.int64))  # (n_rays, max_steps), flat in padded
    n = ys.size
    pair_at = np.repeat(((ys + 1) * wp + xs + 1).astype(np.int64), n_rays)
    pair_ray = np.tile(np.arange(n_rays), n)
    pair_own = flat[pair_at]
    pair_index = np.arange(n * n_rays)
    survived = np.zeros(n * n_rays, np.float32)
    offsets = np.ascontiguousarray(offsets.T)  # (max_steps, n_rays): one small row per step
    for step in range(max_steps):
        inside = np.take(flat, pair_at + np.take(offsets[step], pair_ray)) == pair_own
        if not inside.all():
            survived[pair_index[~inside]] = step
            pair_at, pair_ray, pair_own, pair_index = (a[inside] for a in (pair_at, pair_ray, pair_own, pair_index))
            if pair_index.size == 0:
                break
    correction = (0.5 / np.maximum(np.abs(dy), np.abs(dx))).astype(np.float32)
    out[ys, xs] = survived.reshape(n, n_rays) + correction[None, :]
    return out


def shapes(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Rectangles and discs, overlapping (the later wins, so objects touch), some across the border,
    plus a few one-pixel objects and a sprinkle of noise ids."""
    labels = np.zeros((h, w), np.int64)
    yy, xx = np.mgrid[:h, :w]
    for k in range(int(rng.integers(1, 12))):
        cy, cx = rng.integers(-3, h + 3), rng.integers(-3, w + 3)
        ry, rx = rng.integers(1, max(2, h // 2)), rng.integers(1, max(2, w // 2))
        label = int(rng.integers(1, 50))
        if rng.random() < 0.5:
            labels[max(cy - ry, 0):cy + ry, max(cx - rx, 0):cx + rx] = label
        else:
            labels[(yy - cy) ** 2 * rx ** 2 + (xx - cx) ** 2 * ry ** 2 <= (ry * rx) ** 2] = label
    for _ in range(int(rng.integers(0, 4))):
        labels[rng.integers(h), rng.integers(w)] = int(rng.integers(1, 60))
    if rng.random() < 0.3:
        noise = rng.random((h, w)) < 0.1
        labels[noise] = rng.integers(0, 4, int(noise.sum()))
    return labels


def check(labels: np.ndarray, n_rays: int, grid: int, offset: tuple[int, int]) -> None:
    want = reference_star_distances(labels, n_rays, grid, offset)
    got = star_distances(labels, n_rays, grid, offset)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.array_equal(got, want), (n_rays, grid, offset, np.argwhere(got != want)[:5])


@pytest.mark.parametrize("n_rays", [3, 5, 8, 12, 32, 64])
def test_random_shapes_every_grid_and_offset(n_rays):
    rng = np.random.default_rng(n_rays)
    for _ in range(10):
        h, w = int(rng.integers(1, 48)), int(rng.integers(1, 48))
        labels = shapes(rng, h, w)
        grid = int(rng.integers(1, 4))
        for oy in range(grid):
            for ox in range(grid):
                check(labels, n_rays, grid, (oy, ox))


def test_generated_cells():
    rng = np.random.default_rng(0)
    for n_rays, grid in ((32, 2), (32, 1), (12, 3), (6, 2)):
        labels = synthesize(rng, 96, 80, n_objects=(10, 20))[1]
        check(labels, n_rays, grid, (grid - 1, 0))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.uint32, np.int64, bool])
def test_label_types_and_huge_ids(dtype):
    rng = np.random.default_rng(7)
    labels = shapes(rng, 30, 25)
    if dtype is bool:
        labels = labels > 0
    else:
        info = np.iinfo(dtype)
        ids = np.unique(labels[labels > 0])
        big = rng.choice(np.arange(max(1, info.max - 1000), info.max), ids.size, replace=False) \
            if info.max > 2 ** 20 else rng.choice(np.arange(1, info.max), ids.size, replace=False)
        remap = np.zeros(labels.max() + 1, np.int64)
        remap[ids] = big
        labels = remap[labels].astype(dtype)
    for n_rays, grid in ((8, 1), (32, 2)):
        check(labels, n_rays, grid, (0, 1 % grid))


def test_edge_cases():
    for labels in (np.zeros((5, 7), np.int32), np.ones((1, 1), np.int32), np.ones((1, 9), np.int64),
                   np.ones((9, 1), np.int64), np.full((6, 6), 3, np.uint16), np.eye(8, dtype=np.int32),
                   np.arange(1, 50, dtype=np.int32).reshape(7, 7), np.zeros((0, 4), np.int32)):
        for n_rays in (3, 4, 32):
            for grid in (1, 2):
                check(labels, n_rays, grid, (0, 0))
    with pytest.raises(ValueError):
        star_distances(np.ones((4, 4), np.int32), 8, 2, (2, 0))
