#!/usr/bin/env python3
"""Benchmark of the database build against the simplest sequential loop.

Cases:
* ``nist``: the 60 shared 256x256 phase-contrast pairs (../shared/data/nist_phase_contrast),
  also timed as a whole ``build_lmdb.py`` process (start-up and imports included);
* ``large``: a synthetic set of 1024x1024 uint16 images with uint8 masks, tiled to 256.

The baseline reads each pair with tifffile, cuts the same tiles and puts ``tobytes()`` of
each into one LMDB write transaction: no validation, no statistics, one process. Each
figure is the median of ``--repeats`` runs. The last line printed is one JSON object.

    python benchmarks/bench_build_lmdb.py [--large_images 200] [--repeats 3]
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
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lib.store.build import BuildConfig, build_databases
from lib.store.images import list_images, pair_images_masks, write_image
from lib.store.tiling import tile_grid

NIST = ROOT.parent / "shared" / "data" / "nist_phase_contrast"


def sequential_baseline(image_folder: Path, mask_folder: Path, out: Path, tile: int) -> tuple[float, int, int]:
    """The simplest loop: read, tile, tobytes, put. Returns (seconds, input bytes, records)."""
    import lmdb
    import tifffile
    from PIL import Image

    start = time.perf_counter()
    images, _ = list_images(image_folder)
    masks, _ = list_images(mask_folder)
    pairs, _ = pair_images_masks(images, masks)
    env = lmdb.open(str(out), map_size=1 << 36)
    n, nbytes = 0, 0
    with env.begin(write=True) as txn:
        for pair in pairs:
            image = tifffile.imread(pair.image)
            mask = tifffile.imread(pair.mask) if pair.mask.suffix == ".tif" else np.array(Image.open(pair.mask))
            nbytes += image.nbytes + mask.nbytes
            for y, x in tile_grid(image.shape[0], image.shape[1], tile, tile):
                value = image[y:y + tile, x:x + tile].tobytes() + mask[y:y + tile, x:x + tile].tobytes()
                txn.put(b"%010d" % n, value)
                n += 1
    env.sync(True)
    env.close()
    return time.perf_counter() - start, nbytes, n


def ours(image_folder: Path, mask_folder: Path, out: Path, tile: int, workers: int) -> tuple[float, int, int]:
    config = BuildConfig(image_folder=str(image_folder), mask_folder=str(mask_folder), output_folder=str(out),
                         dataset_name="bench", tile_size=tile, workers=workers, train_fraction=0.8)
    result = build_databases(config, progress=False, log=lambda m: None)
    return result.seconds, result.input_bytes, sum(result.n_records.values())


def whole_process(image_folder: Path, mask_folder: Path, out: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "build_lmdb.py"), "--image_folder", str(image_folder),
                    "--mask_folder", str(mask_folder), "--output_folder", str(out), "--dataset_name", "p",
                    "--quiet"], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def make_large(folder: Path, n: int, size: int) -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 4000, (size, size), dtype=np.uint16)
    for i in range(n):
        # Distinct content per image without paying for n full random draws.
        write_image(folder / "images" / f"im{i:04d}.tif", np.roll(base, i * 7, axis=0) + np.uint16(i))
        write_image(folder / "masks" / f"im{i:04d}.tif", (np.roll(base, i * 7, axis=1) % 3).astype(np.uint8))


def run_case(name: str, images: Path, masks: Path, tile: int, repeats: int, workers: int, tmp: Path) -> dict:
    seq, mine = [], []
    nbytes = records = 0
    for r in range(repeats):
        for label, fn, store in (("seq", sequential_baseline, seq), ("ours", ours, mine)):
            out = tmp / f"{name}-{label}-{r}"
            args = (images, masks, out, tile) + ((workers,) if label == "ours" else ())
            seconds, nbytes, records = fn(*args)
            store.append(seconds)
            shutil.rmtree(out, ignore_errors=True)
    s, o = statistics.median(seq), statistics.median(mine)
    figures = {"input_mb": round(nbytes / 1e6, 1), "records": records,
               "sequential_s": round(s, 3), "ours_s": round(o, 3),
               "sequential_mb_per_s": round(nbytes / 1e6 / s, 1), "ours_mb_per_s": round(nbytes / 1e6 / o, 1),
               "sequential_records_per_s": round(records / s, 1), "ours_records_per_s": round(records / o, 1),
               "speedup": round(s / o, 2)}
    print(f"{name}: {json.dumps(figures)}", flush=True)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--large_images", type=int, default=200)
    parser.add_argument("--large_size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8))
    args = parser.parse_args()
    results: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "workers": args.workers}
    with tempfile.TemporaryDirectory(prefix="bench_build_") as tmp_name:
        tmp = Path(tmp_name)
        if NIST.is_dir():
            results["nist"] = run_case("nist", NIST / "images", NIST / "masks", 256, args.repeats, args.workers, tmp)
            runs = []
            for r in range(args.repeats):
                runs.append(whole_process(NIST / "images", NIST / "masks", tmp / f"proc{r}"))
            results["nist"]["whole_process_s"] = round(statistics.median(runs), 3)
            print(f"nist whole process: {results['nist']['whole_process_s']} s", flush=True)
        t = time.perf_counter()
        make_large(tmp / "large", args.large_images, args.large_size)
        print(f"large set written in {time.perf_counter() - t:.1f} s", flush=True)
        results["large"] = run_case("large", tmp / "large" / "images", tmp / "large" / "masks", 256, args.repeats,
                                    args.workers, tmp)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
