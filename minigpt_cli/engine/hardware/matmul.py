"""How fast this machine multiplies matrices, per precision: measured rather than guessed.

`measure_device` times square matmuls in every precision the device offers, interleaved so their
ratios are fair on a busy machine. Those figures drive two decisions elsewhere:
`device.resolve_precision` picks bf16 autocast only where bf16 *measured* faster, and the
Trainer's MFU divides by the peak of the precision in use (`speed_cache.peak_flops`, which keeps
the figures per machine so a run does not pay the second a measurement costs).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import torch

from minigpt_cli.engine.hardware import facts

if TYPE_CHECKING:
    from minigpt_cli.engine.hardware.device import PrecisionDecision

# Above this relative error (vs. a float64 reference) a "fp32" matmul is not computing in fp32:
# plain fp32 sits near 1e-7, bf16 arithmetic near 3e-3.
FP32_LEVEL_ERROR = 1e-4
# Seconds of matmul timing `doctor` spends in total (split over the precisions of the device).
DEFAULT_MEASURE_SECONDS = 1.0

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


def synchronize(device: str | torch.device) -> None:
    """Wait for queued work on `device` (a no-op on the CPU), so timings measure real work."""
    device = torch.device(device)
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


def _operands(
    n: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
    synchronize(out.device)
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
    operands: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    best: float
    times: list[float] = field(default_factory=list)

    @property
    def gflops(self) -> float:
        return 2.0 * self.n**3 / self.best / 1e9


_MEASURE_ERRORS = (RuntimeError, TypeError)  # RuntimeError includes not-implemented ops


def error_text(exc: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none): one report line."""
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
                    errors[timing.key] = error_text(exc)
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
        "device_name": facts.device_name(device),
        "fingerprint": facts.machine_fingerprint(device),
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
            result["errors"][key] = error_text(exc)
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


def precision_key(device: str | torch.device, precision: str | PrecisionDecision) -> str:
    """Measurement key for a precision: "bf16", "fp16", "fp32", or "fp32_medium"/"fp32_high".

    A bare "fp32" follows the fp32 matmul precision currently set in torch, so the Trainer gets the
    peak of the path its matmuls really take. A `PrecisionDecision` answers for itself.
    """
    if not isinstance(precision, str):
        return precision.peak_key
    if precision == "fp32":
        setting = torch.get_float32_matmul_precision()
        return "fp32" if setting == "highest" else f"fp32_{setting}"
    _key_setup(precision)
    return precision
