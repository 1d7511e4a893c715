"""Int8 weights for decoding (`--quantize int8`): a quarter of the bytes a token reads.

Batch-1 decoding reads every weight once per token, so on a CPU its speed is set by memory
bandwidth, not arithmetic: `small` moves 97 MB of fp32 weights a token. Each `nn.Linear` of the
decoder and the output head becomes an `Int8Linear`: symmetric int8 weights, one fp32 scale per
output channel (the row's largest magnitude / 127), so a row's rounding error is at most half a
step of its own range. The embedding table stays as it was (a lookup reads one row a token).

Two ways to multiply, measured on a 2-core AVX2 machine at the presets' shapes (batch 1):
- "dynamic": PyTorch's own int8 GEMM (fbgemm, `quantized::linear_dynamic`): the activation row is
  quantized per call (8-bit, range reduced by one bit so AVX2's 16-bit pair sums cannot saturate)
  and multiplied int8 x int8. 3-7x faster than fp32 on small's matrices (2816 x 512, 10000 x 512),
  but about 40-80 us a call whatever the size, so slower than fp32 below ~64k weights.
- "dequantize": weight-only, the int8 rows scaled back to the activation dtype each call and
  multiplied in it. Exact to the int8 weights, but it writes an fp32 copy of the matrix every call:
  2-3x slower than fp32 here. It is the fallback where fbgemm is missing (non-x86 builds, CUDA,
  MPS) and for matrices too small for the int8 GEMM to pay (`DYNAMIC_MIN_WEIGHTS`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from minigpt_cli.engine.model.gpt import GPT
from minigpt_cli.engine.model.layers import MLP, Attention
from minigpt_cli.errors import UserError

QUANTIZATIONS = ("int8",)  # what `--quantize` accepts


def check_quantization(method: str | None) -> None:
    """Refuse an unknown `--quantize` value with one line (exit 2), before a model is loaded."""
    if method is not None and method not in QUANTIZATIONS:
        raise UserError(f"--quantize {method}: expected one of {', '.join(QUANTIZATIONS)}")


# Below this many weights a matrix keeps its fp32 `nn.Linear`: fbgemm's per-call cost (quantizing
# the activation, packing) outweighs reading 4x fewer bytes (measured: a 128 x 128 matrix takes
# ~4 us in fp32 and ~40-80 us through the int8 GEMM; 5000 x 128 and up are faster in int8).
DYNAMIC_MIN_WEIGHTS = 256 * 1024

_QMAX = 127


def _linear_dynamic() -> Callable[..., torch.Tensor] | None:
    """fbgemm's int8 GEMM as its one overload: called through the op's packet instead, every call
    first searches its arguments for TorchScript objects in Python (the packed weights are one),
    4-5 us of the ~45 a call costs at small's shapes. None where this build lacks the op."""
    try:
        return torch.ops.quantized.linear_dynamic.default
    except (AttributeError, RuntimeError):
        return None


_LINEAR_DYNAMIC = _linear_dynamic()


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (int8 weights, fp32 scale per row); w ~ q * scale."""
    rows = weight.detach().float()
    scale = rows.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / _QMAX
    q = torch.round(rows / scale[:, None]).clamp_(-_QMAX, _QMAX).to(torch.int8)
    return q, scale


def _fbgemm_available(device: torch.device) -> bool:
    return device.type == "cpu" and any(
        engine in torch.backends.quantized.supported_engines for engine in ("x86", "fbgemm")
    )


def _pack(q: torch.Tensor, scale: torch.Tensor) -> object | None:
    """fbgemm's packed int8 weights (its own layout), or None where this build cannot pack."""
    if _LINEAR_DYNAMIC is None or not _fbgemm_available(q.device):
        return None
    zero = torch.zeros(scale.shape[0], dtype=torch.long)
    try:
        with warnings.catch_warnings():
            # PyTorch 2.13 deprecates quantized tensors (the packing's input), not the GEMM; when
            # they are removed this returns None and decoding takes the dequantize path.
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch._make_per_channel_quantized_tensor(q, scale.double(), zero, 0)
            return torch.ops.quantized.linear_prepack(qweight, None)
    except (RuntimeError, NotImplementedError, AttributeError):
        # This build cannot pack (no quantized engine, or the op or quantized tensors are gone):
        # the caller decodes through the dequantize path instead.
        return None


class Int8Linear(nn.Module):
    """A bias-free `nn.Linear` whose weight is held as per-row int8 plus an fp32 scale.

    `kernel` is "dynamic" (fbgemm's int8 GEMM) or "dequantize" (weight-only, see the module doc);
    "auto" picks dynamic where fbgemm can pack the weights.
    """

    qweight: torch.Tensor
    scale: torch.Tensor

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, kernel: str = "auto") -> None:
        super().__init__()
        if kernel not in ("auto", "dynamic", "dequantize"):
            raise ValueError(f"kernel must be auto, dynamic or dequantize, got {kernel!r}")
        self.out_features, self.in_features = q.shape
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self._packed = None if kernel == "dequantize" else _pack(q, scale)
        if kernel == "dynamic" and self._packed is None:
            raise RuntimeError("this PyTorch build has no fbgemm int8 GEMM (x86 CPUs only)")
        self.kernel = "dynamic" if self._packed is not None else "dequantize"
        # Stacks of this layer with its siblings (`stacked_projection`), built once: int8 weights
        # never change after quantization, and packing costs ~30 ms a matrix (more than decoding
        # a token of `small`), so it must not happen per decoding call. A plain dict, so the
        # stacked copies are not submodules (not in `modules()`, `state_dict()`).
        self._stacks: dict[tuple[int, ...], Callable[[torch.Tensor], torch.Tensor]] = {}

    @classmethod
    def from_linear(cls, linear: nn.Linear, kernel: str = "auto") -> Int8Linear:
        if linear.bias is not None:
            raise ValueError("Int8Linear holds bias-free projections only")
        q, scale = quantize_rows(linear.weight)
        return cls(q.to(linear.weight.device), scale.to(linear.weight.device), kernel)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight the int8 values stand for, (out, in), in `dtype`."""
        return self.qweight.to(dtype) * self.scale[:, None].to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is not None and _LINEAR_DYNAMIC is not None and x.dtype == torch.float32:
            flat = x.reshape(-1, x.shape[-1])
            out = _LINEAR_DYNAMIC(flat, self._packed, True)
            return out.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.dequantized(x.dtype))

    @classmethod
    def stacked_projection(
        cls, modules: Sequence[nn.Module]
    ) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """Several Int8Linears as one (q/k/v, gate/up): their rows stacked, one GEMM a call."""
        parts = [module for module in modules if isinstance(module, Int8Linear)]
        if len(parts) != len(modules) or len({part.kernel for part in parts}) != 1:
            return None
        if len(parts) == 1:
            return parts[0].forward
        key = tuple(id(part) for part in parts)
        stacked = parts[0]._stacks.get(key)
        if stacked is None:
            joined = cls(
                torch.cat([part.qweight for part in parts]),
                torch.cat([part.scale for part in parts]),
                parts[0].kernel,
            )
            stacked = parts[0]._stacks[key] = joined.forward
        return stacked

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 per row, {self.kernel}"


def quantize_model(model: GPT, method: str, kernel: str = "auto") -> int:
    """Replace the decoder's projections and the output head with int8 ones, in place.

    Only for decoding and evaluation: the int8 weights are buffers, nothing trains them. With the
    "auto" kernel, matrices under `DYNAMIC_MIN_WEIGHTS` keep fp32 where the int8 GEMM would be
    used (it is slower there); an explicit kernel quantizes every one.
    Returns how many matrices became int8. LoRA-wrapped projections are left alone (their adapter
    is merged or kept in fp32 by the loader).
    """
    if method not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {method!r}: expected one of {QUANTIZATIONS}")
    # The projections of attention and MLP blocks, and the head: not a LoRA wrapper's inner layer.
    targets: list[tuple[nn.Module, str, nn.Linear]] = []
    for owner in model.modules():  # the GPT itself comes first
        if not isinstance(owner, (GPT, Attention, MLP)):
            continue
        for attribute, child in owner.named_children():
            if isinstance(child, nn.Linear) and type(child) is nn.Linear and child.bias is None:
                targets.append((owner, attribute, child))
    count = 0
    for owner, attribute, linear in targets:
        small = linear.weight.numel() < DYNAMIC_MIN_WEIGHTS
        if small and kernel == "auto" and _fbgemm_available(linear.weight.device):
            continue
        setattr(owner, attribute, Int8Linear.from_linear(linear, kernel))
        count += 1
    return count
