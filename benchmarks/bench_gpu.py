#!/usr/bin/env python3
"""The GPU check: devices, the GPU tests, training and inference speed on one GPU; one JSON line.

    .venv/bin/python benchmarks/bench_gpu.py [--quick] [--budget_s 420] [--skip_tests]

Sections (each recorded in the JSON line, in this order):

- ``devices``: ``nvidia-smi`` (name, memory, driver) and what TensorFlow sees (the trainers'
  device line, compute capabilities, the precision ``auto`` chooses and why);
- ``tests``: ``pytest -m gpu`` (tests that skip without a GPU: mixed precision chosen and
  training, MirroredStrategy over 2 logical GPUs made from one equal to one device);
- ``training``: images/s of the trainer's own step (``lib.training.step.make_train_step``) for
  UNet (64 filters, depth 4) and FC-DenseNet56 at 256 and 512 px, batch 8 and 16, float32 and
  mixed precision (the device's half type: bfloat16 on compute capability >= 8.0, float16 with
  loss scaling below), fed by the real reader (``ImageReader`` worker processes, augmentation)
  and by one preloaded batch; ``input_bound_pct`` = how much slower the reader made the step;
- ``inference``: Mpixel/s and peak GPU memory of exact tiled prediction
  (``lib.inference.tiled.predict_image``) of a 4096 x 4096 image, both models, float32 and auto.

The training data is generated (``data.generate``: 16 images of 512 x 512, 3 classes) into a
temporary database; models have random weights. ``--quick`` (or ``GPU_CHECK_QUICK=1``) shrinks
everything (tiny models, 64/128 px, batch 2/4, a 512 x 512 image) so the script runs end to end
on a CPU in a few minutes: a check of the script, not of speed. ``--budget_s``: sections still
to run when it is spent are skipped and listed in ``skipped`` (the line is always printed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FULL = {"models": {"unet": {"base_filters": 64, "depth": 4}, "fc-densenet56": {}}, "sizes": (256, 512),
        "batches": (8, 16), "steps": 10, "warmup": 3, "image": 4096, "data_size": 512, "n_images": 16}
QUICK = {"models": {"unet": {"base_filters": 8, "depth": 2},
                    "fc-densenet56": {"stem_filters": 8, "growth_rate": 4, "n_layers_per_block": 2, "n_pool": 2}},
         "sizes": (64, 128), "batches": (2, 4), "steps": 2, "warmup": 1, "image": 512, "data_size": 128,
         "n_images": 4}
# Anchor from the issue: NVIDIA's UNet_Medical (TF2, 572 x 572, batch 8, AMP) on one A100 80GB.
ANCHORS = {"nvidia_unet_medical_a100_train_images_s": 119, "nvidia_unet_medical_a100_infer_images_s_b16": 424}


class Clock:
    def __init__(self, budget_s: float):
        self.end = time.monotonic() + budget_s
        self.skipped: list[str] = []

    def left(self) -> float:
        return self.end - time.monotonic()

    def allows(self, what: str, need_s: float = 0.0) -> bool:
        if self.left() > need_s:
            return True
        self.skipped.append(what)
        return False


def nvidia_smi() -> list[dict] | str:
    if shutil.which("nvidia-smi") is None:
        return "nvidia-smi not found"
    fields = "name,memory.total,driver_version,compute_cap"
    done = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True,
                          text=True, timeout=60)
    if done.returncode != 0:
        return f"nvidia-smi failed: {done.stderr.strip()[:300]}"
    return [dict(zip(fields.split(","), (v.strip() for v in line.split(",")))) for line in done.stdout.splitlines()]


def devices() -> dict:
    from lib.common.device import choose_precision, device_facts, device_line

    facts = device_facts()
    auto = choose_precision(None, facts)
    mixed = choose_precision(True, facts)
    return {"nvidia_smi": nvidia_smi(), "tensorflow": device_line(), "gpu_compute_capabilities":
            [list(c) for c in facts.gpu_capabilities], "cpu_bfloat16": facts.cpu_bfloat16,
            "precision_auto": {"precision": auto[0], "reason": auto[1]}, "precision_mixed": mixed[0]}


def gpu_tests(timeout_s: float) -> dict:
    """``pytest -m gpu`` in a subprocess: counts from its JUnit XML."""
    with tempfile.TemporaryDirectory(prefix="gpu_tests_") as tmp:
        report = Path(tmp) / "report.xml"
        start = time.perf_counter()
        try:
            # only the files that hold gpu-marked tests: collecting the whole suite takes a minute
            files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                           if "mark.gpu" in p.read_text(errors="replace"))
            done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu",
                                   f"--junitxml={report}", *files], cwd=ROOT, capture_output=True, text=True,
                                  timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"error": f"pytest -m gpu ran past {timeout_s:.0f} s"}
        result = {"seconds": round(time.perf_counter() - start, 1), "exit_code": done.returncode}
        if report.is_file():
            suite = ElementTree.parse(report).getroot()
            suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
            counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
            result.update(counts, passed=counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"])
            result["cases"] = {case.get("name"): ("failed" if case.find("failure") is not None
                                                  or case.find("error") is not None
                                                  else "skipped" if case.find("skipped") is not None else "passed")
                               for case in suite.iter("testcase")}
        else:
            result["output"] = (done.stdout + done.stderr)[-1000:]
        return result


def make_database(tmp: Path, size: int, n_images: int) -> Path:
    from data.generate import generate_dataset
    from lib.store.build import BuildConfig, build_databases

    generate_dataset(tmp / "data", n_images=n_images, height=size, width=size, n_experts=0, seed=0)
    build_databases(BuildConfig(image_folder=str(tmp / "data/images"), mask_folder=str(tmp / "data/masks"),
                                output_folder=str(tmp / "db"), dataset_name="g", tile_size=size, train_fraction=0.75,
                                number_classes=3, workers=0), progress=False, log=lambda m: None)
    return tmp / "db" / "train-g.lmdb"


def _timed_steps(step, iterator, steps: int, warmup: int) -> tuple[float, float]:
    """(median seconds per step, last loss) after ``warmup`` untimed steps."""
    times, loss = [], float("nan")
    for i in range(warmup + steps):
        start = time.perf_counter()
        loss = float(step(iterator))
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times), loss


def train_model(architecture: str, options: dict, size: int, precision: str, database: Path, spec: dict,
                reader_count: int, clock: Clock) -> dict:
    """images/s for each batch size, preloaded and with the reader, of one model in one precision."""
    import keras
    import tensorflow as tf

    from lib.common.device import POLICIES
    from lib.models import build_model
    from lib.reader.imagereader import ImageReader, as_tf_dataset
    from lib.training.config import TrainConfig
    from lib.training.losses import make_loss
    from lib.training.step import make_optimizer, make_train_step

    keras.backend.clear_session()
    keras.mixed_precision.set_global_policy(POLICIES[precision])
    keras.utils.set_random_seed(0)
    strategy = tf.distribute.get_strategy()
    config = TrainConfig(train_database="-", test_database="-", output_dir="-", number_classes=3, learning_rate=1e-4)
    rows = {}
    try:
        model = build_model(architecture, 1, 3, **options)
        optimizer = make_optimizer(config, model, precision)
        for batch in spec["batches"]:
            key = f"b{batch}"
            if not clock.allows(f"training {architecture} {size} {precision} {key}", 20):
                continue
            step = make_train_step(strategy, model, optimizer, make_loss("ce", 3), batch)
            row = rows[key] = {}
            with ImageReader(database, batch, mode="train", patch_shape=size, reader_count=reader_count,
                             seed=0) as reader:
                first = reader.get_batch().copy()
                preloaded = tf.data.Dataset.from_tensors((first.images, first.labels)).repeat()
                seconds, loss = _timed_steps(step, iter(preloaded), spec["steps"], spec["warmup"])
                row["preloaded_images_s"] = round(batch / seconds, 2)
                reader.input_stats(reset=True)
                seconds_reader, loss = _timed_steps(step, iter(as_tf_dataset(reader).repeat()), spec["steps"],
                                                    spec["warmup"])
                row["reader_images_s"] = round(batch / seconds_reader, 2)
                row["input_bound_pct"] = round(max(0.0, 100 * (1 - seconds / seconds_reader)), 1)
                row["reader_wait_pct"] = round(100 * reader.input_stats().waiting_fraction, 1)
                row["finite_loss"] = bool(loss == loss and abs(loss) != float("inf"))
    except Exception as exc:  # out of memory at 512 px batch 16 on a small GPU is a figure too
        rows["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return rows


def training(spec: dict, precisions: list[str], clock: Clock, tmp: Path) -> dict:
    database = make_database(tmp, spec["data_size"], spec["n_images"])
    reader_count = max(1, min(8, (os.cpu_count() or 2) - 2))
    results = {"reader_count": reader_count, "steps_timed": spec["steps"], "runs": {}}
    for architecture, options in spec["models"].items():
        for size in spec["sizes"]:
            for precision in precisions:
                key = f"{architecture}_{size}_{precision}"
                if not clock.allows(f"training {key}", 30):
                    continue
                results["runs"][key] = train_model(architecture, options, size, precision, database, spec,
                                                   reader_count, clock)
                print(f"training {key}: {json.dumps(results['runs'][key])}", file=sys.stderr, flush=True)
    return results


def _gpu_peak_reset() -> None:
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        tf.config.experimental.reset_memory_stats("GPU:0")


def _gpu_peak_gib() -> float | None:
    import tensorflow as tf

    if not tf.config.list_physical_devices("GPU"):
        return None
    return round(tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2 ** 30, 3)


def inference(spec: dict, clock: Clock) -> dict:
    import keras
    import numpy as np

    from lib.inference.predictor import predictor_from_models
    from lib.inference.tiled import predict_image
    from lib.models import build_model, model_geometry

    size = spec["image"]
    image = np.random.default_rng(0).integers(0, 2000, (size, size, 1)).astype(np.uint16)
    results = {"image": f"{size}x{size} uint16", "runs": {}}
    for architecture, options in spec["models"].items():
        for precision in ("float32", "auto"):
            key = f"{architecture}_{precision}"
            if not clock.allows(f"inference {key}", 15):
                continue
            keras.backend.clear_session()
            keras.utils.set_random_seed(0)
            divisor, radius = model_geometry(architecture, **options)
            meta = {"architecture": architecture, "number_classes": 3, "input_channels": 1, "input_dtype": "uint16",
                    "normalization": {"mode": "dataset", "mean": [1000.0], "std": [300.0]},
                    "size_divisor": divisor, "receptive_field_radius": radius}
            try:
                predictor = predictor_from_models([(build_model(architecture, 1, 3, **options), meta)],
                                                  precision=precision)
                predict_image(predictor, image[:1024, :1024])  # tracing, untimed
                _gpu_peak_reset()
                start = time.perf_counter()
                predicted = predict_image(predictor, image)
                seconds = time.perf_counter() - start
                plan = getattr(predicted, "plan", None)
                results["runs"][key] = {"mpix_s": round(size * size / 1e6 / seconds, 3), "seconds": round(seconds, 2),
                                        "peak_gpu_gib": _gpu_peak_gib(), "halo": radius,
                                        "tiles": None if plan is None else plan.n_tiles}
            except Exception as exc:
                results["runs"][key] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            print(f"inference {key}: {json.dumps(results['runs'][key])}", file=sys.stderr, flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", default=os.environ.get("GPU_CHECK_QUICK") == "1",
                        help="tiny everything: a CPU run of the script end to end (GPU_CHECK_QUICK=1 too)")
    parser.add_argument("--budget_s", type=float, default=420.0, help="seconds for the whole check")
    parser.add_argument("--skip_tests", action="store_true", help="do not run pytest -m gpu")
    args = parser.parse_args(argv)
    started = time.monotonic()
    clock = Clock(args.budget_s)
    spec = QUICK if args.quick else FULL
    from lib.common.device import quiet_tensorflow_logs

    quiet_tensorflow_logs()
    result: dict = {"check": "gpu_check", "quick": args.quick, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    "host": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores", "anchors": ANCHORS}
    result["devices"] = devices()
    if args.skip_tests:
        clock.skipped.append("tests")
    elif clock.allows("tests", 60):
        result["tests"] = gpu_tests(min(180.0, clock.left() - 30))
    precisions = list(dict.fromkeys(["float32", result["devices"]["precision_mixed"]]))
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        # inference first: its figures are the cheaper ones, training fills the rest of the budget
        inference_clock = Clock(max(min(90.0, clock.left() - 60), 1))
        result["inference"] = inference(spec, inference_clock)
        clock.skipped += inference_clock.skipped
        result["training"] = training(spec, precisions, clock, Path(tmp))
    result["skipped"] = clock.skipped
    result["seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(result, separators=(",", ":")), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
