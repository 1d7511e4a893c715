"""Measured speeds kept per machine, so a training run does not pay for measuring them again.

One JSON file (`matmul.json` in `cache_dir()`) holds the matmul measurements, one entry per
machine fingerprint (`facts.machine_fingerprint`: device, CPU, cores, torch, threads), and beside
them the training-step timings `doctor` recommends presets from (`training.step_timing`). A
missing, unreadable or corrupt file only means measuring again; an unwritable one never stops a
run. `peak_flops`, the denominator of the Trainer's MFU, reads its figure here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from minigpt_cli.engine.core.io import atomic_write_text
from minigpt_cli.engine.hardware import facts, matmul

if TYPE_CHECKING:
    from minigpt_cli.engine.hardware.device import PrecisionDecision

CACHE_ENV = "MINIGPT_CACHE_DIR"
CACHE_FILE = "matmul.json"
CACHE_VERSION = 1


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


def fingerprint_key(fingerprint: Mapping[str, Any]) -> str:
    """A stable, readable cache key for a fingerprint."""
    return "|".join(f"{name}={fingerprint[name]}" for name in sorted(fingerprint))


def read_cache() -> dict[str, Any]:
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


def write_cache(cache: Mapping[str, Any]) -> bool:
    """Replace the cache file with `cache` atomically; False (and no exception) when unwritable."""
    try:
        atomic_write_text(cache_path(), json.dumps(cache, indent=2, sort_keys=True) + "\n")
    except OSError:
        return False
    return True


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
    entry = read_cache()["entries"].get(fingerprint_key(facts.machine_fingerprint(device)))
    return entry if _valid_entry(entry) else None


def store_measurements(measurements: Mapping[str, Any]) -> bool:
    """Write measurements into the cache atomically; False (and no exception) when unwritable.

    Entries of other fingerprints are kept; a corrupt file is replaced. An unwritable cache only
    costs a re-measurement later, so it must never stop a training run.
    """
    cache = read_cache()
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
    return write_cache(cache)


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
    seconds_budget: float = matmul.DEFAULT_MEASURE_SECONDS,
) -> dict[str, Any]:
    """Measurements for `device` from the cache, measuring (and caching) whatever is missing.

    `refresh=True` measures everything anew, as `doctor` does each time it runs.
    """
    device = torch.device(device)
    all_keys = matmul.MATMUL_KEYS.get(device.type, ("fp32",))
    wanted = tuple(keys) if keys is not None else all_keys
    cached = None if refresh else load_measurements(device)
    missing = [key for key in wanted if cached is None or key not in cached["gflops"]]
    if not missing:
        assert cached is not None
        return cached
    budget = seconds_budget * len(missing) / max(1, len(all_keys))
    merged = _merge(cached, matmul.measure_device(device, budget, keys=missing))
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


def peak_flops(device: str | torch.device, precision: str | PrecisionDecision) -> float:
    """Matmul peak in FLOP/s for `precision` on `device`: the denominator of MFU.

    Read from the cache; measured (about half a second) and cached when missing.
    Raises RuntimeError when the device cannot run that precision at all.
    """
    key = matmul.precision_key(device, precision)
    measurements = cached_measurements(device, keys=(key,))
    gflops = measurements.get("peak_gflops", {}).get(key) or measurements["gflops"].get(key)
    if not gflops:
        reason = measurements.get("errors", {}).get(key, "no measurement")
        raise RuntimeError(f"cannot measure {key} matmul on {torch.device(device)}: {reason}")
    return float(gflops) * 1e9
