"""What this machine is: OS, Python, torch build, accelerators, cores, memory, disk, CPU features.

`collect_facts` gathers it all at once (JSON-ready), so a bug report carries everything. Two of
its parts decide things elsewhere: the CPU features that make bf16 fast (`cpu_info`,
`bf16_hardware`) feed `device.resolve_precision`, and `machine_fingerprint` names what a speed
measurement depends on, so `speed_cache` reuses a figure only on the machine that measured it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil
import torch

from minigpt_cli import __version__

# CPU feature flags that matter for training speed, as /proc/cpuinfo names them.
CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "arm_bf16")
_MACOS_FEATURE_KEYS = {
    "hw.optional.avx2_0": "avx2",
    "hw.optional.avx512f": "avx512f",
    "hw.optional.arm.FEAT_BF16": "arm_bf16",
}


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


def device_name(device: str | torch.device) -> str:
    """Human name of a device: the GPU's name, "Apple MPS", or the CPU model."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    return cpu_info()["model"]


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
