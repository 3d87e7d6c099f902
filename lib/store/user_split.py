"""A test set the user chose: ``--test_image_folder``/``--test_mask_folder`` (NIST's flag names).

Every pair of the test folders goes to the test database, every pair of the image folders to the
training database (``train_fraction`` must be 1, its default then). A file name present in both
folder sets is refused: it is most often the same image in training and test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..common.files import is_inside
from .images import Pair, list_images, pair_images_masks

# train_fraction when none is given: 0.8 of the image folder, or all of it beside a test folder.
DEFAULT_TRAIN_FRACTION = 0.8


def resolved_train_fraction(train_fraction: float | None, test_image_folder: str | None) -> float:
    """``train_fraction`` as given, else 1 with a test folder and :data:`DEFAULT_TRAIN_FRACTION` without."""
    if train_fraction is not None:
        return train_fraction
    return 1.0 if test_image_folder else DEFAULT_TRAIN_FRACTION


def check_test_folders(config: Any) -> list[str]:
    """The ``BuildConfig`` rules of the test folders and of ``train_fraction`` (one line per violation)."""
    v = []
    images, masks = config.test_image_folder, config.test_mask_folder
    fraction = config.train_fraction
    if (images is None) != (masks is None):
        given, missing = ("test_image_folder", "test_mask_folder") if images else ("test_mask_folder",
                                                                                   "test_image_folder")
        v.append(f"{missing} must be given with {given}; got only {given}. Give both folders of your test set")
    for name in ("test_image_folder", "test_mask_folder"):
        folder = getattr(config, name)
        if folder is not None and not Path(folder).is_dir():
            v.append(f"{name} must be an existing folder; got {folder!r}")
        elif folder is not None and is_inside(Path(config.output_folder), folder):
            v.append(f"output_folder must not be or lie inside {name}; got {config.output_folder!r} in "
                     f"{folder!r}; choose a new folder")
    if images is not None and Path(images).is_dir() and Path(config.image_folder).is_dir() and \
            Path(images).resolve() == Path(config.image_folder).resolve():
        v.append(f"test_image_folder must differ from image_folder; got {images!r} for both")
    if images is not None and fraction != 1.0:
        v.append(f"train_fraction must be 1 with --test_image_folder (the test database is that folder); got "
                 f"{fraction}. Leave --train_fraction out")
    elif not 0.0 < fraction <= 1.0:
        hint = (": no image would go to the training database. To test on a set of your own, give it as "
                "--test_image_folder/--test_mask_folder and keep --image_folder for training" if fraction == 0 else "")
        v.append(f"train_fraction must be in (0, 1]; got {fraction}{hint}")
    return v


def pairs_of_test_folders(config: Any, train_pairs: list[Pair]) -> tuple[list[Pair], list[str]]:
    """The pairs of the test folders, and the problems of listing and pairing them (names in both sets too)."""
    if config.test_image_folder is None:
        return [], []
    images, problems = list_images(config.test_image_folder, config.image_format)
    masks, mask_problems = list_images(config.test_mask_folder)
    problems += mask_problems
    if not images:
        problems.append(f"test_image_folder must hold images (.tif, .tiff, .png, .jpg, .bmp); found none in "
                        f"{config.test_image_folder}")
    pairs, pair_problems = pair_images_masks(images, masks, config.mask_suffix)
    problems += pair_problems
    shared = sorted({p.key for p in train_pairs} & {p.key for p in pairs})
    if shared:
        problems.append(f"image names must differ between image_folder and test_image_folder; got {len(shared)} in "
                        f"both: {', '.join(shared[:5])}{' ...' if len(shared) > 5 else ''}. The same name usually "
                        "means the same image in training and test; rename or remove them")
    return pairs, problems


def user_split(keys: list[str], test_keys: set[str]) -> dict[str, str]:
    """``{key: "train" | "test"}``: the test folders' keys to test, every other key to train."""
    return {k: "test" if k in test_keys else "train" for k in keys}
