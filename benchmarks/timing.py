"""Timing helper shared by the benchmark scripts (run as ``python benchmarks/bench_*.py``)."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def timed(function: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Median wall time in seconds of ``repeats`` calls of ``function``, and the last call's result."""
    seconds, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), result
