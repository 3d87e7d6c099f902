"""lib/training/report.py: report.html of a model folder, self-contained, built from its files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from lib.training.outputs import TrainingLog, draw_charts
from lib.training.report import REPORT_HTML, SAMPLES_FOLDER, write_training_report
from tests.conftest import tiny_database

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "inference"))
from test_report_html import check_page  # noqa: E402  (the same HTML checks as the inference report)


def _folder(root: Path, database: Path | None, evaluations: int = 2) -> Path:
    """A model folder as a run leaves it: model.json, log.csv (TrainingLog), charts.png (draw_charts)."""
    folder = root / "run"
    folder.mkdir(parents=True)
    log = TrainingLog(folder)
    for k in range(evaluations):
        log.append({"step": 10 * (k + 1), "epoch": k + 1, "train_loss": 1.0 / (k + 1), "test_loss": 0.9 / (k + 1),
                    "mean_iou": 0.3 + 0.1 * k, "mean_foreground_iou": 0.2 + 0.1 * k, "mean_dice": 0.4,
                    "pixel_accuracy": 0.7, "iou_per_class": "0.1 0.2 0.3", "learning_rate": 0.003,
                    "input_bound_pct": 10.0, "images_per_s": 50.0, "elapsed_s": 3.0 * (k + 1)})
    draw_charts(TrainingLog(folder).rows, folder)
    training = {"train_database": str(database / "train-t.lmdb") if database else "/nowhere/train.lmdb",
                "use_augmentation": True, "augmentation": {"rotation": True, "noise": 0.02}, "seed": 3,
                "learning_rate": 0.003, "<script>": "x < y"}
    meta = {"architecture": "unet", "model_options": {"base_filters": 4, "depth": 1}, "label_kind": "semantic",
            "number_classes": 3, "input_channels": 1, "input_dtype": "uint16", "patch_size": 32,
            "training": training, "data": {"train_records": 16, "test_records": 8},
            "best": {"step": 10 * evaluations, "test_loss": 0.9 / evaluations, "mean_iou": 0.4, "iou": [0.1, 0.2, 0.3]},
            "run_state": "finished", "stopped_because": "max_steps"}
    (folder / "model.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture(scope="module")
def database(tmp_path_factory) -> Path:
    return tiny_database(tmp_path_factory.mktemp("db"))


def test_report_shows_charts_best_metrics_evaluations_settings_and_samples(database, tmp_path):
    folder = _folder(tmp_path, database)
    path = write_training_report(folder, log=lambda m: None)
    assert path == folder / REPORT_HTML
    parsed = check_page(path)
    assert parsed.rows == 1 + 2  # the evaluations table: header and one row per evaluation
    samples = sorted((folder / SAMPLES_FOLDER).glob("aug_sample_*.png"))
    assert len(samples) == 4
    assert {"charts.png"} | {f"{SAMPLES_FOLDER}/{p.name}" for p in samples} <= set(parsed.links)
    assert len(parsed.pictures) == 1 + 4  # charts and samples, inlined
    text = path.read_text()
    for words in ("Best model", "best step (lowest test loss)", "Augmentation samples", "learning_rate",
                  "finished", "max_steps"):
        assert words in text, words
    assert "&lt;script&gt;" in text and "x &lt; y" in text  # settings are escaped, never markup
    from PIL import Image

    with Image.open(samples[0]) as picture:  # 32 px patches enlarged to be seen: 256 + gap + 256
        assert picture.size == (256 + 8 + 256, 256)
    # a second call reuses the samples and replaces its own page
    assert write_training_report(folder, log=lambda m: None) == path
    assert sorted((folder / SAMPLES_FOLDER).glob("aug_sample_*.png")) == samples


def test_one_evaluation_without_database_and_foreign_or_missing_files(tmp_path):
    folder = _folder(tmp_path, None, evaluations=1)
    parsed = check_page(write_training_report(folder, log=lambda m: None))
    assert parsed.rows == 2 and not (folder / SAMPLES_FOLDER).exists()  # database gone: no samples, no error
    (folder / REPORT_HTML).write_text("mine")
    said = []
    assert write_training_report(folder, log=said.append) is None and (folder / REPORT_HTML).read_text() == "mine"
    assert "was not written by this tool" in said[0]
    assert write_training_report(tmp_path / "empty", log=said.append) is None
    assert "model.json cannot be read" in said[1]
