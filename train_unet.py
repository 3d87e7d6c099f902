#!/usr/bin/env python3
"""Train a UNet or FC-DenseNet segmentation model on LMDB databases written by build_lmdb.py.

    python train_unet.py --train_database db/train-cells.lmdb --test_database db/test-cells.lmdb \
        --output_dir runs/cells --number_classes 2

Rerunning the same command after the job was stopped or killed resumes from the last checkpoint.
"""

from __future__ import annotations

import sys

ARCHITECTURES = {"unet": "unet", "fc-densenet56": "fc-densenet56", "fc-densenet67": "fc-densenet67",
                 "fc-densenet103": "fc-densenet103"}


def main(argv: list[str] | None = None) -> int:
    from lib.training.train_cli import run

    return run(argv, "train_unet.py", __doc__.split("\n\n")[0], ARCHITECTURES, "unet", "--architecture")


if __name__ == "__main__":
    sys.exit(main())
