#!/usr/bin/env python3
"""Our StarDist ray distances against StarDist's own ``stardist.geometry.star_dist`` (an oracle).

StarDist is not a dependency of the toolkit (it pins numpy < 2 through numba): install it in a
separate environment and name its interpreter::

    python3 -m venv /tmp/sdvenv
    /tmp/sdvenv/bin/pip install stardist==0.9.1 "numpy<2" tqdm six h5py matplotlib numba csbdeep
    python benchmarks/compare_star_dist.py --stardist_python /tmp/sdvenv/bin/python

Label images: generated cells (``data/generate.py``, 256 x 256, seed 0) and the NIST expert masks
split into connected objects. Rays of every pixel (``grid`` 1), 32 rays, same ray order. Prints
per image the largest and mean absolute difference in px, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
NIST = ROOT.parent / "shared" / "data" / "nist_phase_contrast" / "masks"

THEIRS = """
import sys, numpy as np
from stardist.geometry import star_dist
folder, count, n_rays = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(count):
    np.save(f"{folder}/theirs{i}.npy", star_dist(np.load(f"{folder}/labels{i}.npy"), n_rays, mode="cpp"))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stardist_python", required=True, help="a Python interpreter with stardist installed")
    parser.add_argument("--n_rays", type=int, default=32)
    parser.add_argument("--generated", type=int, default=3, help="generated label images")
    parser.add_argument("--nist", type=int, default=3, help="NIST masks (split into connected objects)")
    args = parser.parse_args()

    from scipy import ndimage as ndi

    from data.generate import synthesize
    from lib.reader.targets_stardist import star_distances
    from lib.store.images import read_mask

    rng = np.random.default_rng(0)
    images = {f"generated_{i}": synthesize(rng, 256, 256)[1].astype(np.int32) for i in range(args.generated)}
    for path in sorted(NIST.glob("*.tif"))[:args.nist]:
        images[f"nist_{path.stem}"] = ndi.label(read_mask(path, binary_255=False) > 0)[0].astype(np.int32)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        names = list(images)
        for i, name in enumerate(names):
            np.save(f"{folder}/labels{i}.npy", images[name])
        subprocess.run([args.stardist_python, "-c", THEIRS, folder, str(len(names)), str(args.n_rays)], check=True)
        for i, name in enumerate(names):
            ours = star_distances(images[name], args.n_rays)
            theirs = np.load(f"{folder}/theirs{i}.npy")
            objects = images[name] > 0
            difference = np.abs(ours - theirs)
            results[name] = {"object_pixels": int(objects.sum()), "max_abs_px": float(difference.max()),
                             "mean_abs_px": float(difference[objects].mean()),
                             "mean_ray_px": float(theirs[objects].mean())}
            print(f"{name}: {results[name]}", flush=True)
    print(json.dumps({"n_rays": args.n_rays, "images": results,
                      "max_abs_px": max(r["max_abs_px"] for r in results.values())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
