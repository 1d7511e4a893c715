"""Element-wise work of CPU training fused into kernels by torch.compile: RMSNorm's forward and
backward, and the attention backward's softmax gradient.

Why: on the CPU these are memory-bound, and eager PyTorch makes one pass over the activations per
operation. Under bf16 autocast a decoder layer's norm costs its fused forward, autocast's cast of
the output to bf16, the cast of the incoming gradient back to fp32 and six or seven passes of
`_RMSNormFunction`'s backward, each over a (tokens x width) tensor that no cache holds. Inductor
turns the forward into one pass that writes the bf16 copy the next matmul wants, and the backward
into one or two (measured at `small`'s shape, 8 x 256 x 512 in bf16: 4.4 -> 1.65 ms forward +
backward; the forward writing fp32 and leaving the cast to autocast saved nothing). The attention
backward (`attention._HalfAttentionSquareBackward`) rebuilds the probabilities from the scores and
turns them and the probabilities' gradient into the scores' gradient: one pass over the
(positions x positions) squares here against ten eager ones (at small's shape 2.5 against 10-11
ms a layer alone), and each row's dO·O in one more small kernel. Without them that backward goes
a block of keys at a time instead.

The kernels compile on first use, once for every shape (`dynamic=True`: a stage whose batches
change shape never switches kernels half-way, so it resumes bit for bit), 13 s for the norms with
Inductor's disk cache empty and 3.5 s from it (on a slower machine a small run's first step took
23.4 s cold with the norms', 26.2 s with the attention's too, 7-8 s warm), and need a C++
compiler. When compiling fails the failure is kept (`unavailable_reason`) and every later call
takes the eager path for the rest of the process: on a machine that cannot compile them a run is
eager from its first step, and resumed there it takes the same path, bit for bit.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

_compiled: dict[str, Callable[..., Any]] = {}
_failure: list[str] = []
_used: dict[str, None] = {}  # what ran compiled, in first-use order
_tried: dict[str, None] = {}  # what was asked for, compiled or not

# What each kernel is part of, for the run's log.
_LABELS = {
    "forward": "RMSNorm",
    "backward": "RMSNorm",
    "attention_rows": "attention's backward",
    "attention": "attention's backward",
}


def unavailable_reason() -> str | None:
    """Why the compiled kernels are not used in this process (None while they are, or untried)."""
    return _failure[0] if _failure else None


def _labels(names: dict[str, None]) -> str:
    return " and ".join(dict.fromkeys(_LABELS[name] for name in names))


def note(first_step_seconds: float) -> str | None:
    """One line for a training run's log once its first step ran: which compiled kernels it uses
    (that step's time includes compiling them), or None where they never applied."""
    if _failure:
        return f"no torch.compile kernels for {_labels(_tried)}: eager code instead ({_failure[0]})"
    if _used:
        return (
            f"torch.compile kernels for {_labels(_used)}, compiled during the first step "
            f"({first_step_seconds:.1f} s; Inductor keeps them on disk for later runs)"
        )
    return None


def _forward(
    x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return (x * rstd * weight).to(out_dtype), rstd


def _backward(
    grad: torch.Tensor, x: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    # d/dx of w·x·rstd: rstd·(g·w − x̂·mean(g·w·x̂)); the weight's gradient sums g·x̂ over rows.
    grad = grad.to(x.dtype)
    normed = x * rstd
    scaled = grad * weight
    grad_weight = (grad * normed).flatten(0, -2).sum(0)
    mean = (scaled * normed).mean(-1, keepdim=True)
    return (scaled - normed * mean) * rstd, grad_weight


def attention_softmax_backward(
    scores: torch.Tensor,
    grad_probs: torch.Tensor,
    logsumexp: torch.Tensor,
    row_terms: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(probabilities, gradient of the scaled scores), both in `grad_probs`' dtype, from fp32
    q·kᵀ `scores`, the low-precision dO·vᵀ `grad_probs` (both batch x T x T), the forward's
    log-sum-exp and each row's dO·O (batch x T x 1) and the additive causal `mask` (T x T, 0 or
    -inf): P = exp(s·scale − lse + mask), dS = P·(dP − rowterm)·scale. None where the kernel
    cannot be compiled: the same passes eagerly lose to a blocked backward that makes them over
    the causal blocks only (`attention._blocked_backward`).

    P's exponential is computed a second time for dS (summed in another order, so that Inductor
    keeps both in one loop instead of storing the fp32 P and reading it back). Scaling and
    masking the scores inside their product (`baddbmm`) instead measured 2 ms a layer slower."""
    return _run(
        "attention",
        _attention_softmax_backward,
        scores,
        grad_probs,
        logsumexp,
        row_terms,
        mask,
        scale,
    )


def _attention_softmax_backward(
    scores: torch.Tensor,
    grad_probs: torch.Tensor,
    logsumexp: torch.Tensor,
    row_terms: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    probs = (scores * scale - logsumexp + mask).exp()
    again = (scores * scale + (mask - logsumexp)).exp()
    grad_scores = again * (grad_probs.float() - row_terms) * scale
    return probs.to(grad_probs.dtype), grad_scores.to(grad_probs.dtype)


def attention_row_terms(grad_out: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
    """Each row's sum of dO·O in fp32 (softmax's backward needs it), over the last dimension;
    None where the kernel cannot be compiled."""
    return _run("attention_rows", _row_terms, grad_out, out)


def _row_terms(grad_out: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return (grad_out.float() * out.float()).sum(-1)


def _run(name: str, function: Callable[..., Any], *args: Any) -> Any:
    """`function` compiled (once) and called, or None once compiling has failed here."""
    _tried[name] = None
    if _failure:
        return None
    compiled = _compiled.get(name)
    try:
        import torch._inductor.config as inductor_config

        if compiled is None:
            if os.environ.get("TORCHDYNAMO_DISABLE") == "1":  # torch.compile would be eager code
                _failure.append("torch.compile is switched off (TORCHDYNAMO_DISABLE=1)")
                return None
            compiled = _compiled[name] = torch.compile(function, fullgraph=True, dynamic=True)
        # Compiled in this process, not in a pool of worker processes: the workers' memory would
        # count against `--max-memory` and a run's process tree for a few seconds' gain.
        with inductor_config.patch(compile_threads=1), torch.autocast("cpu", enabled=False):
            result = compiled(*args)
        _used[name] = None
        return result
    except Exception as error:  # noqa: BLE001 - no compiler, unsupported Python: stay eager
        first_line = str(error).strip().splitlines()[:1]
        _failure.append(": ".join([type(error).__name__, *first_line]))
        return None


def rms_norm_forward(
    x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(norm of `x` in `out_dtype`, fp32 rstd) from the fused kernel, or None: use eager."""
    return _run("forward", _forward, x, weight, eps, out_dtype)


def rms_norm_backward(
    grad: torch.Tensor, x: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(gradient of `x`, gradient of `weight`) from the fused kernel, or None: use eager."""
    return _run("backward", _backward, grad, x, rstd, weight)
