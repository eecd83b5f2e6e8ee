"""Wall-clock repeats for the benchmarks' cost figures."""

from __future__ import annotations

import time
from collections.abc import Callable


def wall_seconds(fn: Callable[[], object], repeats: int) -> list[float]:
    """Wall time of each of ``repeats`` calls of ``fn()``, seconds; the caller picks the
    summary (the minimum for a cost on a noisy machine, the median for a typical run)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times
