"""Scaled dot-product attention for the decoder, and the CPU backwards PyTorch's kernels lack.

`attend` is PyTorch's `scaled_dot_product_attention` except where a measured rule
(`engine.resources.activations.half_attention_backward`) says its bf16/fp16 CPU backward is slow:
there the forward stays PyTorch's flash kernel and the backward is one of those below: PyTorch's
fp32 kernel, or products over whole squares (over key blocks where compiled kernels are
unavailable). The same rule sizes what the memory estimate counts for the backward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F

from minigpt_cli.engine.model import kernels
from minigpt_cli.engine.resources.activations import ATTENTION_KEY_BLOCK, half_attention_backward

# scaled_dot_product_attention learnt grouped-query attention (`enable_gqa`) in PyTorch 2.5.
_SDPA_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)


def _flash_forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """PyTorch's causal CPU flash forward, keeping what a backward from the log-sum-exp needs."""
    out, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)
    ctx.save_for_backward(q, k, v, out, logsumexp)
    return out


class _HalfAttentionFp32Backward(torch.autograd.Function):
    """Causal CPU attention in bf16/fp16 whose backward runs PyTorch's fp32 kernel.

    PyTorch's CPU flash-attention backward in reduced precision pays a large cost per block at
    short sequences and narrow heads: measured on an AMX CPU (torch 2.13), 8 x 4 heads x 128
    positions x 32 dims took 5-8 ms against 1.4-1.8 ms for casting to fp32 and running the fp32
    kernel; it was a quarter of a `tiny` bf16 training step. The forward stays the bf16 kernel
    (fast); the gradients come out closer to fp32's than the bf16 kernel's do.
    """

    # `ctx` is autograd's context (Any in torch too): forward hangs on it what backward needs.
    forward = staticmethod(_flash_forward)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q, k, v, out, logsumexp = ctx.saved_tensors
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out.float(), q.float(), k.float(), v.float(), out.float(), logsumexp, 0.0, True
        )
        return tuple(grad.to(q.dtype) for grad in grads)


@lru_cache(maxsize=8)
def _above_diagonal(width: int, device: torch.device) -> torch.Tensor:
    return torch.ones(width, width, dtype=torch.bool, device=device).triu(1)


@lru_cache(maxsize=8)
def _causal_mask(positions: int, device: torch.device) -> torch.Tensor:
    """0 on and below the diagonal, -inf above: added to scores, it hides every later key."""
    return torch.full((positions, positions), float("-inf"), device=device).triu(1)


@contextmanager
def _fp32_products_on_bf16_units() -> Iterator[None]:
    """fp32 matrix products inside run on the CPU's bf16 units (oneDNN's bf16 "fpmath" mode, what
    `torch.set_float32_matmul_precision("medium")` asks for): inputs rounded to bf16, products
    summed in fp32. Exact where the inputs are bf16 values widened to fp32; 2.5x faster than
    fp32 products at small's attention scores (0.99-1.05 against 2.49-2.63 ms, AMX). Where the
    CPU lacks bf16 units oneDNN computes in fp32."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _blocked_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    logsumexp: torch.Tensor,
    grad_out: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The causal bf16 attention backward a block of `ATTENTION_KEY_BLOCK` keys at a time, five
    batched products per block over every sequence and head, the queries before the block (which
    cannot see it) left out: what `_HalfAttentionSquareBackward` runs without compiled kernels. Its
    element-wise work covers the causal blocks only, so eagerly it beats the squares' (small's
    step 725 against 773 ms with both eager, faster in 7 of 8 pairs); its products, on sliced
    operands that PyTorch's CPU bf16 `bmm` copies, lose to them. Probabilities rebuilt as
    exp(q·k/√d − lse) from fp32 scores, the rest in bf16 products with fp32 element-wise work."""
    batch, heads, seq, dim = q.shape
    low, scale = q.dtype, dim**-0.5
    flat = (batch * heads, seq, dim)
    queries, keys, values = q.reshape(flat), k.reshape(flat), v.reshape(flat)
    grads = grad_out.reshape(flat)
    # softmax's backward needs each row's sum of dO·O
    row_terms = (grads.float() * out.reshape(flat).float()).sum(-1, keepdim=True)
    lse = logsumexp.reshape(batch * heads, seq, 1)
    queries32, keys32 = queries.float(), keys.float()
    grad_q = torch.zeros(flat, device=q.device)  # summed over the key blocks in fp32
    grad_k = torch.empty(flat, dtype=low, device=q.device)
    grad_v = torch.empty(flat, dtype=low, device=q.device)
    for start in range(0, seq, ATTENTION_KEY_BLOCK):
        stop = min(start + ATTENTION_KEY_BLOCK, seq)
        block_keys = keys[:, start:stop]
        # Rows `start` on: the queries that see this block (the first `stop - start` in part).
        probs = torch.bmm(queries32[:, start:], keys32[:, start:stop].transpose(1, 2))
        probs.mul_(scale).sub_(lse[:, start:]).exp_()
        probs[:, : stop - start].masked_fill_(_above_diagonal(stop - start, q.device), 0.0)
        torch.bmm(probs.to(low).transpose(1, 2), grads[:, start:], out=grad_v[:, start:stop])
        grad_probs = torch.bmm(grads[:, start:], values[:, start:stop].transpose(1, 2))
        grad_scores = probs.mul_(grad_probs.float().sub_(row_terms[:, start:]))
        grad_scores = grad_scores.mul_(scale).to(low)
        torch.bmm(grad_scores.transpose(1, 2), queries[:, start:], out=grad_k[:, start:stop])
        grad_q[:, start:] += torch.bmm(grad_scores, block_keys)
    shape = q.shape
    return grad_q.to(low).view(shape), grad_k.view(shape), grad_v.view(shape)


class _HalfAttentionSquareBackward(torch.autograd.Function):
    """Causal CPU attention in bf16 whose backward is five batched products over whole
    (positions x positions) squares, from the forward's log-sum-exp.

    PyTorch's bf16 flash backward runs five small matrix products per (sequence, head, 64-query
    block), each a separate call; at `small`'s shape (8 x 8 heads x 256 positions x 64 dims) it
    took 14-17 ms a layer against its forward's 3. Here each product runs once over every
    sequence and head, with contiguous operands (PyTorch's CPU bf16 products copy any sliced
    one): the scores q·kᵀ in fp32 (on the bf16 units: q and k are bf16 values, so the products
    are exact and the sums fp32, the kernel's precision), dO·vᵀ in bf16, then one compiled pass
    (`kernels.attention_softmax_backward`) rebuilds the probabilities and the scores' gradient,
    and three products give dV = Pᵀ·dO, dK = dSᵀ·q, dQ = dS·k, each summed in fp32 and rounded
    once. The squares' upper halves are computed and thrown away: at 256 positions that costs
    less than the copies and calls of the version before, which went a block of 64 keys at a
    time (a layer's forward and backward alone, interleaved on a busy machine: 14.3-19.5 ms
    against 24.9-27.4; small's training step 1.34x -> 1.48x Hugging Face's by
    `benchmarks/train_throughput.py`). Where the compiled kernels are unavailable (no C++
    compiler) the blocks run instead (`_blocked_backward`): eagerly the squares' passes lose to
    theirs. Past 256 positions the squares' cost grows with the square of the length and
    PyTorch's kernel wins (`activations.half_attention_backward`).
    """

    # `ctx` is autograd's context (Any in torch too): forward hangs on it what backward needs.
    forward = staticmethod(_flash_forward)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q, k, v, out, logsumexp = ctx.saved_tensors
        grads = _square_backward(q, k, v, out, logsumexp, grad_out)
        if grads is None:
            grads = _blocked_backward(q, k, v, out, logsumexp, grad_out)
        return grads


def _square_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    logsumexp: torch.Tensor,
    grad_out: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """dQ, dK, dV over whole squares (`_HalfAttentionSquareBackward`), or None where the compiled
    kernels are unavailable in this process (every call then, so a run's path never changes)."""
    batch, heads, seq, dim = q.shape
    rows = (batch * heads, seq, 1)
    row_terms = kernels.attention_row_terms(grad_out, out)
    if row_terms is None:
        return None
    flat = (batch * heads, seq, dim)
    queries, keys, values = q.reshape(flat), k.reshape(flat), v.reshape(flat)
    grads = grad_out.reshape(flat)
    with _fp32_products_on_bf16_units():
        scores = torch.bmm(queries.float(), keys.float().transpose(1, 2))
    grad_probs = torch.bmm(grads, values.transpose(1, 2))
    fused = kernels.attention_softmax_backward(
        scores,
        grad_probs,
        logsumexp.reshape(rows),
        row_terms.reshape(rows),
        _causal_mask(seq, q.device),
        dim**-0.5,
    )
    if fused is None:
        return None
    probs, grad_scores = fused
    grad_v = torch.bmm(probs.transpose(1, 2), grads)
    grad_k = torch.bmm(grad_scores.transpose(1, 2), queries)
    grad_q = torch.bmm(grad_scores, keys)
    shape = q.shape
    return grad_q.view(shape), grad_k.view(shape), grad_v.view(shape)


def _backward_path(q: torch.Tensor, causal: bool, mask: torch.Tensor | None) -> str:
    """Which backward this attention call takes: "kernel" (PyTorch's), "fp32" or "square".

    Only a causal, unmasked CPU call in bf16/fp16 that autograd will differentiate leaves
    PyTorch's; then `half_attention_backward` decides by the shape and dtype.
    """
    if not causal or mask is not None or q.device.type != "cpu":
        return "kernel"
    if q.dtype not in (torch.bfloat16, torch.float16) or torch.compiler.is_compiling():
        return "kernel"
    if not (torch.is_grad_enabled() and q.requires_grad):
        return "kernel"
    return half_attention_backward(q.shape[-1], q.shape[-2], bf16=q.dtype == torch.bfloat16)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    n_head: int,
    n_kv_head: int,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Scaled dot-product attention of (B, heads, T, head_dim) queries over (B, kv_heads, S,
    head_dim) keys and values; grouped-query heads share keys without copies where torch can."""
    if dropout == 0.0 and n_kv_head == n_head:
        path = _backward_path(q, causal, mask)
        if path == "fp32":
            return _HalfAttentionFp32Backward.apply(q, k, v)
        if path == "square":
            return _HalfAttentionSquareBackward.apply(q, k, v)
    grouped = {}
    if n_kv_head != n_head:
        if _SDPA_GQA:
            grouped = {"enable_gqa": True}  # no copies of the shared keys/values
        else:
            repeats = n_head // n_kv_head
            k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout, **grouped
    )
