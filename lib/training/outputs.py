"""The record of a run: ``log.csv`` (one row per evaluation), ``charts.png``, TensorBoard scalars, log lines.

Written into the model folder under the names of :mod:`lib.model_folder`, every file through
:mod:`lib.common.files` (``log.csv`` is rewritten whole and atomically at each evaluation:
it holds one short row per evaluation, so a killed run never leaves a torn line).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Sequence

from .. import model_folder
from ..common.files import write_text
from ..common.pictures import Panel, save_charts

LOG_FIELDS = ["step", "epoch", "train_loss", "test_loss", "mean_iou", "mean_foreground_iou", "mean_dice",
              "pixel_accuracy", "iou_per_class", "learning_rate", "input_bound_pct", "images_per_s", "elapsed_s"]
# Instance models add per-channel test losses and matching statistics at IoU 0.5 after post-processing.
INSTANCE_LOG_FIELDS = LOG_FIELDS + ["channel_losses", "f1", "panoptic_quality", "precision", "recall",
                                    "objects_true", "objects_predicted"]
_TEXT_FIELDS = ("iou_per_class", "channel_losses")
# The log.csv columns also written to TensorBoard.
TENSORBOARD_SCALARS = ("train_loss", "test_loss", "mean_iou", "pixel_accuracy", "learning_rate", "input_bound_pct",
                       "f1", "panoptic_quality")


def _csv_text(fields: Sequence[str], rows: Sequence[dict]) -> str:
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=list(fields))
    writer.writeheader()
    writer.writerows({k: row[k] for k in fields} for row in rows)
    return buffer.getvalue()


class TrainingLog:
    """``log.csv`` of a model folder: the rows of earlier runs (when resuming) and the new ones.

    ``rows`` holds every evaluation with numbers as floats (for the charts); the file keeps
    the earlier rows exactly as they were written.
    """

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / model_folder.LOG_CSV
        self.rows: list[dict] = []
        self._written: list[dict] = []
        if self.path.exists():
            with open(self.path, newline="") as f:
                self._written = list(csv.DictReader(f))
            self.rows = [{k: (float(v) if k not in _TEXT_FIELDS else v) for k, v in r.items()} for r in self._written]

    @property
    def last_step(self) -> int | None:
        return int(self.rows[-1]["step"]) if self.rows else None

    def append(self, row: dict, write: bool = True) -> None:
        """Add an evaluation row; ``write`` rewrites log.csv (the chief writes, other workers only keep it)."""
        self.rows.append(row)
        self._written.append(row)
        if write:
            fields = INSTANCE_LOG_FIELDS if "f1" in row else LOG_FIELDS
            write_text(self.path, _csv_text(fields, self._written))


def best_row(rows: list[dict]) -> dict | None:
    """The evaluation with the lowest test loss (the first of equals, as the run keeps the model), or None."""
    finite = [r for r in rows if isinstance(r.get("test_loss"), (int, float)) and math.isfinite(r["test_loss"])]
    return min(finite, key=lambda r: r["test_loss"]) if finite else None


def draw_charts(rows: list[dict], folder: str | Path) -> Path:
    """Loss and quality curves of ``rows`` (log.csv) into ``folder/charts.png``.

    Every evaluation is a marked point (one evaluation is one visible point); the step of the
    lowest test loss (the kept model) is marked by a dashed line and stars and named in the title.
    """
    steps = [r["step"] for r in rows]

    def series(*keys: tuple[str, str]) -> dict:
        return {label: (steps, [r[key] for r in rows]) for key, label in keys}

    quality = [("mean_iou", "mean IoU"), ("pixel_accuracy", "pixel accuracy")]
    if rows and "f1" in rows[0]:
        quality += [("f1", "matching F1 (IoU 0.5)"), ("panoptic_quality", "panoptic quality")]
    best = best_row(rows)
    best_x = None if best is None else best["step"]
    panels = [Panel("loss (train and test)", "loss", series(("train_loss", "train"), ("test_loss", "test")),
                    log_scale=True, best_x=best_x),
              Panel("test quality", "score", series(*quality), y_limits=(0, 1), best_x=best_x)]
    title = f"{Path(folder).name}: {len(rows)} evaluation{'s' if len(rows) != 1 else ''}"
    if best is not None:
        title += f", best at step {best['step']:g} (test loss {best['test_loss']:.4g})"
    return save_charts(Path(folder) / model_folder.CHARTS, panels, title=title)


class TensorBoard:
    """Scalars of each evaluation in ``folder/tensorboard/`` (TensorFlow's own event-file writer)."""

    def __init__(self, folder: str | Path):
        import tensorflow as tf

        self._tf = tf
        self.writer = tf.summary.create_file_writer(str(Path(folder) / model_folder.TENSORBOARD))

    def write(self, row: dict) -> None:
        with self.writer.as_default(step=int(row["step"])):
            for key in TENSORBOARD_SCALARS:
                if key in row:
                    self._tf.summary.scalar(key, row[key])
        self.writer.flush()


def format_row(row: dict, improved: bool) -> str:
    """The log line of an evaluation."""
    quality = (f"F1@0.5 {row['f1']:.3f}, PQ {row['panoptic_quality']:.3f} ({row['channel_losses']})" if "f1" in row
               else f"mean IoU {row['mean_iou']:.3f}, accuracy {row['pixel_accuracy']:.3f}")
    return (f"step {row['step']}: train loss {row['train_loss']:.4f}, test loss {row['test_loss']:.4f}, "
            f"{quality}, {row['images_per_s']:.1f} img/s, "
            f"input-bound {row['input_bound_pct']:.0f}%" + (" (best)" if improved else ""))


def write_folds_table(ensemble: str | Path, rows: list[dict]) -> Path:
    """``ENSEMBLE/folds.csv``: one row per fold of a k-fold run."""
    return write_text(Path(ensemble) / model_folder.FOLDS_CSV, _csv_text(list(rows[0]), rows))
