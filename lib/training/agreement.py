"""What every worker of a multi-worker run must agree on, and the collectives that make them agree.

``MultiWorkerMirroredStrategy`` runs one copy of the training loop per worker; each step's
gradient all-reduce waits for every worker. A worker that leaves the loop alone (its own clock
saying ``--max_minutes`` is over, a signal only it received, an early-stopping decision from a
test loss that differs in the last bit) leaves the others waiting in that all-reduce. So:

- :meth:`Agreement.stop_reason`: at every step, each worker's stop wishes (:data:`STEP_FLAGS`:
  the ``--max_minutes`` budget, counted only from the chief, whose clock measures it; a signal,
  from any worker) are summed over all replicas together with the loss, in the step's own
  all-reduce; after each evaluation the chief's early-stopping decision is shared (one small
  all-reduce); ``--max_steps`` needs nothing (every worker runs the same steps). Every worker
  then stops at the same step for the same reason.
- :meth:`Agreement.average_local_copies`: Keras 3 keeps a copy of each non-trainable variable
  (batch-norm moving mean and variance) per replica, updated from that replica's batch only, so
  the copies drift apart. Before every evaluation and checkpoint they are replaced by their mean
  over all replicas: every worker evaluates (and the chief saves) the same model.
- :meth:`Agreement.broadcast`: after a resume, every variable takes the chief's value, and
  :meth:`check_same_step` stops a worker that restored another checkpoint.

Saving: TensorFlow asks every worker to take part in ``tf.train.Checkpoint``/SavedModel saves
(non-chief workers into a temporary folder removed afterwards) because those saves read
``ON_READ`` variables through collectives. This trainer saves with Keras (``save_weights`` to
HDF5 and numpy arrays), which reads the local copy of each variable and runs no collective; every
variable of our models and optimizers is an ``ON_WRITE`` MirroredVariable (batch-norm statistics
included). So the chief alone writes, after :meth:`average_local_copies` (a collective every
worker takes part in) has made the copies it saves those of all workers.

A collective waits at most ``--collective_timeout`` seconds
(:func:`lib.common.device.select_strategy`); a peer that died ends the others with
:class:`PeerLost` (exit 3: the last checkpoint is whole, rerunning the same command resumes).
"""

from __future__ import annotations

import contextlib
import signal
from typing import Iterator, Sequence

import numpy as np

from .. import model_folder
from ..common.errors import Resumable
from .config import TrainingError

# The stop rules, in the order they are reported when several fire at the same step.
STOP_RULES = ("early_stopping", "max_steps", "max_minutes", "SIGTERM", "SIGINT", "SIGUSR1")
# The rules that can differ between workers at a step, agreed at every step: they ride on the
# loss's all-reduce (lib.training.step.make_train_step), no collective of their own.
STEP_FLAGS = ("max_minutes", "SIGTERM", "SIGINT", "SIGUSR1")
SIGNALS = {"SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT, "SIGUSR1": signal.SIGUSR1}


class PeerLost(Resumable):
    """A collective of a multi-worker run failed: a peer died or stopped answering (exit 3).

    Nothing of the failed step was applied and the last checkpoint is whole: rerunning the same
    command on every worker resumes from it (the SLURM examples requeue on exit 3).
    """


class Agreement:
    """The agreement collectives of one run (nothing to agree on for a single worker)."""

    def __init__(self, strategy, n_workers: int, chief: bool):
        self.strategy = strategy
        self.chief = chief
        self.multi_worker = n_workers > 1
        self.replicated = strategy.num_replicas_in_sync > 1
        self._functions: dict = {}
        self.agreed: dict[str, bool] = {}  # STEP_FLAGS summed by the last step
        self.early_stop: bool | None = None  # the chief's decision at the last evaluation

    def _all_reduce_sum(self, vector: np.ndarray, first_only: bool = False) -> np.ndarray:
        """The sum of ``vector`` over every replica of every worker (each local replica adds it
        once); ``first_only``: the first replica's (the chief's) ``vector``."""
        import tensorflow as tf

        key = ("sum", first_only)
        if key not in self._functions:
            strategy = self.strategy

            def replica_fn(values):
                context = tf.distribute.get_replica_context()
                values = tf.identity(values)  # on this replica's device
                if first_only:
                    values = values * tf.cast(tf.equal(context.replica_id_in_sync_group, 0), values.dtype)
                return context.all_reduce(tf.distribute.ReduceOp.SUM, values)

            self._functions[key] = tf.function(
                lambda values: strategy.experimental_local_results(strategy.run(replica_fn, args=(values,)))[0])
        return self._functions[key](tf.constant(vector, tf.float64)).numpy()

    def step_flags(self, minutes_over: bool, signum: int | None) -> np.ndarray | None:
        """This worker's stop wishes to send with the next step (:data:`STEP_FLAGS`), None for a
        single worker (nothing to agree on). The budget counts from the chief's clock only."""
        if not self.multi_worker:
            return None
        wishes = [minutes_over and self.chief] + [signum == SIGNALS[name] for name in STEP_FLAGS[1:]]
        return np.array(wishes, np.float32)

    def record_step(self, summed: Sequence[float]) -> None:
        """The flags summed over every replica by the step just run (:func:`make_train_step`)."""
        self.agreed = {name: float(value) > 0 for name, value in zip(STEP_FLAGS, summed)}

    def agree_on_evaluation(self, early_stop: bool) -> None:
        """After an evaluation (every worker evaluates at the same step): the chief's
        early-stopping decision becomes every worker's (one all-reduce per evaluation)."""
        if self.multi_worker:
            summed = self._all_reduce_sum(np.array([float(early_stop and self.chief)], np.float64))
            self.early_stop = bool(summed[0] > 0)

    def stop_reason(self, progress: dict[str, bool], signum: int | None) -> str | None:
        """The stop rule that fires now (a name of :data:`STOP_RULES`), or None to go on.

        One worker: ``progress`` (its early_stopping / max_steps / max_minutes) and ``signum``
        (a signal it got). Several: early stopping as agreed at the last evaluation (before the
        first, as restored from the checkpoint they share), ``max_steps`` from the step count
        (every worker runs the same steps), the budget and signals as agreed with the last step.
        """
        if self.multi_worker:
            fired = dict(self.agreed, max_steps=progress.get("max_steps", False),
                         early_stopping=progress.get("early_stopping", False) if self.early_stop is None
                         else self.early_stop)
        else:
            fired = dict(progress, **{name: signum == number for name, number in SIGNALS.items()})
        return next((name for name in STOP_RULES if fired.get(name)), None)

    def average_local_copies(self, variables: Sequence) -> None:
        """Replace each replica's copy of ``variables`` (non-trainable: batch-norm statistics) by
        the mean over every replica. A collective: every worker calls it at the same step."""
        variables = [v for v in variables if _is_float(v)]
        if not self.replicated or not variables:
            return
        self._replace(variables, "mean")

    def broadcast(self, variables: Sequence) -> None:
        """Give every replica the first replica's (the chief's) value of ``variables``."""
        if not self.replicated or not variables:
            return
        self._replace(list(variables), "first")

    def _replace(self, variables: list, how: str) -> None:
        import tensorflow as tf

        strategy = self.strategy
        handles = [getattr(v, "value", v) for v in variables]  # Keras variables wrap a tf.Variable

        def replica_fn():
            context = tf.distribute.get_replica_context()
            first = tf.cast(tf.equal(context.replica_id_in_sync_group, 0), tf.float64)
            values = []
            for handle in handles:
                local = tf.cast(tf.identity(handle), tf.float64)
                if how == "first":
                    values.append(context.all_reduce(tf.distribute.ReduceOp.SUM, local * first))
                else:
                    values.append(context.all_reduce(tf.distribute.ReduceOp.MEAN, local))
            for handle, value in zip(handles, values):
                handle.assign(tf.cast(value, handle.dtype))

        key = (how, tuple(id(h) for h in handles))
        if key not in self._functions:
            self._functions[key] = tf.function(lambda: strategy.run(replica_fn))
        self._functions[key]()

    def check_same_step(self, step: int) -> None:
        """Raise :class:`TrainingError` (exit 2) when the workers resumed from different steps."""
        if not self.multi_worker:
            return
        chief_step = int(round(float(self._all_reduce_sum(np.array([step], np.float64), first_only=True)[0])))
        if chief_step != step:
            raise TrainingError(
                f"every worker must resume from the same checkpoint; this worker found step {step}, the chief step "
                f"{chief_step}. --output_dir must be a folder every worker sees (a shared file system), not a local "
                "one per node")


def _is_float(variable) -> bool:
    return "float" in str(getattr(variable, "dtype", ""))


@contextlib.contextmanager
def peer_errors(run, n_workers: int) -> Iterator[None]:
    """In a multi-worker run, a collective that fails (a peer died, or the collective timed out
    after ``--collective_timeout``) becomes :class:`PeerLost` (exit 3), naming the last checkpoint.
    ``run``: the :class:`~lib.training.run.TrainingRun` (its folder, step, worker index, settings)."""
    try:
        yield
    except Exception as exc:
        import tensorflow as tf

        lost = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.CancelledError,
                tf.errors.AbortedError, tf.errors.InternalError)
        if n_workers < 2 or not isinstance(exc, lost):
            raise
        try:
            saved = model_folder.checkpoint_state(run.out) if run.out.is_dir() else None
        except model_folder.CheckpointError:
            saved = None
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]
        raise PeerLost(
            f"every worker of a multi-worker run must answer within --collective_timeout "
            f"{run.config.collective_timeout:g} s; got {type(exc).__name__} at step {run.state.step} on worker "
            f"{run.worker_index} of {n_workers} ({first_line}). A peer died or hangs: see its log. "
            + (f"The checkpoint at step {saved.get('step')} is whole: " if saved else "No checkpoint yet: ")
            + "rerun the same command on every worker to continue") from None
