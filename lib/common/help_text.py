"""The example at the top of each command line's ``--help``, keyed by program name.

:func:`lib.common.cli.make_parser` prints the example of its ``prog`` first, so that a user
sees a working command before the flags. Keep each one a real command on the project's layout
(the folders ``images/``, ``masks/`` of the user's data, ``db/``, ``runs/``, ``preds/``).
"""

from __future__ import annotations

EXAMPLES = {
    "build_lmdb.py": (
        "python build_lmdb.py --image_folder images --mask_folder masks --output_folder db --dataset_name cells\n"
        "    -> db/train-cells.lmdb, db/test-cells.lmdb (20 % of the images, at random), db/split-cells.csv\n"
        "python build_lmdb.py --image_folder train/images --mask_folder train/masks \\\n"
        "    --test_image_folder test/images --test_mask_folder test/masks --output_folder db --dataset_name cells\n"
        "    -> your own split: every test/ image in db/test-cells.lmdb"),
    "train_unet.py": (
        "python train_unet.py --train_database db/train-cells.lmdb --test_database db/test-cells.lmdb \\\n"
        "    --output_dir runs/cells --number_classes 2\n"
        "    -> runs/cells/model.keras + model.json (what inference.py reads), charts and logs"),
    "train_fcn.py": (
        "python train_fcn.py --train_database db/train-cells.lmdb --test_database db/test-cells.lmdb \\\n"
        "    --output_dir runs/fcn --number_classes 2 --variant fcn8\n"
        "    -> runs/fcn/model.keras + model.json (what inference.py reads), charts and logs"),
    "inference.py": (
        "python inference.py --model runs/cells --image_folder new_images --output_folder preds\n"
        "    -> preds/KEY.tif label images, preds/uncertainty.csv (add --mask_folder masks: metrics.csv, overlays/)"),
    "fuse_masks.py": (
        "python fuse_masks.py --input_folder expert_segmentations --output_folder fused\n"
        "    (expert_segmentations/expert1/img1.png, expert2/img1.png, ...) -> fused/img1.png, agreement maps"),
}


def example(prog: str | None) -> str | None:
    """The example block of ``prog`` (a script name such as ``train_unet.py``), None if it has none."""
    if not prog:
        return None
    return EXAMPLES.get(prog.rsplit("/", 1)[-1])
