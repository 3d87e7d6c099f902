"""Benchmark of lib/inference: megapixels/s of exact tiled batched prediction, and peak memory.

    .venv/bin/python benchmarks/bench_inference.py [--cases ...] [--modes ...] [--precisions ...]
                                                   [--repeats 3] [--huge 16384] [--folder unet,fc-densenet56]

For each case (model x image size), each way of predicting and each precision, the same
synthetic uint16 image is predicted in a fresh process so that its peak resident memory
(ru_maxrss) is its own. Ways (``--modes``):

- ``tiled``: :func:`lib.inference.tiled.predict_image`, batched tiles (default batch: ~1 Mpixel);
- ``one_tile``: the same tiles, one per model call (batch 1);
- ``whole``: :func:`lib.inference.tiled.predict_whole`, the image in one call, run only where the case
  lists it (where it fits in memory) and up to ``--whole_max_mpix``.

Precisions (``--precisions``): ``float32`` and ``bfloat16`` (:func:`lib.inference.predictor.with_precision`:
Keras mixed_bfloat16, float32 logits head); each bfloat16 row also gives the fraction of its
labels equal to float32's and the largest probability difference (on the first 1024 x 1024
pixels, from a float32 prediction in the same process; not timed).

Models have random weights (speed does not depend on them) and the default options of their
architecture (the default UNet: 64 filters, depth 4), except ``unet-small`` (base 16 filters,
depth 3: the demo's model). The halo is the receptive-field radius (exact) except where a case
says otherwise: FC-DenseNet56 uses the 96-px halo of NIST's effective receptive field (and, in
``fcd56-2048-nist-tile``, NIST's 832-px tiles, which the planner equalises to 16 tiles of 704
px; the default gives 9 of 896). Tiles are the library's default unless a case sets them;
``--tile_size`` overrides every case's tile size.
Each process builds the model, predicts once untimed (tracing), then ``--repeats`` times;
figures are medians. ``--huge N`` also runs ``inference.py``'s library entry on an N x N uint16
TIFF with the small UNet (streamed to a tiled BigTIFF) and reports its peak resident memory.
``--folder ARCHITECTURES`` runs the inference runner (:func:`lib.inference.runner.run_inference`,
as ``inference.py`` does) on the 60 NIST 256 x 256 phase-contrast files of
``../shared/data/nist_phase_contrast/images`` (read in place, never copied) with each
architecture's default model (random weights; a model folder with model.json written in a
temporary folder), one image at a time (``batch_images=False``, the behaviour before) and with
the tiles of several images sharing model calls, in the same process after one untimed warm-up
run; figures are Mpixel/s of the images. NIST's own inference on such files: 0.139 Mpixel/s
with FC-DenseNet56 on the lead's machine; ours before batching: 0.04 Mpixel/s with the default UNet.
The last line printed is one JSON object of figures.

A run of a few minutes: ``--cases fcd56-2048 --modes tiled --repeats 1 --huge 0``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# NIST's inference.py on this machine (from issue 5), for context only: not re-measured here.
NIST_REFERENCE = {"fc-densenet56_2048_mpix_s": 0.07, "fc-densenet56_2048_peak_gib": 17.3,
                  "fc-densenet56_nist_256_files_mpix_s": 0.139}
# ../shared beside the checkout (a worktree of it may sit one folder deeper).
NIST_FOLDER = next((base / "shared" / "data" / "nist_phase_contrast" / "images" for base in (ROOT.parent, ROOT.parents[1])
                    if (base / "shared" / "data" / "nist_phase_contrast" / "images").is_dir()),
                   ROOT.parent / "shared" / "data" / "nist_phase_contrast" / "images")
FOLDER_ARCHITECTURES = ("unet", "fc-densenet56")
SMALL_UNET = {"base_filters": 16, "depth": 3}
CASES = {
    # name: (architecture, options, size, halo, tile_size, modes)
    "fcd56-2048": ("fc-densenet56", {}, 2048, 96, None, ("tiled", "one_tile")),
    "fcd56-2048-nist-tile": ("fc-densenet56", {}, 2048, 96, 832, ("tiled",)),
    "fcd56-4096": ("fc-densenet56", {}, 4096, 96, None, ("tiled", "one_tile")),
    "unet-2048": ("unet", {}, 2048, None, None, ("tiled", "one_tile", "whole")),
    "unet-4096": ("unet", {}, 4096, None, None, ("tiled", "one_tile")),
    "unet-small-2048": ("unet", SMALL_UNET, 2048, None, None, ("tiled", "one_tile", "whole")),
    "unet-small-4096": ("unet", SMALL_UNET, 4096, None, None, ("tiled", "one_tile", "whole")),
}
MODES = ("tiled", "one_tile", "whole")
PRECISIONS = ("float32", "bfloat16")
# Pixels compared between precisions (a corner of the image: a float32 reference costs time).
AGREEMENT_SIDE = 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--precisions", default=",".join(PRECISIONS),
                        help=f"comma-separated, of {', '.join(PRECISIONS)}")
    parser.add_argument("--tile_size", type=int, default=None, help="tile edge for every case (default: the case's)")
    parser.add_argument("--whole_max_mpix", type=float, default=17.0,
                        help="largest image predicted in one call (whole mode), in Mpixel")
    parser.add_argument("--repeats", type=int, default=3, help="timed predictions per figure (median)")
    parser.add_argument("--huge", type=int, default=16384, help="edge of the streamed image (0 = skip)")
    parser.add_argument("--folder", default="",
                        help=f"comma-separated architectures[:halo] ({', '.join(FOLDER_ARCHITECTURES)}) to run the inference "
                             "runner with on the NIST folder, one image at a time and batched (empty = skip)")
    parser.add_argument("--nist_folder", default=str(NIST_FOLDER), help="folder of the NIST 256 x 256 images")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name, known in (("cases", CASES), ("modes", MODES), ("precisions", PRECISIONS),
                        ("folder", FOLDER_ARCHITECTURES)):
        unknown = [c for c in getattr(args, name).split(",") if c and c.partition(":")[0] not in known]
        if unknown:
            parser.error(f"--{name} must be among {', '.join(known)}; got {', '.join(unknown)}")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1; got {args.repeats}")
    if args.tile_size is not None and args.tile_size < 1:
        parser.error(f"--tile_size must be >= 1; got {args.tile_size}")
    return args


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def _child(spec: dict) -> dict:
    """Run one measurement in this process; return its figures."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, str(ROOT))
    import numpy as np

    if spec["mode"] == "huge":
        return _child_huge(spec)
    if spec["mode"] == "folder":
        return _child_folder(spec)
    import keras

    from lib.inference.predictor import predictor_from_models
    from lib.inference.tiled import predict_image, predict_whole
    from lib.models import build_model, model_geometry

    keras.utils.set_random_seed(0)
    divisor, radius = model_geometry(spec["architecture"], **spec["options"])
    model = build_model(spec["architecture"], 1, 2, **spec["options"])
    meta = {"architecture": spec["architecture"], "number_classes": 2, "input_channels": 1, "input_dtype": "uint16",
            "normalization": {"mode": "dataset", "mean": [1000.0], "std": [300.0]}, "size_divisor": divisor,
            "receptive_field_radius": radius}
    precision = spec.get("precision", "float32")
    predictor = predictor_from_models([(model, meta)], precision=precision)
    size = spec["size"]
    image = np.random.default_rng(0).integers(0, 2000, (size, size, 1)).astype(np.uint16)
    halo = spec["halo"]

    def once(image=image, predictor=predictor, keep=False):
        if spec["mode"] == "whole":
            return predict_whole(predictor, image, halo=halo)
        return predict_image(predictor, image, tile_size=spec["tile_size"], halo=halo,
                             batch_size=1 if spec["mode"] == "one_tile" else None, keep_probabilities=keep)

    first = once()
    times = []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    plan = getattr(first, "plan", None)
    row = {"seconds": seconds, "mpix_s": size * size / 1e6 / seconds, "peak_gib": _peak_gib(),
           "precision": precision, "halo": radius if halo is None else halo, "radius": radius,
           "tile": None if plan is None else [plan.tile_height, plan.tile_width], "tiles": None if plan is None else plan.n_tiles}
    if precision != "float32":
        # Agreement with float32 on a corner, predicted the same way (after the peak was read).
        side = min(size, AGREEMENT_SIDE)
        corner = np.ascontiguousarray(image[:side, :side])
        maps = [getattr(p, "probabilities", p) for p in (
            once(corner, keep=True), once(corner, predictor_from_models([(model, meta)]), keep=True))]
        row["labels_equal_to_float32"] = float((maps[0].argmax(-1) == maps[1].argmax(-1)).mean())
        row["max_probability_difference"] = float(np.abs(maps[0] - maps[1]).max())
    return row


def _child_huge(spec: dict) -> dict:
    import keras
    import numpy as np
    import tifffile

    from lib.inference.runner import InferenceConfig, run_inference
    from lib.models import build_model, model_geometry

    options = {"base_filters": 16, "depth": 3}
    size = spec["size"]
    with tempfile.TemporaryDirectory(dir=spec.get("tmp")) as tmp:
        tmp = Path(tmp)
        (tmp / "images").mkdir()
        # Written row block by row block so that this process never holds the image either.
        mapped = tifffile.memmap(tmp / "images" / "huge.tif", shape=(size, size), dtype=np.uint16,
                                 photometric="minisblack")
        rng = np.random.default_rng(0)
        for y in range(0, size, 1024):
            mapped[y:y + 1024] = rng.integers(0, 2000, (min(1024, size - y), size), dtype=np.uint16)
        mapped.flush()
        del mapped
        keras.utils.set_random_seed(0)
        divisor, radius = model_geometry("unet", **options)
        (tmp / "model").mkdir()
        build_model("unet", 1, 2, **options).save(tmp / "model" / "model.keras")
        (tmp / "model" / "model.json").write_text(json.dumps({
            "architecture": "unet", "number_classes": 2, "input_channels": 1, "input_dtype": "uint16",
            "normalization": {"mode": "dataset", "mean": [1000.0], "std": [300.0]}, "size_divisor": divisor,
            "receptive_field_radius": radius}))
        keras.backend.clear_session()
        before = _peak_gib()
        config = InferenceConfig(model=str(tmp / "model"), image_folder=str(tmp / "images"),
                                 output_folder=str(tmp / "out"))
        result = run_inference(config, log=lambda _: None, progress=False)
        if result.failed:
            raise RuntimeError(f"huge image failed: {result.failed}")
        with tifffile.TiffFile(tmp / "out" / "huge.tif") as tif:
            tiled = tif.is_bigtiff and tif.pages[0].is_tiled
    return {"seconds": result.seconds, "mpix_s": result.megapixels / result.seconds, "peak_gib": _peak_gib(),
            "peak_gib_before_inference": before, "tiled_bigtiff": tiled, "halo": radius}


def _child_folder(spec: dict) -> dict:
    """The inference runner on a folder of small images: one image at a time, then batched, same process."""
    import keras

    from lib.inference.predictor import load_predictor
    from lib.inference.runner import InferenceConfig, run_inference
    from lib.models import build_model, model_geometry

    architecture = spec["architecture"]
    with tempfile.TemporaryDirectory(dir=spec.get("tmp")) as tmp:
        tmp = Path(tmp)
        keras.utils.set_random_seed(0)
        divisor, radius = model_geometry(architecture)
        (tmp / "model").mkdir()
        build_model(architecture, 1, 2).save(tmp / "model" / "model.keras")
        (tmp / "model" / "model.json").write_text(json.dumps({
            "architecture": architecture, "number_classes": 2, "input_channels": 1, "input_dtype": "uint16",
            "normalization": {"mode": "dataset", "mean": [1000.0], "std": [300.0]}, "size_divisor": divisor,
            "receptive_field_radius": radius}))
        predictor = load_predictor(tmp / "model")
        halo = spec.get("halo") if spec.get("halo") is not None else radius
        row = {"halo": halo, "images": 0}

        def run(name: str, batched: bool, shard=None):
            config = InferenceConfig(model=str(tmp / "model"), image_folder=spec["folder"],
                                     output_folder=str(tmp / name), batch_images=batched, shard=shard,
                                     overwrite=True, halo=halo)
            result = run_inference(config, log=lambda _: None, progress=False, predictor=predictor)
            if result.failed:
                raise RuntimeError(f"images failed: {result.failed}")
            return result

        run("warmup", True, shard=(0, 20))  # traces the model for the tile shape (3 images)
        for name, batched in (("one_image", False), ("batched", True)):
            result = run(name, batched)
            row[name] = {"seconds": result.seconds, "mpix_s": result.megapixels / result.seconds}
            row["images"] = len(result.predicted)
        record = json.loads(next((tmp / "batched" / "records").glob("*.json")).read_text())
        row["tile"], row["peak_gib"] = record["plan"]["tile"], _peak_gib()
    return row


def _run_child(spec: dict) -> dict:
    command = [sys.executable, __file__, "--child", json.dumps(spec)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return 0
    modes = set(args.modes.split(","))
    precisions = [p for p in args.precisions.split(",") if p]
    figures: dict[str, dict] = {}
    for case in [c for c in args.cases.split(",") if c]:
        architecture, options, size, halo, tile_size, case_modes = CASES[case]
        for mode in case_modes:
            if mode not in modes or (mode == "whole" and size * size / 1e6 > args.whole_max_mpix):
                continue
            for precision in precisions:
                spec = {"architecture": architecture, "options": options, "size": size, "halo": halo,
                        "tile_size": args.tile_size or tile_size, "mode": mode, "repeats": args.repeats,
                        "precision": precision}
                figures[f"{case}/{mode}/{precision}"] = row = _run_child(spec)
                shown = (f"{row['mpix_s']:.3f} Mpixel/s ({row['seconds']:.2f} s), peak {row['peak_gib']:.2f} GiB, "
                         f"halo {row['halo']}, tile {row.get('tile')}, {row.get('tiles')} tiles"
                         if "error" not in row else f"failed: {row['error']}")
                if "labels_equal_to_float32" in row:
                    shown += (f"; labels {100 * row['labels_equal_to_float32']:.2f} % equal to float32, "
                              f"probabilities within {row['max_probability_difference']:.3f}")
                print(f"{case:>16} {mode:>8} {precision:>8}: {shown}", flush=True)
    if args.huge:
        row = _run_child({"mode": "huge", "size": args.huge})
        figures[f"unet-small-{args.huge}/streamed"] = row
        print(f"{'unet-small-' + str(args.huge):>16} streamed: " + (
            f"{row['mpix_s']:.3f} Mpixel/s ({row['seconds']:.1f} s), peak {row['peak_gib']:.2f} GiB, "
            f"tiled BigTIFF {row['tiled_bigtiff']}" if "error" not in row else f"failed: {row['error']}"), flush=True)
    for entry in [a for a in args.folder.split(",") if a]:
        architecture, _, halo = entry.partition(":")  # "fc-densenet56:96": NIST's 96-px halo
        row = _run_child({"mode": "folder", "architecture": architecture, "folder": args.nist_folder,
                          "halo": int(halo) if halo else None})
        figures[f"nist-folder/{entry}"] = row
        print(f"{'nist-' + entry:>16} folder: " + (
            f"{row['images']} images, tile {row['tile']} (halo {row['halo']}): one image at a time "
            f"{row['one_image']['mpix_s']:.3f} Mpixel/s ({row['one_image']['seconds']:.1f} s), batched "
            f"{row['batched']['mpix_s']:.3f} Mpixel/s ({row['batched']['seconds']:.1f} s)"
            if "error" not in row else f"failed: {row['error']}"), flush=True)
    summary = {"benchmark": "inference", "machine": f"{platform.machine()} {os.cpu_count()} cpus",
               "load_average": os.getloadavg(), "repeats": args.repeats, "nist_reference": NIST_REFERENCE,
               "figures": figures}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
