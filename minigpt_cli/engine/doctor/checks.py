"""`minigpt doctor`'s verdict: facts and measurements turned into pass / warn / fail lines.

`run_doctor` is the verb's one entry point: it collects the facts (`hardware.facts`), measures the
matmul speeds afresh (`hardware.speed_cache`, which keeps them for the Trainer's MFU), runs the
checks, says which precision `auto` picks and asks `recommend` for a preset. Lacking an
accelerator is never a failure: minigpt is built to train on a laptop CPU. The engine never
prints; the report is one JSON-ready dict that the CLI renders.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from minigpt_cli import __version__
from minigpt_cli.engine.core.events import EventCallback, emit
from minigpt_cli.engine.core.units import format_bytes, format_gflops, format_ratio
from minigpt_cli.engine.doctor.recommend import DEFAULT_BUDGET_SECONDS, recommend_preset
from minigpt_cli.engine.hardware.device import BF16_MIN_SPEEDUP, resolve_device, resolve_precision
from minigpt_cli.engine.hardware.facts import bf16_hardware, collect_facts
from minigpt_cli.engine.hardware.matmul import (
    DEFAULT_MEASURE_SECONDS,
    FP32_LEVEL_ERROR,
    MATMUL_LABELS,
)
from minigpt_cli.engine.hardware.speed_cache import cached_measurements, speed_ratio

MIN_PYTHON = (3, 11)
MIN_TORCH = (2, 4)
LOW_MEMORY_BYTES = 2 * 10**9
LOW_DISK_BYTES = 2 * 10**9

CheckStatus = Literal["pass", "warn", "fail"]


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


def run_doctor(
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
