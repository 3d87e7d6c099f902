"""Losses, metrics, schedules, the training loop, distribution, resume and early stopping."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from lib.common.settings import ConfigError
from lib.scoring.metrics import confusion_matrix, scores
from lib.training.config import TrainConfig, TrainingError
from lib.training.inputs import check_databases
from lib.training.losses import class_weights_from_counts
from lib.training.run import RunState
from lib.training.step import learning_rate_at
from tests.conftest import ROOT, tiny_database

TINY = {"base_filters": 4, "depth": 2, "batch_norm": False, "dropout": 0.0}


# Metrics and losses on hand-computed cases


def test_confusion_matrix_and_scores_by_hand():
    labels = np.array([[0, 0, 1, 1], [2, 2, 2, 0]])
    predictions = np.array([[0, 1, 1, 1], [2, 2, 0, 0]])
    cm = confusion_matrix(labels, predictions, 3)
    np.testing.assert_array_equal(cm, [[2, 1, 0], [0, 2, 0], [1, 0, 2]])
    s = scores(cm)
    assert s["iou"] == pytest.approx([2 / 4, 2 / 3, 2 / 3])
    assert s["dice"] == pytest.approx([4 / 6, 4 / 5, 4 / 5])
    assert s["pixel_accuracy"] == pytest.approx(6 / 8)
    assert s["mean_foreground_iou"] == pytest.approx(2 / 3)
    assert s["mean_iou"] == pytest.approx((0.5 + 2 / 3 + 2 / 3) / 3)
    # An absent class is left out of the means, not counted as 0 or 1.
    s = scores(confusion_matrix(np.array([0, 1]), np.array([0, 1]), 3))
    assert math.isnan(s["iou"][2]) and s["mean_iou"] == 1.0
    with pytest.raises(ValueError, match=r"must be in \[0, 3\)"):
        confusion_matrix(np.array([3]), np.array([0]), 3)
    with pytest.raises(ValueError, match="one shape"):
        confusion_matrix(np.zeros(3), np.zeros(4), 3)


def test_class_weights_follow_the_metadata_counts():
    assert class_weights_from_counts([90, 10]) == pytest.approx([100 / 180, 100 / 20])
    assert class_weights_from_counts([50, 0, 50]) == pytest.approx([1.0, 0.0, 1.0])


def test_losses_by_hand():
    import tensorflow as tf

    from lib.training.losses import make_loss

    labels = tf.constant(np.array([[[0, 1], [1, 1]]]), tf.uint8)
    uniform = tf.zeros((1, 2, 2, 3))
    assert float(make_loss("ce", 3)(labels, uniform)[0]) == pytest.approx(math.log(3), rel=1e-6)
    confident = tf.one_hot(tf.cast(labels, tf.int32), 3) * 50.0
    assert float(make_loss("ce", 3)(labels, confident)[0]) == pytest.approx(0.0, abs=1e-6)
    assert float(make_loss("dice", 3)(labels, confident)[0]) == pytest.approx(0.0, abs=1e-5)
    # Weighted CE on uniform logits is still log(C): the weights are normalised.
    weighted = make_loss("weighted_ce", 3, [1.0, 3.0, 0.0])
    assert float(weighted(labels, uniform)[0]) == pytest.approx(math.log(3), rel=1e-6)
    combined = make_loss("ce_dice", 3)(labels, uniform)
    assert float(combined[0]) > math.log(3)
    with pytest.raises(ValueError, match="loss must be one of"):
        make_loss("focal", 3)
    with pytest.raises(ValueError, match="one class weight per class"):
        make_loss("weighted_ce", 3, [1.0])


@pytest.mark.parametrize("schedule, step, expected", [
    ("constant", 10, 0.1), ("constant", 99, 0.1),
    ("cosine", 10, 0.1), ("cosine", 60, 0.05), ("cosine", 110, 0.0),
    ("onecycle", 10, 0.004), ("onecycle", 40, 0.1),
    ("plateau", 50, 0.025),
])
def test_learning_rate_schedules(tmp_path, schedule, step, expected):
    config = TrainConfig("a", "b", str(tmp_path), 2, learning_rate=0.1, lr_schedule=schedule, warmup_steps=10,
                         max_steps=110)
    assert learning_rate_at(step, config, plateau_factor=0.25) == pytest.approx(expected, abs=1e-9)
    assert learning_rate_at(0, config, 1.0) == pytest.approx(0.01)  # warm-up starts at base / warmup_steps


def test_early_stopping_counts_evaluations_without_improvement(tmp_path):
    config = TrainConfig("a", "b", str(tmp_path), 2, early_stopping=3)
    state = RunState()
    history = []
    for step, loss in enumerate([1.0, 0.9, 0.90005, 0.95, 0.96, 0.97], start=1):
        state.record(step, loss, {}, config)
        history.append(state.bad_evaluations)
    # 0.90005 is within 1e-4 of the best: it counts as best (NIST's tolerance) but is not saved as best.
    assert history == [0, 0, 0, 1, 2, 3]
    assert state.best_step == 2 and state.best_test_loss == 0.9


def test_config_collects_violations(tmp_path):
    with pytest.raises(ConfigError) as info:
        TrainConfig("a", "b", str(tmp_path), 1, architecture="unte", batch_size=0, lr_schedule="cosine").validate()
    text = str(info.value)
    assert "architecture must be one of" in text and "unet" in text and "'unte'" in text
    assert "number_classes must be >= 2" in text and "batch_size must be >= 1" in text
    assert "needs max_steps" in text


# Real training on tiny databases


@pytest.fixture(scope="module")
def tiny_db(tmp_path_factory) -> Path:
    return tiny_database(tmp_path_factory.mktemp("tiny"))


def _tiny_config(db: Path, out: Path, **kw) -> TrainConfig:
    values = dict(train_database=str(db / "train-t.lmdb"), test_database=str(db / "test-t.lmdb"),
                  output_dir=str(out), number_classes=3, model_options=TINY, batch_size=4, learning_rate=3e-3,
                  test_every_n_steps=10, max_steps=30, reader_count=0, use_augmentation=False, seed=1,
                  mixed_precision=False)
    values.update(kw)
    return TrainConfig(**values)


def test_incompatible_databases_are_rejected_before_training(tiny_db, tmp_path):
    with pytest.raises(TrainingError) as info:
        check_databases(_tiny_config(tiny_db, tmp_path, number_classes=2, patch_size=30))
    text = str(info.value)
    assert "--number_classes must be at least that, got 2" in text
    assert "patch_size must be a multiple of 4" in text
    with pytest.raises(TrainingError, match="patch_size must be <= the tile size 32"):
        check_databases(_tiny_config(tiny_db, tmp_path, patch_size=64))
    with pytest.raises(TrainingError, match="must be an LMDB folder"):
        check_databases(_tiny_config(tiny_db, tmp_path, test_database=str(tmp_path / "none.lmdb")))


def test_tiny_model_learns_and_writes_the_model_folder(tiny_db, tmp_path):
    import keras

    from lib.training import train

    keras.backend.clear_session()
    result = train(_tiny_config(tiny_db, tmp_path / "run", max_steps=40), log=lambda m: None)
    out = tmp_path / "run"
    rows = [json.loads(json.dumps(r)) for r in __import__("csv").DictReader(open(out / "log.csv"))]
    assert [int(float(r["step"])) for r in rows] == [10, 20, 30, 40]
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert float(rows[-1]["test_loss"]) < math.log(3)
    meta = json.loads((out / "model.json").read_text())
    assert meta["number_classes"] == 3 and meta["input_channels"] == 1 and meta["architecture"] == "unet"
    assert meta["best"]["step"] == result.best_step and len(meta["normalization"]["mean"]) == 1
    for name in ("model.keras", "charts.png", "train_config.json", "checkpoint/state.json", "saved_model"):
        assert (out / name).exists(), name
    model = keras.models.load_model(out / "model.keras", safe_mode=True)
    assert model.output_shape[-1] == 3
    # The same command again finds a finished run and does nothing.
    again = train(_tiny_config(tiny_db, tmp_path / "run", max_steps=40), log=lambda m: None)
    assert again.stopped_because == "already finished"
    # Different settings in the same folder are refused.
    with pytest.raises(TrainingError, match="holds a different run.*learning_rate"):
        train(_tiny_config(tiny_db, tmp_path / "run", learning_rate=1e-2), log=lambda m: None)


def test_mixed_bfloat16_trains_and_keeps_float32_logits(tiny_db, tmp_path):
    import keras

    from lib.training import train

    keras.backend.clear_session()
    result = train(_tiny_config(tiny_db, tmp_path / "bf16", max_steps=20, mixed_precision=True), log=lambda m: None)
    assert math.isfinite(result.best_test_loss)
    model = keras.models.load_model(tmp_path / "bf16" / "model.keras", safe_mode=True)
    assert model.output.dtype == "float32"
    assert keras.mixed_precision.global_policy().name == "float32", "train() restores the global policy"


def _run_cli(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "train_unet.py"), *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def test_kill_minus_nine_then_rerun_resumes(tiny_db, tmp_path):
    out = tmp_path / "run"
    args = ["--train_database", str(tiny_db / "train-t.lmdb"), "--test_database", str(tiny_db / "test-t.lmdb"),
            "--output_dir", str(out), "--number_classes", "3", "--model_options", json.dumps(TINY),
            "--batch_size", "2", "--test_every_n_steps", "5", "--reader_count", "1", "--use_augmentation", "0",
            "--mixed_precision", "0"]
    proc = _run_cli(args + ["--max_steps", "400"])
    deadline = time.time() + 120
    state = out / "checkpoint" / "state.json"
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and json.loads(state.read_text())["step"] >= 10:
            break
        time.sleep(0.1)
    assert proc.poll() is None, proc.stdout.read()
    proc.kill()
    proc.wait()
    killed_at = json.loads(state.read_text())["step"]
    assert 10 <= killed_at < 400
    result = subprocess.run([sys.executable, str(ROOT / "train_unet.py"), *args, "--max_steps", str(killed_at + 5)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"from the checkpoint at step {killed_at}" in result.stdout
    assert json.loads(state.read_text())["step"] == killed_at + 5


def test_sigterm_writes_a_checkpoint_and_exits_resumable(tiny_db, tmp_path):
    out = tmp_path / "run"
    args = ["--train_database", str(tiny_db / "train-t.lmdb"), "--test_database", str(tiny_db / "test-t.lmdb"),
            "--output_dir", str(out), "--number_classes", "3", "--model_options", json.dumps(TINY),
            "--batch_size", "2", "--test_every_n_steps", "1000", "--max_steps", "100000", "--reader_count", "0"]
    proc = _run_cli(args)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "train_config.json").exists():
        time.sleep(0.1)
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 3, output  # Resumable: rerun the same command (was 128 + signum before issue 12)
    assert "checkpoint written" in output
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] > 0


MIRRORED_SCRIPT = textwrap.dedent("""
    import sys, json
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    sys.path.insert(0, sys.argv[1])
    from lib.models import build_model
    from lib.training.losses import make_loss
    from lib.training.step import make_train_step

    def run(replicas):
        keras.utils.set_random_seed(0)
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]) if replicas == 2 else tf.distribute.get_strategy()
        with strategy.scope():
            model = build_model("unet", 1, 3, base_filters=4, depth=2, batch_norm=False, dropout=0.0)
            optimizer = keras.optimizers.AdamW(learning_rate=1e-2, weight_decay=1e-2)
            optimizer.build(model.trainable_variables)
        rng = np.random.default_rng(0)
        images = rng.standard_normal((12, 16, 16, 1)).astype("float32")
        labels = rng.integers(0, 3, (12, 16, 16)).astype("uint8")
        # 4 examples per step: one device takes them as one batch, two replicas take 2 each.
        dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(4 // replicas)
        iterator = iter(strategy.distribute_datasets_from_function(lambda ctx: dataset))
        step = make_train_step(strategy, model, optimizer, make_loss("ce", 3), global_batch=4, jit_compile=False)
        losses = [float(step(iterator)) for _ in range(3)]
        return losses, [w.numpy() for w in model.weights]

    one, w1 = run(1)
    two, w2 = run(2)
    print(json.dumps({"losses_one": one, "losses_two": two,
                      "max_weight_diff": max(float(np.abs(a - b).max()) for a, b in zip(w1, w2))}))
""")


def test_two_mirrored_replicas_equal_one_device():
    result = subprocess.run([sys.executable, "-c", MIRRORED_SCRIPT, str(ROOT)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["losses_one"] == pytest.approx(figures["losses_two"], rel=1e-4)
    assert figures["max_weight_diff"] < 1e-4


def test_fold_records_split_by_source_image(tiny_db):
    from lib.store.lmdb_store import LmdbReader
    from lib.training.inputs import fold_records

    with LmdbReader(tiny_db / "train-t.lmdb") as reader:
        meta = reader.metadata
    folds = fold_records(meta, 3, seed=0)
    n_sources = len(set(meta["tiles"]["source"]))
    assert len(folds) == min(3, n_sources)
    assert sorted(r for f in folds for r in f) == list(range(meta["n_records"]))
    sources = [{meta["tiles"]["source"][r] for r in f} for f in folds]
    assert all(a.isdisjoint(b) for i, a in enumerate(sources) for b in sources[i + 1:])
    assert len(fold_records(meta, 50, seed=0)) == n_sources  # n = min(K, number of images)


def test_kfold_trains_one_model_per_fold(tiny_db, tmp_path):
    import csv as csv_module

    import keras

    from lib.training import train_kfold

    keras.backend.clear_session()
    results = train_kfold(_tiny_config(tiny_db, tmp_path / "kf", folds=2, fold=0, max_steps=6,
                                       test_every_n_steps=3), log=lambda m: None)
    assert len(results) == 2
    rows = list(csv_module.DictReader(open(tmp_path / "kf" / "ensemble" / "folds.csv")))
    assert [r["fold"] for r in rows] == ["0", "1"]
    for i in range(2):
        meta = json.loads((tmp_path / "kf" / "ensemble" / f"unet_3classes-fold{i}" / "model.json").read_text())
        assert meta["data"]["fold"] == i and meta["data"]["folds"] == 2


MULTIWORKER_SCRIPT = textwrap.dedent("""
    import sys, json
    import numpy as np
    import tensorflow as tf
    import keras
    sys.path.insert(0, sys.argv[1])
    from lib.training.losses import make_loss
    from lib.models import build_model
    from lib.common.device import worker_info, select_strategy
    from lib.training.step import make_train_step

    strategy = select_strategy()  # TF_CONFIG is set: MultiWorkerMirroredStrategy
    index, n_workers = worker_info(strategy)
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = build_model("unet", 1, 2, base_filters=4, depth=1, batch_norm=False, dropout=0.0)
        optimizer = keras.optimizers.AdamW(learning_rate=1e-2, weight_decay=1e-2)
        optimizer.build(model.trainable_variables)
    initial = [w.numpy().copy() for w in model.weights]
    # Each worker reads its own shard: different data on each.
    rng = np.random.default_rng(100 + index)
    images = rng.standard_normal((6, 8, 8, 1)).astype("float32")
    labels = rng.integers(0, 2, (6, 8, 8)).astype("uint8")
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(2)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    dataset = dataset.with_options(options)
    iterator = iter(strategy.distribute_datasets_from_function(lambda ctx: dataset))
    step = make_train_step(strategy, model, optimizer, make_loss("ce", 2), global_batch=2 * n_workers)
    losses = [float(step(iterator)) for _ in range(3)]
    np.savez(sys.argv[2], *[w.numpy() for w in model.weights])
    changed = max(float(np.abs(w.numpy() - i).max()) for w, i in zip(model.weights, initial))
    print(json.dumps({"worker": index, "workers": n_workers, "losses": losses, "changed": changed}))
""")


def test_two_multiworker_processes_end_with_identical_weights(tmp_path):
    import socket

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for i in range(2):
        env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}),
                   TF_CPP_MIN_LOG_LEVEL="2")
        procs.append(subprocess.Popen([sys.executable, "-c", MULTIWORKER_SCRIPT, str(ROOT), str(tmp_path / f"w{i}.npz")],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=240)
        finally:
            p.kill()
        assert p.returncode == 0, err[-3000:]
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    assert [o["workers"] for o in outputs] == [2, 2]
    assert outputs[0]["losses"] == pytest.approx(outputs[1]["losses"])  # the reduced loss is global
    assert outputs[0]["changed"] > 1e-4, "training must have moved the weights"
    with np.load(tmp_path / "w0.npz") as a, np.load(tmp_path / "w1.npz") as b:
        assert len(a.files) > 0
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])  # SIGUSR1: SLURM's --signal=B:USR1@180
def test_model_json_records_the_run_state(tiny_db, tmp_path, sig):
    import keras

    from lib.common.files import file_mode
    from lib.model_folder import read_model_json
    from lib.training import TrainingInterrupted, train

    keras.backend.clear_session()
    out = tmp_path / "run"
    seen = {}

    def log(message: str) -> None:
        if message.startswith("step 10:"):  # the first evaluation wrote a best model and its model.json
            seen["running"] = read_model_json(out / "model.json").run_state
            os.kill(os.getpid(), sig)

    config = _tiny_config(tiny_db, out, max_steps=20)
    with pytest.raises(TrainingInterrupted) as info:
        train(config, log=log)
    assert info.value.signum == sig and info.value.exit_code == 3
    assert seen["running"] == "running"
    interrupted = read_model_json(out / "model.json")
    assert (interrupted.run_state, interrupted.stopped_because) == ("interrupted", f"signal {sig.name}")
    result = train(config, log=lambda m: None)
    assert result.resumed_from == 10 and result.stopped_because == "max_steps"
    finished = read_model_json(out / "model.json")
    assert (finished.run_state, finished.stopped_because) == ("finished", "max_steps")
    for name in ("model.json", "model.keras", "log.csv", "charts.png", "train_config.json"):
        assert os.stat(out / name).st_mode & 0o777 == file_mode(), name
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "no temporary files left"


def test_a_batch_log_gets_heartbeats_between_evaluations(tiny_db, tmp_path, monkeypatch):
    import keras

    import lib.training.run as run_module
    from lib.training import train

    keras.backend.clear_session()
    monkeypatch.setattr(run_module, "HEARTBEAT_SECONDS", 0.0)  # every step; a real log: every 60 s
    monkeypatch.setattr(run_module.sys.stderr, "isatty", lambda: False, raising=False)
    lines = []
    train(_tiny_config(tiny_db, tmp_path / "run", max_steps=6, test_every_n_steps=100), log=lines.append)
    beats = [line for line in lines if " img/s, input-bound " in line and line.startswith("step ")
             and "(last " in line]
    assert [int(line.split(":")[0].split()[1]) for line in beats] == [1, 2, 3, 4, 5, 6]
    assert all("min to --max_steps" in line for line in beats)
