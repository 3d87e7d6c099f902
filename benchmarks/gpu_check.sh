#!/usr/bin/env bash
# The GPU check of issue 14, ready to run on one GPU in under 8 minutes:
#
#   benchmarks/gpu_check.sh            # on a GPU node, from the repository root or anywhere
#   benchmarks/gpu_check.sh --quick    # tiny everything: checks the script itself on a CPU (GPU_CHECK_QUICK=1 too)
#
# Prints progress on stderr and ends with ONE JSON line on stdout: devices (nvidia-smi and
# TensorFlow, the precision "auto" picks), the GPU-marked tests (pytest -m gpu), training images/s
# (UNet-64 and FC-DenseNet56, 256 and 512 px, batch 8 and 16, float32 and mixed, real reader and
# preloaded tensors: input-bound %), inference Mpixel/s and peak GPU memory on a 4096 x 4096 image.
# Python: $PYTHON, else .venv/bin/python of the repository, else python3. The whole check is cut
# at 470 s of work (sections left are listed in "skipped"), and killed at 8 minutes.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
exec timeout --signal=TERM --kill-after=10 480 "$python" benchmarks/bench_gpu.py --budget_s 440 "$@"
