"""Doctor: what this machine can do, measured rather than guessed.

Three jobs share this module:

* `collect_facts` describes the machine (OS, Python, torch build, accelerators, cores, RAM, disk,
  the CPU features that decide whether bf16 is fast) so a bug report carries everything at once.
* `measure_matmul` times square matmuls per precision. Those figures drive two decisions elsewhere:
  `device.resolve_precision` picks bf16 autocast only where bf16 *measured* faster, and the
  Trainer's MFU divides by the peak of the precision in use (`peak_flops`). Measuring costs about a
  second, so results are cached per machine fingerprint in `matmul.json`.
* `run_checks` turns facts and measurements into pass / warn / fail lines. Lacking an accelerator is
  never a failure: minigpt is built to train on a laptop CPU.
* `recommend_preset` answers "which preset should I train here?" for given `--max-memory` /
  `--max-cpu` caps and a time budget: the governor's own memory plan (`estimate.plan_micro_batch`,
  so `doctor --max-memory 50` and `pretrain --max-memory 50` pick the same micro-batch) and the
  measured speed of a real training step (cached like the matmuls), preset by preset.

The engine never prints; `diagnose` returns one JSON-ready report that the CLI renders.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import psutil
import torch

from minigpt_cli import __version__
from minigpt_cli.engine.core.events import EventCallback, emit
from minigpt_cli.engine.core.io import atomic_write_text

CACHE_ENV = "MINIGPT_CACHE_DIR"
CACHE_FILE = "matmul.json"
CACHE_VERSION = 1

MIN_PYTHON = (3, 11)
MIN_TORCH = (2, 4)
LOW_MEMORY_BYTES = 2 * 10**9
LOW_DISK_BYTES = 2 * 10**9
# Above this relative error (vs. a float64 reference) a "fp32" matmul is not computing in fp32:
# plain fp32 sits near 1e-7, bf16 arithmetic near 3e-3.
FP32_LEVEL_ERROR = 1e-4
# `precision auto` on a CPU: bf16 autocast only when bf16 matmuls measure at least this much faster
# than fp32 (below it, autocast casts cost more than the matmuls save); matmul precision "medium"
# only when it measures at least MEDIUM_MIN_SPEEDUP faster than the default fp32 path.
BF16_MIN_SPEEDUP = 1.3
MEDIUM_MIN_SPEEDUP = 1.25
# Seconds of matmul timing `doctor` spends in total (split over the precisions of the device).
DEFAULT_MEASURE_SECONDS = 1.0
# The time a recommended preset's default pretraining run may take (`doctor --budget`).
DEFAULT_BUDGET_SECONDS = 30 * 60.0
# Where measured training-step timings live in the cache file, beside the matmul entries.
SPEED_CACHE_SECTION = "training_speed"

# What is measured per device type. `fp32_medium` is fp32 tensors under
# torch.set_float32_matmul_precision("medium"), which on CPUs routes matmuls to oneDNN.
MATMUL_KEYS: dict[str, tuple[str, ...]] = {
    "cpu": ("fp32", "fp32_medium", "bf16"),
    "cuda": ("fp32", "bf16", "fp16"),
    "mps": ("fp32", "fp16", "bf16"),
}
MATMUL_LABELS = {
    "fp32": "fp32",
    "fp32_medium": "fp32 'medium'",
    "fp32_high": "fp32 'high'",
    "bf16": "bf16",
    "fp16": "fp16",
}
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_MATMUL_PRECISIONS = ("highest", "high", "medium")

# Matrix sides per device type: (first side for bf16/fp16, first side for fp32, largest side). A
# CPU reaches steady state by 1024-2048 and any CPU runs a 512² fp32 product in milliseconds,
# while bf16 without hardware support may be 100x slower and must start small; a GPU needs far
# larger products before launch overhead stops dominating.
_SIZES = {"cpu": (128, 512, 2048), "cuda": (1024, 1024, 8192), "mps": (256, 256, 4096)}
_ERROR_CHECK_SIZE = 128

# CPU feature flags that matter for training speed, as /proc/cpuinfo names them.
CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "arm_bf16")
_MACOS_FEATURE_KEYS = {
    "hw.optional.avx2_0": "avx2",
    "hw.optional.avx512f": "avx512f",
    "hw.optional.arm.FEAT_BF16": "arm_bf16",
}

CheckStatus = Literal["pass", "warn", "fail"]


# --------------------------------------------------------------------------------------------
# Facts
# --------------------------------------------------------------------------------------------


def parse_cpuinfo(text: str) -> tuple[str | None, set[str]]:
    """CPU model name and feature flags from the text of Linux `/proc/cpuinfo`.

    x86 lists `flags`, ARM lists `Features` (where `bf16` is reported as `arm_bf16` here so it
    cannot be mistaken for an x86 flag). Only the first processor block is read: they agree.
    """
    model: str | None = None
    flags: set[str] = set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if flags and model:
                break
            continue
        key = key.strip().lower()
        value = value.strip()
        if key == "model name" and model is None and value:
            model = value
        elif key == "flags" and not flags:
            flags = set(value.split())
        elif key == "features" and not flags:
            flags = {"arm_bf16" if flag == "bf16" else flag for flag in value.split()}
    return model, flags


def _sysctl_text(*args: str) -> str:
    try:
        result = subprocess.run(
            ["sysctl", *args], capture_output=True, text=True, timeout=2, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return result.stdout if result.returncode == 0 else ""


@functools.lru_cache(maxsize=1)
def cpu_info() -> dict[str, Any]:
    """CPU model and the features that decide bf16 speed, from /proc/cpuinfo or sysctl (macOS).

    Best effort: where neither source exists `flags_source` is None and every feature reads False;
    the matmul measurement, not these flags, has the last word on precision.
    """
    model: str | None = None
    flags: set[str] = set()
    source: str | None = None
    system = platform.system()
    if system == "Linux":
        try:
            model, flags = parse_cpuinfo(Path("/proc/cpuinfo").read_text(errors="replace"))
            source = "/proc/cpuinfo"
        except OSError:
            pass
    elif system == "Darwin":
        model = _sysctl_text("-n", "machdep.cpu.brand_string").strip() or None
        listing = _sysctl_text("hw.optional")
        if listing:
            source = "sysctl"
            for line in listing.splitlines():
                key, _, value = line.partition(":")
                feature = _MACOS_FEATURE_KEYS.get(key.strip())
                if feature and value.strip() == "1":
                    flags.add(feature)
    features = {name: name in flags for name in CPU_FEATURES}
    return {
        "model": model or platform.processor() or platform.machine() or "unknown",
        "flags_source": source,
        "features": features,
    }


def bf16_hardware(features: Mapping[str, bool]) -> str | None:
    """Name of the CPU's bf16 matmul hardware (AMX, AVX512-BF16, ARM BF16), or None."""
    if features.get("amx_bf16"):
        return "AMX"
    if features.get("avx512_bf16"):
        return "AVX512-BF16"
    if features.get("arm_bf16"):
        return "ARM BF16"
    return None


def nearest_existing(path: str | Path) -> Path:
    """The path if it exists, else its nearest existing parent (where it would be created)."""
    current = Path(path).expanduser().absolute()
    while not current.exists() and current != current.parent:
        current = current.parent
    return current


def _torch_build() -> dict[str, Any]:
    config = torch.__config__.show()
    blas = re.search(r"BLAS_INFO=(\w+)", config)
    return {
        "version": torch.__version__,
        "cuda": torch.version.cuda,
        "hip": getattr(torch.version, "hip", None),
        "debug": bool(torch.version.debug),
        "git": getattr(torch.version, "git_version", None),
        "blas": blas.group(1) if blas else None,
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
        "config": config,
    }


def _cuda_facts() -> dict[str, Any]:
    built = torch.version.cuda is not None or getattr(torch.version, "hip", None) is not None
    available = bool(torch.cuda.is_available())
    devices: list[dict[str, Any]] = []
    if available:
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            free: int | None = None
            with contextlib.suppress(RuntimeError):
                free = int(torch.cuda.mem_get_info(index)[0])
            devices.append(
                {
                    "index": index,
                    "name": props.name,
                    "total_memory_bytes": int(props.total_memory),
                    "free_memory_bytes": free,
                    "compute_capability": f"{props.major}.{props.minor}",
                    "bf16": (props.major, props.minor) >= (8, 0),
                    "multiprocessors": int(props.multi_processor_count),
                }
            )
    # A CPU-only torch on a machine with an NVIDIA driver is a common, fixable mistake.
    driver_present = bool(shutil.which("nvidia-smi")) or Path("/dev/nvidia0").exists()
    return {"built": built, "available": available, "devices": devices, "driver": driver_present}


def _mps_facts() -> dict[str, Any]:
    backend = getattr(torch.backends, "mps", None)
    built = bool(backend and backend.is_built())
    available = bool(backend and backend.is_available())
    return {"built": built, "available": available}


def _load_average() -> float | None:
    """1-minute load average (runnable processes), or None where the OS does not report one."""
    try:
        return round(float(psutil.getloadavg()[0]), 2)
    except (AttributeError, OSError):
        return None


def collect_facts(runs_dir: str | Path | None = None) -> dict[str, Any]:
    """Everything about this machine that decides what and how fast it can train (JSON-ready).

    `runs_dir` is where runs will be written (default `./runs`); free disk is read on it or, when
    it does not exist yet, on its nearest existing parent.
    """
    target = Path(runs_dir) if runs_dir is not None else Path("runs")
    checked = nearest_existing(target)
    usage = shutil.disk_usage(checked)
    memory = psutil.virtual_memory()
    cpu = cpu_info()
    usable: int | None
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = psutil.cpu_count(logical=True)
    return {
        "minigpt": __version__,
        "os": {
            "system": platform.system(),
            "release": platform.release(),
            "platform": platform.platform(),
            "machine": platform.machine(),
        },
        "python": {
            "version": platform.python_version(),
            "implementation": platform.python_implementation(),
            "executable": sys.executable,
        },
        "torch": _torch_build(),
        "cpu": {
            "model": cpu["model"],
            "physical_cores": psutil.cpu_count(logical=False),
            "logical_cores": psutil.cpu_count(logical=True),
            "usable_cores": usable,
            "features": cpu["features"],
            "flags_source": cpu["flags_source"],
            "capability": torch.backends.cpu.get_cpu_capability(),
            "load_average": _load_average(),
            "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "thread_env": {
                name: os.environ.get(name) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
            },
        },
        "memory": {"total_bytes": int(memory.total), "available_bytes": int(memory.available)},
        "disk": {
            "runs_dir": str(target),
            "checked_path": str(checked),
            "free_bytes": int(usage.free),
            "total_bytes": int(usage.total),
            "writable": os.access(checked, os.W_OK),
            "not_a_directory": target.exists() and not target.is_dir(),
        },
        "accelerators": {"cuda": _cuda_facts(), "mps": _mps_facts()},
    }


# --------------------------------------------------------------------------------------------
# Matmul measurement
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def float32_matmul_precision(value: str | None) -> Iterator[None]:
    """Temporarily set `torch.set_float32_matmul_precision`; the previous setting is restored."""
    previous = torch.get_float32_matmul_precision()
    if value is not None:
        torch.set_float32_matmul_precision(value)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}") from None


def _operands(n: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Two random n×n matrices and an output buffer, made on `device` itself.

    A private generator leaves the global RNG alone: `peak_flops` may run in the middle of a
    training run, which must not draw different random numbers because the cache was empty.
    Random values (not `empty`) because stray denormals or NaNs would slow a CPU matmul down.
    """
    try:
        generator = torch.Generator(device=device).manual_seed(n)
        a = torch.randn(n, n, generator=generator, device=device).to(dtype)
        b = torch.randn(n, n, generator=generator, device=device).to(dtype)
    except (RuntimeError, TypeError):  # a backend without device generators
        generator = torch.Generator().manual_seed(n)
        a = torch.randn(n, n, generator=generator).to(device=device, dtype=dtype)
        b = torch.randn(n, n, generator=generator).to(device=device, dtype=dtype)
    return a, b, torch.empty(n, n, device=device, dtype=dtype)


def _time_matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> float:
    start = time.perf_counter()
    torch.mm(a, b, out=out)
    _synchronize(out.device)
    return time.perf_counter() - start


def _best_time(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, time_cap: float) -> float:
    """Fastest of up to 5 products, stopping early once `time_cap` is spent (at least 2)."""
    began = time.perf_counter()
    best = _time_matmul(a, b, out)
    for _ in range(4):
        if time.perf_counter() - began > time_cap:
            break
        best = min(best, _time_matmul(a, b, out))
    return best


@dataclass
class _Timing:
    """One precision being timed: its operands at the chosen side and the best time so far."""

    key: str
    setting: str
    n: int
    operands: tuple[torch.Tensor, ...]
    best: float
    times: list[float] = field(default_factory=list)

    @property
    def gflops(self) -> float:
        return 2.0 * self.n**3 / self.best / 1e9


_MEASURE_ERRORS = (RuntimeError, TypeError)  # RuntimeError includes not-implemented ops


def _error_text(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _ladder(
    device: torch.device,
    key: str,
    step_budget: float,
    start: int,
    largest: int,
) -> _Timing:
    """Choose the matrix side: grow from `start` while the next product stays under `step_budget`.

    On a CPU without bf16 hardware one 1024² bf16 product takes seconds, so a fixed size would blow
    any budget; the side stops growing once the next step (8x the work) would cost more than
    `step_budget`. That cost is predicted from the best rate seen at any size so far, not from the
    last product's time: on a busy machine every OpenMP parallel region waits for a time slice
    when another process holds a core, so a small product can take as long as a large one, and
    judging by its time would stop the ladder at a size that measures the scheduler.
    """
    dtype, setting = _key_setup(key)
    n = min(start, largest)
    with float32_matmul_precision(setting), torch.no_grad():
        operands = _operands(n, device, dtype)
        torch.mm(*operands[:2], out=operands[2])  # warm-up: kernel choice, JIT, lazy init
        best = _best_time(*operands, step_budget / 2)
        rate = 2.0 * n**3 / best
        while n * 2 <= largest and 2.0 * (2 * n) ** 3 / rate <= step_budget:
            n *= 2
            operands = _operands(n, device, dtype)
            torch.mm(*operands[:2], out=operands[2])
            best = _best_time(*operands, step_budget / 2)
            rate = max(rate, 2.0 * n**3 / best)
    return _Timing(key, setting, n, operands, best)


def _race(timings: list[_Timing], deadline: float) -> dict[str, str]:
    """Time the precisions in turn, round after round, until `deadline` (at least two rounds).

    Interleaving makes every precision see the same machine: a burst from another process slows
    one round of each rather than all of one precision, so the per-round ratios that decide
    precision (`_speedups`) compare like with like. Each also keeps its fastest product as its
    peak, since interference only ever slows a product down. Returns the errors of precisions that
    failed midway (they are dropped).
    """
    errors: dict[str, str] = {}
    rounds = 0
    with torch.no_grad():
        while timings and (rounds < 2 or time.perf_counter() < deadline):
            for timing in list(timings):
                try:
                    with float32_matmul_precision(timing.setting):
                        timing.times.append(_time_matmul(*timing.operands))
                    timing.best = min(timing.best, timing.times[-1])
                except _MEASURE_ERRORS as exc:
                    errors[timing.key] = _error_text(exc)
                    timings.remove(timing)
            rounds += 1
    return errors


def _speedups(timings: list[_Timing]) -> dict[str, float]:
    """Each precision's speed relative to the first one (fp32): the median of per-round ratios.

    The peaks (fastest products) are right for MFU but wrong for comparing precisions on a busy
    machine: when another process holds a core nearly every product waits for a time slice, and
    whichever precision happened to catch one clean product would look several times faster.
    Ratios taken within a round share the machine's state, and their median ignores the rounds
    where a burst hit only one side.
    """
    if not timings:
        return {}
    reference = timings[0]
    ratios: dict[str, float] = {reference.key: 1.0}
    for timing in timings[1:]:
        pairs = [
            (timing.n**3 / mine) / (reference.n**3 / theirs)
            for mine, theirs in zip(timing.times, reference.times, strict=False)
        ]
        if pairs:
            ratios[timing.key] = statistics.median(pairs)
    return ratios


def _start_size(device: torch.device, key: str) -> int:
    low, fp32, _ = _SIZES.get(device.type, _SIZES["cpu"])
    return fp32 if key.startswith("fp32") else low


def measure_matmul(
    device: str | torch.device,
    dtype: torch.dtype | str,
    seconds_budget: float,
    *,
    fp32_precision: str | None = None,
    max_size: int | None = None,
) -> float:
    """Measured square-matmul speed in GFLOP/s for `dtype` on `device`, in about `seconds_budget`.

    The side grows (up to 2048 on a CPU, 8192 on a GPU, or `max_size`) while a product stays
    under an eighth of the budget, then products are timed until the budget is spent and the
    fastest counts. `fp32_precision` applies `torch.set_float32_matmul_precision` (e.g. "medium")
    for the measurement only; the previous setting is restored.
    """
    device = torch.device(device)
    dtype = _as_dtype(dtype)
    key = next(name for name, value in _DTYPES.items() if value == dtype)
    if key == "fp32" and fp32_precision not in (None, "highest"):
        key = f"fp32_{fp32_precision}"
    deadline = time.perf_counter() + seconds_budget
    largest = max_size or _SIZES.get(device.type, _SIZES["cpu"])[2]
    timing = _ladder(device, key, seconds_budget / 8, _start_size(device, key), largest)
    errors = _race([timing], deadline)
    if errors:
        raise RuntimeError(errors[key])
    return timing.gflops


def matmul_rel_error(
    device: str | torch.device,
    dtype: torch.dtype | str,
    *,
    fp32_precision: str | None = None,
    size: int = _ERROR_CHECK_SIZE,
) -> float:
    """Relative error of one matmul against a float64 reference.

    Tells whether "fp32" under a relaxed matmul precision still computes in fp32 (it does on
    oneDNN without AMX; with AMX it may use bf16), and catches a broken BLAS outright.
    """
    device = torch.device(device)
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator)
    b = torch.randn(size, size, generator=generator)
    reference = a.double() @ b.double()
    with float32_matmul_precision(fp32_precision), torch.no_grad():
        result = torch.mm(a.to(device, _as_dtype(dtype)), b.to(device, _as_dtype(dtype)))
        result = result.double().cpu()
    return float((result - reference).norm() / reference.norm())


def _key_setup(key: str) -> tuple[torch.dtype, str]:
    """dtype and fp32 matmul precision for a measurement key like `bf16` or `fp32_medium`."""
    base, _, setting = key.partition("_")
    if base not in _DTYPES or (setting and (base != "fp32" or setting not in _MATMUL_PRECISIONS)):
        raise ValueError(f"unknown matmul measurement {key!r}")
    return _DTYPES[base], setting or "highest"


def device_name(device: str | torch.device) -> str:
    """Human name of a device: the GPU's name, "Apple MPS", or the CPU model."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    return cpu_info()["model"]


def measure_device(
    device: str | torch.device,
    seconds_budget: float = DEFAULT_MEASURE_SECONDS,
    keys: Iterable[str] | None = None,
) -> dict[str, Any]:
    """Measure every precision of `device` (or just `keys`) in about `seconds_budget` in all.

    The first precision (fp32 by default) sets the matrix side; the other fp32 variants use the
    same side, lower precisions at most that side, and all are timed interleaved (`_race`), so
    their ratios are fair. Returns `{"device", "device_name", "fingerprint", "measured_at",
    "seconds", "gflops": {key: peak GFLOP/s}, "speedup": {key: speed relative to plain fp32,
    the figure precision decisions use}, "sizes": {key: n}, "rel_error": {key: float vs float64},
    "errors": {key: message}}`; a precision the device cannot run lands in `errors` rather than
    failing the whole measurement.
    """
    device = torch.device(device)
    wanted = tuple(keys) if keys is not None else MATMUL_KEYS.get(device.type, ("fp32",))
    for key in wanted:
        _key_setup(key)
    began = time.perf_counter()
    deadline = began + seconds_budget
    step_budget = seconds_budget / max(1, len(wanted)) / 8
    result: dict[str, Any] = {
        "device": device.type,
        "device_name": device_name(device),
        "fingerprint": machine_fingerprint(device),
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "gflops": {},
        "speedup": {},
        "sizes": {},
        "rel_error": {},
        "errors": {},
    }
    largest = _SIZES.get(device.type, _SIZES["cpu"])[2]
    reference: int | None = None
    timings: list[_Timing] = []
    for key in wanted:
        try:
            if reference is not None and key.startswith("fp32"):
                start, cap = reference, reference
            else:
                start, cap = _start_size(device, key), reference or largest
            timing = _ladder(device, key, step_budget, start, cap)
            result["rel_error"][key] = matmul_rel_error(
                device, _key_setup(key)[0], fp32_precision=timing.setting
            )
        except _MEASURE_ERRORS as exc:
            result["errors"][key] = _error_text(exc)
            continue
        reference = reference or timing.n
        timings.append(timing)
    result["errors"].update(_race(timings, deadline))
    # Speedups are relative to plain fp32, so only a measurement that timed fp32 first has them.
    speedups = _speedups(timings) if timings and timings[0].key == "fp32" else {}
    result["speedup"] = {key: round(value, 4) for key, value in speedups.items()}
    for timing in timings:
        result["gflops"][timing.key] = round(timing.gflops, 3)
        result["sizes"][timing.key] = timing.n
    result["seconds"] = round(time.perf_counter() - began, 3)
    return result


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """`$MINIGPT_CACHE_DIR`, else `$XDG_CACHE_HOME/minigpt`, else `~/.cache/minigpt`."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "minigpt"


def cache_path() -> Path:
    """The matmul cache file (`matmul.json` in `cache_dir()`)."""
    return cache_dir() / CACHE_FILE


def machine_fingerprint(device: str | torch.device) -> dict[str, Any]:
    """What a measurement depends on; a cached figure is reused only when all of it matches.

    The CPU thread count is part of it because a CPU's matmul peak scales with the threads torch
    uses (the governor's `--max-cpu` changes them).
    """
    device = torch.device(device)
    fingerprint: dict[str, Any] = {
        "device": device.type,
        "device_name": device_name(device),
        "cpu_model": cpu_info()["model"],
        "logical_cores": psutil.cpu_count(logical=True),
        "torch": torch.__version__,
    }
    if device.type == "cpu":
        fingerprint["threads"] = torch.get_num_threads()
    return fingerprint


def fingerprint_key(fingerprint: Mapping[str, Any]) -> str:
    """A stable, readable cache key for a fingerprint."""
    return "|".join(f"{name}={fingerprint[name]}" for name in sorted(fingerprint))


def _read_cache() -> dict[str, Any]:
    """The cache's contents, or an empty cache when the file is missing, unreadable or corrupt."""
    empty: dict[str, Any] = {"version": CACHE_VERSION, "entries": {}}
    try:
        data = json.loads(cache_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return empty
    if (
        not isinstance(data, dict)
        or data.get("version") != CACHE_VERSION
        or not isinstance(data.get("entries"), dict)
    ):
        return empty
    return data


def _valid_entry(entry: Any) -> bool:
    """A cache entry is used only if every figure in it is a positive number."""
    if not isinstance(entry, dict) or not isinstance(entry.get("gflops"), dict):
        return False
    for name in ("gflops", "speedup", "rel_error"):
        figures = entry.get(name, {})
        if not isinstance(figures, dict) or not all(
            isinstance(value, int | float) and not isinstance(value, bool) and value >= 0
            for value in figures.values()
        ):
            return False
    return all(value > 0 for value in entry["gflops"].values())


def load_measurements(device: str | torch.device) -> dict[str, Any] | None:
    """The cached measurements for this machine and device, or None (nothing measures here)."""
    entry = _read_cache()["entries"].get(fingerprint_key(machine_fingerprint(device)))
    return entry if _valid_entry(entry) else None


def store_measurements(measurements: Mapping[str, Any]) -> bool:
    """Write measurements into the cache atomically; False (and no exception) when unwritable.

    Entries of other fingerprints are kept; a corrupt file is replaced. An unwritable cache only
    costs a re-measurement later, so it must never stop a training run.
    """
    cache = _read_cache()
    key = fingerprint_key(measurements["fingerprint"])
    entry = dict(measurements)
    # A peak is the best this machine has shown: a measurement taken while other programs were
    # busy must not lower it, or MFU (tokens/s over the peak) would read above 100 %.
    previous = cache["entries"].get(key)
    peaks = dict(previous.get("peak_gflops", {})) if isinstance(previous, dict) else {}
    for name, value in entry.get("gflops", {}).items():
        if isinstance(value, int | float) and value > peaks.get(name, 0):
            peaks[name] = value
    entry["peak_gflops"] = peaks
    cache["entries"][key] = entry
    try:
        atomic_write_text(cache_path(), json.dumps(cache, indent=2, sort_keys=True) + "\n")
    except OSError:
        return False
    return True


def _merge(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> dict[str, Any]:
    if old is None:
        return dict(new)
    merged = dict(new)
    for name in ("gflops", "speedup", "sizes", "rel_error", "errors"):
        merged[name] = {**old.get(name, {}), **new.get(name, {})}
    for key in new.get("gflops", {}):
        merged["errors"].pop(key, None)
    return merged


def cached_measurements(
    device: str | torch.device,
    *,
    keys: Iterable[str] | None = None,
    refresh: bool = False,
    seconds_budget: float = DEFAULT_MEASURE_SECONDS,
) -> dict[str, Any]:
    """Measurements for `device` from the cache, measuring (and caching) whatever is missing.

    `refresh=True` measures everything anew, as `doctor` does each time it runs.
    """
    device = torch.device(device)
    all_keys = MATMUL_KEYS.get(device.type, ("fp32",))
    wanted = tuple(keys) if keys is not None else all_keys
    cached = None if refresh else load_measurements(device)
    missing = [key for key in wanted if cached is None or key not in cached["gflops"]]
    if not missing:
        assert cached is not None
        return cached
    budget = seconds_budget * len(missing) / max(1, len(all_keys))
    merged = _merge(cached, measure_device(device, budget, keys=missing))
    store_measurements(merged)
    return merged


def speed_ratio(measurements: Mapping[str, Any] | None, key: str) -> float | None:
    """Speed of precision `key` relative to plain fp32, or None when not measured.

    Prefers the interleaved median ratio (`speedup`, robust on a busy machine) and falls back to
    the ratio of peaks for precisions measured on their own.
    """
    if not measurements:
        return None
    speedup = measurements.get("speedup", {}).get(key)
    if speedup:
        return float(speedup)
    gflops = measurements.get("gflops", {})
    base, value = gflops.get("fp32"), gflops.get(key)
    if not base or value is None:
        return None
    return float(value) / float(base)


def precision_key(device: str | torch.device, precision: Any) -> str:
    """Measurement key for a precision: "bf16", "fp16", "fp32", or "fp32_medium"/"fp32_high".

    A bare "fp32" follows the fp32 matmul precision currently set in torch, so the Trainer gets the
    peak of the path its matmuls really take. A `PrecisionDecision` (anything with `peak_key`)
    answers for itself.
    """
    key = getattr(precision, "peak_key", None)
    if isinstance(key, str):
        return key
    name = str(precision)
    if name == "fp32":
        setting = torch.get_float32_matmul_precision()
        return "fp32" if setting == "highest" else f"fp32_{setting}"
    _key_setup(name)
    return name


def peak_flops(device: str | torch.device, precision: Any) -> float:
    """Matmul peak in FLOP/s for `precision` on `device`: the denominator of MFU.

    Read from the cache; measured (about half a second) and cached when missing.
    Raises RuntimeError when the device cannot run that precision at all.
    """
    key = precision_key(device, precision)
    measurements = cached_measurements(device, keys=(key,))
    gflops = measurements.get("peak_gflops", {}).get(key) or measurements["gflops"].get(key)
    if not gflops:
        reason = measurements.get("errors", {}).get(key, "no measurement")
        raise RuntimeError(f"cannot measure {key} matmul on {torch.device(device)}: {reason}")
    return float(gflops) * 1e9


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One line of doctor's verdict: `status` is pass, warn or fail."""

    status: CheckStatus
    name: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def version_tuple(text: str) -> tuple[int, ...]:
    """(2, 13, 0) from "2.13.0+cpu" or "2.5.0a0+git..."; leading numeric parts only."""
    parts: list[int] = []
    for piece in re.split(r"[.+]", text):
        match = re.match(r"\d+", piece)
        if not match:
            break
        parts.append(int(match.group()))
        if match.group() != piece:
            break
    return tuple(parts)


def format_bytes(count: float) -> str:
    """Decimal units, as `--max-memory 1.5GB` reads them."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count / 1e3:.0f} kB"


def format_gflops(value: float) -> str:
    """GFLOP/s with sensible digits: 950 / 47.3 / 0.91."""
    if value >= 100:
        return f"{value:.0f} GFLOP/s"
    if value >= 10:
        return f"{value:.1f} GFLOP/s"
    return f"{value:.2g} GFLOP/s"


def format_ratio(value: float) -> str:
    return f"{value:.1f}x" if value >= 0.1 else f"{value:.2g}x"


def _check_python(facts: Mapping[str, Any]) -> Check:
    version = facts["python"]["version"]
    if version_tuple(version) >= MIN_PYTHON:
        return Check("pass", "python", f"Python {version}")
    needed = ".".join(map(str, MIN_PYTHON))
    return Check("fail", "python", f"Python {version} is too old: minigpt needs {needed} or newer")


def _check_torch(facts: Mapping[str, Any]) -> Check:
    build = facts["torch"]
    kind = (
        f"CUDA {build['cuda']} build"
        if build.get("cuda")
        else (f"ROCm {build['hip']} build" if build.get("hip") else "CPU build")
    )
    if version_tuple(build["version"]) >= MIN_TORCH:
        return Check("pass", "torch", f"torch {build['version']} ({kind})")
    needed = ".".join(map(str, MIN_TORCH))
    return Check("fail", "torch", f"torch {build['version']} is too old: install torch>={needed}")


def _check_memory(facts: Mapping[str, Any]) -> Check:
    total = facts["memory"]["total_bytes"]
    available = facts["memory"]["available_bytes"]
    text = f"{format_bytes(available)} available of {format_bytes(total)}"
    if available < LOW_MEMORY_BYTES:
        return Check(
            "warn",
            "memory",
            f"only {text}: close other programs, or train the tiny preset with --max-memory",
        )
    return Check("pass", "memory", f"{text} RAM")


def _check_disk(facts: Mapping[str, Any]) -> Check:
    disk = facts["disk"]
    where = disk["checked_path"]
    if disk.get("not_a_directory"):
        return Check("fail", "disk", f"{disk['runs_dir']} exists and is not a directory")
    if not disk["writable"]:
        return Check("fail", "disk", f"cannot write to {where}: runs could not be saved there")
    free = format_bytes(disk["free_bytes"])
    if disk["free_bytes"] < LOW_DISK_BYTES:
        return Check(
            "warn", "disk", f"only {free} free at {where}: checkpoints of larger runs may not fit"
        )
    return Check("pass", "disk", f"{free} free at {where}")


def _check_accelerator(facts: Mapping[str, Any]) -> Check:
    cuda = facts["accelerators"]["cuda"]
    mps = facts["accelerators"]["mps"]
    if cuda["available"] and cuda["devices"]:
        names = ", ".join(
            f"{d['name']} ({format_bytes(d['total_memory_bytes'])}, sm{d['compute_capability']})"
            for d in cuda["devices"]
        )
        return Check("pass", "accelerator", f"CUDA: {names}")
    if mps["available"]:
        return Check("pass", "accelerator", "Apple MPS available")
    if cuda["driver"] and not cuda["built"]:
        return Check(
            "warn",
            "accelerator",
            "an NVIDIA driver is installed but this torch is a CPU-only build: "
            "install a CUDA build of torch to train on the GPU",
        )
    return Check(
        "pass",
        "accelerator",
        "CPU only (no CUDA or MPS): fine for the tiny and small presets",
    )


def _check_matmul(measurements: Mapping[str, Any]) -> Check:
    gflops = measurements.get("gflops", {})
    where = f"{measurements.get('device', 'cpu')}"
    error = measurements.get("rel_error", {}).get("fp32")
    if error is not None and error > FP32_LEVEL_ERROR:
        return Check(
            "fail",
            "matmul",
            f"fp32 matmul on {where} is wrong (relative error {error:.1e}): "
            "the BLAS library or driver is broken",
        )
    if "fp32" not in gflops:
        reason = measurements.get("errors", {}).get("fp32", "not measured")
        return Check("fail", "matmul", f"fp32 matmul on {where} failed: {reason}")
    figures = ", ".join(
        f"{MATMUL_LABELS.get(key, key)} {format_gflops(value)}" for key, value in gflops.items()
    )
    return Check("pass", "matmul", f"{where}: {figures}")


def _check_bf16(facts: Mapping[str, Any], measurements: Mapping[str, Any] | None) -> Check:
    measured_on = (measurements or {}).get("device", "cpu")
    cuda = facts["accelerators"]["cuda"]
    if measured_on == "cuda" and cuda["devices"]:
        first = cuda["devices"][0]
        if first["bf16"]:
            return Check(
                "pass",
                "bf16",
                f"{first['name']} (sm{first['compute_capability']}) has native bf16: "
                "training uses bf16 autocast",
            )
        return Check(
            "warn",
            "bf16",
            f"{first['name']} (sm{first['compute_capability']}) has no native bf16 (needs sm80+): "
            "training uses fp16 with a gradient scaler",
        )
    if measured_on == "mps":
        return Check("pass", "bf16", "Apple MPS trains in fp32 (the safe choice there)")
    hardware = bf16_hardware(facts["cpu"]["features"])
    ratio = speed_ratio(measurements, "bf16")
    if ratio is not None and ratio >= BF16_MIN_SPEEDUP:
        return Check(
            "pass",
            "bf16",
            f"bf16 fast path ({hardware or 'measured'}): bf16 matmul {format_ratio(ratio)} fp32, "
            "so training uses bf16 autocast",
        )
    if ratio is not None:
        what = (
            f"the CPU reports {hardware} but bf16 matmul measured only {format_ratio(ratio)} fp32"
            if hardware
            else f"no AVX512-BF16 or AMX: bf16 matmul measured {format_ratio(ratio)} fp32"
        )
        return Check("warn", "bf16", f"{what}; training stays in fp32 (--precision bf16 is slow)")
    if hardware:
        return Check("pass", "bf16", f"bf16 fast path: {hardware} (not measured)")
    return Check(
        "warn", "bf16", "no AVX512-BF16 or AMX: bf16 would be slow here, training uses fp32"
    )


def _check_threads(facts: Mapping[str, Any]) -> Check:
    cpu = facts["cpu"]
    threads = cpu["torch_threads"]
    physical = cpu["physical_cores"]
    usable = cpu["usable_cores"] or cpu["logical_cores"]
    cores = f"{physical} physical" if physical else "?"
    cores += f" / {cpu['logical_cores']} logical cores"
    if usable and usable < (cpu["logical_cores"] or usable):
        cores += f" ({usable} usable by this process)"
    if usable and threads > usable:
        return Check(
            "warn",
            "threads",
            f"torch uses {threads} threads on {cores}: oversubscribed, which slows training "
            f"(set OMP_NUM_THREADS={min(usable, physical or usable)})",
        )
    limit = min(x for x in (physical, usable) if x) if (physical or usable) else None
    if limit and threads < limit:
        env = ", ".join(f"{k}={v}" for k, v in cpu["thread_env"].items() if v)
        why = f" ({env})" if env else ""
        return Check(
            "warn",
            "threads",
            f"torch uses {threads} threads on {cores}{why}: training will not use the whole CPU",
        )
    return Check("pass", "threads", f"torch uses {threads} threads on {cores}")


def _check_load(facts: Mapping[str, Any]) -> Check | None:
    load = facts["cpu"].get("load_average")
    cores = facts["cpu"]["logical_cores"] or 1
    if load is None:
        return None
    text = f"load {load:.1f} on {cores} logical cores"
    if load >= max(1.0, cores / 2):
        return Check(
            "warn",
            "load",
            f"the CPU is busy ({text}): other programs slow training down, and the speeds "
            "measured now are below this machine's peak",
        )
    return Check("pass", "load", f"the CPU is mostly idle ({text})")


def run_checks(
    facts: Mapping[str, Any], measurements: Mapping[str, Any] | None = None
) -> list[Check]:
    """Pass / warn / fail verdicts. Fail only what stops minigpt from working at all.

    Missing accelerators never fail (CPU training is the point); low memory or disk warn, since
    they are transient or workable with caps; too-old Python/torch, an unwritable runs directory
    or a matmul giving wrong answers fail.
    """
    checks = [
        _check_python(facts),
        _check_torch(facts),
        _check_memory(facts),
        _check_disk(facts),
        _check_accelerator(facts),
    ]
    if measurements is not None:
        checks.append(_check_matmul(measurements))
    checks.append(_check_bf16(facts, measurements))
    checks.append(_check_threads(facts))
    load = _check_load(facts)
    if load is not None:
        checks.append(load)
    return checks


def exit_status(checks: Iterable[Check]) -> int:
    """Exit status of `minigpt doctor`: 1 when any check failed, else 0 (warnings included)."""
    return 1 if any(check.status == "fail" for check in checks) else 0


def diagnose(
    runs_dir: str | Path | None = None,
    *,
    seconds_budget: float = DEFAULT_MEASURE_SECONDS,
    on_event: EventCallback | None = None,
    recommend: bool = True,
    max_memory: str | float | None = None,
    max_cpu: float | None = None,
    budget_seconds: float = DEFAULT_BUDGET_SECONDS,
) -> dict[str, Any]:
    """The whole doctor report: facts, fresh measurements (cached for MFU), checks, precision,
    and (unless `recommend` is False) the preset recommendation for the caps and time budget.

    Measures on the device `auto` would train on, so the report says what a run would really get.
    """
    from minigpt_cli.engine.hardware.device import resolve_device, resolve_precision

    facts = collect_facts(runs_dir)
    device = resolve_device("auto")
    emit(on_event, "note", "doctor", message=f"measuring matmul speed on {device}")
    measurements = cached_measurements(device, refresh=True, seconds_budget=seconds_budget)
    decision = resolve_precision(
        "auto", device, measurements=measurements, cpu_features=facts["cpu"]["features"]
    )
    checks = run_checks(facts, measurements)
    report: dict[str, Any] = {
        "minigpt_version": __version__,
        "facts": facts,
        "measurements": measurements,
        "checks": [check.to_dict() for check in checks],
        "precision": {"device": str(device), **decision.to_dict()},
        "exit_status": exit_status(checks),
    }
    if recommend:
        report["recommendation"] = recommend_preset(
            max_memory,
            max_cpu,
            budget_seconds,
            device=device,
            precision=decision,
            on_event=on_event,
        )
    return report


# --------------------------------------------------------------------------------------------
# Recommendation: the largest preset whose default run fits the caps and the time budget
# --------------------------------------------------------------------------------------------

BUILTIN_BYTES_PER_TOKEN = 3.85
"""UTF-8 bytes per token of the built-in pretraining corpus, end-of-text tokens included: the
lower end of what `pretrain` measures on it (3.90 with the tiny preset's 5,000-token tokenizer,
3.95 with small's 10,000 and medium's 16,000; the synthetic corpus saturates a larger vocabulary).
Counting the tokens exactly means training the tokenizer; the estimate only sizes the token
buffer (4 bytes per token, a few MB beside hundreds for the model), so a ratio a little low,
counting a few more tokens than there are, keeps the memory estimate on the safe side.
`tests/test_doctor.py` trains the tiny tokenizer and checks the ratio still holds."""

MIN_TIMING_SECONDS = 0.2
"""Each timed part (a micro-batch's forward + backward, the optimizer update, a validation
forward) is repeated until its repeats add up to this (at most MAX_TIMING_REPEATS times), then
the median counts: one repeat on a CPU for anything but tiny, several on a GPU."""
MAX_TIMING_REPEATS = 5

NOT_COUNTED = (
    "start-up and data preparation (built-in text, tokenizer training, encoding: seconds)",
    "checkpoint saves (disk speed)",
)
"""What the time estimate leaves out: the figures that are not measured here. Every other part of
a run is timed: the optimizer steps and the validation passes."""


@functools.lru_cache(maxsize=4)
def builtin_corpus_bytes(builtin_size: int) -> int:
    """UTF-8 bytes of the built-in pretraining corpus `pretrain` generates at this size."""
    from minigpt_cli.datasets.builtin import pretrain_records
    from minigpt_cli.engine.stages.pretrain import BUILTIN_DATA_SEED

    records = pretrain_records(builtin_size, seed=BUILTIN_DATA_SEED)
    return sum(len(record["text"].encode("utf-8")) for record in records)


def builtin_token_estimate(config: Any) -> int:
    """Tokens `pretrain` will make of the built-in corpus with this config (slightly above)."""
    return math.ceil(builtin_corpus_bytes(config.data.builtin_size) / BUILTIN_BYTES_PER_TOKEN)


def builtin_data_bytes(config: Any) -> int:
    """The `data_bytes` `pretrain` passes to the memory plan on built-in data: 4 bytes a token
    (int32 ids), training and validation together."""
    return 4 * builtin_token_estimate(config)


@dataclass(frozen=True)
class StepTiming:
    """Measured seconds of the parts of a training step, wall clock and process CPU time.

    CPU time is kept beside wall time because a fractional `--max-cpu` cap is held by sleeping
    until CPU time / wall time is under the cap (`governor.CpuThrottle`): the wall time a capped
    run takes follows from both.
    """

    micro_step: float
    micro_step_cpu: float
    optimizer: float
    optimizer_cpu: float
    eval_forward: float
    eval_forward_cpu: float
    source: str = "measured"

    def to_dict(self) -> dict[str, float]:
        return {name: value for name, value in asdict(self).items() if name != "source"}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str) -> StepTiming | None:
        """The cached timing, or None when any figure is missing or not a positive number."""
        names = [name for name in cls.__dataclass_fields__ if name != "source"]
        values = [data.get(name) for name in names]
        if not all(
            isinstance(value, int | float) and not isinstance(value, bool) and value > 0
            for value in values
        ):
            return None
        return cls(*(float(value) for value in values), source=source)  # type: ignore[arg-type]


def _timed(fn: Any, device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of `fn()`, the device's queue drained on both sides."""
    _synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    _synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def _median_times(samples: list[tuple[float, float]]) -> tuple[float, float]:
    return (
        statistics.median(wall for wall, _ in samples),
        statistics.median(cpu for _, cpu in samples),
    )


def measure_training_step(
    model_cfg: Any,
    vocab_size: int,
    train: Any,
    micro_batch_size: int,
    eval_batch: int,
    *,
    device: str | torch.device,
    precision: Any,
) -> StepTiming:
    """Time a real training step of `GPT(model_cfg, vocab_size)` as the Trainer runs it.

    The same model, AdamW (`trainer.build_optimizer`), autocast, gradient scaler, matmul precision
    and clipping as a run on this device; random token ids (speed does not depend on them). One
    whole warm-up step first (lazy initialisation, kernel selection, AdamW's state), then cycles
    of one micro-batch's forward + backward and one optimizer update, and last a validation
    forward of `eval_batch` sequences without gradients; the median of each part counts. Runs
    with torch's current thread count; the global RNG and the fp32 matmul precision are left as
    they were.
    """
    device = torch.device(device)
    micro, update, evaluation = _step_samples(
        model_cfg, vocab_size, train, micro_batch_size, eval_batch, device, precision
    )
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the model is gone: the next preset gets its memory back
    return StepTiming(*_median_times(micro), *_median_times(update), *_median_times(evaluation))


def _repeat_timed(fn: Any, device: torch.device) -> list[tuple[float, float]]:
    """`_timed(fn)` until the repeats add up to MIN_TIMING_SECONDS (at most MAX_TIMING_REPEATS)."""
    samples = [_timed(fn, device)]
    while len(samples) < MAX_TIMING_REPEATS and sum(w for w, _ in samples) < MIN_TIMING_SECONDS:
        samples.append(_timed(fn, device))
    return samples


def _step_samples(
    model_cfg: Any,
    vocab_size: int,
    train: Any,
    micro_batch_size: int,
    eval_batch: int,
    device: torch.device,
    precision: Any,
) -> tuple[list[tuple[float, float]], list[tuple[float, float]], list[tuple[float, float]]]:
    """(wall, CPU) samples of a micro-step, an optimizer update and a validation forward."""
    from minigpt_cli.engine.hardware.device import autocast_context
    from minigpt_cli.engine.model.gpt import GPT
    from minigpt_cli.engine.training.trainer import build_optimizer

    fork = [device.index or 0] if device.type == "cuda" else []
    seq = model_cfg.context_length
    with (
        torch.random.fork_rng(devices=fork),
        float32_matmul_precision(precision.fp32_matmul_precision),
    ):
        torch.manual_seed(0)
        model = GPT(model_cfg, vocab_size).to(device).train()
        optimizer, _ = build_optimizer(model, train, device)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        scaler = torch.amp.GradScaler(device.type) if precision.use_grad_scaler else None
        ids = torch.randint(0, vocab_size, (max(micro_batch_size, eval_batch), seq + 1))
        ids = ids.to(device)
        inputs, targets = ids[:micro_batch_size, :-1], ids[:micro_batch_size, 1:]
        eval_inputs, eval_targets = ids[:eval_batch, :-1], ids[:eval_batch, 1:]

        def micro_step() -> None:
            with autocast_context(precision, device):
                _, loss = model(inputs, targets=targets, reduction="sum")
            scaled = loss / targets.numel()
            (scaler.scale(scaled) if scaler is not None else scaled).backward()

        def update() -> None:
            if scaler is not None:
                scaler.unscale_(optimizer)
            if train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, train.grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def eval_forward() -> None:
            with torch.no_grad(), autocast_context(precision, device):
                model(eval_inputs, targets=eval_targets, reduction="sum")

        micro_step()  # the warm-up step
        update()
        micro_samples: list[tuple[float, float]] = []
        update_samples: list[tuple[float, float]] = []
        # Alternate so every update has a micro-batch's gradients to apply, as in training.
        while len(micro_samples) < MAX_TIMING_REPEATS and (
            not micro_samples or sum(w for w, _ in micro_samples) < MIN_TIMING_SECONDS
        ):
            micro_samples.append(_timed(micro_step, device))
            update_samples.append(_timed(update, device))
        model.eval()
        if device.type != "cpu":
            eval_forward()  # a GPU picks kernels per shape on first use
        return micro_samples, update_samples, _repeat_timed(eval_forward, device)


def _speed_key(
    model_cfg: Any,
    vocab_size: int,
    micro_batch_size: int,
    eval_batch: int,
    device: torch.device,
    precision: Any,
) -> str:
    """What a step's speed depends on: the machine (device, threads, torch: the fingerprint), the
    precision, the model's shape, and the batch shapes timed."""
    return fingerprint_key(
        {
            **machine_fingerprint(device),
            "precision": precision.dtype_name,
            "matmul_precision": precision.fp32_matmul_precision,
            "model": json.dumps(model_cfg.model_dump(), sort_keys=True),
            "vocab": vocab_size,
            "micro_batch": micro_batch_size,
            "eval_batch": eval_batch,
        }
    )


def training_step_timing(
    model_cfg: Any,
    vocab_size: int,
    train: Any,
    micro_batch_size: int,
    eval_batch: int,
    *,
    device: str | torch.device,
    precision: Any,
) -> StepTiming:
    """`measure_training_step`, read from doctor's cache when this exact case was timed before.

    A new measurement is written to the cache (`training_speed` beside the matmul entries); an
    unwritable cache only costs measuring again next time.
    """
    device = torch.device(device)
    key = _speed_key(model_cfg, vocab_size, micro_batch_size, eval_batch, device, precision)
    cache = _read_cache()
    section = cache.get(SPEED_CACHE_SECTION)
    cached = section.get(key) if isinstance(section, dict) else None
    if isinstance(cached, dict):
        timing = StepTiming.from_dict(cached, source="cached")
        if timing is not None:
            return timing
    timing = measure_training_step(
        model_cfg,
        vocab_size,
        train,
        micro_batch_size,
        eval_batch,
        device=device,
        precision=precision,
    )
    cache = _read_cache()
    if not isinstance(cache.get(SPEED_CACHE_SECTION), dict):
        cache[SPEED_CACHE_SECTION] = {}
    cache[SPEED_CACHE_SECTION][key] = {
        **timing.to_dict(),
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    with contextlib.suppress(OSError):
        atomic_write_text(cache_path(), json.dumps(cache, indent=2, sort_keys=True) + "\n")
    return timing


@contextlib.contextmanager
def capped_threads(max_cpu_pct: float) -> Iterator[tuple[int, str]]:
    """Torch's threads as `pretrain --max-cpu` would set them (`monitor.configure_threads`, the
    same function), restored afterwards so doctor's own checks and a test process are unchanged.
    Yields (thread count, why)."""
    from minigpt_cli.engine.hardware import monitor

    previous = torch.get_num_threads()
    previous_budget = getattr(monitor, "_thread_budget", None)
    try:
        yield monitor.configure_threads(max_cpu_pct)
    finally:
        torch.set_num_threads(previous)
        if hasattr(monitor, "_thread_budget"):
            monitor._thread_budget = previous_budget


def throttled_seconds(wall: float, cpu: float, max_cpu_pct: float) -> float:
    """Wall seconds a piece of work takes under `--max-cpu`: the governor's throttle sleeps until
    CPU time / wall time is at most the capped cores (`governor.CpuThrottle`), and is off when
    the cap covers every core."""
    cores = psutil.cpu_count(logical=True) or 1
    cap_cores = cores * max_cpu_pct / 100
    if cap_cores >= (os.cpu_count() or 1):
        return wall
    return max(wall, cpu / cap_cores)


def format_duration(seconds: float) -> str:
    """45s, 2m 31s, 30m, 1h 32m, 3d 4h: two units at most, a zero second unit left out."""
    total = max(0, round(seconds))
    if total < 60:
        return f"{total}s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s" if secs else f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {minutes:02d}m" if minutes else f"{hours}h"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h" if hours else f"{days}d"


class _EpochStub:
    """What `trainer.plan_steps` needs of a stage: the windows in one epoch of training data."""

    def __init__(self, windows: int) -> None:
        self.windows = windows

    def sequences_per_epoch(self) -> int:
        return self.windows


def _run_shape(config: Any) -> dict[str, int]:
    """Steps, tokens and validation work of the preset's default run on built-in data, as
    `pretrain` lays it out (`load_tokens` split, `PretrainStage` windows, `plan_steps`)."""
    from minigpt_cli.engine.training.trainer import plan_steps

    train = config.stage_train("pretrain")
    seq = config.model.context_length
    tokens = builtin_token_estimate(config)
    split = int(tokens * (1 - config.data.val_fraction))
    train_windows = max(1, (split - 1) // seq)
    val_windows = max(1, (tokens - split - 1) // seq)
    steps = plan_steps(
        train, train.global_batch_size * seq, train.global_batch_size, _EpochStub(train_windows)
    )  # type: ignore[arg-type]
    evals = steps // train.eval_every + (1 if steps % train.eval_every else 0)
    return {
        "steps": steps,
        "tokens": steps * train.global_batch_size * seq,
        "evals": evals,
        "eval_sequences": min(val_windows, train.eval_batches * train.micro_batch_size),
        "data_tokens": tokens,
    }


def _memory_text(value: str | float) -> str:
    return f"{value:g}" if isinstance(value, int | float) else str(value)


def recommend_preset(
    max_memory: str | float | None = None,
    max_cpu: float | None = None,
    budget_seconds: float = DEFAULT_BUDGET_SECONDS,
    *,
    device: str | torch.device,
    precision: Any,
    presets: Iterable[str] | None = None,
    on_event: EventCallback | None = None,
) -> dict[str, Any]:
    """The largest preset whose default `pretrain` run fits the caps and finishes in the budget.

    For each preset, smallest first: the memory plan `pretrain` would make under `max_memory`
    (`estimate.plan_micro_batch`, the same function, on the built-in corpus), then the measured
    speed of a training step at the planned micro-batch with the threads `max_cpu` gives (cached),
    and the run's time: its optimizer steps and validation passes at that speed, the CPU cap's
    duty cycle included. Once a preset does not fit or would not finish in time, larger ones are
    not timed (they only need more memory and time); their memory is still shown. Returns a
    JSON-ready dict: the caps, one row per preset, `preset`/`command` of the recommendation (None
    when nothing qualifies) and `advice`, one line on what to change or what was chosen.
    """
    from minigpt_cli.config import PRESETS
    from minigpt_cli.config.loader import load_config
    from minigpt_cli.config.params import count_parameters
    from minigpt_cli.config.schema import parse_memory
    from minigpt_cli.engine.hardware.monitor import physical_memory_bytes
    from minigpt_cli.engine.resources.estimate import plan_micro_batch

    device = torch.device(device)
    overrides: dict[str, Any] = {}
    if max_memory is not None:
        overrides["resources.max_memory"] = max_memory
    if max_cpu is not None:
        overrides["resources.max_cpu"] = max_cpu
    configs = [(name, load_config(name, None, overrides)) for name in (presets or PRESETS)]
    configs.sort(key=lambda item: count_parameters(item[1].model, item[1].tokenizer.vocab_size))
    resources = configs[0][1].resources
    cap = parse_memory(resources.max_memory, physical_memory_bytes())
    rows: list[dict[str, Any]] = []
    stopped: str | None = None
    with capped_threads(resources.max_cpu) as (threads, thread_reason):
        for name, config in configs:
            vocab = config.tokenizer.vocab_size
            train = config.stage_train("pretrain")
            shape = _run_shape(config)
            plan = plan_micro_batch(
                config, vocab, precision.dtype_name, 4 * shape["data_tokens"], cap
            )
            row: dict[str, Any] = {
                "preset": name,
                "parameters": count_parameters(config.model, vocab),
                "fits": plan.fits,
                "micro_batch_size": plan.micro_batch_size if plan.fits else None,
                "configured_micro_batch_size": plan.configured_micro_batch_size,
                "activation_checkpointing": plan.activation_checkpointing if plan.fits else None,
                "peak_bytes": plan.estimate.total,
                "cap_bytes": cap,
                "steps": shape["steps"],
                "tokens": shape["tokens"],
                "tokens_per_sec": None,
                "seconds": None,
                "within_budget": None,
                "speed_source": None,
                "note": "",
            }
            rows.append(row)
            if not plan.fits:
                row["note"] = "does not fit, even at micro-batch 1 with activation checkpointing"
                stopped = stopped or f"{name} does not fit"
                continue
            if stopped:
                row["note"] = f"not timed: {stopped}"
                continue
            eval_batch = min(8, plan.micro_batch_size)  # PretrainStage.eval_batch
            model_cfg = config.model.model_copy(
                update={"activation_checkpointing": plan.activation_checkpointing}
            )
            emit(
                on_event,
                "note",
                "doctor",
                message=f"timing a {name} training step (micro-batch {plan.micro_batch_size}, "
                f"{threads} threads, {precision.dtype_name} on {device})",
            )
            try:
                timing = training_step_timing(
                    model_cfg,
                    vocab,
                    train,
                    plan.micro_batch_size,
                    eval_batch,
                    device=device,
                    precision=precision,
                )
            except (RuntimeError, MemoryError) as error:  # a GPU out of memory, a missing kernel
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                row["note"] = f"a training step failed: {_error_text(error)}"
                stopped = f"{name} could not be timed"
                continue
            accumulation = train.global_batch_size // plan.micro_batch_size
            step = accumulation * throttled_seconds(
                timing.micro_step, timing.micro_step_cpu, resources.max_cpu
            ) + throttled_seconds(timing.optimizer, timing.optimizer_cpu, resources.max_cpu)
            forward = throttled_seconds(
                timing.eval_forward, timing.eval_forward_cpu, resources.max_cpu
            )
            validation = shape["evals"] * math.ceil(shape["eval_sequences"] / eval_batch) * forward
            seconds = shape["steps"] * step + validation
            row.update(
                tokens_per_sec=round(
                    train.global_batch_size * config.model.context_length / step, 1
                ),
                seconds=round(seconds, 1),
                within_budget=seconds <= budget_seconds,
                speed_source=timing.source,
            )
            if not row["within_budget"]:
                stopped = f"{name} is over the budget, larger presets take longer"
    chosen = next((row for row in reversed(rows) if row["fits"] and row["within_budget"]), None)
    flags = f"--max-memory {_memory_text(resources.max_memory)}"
    if max_cpu is not None:
        flags += f" --max-cpu {max_cpu:g}"
    command = f"minigpt pretrain --preset {chosen['preset']} {flags}" if chosen else None
    return {
        "max_memory": _memory_text(resources.max_memory),
        "cap_bytes": cap,
        "max_cpu": resources.max_cpu,
        "threads": threads,
        "thread_reason": thread_reason,
        "budget_seconds": budget_seconds,
        "device": str(device),
        "precision": precision.dtype_name,
        "presets": rows,
        "preset": chosen["preset"] if chosen else None,
        "command": command,
        "advice": _advice(rows, chosen, budget_seconds, resources.max_cpu),
        "not_counted": list(NOT_COUNTED),
    }


def _advice(
    rows: list[dict[str, Any]],
    chosen: dict[str, Any] | None,
    budget_seconds: float,
    max_cpu: float,
) -> str:
    """One line: why the recommendation is what it is, or what to change when there is none."""
    budget = format_duration(budget_seconds)
    if chosen is not None:
        index = rows.index(chosen)
        if index + 1 < len(rows):
            larger = rows[index + 1]
            if not larger["fits"]:
                why = "does not fit under the memory cap"
            elif larger["seconds"] is not None:
                needs = format_duration(larger["seconds"])
                why = f"would take about {needs}, over the {budget} budget"
            else:
                why = f"was not timed ({larger['note']})"
            return (
                f"{chosen['preset']} is the largest preset that fits and finishes within "
                f"{budget}; {larger['preset']} {why}"
            )
        return f"{chosen['preset']} is the largest preset; it fits and finishes within {budget}"
    smallest = rows[0]
    if not smallest["fits"]:
        need = math.ceil(smallest["peak_bytes"] / 2**20)
        return (
            f"nothing fits: even {smallest['preset']} at micro-batch 1 with activation "
            f"checkpointing needs about {need:,} MB, over the "
            f"{smallest['cap_bytes'] / 2**20:,.0f} MB cap; raise it, e.g. --max-memory {need}MiB"
        )
    needed = format_duration(smallest["seconds"])
    more_cpu = "" if max_cpu >= 100 else ", raise --max-cpu"
    minutes = math.ceil(smallest["seconds"] / 60)
    return (
        f"nothing finishes within {budget}: {smallest['preset']} needs about {needed} here; "
        f"raise --budget (e.g. --budget {minutes}m){more_cpu}, or train fewer steps "
        f"(minigpt pretrain --preset {smallest['preset']} --max-steps N)"
    )
