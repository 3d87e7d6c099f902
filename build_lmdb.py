#!/usr/bin/env python3
"""Build train/test LMDB databases of tiles from a folder of images and a folder of masks.

    python build_lmdb.py --image_folder imgs --mask_folder masks --output_folder db --dataset_name cells

writes db/train-cells.lmdb, db/test-cells.lmdb and db/split-cells.csv (a random 20 % of the
images to test; --test_image_folder/--test_mask_folder give your own test set).
Every problem of the input (missing masks, size mismatches, bad values, unreadable files) is reported at once,
before anything is written. Does not import TensorFlow.

Semantic masks are checked for plausibility unless --number_classes is given: JPEG masks, 0/255
masks with stray values, many sparse or rare values, and values that look like object ids
(use --mask_type instance) are refused, naming the masks. Images and masks may share a folder
when masks are named NAME + suffix (e.g. img.png, img_mask.png).

Exit codes: 0 done; 2 bad flags, settings or dataset (nothing written); 130 interrupted
(nothing written).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from lib.common.cli import flag_bool, make_parser, run_main, settings_table
from lib.common.errors import EXIT_RESUMABLE
from lib.common.settings import ConfigError

PROG = "build_lmdb.py"


def make_build_parser() -> argparse.ArgumentParser:
    """The flags of build_lmdb.py (NIST's names kept), in groups: input, split and tiling, output, runtime."""
    parser = make_parser(__doc__.split("\n\n")[0], prog=PROG)
    data = parser.add_argument_group("input")
    data.add_argument("--image_folder", required=True, help="folder of images (tif, png, jpg, bmp, or OME-Zarr folders NAME.zarr / NAME.ome.zarr)")
    data.add_argument("--mask_folder", required=True, help="folder of label masks, paired with images by file name")
    data.add_argument("--image_format", default=None,
                      help="only use images with this extension (e.g. tif); default: all supported")
    data.add_argument("--mask_suffix", default=None,
                      help="mask name = image name + this suffix (e.g. _mask); default: inferred")
    data.add_argument("--mask_type", choices=("semantic", "instance"), default="semantic",
                      help="semantic: values are classes; instance: values are object ids (kept as uint16/uint32)")
    data.add_argument("--number_classes", type=int, default=None,
                      help="number of semantic classes; mask values must be below it. Default: largest value + 1")
    data.add_argument("--test_image_folder", default=None,
                      help="your own test images: all of them become the test database (give --test_mask_folder "
                           "too); default: a random 20 %% of --image_folder")
    data.add_argument("--test_mask_folder", default=None, help="the masks of --test_image_folder")
    data.add_argument("--class_mask_folder", default=None,
                      help="with --mask_type instance: a class mask (class 1..K of each object, 0 background) for "
                           "every instance mask, same file name; two-channel masks (ids, classes) need no folder")
    tiling = parser.add_argument_group("split and tiling")
    tiling.add_argument("--train_fraction", type=float, default=None,
                        help="fraction of source images in the training database (split by image, before tiling); "
                             "default: 0.8, or 1 (and only 1) with --test_image_folder")
    tiling.add_argument("--seed", type=int, default=0, help="seed of the train/test split and fold assignment")
    tiling.add_argument("--folds", type=int, default=0,
                        help="record a k-fold assignment of the training images (0 = none)")
    tiling.add_argument("--use_tiling", type=flag_bool, nargs="?", const=True, default=True,
                        help="cut images into tiles (0: store whole images)")
    tiling.add_argument("--tile_size", type=int, default=256, help="tile edge in pixels")
    tiling.add_argument("--stride", type=int, default=None,
                        help="step between tiles (default: tile_size, no overlap)")
    out = parser.add_argument_group("output")
    out.add_argument("--output_folder", required=True, help="folder for the databases and the split CSV")
    out.add_argument("--dataset_name", required=True, help="databases are named train-NAME.lmdb and test-NAME.lmdb")
    out.add_argument("--overwrite", action="store_true", help="replace existing databases of the same name")
    run = parser.add_argument_group("runtime")
    run.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8),
                     help="processes decoding and writing (0 = in this process)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def config_from_args(args: argparse.Namespace):
    """The :class:`lib.store.build.BuildConfig` the flags describe (not yet validated)."""
    from lib.store.build import BuildConfig

    return BuildConfig(
        image_folder=args.image_folder, mask_folder=args.mask_folder, output_folder=args.output_folder,
        dataset_name=args.dataset_name, train_fraction=args.train_fraction, image_format=args.image_format,
        use_tiling=args.use_tiling, tile_size=args.tile_size, stride=args.stride, mask_suffix=args.mask_suffix,
        number_classes=args.number_classes, mask_type=args.mask_type, seed=args.seed, folds=args.folds,
        workers=args.workers, overwrite=args.overwrite, test_image_folder=args.test_image_folder,
        test_mask_folder=args.test_mask_folder, class_mask_folder=args.class_mask_folder)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and validate the flags; misuse exits 2 through ``parser.error`` with every violation.

    The rules are :meth:`BuildConfig.validate`'s (one place); each line names its flag.
    """
    parser = make_build_parser()
    args = parser.parse_args(argv)
    try:
        config_from_args(args).validate()
    except ConfigError as error:
        parser.error("\n  ".join(f"--{violation}" for violation in error.violations))
    return args


def _build(args: argparse.Namespace, argv: list[str] | None) -> int:
    from lib.store.build import BuildConfig, BuildTerminated, build_databases
    from lib.store.lmdb_store import summarize

    config = config_from_args(args)
    command = shlex.join([sys.executable, *(sys.argv if argv is None else [PROG, *argv])])
    # The full settings (and this command) are recorded in each database's metadata (build_config).
    saved = f"the metadata of {Path(config.output_folder) / f'*-{config.dataset_name}.lmdb'} (build_config)"
    print(settings_table(PROG, config.to_dict(), BuildConfig(image_folder="", mask_folder="", output_folder="",
                                                              dataset_name="").to_dict(), saved), flush=True)
    try:
        result = build_databases(config, command=command, progress=not args.quiet)
    except BuildTerminated:
        print("error: stopped by SIGTERM (pre-emption or wall time); nothing was written. Rerun the same command",
              file=sys.stderr)
        return EXIT_RESUMABLE
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    for path in result.databases.values():
        print(summarize(path))
    print(f"split: {result.split_csv}")
    mb = result.input_bytes / 1e6
    print(f"done in {result.seconds:.2f} s ({mb:.1f} MB of pixels, {mb / max(result.seconds, 1e-9):.0f} MB/s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the build; returns the exit code (errors mapped by class through ``run_main``)."""
    args = parse_args(argv)
    return run_main(lambda: _build(args, argv), prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
