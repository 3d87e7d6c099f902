"""Training: LMDB batches -> a model folder.

The public entry points, re-exported here: ``train(config, strategy=None, log=print)`` and
``train_kfold(config, log=print)`` (defined in :mod:`lib.training.run`), the settings
:class:`TrainConfig` and the errors (:mod:`lib.training.config`).

    config.py      TrainConfig (every default), the errors
    inputs.py      database checks, folds, training patch, target priors, readers
    step.py        distributed train/eval steps, optimizer, learning-rate schedule
    losses.py      semantic and instance losses
    evaluation.py  evaluation passes, post-processing tuning
    outputs.py     log.csv, charts.png, TensorBoard, log lines
    run.py         TrainingRun: setup, loop, stop rules, signals, checkpoints; train, train_kfold
    agreement.py   multi-worker stop agreement, batch-norm averaging, lost peers
    precision.py   the precision policy per device (bfloat16, float16 with loss scaling, float32)
    housekeeping.py  checkpoint pruning at the end of a run
    report.py      report.html of a run folder
"""

from .config import TrainConfig, TrainingDiverged, TrainingError, TrainingInterrupted
from .run import TrainResult, train, train_kfold

__all__ = ["TrainConfig", "TrainResult", "TrainingDiverged", "TrainingError", "TrainingInterrupted",
           "train", "train_kfold"]
