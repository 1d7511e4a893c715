"""Cheap measurements of what a run costs the machine: RSS of the process tree and CPU use.

The resource governor reads the tree's memory after every optimizer step (`ProcessTree`) and the
trainer's log rows once per logged step, so each reading must take well under a millisecond.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable

import psutil

from minigpt_cli.engine.hardware import share


class ProcessTree:
    """RSS of this process and its children, cheap enough to read after every training step.

    Listing the children means reading every process's /proc entry (measured: about 9 ms with 84
    processes on the 2-core development machine, 8 % of a `tiny` training step, and more on a
    desktop running hundreds), while reading a known process's RSS takes about 60 us. So the list
    is refreshed at most every `rescan_seconds` and the known members are read in between: a
    child started since is counted from the next refresh, well within a second.
    """

    def __init__(
        self,
        process: psutil.Process | None = None,
        rescan_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._root = process or psutil.Process(os.getpid())
        self._rescan_seconds = rescan_seconds
        self._clock = clock
        self._children: list[psutil.Process] = []
        self._scanned_at = -math.inf

    def rss_bytes(self) -> int:
        """Resident memory of the tree: this process and its (known) children."""
        now = self._clock()
        if now - self._scanned_at >= self._rescan_seconds:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                self._children = self._root.children(recursive=True)
            self._scanned_at = now
        total = 0
        for proc in [self._root, *self._children]:
            try:
                total += proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return total


def tree_rss_bytes(process: psutil.Process | None = None) -> int:
    """Resident memory of a process and all its children, listed now (a one-off reading)."""
    return ProcessTree(process, rescan_seconds=0.0).rss_bytes()


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


def idle_cores(sample_seconds: float = 0.3) -> float:
    """Logical cores other programs leave free right now (measured, not the load average)."""
    cores = psutil.cpu_count(logical=True) or 1
    busy = psutil.cpu_percent(interval=sample_seconds) / 100 * cores
    return max(cores - busy, 0.0)


_thread_budget: int | None = None


def thread_budget() -> int | None:
    """The thread count `configure_threads` chose, for pools torch does not own (sentencepiece)."""
    return _thread_budget


def allowed_threads(max_cpu_pct: float) -> int:
    """Threads a `--max-cpu` cap allows: whole cores, rounded up (the fraction is held by
    duty-cycling, governor.CpuThrottle), at least one. Every verb reads the cap through this;
    under torchrun the cap is the machine's, and each rank on it takes its share."""
    cores = psutil.cpu_count(logical=True) or 1
    return max(1, math.ceil(cores * share.current().cpu_percent(max_cpu_pct) / 100 - 1e-9))


def configure_threads(
    max_cpu_pct: float, threads: int | None = None, source: str = "set explicitly"
) -> tuple[int, str]:
    """Set torch's thread pools from the CPU cap; returns the count and why it was chosen.

    Without an explicit thread count, cores that other programs are using are left alone: OpenMP
    threads spin while they wait for each other, so a thread that shares its core with another
    busy program stalls every step (measured on two shared cores: 2 threads ran 8x slower than 1).
    """
    import torch

    cores = psutil.cpu_count(logical=True) or 1
    if threads is not None:
        count, reason = threads, f"{threads} threads ({source})"
    else:
        allowed = allowed_threads(max_cpu_pct)
        processes = share.current().local_processes  # the ranks on this machine share it
        free = max(1, round(idle_cores() / processes))
        count = min(allowed, free)
        shared = f", shared by {processes} processes" if processes > 1 else ""
        reason = f"{count} threads ({max_cpu_pct:g}% of {cores} cores{shared})"
        if free < allowed:
            reason = (
                f"{count} threads: other programs keep {cores - free} of {cores} cores busy "
                f"(the {max_cpu_pct:g}% cap allows {allowed})"
            )
    global _thread_budget
    _thread_budget = count
    torch.set_num_threads(count)
    # Inter-op threads can only be set before the first parallel region; later calls keep the old.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(max(1, min(count, 4)))
    return count, reason


def apply_nice(level: int | None) -> None:
    """Lower this process's scheduling priority to `level` (never raises it; 0 = normal)."""
    if level is None or not hasattr(os, "nice"):
        return
    current = os.nice(0)
    if level > current:
        os.nice(level - current)
