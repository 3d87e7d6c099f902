#!/usr/bin/env python3
"""Training-step throughput: the full step with the real reader against preloaded tensors,
float32 against mixed bfloat16, with and without XLA.

Data: the 60 shared NIST 256x256 phase-contrast tiles (../shared/data/nist_phase_contrast),
built into a temporary database; default augmentation; 2 classes. Every configuration runs
the trainer's own step (``lib.training.step.make_train_step``) on one device: ``--warmup`` steps
(tracing) are discarded, then ``--steps`` steps are timed one by one; figures are medians.

NIST's own code on this 2-core machine, 256x256x1, 2 classes, batch 4 (the issue's anchors):
FC-DenseNet56 3.0 s/step (1.33 images/s), UNet 4.5 s/step (0.89 images/s).

    python benchmarks/bench_train.py [--architectures unet fc-densenet56] [--batch_sizes 4] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
NIST = ROOT.parent / "shared" / "data" / "nist_phase_contrast"
NIST_IMAGES_PER_S = {"unet": 0.89, "fc-densenet56": 1.33}
MODES = ("reader_f32", "preloaded_f32", "preloaded_f32_xla", "preloaded_bf16", "reader_bf16",
         "reader_f32_kerasbn", "reader_bf16_kerasbn")
# *_kerasbn: the same model with Keras' own BatchNormalization instead of the fused kernel
# (lib.models.layers.FusedBatchNormalization), to measure what the fused kernel buys.


def build_db(tmp: Path) -> Path:
    from lib.store.build import BuildConfig, build_databases

    build_databases(BuildConfig(image_folder=str(NIST / "images"), mask_folder=str(NIST / "masks"),
                                output_folder=str(tmp), dataset_name="nist", tile_size=256, train_fraction=0.8,
                                workers=0), progress=False, log=lambda m: None)
    return tmp / "train-nist.lmdb"


def run_mode(mode: str, architecture: str, batch: int, database: Path, steps: int, warmup: int,
             reader_count: int) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    import lib.models.blocks as blocks
    from lib.models import build_model
    from lib.reader.imagereader import ImageReader, as_tf_dataset
    from lib.training.losses import make_loss
    from lib.training.step import make_train_step

    keras.backend.clear_session()
    keras.mixed_precision.set_global_policy("mixed_bfloat16" if "_bf16" in mode else "float32")
    keras.utils.set_random_seed(0)
    strategy = tf.distribute.get_strategy()
    fused = blocks.FusedBatchNormalization
    if mode.endswith("_kerasbn"):
        blocks.FusedBatchNormalization = keras.layers.BatchNormalization
    try:
        model = build_model(architecture, 1, 2)
    finally:
        blocks.FusedBatchNormalization = fused
    optimizer = keras.optimizers.AdamW(learning_rate=1e-4, weight_decay=1e-4)
    optimizer.build(model.trainable_variables)
    step = make_train_step(strategy, model, optimizer, make_loss("ce", 2), batch, jit_compile="_xla" in mode)
    reader = ImageReader(database, batch, mode="train", reader_count=reader_count, seed=0)
    times = []
    with reader:
        if mode.startswith("reader"):
            dataset = as_tf_dataset(reader).repeat()
        else:
            first = reader.get_batch().copy()
            dataset = tf.data.Dataset.from_tensors((first.images, first.labels)).repeat()
        iterator = iter(strategy.distribute_datasets_from_function(lambda context: dataset))
        for i in range(warmup + steps):
            start = time.perf_counter()
            loss = float(step(iterator))
            if i >= warmup:
                times.append(time.perf_counter() - start)
        stats = reader.input_stats()
    keras.mixed_precision.set_global_policy("float32")
    median = statistics.median(times)
    return {"s_per_step": round(median, 3), "images_per_s": round(batch / median, 3), "final_loss": round(loss, 4),
            "steps_timed": len(times), "input_wait_fraction": round(stats.waiting_fraction, 3)
            if mode.startswith("reader") else None, "finite": bool(np.isfinite(loss))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--architectures", nargs="+", default=["unet", "fc-densenet56"])
    parser.add_argument("--batch_sizes", nargs="+", type=int, default=[4])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reader_count", type=int, default=1)
    args = parser.parse_args()
    results: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "steps": args.steps, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        database = build_db(Path(tmp))
        for architecture in args.architectures:
            for batch in args.batch_sizes:
                key = f"{architecture}_b{batch}"
                entry = results["runs"][key] = {}
                for mode in args.modes:
                    entry[mode] = run_mode(mode, architecture, batch, database, args.steps, args.warmup,
                                           args.reader_count)
                    print(f"{key} {mode}: {json.dumps(entry[mode])}", flush=True)
                if "reader_f32" in entry and "preloaded_f32" in entry:
                    entry["reader_overhead_pct"] = round(
                        100 * (entry["reader_f32"]["s_per_step"] / entry["preloaded_f32"]["s_per_step"] - 1), 1)
                if architecture in NIST_IMAGES_PER_S and batch == 4:
                    best = max(v["images_per_s"] for k, v in entry.items() if isinstance(v, dict)
                               and k.startswith("reader"))
                    entry["vs_nist_full_step"] = round(best / NIST_IMAGES_PER_S[architecture], 2)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
