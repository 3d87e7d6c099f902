"""GPUs allocated by the scheduler but invisible to TensorFlow: the CLIs stop (exit 2) and say how
to fix it; --allow_cpu goes on; --verbose shows TensorFlow's own log."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lib.common import device
from lib.common.device import GpuNotUsable, allocated_gpus, check_allocated_gpus
from lib.common.errors import EXIT_BAD_INPUT
from tests.conftest import ROOT, tiny_database

SCHEDULER_VARIABLES = ("CUDA_VISIBLE_DEVICES", *device.GPU_COUNT_VARIABLES, "SLURM_JOB_GPUS", "SLURM_STEP_GPUS")


@pytest.mark.parametrize("env, said", [
    ({}, None),
    ({"CUDA_VISIBLE_DEVICES": ""}, None),
    ({"CUDA_VISIBLE_DEVICES": "-1"}, None),
    ({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, None),
    ({"CUDA_VISIBLE_DEVICES": "0,1"}, "CUDA_VISIBLE_DEVICES=0,1"),
    ({"CUDA_VISIBLE_DEVICES": "GPU-5c1d1c4e-2a"}, "CUDA_VISIBLE_DEVICES=GPU-5c1d1c4e-2a"),
    ({"SLURM_JOB_GPUS": "0"}, "SLURM_JOB_GPUS=0"),  # a list of ids: GPU 0
    ({"SLURM_STEP_GPUS": "2,3"}, "SLURM_STEP_GPUS=2,3"),
    ({"SLURM_GPUS": "0"}, None),  # a count: none
    ({"SLURM_GPUS": "4"}, "SLURM_GPUS=4"),
    ({"SLURM_GPUS_ON_NODE": "2"}, "SLURM_GPUS_ON_NODE=2"),
    ({"SLURM_GPUS_PER_NODE": "a100:2"}, "SLURM_GPUS_PER_NODE=a100:2"),
    ({"SLURM_GPUS_PER_TASK": "gpu:0"}, None),
])
def test_which_environment_says_gpus_were_allocated(env, said):
    assert allocated_gpus(env) == said


def test_allocated_but_unseen_gpus_stop_unless_allowed():
    env = {"SLURM_GPUS_ON_NODE": "4"}
    with pytest.raises(GpuNotUsable) as caught:
        check_allocated_gpus(visible_gpus=0, env=env, prog="train_unet.py")
    message = str(caught.value)
    assert caught.value.exit_code == EXIT_BAD_INPUT
    assert "got SLURM_GPUS_ON_NODE=4 but TensorFlow sees no GPU" in message
    assert "make demo GPU=1" in message and "requirements-gpu.txt" in message
    assert "--allow_cpu to train_unet.py" in message
    check_allocated_gpus(allow_cpu=True, visible_gpus=0, env=env)
    check_allocated_gpus(visible_gpus=2, env=env)
    check_allocated_gpus(visible_gpus=0, env={})


@pytest.fixture
def gpus_allocated_none_seen(monkeypatch):
    """The job says GPU 0 was allocated; TensorFlow sees none (as with the CPU-only wheel)."""
    import tensorflow as tf

    for name in SCHEDULER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_JOB_GPUS", "0")
    real = tf.config.list_physical_devices
    monkeypatch.setattr(tf.config, "list_physical_devices",
                        lambda kind=None: [] if kind == "GPU" else real(kind))


def test_training_stops_with_exit_2_before_writing_anything(gpus_allocated_none_seen, tmp_path, capsys):
    import train_unet

    db = tiny_database(tmp_path)
    args = ["--train_database", str(db / "train-t.lmdb"), "--test_database", str(db / "test-t.lmdb"),
            "--output_dir", str(tmp_path / "run"), "--number_classes", "3", "--max_steps", "1",
            "--model_options", json.dumps({"base_filters": 4, "depth": 1}), "--reader_count", "0",
            "--patch_size", "32", "--batch_size", "2", "--mixed_precision", "0"]
    assert train_unet.main(args) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "got SLURM_JOB_GPUS=0 but TensorFlow sees no GPU" in err and "--allow_cpu" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()
    assert train_unet.main([*args, "--allow_cpu"]) == 0
    assert (tmp_path / "run" / "model.keras").is_file()


def test_inference_stops_with_exit_2(gpus_allocated_none_seen, tmp_path, capsys):
    import inference

    (tmp_path / "images").mkdir()
    code = inference.main(["--image_folder", str(tmp_path / "images"), "--model", str(tmp_path / "none"),
                           "--output_folder", str(tmp_path / "out")])
    assert code == EXIT_BAD_INPUT
    assert "TensorFlow sees no GPU" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_export_stops_with_exit_2_before_writing(gpus_allocated_none_seen, tmp_path, capsys):
    import export_model

    code = export_model.main(["--model", str(tmp_path / "none"), "--format", "onnx", "--output",
                              str(tmp_path / "m.onnx")])
    assert code == EXIT_BAD_INPUT
    out, err = capsys.readouterr()
    assert "devices:" in out and "TensorFlow sees no GPU" in err and "--allow_cpu to export_model.py" in err
    assert not (tmp_path / "m.onnx").exists()


def test_verbose_shows_tensorflows_own_lines():
    code = ("import sys\nfrom lib.common.device import quiet_tensorflow_logs\n"
            "quiet_tensorflow_logs(verbose=sys.argv[1] == '1')\nimport tensorflow as tf\n"
            "tf.config.list_physical_devices('GPU')\n")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    # (without --verbose the same start prints nothing: tests/common/test_device.py)
    loud = subprocess.run([sys.executable, "-c", code, "1"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert loud.returncode == 0, loud.stderr
    # what the filter would have dropped is shown (the oneDNN notice, the CUDA probe on a CPU node, ...)
    assert any(device._NOISE.match(line) for line in loud.stderr.splitlines()), loud.stderr
