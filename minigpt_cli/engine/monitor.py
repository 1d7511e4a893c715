"""Cheap measurements of what a run costs the machine: RSS of the process tree and CPU use.

Called once per logged step, so each reading must take well under a millisecond or two; the
resource governor builds its decisions on the same readings.
"""

from __future__ import annotations

import contextlib
import os
import time

import psutil


def tree_rss_bytes(process: psutil.Process | None = None) -> int:
    """Resident memory of a process and all its children (what a memory cap must bound)."""
    root = process or psutil.Process(os.getpid())
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def physical_memory_bytes() -> int:
    """Total physical RAM (percent caps are taken of this)."""
    return int(psutil.virtual_memory().total)


class CpuMeter:
    """CPU use of this process since the previous reading, as percent of all logical cores."""

    def __init__(self) -> None:
        self._process = psutil.Process(os.getpid())
        self._cores = psutil.cpu_count(logical=True) or 1
        self._last_wall = time.perf_counter()
        self._last_cpu = self._cpu_seconds()

    def _cpu_seconds(self) -> float:
        times = self._process.cpu_times()
        return float(times.user + times.system + times.children_user + times.children_system)

    def read(self) -> float:
        now_wall, now_cpu = time.perf_counter(), self._cpu_seconds()
        wall = max(now_wall - self._last_wall, 1e-9)
        percent = 100.0 * (now_cpu - self._last_cpu) / wall / self._cores
        self._last_wall, self._last_cpu = now_wall, now_cpu
        return percent


def configure_threads(max_cpu_pct: float, threads: int | None = None) -> int:
    """Set torch's thread pools from the CPU cap (percent of all logical cores); returns the count.

    Whole cores are enforced by the thread count; the governor adds duty-cycling for fractions.
    """
    import torch

    cores = psutil.cpu_count(logical=True) or 1
    count = threads or max(1, round(cores * max_cpu_pct / 100))
    torch.set_num_threads(count)
    # Inter-op threads can only be set before the first parallel region; later calls keep the old.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(max(1, min(count, 4)))
    return count
