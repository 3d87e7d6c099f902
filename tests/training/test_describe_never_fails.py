"""The pictures written at the end of a run (model_card.md, report.html) never fail a run whose model is saved."""

from __future__ import annotations

import json

from tests.conftest import tiny_database

TINY = {"base_filters": 4, "depth": 1, "batch_norm": False, "dropout": 0.0}


def test_a_failing_report_is_a_warning_and_the_run_finishes(tmp_path, monkeypatch, capsys):
    import keras

    import train_unet
    from lib.training import run as training_run

    def broken(*args, **kwargs):
        raise RuntimeError("simulated: the database vanished while drawing samples")

    monkeypatch.setattr(training_run, "write_training_report", broken)
    db = tiny_database(tmp_path / "db")
    out = tmp_path / "run"
    keras.backend.clear_session()
    code = train_unet.main(["--train_database", str(db / "train-t.lmdb"), "--test_database", str(db / "test-t.lmdb"),
                            "--output_dir", str(out), "--number_classes", "3", "--model_options", json.dumps(TINY),
                            "--batch_size", "2", "--test_every_n_steps", "2", "--max_steps", "2",
                            "--reader_count", "0", "--mixed_precision", "0"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "warning: report.html not written (RuntimeError: simulated" in printed
    assert json.loads((out / "model.json").read_text())["run_state"] == "finished"
    assert (out / "model_card.md").is_file() and not (out / "report.html").exists()
