#!/usr/bin/env python3
"""Train an FCN-8s/16s/32s segmentation model (VGG16-style encoder) on LMDB databases from build_lmdb.py.

    python train_fcn.py --train_database db/train-cells.lmdb --test_database db/test-cells.lmdb \
        --output_dir runs/fcn --number_classes 2 --variant fcn8

Trained from scratch unless --model_options '{"backbone_weights": "vgg16.weights.h5"}' names a
local weights file (nothing is downloaded). Rerunning the same command resumes. The flags,
defaults and exit codes are train_unet.py's (its run_training), with --variant for the model.
"""

from __future__ import annotations

import sys

from train_unet import run_training

ARCHITECTURES = {"fcn8": "fcn8", "fcn16": "fcn16", "fcn32": "fcn32"}


def main(argv: list[str] | None = None) -> int:
    return run_training(argv, "train_fcn.py", __doc__.split("\n\n")[0], ARCHITECTURES, "fcn8", "--variant")


if __name__ == "__main__":
    sys.exit(main())
