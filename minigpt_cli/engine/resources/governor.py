"""The resource governor while a run works: memory back-off, pauses and CPU duty-cycling.

Before the first step `estimate.plan_micro_batch` fits the micro-batch to `--max-memory`; this
module keeps the promise afterwards, when the estimate was optimistic or other programs need the
memory back. After every optimizer step the `Governor` reads the step's peak resident memory (the
kernel's high-water mark, reset each step, so a spike between two readings is not missed) and the
system's available memory. Near the cap, or when the machine runs short, it backs off in the
order that costs the least: a smaller micro-batch with more accumulation (the global batch, and so
the training curve's meaning, never changes), then activation checkpointing, then a visible pause
until memory comes back. Each change is announced as a `governor` event and logged.

`CpuThrottle` holds a fractional `--max-cpu` (say 1.5 of 2 cores): threads cover whole cores, and
between micro-steps the process sleeps long enough that its CPU time stays at the cap on average.
Everything here is a few syscalls per step (measured: under 0.2 ms), so it runs on every step.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import psutil

from minigpt_cli.engine.hardware import monitor, share
from minigpt_cli.engine.hardware.monitor import ProcessTree

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from minigpt_cli.config.schema import ResourcesConfig

# Back off when a step's peak passes this share of the cap: the next step may allocate a little
# more (a longer SFT batch, an evaluation), and the cap is a promise, not a target.
SOFT_LIMIT_FRACTION = 0.95
# The machine is "short of memory" when less than this share of RAM is available to anyone.
SYSTEM_RESERVE_FRACTION = 0.05
SYSTEM_RESERVE_MIN_BYTES = 256 * 2**20
# How long a pause waits between readings, and how often it repeats its notice.
PAUSE_POLL_SECONDS = 1.0
PAUSE_NOTICE_SECONDS = 30.0

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _peak_rss_bytes() -> int | None:
    """This process's peak RSS since the last reset (Linux VmHWM); None where unavailable."""
    try:
        match = re.search(r"VmHWM:\s+(\d+)\s+kB", _STATUS.read_text())
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def _reset_peak_rss() -> bool:
    """Start a new high-water mark (Linux >= 4.0: writing 5 to clear_refs); False if unsupported."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def release_memory() -> None:
    """Hand freed memory back to the system.

    glibc keeps freed heap pages for reuse (measured: RSS stayed ~1.75x the live tensors after a
    larger micro-batch), so without `malloc_trim` a smaller micro-batch would not lower RSS.
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(ImportError, RuntimeError, AttributeError):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if torch.backends.mps.is_available():
            torch.mps.empty_cache()


# glibc's mallopt parameters (malloc.h) and the values `keep_freed_pages` sets.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_BYTES = 32 * 2**20  # glibc's largest on 64-bit systems
_TRIM_THRESHOLD_BYTES = 256 * 2**20


def keep_freed_pages() -> bool:
    """Have glibc's malloc keep freed blocks of up to 32 MiB for reuse instead of unmapping them.

    A training step allocates and frees the same large tensors every step (activations, the
    loss's chunk buffers, gradients). glibc maps blocks over its mmap threshold afresh and unmaps
    them on free, and trims the heap's top when more than its trim threshold is free, so each
    step page-faults the same memory in again: 25 M minor faults and 52 s of system time in one
    quickstart. With the threshold at 32 MiB and trimming only past 256 MiB free, the pages stay:
    small's bf16 step 547-558 -> 526-530 ms, peak RSS +1 to +42 MB (`benchmarks/memory.py`:
    every re-measured row still within 6.6 % of its estimate). `release_memory`'s malloc_trim still
    hands them back when the governor must. Returns whether both settings took (glibc only; a
    no-op elsewhere).
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mapped = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
    trimmed = mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES)
    return bool(mapped) and bool(trimmed)


def system_reserve_bytes(total: int) -> int:
    """Available memory below which the machine counts as short (other programs need it)."""
    return max(int(total * SYSTEM_RESERVE_FRACTION), SYSTEM_RESERVE_MIN_BYTES)


def smaller_micro_batch(current: int, global_batch: int) -> int | None:
    """The largest micro-batch at most half of `current` that divides the global batch."""
    for size in range(current // 2, 0, -1):
        if global_batch % size == 0:
            return size
    return None


class MemoryCapExceeded(Exception):
    """A step went over the cap with nothing left to lower: the trainer saves and stops."""


@dataclass
class Adjustment:
    """What the governor changed after a step, and why (logged as a `governor` event)."""

    micro_batch_size: int
    activation_checkpointing: bool
    message: str


class Governor:
    """Watches memory after each optimizer step and decides how to back off.

    The readers are injectable so tests can play a machine running short without allocating
    gigabytes; the defaults read this process tree and the system.
    """

    def __init__(
        self,
        cap_bytes: int,
        *,
        total_memory: int | None = None,
        read_peak: Callable[[], int] | None = None,
        read_available: Callable[[], int] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        on_pause: Callable[[str], None] | None = None,
    ) -> None:
        self.cap_bytes = cap_bytes
        total = total_memory or int(psutil.virtual_memory().total)
        self.reserve_bytes = system_reserve_bytes(total)
        self._tree = ProcessTree()
        self._read_peak = read_peak or self._process_peak
        self._read_available = read_available or (lambda: int(psutil.virtual_memory().available))
        self._sleep = sleep
        self._on_pause = on_pause
        self.peak_bytes = 0  # the highest step peak seen in this run
        self.paused_seconds = 0.0

    def _process_peak(self) -> int:
        own_peak = _peak_rss_bytes()
        tree = self._tree.rss_bytes()
        _reset_peak_rss()
        return max(own_peak or 0, tree)

    def start(self) -> None:
        """Forget what happened before training (tokenizer, data loading): measure steps only."""
        _reset_peak_rss()

    def after_step(
        self, micro_batch_size: int, global_batch_size: int, activation_checkpointing: bool
    ) -> Adjustment | None:
        """Read the step's peak; return the change to make, or None when all is well.

        A pause (machine short, nothing left to lower) happens inside this call and returns None.
        """
        peak = self._read_peak()
        self.peak_bytes = max(self.peak_bytes, peak)
        available = self._read_available()
        near_cap = peak > SOFT_LIMIT_FRACTION * self.cap_bytes
        short = available < self.reserve_bytes
        if not (near_cap or short):
            return None
        if near_cap:
            why = (
                f"step peak {peak / 2**20:,.0f} MB is near the {self.cap_bytes / 2**20:,.0f} MB cap"
            )
        else:
            why = (
                f"the machine is short of memory ({available / 2**20:,.0f} MB available, "
                f"below the {self.reserve_bytes / 2**20:,.0f} MB reserve)"
            )
        smaller = smaller_micro_batch(micro_batch_size, global_batch_size)
        if smaller is not None:
            release_memory()
            return Adjustment(
                smaller,
                activation_checkpointing,
                f"{why}: micro-batch {micro_batch_size} -> {smaller}, accumulation "
                f"{global_batch_size // micro_batch_size} -> {global_batch_size // smaller} "
                "(global batch unchanged)",
            )
        if not activation_checkpointing:
            release_memory()
            return Adjustment(
                micro_batch_size, True, f"{why}: activation checkpointing switched on"
            )
        if peak > self.cap_bytes:
            raise MemoryCapExceeded(
                f"a step peaked at {peak / 2**20:,.0f} MB, over the "
                f"{self.cap_bytes / 2**20:,.0f} MB cap, at micro-batch {micro_batch_size} with "
                "activation checkpointing: nothing smaller is left to try"
            )
        if short:
            self._pause(why)
        return None

    def _pause(self, why: str) -> None:
        """Wait, visibly, until other programs leave enough memory (nothing else left to lower)."""
        release_memory()
        started = time.perf_counter()
        last_notice = -math.inf
        while self._read_available() < self.reserve_bytes:
            waited = time.perf_counter() - started
            if waited - last_notice >= PAUSE_NOTICE_SECONDS and self._on_pause is not None:
                self._on_pause(f"paused: {why}; waiting for memory to come back")
                last_notice = waited
            self._sleep(PAUSE_POLL_SECONDS)
        waited = time.perf_counter() - started
        self.paused_seconds += waited
        if self._on_pause is not None:
            self._on_pause(f"resumed after a {waited:.0f} s pause: memory is available again")


class CpuThrottle:
    """Keeps the process's average CPU use at `cap_cores` by sleeping between units of work.

    A token bucket over process CPU time (all threads): after `used` CPU-seconds the process may
    have spent no less than `used / cap_cores` wall seconds. The account restarts every `window`
    seconds so an idle stretch (waiting on a disk, a pause) is not banked as a later burst.
    """

    def __init__(
        self,
        cap_cores: float,
        *,
        window: float = 2.0,
        clock: Callable[[], float] = time.perf_counter,
        cpu_clock: Callable[[], float] = time.process_time,
        sleep: Callable[[float], None] = time.sleep,
        all_cores: float | None = None,
    ) -> None:
        """`all_cores`: the cores this process may have at most (default: the machine's; under
        torchrun its share), the cap below which the throttle sleeps."""
        self.cap_cores = cap_cores
        self.active = cap_cores < (all_cores or os.cpu_count() or 1)
        self._window = window
        self._clock, self._cpu_clock, self._sleep = clock, cpu_clock, sleep
        self.slept = 0.0
        self.restart()

    @classmethod
    def from_percent(cls, max_cpu_pct: float) -> CpuThrottle:
        """The throttle for `--max-cpu PCT` (percent of all logical cores; under torchrun each
        rank on the machine holds its share)."""
        cores = psutil.cpu_count(logical=True) or 1
        mine = share.current()
        return cls(
            cores * mine.cpu_percent(max_cpu_pct) / 100,
            all_cores=cores * mine.cpu_percent(100) / 100,
        )

    def restart(self) -> None:
        self._wall_start = self._clock()
        self._cpu_start = self._cpu_clock()

    def __call__(self) -> None:
        """Sleep as long as the cap requires (a no-op when the cap covers every core)."""
        if not self.active:
            return
        used = self._cpu_clock() - self._cpu_start
        elapsed = self._clock() - self._wall_start
        owed = self.throttled_seconds(elapsed, used) - elapsed
        if owed > 0:
            self._sleep(owed)
            self.slept += owed
        if elapsed + owed >= self._window:
            self.restart()

    def throttled_seconds(self, wall: float, cpu: float) -> float:
        """Wall seconds that work of `wall` seconds and `cpu` CPU-seconds takes under this cap:
        the throttle sleeps until CPU time / wall time is at most `cap_cores`, and is off when the
        cap covers every core. `doctor` turns a measured step into a capped run's time with it."""
        if not self.active:
            return wall
        return max(wall, cpu / self.cap_cores)


@contextlib.contextmanager
def capped_threads(max_cpu_pct: float) -> Iterator[tuple[int, str]]:
    """Torch's threads as `pretrain --max-cpu` would set them (`monitor.configure_threads`, the
    same function), restored afterwards so doctor's own checks and a test process are unchanged.
    Yields (thread count, why)."""
    import torch  # imported where used, as everywhere here: this module stays light to import

    previous = torch.get_num_threads()
    previous_budget = getattr(monitor, "_thread_budget", None)
    try:
        yield monitor.configure_threads(max_cpu_pct)
    finally:
        torch.set_num_threads(previous)
        if hasattr(monitor, "_thread_budget"):
            monitor._thread_budget = previous_budget


# sentencepiece's BPE trainer holds about this much per training character (measured: 14 B/char
# on 5M characters of mixed English and Chinese, peak RSS over the process before training).
TOKENIZER_BYTES_PER_CHAR = 16


def tokenizer_training_chars(max_chars: int, cap_bytes: int, in_use_bytes: int) -> int:
    """The most characters a tokenizer may train on and stay under the cap (at most `max_chars`).

    Tokenizer training is part of the run the cap covers; when the configured sample would not fit
    beside what the process already holds, the sample shrinks instead of the machine swapping.
    """
    room = int(SOFT_LIMIT_FRACTION * cap_bytes) - in_use_bytes
    return max(0, min(max_chars, room // TOKENIZER_BYTES_PER_CHAR))


_active_throttle: CpuThrottle | None = None


def install_throttle(throttle: CpuThrottle | None) -> CpuThrottle | None:
    """Make `throttle_point` honour `throttle` (None removes it); returns the one it replaces."""
    global _active_throttle
    previous, _active_throttle = _active_throttle, throttle
    return previous


def throttle_point() -> None:
    """Called by long loops outside the Trainer (encoding, generation) so the CPU cap holds there
    too; free when no fractional cap is installed."""
    if _active_throttle is not None:
        _active_throttle()


def fractional_cpu_cap() -> float | None:
    """The installed throttle's cap in cores when it is active (below all cores), else None."""
    if _active_throttle is None or not _active_throttle.active:
        return None
    return _active_throttle.cap_cores


def _child_entry(function: Callable[..., object], args: tuple, connection: Connection) -> None:
    try:
        result = ("ok", function(*args))
    except Exception as error:  # noqa: BLE001 - handed back to the parent, which decides
        result = ("error", f"{type(error).__name__}: {error}")
    connection.send(result)
    connection.close()


_Result = TypeVar("_Result")


def run_duty_cycled(
    function: Callable[..., _Result],
    args: tuple,
    cap_cores: float,
    on_tick: Callable[[float], None] | None = None,
    tick_seconds: float = 1.0,
) -> _Result:
    """Run `function(*args)` in a child process held to `cap_cores` by stopping and continuing it.

    For work that runs in C++ without coming back to Python (sentencepiece's trainer), there is no
    place to sleep between units of work, so the parent measures the child's CPU time and pauses
    the child (SIGSTOP/SIGCONT) for as long as the cap requires. Only the child is ever stopped:
    stopping the verb's own process would hand the terminal back to the shell. `function` must be
    importable (a module-level function); its result and arguments travel through a pipe. An
    exception in the child comes back as RuntimeError("Type: message").
    """
    import multiprocessing
    import signal

    context = multiprocessing.get_context("spawn")  # no copy of the parent's threads or torch
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_child_entry, args=(function, args, sender), daemon=True)
    child.start()
    sender.close()
    pid = child.pid
    assert pid is not None  # set by start()
    watched = psutil.Process(pid)
    started = time.monotonic()
    last_tick = started
    try:
        while not receiver.poll(0.05):
            if not child.is_alive():
                raise RuntimeError(f"the worker process ended unexpectedly ({child.exitcode})")
            try:
                times = watched.cpu_times()
            except psutil.NoSuchProcess:
                continue
            owed = (times.user + times.system) / cap_cores - (time.monotonic() - started)
            if owed > 0.01:
                os.kill(pid, signal.SIGSTOP)
                try:
                    time.sleep(owed)
                finally:
                    os.kill(pid, signal.SIGCONT)
            now = time.monotonic()
            if on_tick is not None and now - last_tick >= tick_seconds:
                on_tick(now - started)
                last_tick = now
        status, value = receiver.recv()
    finally:
        if child.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
            child.join(timeout=5)
            if child.is_alive():
                child.kill()
                child.join()
    if status == "error":
        raise RuntimeError(str(value))
    return value


def cap_device_memory(device_type: str, cap_bytes: int, physical_bytes: int, percent: bool) -> str:
    """Bound PyTorch's allocator on CUDA/MPS by the same cap; returns what was set (or "").

    A percentage cap applies to device memory as the same percentage; an absolute cap is taken as
    that many bytes of device memory (at most all of it).
    """
    import torch

    if device_type == "cuda" and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        fraction = cap_bytes / physical_bytes if percent else cap_bytes / total
        fraction = min(max(fraction, 0.01), 1.0)
        torch.cuda.set_per_process_memory_fraction(fraction)
        return f"CUDA memory capped at {fraction:.0%} of {total / 2**30:.1f} GiB"
    if device_type == "mps" and hasattr(torch.mps, "set_per_process_memory_fraction"):
        # MPS shares the system RAM: its fraction is of the recommended working set.
        fraction = min(max(cap_bytes / physical_bytes, 0.01), 1.0)
        torch.mps.set_per_process_memory_fraction(fraction)
        return f"MPS memory capped at {fraction:.0%} of the working set"
    return ""


def apply_resources(
    resources: ResourcesConfig, threads: int | None = None, thread_source: str = "set explicitly"
) -> str:
    """Apply the CPU side of the caps to this whole process before any work starts.

    Niceness, thread pools and the duty-cycle throttle cover everything a verb does after this
    call: tokenizer training and encoding as much as the training steps; so does the allocator's
    setting (`keep_freed_pages`). Returns the thread note.
    """
    monitor.apply_nice(resources.nice)
    keep_freed_pages()
    count, note = monitor.configure_threads(
        resources.max_cpu, threads if threads is not None else resources.threads, thread_source
    )
    throttle = CpuThrottle.from_percent(resources.max_cpu)
    install_throttle(throttle)
    if throttle.active and throttle.cap_cores < count:
        note += f", duty-cycled to {throttle.cap_cores:g} cores"
    return note
