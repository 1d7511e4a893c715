"""Which device and which precision a run uses, decided by measurement where it matters.

Device `auto` takes CUDA, then Apple MPS, then the CPU. Precision `auto` follows the hardware:

* CUDA sm80+ (Ampere and newer): bf16 autocast. Older CUDA: fp16 autocast with a gradient scaler.
* Apple MPS: fp32, the safe choice (autocast there is not reliably faster for training).
* CPU: the matmul measurement decides (`matmul`, cached per machine by `speed_cache`). bf16
  autocast when bf16 matmuls measured at least 1.3x fp32 (AVX512-BF16 or AMX CPUs, 1.4-2.5x end to
  end); otherwise fp32, with `set_float32_matmul_precision("medium")` when that measured faster
  *and* still computed at fp32 accuracy *and* the CPU has no AMX (where "medium" may compute in
  bf16).

Explicit choices are honoured with two rules: `--precision fp32` keeps fp32 accuracy (the same
"medium" rule, which only ever picks an fp32-accurate path); `--precision fp16` is refused off CUDA,
since fp16 autocast on a CPU or MPS is neither faster than bf16 nor a tested training mode (it
needs loss scaling and overflows silently). `--precision bf16` on a CPU without bf16 hardware is
allowed but the decision's `reason` says it will be slow.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from minigpt_cli.engine.core.units import format_ratio
from minigpt_cli.engine.hardware.facts import bf16_hardware, cpu_info
from minigpt_cli.engine.hardware.matmul import FP32_LEVEL_ERROR
from minigpt_cli.engine.hardware.speed_cache import (
    cached_measurements,
    load_measurements,
    speed_ratio,
)
from minigpt_cli.errors import UserError

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")

DtypeName = Literal["fp32", "bf16", "fp16"]
MatmulPrecision = Literal["highest", "medium"]

# `precision auto` on a CPU: bf16 autocast only when bf16 matmuls measure at least this much faster
# than fp32 (below it, autocast casts cost more than the matmuls save); matmul precision "medium"
# only when it measures at least MEDIUM_MIN_SPEEDUP faster than the default fp32 path.
BF16_MIN_SPEEDUP = 1.3
MEDIUM_MIN_SPEEDUP = 1.25


# --------------------------------------------------------------------------------------------
# Device
# --------------------------------------------------------------------------------------------


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


def available_devices() -> list[str]:
    """Device names usable here, in the order `auto` prefers them last to first: cpu always."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names.append("cuda")
    if _mps_available():
        names.append("mps")
    return names


def resolve_device(name: str) -> torch.device:
    """A torch device for `auto`, `cpu`, `cuda` (or `cuda:N`) or `mps`.

    `auto` prefers CUDA, then MPS, then the CPU. Asking for a device that is not there is a
    UserError naming what is available, never a silent fall back to the CPU.
    """
    text = str(name).strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    base, colon, index_text = text.partition(":")
    if base not in ("cpu", "cuda", "mps") or (colon and base != "cuda"):
        raise UserError(f"unknown device {name!r}: choose one of {', '.join(DEVICES)}")
    available = ", ".join(available_devices())
    if base == "cuda":
        if not torch.cuda.is_available():
            why = (
                "this torch is a CPU-only build"
                if torch.version.cuda is None and getattr(torch.version, "hip", None) is None
                else "no CUDA device was found"
            )
            raise UserError(
                f"device {name!r}: CUDA is not available ({why}); available: {available}"
            )
        if colon:
            count = torch.cuda.device_count()
            if not index_text.isdigit() or int(index_text) >= count:
                raise UserError(
                    f"device {name!r}: no such CUDA device (this machine has cuda:0 to "
                    f"cuda:{count - 1})"
                )
            return torch.device("cuda", int(index_text))
        return torch.device("cuda")
    if base == "mps":
        if not _mps_available():
            backend = getattr(torch.backends, "mps", None)
            why = (
                "needs Apple Silicon and macOS 12.3 or newer"
                if backend and backend.is_built()
                else "this torch was built without MPS"
            )
            raise UserError(
                f"device {name!r}: Apple MPS is not available ({why}); available: {available}"
            )
        return torch.device("mps")
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------
# Precision
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrecisionDecision:
    """How a run computes: parameters stay fp32; `autocast_dtype` is what matmuls run in.

    `reason` is the one line shown to the user, saying why (with the measured figure when one
    decided it).
    """

    dtype_name: DtypeName
    autocast_dtype: torch.dtype | None
    use_grad_scaler: bool
    fp32_matmul_precision: MatmulPrecision
    reason: str

    @property
    def peak_key(self) -> str:
        """The matmul measurement this run's matmuls correspond to (for MFU)."""
        if self.dtype_name == "fp32" and self.fp32_matmul_precision != "highest":
            return f"fp32_{self.fp32_matmul_precision}"
        return self.dtype_name

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the autocast dtype as its name)."""
        return {
            "dtype_name": self.dtype_name,
            "autocast_dtype": str(self.autocast_dtype).removeprefix("torch.")
            if self.autocast_dtype is not None
            else None,
            "use_grad_scaler": self.use_grad_scaler,
            "fp32_matmul_precision": self.fp32_matmul_precision,
            "reason": self.reason,
        }


def _fp32(reason: str, matmul: MatmulPrecision = "highest") -> PrecisionDecision:
    return PrecisionDecision("fp32", None, False, matmul, reason)


def _bf16(reason: str) -> PrecisionDecision:
    return PrecisionDecision("bf16", torch.bfloat16, False, "highest", reason)


def _fp16(reason: str) -> PrecisionDecision:
    return PrecisionDecision("fp16", torch.float16, True, "highest", reason)


def _cpu_fp32(
    measurements: Mapping[str, Any], features: Mapping[str, bool], lead: str
) -> PrecisionDecision:
    """fp32 on a CPU, with matmul precision "medium" only where measured faster at fp32 accuracy."""
    if features.get("amx_bf16") or features.get("amx_tile"):
        return _fp32(
            f"{lead}; matmul precision 'highest' (on AMX CPUs 'medium' may compute in bf16)"
        )
    speedup = speed_ratio(measurements, "fp32_medium")
    error = measurements.get("rel_error", {}).get("fp32_medium")
    if speedup is None:
        return _fp32(lead)
    if error is not None and error > FP32_LEVEL_ERROR:
        return _fp32(f"{lead}; matmul precision 'medium' lost fp32 accuracy here, not used")
    if speedup >= MEDIUM_MIN_SPEEDUP:
        return _fp32(
            f"{lead}; matmul precision 'medium' (oneDNN) measured {format_ratio(speedup)} "
            "the default fp32 path at fp32 accuracy",
            "medium",
        )
    return _fp32(lead)


def _resolve_cpu(
    name: str,
    device: torch.device,
    measurements: Mapping[str, Any] | None,
    features: Mapping[str, bool] | None,
) -> PrecisionDecision:
    features = features if features is not None else cpu_info()["features"]
    hardware = bf16_hardware(features)
    if name == "fp16":
        raise UserError(
            "precision 'fp16' needs a CUDA GPU (fp16 autocast with loss scaling); on the CPU use "
            "bf16 or fp32, or auto, which measures which is faster"
        )
    if name == "bf16":
        known = measurements if measurements is not None else load_measurements(device)
        ratio = speed_ratio(known, "bf16")
        measured = f", bf16 matmul measured {format_ratio(ratio)} fp32" if ratio else ""
        if hardware:
            return _bf16(f"bf16 autocast as requested ({hardware}{measured})")
        return _bf16(
            "bf16 autocast as requested; warning: this CPU has no AVX512-BF16 or AMX, so bf16 "
            f"matmuls are emulated and slow{measured}"
        )
    if measurements is None:
        keys = ("fp32", "fp32_medium", "bf16") if name == "auto" else ("fp32", "fp32_medium")
        measurements = cached_measurements(device, keys=keys)
    if name == "fp32":
        return _cpu_fp32(measurements, features, "fp32 as requested")
    ratio = speed_ratio(measurements, "bf16")
    if ratio is not None and ratio >= BF16_MIN_SPEEDUP:
        where = hardware or "no AVX512-BF16/AMX flag seen, but measured"
        return _bf16(
            f"bf16 autocast: measured {format_ratio(ratio)} fp32 matmul speed on this CPU ({where})"
        )
    if ratio is None:
        lead = "fp32: bf16 matmul could not be measured on this CPU"
    else:
        lead = f"fp32: bf16 matmul measured only {format_ratio(ratio)} fp32 on this CPU"
        if hardware is None:
            lead += " (no AVX512-BF16 or AMX)"
    return _cpu_fp32(measurements, features, lead)


def _resolve_cuda(
    name: str, device: torch.device, capability: tuple[int, int] | None
) -> PrecisionDecision:
    major, minor = (
        capability if capability is not None else torch.cuda.get_device_capability(device)
    )
    sm = f"sm{major}{minor}"
    native_bf16 = (major, minor) >= (8, 0)
    if name == "fp32":
        return _fp32(f"fp32 as requested on CUDA {sm}")
    if name == "fp16":
        return _fp16(f"fp16 autocast with gradient scaling as requested on CUDA {sm}")
    if name == "bf16":
        if native_bf16:
            return _bf16(f"bf16 autocast as requested: CUDA {sm} has native bf16")
        return _bf16(
            f"bf16 autocast as requested; warning: CUDA {sm} has no native bf16 (needs sm80+), "
            "it is emulated and slow (auto would pick fp16)"
        )
    if native_bf16:
        return _bf16(f"bf16 autocast: CUDA {sm} has native bf16 (sm80+)")
    return _fp16(f"fp16 autocast with gradient scaling: CUDA {sm} has no native bf16 (needs sm80+)")


def _resolve_mps(name: str) -> PrecisionDecision:
    if name == "fp16":
        raise UserError(
            "precision 'fp16' needs a CUDA GPU (fp16 autocast with loss scaling); on Apple MPS use "
            "fp32 (auto) or bf16"
        )
    if name == "bf16":
        return _bf16("bf16 autocast on Apple MPS as requested (needs macOS 14 or newer)")
    lead = "fp32 as requested" if name == "fp32" else "fp32"
    return _fp32(f"{lead} on Apple MPS: the safe choice (autocast there is not reliably faster)")


def resolve_precision(
    name: str,
    device: str | torch.device,
    *,
    measurements: Mapping[str, Any] | None = None,
    cpu_features: Mapping[str, bool] | None = None,
    cuda_capability: tuple[int, int] | None = None,
) -> PrecisionDecision:
    """Decide how a run on `device` computes, for `auto`, `fp32`, `bf16` or `fp16`.

    On the CPU the decision comes from the matmul measurement: the cache (`speed_cache`), measured
    (about a second) when missing. `measurements`, `cpu_features` and `cuda_capability` can be
    passed in so a decision can be made (and tested) without this machine's hardware.
    """
    text = str(name).strip().lower()
    if text not in PRECISIONS:
        raise UserError(f"unknown precision {name!r}: choose one of {', '.join(PRECISIONS)}")
    device = torch.device(device)
    if device.type == "cuda":
        return _resolve_cuda(text, device, cuda_capability)
    if device.type == "mps":
        return _resolve_mps(text)
    return _resolve_cpu(text, device, measurements, cpu_features)


def autocast_context(
    decision: PrecisionDecision, device: str | torch.device
) -> contextlib.AbstractContextManager[Any]:
    """The context a forward pass runs in: `torch.autocast` for bf16/fp16, else a no-op."""
    if decision.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=decision.autocast_dtype)


def apply_matmul_precision(decision: PrecisionDecision) -> str:
    """Set torch's fp32 matmul precision for this run; returns the previous setting to restore."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(decision.fp32_matmul_precision)
    return previous
