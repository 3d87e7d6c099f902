"""A class per instance: two-channel instance masks (instance ids, class of each instance).

Histology challenges (CoNIC, PanNuke) label every object and give each a class: an instance
mask and a class mask of the same size, or both as the two channels of one TIFF (``(H, W, 2)``
or ``(2, H, W)``). ``build_lmdb.py --mask_type instance`` takes either:

* two-channel TIFF masks in ``--mask_folder`` (channel 0: instance ids, 0 = background; channel 1:
  the class of each pixel, 1..K inside objects); a two-channel PNG is grey + alpha, one channel;
* one-channel instance masks and ``--class_mask_folder`` holding a class mask of the same name
  (file stem) for every instance mask.

Every instance must have exactly one class >= 1; pixels of the background (instance 0) are
stored as class 0 whatever the class mask says there. The database stores the class as a
second label channel (records ``(H, W, 2)``) and its metadata gains ``instance_classes`` (K,
the number of object classes; the class head predicts K + 1 values with background) and
``instance_class_counts`` (instances per class 0..K).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .images import TIFF_EXTENSIONS, ImageReadError, _integer_mask, list_images, read_image, read_info, read_mask

# Name of the settings entry that switches the worker to class-aware reading.
CLASS_MODE = "class_mode"  # None | "channels" | "folder"
CLASS_MASKS = "class_masks"  # str(instance mask) -> str(class mask), folder mode


def config_problems(config) -> list[str]:
    """Invalid settings about classes (``config``: a :class:`lib.store.build.BuildConfig`)."""
    folder = getattr(config, "class_mask_folder", None)
    if folder is None:
        return []
    problems = []
    if config.mask_type != "instance":
        problems.append(f"class_mask_folder must go with --mask_type instance; got --mask_type {config.mask_type}. "
                        "Classes of semantic masks are their values: leave --class_mask_folder out")
    if not Path(folder).is_dir():
        problems.append(f"class_mask_folder must be an existing folder; got {folder!r}")
    return problems


def prepare(config, pairs: list, settings: dict[str, Any]) -> list[str]:
    """Decide whether the build stores classes, and where each class mask is; fill ``settings``.

    Returns the problems: masks with and without a class channel mixed, class masks missing.
    """
    settings[CLASS_MODE] = None
    if config.mask_type != "instance":
        return []
    folder = getattr(config, "class_mask_folder", None)
    if folder is not None:
        if not Path(folder).is_dir():
            return []  # reported by config_problems
        found, problems = list_images(folder)
        by_stem = {Path(p).stem.lower(): p for p in found.values()}
        by_key = {k.lower(): p for k, p in found.items()}
        table, missing = {}, []
        for pair in pairs:
            match = by_stem.get(Path(pair.mask).stem.lower()) or by_key.get(pair.key.lower())
            if match is None:
                missing.append(Path(pair.mask).name)
            else:
                table[str(pair.mask)] = str(match)
        if missing:
            shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
            problems.append(f"class mask must exist for every instance mask; got none for {len(missing)} mask(s) in "
                            f"{folder}: {shown}. Save a class mask with the same file name as each instance mask")
        settings[CLASS_MODE], settings[CLASS_MASKS] = "folder", table
        return problems
    two, one = [], []
    for pair in pairs:
        try:
            info = read_info(pair.mask)
        except ImageReadError:
            continue  # reported by the header check
        # A two-channel PNG is grey + alpha (an editor's export), read as one channel: only TIFFs hold classes.
        if not info.is_volume:
            tiff = Path(pair.mask).suffix.lower() in TIFF_EXTENSIONS
            (two if info.shape[2] == 2 and tiff else one).append(Path(pair.mask).name)
    if not two:
        return []
    settings[CLASS_MODE] = "channels"
    if one:
        shown = ", ".join(one[:10]) + (f" and {len(one) - 10} more" if len(one) > 10 else "")
        return [f"instance masks must all have two channels (instance ids, classes) or all one; got {len(two)} "
                f"with two and {len(one)} with one: {shown}. Give every mask its class channel"]
    return []


def read_labels(pair, settings: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None]:
    """The mask of ``pair`` as ``(instances or classes (H, W), classes (H, W) or None)``.

    Raises ``ImageReadError`` for unreadable masks or class masks.
    """
    mode = settings.get(CLASS_MODE)
    if mode is None:
        return read_mask(pair.mask, binary_255=settings["mask_type"] == "semantic"), None
    if mode == "folder":
        instances = read_mask(pair.mask, binary_255=False)
        if str(pair.mask) not in settings[CLASS_MASKS]:
            return instances, None  # a missing class mask: reported by prepare
        classes = read_mask(settings[CLASS_MASKS][str(pair.mask)], binary_255=False)
        if classes.shape != instances.shape:
            raise ImageReadError(f"class mask size must equal its instance mask's; got {classes.shape[0]}x"
                                 f"{classes.shape[1]} in {settings[CLASS_MASKS][str(pair.mask)]}, "
                                 f"{instances.shape[0]}x{instances.shape[1]} in {pair.mask}")
        return instances, classes
    array = read_image(pair.mask)
    if array.shape[2] != 2:
        raise ImageReadError(f"mask must have two channels (instance ids, classes); got {array.shape[2]} in "
                             f"{pair.mask}")
    return _integer_mask(array[..., 0], Path(pair.mask)), _integer_mask(array[..., 1], Path(pair.mask))


def instance_class_table(instances: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, majority class, number of distinct classes)`` of every instance id > 0 present."""
    inside = instances > 0
    ids = instances[inside].astype(np.int64)
    cls = classes[inside].astype(np.int64)
    if not ids.size:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    pairs = np.unique(np.stack([ids, cls]), axis=1)  # distinct (id, class) pairs, sorted by id
    uid, first, n_classes = np.unique(pairs[0], return_index=True, return_counts=True)
    # Majority class of each instance (ties: the smaller class).
    order = np.lexsort((cls, ids))
    ids_s, cls_s = ids[order], cls[order]
    change = np.flatnonzero(np.diff(ids_s * (int(cls_s.max()) + 1) + cls_s)) + 1
    starts = np.concatenate([[0], change])
    runs = np.diff(np.concatenate([starts, [ids_s.size]]))
    run_id, run_cls = ids_s[starts], cls_s[starts]
    best = np.zeros(len(uid), np.int64)
    best_n = np.zeros(len(uid), np.int64)
    where = np.searchsorted(uid, run_id)
    for w, c, n in zip(where, run_cls, runs):
        if n > best_n[w]:
            best[w], best_n[w] = c, n
    return uid, best, n_classes


def check(instances: np.ndarray, classes: np.ndarray | None, path, label_dtype, out: dict[str, Any]) -> list[str]:
    """Problems of one pair's classes; its count of instances per class (index = class) goes to
    ``out["instance_class_counts"]``. Each instance must have one class >= 1 that fits ``label_dtype``.
    """
    if classes is None:
        return []
    problems = []
    uid, best, n_classes = instance_class_table(instances, classes)
    mixed = uid[n_classes > 1]
    if mixed.size:
        shown = ", ".join(str(int(i)) for i in mixed[:10]) + (f" and {mixed.size - 10} more" if mixed.size > 10 else "")
        problems.append(f"each instance must have one class; got {mixed.size} instance(s) spanning several classes "
                        f"in {path}: ids {shown}. Give every pixel of an object the same class")
    unclassed = uid[(best == 0) & (n_classes == 1)]
    if unclassed.size:
        shown = ", ".join(str(int(i)) for i in unclassed[:10])
        problems.append(f"each instance must have a class >= 1 (0 is background); got class 0 for {unclassed.size} "
                        f"instance(s) in {path}: ids {shown}. Set their class in the class mask")
    top = int(best.max()) if best.size else 0
    if top > np.iinfo(label_dtype).max:
        problems.append(f"class values must fit in {np.dtype(label_dtype)}; got {top} in {path}")
    out["instance_class_counts"] = np.bincount(best, minlength=1).tolist()
    return problems


def stack(label: np.ndarray, instances: np.ndarray, classes: np.ndarray | None) -> np.ndarray:
    """The stored label: ``label`` (H, W) alone, or ``(H, W, 2)`` with the class (0 on background)."""
    if classes is None:
        return label
    out = np.zeros(label.shape + (2,), label.dtype)
    out[..., 0] = label
    out[..., 1] = np.where(instances > 0, classes, 0).astype(label.dtype)
    return out


def label_channels(settings: dict[str, Any]) -> int:
    return 2 if settings.get(CLASS_MODE) else 1


def metadata(settings: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, Any]:
    """Metadata keys of a build with classes (none without): K and the instances per class."""
    if not settings.get(CLASS_MODE):
        return {}
    counts = [np.asarray(r["instance_class_counts"]) for r in results if r.get("instance_class_counts") is not None]
    k = max([len(c) - 1 for c in counts] + [1])
    total = np.zeros(k + 1, np.int64)
    for c in counts:
        total[:len(c)] += c
    return {"label_channels": 2, "instance_classes": int(k), "instance_class_counts": total.tolist(),
            "class_names": ["background"] + [f"class {i}" for i in range(1, k + 1)]}
