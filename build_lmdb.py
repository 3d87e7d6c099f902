#!/usr/bin/env python3
"""Build train/test LMDB databases of tiles from a folder of images and a folder of masks.

    python build_lmdb.py --image_folder imgs --mask_folder masks --output_folder db --dataset_name cells

writes db/train-cells.lmdb, db/test-cells.lmdb and db/split-cells.csv. Every problem of the
input (missing masks, size mismatches, bad values, unreadable files) is reported at once,
before anything is written. Does not import TensorFlow.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from lib.common.cli import flag_bool

    parser = argparse.ArgumentParser(
        prog="build_lmdb.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = parser.add_argument_group("input")
    data.add_argument("--image_folder", required=True, help="folder of images (tif, png, jpg, bmp)")
    data.add_argument("--mask_folder", required=True, help="folder of label masks, paired with images by file name")
    data.add_argument("--image_format", default=None,
                      help="only use images with this extension (e.g. tif); default: all supported")
    data.add_argument("--mask_suffix", default=None,
                      help="mask name = image name + this suffix (e.g. _mask); default: inferred")
    data.add_argument("--mask_type", choices=("semantic", "instance"), default="semantic",
                      help="semantic: values are classes; instance: values are object ids (kept as uint16/uint32)")
    data.add_argument("--number_classes", type=int, default=None,
                      help="number of semantic classes; mask values must be below it. Default: largest value + 1")
    split = parser.add_argument_group("split and tiling")
    split.add_argument("--train_fraction", type=float, default=0.8,
                       help="fraction of source images in the training database (split by image, before tiling)")
    split.add_argument("--seed", type=int, default=0, help="seed of the train/test split and fold assignment")
    split.add_argument("--folds", type=int, default=0,
                       help="record a k-fold assignment of the training images (0 = none)")
    split.add_argument("--use_tiling", type=flag_bool, nargs="?", const=True, default=True,
                       help="cut images into tiles (0: store whole images)")
    split.add_argument("--tile_size", type=int, default=256, help="tile edge in pixels")
    split.add_argument("--stride", type=int, default=None, help="step between tiles (default: tile_size, no overlap)")
    out = parser.add_argument_group("output")
    out.add_argument("--output_folder", required=True, help="folder for the databases and the split CSV")
    out.add_argument("--dataset_name", required=True, help="databases are named train-NAME.lmdb and test-NAME.lmdb")
    out.add_argument("--overwrite", action="store_true", help="replace existing databases of the same name")
    run = parser.add_argument_group("runtime")
    run.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8),
                     help="processes decoding and writing (0 = in this process)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.tile_size < 1:
        parser.error(f"--tile_size must be a positive number of pixels; got {args.tile_size}")
    if args.stride is not None and not 1 <= args.stride <= args.tile_size:
        parser.error(f"--stride must be in [1, --tile_size={args.tile_size}]; got {args.stride}")
    if not 0.0 < args.train_fraction <= 1.0:
        parser.error(f"--train_fraction must be in (0, 1]; got {args.train_fraction}")
    if args.number_classes is not None and args.number_classes < 2:
        parser.error(f"--number_classes must be >= 2; got {args.number_classes}")
    if args.folds < 0 or args.folds == 1:
        parser.error(f"--folds must be 0 or >= 2; got {args.folds}")
    if args.workers < 0:
        parser.error(f"--workers must be >= 0; got {args.workers}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from lib.common.settings import ConfigError
    from lib.store.build import BuildConfig, build_databases
    from lib.store.images import DatasetError
    from lib.store.lmdb_store import summarize

    config = BuildConfig(
        image_folder=args.image_folder, mask_folder=args.mask_folder, output_folder=args.output_folder,
        dataset_name=args.dataset_name, train_fraction=args.train_fraction, image_format=args.image_format,
        use_tiling=args.use_tiling, tile_size=args.tile_size, stride=args.stride, mask_suffix=args.mask_suffix,
        number_classes=args.number_classes, mask_type=args.mask_type, seed=args.seed, folds=args.folds,
        workers=args.workers, overwrite=args.overwrite)
    command = shlex.join([sys.executable, *(sys.argv if argv is None else ["build_lmdb.py", *argv])])
    print("build_lmdb settings: " + ", ".join(f"{k}={v}" for k, v in config.to_dict().items()), flush=True)
    try:
        result = build_databases(config, command=command, progress=not args.quiet)
    except (ConfigError, DatasetError, FileExistsError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    for path in result.databases.values():
        print(summarize(path))
    print(f"split: {result.split_csv}")
    mb = result.input_bytes / 1e6
    print(f"done in {result.seconds:.2f} s ({mb:.1f} MB of pixels, {mb / max(result.seconds, 1e-9):.0f} MB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
