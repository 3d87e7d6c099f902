"""The settings of one training run: :class:`TrainConfig` holds every default.

``train(TrainConfig(train_database=..., test_database=..., output_dir=..., number_classes=3))``
from Python builds the same model, with the same settings, as ``train_unet.py`` with the same
three flags: the command lines only map flags onto this object (their defaults are read from
it). Defaults that depend on other settings (an instance model's 32 UNet filters, its 2
classes, the fold of a k-fold run) are resolved here, when the object is made.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

from ..common import normalization as norm
from ..common.errors import EXIT_SOME_FAILED, BadInput, Resumable
from ..common.settings import ConfigError
from ..reader.augment import AugmentParams
from ..reader.targets import TargetSpec, parse_instance_channels, with_classes
from ..store.lmdb_store import LmdbReader, StoreError
from .losses import LOSSES

LR_SCHEDULES = ("constant", "plateau", "cosine", "onecycle")
TARGETS = ("semantic", "instance")
# Default learning rate (NIST: 1e-4), with 20 warm-up steps. On 2 CPU cores, 1e-3 with 128-px
# patches took the default UNet from 0.768 to 0.924 pooled foreground IoU on the NIST
# held-back images in 25 minutes (3e-4 on whole 256-px tiles before; benchmarks/bench_accuracy.py)
# and instance models from F1 0.761 to 0.885 in 15 (benchmarks/bench_instance_accuracy.py).
DEFAULT_LEARNING_RATE = 1e-3
# UNet filters at the first level for target "instance" unless model_options names them: 32
# filters made 2273 steps in 15 minutes on 2 cores (64: about 600) and F1 0.90 at IoU 0.5 on
# held-back touching cells where 64 reached 0.885.
INSTANCE_UNET_FILTERS = 32
# An instance model's database has two classes: background and object.
INSTANCE_CLASSES = 2
# Settings that may change between a run and its resumption (weights are float32 in every
# precision: a run started in float16 on a V100 goes on in bfloat16 on an A100).
# Compared as resolved paths when resuming: lib.training.run.differing_settings.
RESUMABLE = ("max_steps", "max_minutes", "early_stopping", "reader_count", "test_every_n_steps", "jit_compile",
             "collective_timeout", "keep_checkpoints", "mixed_precision")
# The TargetSpec fields a run's instance_options may set (the channels and weights have their own settings).
INSTANCE_OPTIONS = ("contour_mode", "point_radius", "touch_width", "distance_loss", "n_rays", "ray_grid", "d_alpha",
                    "d_beta", "dn_scale")


class TrainingError(BadInput):
    """Training cannot start or go on: unusable databases, a different run in output_dir (exit 2)."""


class TrainingDiverged(TrainingError):
    """The training loss became non-finite. Steps were run and checkpointed, so this is not
    "nothing done"; it keeps the exit code 1 that the training CLI always gave it."""

    exit_code = EXIT_SOME_FAILED


class TrainingInterrupted(Resumable):
    """A signal asked training to stop; a checkpoint was written: rerun to resume (exit 3).
    ``signum`` says which signal, ``step`` where it stopped."""

    def __init__(self, signum: int, step: int):
        self.signum = signum
        self.step = step
        super().__init__(f"stopped by signal {signum} at step {step}; checkpoint written, rerun the same command "
                         "to resume")


def _default_augmentation() -> dict:
    return dataclasses.asdict(AugmentParams())


def _default_instance_options() -> dict:
    defaults = TargetSpec()
    return {name: getattr(defaults, name) for name in INSTANCE_OPTIONS}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run (see ``train_unet.py --help`` for each).

    ``number_classes`` may be left out for ``target="instance"`` (2: background and object);
    a semantic run needs it. ``model_options`` of an instance UNet get
    ``base_filters=INSTANCE_UNET_FILTERS`` unless they name it. ``augmentation`` and
    ``instance_options`` are completed with the defaults of the keys they leave out.
    """

    train_database: str
    test_database: str
    output_dir: str
    number_classes: int | None = None
    architecture: str = "unet"
    model_options: dict = dataclasses.field(default_factory=dict)
    batch_size: int = 8
    patch_size: int | None = None  # None: lib.training.inputs.train_patch (128 px of larger tiles)
    learning_rate: float = DEFAULT_LEARNING_RATE
    weight_decay: float = 1e-4
    loss: str = "ce"
    lr_schedule: str = "constant"
    warmup_steps: int = 20
    test_every_n_steps: int = 1000
    early_stopping: int = 10
    max_steps: int | None = None
    max_minutes: float | None = None
    use_augmentation: bool = True
    augmentation: dict = dataclasses.field(default_factory=_default_augmentation)
    sampling: str = "uniform"
    normalization: str = norm.DEFAULT_MODE
    percentiles: tuple[float, float] = norm.DEFAULT_PERCENTILES  # normalization "percentile": (low, high)
    reader_count: int = 2
    seed: int = 0
    # None/"auto": per device (lib.common.device.choose_precision); True, False, "bfloat16", "float16", "float32"
    mixed_precision: bool | str | None = None
    jit_compile: bool = False
    folds: int = 0  # k-fold run: this model validates on fold `fold` of the training database
    fold: int | None = None
    target: str = "semantic"  # "instance": per-pixel channels for watershed post-processing
    instance_channels: str = "F,C,Db"
    instance_weights: str | None = None
    instance_options: dict = dataclasses.field(default_factory=_default_instance_options)
    collective_timeout: float = 300.0  # seconds a multi-worker collective waits for its peers (0: for ever)
    keep_checkpoints: bool = False  # False: a finished run keeps only checkpoint/ (not checkpoint.previous/)

    def __post_init__(self) -> None:
        resolve = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        instance = self.target == "instance"
        if self.number_classes is None and instance:
            resolve("number_classes", INSTANCE_CLASSES)
        options = dict(self.model_options or {})
        if instance and self.architecture == "unet" and "base_filters" not in options:
            options["base_filters"] = INSTANCE_UNET_FILTERS
        resolve("model_options", options)
        if isinstance(self.augmentation, dict):
            resolve("augmentation", {**_default_augmentation(), **self.augmentation})
        if isinstance(self.instance_options, dict):
            resolve("instance_options", {**_default_instance_options(), **self.instance_options})
        if isinstance(self.percentiles, list):
            resolve("percentiles", tuple(self.percentiles))
        if self.folds and self.fold is None:
            resolve("fold", 0)

    def target_spec(self) -> TargetSpec | None:
        """The :class:`lib.reader.targets.TargetSpec` of an instance run (validated), None for a semantic one.

        On a training database with a class per instance (``instance_classes`` in its metadata) the
        spec gets the class head: planes K0 (background) .. K<n> after the instance channels.
        """
        if self.target != "instance":
            return None
        spec = parse_instance_channels(self.instance_channels, self.instance_weights, **self.instance_options)
        return with_classes(spec, database_class_names(self.train_database))

    @property
    def output_channels(self) -> int:
        spec = self.target_spec()
        return self.number_classes if spec is None else len(spec.channels)

    def augment_params(self) -> AugmentParams:
        """The augmentation of the training examples (none when ``use_augmentation`` is off)."""
        return AugmentParams(**self.augmentation) if self.use_augmentation else AugmentParams.none()

    def validate(self) -> "TrainConfig":
        """Return self or raise ``ConfigError`` listing every invalid field (files are checked by :func:`train`)."""
        from ..models import ARCHITECTURES  # loads Keras

        v = []
        if self.architecture not in ARCHITECTURES:
            v.append(f"architecture must be one of {', '.join(ARCHITECTURES)}; got {self.architecture!r}")
        else:
            v.extend(self._model_option_problems())
        if self.number_classes is None:
            v.append("number_classes must be given for target 'semantic' (the classes of the database); got none")
        elif self.number_classes < 2:
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
        if self.mixed_precision not in (None, True, False, "auto", "float32", "bfloat16", "float16"):
            v.append(f"mixed_precision must be one of auto, float32, bfloat16, float16, 1 or 0; got "
                     f"{self.mixed_precision!r}")
        if not self.collective_timeout >= 0:
            v.append(f"collective_timeout must be >= 0 seconds (0: no timeout); got {self.collective_timeout}")
        if self.normalization not in norm.MODES:
            v.append(f"normalization must be one of {', '.join(norm.MODES)}; got {self.normalization!r}")
        elif self.normalization == "percentile":
            v.extend(norm.percentile_problems(self.percentiles))
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
                spec = self.target_spec()
            except (TypeError, ValueError) as exc:
                v.append(f"instance targets are invalid: {exc}")
            else:
                if self.jit_compile and "embedding" in spec.kinds:
                    v.append("jit_compile must be off for the E channels: XLA cannot compile the gradient of the "
                             "embedding loss (its number of objects changes from batch to batch); leave out "
                             "--jit_compile")
            if self.loss != "ce":
                v.append(f"loss must be left at 'ce' for --target instance (each channel has its own loss: sigmoid "
                         f"cross-entropy or L1/MSE); got {self.loss!r}")
        if v:
            raise ConfigError(v)
        return self

    def _model_option_problems(self) -> list[str]:
        """What is wrong with ``model_options`` for the architecture (unknown keys, values, a missing weights file)."""
        from ..models import default_options, model_geometry

        known = default_options(self.architecture)
        unknown = sorted(set(self.model_options) - set(known))
        if unknown:
            return [f"model_options of {self.architecture} must be among {', '.join(sorted(known))}; got "
                    f"{', '.join(repr(k) for k in unknown)}"]
        try:
            model_geometry(self.architecture, **self.model_options)
        except (TypeError, ValueError) as exc:
            return [f"model_options are invalid for {self.architecture}: {exc}"]
        weights = self.model_options.get("backbone_weights")
        if weights is not None and not Path(weights).is_file():
            return [f"model_options backbone_weights must be an existing weights file; got {str(weights)!r} (not "
                    "found). Give the path of a local VGG16 .weights.h5 file (nothing is downloaded), or leave "
                    "backbone_weights out to train from scratch"]
        return []

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default_of(name: str) -> Any:
    """The default of the :class:`TrainConfig` field ``name`` (what a command line shows and uses)."""
    field = {f.name: f for f in dataclasses.fields(TrainConfig)}[name]
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def database_class_names(path: str) -> tuple[str, ...]:
    """The class names (background first) of a database with a class per instance; () for any other
    database, or one that cannot be read (the database checks report that)."""
    data = Path(path) / "data.mdb"
    try:
        stamp = data.stat().st_mtime_ns
    except OSError:
        return ()
    return _class_names(str(Path(path).resolve()), stamp)


@functools.lru_cache(maxsize=8)
def _class_names(path: str, stamp: int) -> tuple[str, ...]:
    try:
        with LmdbReader(path) as reader:
            meta = reader.metadata
    except StoreError:
        return ()
    if meta.get("label_kind") != "instance" or not meta.get("instance_classes"):
        return ()
    names = meta.get("class_names") or []
    n = int(meta["instance_classes"]) + 1
    return tuple(names) if len(names) == n else ("background",) + tuple(f"class {i}" for i in range(1, n))
