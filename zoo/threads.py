"""How many CPU threads a ``zoo`` run gives PyTorch.

PyTorch starts one OpenMP thread per core. When another process is busy on the same cores (a second job, the
test suite, a notebook), those threads spin waiting for each other and a step gets 5-20x slower; one thread
per *free* core degrades gracefully instead (``benchmarks/cpu_threads.py`` measures both). So, unless the user
chose (``OMP_NUM_THREADS``), the zoo gives PyTorch the cores that other processes leave free, at least one,
measured over a quarter of a second at start (Linux's ``/proc/stat``; the 1-minute load average elsewhere,
which lags). On GPUs this only affects data loading and is harmless.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

__all__ = ["choose_threads", "free_cores"]

PROC_STAT = Path("/proc/stat")


def _busy_cores(seconds: float) -> float | None:
    """How many of the machine's cores were busy over ``seconds`` (this process idles meanwhile)."""

    def sample() -> tuple[int, int]:
        fields = [int(v) for v in PROC_STAT.read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields[:8]) - idle, sum(fields[:8])

    try:
        busy0, total0 = sample()
        time.sleep(seconds)
        busy1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (busy1 - busy0) / (total1 - total0) * (os.cpu_count() or 1)


def free_cores(seconds: float = 0.25) -> int:
    """Cores this process may use that no other process keeps busy (at least 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    busy = _busy_cores(seconds)
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except OSError:  # no load average on this platform
            return cores
    return max(1, min(cores, round(cores - busy)))


def choose_threads() -> int | None:
    """Set PyTorch's intra-op threads to the free cores, unless ``OMP_NUM_THREADS`` says otherwise; returns
    the number set (``None`` when the user's setting stands)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    import torch

    threads = free_cores()
    torch.set_num_threads(threads)
    return threads
