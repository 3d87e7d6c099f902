"""What a run trains on: database checks, folds, the training patch, target priors, the readers."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from ..common import normalization as norm
from ..reader.imagereader import ImageReader
from ..reader.targets import make_targets
from ..reader.targets_embedding import SIGMA_PLANES
from ..store.lmdb_store import LmdbReader, StoreError
from .config import TrainConfig, TrainingError

# Default training patch (random crops of larger tiles). On 2 CPU cores, 128-px patches make about
# 4x the steps of 256-px tiles per minute and gave the better models in the accuracy benchmarks
# (README: 0.924 against 0.768 foreground IoU, F1 0.885 against 0.761 for instances).
DEFAULT_PATCH = 128


def train_patch(config: TrainConfig, tile: int | None, divisor: int) -> int | None:
    """The training patch edge: ``--patch_size``, else :data:`DEFAULT_PATCH` of larger tiles (when the
    model's divisor allows), else the tile size (None for whole-image databases)."""
    if config.patch_size:
        return config.patch_size
    if tile is not None and tile > DEFAULT_PATCH and DEFAULT_PATCH % divisor == 0:
        return DEFAULT_PATCH
    return tile


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def check_databases(config: TrainConfig, log: Callable[[str], None] = _warn) -> tuple[dict, dict]:
    """Open both databases and check they fit each other and the settings; return their metadata.

    Raises ``TrainingError`` listing every incompatibility; ``log`` gets the warnings
    (:func:`class_warnings`), as ``"warning: ..."`` lines (default: stderr).
    """
    from ..models import model_geometry  # loads Keras

    problems = []
    metas = {}
    if not config.folds and Path(config.train_database).resolve() == Path(config.test_database).resolve():
        problems.append(f"test_database must differ from train_database; got {config.test_database} for both "
                        "(resolved), so the test metrics would be measured on the training tiles. Give the "
                        "test-NAME.lmdb that build_lmdb.py wrote beside train-NAME.lmdb, or use --folds K to "
                        "validate on held-out source images of the training database")
    for name in ("train_database", "test_database"):
        path = getattr(config, name)
        try:
            with LmdbReader(path) as reader:
                metas[name] = dict(reader.metadata)
                if len(reader) == 0:
                    problems.append(f"{name} must hold records; got none in {path}")
        except StoreError as exc:
            problems.append(f"{name}: {exc}")
    if problems:
        raise TrainingError("the databases cannot be used:\n" + "\n".join(f"  - {p}" for p in problems))
    train, test = metas["train_database"], metas["test_database"]
    for name, meta in (("train_database", train), ("test_database", test)):
        stats = [*(meta.get("channel_mean") or []), *(meta.get("channel_std") or [])]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in stats):
            problems.append(f"{name} must hold finite pixel values; got channel mean {meta.get('channel_mean')}, std "
                            f"{meta.get('channel_std')} in {getattr(config, name)} (its images hold NaN or Inf "
                            "pixels). Rebuild it from images without them (replace them, e.g. by 0 or the image's "
                            "median); training on them gives a NaN loss at the first step")
    if train["channels"] != test["channels"]:
        problems.append(f"train and test databases must have the same channels; got {train['channels']} and "
                        f"{test['channels']}")
    wanted = "instance" if config.target == "instance" else "semantic"
    for name, meta in (("train_database", train), ("test_database", test)):
        kind = meta.get("label_kind", "semantic")
        if kind != wanted:
            hint = ("Build it with --mask_type instance from instance label images" if wanted == "instance" else
                    "Build it with --mask_type semantic, or train with --target instance")
            problems.append(f"{name} must hold {wanted} labels for --target {config.target}; got {kind!r} labels. "
                            + hint)
        elif wanted == "instance" and meta.get("instance_classes") != train.get("instance_classes"):
            problems.append(f"{name} must have the classes per instance of the training database "
                            f"({train.get('instance_classes') or 'none'}); got {meta.get('instance_classes') or 'none'}"
                            f" in {getattr(config, name)}. Build both from masks with the same classes")
        elif wanted == "semantic" and meta["number_classes"] > config.number_classes:
            problems.append(f"{name} holds {meta['number_classes']} classes; --number_classes must be at least that"
                            f", got {config.number_classes}")
    divisor, _ = model_geometry(config.architecture, **config.model_options)
    tile = train.get("tile_size")
    patch = train_patch(config, tile, divisor)
    if patch is None:
        problems.append("patch_size must be given for a database of whole images (built with --use_tiling 0)")
    else:
        if tile is not None and patch > tile:
            problems.append(f"patch_size must be <= the tile size {tile} of {config.train_database}; got {patch}")
        if patch % divisor:
            problems.append(f"patch_size must be a multiple of {divisor} for {config.architecture}; got {patch}. "
                            f"Use {max(divisor, patch // divisor * divisor)}")
    test_tile = test.get("tile_size")
    if test_tile is not None and test_tile % divisor:
        problems.append(f"the test tiles ({test_tile} px) must be a multiple of {divisor} for {config.architecture};"
                        " rebuild the test database with such a --tile_size")
    if problems:
        raise TrainingError("the databases do not fit the settings:\n" + "\n".join(f"  - {p}" for p in problems))
    for warning in class_warnings(config, train):
        log(f"warning: {warning}")
    return train, test


# Folds


def fold_records(meta: dict, folds: int, seed: int) -> list[list[int]]:
    """Record indices of each fold of a training database: ``n = min(folds, source images)`` lists.

    Uses the database's own fold assignment (``build_lmdb.py --folds``) when it has ``folds``
    folds; otherwise assigns the source images to folds here, seeded, as build_lmdb does.
    """
    sources = meta["sources"]
    in_db = sorted(set(meta["tiles"]["source"]))
    stored = [sources[i].get("fold", -1) for i in in_db]
    n = min(folds, len(in_db))
    if meta.get("folds") == n and all(f >= 0 for f in stored):
        fold_of = dict(zip(in_db, stored))
    else:
        order = np.random.default_rng([seed, 1]).permutation(len(in_db))
        fold_of = {in_db[j]: i % n for i, j in enumerate(order)}
    records: list[list[int]] = [[] for _ in range(n)]
    for record, source in enumerate(meta["tiles"]["source"]):
        records[fold_of[source]].append(record)
    return records


@dataclasses.dataclass(frozen=True)
class Split:
    """The records a run trains and validates on (None: the whole database)."""

    train: list[int] | None = None
    test: list[int] | None = None
    folds: int = 0  # folds actually made (min(folds, source images)); 0 outside k-fold


def split_records(config: TrainConfig, train_meta: dict) -> Split:
    """The training and validation records of this run: in a k-fold run, fold ``config.fold`` validates."""
    if not config.folds:
        return Split()
    per_fold = fold_records(train_meta, config.folds, config.seed)
    return Split(train=sorted(r for i, f in enumerate(per_fold) if i != config.fold for r in f),
                 test=per_fold[config.fold], folds=len(per_fold))


def train_records_for_priors(config: TrainConfig, train_meta: dict) -> list[int] | None:
    """The training records of this run (the other folds in a k-fold run), None for all."""
    return split_records(config, train_meta).train


# Priors of the instance targets


def channel_priors(database: str, spec, records: list[int] | None = None, max_records: int = 64) -> list[float]:
    """Mean of each target channel over up to ``max_records`` evenly spaced stored tiles (no augmentation).

    Ray channels (StarDist, kind "ray") are learnt on object pixels only: their prior is the mean over the
    pixels where they are positive, so that the rays start at a typical object's size instead of near 0 (at
    0 no candidate polygon passes the shortest-ray rule and a young model finds no object at all).
    """
    kinds = tuple(spec.kinds)
    with LmdbReader(database) as reader:
        pool = np.arange(len(reader)) if records is None else np.asarray(records)
        chosen = pool[np.linspace(0, len(pool) - 1, min(max_records, len(pool))).round().astype(int)]
        sums, pixels = np.zeros(len(spec.channels)), 0
        positive_sums, positive_counts = np.zeros(len(spec.channels)), np.zeros(len(spec.channels))
        for record in np.unique(chosen):
            _, label = reader[int(record)]
            instances = label if label.ndim == 2 else label[:, :, 0]
            classes = label[:, :, 1] if spec.n_class_planes and label.ndim == 3 and label.shape[2] > 1 else None
            targets = make_targets(np.ascontiguousarray(instances), spec, classes=classes)
            sums += targets.sum(axis=(0, 1), dtype=np.float64)
            positive = targets > 0
            positive_sums += np.where(positive, targets, 0).sum(axis=(0, 1), dtype=np.float64)
            positive_counts += positive.sum(axis=(0, 1))
            pixels += instances.size
    priors = sums / max(pixels, 1)
    for k, kind in enumerate(kinds):
        if (kind == "ray" or spec.channels[k] in SIGMA_PLANES) and positive_counts[k]:
            priors[k] = positive_sums[k] / positive_counts[k]
    return [float(v) for v in priors]


def set_head_bias(model, priors: list[float], kinds) -> None:
    """Bias of ``head_logits``: log-odds of the prior for binary channels, the prior for distances, the log
    of the prior for class planes (the softmax then starts at the class frequencies)."""
    layer = model.get_layer("head_logits")
    bias = getattr(layer, "bias", None)
    if bias is None or tuple(bias.shape) != (len(priors),):
        return
    values = [math.log(min(max(p, 1e-3), 1 - 1e-3) / (1 - min(max(p, 1e-3), 1 - 1e-3)))
              if kind in ("binary", "embedding") else
              math.log(max(p, 1e-3)) if kind == "class" else p for p, kind in zip(priors, kinds)]
    bias.assign(np.asarray(values, np.float32).astype(bias.dtype))


# Readers


@dataclasses.dataclass(frozen=True)
class ReaderPlan:
    """How the run's readers are made: the settings that are not in the config."""

    train_meta: dict
    patch: int
    split: Split
    global_batch: int
    worker_index: int = 0
    start_epoch: int = 0


def make_readers(config: TrainConfig, plan: ReaderPlan) -> tuple[ImageReader, ImageReader]:
    """``(train_reader, test_reader)`` of a run (not started)."""
    spec = config.target_spec()
    targets = None if spec is None else spec.to_dict()
    train_reader = ImageReader(config.train_database, config.batch_size, mode="train", patch_shape=plan.patch,
                               augment_params=config.augment_params(), sampling=config.sampling,
                               normalization=config.normalization, reader_count=config.reader_count,
                               seed=config.seed * 1000 + plan.worker_index, start_epoch=plan.start_epoch,
                               records=plan.split.train, targets=targets, percentiles=config.percentiles)
    # The test images are normalised with the training statistics, as inference will do.
    test_reader = ImageReader(config.test_database, plan.global_batch, mode="test",
                              normalization=config.normalization, reader_count=min(config.reader_count, 1),
                              seed=config.seed,
                              channel_stats=(plan.train_meta["channel_mean"], plan.train_meta["channel_std"]),
                              records=plan.split.test, targets=targets, percentiles=config.percentiles)
    return train_reader, test_reader


def normalization_record(config: TrainConfig, train_meta: dict) -> dict:
    """The ``normalization`` block of model.json: the mode, the training statistics, the percentiles
    (mode "percentile"), and the intensity distribution of the training images (``training_images``:
    :func:`lib.common.normalization.intensity_reference`, null for databases built before it) that
    inference compares each image with."""
    records = set((train_meta.get("tiles") or {}).get("source") or [])
    sources = train_meta.get("sources") or []
    tables = [sources[i].get("percentiles") for i in sorted(records) if i < len(sources)]
    reference = norm.intensity_reference(tables, train_meta.get("percentile_grid") or [])
    block = {"mode": config.normalization, "mean": train_meta["channel_mean"], "std": train_meta["channel_std"],
             "training_images": reference}
    if config.normalization == "percentile":
        block.update(percentiles=[float(v) for v in config.percentiles], clip=False)
    return block


def class_warnings(config: TrainConfig, train_meta: dict) -> list[str]:
    """Warnings (not errors) about ``number_classes``: more classes than the training database holds."""
    if config.target != "semantic" or config.number_classes is None:
        return []
    counts = train_meta.get("class_pixel_counts") or []
    present = [c for c, n in enumerate(counts) if n > 0]
    held = int(train_meta.get("number_classes") or len(counts))
    if config.number_classes > held:
        return [f"--number_classes {config.number_classes} is more than the {held} classes of "
                f"{config.train_database} (values 0..{held - 1}; {len(present)} present in its masks): the model "
                f"gets {config.number_classes - held} output classes no pixel is trained on. Pass --number_classes "
                f"{held} unless the test images hold classes the training images lack"]
    return []
