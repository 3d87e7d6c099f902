"""Benchmark of lib/fusion/ (staple.py, vote.py) against SimpleITK: 5 experts, 2048x2048 masks, seconds per image.

    .venv/bin/python benchmarks/bench_fusion.py [--size 2048] [--experts 5] [--repeats 5]

Cases (seeded synthetic masks, generated in memory; file I/O is not timed):

* binary: a smooth field thresholded; each expert moves the boundary with its own
  low-frequency offset and flips 1% of pixels.
* structured 4-class: the same with four classes.
* noisy 4-class: every expert labels every pixel at random (uniform over 4 classes), the
  case where multi-class STAPLE converges slowly (SimpleITK: about 324 s here).

Timed: ours ``staple_binary`` (with the probability map, as SimpleITK returns it),
``staple_multiclass``, ``majority_vote``; SimpleITK ``STAPLE``, ``MultiLabelSTAPLE`` and
``LabelVoting`` on images converted beforehand (conversion not timed). Figures are medians
of ``--repeats`` runs (SimpleITK: ``--sitk_repeats``). SimpleITK's noisy multi-class run is
capped at ``--sitk_noisy_iterations`` and at a quarter of that; the difference gives its cost per
iteration, extrapolated to the iterations our run needed to converge (the same stopping
rule, though SimpleITK starts from a slightly different point and may need more or fewer):
the figure is an estimate and is named so. The last line printed is one JSON object of figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
from pathlib import Path

import numpy as np
from timing import timed  # noqa: E402  (benchmarks/timing.py)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib.fusion import staple as fusion_staple
from lib.fusion import vote as fusion_vote


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--size", type=int, default=2048, help="image height and width")
    parser.add_argument("--experts", type=int, default=5, help="number of experts")
    parser.add_argument("--repeats", type=int, default=5, help="runs of ours per figure (median)")
    parser.add_argument("--sitk_repeats", type=int, default=3, help="runs of SimpleITK per figure (median)")
    parser.add_argument("--sitk_noisy_iterations", type=int, default=20,
                        help="cap on SimpleITK MultiLabelSTAPLE iterations in the noisy case")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("size", "experts", "repeats", "sitk_repeats", "sitk_noisy_iterations"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1; got {getattr(args, name)}")
    if args.experts < 2:
        parser.error(f"--experts must be >= 2; got {args.experts}")
    return args


def smooth_noise(shape: tuple[int, int], rng: np.random.Generator, scale: int) -> np.ndarray:
    """Low-frequency noise in about [-1, 1]: a coarse random grid, upsampled bilinearly."""
    from scipy import ndimage

    coarse = rng.standard_normal((shape[0] // scale + 2, shape[1] // scale + 2))
    return ndimage.zoom(coarse, scale, order=1)[:shape[0], :shape[1]] / 2.0


def structured_experts(size: int, experts: int, n_classes: int, rng: np.random.Generator) -> list[np.ndarray]:
    field = smooth_noise((size, size), rng, 128)
    edges = np.quantile(field, np.linspace(0, 1, n_classes + 1)[1:-1])
    masks = []
    for _ in range(experts):
        moved = field + 0.08 * smooth_noise((size, size), rng, 64)
        mask = np.digitize(moved, edges).astype(np.uint8)
        flip = rng.random(mask.shape) < 0.01
        mask[flip] = rng.integers(0, n_classes, int(flip.sum()))
        masks.append(mask)
    return masks


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import SimpleITK as sitk

    rng = np.random.default_rng(args.seed)
    shape = f"{args.experts} experts x {args.size}x{args.size}"
    figures: dict[str, object] = {"benchmark": "fusion", "shape": shape, "repeats": args.repeats,
                                  "sitk_repeats": args.sitk_repeats, "machine": platform.machine(),
                                  "cpus": os.cpu_count(), "python": platform.python_version(),
                                  "numpy": np.__version__, "simpleitk": sitk.Version.VersionString()}

    def to_sitk(masks):
        return [sitk.GetImageFromArray(m) for m in masks]

    # Binary
    masks = structured_experts(args.size, args.experts, 2, rng)
    images = to_sitk(masks)
    ours, result = timed(lambda: fusion_staple.staple_binary(masks, return_probabilities=True), args.repeats)
    staple = sitk.STAPLEImageFilter()
    theirs, probabilities = timed(lambda: sitk.GetArrayFromImage(staple.Execute(images)), args.sitk_repeats)
    figures.update(binary_staple_s=ours, binary_staple_iterations=result.iterations, sitk_binary_staple_s=theirs,
                   sitk_binary_staple_iterations=staple.GetElapsedIterations() + 1,
                   binary_staple_max_probability_difference=float(np.abs(result.probabilities - probabilities).max()))
    print(f"binary STAPLE, {shape}: ours {ours:.3f} s ({result.iterations} iterations), SimpleITK {theirs:.3f} s")
    ours, result = timed(lambda: fusion_vote.majority_vote(masks), args.repeats)
    theirs, voted = timed(lambda: sitk.GetArrayFromImage(sitk.LabelVoting(images, 0)), args.sitk_repeats)
    figures.update(binary_vote_s=ours, sitk_binary_vote_s=theirs,
                   binary_vote_identical=bool(np.array_equal(result.labels, voted)))
    print(f"binary majority vote: ours {ours:.3f} s, SimpleITK LabelVoting {theirs:.3f} s")

    # Structured 4-class
    masks = structured_experts(args.size, args.experts, 4, rng)
    images = to_sitk(masks)
    ours, result = timed(lambda: fusion_staple.staple_multiclass(masks), args.repeats)
    multi = sitk.MultiLabelSTAPLEImageFilter()
    multi.SetLabelForUndecidedPixels(0)
    theirs, labels = timed(lambda: sitk.GetArrayFromImage(multi.Execute(images)), args.sitk_repeats)
    figures.update(multiclass_staple_s=ours, multiclass_staple_iterations=result.iterations,
                   sitk_multiclass_staple_s=theirs,
                   multiclass_staple_label_agreement=float(np.mean(result.labels == labels)))
    print(f"4-class STAPLE (structured): ours {ours:.3f} s ({result.iterations} iterations), "
          f"SimpleITK {theirs:.3f} s, labels agree on {np.mean(result.labels == labels):.6f}")
    ours, result = timed(lambda: fusion_vote.majority_vote(masks), args.repeats)
    theirs, voted = timed(lambda: sitk.GetArrayFromImage(sitk.LabelVoting(images, 0)), args.sitk_repeats)
    figures.update(multiclass_vote_s=ours, sitk_multiclass_vote_s=theirs,
                   multiclass_vote_identical=bool(np.array_equal(result.labels, voted)))
    print(f"4-class majority vote: ours {ours:.3f} s, SimpleITK LabelVoting {theirs:.3f} s")

    # Noisy 4-class
    masks = [rng.integers(0, 4, (args.size, args.size)).astype(np.uint8) for _ in range(args.experts)]
    images = to_sitk(masks)
    ours, result = timed(lambda: fusion_staple.staple_multiclass(masks), max(1, args.repeats // 2))
    # SimpleITK at two iteration caps: the difference gives the cost of one iteration without set-up.
    cap = args.sitk_noisy_iterations
    short = max(1, cap // 4)
    multi.SetMaximumNumberOfIterations(short)
    capped_short, _ = timed(lambda: multi.Execute(images), args.sitk_repeats)
    multi.SetMaximumNumberOfIterations(cap)
    capped, _ = timed(lambda: multi.Execute(images), args.sitk_repeats)
    per_iteration = (capped - capped_short) / (cap - short) if cap > short else capped / cap
    estimate = capped + per_iteration * (result.iterations - cap)
    logging.getLogger(fusion_staple.__name__).setLevel(logging.ERROR)  # the capped run warns that it did not converge
    ours_capped, _ = timed(lambda: fusion_staple.staple_multiclass(masks, max_iterations=cap), args.repeats)
    figures.update(noisy_multiclass_staple_s=ours, noisy_multiclass_staple_iterations=result.iterations,
                   noisy_multiclass_staple_converged=result.converged,
                   noisy_multiclass_staple_capped_s=ours_capped,
                   sitk_noisy_multiclass_staple_capped_s=capped, sitk_noisy_iterations_cap=cap,
                   sitk_noisy_seconds_per_iteration=per_iteration,
                   sitk_noisy_multiclass_staple_estimated_s=estimate)
    print(f"4-class STAPLE (noisy): ours {ours:.3f} s to convergence ({result.iterations} iterations); "
          f"both capped at {cap} iterations: ours {ours_capped:.3f} s, SimpleITK {capped:.3f} s "
          f"({per_iteration:.3f} s per iteration); SimpleITK to {result.iterations} iterations, estimated: "
          f"{estimate:.0f} s")
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
