#!/usr/bin/env python3
"""Predict label images for a folder of images with a trained model (or an ensemble), and evaluate them.

    python inference.py --model runs/cells --image_folder new_imgs --output_folder preds [--mask_folder masks]

Exact tiled prediction: tiles carry a halo of the model's receptive-field radius, so the
labels equal whole-image prediction for images of any size. Writes KEY.tif|png|ome.zarr label images,
optional probabilities/ and uncertainty/ maps, records/KEY.json, uncertainty.csv and, with
--mask_folder, metrics.csv and overlays/. Instance models (model.json label_kind "instance") get
their channel maps post-processed on the whole image into KEY.tif instance labels and
KEY_instances.csv measurements; with --mask_folder (instance label masks), instance_metrics.csv
and associations/ too. A rerun skips images already done (--overwrite redoes them).
Exit code 0: all images done; 1: some images failed (listed); 2: bad settings or model, nothing done.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

from lib.common.cli import make_parser, run_main, settings_table
from lib.common.device import check_allocated_gpus, device_line, quiet_tensorflow_logs
from lib.common.errors import SomeFailed
from lib.common.settings import defaults_of


def _shard(text: str) -> tuple[int, int]:
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be K/N with integers (e.g. 0/4); got {text!r}") from None
    if not (n >= 1 and 0 <= k < n):
        raise argparse.ArgumentTypeError(f"must be K/N with 0 <= K < N; got {text!r}")
    return k, n


def _thresholds(text: str) -> dict:
    from lib.inference.instances_glue import parse_thresholds

    try:
        return parse_thresholds(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _refinements(text: str) -> tuple[str, ...]:
    from lib.inference.instances_glue import parse_refinements

    return parse_refinements(text)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number; got {text!r}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = make_parser(__doc__.split("\n\n")[0])
    parser.prog = "inference.py"
    data = parser.add_argument_group("input")
    data.add_argument("--image_folder", required=True,
                      help="folder of images (tif, png, jpg, bmp, OME-Zarr folders NAME.zarr / NAME.ome.zarr read "
                           "chunk by chunk; 2D or ZYX stacks)")
    data.add_argument("--image_format", default=None,
                      help="only use images with this extension (e.g. tif; zarr for OME-Zarr folders)")
    data.add_argument("--mask_folder", default=None,
                      help="folder of true masks, paired with images by name: evaluate (metrics.csv, overlays/; "
                           "for instance models, instance label masks: also instance_metrics.csv, associations/)")
    data.add_argument("--mask_suffix", default=None,
                      help="mask name = image name + this suffix (e.g. _mask); default: inferred")
    model = parser.add_argument_group("model")
    model.add_argument("--model", "--saved_model_filepath", dest="model", required=True,
                       help="model folder (model.keras + model.json), folder of model folders (ensemble: mean "
                            "probabilities), .keras file with model.json beside it, or SavedModel folder")
    model.add_argument("--tta", action="store_true",
                       help="test-time augmentation: average the 8 flips/rotations by 90 degrees (8x slower)")
    model.add_argument("--precision", choices=("float32", "bfloat16", "auto"), default="float32",
                       help="arithmetic of the model's layers: bfloat16 (Keras mixed_bfloat16: float32 weights, "
                            "logits head and activations) is faster where the device computes it natively "
                            "(CPUs with AVX512_BF16/AMX, GPUs of compute capability >= 8) and may change the "
                            "labels of a few near-tie pixels; auto = bfloat16 where native, else float32")
    tiles = parser.add_argument_group("tiling")
    tiles.add_argument("--tile_size", type=int, default=None,
                       help="square tiles of at most this edge, a multiple of the model's size divisor "
                            "(default: the grid that computes the fewest pixels with tiles, possibly rectangular, "
                            "within a pixel budget: a 960 x 960 tile's area, x1.3 in bfloat16)")
    tiles.add_argument("--halo", type=int, default=None,
                       help="pixels of context around each tile's zone (default: the receptive-field radius, "
                            "exact; smaller is faster and approximate near tile borders)")
    tiles.add_argument("--batch_size", type=int, default=None, help="tiles per model call (default: ~1 Mpixel per call)")
    out = parser.add_argument_group("output")
    out.add_argument("--output_folder", required=True, help="folder for the predictions (created)")
    out.add_argument("--output_format", choices=("tif", "png", "ome-zarr"), default="tif",
                     help="tif: OME-TIFF labels (OME-XML axes and pixel size; above 8192 px a tiled BigTIFF with a "
                          "pyramid); png: labels as PNG (stacks and huge images stay tif); ome-zarr: labels, "
                          "probabilities and uncertainty as OME-Zarr folders KEY.ome.zarr (NGFF 0.4, pyramid; "
                          "instance models: labels and per-channel maps; png is for semantic models only)")
    out.add_argument("--probabilities", action="store_true",
                     help="also write probabilities/KEY.tif: float32, one plane per class, stored (classes, H, W) "
                          "(OME axes CYX; images streamed above 67 Mpixel: (H, W, classes), axes YXS; ome-zarr: "
                          "axes c, y, x); for instance models one (H, W) float32 map per channel, "
                          "probabilities/KEY_<channel>.tif (e.g. KEY_F.tif)")
    out.add_argument("--uncertainty", action="store_true",
                     help="also write uncertainty/KEY_entropy.tif (normalised entropy of the mean probabilities) "
                          "and, for ensembles or --tta, KEY_spread.tif (spread of the members)")
    out.add_argument("--z_filter", type=int, default=0,
                     help="stacks: median filter of this odd size along z on the probabilities (0 = off)")
    out.add_argument("--overwrite", action="store_true", help="redo images whose outputs exist")
    inst = parser.add_argument_group(
        "instance models", "post-processing of the maps of the whole image (never tile by tile) into KEY.tif "
        "instance labels (uint16, or uint32 above 65535 objects) and KEY_instances.csv measurements; defaults "
        "from model.json's instance.postprocess")
    inst.add_argument("--thresholds", type=_thresholds, default=None,
                      help="seed thresholds by channel on top of model.json's, NAME=VALUE with a number in [0, 1] or "
                           "auto (Otsu), comma-separated; 'growth' sets the growth mask's (e.g. F=0.5,Db=auto); 'nms' "
                           "the polygon suppression IoU (models with an R channel only); 'seed' the embedding "
                           "clustering's seed score (models with the E channels only)")
    inst.add_argument("--refinements", type=_refinements, default=None,
                      help="refinements after the watershed, replacing model.json's, comma-separated, or none "
                           "(e.g. 'fill_holes,remove_small_objects 20'; also clear_border, remove_large_objects N, "
                           "dilation R, erosion R)")
    inst.add_argument("--pixel_size", type=_positive, default=None,
                      help="side of a pixel in micrometres (e.g. 0.65): measurement columns in um and um2 "
                           "(area_um2, feret_max_um, ...) instead of px and px2, and written into every output "
                           "(OME-TIFF PhysicalSizeX/Y, OME-Zarr scale). Without it the input's own pixel size "
                           "(OME-TIFF / OME-Zarr metadata) is used: in the outputs, and for instance measurements "
                           "when its pixels are square and no --filter_rules are given")
    inst.add_argument("--filter_rules", default=None,
                      help="remove the instances matching these rules from the labels, e.g. 'npixels < 100 and "
                           "circularity <= 0.7; area_px2 > 5000' (';' = or; column names of docs/measurements.md); KEY_instances.csv then lists every "
                           "instance found with a status column (kept/removed)")
    inst.add_argument("--save_intermediates", action="store_true",
                      help="also write intermediates/KEY_seeds.tif (seed labels, uint32), KEY_surface.tif (the "
                           "flooded surface, float32) and KEY_growth.tif (growth mask, uint8 0/1)")
    inst.add_argument("--class_mask_folder", default=None,
                      help="true class masks beside one-channel instance masks in --mask_folder (same file names; "
                           "class of each pixel's object, 0 on background), for matching per class with a model "
                           "that has a class per instance; two-channel masks need no such folder")
    inst.add_argument("--matching_thresholds", type=float, nargs="+", default=[0.3, 0.5, 0.75],
                      help="IoU thresholds at which predicted and true instances are matched (with --mask_folder)")
    inst.add_argument("--postprocess_window", type=int, default=4096,
                      help="images longer than this (px) are post-processed in overlapping windows of this size")
    inst.add_argument("--postprocess_overlap", type=int, default=256,
                      help="overlap of the post-processing windows (px): objects up to about a third of it are "
                           "labelled exactly as on the whole image; keep it above the largest object")
    run = parser.add_argument_group("runtime")
    run.add_argument("--shard", type=_shard, default=None,
                     help="K/N: process only every N-th image starting at K (e.g. $SLURM_ARRAY_TASK_ID/4)")
    run.add_argument("--quiet", action="store_true",
                     help="no progress bars (over images, and over the tiles of large images); they are also off "
                          "when stderr is not a terminal")
    run.add_argument("--allow_cpu", action="store_true",
                     help="run on the CPU even when the job was given GPUs that TensorFlow cannot use")
    run.add_argument("--verbose", action="store_true", help="show TensorFlow's own log lines (C++ start-up notices)")
    args = parser.parse_args(argv)
    # The settings' rules live in InferenceConfig (imported after parsing: no TensorFlow);
    # misuse of flags exits 2 through parser.error, the folders are checked when the run starts.
    from lib.inference.runner import InferenceConfig

    args.config = _config(args, InferenceConfig)
    problems = args.config.violations(filesystem=False)
    if problems:
        parser.error("\n".join(_as_flags(problem, InferenceConfig) for problem in problems))
    return args


def _as_flags(problem: str, config_class) -> str:
    """A config violation in the words of the command line: its field names as flags (``--tile_size``)."""
    fields = {f.name for f in dataclasses.fields(config_class)}
    first, _, rest = problem.partition(" ")
    rest = re.sub(r"(?<![-\w])([a-z]+_[a-z_]+)\b", lambda m: f"--{m[1]}" if m[1] in fields else m[1], rest)
    return (f"--{first}" if first in fields else first) + (" " + rest if rest else "")


def _config(args: argparse.Namespace, config_class):
    """The typed settings of a run: flags mapped one to one onto the config's fields."""
    return config_class(
        model=args.model, image_folder=args.image_folder, output_folder=args.output_folder,
        mask_folder=args.mask_folder, mask_suffix=args.mask_suffix, image_format=args.image_format,
        batch_size=args.batch_size, tile_size=args.tile_size, halo=args.halo, output_format=args.output_format,
        probabilities=args.probabilities, uncertainty=args.uncertainty, tta=args.tta, z_filter=args.z_filter,
        overwrite=args.overwrite, shard=args.shard, precision=args.precision, thresholds=args.thresholds,
        refinements=args.refinements, pixel_size=args.pixel_size, filter_rules=args.filter_rules,
        save_intermediates=args.save_intermediates, class_mask_folder=args.class_mask_folder,
        matching_thresholds=tuple(sorted(args.matching_thresholds)),
        postprocess_window=args.postprocess_window, postprocess_overlap=args.postprocess_overlap)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_tensorflow_logs(args.verbose)
    return run_main(lambda: _run(args), prog="inference.py")


def _run(args: argparse.Namespace) -> int:
    from lib.inference.runner import run_inference

    config = args.config
    print(settings_table("inference.py", config.to_dict(), defaults_of(type(config)),
                         str(Path(config.output_folder) / "inference.json")), flush=True)
    print(device_line(), flush=True)
    check_allocated_gpus(args.allow_cpu, prog="inference.py")
    try:
        result = run_inference(config, progress=not args.quiet)
    except KeyboardInterrupt:
        print("inference.py: interrupted; finished images are kept and a rerun skips them", file=sys.stderr)
        raise
    print(f"{len(result.predicted)} predicted, {len(result.skipped)} skipped (done before), "
          f"{len(result.failed)} failed in {result.seconds:.1f} s "
          f"({result.megapixels / max(result.seconds, 1e-9):.2f} Mpixel/s); halo {result.halo} px"
          + ("" if result.exact else " (approximate)"))
    if result.overall is not None:
        o = result.overall
        print(("foreground (labels > 0 against masks > 0) " if result.instance_overall is not None else "")
              + f"evaluation over all images: mean IoU {o['mean_iou']:.4f}, mean Dice {o['mean_dice']:.4f}, "
              f"pixel accuracy {o['pixel_accuracy']:.4f}; per class IoU "
              + ", ".join(f"{k[4:]}: {v:.4f}" for k, v in o.items() if k.startswith("iou_"))
              + f" -> {result.metrics_csv}, overlays in {result.output_folder / 'overlays'}")
    if result.instance_overall is not None:
        pooled = result.instance_overall
        at = 0.5 if 0.5 in pooled else sorted(pooled)[len(pooled) // 2]
        s = pooled[at]
        print(f"instance matching over all images: F1 at IoU {at:g} {s.f1:.4f} (precision {s.precision:.4f}, "
              f"recall {s.recall:.4f}, panoptic quality {s.panoptic_quality:.4f}; {s.tp} matched, {s.fp} false "
              f"positives, {s.fn} missed); F1 at " + ", ".join(f"{t:g}: {pooled[t].f1:.4f}" for t in sorted(pooled))
              + f" -> {result.instance_metrics_csv}, associations/ and overlays/ in {result.output_folder}")
    if result.uncertainty_csv is not None:
        print(f"uncertainty per image (most uncertain first): {result.uncertainty_csv}")
    if result.failed:
        raise SomeFailed(f"{len(result.failed)} image(s) failed:\n"
                         + "\n".join(f"  - {key}: {reason}" for key, reason in result.failed.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
