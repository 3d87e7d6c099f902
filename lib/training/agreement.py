"""What every worker of a multi-worker run must agree on, and the collectives that make them agree.

``MultiWorkerMirroredStrategy`` runs one copy of the training loop per worker; each step's
gradient all-reduce waits for every worker. A worker that leaves the loop alone (its own clock
saying ``--max_minutes`` is over, a signal only it received, an early-stopping decision from a
test loss that differs in the last bit) leaves the others waiting in that all-reduce. So:

- :meth:`Agreement.stop_flags`: before every step, each worker's stop wishes are summed over
  all replicas (one all-reduce of a vector of :data:`STOP_FLAGS`): the rules that depend on the
  run's progress (early stopping, ``--max_steps``, ``--max_minutes``) count only from the chief,
  whose clock measures the budget; a signal counts from any worker. Every worker then stops at
  the same step for the same reason.
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
STOP_FLAGS = ("early_stopping", "max_steps", "max_minutes", "SIGTERM", "SIGINT", "SIGUSR1")
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

    def stop_flags(self, progress: dict[str, bool], signum: int | None) -> str | None:
        """The stop reason every worker agrees on now, or None to go on.

        ``progress``: this worker's view of early_stopping / max_steps / max_minutes (used from
        the chief only when there are several workers); ``signum``: a signal this worker got.
        """
        local = np.zeros(len(STOP_FLAGS), np.float32)
        for i, name in enumerate(STOP_FLAGS):
            if name in SIGNALS:
                local[i] = float(signum == SIGNALS[name])
            elif self.chief or not self.multi_worker:
                local[i] = float(bool(progress.get(name)))
        agreed = self._all_reduce_sum(local) if self.multi_worker else local
        for name, value in zip(STOP_FLAGS, agreed):
            if value > 0:
                return name
        return None

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
