"""Benchmark of instance matching statistics and instance post-processing on a 2048x2048 image of ~2000 objects.

    .venv/bin/python benchmarks/bench_instances.py [--size 2048] [--objects 2000] [--repeats 5]

Synthetic, seeded, generated in memory (not timed):

* truth: seeds on a jittered grid, each object the pixels nearer to its seed than to any
  other and within its radius (14-24 px): round cells, some touching.
* prediction: the truth redrawn from moved seeds (1.5 px on average, 10% by 4-8 px) and
  resized radii (10% shrunk to 70%), then 4% of objects missing, 4% extra small objects,
  3% merged with a neighbour (one id over both), 3% split in two halves, ids shuffled to
  non-consecutive uint32 values.

Timed:

(a) ``lib.scoring.metrics.match_instances`` at thresholds 0.3, 0.5, 0.75 (and ``overlaps`` alone),
    after one untimed warm-up call (which pays for the SciPy imports);
(b) ``lib.instances.postprocess.postprocess`` with ``PostProcessConfig.default_for(("F", "C", "Db"))`` on
    maps made from the truth: F foreground, C thick boundaries, Db the distance to the object
    border normalised to [0, 1] per object, each blurred (sigma 1 px) with Gaussian noise
    (sd 0.05) added and clipped to [0, 1]. Reported as Mpixel/s, with its F1 at IoU 0.5
    against the truth. Null when ``lib.instances`` is not there (yet).

Figures are medians of ``--repeats`` runs. The last line printed is one JSON object of figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np
from timing import timed  # noqa: E402  (benchmarks/timing.py)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib.instances.postprocess import PostProcessConfig, postprocess
from lib.scoring import metrics

THRESHOLDS = (0.3, 0.5, 0.75)
CHANNELS = ("F", "C", "Db")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--size", type=int, default=2048, help="image height and width")
    parser.add_argument("--objects", type=int, default=2000, help="number of true objects")
    parser.add_argument("--repeats", type=int, default=5, help="runs per figure (median)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("size", "objects", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1; got {getattr(args, name)}")
    if args.size < 64:
        parser.error(f"--size must be >= 64; got {args.size}")
    return args


def render(shape: tuple[int, int], centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """(H, W) int64 labels 1..n: pixels nearer to centre i than to any other and within ``radii[i]``."""
    from scipy import ndimage

    seeds = np.zeros(shape, bool)
    index = np.full(shape, -1, np.int64)
    y = np.clip(np.round(centres[:, 0]).astype(int), 0, shape[0] - 1)
    x = np.clip(np.round(centres[:, 1]).astype(int), 0, shape[1] - 1)
    seeds[y, x] = True
    index[y, x] = np.arange(len(centres))  # two seeds on one pixel: the later one wins
    distance, (ny, nx) = ndimage.distance_transform_edt(~seeds, return_indices=True)
    nearest = index[ny, nx]
    return np.where(distance <= radii[nearest], nearest + 1, 0)


def synthetic_pair(size: int, n_objects: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Truth (H, W) int32 and a perturbed prediction (H, W) uint32 (see the module docstring)."""
    cells = int(np.ceil(np.sqrt(n_objects)))
    step = size / cells
    grid = (np.stack(np.meshgrid(np.arange(cells), np.arange(cells), indexing="ij"), -1).reshape(-1, 2) + 0.5) * step
    grid = grid[np.sort(rng.choice(len(grid), n_objects, replace=False))]
    centres = grid + rng.uniform(-0.2, 0.2, grid.shape) * step
    radii = rng.uniform(0.3, 0.52, n_objects) * step
    truth = render((size, size), centres, radii)

    moved = centres + rng.normal(0, 1.5, centres.shape)
    far = rng.random(n_objects) < 0.10
    angle = rng.uniform(0, 2 * np.pi, n_objects)
    moved[far] += (rng.uniform(4, 8, n_objects) * np.stack([np.sin(angle), np.cos(angle)]))[:, far].T
    scale = rng.normal(1.0, 0.05, n_objects)
    scale[rng.random(n_objects) < 0.10] = 0.7
    keep = rng.random(n_objects) >= 0.04
    n_extra = int(round(0.04 * n_objects))
    extra = rng.uniform(0, size, (n_extra, 2))
    pred = render((size, size), np.concatenate([moved[keep], extra]),
                  np.concatenate([radii[keep] * scale[keep], rng.uniform(0.15, 0.25, n_extra) * step]))
    n_pred = int(keep.sum()) + n_extra
    # Merge: an object takes the id of the one drawn just before it (a grid neighbour).
    new_id = np.arange(n_pred + 1)
    merged = np.flatnonzero(rng.random(n_pred + 1) < 0.03)
    merged = merged[merged > 1]
    new_id[merged] = merged - 1
    pred = new_id[pred]
    # Split: the lower half of an object (below its centre) gets a new id.
    pred_centres = np.concatenate([[[0.0, 0.0]], moved[keep], extra])
    split = rng.random(n_pred + 1) < 0.03
    split[0] = False
    rows = np.arange(size)[:, None]
    lower = split[pred] & (rows > pred_centres[pred, 0])
    pred = np.where(lower, pred + n_pred + 1, pred)
    # Shuffle to non-consecutive ids.
    ids = np.zeros(2 * n_pred + 2, np.uint32)
    ids[1:] = rng.choice(np.arange(1, 10 * len(ids), dtype=np.uint32), len(ids) - 1, replace=False)
    return truth.astype(np.int32), ids[pred]


def synthetic_maps(truth: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) float32 maps F, C, Db made from ``truth``, blurred and noised (see the module docstring)."""
    from scipy import ndimage
    from skimage.segmentation import find_boundaries

    foreground = truth > 0
    contour = find_boundaries(truth, mode="thick")
    inside = foreground & ~find_boundaries(truth, mode="inner")
    distance = ndimage.distance_transform_edt(inside)
    peak = np.zeros(int(truth.max()) + 1)
    ids = np.unique(truth[foreground])
    peak[ids] = ndimage.maximum(distance, truth, ids)
    border_distance = np.divide(distance, peak[truth], out=np.zeros_like(distance), where=peak[truth] > 0)
    maps = np.stack([foreground, contour, border_distance], axis=-1).astype(np.float32)
    maps = ndimage.gaussian_filter(maps, sigma=(1.0, 1.0, 0.0))
    maps += rng.normal(0, 0.05, maps.shape).astype(np.float32)
    return np.clip(maps, 0.0, 1.0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import scipy

    rng = np.random.default_rng(args.seed)
    truth, pred = synthetic_pair(args.size, args.objects, rng)
    shape = f"{args.size}x{args.size}"
    n_true, n_pred = len(np.unique(truth)) - 1, len(np.unique(pred)) - 1
    figures: dict[str, object] = {"benchmark": "instances", "shape": shape, "true_objects": n_true,
                                  "pred_objects": n_pred, "repeats": args.repeats, "machine": platform.machine(),
                                  "cpus": os.cpu_count(), "python": platform.python_version(),
                                  "numpy": np.__version__, "scipy": scipy.__version__}
    print(f"{shape}: {n_true} true objects, {n_pred} predicted objects (uint32 ids up to {int(pred.max())})")

    # (a) Matching statistics
    metrics.match_instances(truth, pred, THRESHOLDS)  # warm-up: imports
    seconds, matching = timed(lambda: metrics.match_instances(truth, pred, THRESHOLDS), args.repeats)
    overlap_seconds, _ = timed(lambda: metrics.overlaps(truth, pred), args.repeats)
    figures.update(match_instances_s=seconds, overlaps_s=overlap_seconds)
    print(f"match_instances at {', '.join(map(str, THRESHOLDS))}: {seconds:.3f} s "
          f"(overlaps alone {overlap_seconds:.3f} s)")
    for t, stats in matching.stats.items():
        figures[f"f1_at_{t}"] = stats.f1
        figures[f"panoptic_quality_at_{t}"] = stats.panoptic_quality
        print(f"  IoU >= {t}: TP {stats.tp}, FP {stats.fp}, FN {stats.fn}, F1 {stats.f1:.4f}, "
              f"PQ {stats.panoptic_quality:.4f}")

    # (b) Post-processing
    config = PostProcessConfig.default_for(CHANNELS)
    maps = synthetic_maps(truth, rng)
    seconds, labels = timed(lambda: postprocess(maps, config), args.repeats)
    found = metrics.match_instances(truth, labels, (0.5,)).stats[0.5]
    mpixels = args.size * args.size / 1e6
    figures.update(postprocess_s=seconds, postprocess_mpixel_per_s=mpixels / seconds,
                   postprocess_objects=found.n_pred, postprocess_f1_at_0_5=found.f1)
    print(f"post-processing {'+'.join(CHANNELS)} maps {shape}: {seconds:.3f} s, {mpixels / seconds:.2f} "
          f"Mpixel/s; {found.n_pred} objects, F1 {found.f1:.4f} at IoU 0.5 against the truth")
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
