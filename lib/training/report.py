"""``report.html`` of a training run, built from the files of its model folder.

:func:`write_training_report` is called once at the end of :func:`lib.training.run.train`
(and can be called on any model folder). It reads ``model.json`` (settings, data, best
metrics, run state), ``log.csv`` (every evaluation) and ``charts.png``, writes a few
augmentation samples into ``samples/`` when the run used augmentation and its training
database is still there (:func:`lib.reader.samples.save_augmentation_samples`, the run's
own augmentation settings and seed), and writes one self-contained page
(:mod:`lib.common.html_report`): pictures inlined, evaluations sortable, no external file.
Every file goes through :mod:`lib.common.files`. A ``report.html`` this tool did not write
is left alone (with a warning).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .. import model_folder
from ..common import html_report as page
from ..common.files import write_text
from ..reader.augment import AugmentParams
from ..reader.samples import save_augmentation_samples

REPORT_HTML = "report.html"
SAMPLES_FOLDER = "samples"
SAMPLES = 4
SAMPLE_SIDE = 256  # px; smaller patches are enlarged in the samples
_SKIPPED_SETTINGS = ("training", "data", "best", "normalization")


def _picture(path: Path, side: int | None) -> str | None:
    """A data URI of the PNG at ``path`` (shrunk to ``side``), or None when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as picture:
            return page.png_data_uri(np.asarray(picture.convert("RGB")), side)
    except OSError:
        return None


def _value(value: Any) -> str:
    """A setting as short text: floats with 4 significant digits, lists and dicts as compact JSON."""
    if isinstance(value, float):
        return page.number(value)
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(", ", ": "))
    return "" if value is None else str(value)


def make_samples(folder: Path, meta: dict, count: int = SAMPLES, log: Callable[[str], None] = print) -> list[Path]:
    """``folder/samples/aug_sample_XX.png`` from the run's training database, with its augmentation; [] when
    the run used none, the database is gone or ``count`` is 0 (a note through ``log``)."""
    training = meta.get("training") or {}
    database = Path(str(training.get("train_database", "")))
    if count < 1 or not training.get("use_augmentation") or not database.is_dir():
        return []
    patch = meta.get("patch_size")
    try:
        params = AugmentParams(**(training.get("augmentation") or {}))
        return save_augmentation_samples(database, folder / SAMPLES_FOLDER, n=count, params=params,
                                         seed=int(training.get("seed") or 0),
                                         patch_shape=(patch, patch) if isinstance(patch, int) else None,
                                         side=SAMPLE_SIDE)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        log(f"note: no augmentation samples in the training report ({exc})")
        return []


def build_html(folder: Path, meta: dict, rows: list[dict], samples: list[Path]) -> str:
    """The text of ``report.html`` of the model folder ``folder``."""
    parts = ['<p class="note">Written by train_unet.py from the files of this model folder (model.json, '
             'log.csv, charts.png). Click a column header of the evaluations to sort.</p>']
    best = meta.get("best") or {}
    data = meta.get("data") or {}
    facts = [("state", meta.get("run_state")), ("stopped because", meta.get("stopped_because")),
             ("evaluations", len(rows)), ("last step", rows[-1].get("step") if rows else None),
             ("best step (lowest test loss)", best.get("step")), ("best test loss", best.get("test_loss")),
             ("kind", meta.get("label_kind")), ("classes", meta.get("number_classes")),
             ("architecture", meta.get("architecture")), ("model options", meta.get("model_options")),
             ("input", f"{meta.get('input_channels')} channel(s) of {meta.get('input_dtype')}"),
             ("normalisation", meta.get("normalization")), ("training records", data.get("train_records")),
             ("test records", data.get("test_records")), ("class pixel counts", data.get("class_pixel_counts")),
             ("created", meta.get("created")), ("updated", meta.get("updated"))]
    parts.append("<h2>Run</h2>" + page.table(["", "value"], [[page.escape(k), page.escape(_value(v))]
                                                            for k, v in facts if v not in (None, "")]))
    if best:
        shown = [(k, v) for k, v in best.items() if not isinstance(v, (list, dict))]
        lists = [(k, v) for k, v in best.items() if isinstance(v, list)]
        parts.append("<h2>Best model (kept as model.keras)</h2>" + page.table(
            [k for k, _ in shown], [[page.escape(_value(v)) for _, v in shown]], numeric=[True] * len(shown)))
        for name, values in lists:
            parts.append(f"<p>{page.escape(name)} per class</p>" + page.table(
                [str(k) for k in range(len(values))], [[page.escape(_value(v)) for v in values]],
                numeric=[True] * len(values)))
    charts = folder / model_folder.CHARTS
    uri = _picture(charts, None) if charts.is_file() else None
    if uri:
        parts.append("<h2>Charts</h2>" + page.image(uri, "loss and quality per evaluation", link=model_folder.CHARTS,
                                                    css="chart"))
    if rows:
        columns = [c for c in rows[0] if c not in ("iou_per_class", "channel_losses")]
        parts.append(f"<h2>Evaluations ({len(rows)}, log.csv)</h2>" + page.table(
            columns, [[page.escape(page.number(_float(r.get(c)))) for c in columns] for r in rows], sortable=True,
            numeric=[True] * len(columns)))
    if samples:
        cells = []
        for path in samples:
            thumb = _picture(path, 2 * page.THUMBNAIL_SIDE)
            if thumb:
                cells.append(page.image(thumb, path.name, link=str(path.relative_to(folder))))
        parts.append("<h2>Augmentation samples (image | label)</h2>"
                     '<p class="note">What the network saw: training patches after the run\'s random '
                     "augmentation.</p>" + " ".join(cells))
    training = meta.get("training") or {}
    if training:
        parts.append("<h2>Settings (train_config.json)</h2>" + page.table(
            ["setting", "value"], [[page.escape(k), page.escape(_value(v))] for k, v in training.items()]))
    return page.page(f"Training report: {folder.name}", "\n".join(parts))


def _float(value: Any) -> float | str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "" if value is None else str(value)
    return number if math.isfinite(number) else math.nan


def write_training_report(folder: str | Path, samples: int = SAMPLES, log: Callable[[str], None] = print
                          ) -> Path | None:
    """Write ``folder/report.html`` (and up to ``samples`` augmentation samples) from the model folder's files.

    Returns its path, or None (a warning through ``log``) when the folder has no readable
    ``model.json`` or holds a ``report.html`` this tool did not write. Existing
    ``samples/aug_sample_*.png`` are shown as they are.
    """
    folder = Path(folder)
    target = folder / REPORT_HTML
    if not page.may_write(target, log):
        return None
    try:
        meta = json.loads((folder / model_folder.MODEL_JSON).read_text())
    except (OSError, ValueError) as exc:
        log(f"warning: no training report: {folder / model_folder.MODEL_JSON} cannot be read ({exc})")
        return None
    rows = []
    if (folder / model_folder.LOG_CSV).is_file():
        with open(folder / model_folder.LOG_CSV, newline="") as handle:
            rows = list(csv.DictReader(handle))
    existing = sorted((folder / SAMPLES_FOLDER).glob("aug_sample_*.png"))
    shown = existing or make_samples(folder, meta, samples, log)
    return write_text(target, build_html(folder, meta, rows, shown))
