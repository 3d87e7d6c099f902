"""Distributed training: strategy, custom loop, evaluation, checkpoints, model folder.

Keras 3 ``Model.fit`` does not run under ``MultiWorkerMirroredStrategy`` (keras-team/keras
issue 20585), so training is a custom loop: a ``tf.function`` step run with
``strategy.run``, per-example losses summed per replica and divided by the global batch.
The same loop serves one device, ``MirroredStrategy`` and ``MultiWorkerMirroredStrategy``.

Outputs in ``output_dir`` (the model folder of ARCHITECTURE.md):

    model.keras          best model (lowest test loss)
    model.json           architecture, classes, channels, normalisation, geometry, provenance, best metrics
    saved_model/         TF SavedModel export of the best model
    train_config.json    the resolved settings
    log.csv              one row per evaluation
    charts.png           loss and IoU curves, redrawn at every evaluation
    tensorboard/         scalars for TensorBoard
    checkpoint/          last state (weights, optimizer, step, sampler epoch) for resuming
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import math
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .. import __version__
from ..common.device import _worker_info, bfloat16_is_native, select_strategy
from ..common.files import write_json
from ..common.settings import ConfigError
from ..reader.augment import AugmentParams
from ..scoring.metrics import confusion_matrix, scores
from ..store.lmdb_store import LmdbReader, StoreError
from .losses import LOSSES, class_weights_from_counts

LR_SCHEDULES = ("constant", "plateau", "cosine", "onecycle")
TARGETS = ("semantic", "instance")
# IoU thresholds of the matching statistics reported at each evaluation of an instance model.
EVAL_MATCHING_THRESHOLDS = (0.5,)
MODEL_JSON_VERSION = 1
IMPROVEMENT_TOLERANCE = 1e-4  # an evaluation within this of the best test loss counts as best (as NIST)
# Settings that may change between a run and its resumption.
# Default training patch (random crops of larger tiles). On 2 CPU cores, 128-px patches make about
# 4x the steps of 256-px tiles per minute and gave the better models in the accuracy benchmarks
# (README: 0.924 against 0.768 foreground IoU, F1 0.885 against 0.761 for instances).
DEFAULT_PATCH = 128
RESUMABLE = ("max_steps", "max_minutes", "early_stopping", "reader_count", "test_every_n_steps")


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, incompatible data, a different run in output_dir)."""


class TrainingInterrupted(RuntimeError):
    """A signal asked training to stop; a checkpoint was written. ``signum`` says which."""

    def __init__(self, signum: int, step: int):
        self.signum = signum
        self.step = step
        super().__init__(f"stopped by signal {signum} at step {step}; checkpoint written, rerun the same command "
                         "to resume")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run (see ``train_unet.py --help`` for each)."""

    train_database: str
    test_database: str
    output_dir: str
    number_classes: int
    architecture: str = "unet"
    model_options: dict = dataclasses.field(default_factory=dict)
    batch_size: int = 8
    patch_size: int | None = None
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    loss: str = "ce"
    lr_schedule: str = "constant"
    warmup_steps: int = 20
    test_every_n_steps: int = 1000
    early_stopping: int = 10
    max_steps: int | None = None
    max_minutes: float | None = None
    use_augmentation: bool = True
    augmentation: dict = dataclasses.field(default_factory=dict)
    sampling: str = "uniform"
    normalization: str = "dataset"
    reader_count: int = 2
    seed: int = 0
    mixed_precision: bool | None = None  # None: bfloat16 where the hardware runs it natively
    jit_compile: bool = False
    folds: int = 0  # k-fold run: this model validates on fold `fold` of the training database
    fold: int | None = None
    target: str = "semantic"  # "instance": per-pixel channels for watershed post-processing
    instance_channels: str = "F,C,Db"
    instance_weights: str | None = None
    instance_options: dict = dataclasses.field(default_factory=dict)  # TargetSpec fields (contour_mode, ...)

    def target_spec(self):
        """The :class:`lib.reader.targets.TargetSpec` of an instance run (validated), None for a semantic one."""
        if self.target != "instance":
            return None
        from ..reader.targets import parse_instance_channels

        return parse_instance_channels(self.instance_channels, self.instance_weights, **self.instance_options)

    @property
    def output_channels(self) -> int:
        spec = self.target_spec()
        return self.number_classes if spec is None else len(spec.channels)

    def validate(self) -> "TrainConfig":
        """Return self or raise ``ConfigError`` listing every invalid field (files are checked by :func:`train`)."""
        from ..models import ARCHITECTURES

        v = []
        if self.architecture not in ARCHITECTURES:
            v.append(f"architecture must be one of {', '.join(ARCHITECTURES)}; got {self.architecture!r}")
        if self.number_classes < 2:
            v.append(f"number_classes must be >= 2; got {self.number_classes}")
        for name in ("batch_size", "test_every_n_steps", "early_stopping"):
            if getattr(self, name) < 1:
                v.append(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.patch_size is not None and self.patch_size < 1:
            v.append(f"patch_size must be >= 1; got {self.patch_size}")
        if not self.learning_rate > 0:
            v.append(f"learning_rate must be > 0; got {self.learning_rate}")
        if self.weight_decay < 0:
            v.append(f"weight_decay must be >= 0; got {self.weight_decay}")
        if self.loss not in LOSSES:
            v.append(f"loss must be one of {', '.join(LOSSES)}; got {self.loss!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            v.append(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}; got {self.lr_schedule!r}")
        if self.warmup_steps < 0:
            v.append(f"warmup_steps must be >= 0; got {self.warmup_steps}")
        if self.max_steps is not None and self.max_steps < 1:
            v.append(f"max_steps must be >= 1; got {self.max_steps}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            v.append(f"max_minutes must be > 0; got {self.max_minutes}")
        if self.lr_schedule in ("cosine", "onecycle") and self.max_steps is None:
            v.append(f"lr_schedule {self.lr_schedule!r} needs max_steps (its length); got none")
        if self.reader_count < 0:
            v.append(f"reader_count must be >= 0; got {self.reader_count}")
        if self.folds == 1 or self.folds < 0:
            v.append(f"folds must be 0 (no k-fold) or >= 2; got {self.folds}")
        if self.folds and self.fold is not None and not 0 <= self.fold < self.folds:
            v.append(f"fold must be in [0, {self.folds}); got {self.fold}")
        try:
            AugmentParams(**self.augmentation)
        except (TypeError, ValueError) as exc:
            v.append(f"augmentation settings are invalid: {exc}")
        if self.target not in TARGETS:
            v.append(f"target must be one of {', '.join(TARGETS)}; got {self.target!r}")
        elif self.target == "instance":
            try:
                self.target_spec()
            except (TypeError, ValueError) as exc:
                v.append(f"instance targets are invalid: {exc}")
            if self.loss != "ce":
                v.append(f"loss must be left at 'ce' for --target instance (each channel has its own loss: sigmoid "
                         f"cross-entropy or L1/MSE); got {self.loss!r}")
        if v:
            raise ConfigError(v)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class TrainResult:
    output_dir: Path
    steps: int
    best_step: int | None
    best_test_loss: float | None
    best_metrics: dict[str, Any]
    stopped_because: str
    resumed_from: int | None
    seconds: float


# Strategy


# Learning rate


def learning_rate_at(step: int, config: TrainConfig, plateau_factor: float) -> float:
    """Learning rate for ``step`` (0-based): linear warm-up, then the schedule."""
    base = config.learning_rate
    if config.warmup_steps and step < config.warmup_steps:
        return base * (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return base
    if config.lr_schedule == "plateau":
        return base * plateau_factor
    total = max(config.max_steps - config.warmup_steps, 1)
    progress = min(max(step - config.warmup_steps, 0) / total, 1.0)
    if config.lr_schedule == "cosine":
        return base * 0.5 * (1 + math.cos(math.pi * progress))
    # one-cycle: up from base/25 to base over 30 %, then cosine down to base/1e4
    if progress < 0.3:
        return base / 25 + (base - base / 25) * progress / 0.3
    return base / 1e4 + (base - base / 1e4) * 0.5 * (1 + math.cos(math.pi * (progress - 0.3) / 0.7))


# Validation of the inputs


def check_databases(config: TrainConfig) -> tuple[dict, dict]:
    """Open both databases and check they fit each other and the settings; return their metadata.

    Raises ``TrainingError`` listing every incompatibility.
    """
    from ..models import model_geometry

    problems = []
    metas = {}
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
    return train, test


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


# Checkpoints


def _save_checkpoint(folder: Path, model, optimizer, state: dict) -> None:
    """Write weights, optimizer variables and state to ``folder`` atomically (temporary folder, then swap)."""
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_weights(tmp / "model.weights.h5")
    np.savez(tmp / "optimizer.npz", **{f"v{i:05d}": np.asarray(v.numpy()) for i, v in enumerate(optimizer.variables)})
    write_json(tmp / "state.json", state)
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(folder: Path, model, optimizer) -> dict:
    model.load_weights(folder / "model.weights.h5")
    with np.load(folder / "optimizer.npz", allow_pickle=False) as data:
        values = [data[k] for k in sorted(data.files)]
    if len(values) != len(optimizer.variables):
        raise TrainingError(f"checkpoint in {folder} has {len(values)} optimizer variables, the model needs "
                            f"{len(optimizer.variables)}; it belongs to a different model")
    for variable, value in zip(optimizer.variables, values):
        variable.assign(value)
    return json.loads((folder / "state.json").read_text())


def _find_resume(out: Path, config: TrainConfig) -> dict | None:
    """The checkpoint state to resume from, or None for a new run; raises for a different run."""
    saved = out / "train_config.json"
    if not saved.exists():
        if out.exists() and any(out.iterdir()):
            raise TrainingError(f"output_dir must be empty or hold a run of the same settings; {out} holds other "
                                "files. Choose another --output_dir")
        return None
    previous = json.loads(saved.read_text())
    current = config.to_dict()
    differing = sorted(k for k in set(previous) | set(current)
                       if k not in RESUMABLE and previous.get(k) != current.get(k))
    if differing:
        shown = "; ".join(f"{k}: {previous.get(k)!r} -> {current.get(k)!r}" for k in differing[:6])
        raise TrainingError(f"output_dir {out} holds a different run ({shown}). Choose another --output_dir, "
                            "or rerun with the same settings to resume it")
    state_file = out / "checkpoint" / "state.json"
    return json.loads(state_file.read_text()) if state_file.exists() else None


# Outputs


def _model_json(config: TrainConfig, train_meta: dict, test_meta: dict, geometry: tuple[int, int],
                patch: int, best: dict) -> dict:
    spec = config.target_spec()
    instance = {}
    if spec is not None:
        instance = {"output_channels": len(spec.channels),
                    "instance": {"channels": list(spec.channels), "kinds": list(spec.kinds), "targets": spec.to_dict(),
                                 "postprocess": _postprocess_defaults(spec).to_dict()}}
    return {
        "format_version": MODEL_JSON_VERSION,
        "architecture": config.architecture,
        "model_options": config.model_options,
        "label_kind": config.target,
        "number_classes": 2 if spec is not None else config.number_classes,
        **instance,
        "input_channels": train_meta["channels"],
        "input_dtype": train_meta["image_dtype"],
        "normalization": {"mode": config.normalization, "mean": train_meta["channel_mean"],
                          "std": train_meta["channel_std"]},
        "size_divisor": geometry[0],
        "receptive_field_radius": geometry[1],
        "patch_size": patch,
        "training": config.to_dict(),
        "data": {
            "train_database": str(Path(config.train_database).resolve()),
            "test_database": str(Path(config.test_database).resolve()),
            "dataset_name": train_meta.get("dataset_name"),
            "train_records": train_meta["n_records"], "test_records": test_meta["n_records"],
            "class_pixel_counts": train_meta["class_pixel_counts"],
            "build_command": train_meta.get("build_command"),
            "fold": config.fold, "folds": config.folds,
        },
        "best": best,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "toolkit_version": __version__,
    }


def _draw_charts(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(steps, [r["train_loss"] for r in rows], label="train")
    a.plot(steps, [r["test_loss"] for r in rows], label="test")
    a.set_xlabel("step")
    a.set_ylabel("loss")
    a.set_yscale("log")
    a.legend()
    b.plot(steps, [r["mean_iou"] for r in rows], label="mean IoU")
    b.plot(steps, [r["pixel_accuracy"] for r in rows], label="pixel accuracy")
    if rows and "f1" in rows[0]:
        b.plot(steps, [r["f1"] for r in rows], label="matching F1 (IoU 0.5)")
        b.plot(steps, [r["panoptic_quality"] for r in rows], label="panoptic quality")
    b.set_xlabel("step")
    b.set_ylim(0, 1)
    b.legend()
    fig.tight_layout()
    tmp = path.with_name(".charts.partial.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)


LOG_FIELDS = ["step", "epoch", "train_loss", "test_loss", "mean_iou", "mean_foreground_iou", "mean_dice",
              "pixel_accuracy", "iou_per_class", "learning_rate", "input_bound_pct", "images_per_s", "elapsed_s"]
# Instance models add per-channel test losses and matching statistics at IoU 0.5 after post-processing.
INSTANCE_LOG_FIELDS = LOG_FIELDS + ["channel_losses", "f1", "panoptic_quality", "precision", "recall",
                                    "objects_true", "objects_predicted"]
_TEXT_FIELDS = ("iou_per_class", "channel_losses")


def _append_log(path: Path, row: dict) -> None:
    new = not path.exists()
    fields = INSTANCE_LOG_FIELDS if "f1" in row else LOG_FIELDS
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerow({k: row[k] for k in fields})


def _read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{k: (float(v) if k not in _TEXT_FIELDS else v) for k, v in r.items()} for r in csv.DictReader(f)]


# The loop


def make_train_step(strategy, model, optimizer, loss_fn, global_batch: int, jit_compile: bool = False):
    """``step(iterator) -> loss``: one optimisation step on the next element of a distributed iterator.

    Each replica sums its per-example losses and divides by ``global_batch``, so the
    all-reduced (summed) gradients are those of the mean loss over the global batch, whatever
    the number of replicas. ``jit_compile`` compiles the forward and backward pass with XLA.
    """
    import tensorflow as tf

    @tf.function(jit_compile=jit_compile or None)
    def gradients(images, labels):
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            loss = tf.reduce_sum(loss_fn(labels, logits)) / global_batch
        return loss, tape.gradient(loss, model.trainable_variables)

    def replica_step(images, labels):
        loss, grads = gradients(images, labels)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    @tf.function
    def step(iterator):
        per_replica = strategy.run(replica_step, args=next(iterator))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    return step


def train(config: TrainConfig, strategy=None, log: Callable[[str], None] = print) -> TrainResult:
    """Train a model as ``config`` says, resuming from ``output_dir`` when it holds the same run.

    Raises ``ConfigError`` for invalid settings, ``TrainingError`` for unusable databases, a
    different run in ``output_dir`` or a non-finite loss, ``TrainingInterrupted`` after
    SIGTERM/SIGINT (a checkpoint is written first).
    """
    start_time = time.perf_counter()
    config.validate()
    train_meta, test_meta = check_databases(config)

    import keras
    import tensorflow as tf

    from ..models import build_model, model_geometry
    from ..reader.imagereader import ImageReader, as_tf_dataset
    from .losses import instance_activations, make_instance_loss, make_loss

    out = Path(config.output_dir)
    resume_state = _find_resume(out, config)
    if resume_state is not None and resume_state.get("finished"):
        log(f"{out} holds a finished run (step {resume_state['step']}, {resume_state['stopped_because']}); "
            "nothing to do")
        best = json.loads((out / "model.json").read_text())["best"] if (out / "model.json").exists() else {}
        return TrainResult(out, resume_state["step"], best.get("step"), best.get("test_loss"), best,
                           "already finished", resume_state["step"], 0.0)
    out.mkdir(parents=True, exist_ok=True)
    strategy = strategy or select_strategy()
    worker_index, n_workers = _worker_info(strategy)
    chief = worker_index == 0
    if chief:
        write_json(out / "train_config.json", config.to_dict())

    previous_policy = keras.mixed_precision.global_policy().name
    use_bf16 = bfloat16_is_native() if config.mixed_precision is None else config.mixed_precision
    # bfloat16 needs no loss scaling (float32's exponent range); weights stay float32.
    keras.mixed_precision.set_global_policy("mixed_bfloat16" if use_bf16 else "float32")
    log(f"precision: {'mixed bfloat16' if use_bf16 else 'float32'}"
        + (" (auto: native bfloat16 on this device)" if config.mixed_precision is None and use_bf16 else ""))
    keras.utils.set_random_seed(config.seed)
    geometry = model_geometry(config.architecture, **config.model_options)
    patch = train_patch(config, train_meta["tile_size"], geometry[0])
    replicas = strategy.num_replicas_in_sync
    global_batch = config.batch_size * replicas
    channels = train_meta["channels"]

    with strategy.scope():
        model = build_model(config.architecture, channels, config.output_channels, **config.model_options)
        optimizer = keras.optimizers.AdamW(learning_rate=config.learning_rate, weight_decay=config.weight_decay)
        # Decay the kernels only: biases and normalisation parameters keep their scale.
        optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
        optimizer.build(model.trainable_variables)

    if config.target == "instance":
        # Prior initialisation of the logits' bias (as RetinaNet does for rare classes): a binary
        # channel starts at its pixel frequency, a distance channel at its mean. From a zero bias,
        # the mostly-background pixels sit at p = 0.5 and, in a short run, the background
        # features can die before the bias (moving ~learning_rate per step) gets there.
        priors = channel_priors(config.train_database, config.target_spec(), train_records_for_priors(config,
                                                                                                      train_meta))
        _set_head_bias(model, priors, config.target_spec().kinds)
        log("logit bias initialised from the training targets: " + ", ".join(
            f"{c} {p:.3g}" for c, p in zip(config.target_spec().channels, priors)))
    state = {"step": 0, "best_test_loss": None, "best_step": None, "best_metrics": {}, "bad_evaluations": 0,
             "plateau_factor": 1.0, "plateau_bad": 0, "epoch": 0, "finished": False}
    resumed_from = None
    if resume_state is not None:
        state.update(_load_checkpoint(out / "checkpoint", model, optimizer))
        resumed_from = state["step"]
        log(f"resuming {out} from the checkpoint at step {state['step']} (best test loss so far "
            f"{state['best_test_loss']})")

    class_weights = None
    if config.loss == "weighted_ce":
        counts = list(train_meta["class_pixel_counts"]) + [0] * (config.number_classes
                                                               - len(train_meta["class_pixel_counts"]))
        class_weights = class_weights_from_counts(counts)
        log("class weights from the training pixel counts: " + ", ".join(f"{w:.3g}" for w in class_weights))
    target_spec = config.target_spec()
    if target_spec is None:
        loss_fn = make_loss(config.loss, config.number_classes, class_weights)
        channel_loss_fn = None
    else:
        channel_loss_fn = make_instance_loss(target_spec.kinds, target_spec.loss_weights, target_spec.distance_loss)
        loss_fn = lambda labels, logits: tf.reduce_sum(channel_loss_fn(labels, logits), axis=-1)  # noqa: E731
        log(f"instance targets: {', '.join(f'{c} ({k}, weight {w:g})' for c, k, w in zip(target_spec.channels, target_spec.kinds, target_spec.loss_weights))}")
    targets = None if target_spec is None else target_spec.to_dict()

    train_records = test_records = None
    if config.folds:
        per_fold = fold_records(train_meta, config.folds, config.seed)
        test_records = per_fold[config.fold]
        train_records = sorted(r for i, f in enumerate(per_fold) if i != config.fold for r in f)
        log(f"fold {config.fold} of {len(per_fold)}: {len(train_records)} training tiles, {len(test_records)} "
            "validation tiles, from different source images")
    augment_params = AugmentParams(**config.augmentation) if config.use_augmentation else AugmentParams.none()
    train_reader = ImageReader(config.train_database, config.batch_size, mode="train", patch_shape=patch,
                               augment_params=augment_params, sampling=config.sampling,
                               normalization=config.normalization, reader_count=config.reader_count,
                               seed=config.seed * 1000 + worker_index, start_epoch=state["epoch"],
                               records=train_records, targets=targets)
    # The test images are normalised with the training statistics, as inference will do.
    test_reader = ImageReader(config.test_database, global_batch, mode="test", normalization=config.normalization,
                              reader_count=min(config.reader_count, 1), seed=config.seed,
                              channel_stats=(train_meta["channel_mean"], train_meta["channel_std"]),
                              records=test_records, targets=targets)

    train_step = make_train_step(strategy, model, optimizer, loss_fn, global_batch, config.jit_compile)

    if target_spec is None:
        @tf.function(reduce_retracing=True)
        def eval_step(images, labels):
            logits = model(images, training=False)
            return tf.reduce_sum(loss_fn(labels, logits)), tf.argmax(logits, axis=-1, output_type=tf.int32)
    else:
        activate = instance_activations(target_spec.kinds)

        @tf.function(reduce_retracing=True)
        def eval_step(images, labels):
            logits = model(images, training=False)
            return tf.reduce_sum(channel_loss_fn(labels, logits), axis=0), activate(logits)

    stop = {"signum": None}

    def on_signal(signum, frame):
        stop["signum"] = signum

    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            handlers[sig] = signal.signal(sig, on_signal)

    writer = tf.summary.create_file_writer(str(out / "tensorboard")) if chief else None
    rows = _read_log(out / "log.csv")
    stopped_because = "max_steps"
    try:
        with train_reader, test_reader:
            dataset = as_tf_dataset(train_reader).repeat()
            iterator = iter(strategy.distribute_datasets_from_function(lambda context: dataset))
            period_losses, period_start, period_examples = [], time.perf_counter(), 0
            train_reader.input_stats(reset=True)
            log(f"training {config.architecture} on {replicas} replica(s) x {n_workers} worker(s), global batch "
                f"{global_batch}, patch {patch}, from step {state['step']}")
            while True:
                if config.max_steps is not None and state["step"] >= config.max_steps:
                    stopped_because = "max_steps"
                    break
                if config.max_minutes is not None and (time.perf_counter() - start_time) / 60 >= config.max_minutes:
                    stopped_because = "max_minutes"
                    break
                if stop["signum"] is not None:
                    state["epoch"] = math.ceil(state["step"] / train_reader.batches_per_epoch)
                    if chief:
                        _save_checkpoint(out / "checkpoint", model, optimizer, state)
                    raise TrainingInterrupted(stop["signum"], state["step"])
                lr = learning_rate_at(state["step"], config, state["plateau_factor"])
                optimizer.learning_rate.assign(lr)
                loss = float(train_step(iterator))
                if not math.isfinite(loss):
                    raise TrainingError(f"the training loss became {loss} at step {state['step'] + 1}; lower "
                                        "--learning_rate, check the data normalisation, or try --loss ce")
                state["step"] += 1
                period_losses.append(loss)
                period_examples += global_batch
                if state["step"] % config.test_every_n_steps == 0:
                    row = _evaluate(state, test_reader, eval_step, config, period_losses, period_examples,
                                    period_start, train_reader, lr, start_time)
                    improved = _record(state, row, config, model, out, chief, train_meta, test_meta, geometry,
                                       patch, log)
                    rows.append(row)
                    if chief:
                        _append_log(out / "log.csv", row)
                        _draw_charts(rows, out / "charts.png")
                        with writer.as_default(step=state["step"]):
                            for key in ("train_loss", "test_loss", "mean_iou", "pixel_accuracy", "learning_rate",
                                        "input_bound_pct", "f1", "panoptic_quality"):
                                if key in row:
                                    tf.summary.scalar(key, row[key])
                        writer.flush()
                    state["epoch"] = math.ceil(state["step"] / train_reader.batches_per_epoch)
                    if chief:
                        _save_checkpoint(out / "checkpoint", model, optimizer, state)
                    log(_format_row(row, improved))
                    period_losses, period_start, period_examples = [], time.perf_counter(), 0
                    if state["bad_evaluations"] >= config.early_stopping:
                        stopped_because = f"early stopping after {config.early_stopping} evaluations without " \
                                          "improvement"
                        break
            if state["best_step"] is None or (rows and rows[-1]["step"] != state["step"]):
                # Finish with an evaluation so the exported model is the best one seen.
                row = _evaluate(state, test_reader, eval_step, config, period_losses, period_examples, period_start,
                                train_reader, optimizer.learning_rate.numpy().item(), start_time)
                improved = _record(state, row, config, model, out, chief, train_meta, test_meta, geometry, patch,
                                   log)
                rows.append(row)
                if chief:
                    _append_log(out / "log.csv", row)
                    _draw_charts(rows, out / "charts.png")
                log(_format_row(row, improved))
            if chief and target_spec is not None and state["best_step"] is not None:
                tune_postprocess(out, test_reader, target_spec, log)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        keras.mixed_precision.set_global_policy(previous_policy)
    state["finished"] = True
    state["stopped_because"] = stopped_because
    if chief:
        _export_saved_model(out, log)
        _save_checkpoint(out / "checkpoint", model, optimizer, state)
    seconds = time.perf_counter() - start_time
    best = state["best_metrics"]
    log(f"done: {state['step']} steps in {seconds / 60:.1f} min ({stopped_because}); best test loss "
        f"{state['best_test_loss']:.4f} at step {state['best_step']}, mean IoU {best.get('mean_iou', float('nan')):.3f}"
        f", foreground IoU {best.get('mean_foreground_iou', float('nan')):.3f}"
        + (f", matching F1@0.5 {best['f1']:.3f}, PQ {best['panoptic_quality']:.3f}" if "f1" in best else "")
        + f"; model in {out}")
    return TrainResult(out, state["step"], state["best_step"], state["best_test_loss"], best, stopped_because,
                       resumed_from, seconds)


def _evaluate(state, test_reader, eval_step, config, period_losses, period_examples, period_start, train_reader,
              lr, start_time) -> dict:
    """One exact pass over the test database: loss and confusion-matrix metrics."""
    elapsed = max(time.perf_counter() - period_start, 1e-9)
    input_stats = train_reader.input_stats(reset=True)
    if config.target == "instance":
        return _evaluate_instances(state, test_reader, eval_step, config, period_losses, period_examples, elapsed,
                                   train_reader, lr, start_time, input_stats)
    cm = np.zeros((config.number_classes, config.number_classes), np.int64)
    loss_sum, n = 0.0, 0
    for batch in test_reader.epoch():
        loss, predictions = eval_step(batch.images, batch.labels)
        loss_sum += float(loss)
        n += len(batch)
        cm += confusion_matrix(batch.labels, predictions.numpy(), config.number_classes)
    s = scores(cm)
    return {"step": state["step"], "epoch": math.ceil(state["step"] / train_reader.batches_per_epoch),
            "train_loss": float(np.mean(period_losses)) if period_losses else float("nan"),
            "test_loss": loss_sum / max(n, 1), "mean_iou": s["mean_iou"],
            "mean_foreground_iou": s["mean_foreground_iou"], "mean_dice": s["mean_dice"],
            "pixel_accuracy": s["pixel_accuracy"], "iou_per_class": " ".join(f"{v:.4f}" for v in s["iou"]),
            "learning_rate": lr, "input_bound_pct": 100.0 * input_stats.waiting_fraction,
            "images_per_s": period_examples / elapsed, "elapsed_s": time.perf_counter() - start_time,
            "scores": s}


def _evaluate_instances(state, test_reader, eval_step, config, period_losses, period_examples, elapsed, train_reader,
                        lr, start_time, input_stats) -> dict:
    """Instance model: per-channel test losses, then post-processing of every test tile and matching at IoU 0.5.

    Foreground metrics (the confusion matrix keys of a semantic run) compare the
    post-processed objects with the true ones as background/object.
    """
    from ..instances.postprocess import postprocess
    from ..scoring.metrics import match_instances, pool_stats

    spec = config.target_spec()
    post = _postprocess_defaults(spec)
    n_channels = len(spec.channels)
    channel_sums = np.zeros(n_channels, np.float64)
    cm = np.zeros((2, 2), np.int64)
    matchings = []
    n = 0
    for batch in test_reader.epoch():
        losses, maps = eval_step(batch.images, batch.labels)
        channel_sums += losses.numpy()
        n += len(batch)
        maps = maps.numpy()
        for b in range(len(batch)):
            truth = batch.labels[b, :, :, n_channels].astype(np.int64)
            predicted = postprocess(maps[b], post)
            matchings.append(match_instances(truth, predicted, thresholds=EVAL_MATCHING_THRESHOLDS))
            cm += confusion_matrix((truth > 0).astype(np.uint8), (predicted > 0).astype(np.uint8), 2)
    s = scores(cm)
    channel_losses = channel_sums / max(n, 1)
    pooled = pool_stats(matchings)[EVAL_MATCHING_THRESHOLDS[0]]
    s.update({"f1": pooled.f1, "panoptic_quality": pooled.panoptic_quality, "precision": pooled.precision,
              "recall": pooled.recall, "objects_true": pooled.n_true, "objects_predicted": pooled.n_pred,
              "channel_losses": {c: float(v) for c, v in zip(spec.channels, channel_losses)}})
    return {"step": state["step"], "epoch": math.ceil(state["step"] / train_reader.batches_per_epoch),
            "train_loss": float(np.mean(period_losses)) if period_losses else float("nan"),
            "test_loss": float(channel_losses.sum()), "mean_iou": s["mean_iou"],
            "mean_foreground_iou": s["mean_foreground_iou"], "mean_dice": s["mean_dice"],
            "pixel_accuracy": s["pixel_accuracy"], "iou_per_class": " ".join(f"{v:.4f}" for v in s["iou"]),
            "channel_losses": " ".join(f"{c}={v:.4f}" for c, v in zip(spec.channels, channel_losses)),
            "f1": pooled.f1, "panoptic_quality": pooled.panoptic_quality, "precision": pooled.precision,
            "recall": pooled.recall, "objects_true": pooled.n_true, "objects_predicted": pooled.n_pred,
            "learning_rate": lr, "input_bound_pct": 100.0 * input_stats.waiting_fraction,
            "images_per_s": period_examples / elapsed, "elapsed_s": time.perf_counter() - start_time,
            "scores": s}


def train_records_for_priors(config: TrainConfig, train_meta: dict) -> list[int] | None:
    """The training records of this run (the other folds in a k-fold run), None for all."""
    if not config.folds:
        return None
    per_fold = fold_records(train_meta, config.folds, config.seed)
    return sorted(r for i, f in enumerate(per_fold) if i != config.fold for r in f)


def channel_priors(database: str, spec, records: list[int] | None = None, max_records: int = 64) -> list[float]:
    """Mean of each target channel over up to ``max_records`` evenly spaced stored tiles (no augmentation)."""
    from ..reader.targets import make_targets

    with LmdbReader(database) as reader:
        pool = np.arange(len(reader)) if records is None else np.asarray(records)
        chosen = pool[np.linspace(0, len(pool) - 1, min(max_records, len(pool))).round().astype(int)]
        sums, pixels = np.zeros(len(spec.channels)), 0
        for record in np.unique(chosen):
            _, label = reader[int(record)]
            instances = label if label.ndim == 2 else label[:, :, 0]
            targets = make_targets(np.ascontiguousarray(instances), spec)
            sums += targets.sum(axis=(0, 1), dtype=np.float64)
            pixels += instances.size
    return [float(v) for v in sums / max(pixels, 1)]


def _set_head_bias(model, priors: list[float], kinds) -> None:
    """Bias of ``head_logits``: log-odds of the prior for binary channels, the prior for distances."""
    layer = model.get_layer("head_logits")
    bias = getattr(layer, "bias", None)
    if bias is None or tuple(bias.shape) != (len(priors),):
        return
    values = [math.log(min(max(p, 1e-3), 1 - 1e-3) / (1 - min(max(p, 1e-3), 1 - 1e-3))) if kind == "binary" else p
              for p, kind in zip(priors, kinds)]
    bias.assign(np.asarray(values, np.float32).astype(bias.dtype))


# Post-processing settings tried on the validation tiles at the end of an instance run.
TUNING_SEED_THRESHOLDS = {"Db": (0.3, 0.4, 0.5, 0.6, 0.7), "C": (0.2, 0.3, 0.5, 0.7), "P": (0.3, 0.5, 0.7),
                          "T": (0.3, 0.5, 0.7)}
TUNING_MIN_SEED_SIZES = (5, 20)
TUNING_MAX_TILES = 128


def train_patch(config: "TrainConfig", tile: int | None, divisor: int) -> int | None:
    """The training patch edge: ``--patch_size``, else :data:`DEFAULT_PATCH` of larger tiles (when the
    model's divisor allows), else the tile size (None for whole-image databases)."""
    if config.patch_size:
        return config.patch_size
    if tile is not None and tile > DEFAULT_PATCH and DEFAULT_PATCH % divisor == 0:
        return DEFAULT_PATCH
    return tile


def postprocess_candidates(spec) -> list:
    """The defaults first, then every combination of the tuning grid for the channels predicted.

    F keeps its 0.5 (it sets what is object at all); the thresholds that decide how objects
    split (Db, C, P, T) and the smallest seed vary.
    """
    import itertools

    base = _postprocess_defaults(spec)
    tuned = [c for c in base.seed_channels if c in TUNING_SEED_THRESHOLDS]
    candidates = [base]
    for values in itertools.product(*(TUNING_SEED_THRESHOLDS[c] for c in tuned), TUNING_MIN_SEED_SIZES):
        thresholds = dict(base.thresholds, **dict(zip(tuned, values[:-1])))
        candidate = dataclasses.replace(base, thresholds=thresholds, min_seed_size=values[-1])
        if candidate != base:
            candidates.append(candidate)
    return candidates


def tune_postprocess(out: Path, test_reader, spec, log: Callable[[str], None]) -> dict:
    """Choose the post-processing of the best model by matching F1 at IoU 0.5 on the validation tiles.

    Predicts up to ``TUNING_MAX_TILES`` tiles with ``out/model.keras``, scores every
    candidate of :func:`postprocess_candidates` (pooled over the tiles), and writes the
    winner into ``model.json`` (``instance.postprocess``) with the table of scores
    (``instance.postprocess_tuning``). A candidate must beat the defaults to replace them.
    Returns the tuning record.
    """
    import keras

    from ..instances.postprocess import postprocess
    from ..scoring.metrics import match_instances, pool_stats
    from .losses import instance_activations

    start = time.perf_counter()
    model = keras.models.load_model(out / "model.keras", safe_mode=True, compile=False)
    activate = instance_activations(spec.kinds)
    n_channels = len(spec.channels)
    maps, truths = [], []
    for batch in test_reader.epoch():
        if len(maps) >= TUNING_MAX_TILES:
            continue  # finish the pass: the reader's next pass starts at the beginning
        predicted = activate(model(batch.images, training=False)).numpy()
        for b in range(min(len(batch), TUNING_MAX_TILES - len(maps))):
            maps.append(predicted[b])
            truths.append(batch.labels[b, :, :, n_channels].astype(np.int64))
    scores_ = []
    for candidate in postprocess_candidates(spec):
        matchings = [match_instances(t, postprocess(m, candidate), thresholds=(0.5,)) for m, t in zip(maps, truths)]
        f1 = pool_stats(matchings)[0.5].f1
        scores_.append((candidate, float(f1) if math.isfinite(f1) else 0.0))
    default_f1 = scores_[0][1]
    best, best_f1 = max(scores_, key=lambda item: item[1])
    if best_f1 <= default_f1:
        best, best_f1 = scores_[0]
    record = {"tiles": len(maps), "metric": "pooled matching F1 at IoU 0.5", "default_f1": default_f1,
              "chosen_f1": best_f1, "candidates": [{"thresholds": c.thresholds, "min_seed_size": c.min_seed_size,
                                                    "f1": f} for c, f in scores_]}
    meta = json.loads((out / "model.json").read_text())
    meta["instance"]["postprocess"] = best.to_dict()
    meta["instance"]["postprocess_tuning"] = record
    write_json(out / "model.json", meta)
    changed = ", ".join(f"{c} {best.thresholds[c]}" for c in best.seed_channels) + \
        f", min_seed_size {best.min_seed_size}"
    log(f"post-processing tuned on {len(maps)} validation tiles in {time.perf_counter() - start:.1f} s: {changed} "
        f"-> F1@0.5 {best_f1:.3f} (defaults {default_f1:.3f}); written to model.json")
    return record


def _postprocess_defaults(spec):
    """The post-processing settings recorded with an instance model (and used at each evaluation)."""
    from ..instances.postprocess import PostProcessConfig

    return PostProcessConfig.default_for(spec.channels)


def _record(state, row, config, model, out, chief, train_meta, test_meta, geometry, patch, log) -> bool:
    """Update best/early-stopping/plateau state with an evaluation; save the model when it is the best."""
    best = state["best_test_loss"]
    loss = row["test_loss"]
    improved = best is None or loss < best
    if best is None or loss <= best + IMPROVEMENT_TOLERANCE:
        state["bad_evaluations"] = 0
    else:
        state["bad_evaluations"] += 1
    if config.lr_schedule == "plateau":
        state["plateau_bad"] = 0 if improved else state["plateau_bad"] + 1
        if state["plateau_bad"] >= 3:
            state["plateau_factor"] *= 0.5
            state["plateau_bad"] = 0
            log(f"test loss on a plateau: learning rate x0.5 (now {config.learning_rate * state['plateau_factor']:.3g})")
    if improved:
        state["best_test_loss"] = loss
        state["best_step"] = row["step"]
        state["best_metrics"] = {"step": row["step"], "test_loss": loss, **row["scores"]}
        if chief:
            tmp = out / ".model.partial.keras"
            model.save(tmp)
            os.replace(tmp, out / "model.keras")
            write_json(out / "model.json", _model_json(config, train_meta, test_meta, geometry, patch,
                                                              state["best_metrics"]))
    return improved


def _format_row(row: dict, improved: bool) -> str:
    quality = (f"F1@0.5 {row['f1']:.3f}, PQ {row['panoptic_quality']:.3f} ({row['channel_losses']})" if "f1" in row
               else f"mean IoU {row['mean_iou']:.3f}, accuracy {row['pixel_accuracy']:.3f}")
    return (f"step {row['step']}: train loss {row['train_loss']:.4f}, test loss {row['test_loss']:.4f}, "
            f"{quality}, {row['images_per_s']:.1f} img/s, "
            f"input-bound {row['input_bound_pct']:.0f}%" + (" (best)" if improved else ""))


def _export_saved_model(out: Path, log: Callable[[str], None]) -> None:
    """Export the best model (model.keras) as a TF SavedModel, atomically."""
    import keras

    model = keras.models.load_model(out / "model.keras", safe_mode=True, compile=False)
    tmp = out / ".saved_model.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.export(str(tmp), format="tf_saved_model", verbose=False)
    except Exception as exc:  # the Keras model stays the reference; say why the export is missing
        shutil.rmtree(tmp, ignore_errors=True)
        log(f"warning: SavedModel export failed ({type(exc).__name__}: {exc}); model.keras is complete")
        return
    final = out / "saved_model"
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def train_kfold(config: TrainConfig, log: Callable[[str], None] = print) -> list[TrainResult]:
    """Train one model per fold of the training database (deepflash2's scheme).

    Model ``i`` validates on the source images of fold ``i`` and trains on the others; it is
    written to ``OUTPUT/ensemble/<architecture>_<C>classes-fold<i>/``, and
    ``OUTPUT/ensemble/folds.csv`` compares the folds. Each fold resumes like a single run.
    """
    config.validate()
    with LmdbReader(config.train_database) as reader:
        per_fold = fold_records(reader.metadata, config.folds, config.seed)
    ensemble = Path(config.output_dir) / "ensemble"
    results = []
    for i in range(len(per_fold)):
        fold_config = dataclasses.replace(
            config, test_database=config.train_database, fold=i,
            output_dir=str(ensemble / f"{config.architecture}_{config.number_classes}classes-fold{i}"))
        log(f"=== fold {i + 1} of {len(per_fold)} ===")
        results.append(train(fold_config, log=log))
    rows = [{"fold": i, "output_dir": str(r.output_dir), "steps": r.steps, "best_step": r.best_step,
             "best_test_loss": r.best_test_loss, "mean_iou": r.best_metrics.get("mean_iou"),
             "mean_foreground_iou": r.best_metrics.get("mean_foreground_iou"),
             "pixel_accuracy": r.best_metrics.get("pixel_accuracy"), "stopped_because": r.stopped_because}
            for i, r in enumerate(results)]
    tmp = ensemble / ".folds.partial.csv"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, ensemble / "folds.csv")
    ious = [r["mean_iou"] for r in rows if r["mean_iou"] is not None]
    log(f"{len(rows)} folds: mean IoU {np.mean(ious):.3f} +- {np.std(ious):.3f}; ensemble in {ensemble}")
    return results
