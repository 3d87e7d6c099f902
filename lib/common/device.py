"""Devices seen and used, the distribution strategy, the precision policy.

TensorFlow is imported only inside the functions that need it, so importing this module is
instant and CLIs answer ``--help`` at once.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import sys
import threading
from pathlib import Path

from .errors import BadInput
from .settings import ConfigError

# Strategy

# Seconds a collective (gradient all-reduce, stop agreement) of a multi-worker run may wait for
# its peers before it fails: a worker that died ends the others instead of leaving them waiting
# for ever. Generous, since the first collective waits for every worker to start TensorFlow.
COLLECTIVE_TIMEOUT_S = 300.0


def select_strategy(devices: list[str] | None = None, collective_timeout: float | None = COLLECTIVE_TIMEOUT_S):
    """The distribution strategy for this process.

    ``TF_CONFIG`` set, or a SLURM allocation of several tasks: ``MultiWorkerMirroredStrategy``
    (cluster from ``TF_CONFIG`` or ``SlurmClusterResolver``) whose collectives fail after
    ``collective_timeout`` seconds (None or 0: wait for ever); several GPUs (or ``devices``
    given): ``MirroredStrategy``; otherwise the default single-device strategy.
    """
    import tensorflow as tf

    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=collective_timeout or None)
    if os.environ.get("TF_CONFIG"):
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and int(os.environ.get("SLURM_JOB_NUM_NODES", "1")) > 1:
        resolver = tf.distribute.cluster_resolver.SlurmClusterResolver()
        return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver, communication_options=options)
    if devices:
        return tf.distribute.MirroredStrategy(devices=devices)
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def worker_info(strategy) -> tuple[int, int]:
    """(worker index, number of workers) of this process in the strategy's cluster."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return 0, 1
    n_workers = len(resolver.cluster_spec().as_dict().get("worker", [])) or 1
    return int(resolver.task_id or 0), n_workers


@dataclasses.dataclass(frozen=True)
class DeviceFacts:
    """What the precision choice depends on: the compute capability of each GPU TensorFlow
    sees (empty: none) and whether the CPU computes bfloat16 natively (AVX512_BF16 or AMX)."""

    gpu_capabilities: tuple[tuple[int, int], ...] = ()
    cpu_bfloat16: bool = False


def device_facts() -> DeviceFacts:
    """The :class:`DeviceFacts` of this machine, as TensorFlow and /proc/cpuinfo tell them."""
    import tensorflow as tf

    capabilities = []
    for gpu in tf.config.list_physical_devices("GPU"):
        capability = tf.config.experimental.get_device_details(gpu).get("compute_capability") or (0, 0)
        capabilities.append(tuple(int(c) for c in capability))
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    return DeviceFacts(tuple(capabilities), "avx512_bf16" in flags or "amx_bf16" in flags)


def bfloat16_is_native(facts: DeviceFacts | None = None) -> bool:
    """Whether this machine computes bfloat16 natively: GPUs of compute capability >= 8.0 (all of
    them), or, with no GPU, a CPU with AVX512_BF16 or AMX (measured here: 1.2-1.3x faster training)."""
    facts = device_facts() if facts is None else facts
    if facts.gpu_capabilities:
        return min(facts.gpu_capabilities) >= (8, 0)
    return facts.cpu_bfloat16


# Precision

PRECISIONS = ("float32", "bfloat16", "auto")
# Training: what --mixed_precision accepts (True: the device's half type, False: float32).
TRAINING_PRECISIONS = ("auto", "float32", "bfloat16", "float16")
# Keras policies of the training precisions.
POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


def choose_precision(requested: bool | str | None, facts: DeviceFacts) -> tuple[str, str]:
    """``(precision, reason)`` of a training run: precision ``"float32"``, ``"bfloat16"`` or
    ``"float16"`` (the last two mixed: float32 weights, half-precision compute; float16 with
    dynamic loss scaling), and why, in words for the log and model.json.

    ``requested`` None or ``"auto"``: bfloat16 on GPUs of compute capability >= 8.0 (A100,
    H100: as fast as float16, float32's exponent range, no loss scaling) and on CPUs with
    native bfloat16; float16 on older GPUs (V100 7.0, T4 7.5: tensor cores compute float16,
    not bfloat16); float32 otherwise. True: mixed precision in the device's half type
    (bfloat16 on CPUs); False: float32; a name: that precision.
    """
    if requested is False or requested == "float32":
        return "float32", "asked for (--mixed_precision 0)"
    if requested in ("bfloat16", "float16"):
        return str(requested), f"asked for (--mixed_precision {requested})"
    if requested not in (None, True, "auto"):
        raise ConfigError([f"mixed_precision must be one of {', '.join(TRAINING_PRECISIONS)}, 1 or 0; got "
                           f"{requested!r}"])
    gpus = facts.gpu_capabilities
    why = "asked for mixed precision (--mixed_precision 1)" if requested is True else "auto"
    if gpus:
        lowest = min(gpus)
        shown = f"compute capability {lowest[0]}.{lowest[1]}"
        if lowest >= (8, 0):
            return "bfloat16", f"{why}: GPU of {shown} computes bfloat16 natively"
        if lowest >= (7, 0):
            return "float16", f"{why}: GPU of {shown} has float16 tensor cores, not bfloat16 (dynamic loss scaling)"
        if requested is True:
            return "float16", f"{why}: GPU of {shown} computes float16 (dynamic loss scaling)"
        # Pascal and older: no tensor cores, and float16 runs at 1/64 of float32 on the GTX 10xx (6.1)
        return "float32", f"auto: GPU of {shown} has no tensor cores"
    if facts.cpu_bfloat16:
        return "bfloat16", f"{why}: this CPU computes bfloat16 natively (AVX512_BF16/AMX)"
    if requested is True:
        return "bfloat16", "asked for (--mixed_precision 1): bfloat16 on a CPU without native bfloat16 (emulated)"
    return "float32", "auto: no GPU and no native bfloat16 on this CPU"


def resolve_precision(precision: str) -> str:
    """The compute precision of inference for a requested one: ``"float32"`` or ``"bfloat16"``.

    ``"auto"`` is bfloat16 where the device computes it natively (a GPU of compute capability
    >= 8.0, or a CPU with AVX512_BF16 / AMX; :func:`bfloat16_is_native`), else
    float32. Raises :class:`ConfigError` (a ``ValueError``) for an unknown name.
    """
    if precision not in PRECISIONS:
        raise ConfigError([f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}"])
    if precision == "auto":
        return "bfloat16" if bfloat16_is_native() else "float32"
    return precision


# GPUs allocated but not seen

# Environment variables through which a scheduler says GPUs were given to this job: counts
# (possibly "type:count") and lists of device ids.
GPU_COUNT_VARIABLES = ("SLURM_GPUS", "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_TASK")
GPU_LIST_VARIABLES = ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS")


def allocated_gpus(env=None) -> str | None:
    """``"NAME=VALUE"`` of the first environment variable saying GPUs were allocated, None if none does.

    ``CUDA_VISIBLE_DEVICES`` empty, ``-1`` or ``NoDevFiles`` hides every GPU (no allocation);
    a count of 0 allocates none.
    """
    env = os.environ if env is None else env
    for name in GPU_LIST_VARIABLES:
        value = env.get(name, "").strip()
        if value and value not in ("-1", "NoDevFiles", "none"):
            return f"{name}={value}"
    for name in GPU_COUNT_VARIABLES:
        value = env.get(name, "").strip()
        counts = [part.rsplit(":", 1)[-1] for part in value.split(",") if part]
        if any(c.isdigit() and int(c) > 0 for c in counts):
            return f"{name}={value}"
    return None


class GpuNotUsable(BadInput):
    """GPUs were allocated to the job but TensorFlow sees none (exit 2: nothing was done)."""


def check_allocated_gpus(allow_cpu: bool = False, visible_gpus: int | None = None, env=None, prog: str = "") -> None:
    """Stop (:class:`GpuNotUsable`, exit 2) when the environment says GPUs were allocated but
    TensorFlow sees none, unless ``allow_cpu``: a job that asked for GPUs would otherwise run on
    the CPU, many times slower, and say nothing. ``visible_gpus`` None: ask TensorFlow."""
    allocation = allocated_gpus(env)
    if allocation is None or allow_cpu:
        return
    if visible_gpus is None:
        import tensorflow as tf

        visible_gpus = len(tf.config.list_physical_devices("GPU"))
    if visible_gpus:
        return
    raise GpuNotUsable(
        f"GPUs must be visible to TensorFlow when the job was given some; got {allocation} but TensorFlow sees no "
        "GPU. The CPU-only TensorFlow of requirements.txt is installed, or CUDA does not load: install the GPU "
        "build into the same environment (`make demo GPU=1`, or `.venv/bin/pip install -r requirements-gpu.txt`), "
        f"then check with `nvidia-smi`; or add --allow_cpu to {prog or 'the command'} to run on the CPU anyway")


# TensorFlow's own log

# What TensorFlow 2.21 writes to fd 2 while it is imported and probes for CUDA, before its
# logging honours TF_CPP_MIN_LOG_LEVEL (absl writes these before InitializeLog): 7 lines on a
# CPU node (oneDNN notice, "could not find cuda drivers", CPU-feature notice, cuInit failure),
# a fifth of the demo's log. Any other line (a real error) is passed through.
_NOISE = re.compile(r"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
                    r"|[IW]\d{4} \d\d:\d\d:[\d.]+ +\d+ \S+\] "
                    r"|E\d{4} \d\d:\d\d:[\d.]+ +\d+ cuda_platform\.cc:\d+\] failed call to cuInit"
                    r"|To enable the following instructions: .* rebuild TensorFlow)")


def quiet_tensorflow_logs(verbose: bool = False) -> None:
    """Import TensorFlow (and Keras) with its C++ start-up chatter kept out of the job log.

    Call it once at the start of a command that needs TensorFlow. ``TF_CPP_MIN_LOG_LEVEL`` is
    set to 2 (a user's own value wins) and, while TensorFlow is imported and lists its devices,
    file descriptor 2 goes through a filter that drops the lines of :data:`_NOISE` and passes
    every other line on. Does nothing when TensorFlow is already imported. ``verbose``
    (``--verbose``): TensorFlow is imported as it is, every line of its own log shown.
    """
    if verbose:
        for name in ("keras", "tensorflow"):
            importlib.import_module(name)
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules:
        return
    try:
        sys.stderr.flush()
        read_end, write_end = os.pipe()
        saved = os.dup(2)
    except OSError:  # no usable fd 2: nothing to keep clean
        import tensorflow  # noqa: F401
        return
    os.dup2(write_end, 2)
    os.close(write_end)
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(read_end, 65536), b"")), daemon=True)
    reader.start()
    try:
        import keras  # noqa: F401
        import tensorflow as tf

        tf.config.list_physical_devices("GPU")  # the CUDA probe prints here
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        reader.join(timeout=5)
        os.close(read_end)
        kept = [line for line in b"".join(chunks).decode(errors="replace").splitlines()
                if line and not _NOISE.match(line)]
        if kept:
            print("\n".join(kept), file=sys.stderr, flush=True)


def device_line() -> str:
    """One line naming the devices TensorFlow computes on, for the top of a job log.

    ``"devices: 2 GPU(s): NVIDIA H100 80GB HBM3 (compute capability 9.0) x2"`` or
    ``"devices: CPU only (Intel(R) Xeon(R) Processor, 2 cores; no GPU visible to TensorFlow)"``.
    """
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        names = []
        for gpu in gpus:
            details = tf.config.experimental.get_device_details(gpu)
            capability = details.get("compute_capability")
            names.append(details.get("device_name", gpu.name)
                         + (f" (compute capability {capability[0]}.{capability[1]})" if capability else ""))
        shown = ", ".join(f"{name} x{names.count(name)}" if names.count(name) > 1 else name
                          for name in dict.fromkeys(names))
        return f"devices: {len(gpus)} GPU(s): {shown}"
    model = "CPU"
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"devices: CPU only ({model}, {os.cpu_count()} cores; no GPU visible to TensorFlow)"
