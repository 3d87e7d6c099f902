#!/usr/bin/env python3
"""Export a trained model folder for other tools: a bioimage.io package, ONNX, or a TF SavedModel.

    python export_model.py --model runs/cells --format bioimageio --output cells.zip
    python export_model.py --model runs/cells --format onnx --output cells.onnx
    python export_model.py --model runs/cells --format savedmodel --output cells_savedmodel

Every export computes in float32 (--precision bfloat16: SavedModel only). The model folder also
gets model_card.md and cover.png (input | prediction). Exit code 0: written; 2: bad settings or
model (nothing written).
"""

from __future__ import annotations

import sys

from lib.common.cli import make_parser, run_main


def build_parser():
    parser = make_parser(__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="model folder (model.keras + model.json) written by training")
    parser.add_argument("--format", required=True, choices=("bioimageio", "onnx", "savedmodel"),
                        help="bioimageio: model zoo package (.zip); onnx: .onnx file; savedmodel: folder")
    parser.add_argument("--output", required=True, help="file (.zip, .onnx) or folder (savedmodel) to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--test_image", default=None,
                        help="image for the test tensors and cover picture (default: the first tile of the test "
                             "database recorded in model.json)")
    parser.add_argument("--precision", choices=("float32", "bfloat16"), default="float32",
                        help="compute precision of a SavedModel export")
    parser.add_argument("--name", default=None, help="bioimage.io model name (default: architecture and dataset)")
    parser.add_argument("--author", action="append", default=[], dest="authors",
                        help="bioimage.io author name (repeat for several)")
    parser.add_argument("--license", default="CC-BY-4.0", help="SPDX licence id of the bioimage.io package")
    parser.add_argument("--no_model_card", action="store_true",
                        help="do not (re)write model_card.md and cover.png in the model folder")
    parser.add_argument("--quiet", action="store_true", help="print only errors")
    parser.add_argument("--allow_cpu", action="store_true",
                        help="run on the CPU even when the job was given GPUs that TensorFlow cannot use")
    parser.add_argument("--verbose", action="store_true", help="show TensorFlow's own log lines (C++ start-up notices)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        from lib.common.device import check_allocated_gpus, device_line, quiet_tensorflow_logs

        quiet_tensorflow_logs(args.verbose)
        if not args.quiet:
            print(device_line(), flush=True)
        check_allocated_gpus(args.allow_cpu, prog="export_model.py")
        from lib.export.commands import ExportRequest, export

        request = ExportRequest(model=args.model, format=args.format, output=args.output, overwrite=args.overwrite,
                                test_image=args.test_image, precision=args.precision, name=args.name,
                                authors=args.authors, license=args.license, model_card=not args.no_model_card)
        export(request, log=(lambda message: None) if args.quiet else print)
        return 0

    return run_main(body, prog="export_model.py")


if __name__ == "__main__":
    sys.exit(main())
