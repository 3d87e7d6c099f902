"""One training run: setup, the loop, stop rules, signals, checkpoints, and the hooks it calls.

    result = train(TrainConfig(train_database=..., test_database=..., output_dir="runs/cells", number_classes=2))

:class:`TrainingRun` holds the state of a run (config, databases, strategy, model, readers,
the :class:`RunState` a checkpoint saves, the log). Its loop is::

    while no stop rule fires:            stop_reason(): max_steps, max_minutes (a budget), signal
        train_step()
        every test_every_n_steps:        evaluate() -> record() -> write_record() -> checkpoint() -> log
            early stopping?              stop_reason() after the evaluation
    final evaluation, post-processing tuning (instance models), finish(): SavedModel, run state

Outputs go to ``output_dir``, the model folder of :mod:`lib.model_folder` (model.keras,
model.json with its run state, saved_model/, train_config.json, checkpoint/ and
checkpoint.previous/) and the record of :mod:`lib.training.outputs` (log.csv, charts.png,
tensorboard/). Rerunning the settings that change the model (database paths compared
resolved) into the same folder resumes from the checkpoint; a larger ``max_steps`` extends a
finished run, a larger ``max_minutes`` (training minutes over every invocation) too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .. import model_folder
from ..common.device import select_strategy, worker_info
from ..export.model_card import write_model_card
from ..reader.imagereader import as_tf_dataset
from ..reader.targets_describe import describe_targets
from ..store.lmdb_store import LmdbReader, StoreError
from .agreement import SIGNALS, Agreement, peer_errors
from .config import (
    INSTANCE_CLASSES,
    RESUMABLE,
    TrainConfig,
    TrainingDiverged,
    TrainingError,
    TrainingInterrupted,
    default_of,
)
from .evaluation import evaluate, postprocess_defaults, tune_postprocess
from .housekeeping import prune_checkpoints
from .inputs import (
    ReaderPlan,
    channel_priors,
    check_databases,
    fold_records,
    make_readers,
    normalization_record,
    set_head_bias,
    split_records,
    train_patch,
)
from .losses import class_weights_from_counts
from .outputs import TensorBoard, TrainingLog, draw_charts, format_row, write_folds_table
from .precision import precision_policy
from .report import write_training_report
from .step import learning_rate_at, make_eval_step, make_losses, make_optimizer, make_train_step, saved_optimizer

IMPROVEMENT_TOLERANCE = 1e-4  # an evaluation within this of the best test loss counts as best (as NIST)
# The plateau schedule halves the learning rate after this many evaluations without a new best.
PLATEAU_PATIENCE = 3
PLATEAU_FACTOR = 0.5


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


@dataclasses.dataclass
class RunState:
    """What a checkpoint saves besides the weights: progress, best so far, early-stopping and plateau counters."""

    step: int = 0
    best_test_loss: float | None = None
    best_step: int | None = None
    best_metrics: dict = dataclasses.field(default_factory=dict)
    bad_evaluations: int = 0
    plateau_factor: float = 1.0
    plateau_bad: int = 0
    epoch: int = 0
    finished: bool = False
    stopped_because: str | None = None
    minutes: float = 0.0  # training minutes of the earlier invocations of this run (--max_minutes is a budget)

    @classmethod
    def from_dict(cls, values: dict) -> "RunState":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def record(self, step: int, test_loss: float, metrics: dict, config: TrainConfig) -> tuple[bool, bool]:
        """Update best, early-stopping and plateau state with an evaluation.

        Returns ``(improved, learning_rate_lowered)``: a new best test loss, and whether the
        plateau schedule just lowered the learning rate.
        """
        best = self.best_test_loss
        improved = best is None or test_loss < best
        if best is None or test_loss <= best + IMPROVEMENT_TOLERANCE:
            self.bad_evaluations = 0
        else:
            self.bad_evaluations += 1
        lowered = False
        if config.lr_schedule == "plateau":
            self.plateau_bad = 0 if improved else self.plateau_bad + 1
            if self.plateau_bad >= PLATEAU_PATIENCE:
                self.plateau_factor *= PLATEAU_FACTOR
                self.plateau_bad = 0
                lowered = True
        if improved:
            self.best_test_loss = test_loss
            self.best_step = step
            self.best_metrics = {"step": step, "test_loss": test_loss, **metrics}
        return improved, lowered


@dataclasses.dataclass
class Period:
    """The training steps since the last evaluation (for the log row's train loss and throughput)."""

    losses: list = dataclasses.field(default_factory=list)
    examples: int = 0
    start: float = dataclasses.field(default_factory=time.perf_counter)


# Batch logs (stderr not a terminal) get a line at least this often between evaluations: with the
# default --test_every_n_steps 1000 a CPU run would otherwise print nothing for hours.
HEARTBEAT_SECONDS = 60.0


class TrainingRun:
    """The state of one training run and the hooks its loop calls (see the module docstring)."""

    def __init__(self, config: TrainConfig, strategy=None, log: Callable[[str], None] = print):
        self.config = config
        self.strategy = strategy
        self.log = log
        self.start_time = time.perf_counter()
        self.minutes_before = 0.0
        self.last_heartbeat = self.start_time
        # a terminal shows the evaluations as they come; a batch log also gets heartbeats
        self.heartbeat_every = None if sys.stderr.isatty() else HEARTBEAT_SECONDS
        self.out = Path(config.output_dir)
        self.state = RunState()
        self.resumed_from: int | None = None
        self.signum: int | None = None
        self.stopped_because = "max_steps"
        self.lr: float | None = None  # the learning rate of the last step

    # Setup

    def find_resume(self) -> RunState | None:
        """The checkpoint state to resume from, or None for a new run; raises for a different run.

        Settings are compared as :func:`recorded_settings` writes them (database paths resolved,
        the settings of :data:`RESUMABLE` left out). Settings recorded by a run that stopped before
        its first checkpoint bind nothing: there is nothing to resume, the run starts over.
        """
        if self.out.exists() and not self.out.is_dir():
            raise TrainingError(f"output_dir must be a folder (new, or holding this run); got the file {self.out}. "
                                "Choose another --output_dir")
        previous = model_folder.read_train_config(self.out)
        if previous is None:
            if self.out.exists() and any(self.out.iterdir()):
                raise TrainingError(f"output_dir must be empty or hold a run of the same settings; {self.out} holds "
                                    "other files. Choose another --output_dir")
            return None
        differing = differing_settings(previous, recorded_settings(self.config))
        shown = "; ".join(f"{k}: {previous.get(k)!r} -> {self.config.to_dict().get(k)!r}" for k in differing[:6])
        saved = model_folder.checkpoint_state(self.out)
        if saved is None:
            if differing:
                self.log(f"{self.out} holds the settings of a run that stopped before its first checkpoint (nothing "
                         f"to resume); starting over with the new settings ({shown})")
            return None
        if differing:
            raise TrainingError(
                f"output_dir {self.out} holds a different run: the settings that change the model must match it to "
                f"resume; got {shown} (recorded -> now). Rerun with the recorded settings (in "
                f"{self.out / model_folder.TRAIN_CONFIG}) to resume from its checkpoint at step {saved.get('step')}, "
                f"or choose another --output_dir for a new run. To start over here with the new settings, remove "
                f"{self.out / model_folder.CHECKPOINT} and {self.out / model_folder.CHECKPOINT_PREVIOUS} first")
        return RunState.from_dict(saved)

    def finished_reason(self, saved: RunState) -> str | None:
        """Why a finished run stays finished under this config (None: the config extends it)."""
        config = self.config
        if saved.bad_evaluations >= config.early_stopping:
            return (f"it stopped early after {saved.bad_evaluations} evaluations without improvement; a larger "
                    "--early_stopping extends it")
        if config.max_steps is not None and saved.step >= config.max_steps:
            return f"it reached --max_steps {config.max_steps}; a larger --max_steps extends it"
        if config.max_minutes is not None and saved.minutes >= config.max_minutes:
            return (f"it used its --max_minutes {config.max_minutes:g} ({saved.minutes:.1f} min of training); a "
                    "larger --max_minutes extends it")
        if config.max_steps is None and config.max_minutes is None and saved.stopped_because == "max_steps":
            return "give a larger --max_steps or a --max_minutes to extend it"
        return None

    def _already_finished(self, saved: RunState, reason: str) -> TrainResult:
        self.log(f"{self.out} holds a finished run (step {saved.step}, {saved.stopped_because}); nothing to do: "
                 f"{reason}")
        best = {}
        if (self.out / model_folder.MODEL_JSON).exists():
            best = model_folder.read_model_meta(self.out / model_folder.MODEL_JSON).get("best", {})
        return TrainResult(self.out, saved.step, best.get("step"), best.get("test_loss"), best, "already finished",
                           saved.step, 0.0)

    def _build_model(self) -> None:
        """Model and optimizer in the strategy's scope, the instance logit bias, the losses and steps."""
        import keras

        from ..models import build_model, model_geometry

        config = self.config
        keras.utils.set_random_seed(config.seed)
        self.geometry = model_geometry(config.architecture, **config.model_options)
        self.patch = train_patch(config, self.train_meta["tile_size"], self.geometry[0])
        self.global_batch = config.batch_size * self.strategy.num_replicas_in_sync
        with self.strategy.scope():
            try:
                self.model = build_model(config.architecture, self.train_meta["channels"], config.output_channels,
                                         **config.model_options)
            except (OSError, ValueError) as exc:  # a backbone weights file that does not fit (checked to exist)
                raise TrainingError(f"model_options must build a {config.architecture} model; got "
                                    f"{type(exc).__name__}: {exc}") from None
            self.optimizer = make_optimizer(config, self.model, self.precision)
        spec = config.target_spec()
        if spec is not None:
            # Prior initialisation of the logits' bias (as RetinaNet does for rare classes): a binary
            # channel starts at its pixel frequency, a distance channel at its mean. From a zero bias,
            # the mostly-background pixels sit at p = 0.5 and, in a short run, the background
            # features can die before the bias (moving ~learning_rate per step) gets there.
            priors = channel_priors(config.train_database, spec, self.split.train)
            set_head_bias(self.model, priors, spec.kinds)
            self.log("logit bias initialised from the training targets: " + ", ".join(
                f"{c} {p:.3g}" for c, p in zip(spec.channels, priors)))
        class_weights = None
        if config.loss == "weighted_ce":
            counts = list(self.train_meta["class_pixel_counts"])
            counts += [0] * (config.number_classes - len(counts))
            class_weights = class_weights_from_counts(counts)
            self.log("class weights from the training pixel counts: " + ", ".join(f"{w:.3g}" for w in class_weights))
        loss_fn, channel_loss_fn = make_losses(config, class_weights)
        if spec is not None:
            self.log("instance targets: " + describe_targets(spec))
        self.train_step = make_train_step(self.strategy, self.model, self.optimizer, loss_fn, self.global_batch,
                                          config.jit_compile)
        self.eval_step = make_eval_step(config, self.model, loss_fn, channel_loss_fn)

    def _restore(self, saved: RunState | None) -> None:
        if saved is None:
            return
        self.state = RunState.from_dict(model_folder.load_checkpoint(self.out, self.model,
                                                                     saved_optimizer(self.optimizer), self.log))
        self.resumed_from = self.state.step
        self.minutes_before = self.state.minutes
        if self.state.finished:
            self.log(f"extending the finished run in {self.out} (it stopped at step {self.state.step}: "
                     f"{self.state.stopped_because}) from its last checkpoint"
                     + (f" to --max_steps {self.config.max_steps}" if self.config.max_steps is not None else "")
                     + (f" for --max_minutes {self.config.max_minutes:g}" if self.config.max_minutes else ""))
            self.state.finished, self.state.stopped_because = False, None
        self.log(f"resuming {self.out} from the checkpoint at step {self.state.step} (best test loss so far "
                 f"{self.state.best_test_loss})")

    def _make_readers(self) -> None:
        if self.config.folds:
            self.log(f"fold {self.config.fold} of {self.split.folds}: {len(self.split.train)} training tiles, "
                     f"{len(self.split.test)} validation tiles, from different source images")
        plan = ReaderPlan(train_meta=self.train_meta, patch=self.patch, split=self.split,
                          global_batch=self.global_batch, worker_index=self.worker_index,
                          start_epoch=self.state.epoch)
        self.train_reader, self.test_reader = make_readers(self.config, plan)

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        """SIGTERM, SIGINT and SIGUSR1 (SLURM's ``--signal=B:USR1@180`` before a wall time) set
        :attr:`signum`; the loop checkpoints and stops at the next step (exit 3)."""
        def on_signal(signum, frame):
            self.signum = signum

        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
                handlers[sig] = signal.signal(sig, on_signal)
        try:
            yield
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)

    # Hooks of the loop

    def stop_reason(self) -> str | None:
        """The stop rule that fires now, if any (a signal raises :class:`TrainingInterrupted` after a checkpoint).

        Several workers agree (:meth:`Agreement.stop_reason`): the chief's budget and
        early-stopping decision, any worker's signal; every worker stops at the same step.
        """
        config, state = self.config, self.state
        progress = {"early_stopping": state.bad_evaluations >= config.early_stopping,
                    "max_steps": config.max_steps is not None and state.step >= config.max_steps,
                    "max_minutes": self.budget_spent()}
        reason = self.agreement.stop_reason(progress, self.signum)
        if reason in SIGNALS:
            signum = self.signum if self.signum is not None else int(SIGNALS[reason])
            self.checkpoint()
            if self.chief:
                model_folder.set_run_state(self.out, "interrupted", f"signal {signal.Signals(signum).name}")
            raise TrainingInterrupted(signum, state.step)
        return reason

    def run_step(self, iterator) -> None:
        """One optimisation step at the scheduled learning rate; raises on a non-finite loss."""
        lr = learning_rate_at(self.state.step, self.config, self.state.plateau_factor)
        self.optimizer.learning_rate.assign(lr)
        self.lr = lr
        flags = self.agreement.step_flags(self.budget_spent(), self.signum)
        if flags is None:
            loss = float(self.train_step(iterator))
        else:  # several workers: the stop wishes ride on the loss's all-reduce
            summed = self.train_step(iterator, flags).numpy()
            loss = float(summed[0])
            self.agreement.record_step(summed[1:])
        if not math.isfinite(loss):
            bad_input = self.non_finite_input(iterator)
            if self.chief:
                model_folder.set_run_state(self.out, "failed", "non_finite_input" if bad_input else "non_finite_loss")
            step = self.state.step + 1
            if bad_input:
                raise TrainingDiverged(
                    f"the training loss became {loss} at step {step} because the input is not finite: {bad_input}. "
                    "Rebuild the database from images without NaN or Inf pixels (replace them, e.g. by 0 or the "
                    "image's median); a lower --learning_rate will not help")
            raise TrainingDiverged(
                f"the training loss became {loss} at step {step}: the training diverged (the input statistics and "
                f"a training batch checked now are finite). Lower --learning_rate (now {self.config.learning_rate:g}),"
                " raise --warmup_steps, or try --loss ce")
        self.state.step += 1
        self.period.losses.append(loss)
        self.period.examples += self.global_batch
        if self.heartbeat_every is not None and time.perf_counter() - self.last_heartbeat >= self.heartbeat_every:
            self.heartbeat()

    def heartbeat(self) -> None:
        """One progress line for a batch log: step, recent loss, images/s, input-bound %, time left."""
        now = time.perf_counter()
        period, config, step = self.period, self.config, self.state.step
        elapsed = max(now - period.start, 1e-9)
        recent = period.losses[-50:]
        stats = self.train_reader.input_stats(reset=False)
        left = []
        if config.max_steps is not None and period.losses:
            left.append(f"{(config.max_steps - step) * elapsed / len(period.losses) / 60:.0f} min to --max_steps")
        if config.max_minutes is not None:
            left.append(f"{max(config.max_minutes - self.minutes(), 0):.0f} min of --max_minutes left")
        self.log(f"step {step}: train loss {sum(recent) / max(len(recent), 1):.4f} (last {len(recent)} steps), "
                 f"{period.examples / elapsed:.1f} img/s, input-bound {100 * stats.waiting_fraction:.0f}%"
                 + (f", about {' / '.join(left)}" if left else ""))
        self.last_heartbeat = now

    def non_finite_input(self, iterator) -> str | None:
        """Where the input is not finite (the training database's statistics, then one batch), None if it is."""
        meta = self.train_meta
        stats = [*meta.get("channel_mean", []), *meta.get("channel_std", [])]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in stats):
            return (f"{self.config.train_database} holds NaN or Inf pixels (its channel mean "
                    f"{meta.get('channel_mean')}, std {meta.get('channel_std')})")
        try:
            images, labels = next(iterator)
        except (StopIteration, RuntimeError, ValueError):
            return None
        for name, value in (("image", images), ("label", labels)):
            for part in self.strategy.experimental_local_results(value):
                array = np.asarray(part)
                if array.dtype.kind == "f" and not np.isfinite(array).all():
                    return f"a training batch of {self.config.train_database} holds NaN or Inf {name} values"
        return None

    def evaluate(self) -> dict:
        """An exact pass over the test records: the log row of this evaluation."""
        period = self.period
        elapsed = max(time.perf_counter() - period.start, 1e-9)
        input_stats = self.train_reader.input_stats(reset=True)
        self.agreement.average_local_copies(self.model.non_trainable_variables)
        metrics = evaluate(self.config, self.test_reader, self.eval_step)
        scores = metrics.pop("scores")
        return {"step": self.state.step,
                "epoch": math.ceil(self.state.step / self.train_reader.batches_per_epoch),
                "train_loss": float(np.mean(period.losses)) if period.losses else float("nan"),
                **metrics, "learning_rate": self.lr if self.lr is not None else float(self.optimizer.learning_rate.numpy().item()),
                "input_bound_pct": 100.0 * input_stats.waiting_fraction,
                "images_per_s": period.examples / elapsed, "elapsed_s": time.perf_counter() - self.start_time,
                "scores": scores}

    def record(self, row: dict) -> bool:
        """Update the run state with an evaluation; save the model when it is the best so far."""
        improved, lowered = self.state.record(row["step"], row["test_loss"], row["scores"], self.config)
        if lowered:
            self.log(f"test loss on a plateau: learning rate x{PLATEAU_FACTOR} (now "
                     f"{self.config.learning_rate * self.state.plateau_factor:.3g})")
        if improved and self.chief:
            model_folder.save_model(self.out, self.model)
            model_folder.write_model_json(self.out, self.model_description(), run_state="running")
        return improved

    def write_record(self, row: dict) -> None:
        """log.csv, charts.png and TensorBoard (chief only; every worker keeps the rows)."""
        self.training_log.append(row, write=self.chief)
        if self.chief:
            draw_charts(self.training_log.rows, self.out)
            self.tensorboard.write(row)

    def budget_spent(self) -> bool:
        """Whether --max_minutes is used up (on this worker's clock)."""
        return self.config.max_minutes is not None and self.minutes() >= self.config.max_minutes

    def minutes(self) -> float:
        """Training minutes of this run so far, earlier invocations included (what --max_minutes budgets)."""
        return self.minutes_before + (time.perf_counter() - self.start_time) / 60

    def checkpoint(self) -> None:
        """Weights, optimizer and run state into checkpoint/ (chief only)."""
        self.state.epoch = math.ceil(self.state.step / self.train_reader.batches_per_epoch)
        self.state.minutes = self.minutes()
        self.agreement.average_local_copies(self.model.non_trainable_variables)
        if self.chief:
            model_folder.save_checkpoint(self.out, self.model, saved_optimizer(self.optimizer), self.state.to_dict())

    def evaluation_round(self) -> None:
        """Evaluate, record, write the record, checkpoint, log; start a new period."""
        row = self.evaluate()
        improved = self.record(row)
        self.agreement.agree_on_evaluation(self.state.bad_evaluations >= self.config.early_stopping)
        self.write_record(row)
        self.checkpoint()
        self.log(format_row(row, improved))
        self.period = Period()

    def model_description(self) -> dict:
        """What model.json says about this model (the schema fields are added by :mod:`lib.model_folder`)."""
        config, train_meta, test_meta = self.config, self.train_meta, self.test_meta
        spec = config.target_spec()
        instance = {}
        if spec is not None:
            instance = {"output_channels": len(spec.channels),
                        "instance": {"channels": list(spec.channels), "kinds": list(spec.kinds),
                                     "targets": spec.to_dict(), "postprocess": postprocess_defaults(spec).to_dict()}}
        return {
            "architecture": config.architecture,
            "model_options": config.model_options,
            "label_kind": config.target,
            "number_classes": INSTANCE_CLASSES if spec is not None else config.number_classes,
            **instance,
            "input_channels": train_meta["channels"],
            "input_dtype": train_meta["image_dtype"],
            "normalization": normalization_record(config, train_meta),
            "size_divisor": self.geometry[0],
            "receptive_field_radius": self.geometry[1],
            "patch_size": self.patch,
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
            "best": self.state.best_metrics,
            "precision": {"compute": self.precision, "reason": self.precision_reason,
                          "weights": "float32", "loss_scaling": self.precision == "float16"},
        }

    # The run

    def run(self) -> TrainResult:
        """Train as the config says; see :func:`train`."""
        self.config.validate()
        self.train_meta, self.test_meta = check_databases(self.config)
        saved = self.find_resume()
        if saved is not None and saved.finished:
            reason = self.finished_reason(saved)
            if reason is not None:
                return self._already_finished(saved, reason)
        self.strategy = self.strategy or select_strategy(collective_timeout=self.config.collective_timeout)
        self.worker_index, n_workers = worker_info(self.strategy)
        self.chief = self.worker_index == 0
        self.agreement = Agreement(self.strategy, n_workers, self.chief)
        self.split = split_records(self.config, self.train_meta)
        with precision_policy(self.config.mixed_precision, self.log) as (self.precision, self.precision_reason), \
                peer_errors(self, n_workers):
            # Nothing is written until the model is built and the checkpoint restored: a bad
            # backbone file or a damaged checkpoint leaves the folder as it was.
            self._build_model()
            self._restore(saved)
            if n_workers > 1:  # every worker goes on from the chief's checkpoint and values
                self.agreement.check_same_step(self.state.step)
                self.agreement.broadcast([*self.model.variables, *saved_optimizer(self.optimizer).variables])
            self.out.mkdir(parents=True, exist_ok=True)
            if self.chief:
                model_folder.write_train_config(self.out, recorded_settings(self.config))
                if saved is not None:
                    model_folder.set_run_state(self.out, "running")
            self._make_readers()
            self.training_log = TrainingLog(self.out)
            self.tensorboard = TensorBoard(self.out) if self.chief else None
            with self._signals(), self.train_reader, self.test_reader:
                self._loop(n_workers)
        return self.finish()

    def _loop(self, n_workers: int) -> None:
        config, state = self.config, self.state
        dataset = as_tf_dataset(self.train_reader).repeat()
        iterator = iter(self.strategy.distribute_datasets_from_function(lambda context: dataset))
        self.period = Period()
        self.train_reader.input_stats(reset=True)
        self.log(f"training {config.architecture} on {self.strategy.num_replicas_in_sync} replica(s) x {n_workers} "
                 f"worker(s), global batch {self.global_batch}, patch {self.patch}, from step {state.step}")
        while True:
            reason = self.stop_reason()
            if reason is not None:
                break
            self.run_step(iterator)
            if state.step % config.test_every_n_steps == 0:
                self.evaluation_round()
        self.stopped_because = reason
        if reason == "early_stopping":
            self.log(f"early stopping after {config.early_stopping} evaluations without improvement")
        if state.best_step is None or self.training_log.last_step != state.step:
            # Finish with an evaluation so the exported model is the best one seen.
            row = self.evaluate()
            improved = self.record(row)
            self.write_record(row)
            self.log(format_row(row, improved))
        spec = config.target_spec()
        if self.chief and spec is not None and state.best_step is not None:
            tune_postprocess(self.out, self.test_reader, spec, self.log)

    def _describe(self) -> None:
        """model_card.md and report.html of the finished folder: pictures for people, never a reason to fail a
        run whose model is already saved (any problem is logged as a warning)."""
        for what, write in (("model_card.md", lambda: write_model_card(self.out, log=self.log, cover=False)),
                            ("report.html", lambda: write_training_report(self.out, log=self.log))):
            try:
                write()
            except Exception as exc:  # noqa: BLE001 - the model is saved; a picture must not turn it into a failure
                self.log(f"warning: {what} not written ({type(exc).__name__}: {exc}); the model folder is complete")

    def finish(self) -> TrainResult:
        """SavedModel export, the final checkpoint, the run state in model.json; the result.

        ``max_minutes`` is a training budget (counted over every invocation of the run): it
        finishes the run like ``max_steps``; a larger ``--max_minutes`` extends it. Wall times and
        pre-emption are signals (SIGTERM, SIGINT, SIGUSR1): "interrupted", exit 3.
        """
        state = self.state
        state.finished = True
        state.stopped_because = self.stopped_because
        state.minutes = self.minutes()
        if self.chief:
            model_folder.export_saved_model(self.out, self.log)
            model_folder.save_checkpoint(self.out, self.model, saved_optimizer(self.optimizer), state.to_dict())
            model_folder.set_run_state(self.out, "finished" if state.finished else "interrupted",
                                       self.stopped_because)
            if not self.config.keep_checkpoints:
                prune_checkpoints(self.out, self.log)
            self._describe()
        seconds = time.perf_counter() - self.start_time
        best = state.best_metrics
        self.log(f"{'done' if state.finished else 'stopped, resumable'}: {state.step} steps in {seconds / 60:.1f} min ({self.stopped_because}); best test loss "
                 f"{state.best_test_loss:.4f} at step {state.best_step}, mean IoU "
                 f"{best.get('mean_iou', float('nan')):.3f}, foreground IoU "
                 f"{best.get('mean_foreground_iou', float('nan')):.3f}"
                 + (f", matching F1@0.5 {best['f1']:.3f}, PQ {best['panoptic_quality']:.3f}" if "f1" in best else "")
                 + f"; model in {self.out}")
        return TrainResult(self.out, state.step, state.best_step, state.best_test_loss, best, self.stopped_because,
                           self.resumed_from, seconds)


PATH_SETTINGS = ("train_database", "test_database")


def recorded_settings(config: TrainConfig) -> dict:
    """The settings written to train_config.json: :meth:`TrainConfig.to_dict` with the database paths resolved."""
    settings = config.to_dict()
    for key in PATH_SETTINGS:
        settings[key] = str(Path(settings[key]).resolve())
    return settings


def differing_settings(previous: dict, current: dict) -> list[str]:
    """The settings that change the model and differ between a recorded run and this one.

    Database paths compare resolved (a relative and an absolute spelling of one file agree);
    ``output_dir`` (the folder both were read from) and :data:`RESUMABLE` are left out.
    """
    previous = json.loads(json.dumps(previous))
    current = json.loads(json.dumps(current))
    for settings in (previous, current):
        for key in PATH_SETTINGS:
            if isinstance(settings.get(key), str):
                settings[key] = str(Path(settings[key]).resolve())
    # A setting added after the run was recorded counts as its default (the behaviour of that time).
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for key, value in current.items():
        if key not in fields or (key in previous and not isinstance(value, dict)):
            continue
        default = default_of(key)
        if default is dataclasses.MISSING:
            continue
        default = json.loads(json.dumps(default))
        if key not in previous:
            previous[key] = default
        elif isinstance(value, dict) and isinstance(previous[key], dict) and isinstance(default, dict):
            previous[key] = {**default, **previous[key]}
    ignored = set(RESUMABLE) | {"output_dir"}
    return sorted(k for k in set(previous) | set(current) if k not in ignored and previous.get(k) != current.get(k))


def train(config: TrainConfig, strategy=None, log: Callable[[str], None] = print) -> TrainResult:
    """Train a model as ``config`` says, resuming from ``output_dir`` when it holds the same run.

    Raises ``ConfigError`` for invalid settings, ``TrainingError`` for unusable databases or a
    different run in ``output_dir``, ``CheckpointError`` when no checkpoint restores,
    ``TrainingDiverged`` for a non-finite loss (naming non-finite input when that is the cause),
    ``TrainingInterrupted`` after SIGTERM/SIGINT (a checkpoint is written first: rerun to continue).
    ``max_minutes`` is a budget over every invocation of the run: it finishes the run.
    """
    return TrainingRun(config, strategy, log).run()


def train_kfold(config: TrainConfig, log: Callable[[str], None] = print) -> list[TrainResult]:
    """Train one model per fold of the training database (deepflash2's scheme).

    Model ``i`` validates on the source images of fold ``i`` and trains on the others; it is
    written to ``OUTPUT/ensemble/<architecture>_<C>classes-fold<i>/``, and
    ``OUTPUT/ensemble/folds.csv`` compares the folds. Each fold resumes like a single run.
    """
    config.validate()
    output = Path(config.output_dir)
    if output.exists() and not output.is_dir():
        raise TrainingError(f"output_dir must be a folder (new, or holding this k-fold run); got the file {output}. "
                            "Choose another --output_dir")
    try:
        with LmdbReader(config.train_database) as reader:
            per_fold = fold_records(reader.metadata, config.folds, config.seed)
    except StoreError as exc:
        raise TrainingError(f"the training database cannot be used for --folds {config.folds}: {exc}") from None
    ensemble = output / model_folder.ENSEMBLE
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
    write_folds_table(ensemble, rows)
    ious = [r["mean_iou"] for r in rows if r["mean_iou"] is not None]
    log(f"{len(rows)} folds: mean IoU {np.mean(ious):.3f} +- {np.std(ious):.3f}; ensemble in {ensemble}")
    return results
