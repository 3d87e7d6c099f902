"""lib.common.device: TensorFlow's start-up chatter kept out of job logs, one line naming the devices."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lib.common import device
from tests.conftest import ROOT

# Lines TensorFlow 2.21 printed on this project's CPU machine at import (seen in the demo's log).
NOISE = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1795801216.284916   22863 port.cc:153] oneDNN custom operations are on. You may see slightly "
    "different numerical results due to floating-point round-off errors from different computation orders.",
    "I0000 00:00:1795801216.285294   22863 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will "
    "not be used.",
    "E0000 00:00:1795801218.331195   22863 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: Failed "
    "call to cuInit: UNKNOWN ERROR (303)",
    "To enable the following instructions: AVX2 AVX512F AVX512_VNNI AVX512_BF16 AVX512_FP16 AVX_VNNI AMX_TILE "
    "AMX_INT8 AMX_BF16 FMA, in other operations, rebuild TensorFlow with the appropriate compiler flags.",
]
KEPT = [
    "E0000 00:00:1795801218.331195   22863 gpu_device.cc:2000] Cannot dlopen some GPU libraries.",
    "Traceback (most recent call last):",
    "inference settings: model=runs/cells",
]


@pytest.mark.parametrize("line, dropped", [(line, True) for line in NOISE] + [(line, False) for line in KEPT])
def test_only_the_start_up_chatter_is_dropped(line, dropped):
    assert bool(device._NOISE.match(line)) is dropped


def test_a_tensorflow_job_log_starts_clean_with_one_device_line():
    code = ("import sys\nfrom lib.common.device import quiet_tensorflow_logs, device_line\n"
            "quiet_tensorflow_logs()\nprint(device_line())\nprint('after', file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("devices: ") and len(done.stdout.splitlines()) == 1
    assert done.stderr.splitlines() == ["after"], done.stderr  # nothing from TensorFlow, and fd 2 restored
