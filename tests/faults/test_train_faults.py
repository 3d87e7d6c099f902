"""Fault injection for training and the model folder (issue 13): each row makes a bad input or a damaged
folder itself, runs train_unet.py / train_fcn.py through main(argv), and checks the exit code, the
message (what, which file, how to go on) and what is left on disk."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from lib import model_folder
from tests.conftest import tiny_database

TINY = {"base_filters": 4, "depth": 1, "batch_norm": False, "dropout": 0.0}


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> Path:
    """One tiny 3-class database pair for the module: six 64 x 64 images in 32-px tiles."""
    return tiny_database(tmp_path_factory.mktemp("faults"))


def argv(db: Path, out: Path, *extra: str, train: str | None = None, test: str | None = None) -> list[str]:
    return ["--train_database", train or str(db / "train-t.lmdb"), "--test_database", test or str(db / "test-t.lmdb"),
            "--output_dir", str(out), "--number_classes", "3", "--model_options", json.dumps(TINY),
            "--batch_size", "2", "--learning_rate", "3e-3", "--warmup_steps", "0", "--test_every_n_steps", "2",
            "--max_steps", "2", "--reader_count", "0", "--use_augmentation", "0", "--mixed_precision", "0", *extra]


def run_cli(main, args: list[str], capsys) -> tuple[int, str]:
    """Exit code and output of a CLI's main(argv) (argparse's usage errors exit 2 through SystemExit)."""
    import keras

    keras.backend.clear_session()
    try:
        code = main(args)
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def run_unet(args: list[str], capsys) -> tuple[int, str]:
    import train_unet

    return run_cli(train_unet.main, args, capsys)


def state_step(folder: Path) -> int:
    return json.loads((folder / "state.json").read_text())["step"]


@pytest.fixture(scope="module")
def finished_run(db, tmp_path_factory) -> Path:
    """A run trained to step 4 (checkpoints at steps 2 and 4): checkpoint/ and checkpoint.previous/ both exist."""
    import keras

    from lib.training import TrainConfig, train

    keras.backend.clear_session()
    out = tmp_path_factory.mktemp("finished") / "run"
    train(TrainConfig(str(db / "train-t.lmdb"), str(db / "test-t.lmdb"), str(out), 3, model_options=TINY,
                      batch_size=2, learning_rate=3e-3, warmup_steps=0, test_every_n_steps=2, max_steps=4,
                      reader_count=0, use_augmentation=False, mixed_precision=False, keep_checkpoints=True),
          log=lambda m: None)  # checkpoint.previous/ kept: the damaged-checkpoint cases need it
    return out


def copy_run(finished_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


# Case 1 and the tracebacks of case 3: refused before anything is written


@pytest.mark.parametrize("case", ["same_database", "same_database_spelled_differently", "unknown_model_option",
                                  "bad_model_option_value", "folds_missing_database", "fcn_missing_backbone",
                                  "fcn_backbone_of_another_model"])
def test_bad_settings_are_refused_before_anything_is_written(db, tmp_path, monkeypatch, capsys, case):
    out = tmp_path / "run"
    train = str(db / "train-t.lmdb")
    if case == "same_database":
        args, expected = argv(db, out, test=train), ["test_database must differ from train_database",
                                                    "training tiles", "--folds"]
    elif case == "same_database_spelled_differently":
        monkeypatch.chdir(db)
        args, expected = argv(db, out, test="./train-t.lmdb/"), ["test_database must differ from train_database"]
    elif case == "unknown_model_option":
        args = argv(db, out, "--model_options", json.dumps({**TINY, "filters": 8}))
        expected = ["model_options of unet must be among", "base_filters", "depth", "'filters'"]
    elif case == "bad_model_option_value":
        args, expected = argv(db, out, "--model_options", json.dumps({**TINY, "depth": 0})), ["depth"]
    elif case == "folds_missing_database":
        args = argv(db, out, "--folds", "2", train=str(tmp_path / "missing.lmdb"))
        expected = ["--folds 2", "missing.lmdb"]
    else:
        import train_fcn

        weights = tmp_path / "vgg.npz"
        if case == "fcn_backbone_of_another_model":
            np.savez(weights, **{"conv1/kernel": np.zeros((3, 3, 1, 4), np.float32)})
            expected = ["model_options must build a fcn8 model", "block1_conv1", str(weights)]
        else:
            expected = ["backbone_weights must be an existing weights file", str(weights), "leave backbone_weights out"]
        args = argv(db, out, "--model_options", json.dumps({"width": 0.0625, "backbone_weights": str(weights)}))
        code, text = run_cli(train_fcn.main, args, capsys)
        assert code == 2, text
        for part in expected:
            assert part in text, (part, text)
        assert "Traceback" not in text and not out.exists()
        return
    code, text = run_unet(args, capsys)
    assert code == 2, text
    for part in expected:
        assert part in text, (part, text)
    assert "Traceback" not in text
    assert not out.exists(), "nothing written"


def test_output_dir_that_is_a_file_is_refused(db, tmp_path, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    for extra in ((), ("--folds", "2")):
        code, text = run_unet(argv(db, out, *extra), capsys)
        assert code == 2, text
        assert "output_dir must be a folder" in text and str(out) in text and "Traceback" not in text
        assert out.read_text() == "mine"


# Case 2: damaged checkpoint files


DAMAGE = {
    model_folder.CHECKPOINT_WEIGHTS: lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    model_folder.CHECKPOINT_OPTIMIZER: lambda p: p.write_bytes(np.random.default_rng(0).bytes(500)),
    model_folder.CHECKPOINT_STATE: lambda p: p.write_text("{garbage"),
}


@pytest.mark.parametrize("name", sorted(DAMAGE))
@pytest.mark.parametrize("keep_previous", [True, False])
def test_damaged_checkpoint_falls_back_or_says_what_to_remove(finished_run, db, tmp_path, capsys, name,
                                                              keep_previous):
    out = copy_run(finished_run, tmp_path)
    previous = out / model_folder.CHECKPOINT_PREVIOUS
    assert state_step(out / model_folder.CHECKPOINT) == 4 and state_step(previous) == 4
    if not keep_previous:
        shutil.rmtree(previous)
    damaged = out / model_folder.CHECKPOINT / name
    DAMAGE[name](damaged)
    before = damaged.read_bytes()
    code, text = run_unet(argv(db, out, "--max_steps", "6"), capsys)
    assert "Traceback" not in text
    if keep_previous:
        assert code == 0, text
        assert "fell back to the previous checkpoint" in text and str(damaged) in text
        assert "from the checkpoint at step 4" in text
        assert state_step(out / model_folder.CHECKPOINT) == 6
        assert model_folder.read_model_json(out / "model.json").run_state == "finished"
    else:
        assert code == 2, text
        assert str(damaged) in text and name in text
        assert f"Remove {out / model_folder.CHECKPOINT}" in text and "start this run over" in text
        assert damaged.read_bytes() == before, "the damaged file is left for the user to look at"
        assert model_folder.read_model_json(out / "model.json").run_state == "finished"


def test_killed_between_the_checkpoint_swaps_resumes_from_the_previous_one(finished_run, db, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path)
    shutil.rmtree(out / model_folder.CHECKPOINT)  # killed after checkpoint/ became checkpoint.previous/
    code, text = run_unet(argv(db, out, "--max_steps", "6"), capsys)
    assert code == 0, text
    assert "from the checkpoint at step 4" in text
    assert state_step(out / model_folder.CHECKPOINT) == 6


def test_damaged_train_config_names_the_file(finished_run, db, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path)
    (out / model_folder.TRAIN_CONFIG).write_bytes(b"\x00\xff garbage")
    code, text = run_unet(argv(db, out, "--max_steps", "6"), capsys)
    assert code == 2, text
    assert str(out / model_folder.TRAIN_CONFIG) in text and "start this run over" in text and "Traceback" not in text
    assert state_step(out / model_folder.CHECKPOINT) == 4


def test_a_checkpoint_of_another_model_is_not_a_fallback_case(finished_run, tmp_path):
    import keras

    from lib.models import build_model

    out = copy_run(finished_run, tmp_path)
    keras.backend.clear_session()
    model = build_model("unet", 1, 3, **TINY)
    optimizer = keras.optimizers.SGD()
    optimizer.build(model.trainable_variables)
    with pytest.raises(model_folder.CheckpointError, match="belongs to a different model"):
        model_folder.load_checkpoint(out, model, optimizer)


# Cases 4, 5, 6: what a rerun resumes, starts over or extends


def test_a_run_that_failed_before_its_first_checkpoint_does_not_lock_its_folder(db, tmp_path, capsys):
    out = tmp_path / "run"
    code, text = run_unet(argv(db, out, "--learning_rate", "1e30"), capsys)
    assert code == 1, text
    assert "the training diverged" in text and "Lower --learning_rate" in text and "Traceback" not in text
    assert not (out / model_folder.CHECKPOINT).exists()
    code, text = run_unet(argv(db, out), capsys)
    assert code == 0, text
    assert "stopped before its first checkpoint" in text and "learning_rate: 1e+30 -> 0.003" in text
    assert model_folder.read_model_json(out / "model.json").run_state == "finished"


def test_resume_with_a_relative_path_and_refusal_names_the_settings(finished_run, db, tmp_path, monkeypatch, capsys):
    out = copy_run(finished_run, tmp_path)
    monkeypatch.chdir(db.parent)
    relative = argv(db, out, "--max_steps", "6", train="db/train-t.lmdb", test="db/../db/test-t.lmdb")
    code, text = run_unet(relative, capsys)
    assert code == 0, text
    assert "from the checkpoint at step 4" in text and "holds a different run" not in text
    code, text = run_unet(argv(db, out, "--max_steps", "8", "--learning_rate", "1e-2"), capsys)
    assert code == 2, text
    assert "holds a different run" in text and "learning_rate: 0.003 -> 0.01" in text
    assert "Rerun with the recorded settings" in text and "resume from its checkpoint at step 6" in text
    assert state_step(out / model_folder.CHECKPOINT) == 6, "the checkpoint is kept"


def test_a_finished_run_is_extended_by_a_larger_max_steps(finished_run, db, tmp_path):
    import keras

    from lib.training import TrainConfig, train

    out = copy_run(finished_run, tmp_path)
    config = TrainConfig(str(db / "train-t.lmdb"), str(db / "test-t.lmdb"), str(out), 3, model_options=TINY,
                         batch_size=2, learning_rate=3e-3, warmup_steps=0, test_every_n_steps=2, max_steps=4,
                         reader_count=0, use_augmentation=False, mixed_precision=False)
    lines: list[str] = []
    keras.backend.clear_session()
    same = train(config, log=lines.append)
    assert same.stopped_because == "already finished" and "a larger --max_steps extends it" in lines[-1]
    seen = {}

    def log(message: str) -> None:
        lines.append(message)
        if message.startswith("training unet"):
            seen["state"] = model_folder.read_model_json(out / "model.json").run_state

    keras.backend.clear_session()
    result = train(TrainConfig(**{**config.to_dict(), "max_steps": 6}), log=log)
    assert result.steps == 6 and result.resumed_from == 4 and result.stopped_because == "max_steps"
    assert any(m.startswith("extending the finished run") and "--max_steps 6" in m for m in lines), lines
    assert seen["state"] == "running"
    info = model_folder.read_model_json(out / "model.json")
    assert (info.run_state, info.stopped_because) == ("finished", "max_steps")


# Case 7: --max_minutes is a training budget over every invocation; a larger one extends the run


def test_max_minutes_is_a_budget_that_a_larger_one_extends(db, tmp_path, capsys):
    out = tmp_path / "run"
    code, text = run_unet(argv(db, out, "--max_minutes", "0.0001", "--max_steps", "4"), capsys)
    assert code == 0, text
    info = model_folder.read_model_json(out / "model.json")
    assert (info.run_state, info.stopped_because) == ("finished", "max_minutes")
    assert (out / "model.keras").is_file() and (out / "saved_model").is_dir()
    saved = json.loads((out / model_folder.CHECKPOINT / "state.json").read_text())
    assert saved["finished"] is True and saved["minutes"] >= 0.0001
    stopped = saved["step"]
    assert stopped < 4, "the budget must stop it before --max_steps"
    # The same command again: the budget is used up, nothing to do (a resubmitted job does not train twice).
    code, text = run_unet(argv(db, out, "--max_minutes", "0.0001", "--max_steps", "4"), capsys)
    assert code == 0 and "nothing to do" in text and "a larger --max_minutes extends it" in text
    assert state_step(out / model_folder.CHECKPOINT) == stopped
    # A larger budget extends it from its checkpoint.
    code, text = run_unet(argv(db, out, "--max_minutes", "10", "--max_steps", "4"), capsys)
    assert code == 0, text
    assert "extending the finished run" in text and f"from the checkpoint at step {stopped}" in text
    assert model_folder.read_model_json(out / "model.json").run_state == "finished"
    assert state_step(out / model_folder.CHECKPOINT) == 4


# Case 8: a non-finite loss names its cause


class _Strategy:
    def experimental_local_results(self, value):
        return (value,)


@pytest.mark.parametrize("where, expected", [
    ("statistics", "holds NaN or Inf pixels (its channel mean [nan]"),
    ("batch", "a training batch of"),
    ("nowhere", None),
])
def test_non_finite_input_is_told_apart_from_divergence(tmp_path, where, expected):
    from lib.training import TrainConfig
    from lib.training.run import TrainingRun

    run = TrainingRun(TrainConfig("train.lmdb", "test.lmdb", str(tmp_path), 2))
    run.strategy = _Strategy()
    run.train_meta = {"channel_mean": [math.nan if where == "statistics" else 10.0], "channel_std": [2.0]}
    images = np.zeros((2, 4, 4, 1), np.float32)
    if where == "batch":
        images[0, 1, 1, 0] = np.inf
    found = run.non_finite_input(iter([(images, np.zeros((2, 4, 4), np.uint8))]))
    if expected is None:
        assert found is None
    else:
        assert expected in found and "train.lmdb" in found



def test_nan_pixels_in_the_database_are_refused_before_training(tmp_path, capsys):
    """A float image with NaN pixels gives the database NaN statistics: named before anything is written."""
    from lib.common.errors import BadInput
    from lib.store.build import BuildConfig, build_databases
    from lib.store.images import write_image

    rng = np.random.default_rng(0)
    for i in range(3):
        image = rng.standard_normal((32, 32)).astype(np.float32)
        image[5, 5 + i] = np.nan
        write_image(tmp_path / "data/images" / f"img_{i}.tif", image)
        write_image(tmp_path / "data/masks" / f"img_{i}.png", (rng.random((32, 32)) > 0.5).astype(np.uint8))
    try:
        build_databases(BuildConfig(image_folder=str(tmp_path / "data/images"),
                                    mask_folder=str(tmp_path / "data/masks"), output_folder=str(tmp_path / "db"),
                                    dataset_name="n", tile_size=32, train_fraction=0.67, number_classes=2, workers=0),
                        progress=False, log=lambda m: None)
    except BadInput as exc:  # the build itself refuses NaN pixels: handled one step earlier
        assert "nan" in str(exc).lower()
        return
    out = tmp_path / "run"
    args = argv(tmp_path / "db", out, train=str(tmp_path / "db/train-n.lmdb"), test=str(tmp_path / "db/test-n.lmdb"))
    args[args.index("--number_classes") + 1] = "2"
    code, text = run_unet(args, capsys)
    assert code == 2, text
    assert "train_database must hold finite pixel values" in text and "train-n.lmdb" in text
    assert "NaN or Inf pixels" in text and "Traceback" not in text
    assert not out.exists()
