"""How many CPU threads a ``zoo`` run gives PyTorch.

PyTorch starts one OpenMP thread per core. When another process is busy on the same cores (a second job, the
test suite, a notebook), those threads spin waiting for each other and a step gets 5-20x slower; one thread
per *free* core degrades gracefully instead (``benchmarks/cpu_threads.py`` measures both). So, unless the user
chose (``OMP_NUM_THREADS`` or ``--threads``-style settings of their own), the zoo gives PyTorch the cores the
1-minute load average leaves free, at least one. On GPUs this only affects data loading and is harmless.
"""

from __future__ import annotations

import os

__all__ = ["choose_threads", "free_cores"]


def free_cores() -> int:
    """Cores not busy with other work: this process may use, minus the 1-minute load average (at least 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:  # not available on this platform
        return cores
    return max(1, min(cores, round(cores - load)))


def choose_threads() -> int | None:
    """Set PyTorch's intra-op threads to the free cores, unless ``OMP_NUM_THREADS`` says otherwise; returns
    the number set (``None`` when the user's setting stands)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    import torch

    threads = free_cores()
    torch.set_num_threads(threads)
    return threads
