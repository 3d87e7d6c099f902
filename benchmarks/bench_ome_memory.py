#!/usr/bin/env python3
"""Peak memory (RSS) of inference.py on one large synthetic image: TIFF in -> BigTIFF out (the reference),
OME-Zarr in -> OME-Zarr out, and TIFF in -> OME-Zarr out, with a tiny seeded UNet (base 4 filters).

    python benchmarks/bench_ome_memory.py --size 12288 --folder /tmp/ome_mem

Each case runs ``inference.py --probabilities --uncertainty`` in its own process; its peak RSS is read from
``getrusage(RUSAGE_CHILDREN)`` of a wrapper process that runs only it. Prints one line per case and the
sizes of the image; the wall times are printed too but mean little on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WRAPPER = ("import resource, subprocess, sys, json, time; t = time.perf_counter(); "
           "code = subprocess.run(sys.argv[1:]).returncode; "
           "print(json.dumps({'code': code, 'seconds': time.perf_counter() - t, "
           "'max_rss_mib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))")


def write_inputs(folder: Path, size: int) -> None:
    """A smooth uint16 image of ``size`` x ``size`` as an uncompressed TIFF and as an OME-Zarr, strip by strip."""
    import tifffile

    from lib.store.ome_zarr import OmeZarrWriter

    (folder / "tif").mkdir(parents=True, exist_ok=True)
    (folder / "zarr").mkdir(parents=True, exist_ok=True)
    tif = tifffile.memmap(folder / "tif" / "big.tif", shape=(size, size), dtype=np.uint16, photometric="minisblack")
    writer = OmeZarrWriter(folder / "zarr" / "big.ome.zarr", (size, size), np.uint16, labels=False,
                           pixel_size=(0.5, 0.5))
    x = np.arange(size, dtype=np.float32)
    for y in range(0, size, 512):
        rows = np.arange(y, min(y + 512, size), dtype=np.float32)[:, None]
        strip = (30000 + 15000 * np.sin(rows / 37.0) * np.cos(x[None, :] / 53.0)).astype(np.uint16)
        tif[y:y + strip.shape[0]] = strip
        writer.put(strip)
    tif.flush()
    del tif
    writer.close(True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=12288)
    parser.add_argument("--folder", type=Path, required=True)
    args = parser.parse_args()
    from tests.conftest import unet_folder

    folder = args.folder
    if not (folder / "model" / "run").is_dir():
        unet_folder(folder / "model", 3, "uint16", 30000.0, 17000.0, depth=1)
    if not (folder / "zarr" / "big.ome.zarr").is_dir():
        write_inputs(folder, args.size)
    cases = [("tif -> tif (BigTIFF)", "tif", "tif"), ("ome-zarr -> ome-zarr", "zarr", "ome-zarr"),
             ("tif -> ome-zarr", "tif", "ome-zarr")]
    for name, source, fmt in cases:
        out = folder / f"out_{source}_{fmt}"
        command = [sys.executable, str(ROOT / "inference.py"), "--model", str(folder / "model" / "run"),
                   "--image_folder", str(folder / source), "--output_folder", str(out), "--output_format", fmt,
                   "--probabilities", "--uncertainty", "--overwrite", "--quiet"]
        done = subprocess.run([sys.executable, "-c", WRAPPER, *command], capture_output=True, text=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{name}: exit {result['code']}, peak RSS {result['max_rss_mib']:.0f} MiB, "
              f"{result['seconds']:.0f} s ({args.size} x {args.size} uint16, "
              f"{args.size * args.size * 2 / 2**20:.0f} MiB of pixels)", flush=True)
        if result["code"]:
            print(done.stderr[-2000:], file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
