"""Multi-worker runs agree on every stop: two worker processes on 127.0.0.1 (TF_CONFIG), CPU.

Each test starts the two workers of lib.training.train as subprocesses with a hard timeout, so
a hang fails the test instead of blocking the suite.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, tiny_database

# batch_norm on: its moving statistics are the variables whose per-replica copies drift apart.
MODEL = {"base_filters": 4, "depth": 1, "batch_norm": True, "dropout": 0.0}

WORKER = textwrap.dedent("""
    import json, sys
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    from lib.common.device import quiet_tensorflow_logs
    quiet_tensorflow_logs()
    from lib.common.errors import ToolkitError
    from lib.training.config import TrainConfig
    from lib.training.run import TrainingRun

    settings, weights_path = json.loads(sys.argv[2]), sys.argv[3]
    run = TrainingRun(TrainConfig(**settings), log=lambda m: print(m, flush=True))
    code = 0
    try:
        run.run()
    except ToolkitError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        code = exc.exit_code
    finally:
        if getattr(run, "model", None) is not None:
            np.savez(weights_path, *[np.asarray(w.numpy()) for w in run.model.weights])
            print("final " + json.dumps({"step": run.state.step, "stopped": run.stopped_because}), flush=True)
    sys.exit(code)
""")


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class Workers:
    """Two worker processes of one run; their output collected in files (no pipe can fill up)."""

    def __init__(self, tmp: Path, settings: dict, delay_second: float = 0.0, tag: str = "a"):
        cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
        self.tmp, self.tag, self.procs, self.logs = tmp, tag, [], []
        for i in range(2):
            if i == 1 and delay_second:
                time.sleep(delay_second)  # its own clock starts later than the chief's
            env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}),
                       TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="-1", OMP_NUM_THREADS="1")
            log = open(tmp / f"{tag}{i}.log", "w+")
            self.logs.append(log)
            self.procs.append(subprocess.Popen(
                [sys.executable, "-c", WORKER, str(ROOT), json.dumps(settings), str(tmp / f"{tag}{i}.npz")],
                env=env, stdout=log, stderr=subprocess.STDOUT, text=True))

    def text(self, i: int) -> str:
        return (self.tmp / f"{self.tag}{i}.log").read_text()

    def wait_for(self, needle: str, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if all(needle in self.text(i) for i in range(2)):
                return
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.2)
        self.kill()
        pytest.fail(f"both workers must print {needle!r}; got:\n" + "\n---\n".join(self.text(i)[-3000:] for i in range(2)))

    def wait(self, timeout: float) -> list[int]:
        """Exit codes; a worker still running after ``timeout`` s is killed and fails the test (a hang)."""
        end = time.monotonic() + timeout
        codes = []
        for i, p in enumerate(self.procs):
            try:
                codes.append(p.wait(timeout=max(end - time.monotonic(), 0.1)))
            except subprocess.TimeoutExpired:
                self.kill()
                pytest.fail(f"worker {i} hangs after {timeout} s:\n{self.text(i)[-3000:]}")
        return codes

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def final(self, i: int) -> dict:
        lines = [line for line in self.text(i).splitlines() if line.startswith("final ")]
        assert lines, self.text(i)[-3000:]
        return json.loads(lines[-1][len("final "):])


@pytest.fixture(scope="module")
def database(tmp_path_factory) -> Path:
    return tiny_database(tmp_path_factory.mktemp("mw"))


def _settings(db: Path, out: Path, **changes) -> dict:
    settings = dict(train_database=str(db / "train-t.lmdb"), test_database=str(db / "test-t.lmdb"),
                    output_dir=str(out), number_classes=3, model_options=MODEL, batch_size=2, patch_size=32,
                    reader_count=0, test_every_n_steps=10, warmup_steps=0, early_stopping=1000,
                    mixed_precision=False, collective_timeout=60.0)
    settings.update(changes)
    return settings


def _assert_same_weights(tmp: Path, tag: str) -> None:
    with np.load(tmp / f"{tag}0.npz") as a, np.load(tmp / f"{tag}1.npz") as b:
        assert len(a.files) == len(b.files) > 0
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key])


def test_max_minutes_measured_by_the_chief_stops_both_workers_at_one_step(database, tmp_path):
    # The second worker starts 3 s after the chief: on its own clock the budget would end 3 s
    # later, and the chief would leave it waiting in the gradient all-reduce.
    workers = Workers(tmp_path, _settings(database, tmp_path / "run", max_minutes=0.3, max_steps=100000),
                      delay_second=3.0)
    codes = workers.wait(110)
    assert codes == [0, 0], workers.text(0)[-2000:] + workers.text(1)[-2000:]
    finals = [workers.final(i) for i in range(2)]
    assert finals[0] == finals[1] and finals[0]["stopped"] == "max_minutes", finals
    assert 0 < finals[0]["step"] < 100000
    _assert_same_weights(tmp_path, "a")
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["run_state"] == "finished" and meta["stopped_because"] == "max_minutes"


def test_sigterm_to_one_worker_stops_both_with_exit_3_and_the_same_command_resumes(database, tmp_path):
    settings = _settings(database, tmp_path / "run", max_steps=30, test_every_n_steps=5)
    workers = Workers(tmp_path, settings, tag="a")
    workers.wait_for("step 5: train loss", 90)
    workers.procs[1].send_signal(signal.SIGTERM)  # the non-chief: the chief learns it through the agreement
    codes = workers.wait(60)
    assert codes == [3, 3], workers.text(0)[-2000:] + workers.text(1)[-2000:]
    stopped = [workers.final(i)["step"] for i in range(2)]
    assert stopped[0] == stopped[1] and 5 <= stopped[0] < 30
    assert "stopped by signal 15" in workers.text(0)  # the chief names the signal its peer got
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["step"] == stopped[0]

    again = Workers(tmp_path, settings, tag="b")
    assert again.wait(100) == [0, 0], again.text(0)[-2000:] + again.text(1)[-2000:]
    assert f"resuming {tmp_path / 'run'} from the checkpoint at step {stopped[0]}" in again.text(1)
    assert again.final(0) == again.final(1) == {"step": 30, "stopped": "max_steps"}
    _assert_same_weights(tmp_path, "b")


def test_a_killed_worker_ends_the_other_within_the_collective_timeout(database, tmp_path):
    timeout = 30.0  # also bounds the start-up: the first collective waits for both workers to import TensorFlow
    workers = Workers(tmp_path, _settings(database, tmp_path / "run", max_steps=100000, collective_timeout=timeout))
    workers.wait_for("step 10: train loss", 90)
    workers.procs[1].send_signal(signal.SIGKILL)
    start = time.monotonic()
    code = workers.procs[0].wait(timeout=timeout + 40)  # TimeoutExpired here would be the hang
    assert time.monotonic() - start < timeout + 40
    assert code == 3, workers.text(0)[-3000:]
    text = workers.text(0)
    assert "every worker of a multi-worker run must answer within --collective_timeout 30 s" in text, text[-3000:]
    assert "rerun the same command on every worker" in text
