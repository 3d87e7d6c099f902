"""examples/slurm: the scripts parse, and their requeue logic works (fake srun and scontrol on PATH)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SLURM = ROOT / "examples" / "slurm"
SCRIPTS = sorted(SLURM.glob("*.sbatch"))
TRAINING = [s for s in SCRIPTS if "train_unet.py" in s.read_text()]

# The fake trainer: says it started, then exits 3 on SIGUSR1 (checkpoint written) or with $CODE.
TRAINER = f"""#!{sys.executable}
import os, signal, sys, time
from pathlib import Path
log = Path(os.environ["LOG"])
def on_usr1(signum, frame):
    log.with_suffix(".usr1").write_text("got SIGUSR1")
    sys.exit(3)
signal.signal(signal.SIGUSR1, on_usr1)
log.write_text("started " + " ".join(sys.argv[1:3]))
if os.environ.get("CODE"):
    sys.exit(int(os.environ["CODE"]))
time.sleep(60)
sys.exit(0)
"""


def test_scripts_parse():
    assert len(TRAINING) == 2 and len(SCRIPTS) == 3, "examples/slurm holds the sbatch scripts"
    for script in [*SCRIPTS, SLURM / "requeue.sh"]:
        done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert done.returncode == 0, f"{script.name}: {done.stderr}"
        text = script.read_text()
        if script in TRAINING:
            assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:USR1@180" in text
            assert "run_requeueable srun" in text and "--max_minutes " not in text  # no wall-time guard


def _fakes(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(TRAINER)  # "srun .venv/bin/python train_unet.py ...": the trainer itself
    (bin_dir / "scontrol").write_text(f"#!/bin/bash\necho \"$@\" >> {tmp_path / 'scontrol.txt'}\n")
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    (tmp_path / "db" / "train-cells.lmdb").mkdir(parents=True)  # the build step is skipped
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(ROOT),
            "SLURM_JOB_ID": "4242", "SLURM_CPUS_PER_TASK": "1", "DB": str(tmp_path / "db"),
            "RUN": str(tmp_path / "run"), "LOG": str(tmp_path / "trainer.log")}


@pytest.mark.parametrize("script", [s.name for s in TRAINING])
def test_the_wall_time_signal_reaches_the_trainer_and_the_job_requeues(tmp_path, script):
    env = _fakes(tmp_path)
    proc = subprocess.Popen(["bash", str(SLURM / script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 20
    while not (tmp_path / "trainer.log").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (tmp_path / "trainer.log").read_text().startswith("started"), proc.communicate()
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@180 sends to the batch script
    out, err = proc.communicate(timeout=20)
    assert (tmp_path / "trainer.usr1").read_text() == "got SIGUSR1", "the script forwards the signal"
    assert proc.returncode == 3, out + err
    assert (tmp_path / "scontrol.txt").read_text().split() == ["requeue", "4242"]
    assert "requeueing job 4242" in out


@pytest.mark.parametrize("code", [0, 2])
def test_a_finished_or_failed_training_is_not_requeued(tmp_path, code):
    env = {**_fakes(tmp_path), "CODE": str(code)}
    done = subprocess.run(["bash", str(SLURM / "one_node_multi_gpu.sbatch")], env=env, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == code, done.stdout + done.stderr
    assert not (tmp_path / "scontrol.txt").exists()
