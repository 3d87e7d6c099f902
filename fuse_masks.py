"""Estimate a ground truth from several experts' masks (STAPLE or majority voting).

    python fuse_masks.py --input_folder expert_segmentations --output_folder fused

``expert_segmentations/`` holds one sub-folder per expert; masks of the same image have
the same file key (``expert1/mask1.png``, ``expert2/mask1.png``, ...). Writes the fused
masks under the input file names, an agreement map per image, optional probability maps,
per-expert Dice (and STAPLE sensitivity/specificity) per image and summarised per expert.
The work is done by :func:`lib.fusion.runner.fuse_folder`; exit codes as in
:mod:`lib.common.errors` (2: bad input or settings, nothing written).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

from lib.common.cli import make_parser, run_main, settings_table
from lib.common.settings import ConfigError
from lib.fusion import masks, runner, staple

LOGGER = "lib.fusion"  # every module of the package logs under it


def _build_parser() -> argparse.ArgumentParser:
    parser = make_parser("Fuse several experts' masks of the same images into one estimated ground truth.")
    group = parser.add_argument_group("input")
    group.add_argument("--input_folder", required=True,
                       help="folder with one sub-folder per expert; masks matched across experts by file name (key)")
    group.add_argument("--mask_type", default="auto", choices=("auto",) + masks.MASK_TYPES,
                       help="binary (0/1 or 0/255), multiclass (0..C-1) or instance (0 background, 1..I objects); "
                            "auto decides from every image's masks (a decision the images disagree on is printed "
                            "with the masks that made it, even with --quiet; more than 32 classes is refused)")
    group = parser.add_argument_group("method")
    group.add_argument("--method", default="staple", choices=masks.METHODS,
                       help="staple: EM over per-expert sensitivity/specificity (binary) or confusion matrices "
                            "(multi-class); majority_vote: the label most experts gave")
    group.add_argument("--undecided_label", type=int, default=0,
                       help="label of pixels without a unique winner (vote ties, STAPLE ties); 0 = background. "
                            "Binary outputs are written 0/255; an undecided label other than 0 or 1 is written as is")
    group.add_argument("--max_iterations", type=int, default=staple.DEFAULT_MAX_ITERATIONS,
                       help="STAPLE: most EM iterations per image (a warning says when they did not suffice)")
    group.add_argument("--tolerance", type=float, default=None,
                       help="STAPLE: stop when no sensitivity/specificity or confusion-matrix entry changes by more; "
                            f"default {staple.DEFAULT_TOLERANCE['binary']:g} for binary/instance and "
                            f"{staple.DEFAULT_TOLERANCE['multiclass']:g} for multi-class masks, as in SimpleITK")
    group = parser.add_argument_group("output")
    group.add_argument("--output_folder", required=True,
                       help="where fused masks, agreement/ maps, probabilities/ and the CSV reports go")
    group.add_argument("--output_format", default=None, choices=runner.OUTPUT_FORMATS,
                       help="format of the fused masks; default: the format of the input masks (JPEG masks are "
                            "refused: save them as PNG or TIFF)")
    group.add_argument("--save_probabilities", action="store_true",
                       help="also write probabilities/<key>.tif (float32: STAPLE posterior, or vote shares)")
    group.add_argument("--overwrite", action="store_true",
                       help="replace files of --output_folder that this tool did not write (fusion.json lists "
                            "those it wrote; they are replaced without it)")
    group = parser.add_argument_group("runtime")
    group.add_argument("--quiet", action="store_true", help="print warnings and errors only")
    return parser


def _config(args: argparse.Namespace) -> runner.FusionConfig:
    return runner.FusionConfig(method=args.method, mask_type=args.mask_type, undecided_label=args.undecided_label,
                               max_iterations=args.max_iterations, tolerance=args.tolerance,
                               save_probabilities=args.save_probabilities, output_format=args.output_format,
                               overwrite=args.overwrite)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the flags; misuse exits 2 through ``parser.error``."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if not Path(args.input_folder).is_dir():
        parser.error(f"--input_folder must be an existing folder; got {args.input_folder!r}")
    try:
        _config(args)  # FusionConfig holds the rules; the flags are its fields with "--"
    except ConfigError as error:
        parser.error("; ".join(f"--{violation}" for violation in error.violations))
    problem = runner.output_folder_problem(args.input_folder, args.output_folder)
    if problem:
        parser.error(problem.replace("output_folder", "--output_folder", 1).replace("inside input_folder",
                                                                                     "inside --input_folder", 1))
    return args


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        return message if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {message}"


def _configure_logging(quiet: bool) -> None:
    log = logging.getLogger(LOGGER)
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    for handler in log.handlers:
        if getattr(handler, "_fuse_masks", False):
            handler.stream = sys.stderr  # the stderr of this call (main may run many times in one process)
    if not any(getattr(h, "_fuse_masks", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_Formatter())
        handler._fuse_masks = True
        log.addHandler(handler)


def _report(report: runner.FusionReport) -> None:
    print(f"fused {report.n_images} image(s) from {len(report.experts)} experts as {report.mask_type} masks "
          f"in {report.seconds:.1f} s -> {report.output_folder}")
    print(f"per expert (mean over images; details in {runner.SUMMARY_CSV}):")
    for entry in report.summary:
        shown = [f"{key[:-5]} {entry[key]:.4f}" for key in entry
                 if key.endswith("_mean") and "_class_" not in key and not math.isnan(entry[key])]
        print(f"  {entry['expert']}: {entry['n_images']} image(s), " + ", ".join(shown))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = _config(args)
    _configure_logging(args.quiet)
    if not args.quiet:
        parser = _build_parser()
        defaults = {name: parser.get_default(name) for name in vars(args) if name not in ("input_folder", "output_folder")}
        print(settings_table("fuse_masks.py", vars(args), defaults, str(Path(args.output_folder) / "fusion.json")))
    command = [Path(sys.argv[0]).name] + (list(argv) if argv is not None else sys.argv[1:])

    def body() -> int:
        report = runner.fuse_folder(args.input_folder, args.output_folder, config, command=command)
        if not args.quiet:
            _report(report)
        return 0

    return run_main(body, prog="fuse_masks.py")


if __name__ == "__main__":
    sys.exit(main())
