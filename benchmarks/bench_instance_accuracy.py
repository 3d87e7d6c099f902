#!/usr/bin/env python3
"""Instance-segmentation accuracy: train ``train_unet.py --target instance`` with its default
settings for a wall-time budget on the synthetic example data, then report matching F1 at IoU
0.5 on held-back images, against a classical baseline (Otsu threshold + distance-transform
watershed, :func:`lib.instances.classical.classical_baseline`) on the same images.

Training data: ``data/generate.py`` images (seed 0), split 80/20 by image into the training
and validation databases (``build_lmdb.py --mask_type instance``). Held-back images:
generated with another seed, never seen in training or model selection. Each held-back image
is predicted whole (it fits), the channel maps go through the model's recorded
post-processing (``model.json``), and predicted objects are matched one-to-one with the true
ones (:func:`lib.scoring.metrics.match_instances`). Also reported: how many true objects touch
another object (an 8-neighbour of a different id), the case a threshold cannot separate.

    python benchmarks/bench_instance_accuracy.py [--minutes 15] [--train_images 24] [--test_images 8]
        [--channels "F,C,Db;F,R;F,H,V"]

``--channels`` trains one model per channel set (``;``-separated, each as ``--instance_channels``
takes it), each with the same budget on the same data, and reports for each F1@0.5, PQ@0.5 and
the DSB-2018 score (the mean over IoU thresholds 0.50, 0.55, ..., 0.95 of TP / (TP + FP + FN)).
``--target_speed`` instead times the target computation (CPU ms per 256 x 256 patch of 40
generated objects, the work of the reader workers) for each channel set, and exits.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
THRESHOLDS = (0.3, 0.5, 0.75)
DSB_THRESHOLDS = tuple(round(0.5 + 0.05 * k, 2) for k in range(10))


def touching_objects(labels: np.ndarray) -> int:
    """Objects with at least one 8-neighbour pixel of a different non-zero id."""
    from scipy import ndimage

    labels = labels.astype(np.int64)
    background_high = np.where(labels > 0, labels, 2 ** 40)  # (the int64 maximum overflows in scipy)
    high = ndimage.maximum_filter(labels, size=3, mode="nearest")  # a larger id next door
    low = ndimage.minimum_filter(background_high, size=3, mode="nearest")  # a smaller non-zero id next door
    contact = (labels > 0) & ((high != labels) | (low != labels))
    return int(len(np.unique(labels[contact])))


def predict_instances(run: Path, images: list[np.ndarray], tta: bool = False) -> list[np.ndarray]:
    """Whole-image prediction with the best model through the toolkit's predictor (the model's own
    normalisation, per-image percentiles by default), then the model's post-processing."""
    from lib.common.device import quiet_tensorflow_logs
    from lib.inference.predictor import load_predictor
    from lib.instances.postprocess import PostProcessConfig, postprocess

    quiet_tensorflow_logs()

    meta = json.loads((run / "model.json").read_text())
    config = PostProcessConfig.from_dict(meta["instance"]["postprocess"])
    predictor = load_predictor(run, tta=tta)
    divisor = predictor.size_divisor
    out = []
    for image in images:
        h, w = image.shape[:2]
        x = image.reshape(h, w, -1)
        statistics = predictor.image_statistics(x)
        x = np.pad(x, ((0, -h % divisor), (0, -w % divisor), (0, 0)), mode="reflect")
        maps, _ = predictor.predict_batch(x[np.newaxis], statistics)
        out.append(postprocess(np.asarray(maps[0, :h, :w], np.float32), config))
    return out


def score(truths: list[np.ndarray], predictions: list[np.ndarray]) -> dict:
    from lib.scoring.metrics import match_instances, pool_stats

    levels = tuple(sorted(set(THRESHOLDS) | set(DSB_THRESHOLDS)))
    matchings = [match_instances(t, p, thresholds=levels) for t, p in zip(truths, predictions)]
    pooled = pool_stats(matchings)
    dsb = [pooled[t].tp / max(pooled[t].tp + pooled[t].fp + pooled[t].fn, 1) for t in DSB_THRESHOLDS]
    per_image_f1 = [m.stats[0.5].f1 for m in matchings]
    result = {f"f1@{t}": round(float(pooled[t].f1), 4) for t in THRESHOLDS}
    result.update({"pq@0.5": round(float(pooled[0.5].panoptic_quality), 4),
                   "precision@0.5": round(float(pooled[0.5].precision), 4),
                   "recall@0.5": round(float(pooled[0.5].recall), 4),
                   "mean_per_image_f1@0.5": round(float(np.nanmean(per_image_f1)), 4),
                   "dsb2018": round(float(np.mean(dsb)), 4),
                   "objects_true": int(pooled[0.5].n_true), "objects_predicted": int(pooled[0.5].n_pred)})
    return result


def target_speed(channel_sets: list[str], repeats: int = 5) -> dict:
    """CPU ms (process time) per 256 x 256 patch of 40 generated objects, per channel set."""
    from data.generate import synthesize
    from lib.reader.targets import make_targets, parse_instance_channels

    rng = np.random.default_rng(0)
    patches = [synthesize(rng, 256, 256, n_objects=(40, 41))[1] for _ in range(repeats)]
    out = {}
    for text in channel_sets:
        spec = parse_instance_channels(text)
        make_targets(patches[0], spec)
        start = time.process_time()
        for labels in patches:
            make_targets(labels, spec)
        out[text] = round((time.process_time() - start) / repeats * 1000, 2)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=15.0, help="training wall-time budget (--max_minutes)")
    parser.add_argument("--train_images", type=int, default=24, help="generated images for training + validation")
    parser.add_argument("--test_images", type=int, default=8, help="held-back generated images")
    parser.add_argument("--train_args", default="", help="extra train_unet.py flags (default: none = defaults)")
    parser.add_argument("--keep", default=None, help="keep data and run in this folder")
    parser.add_argument("--channels", default="F,C,Db",
                        help="';'-separated instance channel sets, one model each (default: F,C,Db)")
    parser.add_argument("--target_speed", action="store_true", help="only time the targets of each channel set")
    parser.add_argument("--tta", action="store_true",
                        help="also score each model with test-time augmentation (8 flips and rotations)")
    parser.add_argument("--score_only", action="store_true",
                        help="with --keep: score the runs already in that folder (run0, run1, ...) again, no training")
    args = parser.parse_args()
    channel_sets = [c.strip() for c in args.channels.split(";") if c.strip()]
    if args.target_speed:
        print(json.dumps({"machine": f"{platform.machine()}, {os.cpu_count()} cores",
                          "ms_per_256px_patch_40_objects": target_speed(channel_sets)}))
        return 0

    from data.generate import generate_dataset
    from lib.instances.classical import classical_baseline
    from lib.store.images import read_image, read_mask

    results: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "minutes": args.minutes,
                     "train_args": args.train_args, "channels": channel_sets}
    with tempfile.TemporaryDirectory(prefix="bench_instances_") as tmp_name:
        work = Path(args.keep) if args.keep else Path(tmp_name)
        if args.score_only and not (args.keep and (work / "test/images").is_dir()):
            print("--score_only needs --keep FOLDER holding an earlier run of this benchmark", file=sys.stderr)
            return 2
        if not args.score_only:
            generate_dataset(work / "train", n_images=args.train_images, n_experts=0, seed=0)
            generate_dataset(work / "test", n_images=args.test_images, n_experts=0, seed=1)
            subprocess.run([sys.executable, str(ROOT / "build_lmdb.py"), "--image_folder", str(work / "train/images"),
                            "--mask_folder", str(work / "train/instances"), "--output_folder", str(work / "db"),
                            "--dataset_name", "cells", "--mask_type", "instance", "--train_fraction", "0.8",
                            "--seed", "0", "--quiet", "--overwrite"], check=True, stdout=subprocess.DEVNULL)
        keys = sorted(p.stem for p in (work / "test/images").glob("*.tif"))
        images = [read_image(work / "test/images" / f"{k}.tif") for k in keys]
        truths = [read_mask(work / "test/instances" / f"{k}.tif").astype(np.int64) for k in keys]
        results["held_back"] = {"images": len(keys), "objects": int(sum(len(np.unique(t)) - 1 for t in truths)),
                                "touching_objects": sum(touching_objects(t) for t in truths)}
        results["models"] = {}
        for n, channels in enumerate(channel_sets):
            run = work / f"run{n}"
            start = time.perf_counter()
            train = [sys.executable, str(ROOT / "train_unet.py"), "--train_database", str(work / "db/train-cells.lmdb"),
                     "--test_database", str(work / "db/test-cells.lmdb"), "--output_dir", str(run), "--target",
                     "instance", "--instance_channels", channels, "--max_minutes", str(args.minutes)]
            proc = subprocess.run(["true"] if args.score_only else train + args.train_args.split(),
                                  capture_output=True, text=True)
            wall = time.perf_counter() - start
            if proc.returncode != 0:
                print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
                results["error"] = f"train_unet.py exit {proc.returncode} for --instance_channels {channels}"
                print(json.dumps(results))
                return 1
            meta = json.loads((run / "model.json").read_text())
            steps = json.loads((run / "checkpoint" / "state.json").read_text())["step"]
            entry = {"training": {"wall_minutes": None if args.score_only else round(wall / 60, 2), "steps": steps,
                                  "best_step": meta["best"]["step"],
                                  "validation_f1@0.5": round(float(meta["best"]["f1"]), 4),
                                  "planes": len(meta["instance"]["channels"])}}
            start = time.perf_counter()
            entry.update(score(truths, predict_instances(run, images)))
            entry["seconds"] = round(time.perf_counter() - start, 2)
            if args.tta:
                entry["tta"] = score(truths, predict_instances(run, images, tta=True))
            results["models"][channels] = entry
            print(f"{channels}: {json.dumps(entry)}", flush=True)
        start = time.perf_counter()
        baseline = [classical_baseline(image[..., 0] if image.ndim == 3 else image) for image in images]
        results["baseline"] = score(truths, baseline)
        results["baseline"]["seconds"] = round(time.perf_counter() - start, 2)
        for name in ("held_back", "baseline"):
            print(f"{name}: {json.dumps(results[name])}", flush=True)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
