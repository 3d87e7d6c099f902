"""Devices seen and used, the distribution strategy, the precision policy.

TensorFlow is imported only inside the functions that need it, so importing this module is
instant and CLIs answer ``--help`` at once.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from pathlib import Path

from .settings import ConfigError

# Strategy


def select_strategy(devices: list[str] | None = None):
    """The distribution strategy for this process.

    ``TF_CONFIG`` set, or a SLURM allocation of several tasks: ``MultiWorkerMirroredStrategy``
    (cluster from ``TF_CONFIG`` or ``SlurmClusterResolver``); several GPUs (or ``devices``
    given): ``MirroredStrategy``; otherwise the default single-device strategy.
    """
    import tensorflow as tf

    if os.environ.get("TF_CONFIG"):
        return tf.distribute.MultiWorkerMirroredStrategy()
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and int(os.environ.get("SLURM_JOB_NUM_NODES", "1")) > 1:
        resolver = tf.distribute.cluster_resolver.SlurmClusterResolver()
        return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
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


def bfloat16_is_native() -> bool:
    """Whether this machine computes bfloat16 natively: a GPU of compute capability >= 8.0, or,
    with no GPU, a CPU with AVX512_BF16 or AMX (measured here: 1.2-1.3x faster training)."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        capability = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability") or (0, 0)
        return tuple(capability) >= (8, 0)
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# Precision


PRECISIONS = ("float32", "bfloat16", "auto")


def resolve_precision(precision: str) -> str:
    """The compute precision for a requested one: ``"float32"`` or ``"bfloat16"``.

    ``"auto"`` is bfloat16 where the device computes it natively (a GPU of compute capability
    >= 8.0, or a CPU with AVX512_BF16 / AMX; :func:`bfloat16_is_native`), else
    float32. Raises :class:`ConfigError` (a ``ValueError``) for an unknown name.
    """
    if precision not in PRECISIONS:
        raise ConfigError([f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}"])
    if precision == "auto":
        return "bfloat16" if bfloat16_is_native() else "float32"
    return precision



# TensorFlow's own log

# What TensorFlow 2.21 writes to fd 2 while it is imported and probes for CUDA, before its
# logging honours TF_CPP_MIN_LOG_LEVEL (absl writes these before InitializeLog): 7 lines on a
# CPU node (oneDNN notice, "could not find cuda drivers", CPU-feature notice, cuInit failure),
# a fifth of the demo's log. Any other line (a real error) is passed through.
_NOISE = re.compile(r"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
                    r"|[IW]\d{4} \d\d:\d\d:[\d.]+ +\d+ \S+\] "
                    r"|E\d{4} \d\d:\d\d:[\d.]+ +\d+ cuda_platform\.cc:\d+\] failed call to cuInit"
                    r"|To enable the following instructions: .* rebuild TensorFlow)")


def quiet_tensorflow_logs() -> None:
    """Import TensorFlow (and Keras) with its C++ start-up chatter kept out of the job log.

    Call it once at the start of a command that needs TensorFlow. ``TF_CPP_MIN_LOG_LEVEL`` is
    set to 2 (a user's own value wins) and, while TensorFlow is imported and lists its devices,
    file descriptor 2 goes through a filter that drops the lines of :data:`_NOISE` and passes
    every other line on. Does nothing when TensorFlow is already imported.
    """
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
