"""Scaled dot-product attention for the decoder, and the CPU backwards PyTorch's kernels lack.

`attend` is PyTorch's `scaled_dot_product_attention` except where a measured rule
(`engine.resources.activations.half_attention_backward`) says its bf16/fp16 CPU backward is slow:
there the forward stays PyTorch's flash kernel and the backward is one of the two below. The
same rule sizes what the memory estimate counts for the backward.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F

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


class _HalfAttentionBlockedBackward(torch.autograd.Function):
    """Causal CPU attention in bf16 whose backward is batched matrix products, a key block at a
    time, from the forward's log-sum-exp.

    PyTorch's bf16 flash backward runs five small matrix products per (sequence, head, 64-query
    block), each a separate call; at `small`'s shape (8 x 8 heads x 256 positions x 64 dims) it
    took 14-17 ms a layer against its forward's 3, a sixth of the training step. Here each block
    of `ATTENTION_KEY_BLOCK` keys is five products over every sequence and head at once, with
    the queries before the block (which cannot see it) left out: the probabilities rebuilt as
    exp(q·k/√d − lse) from fp32 scores (the kernel's precision), the rest in bf16 products with
    fp32 element-wise work. Measured 10.4-11.0 against 14.1-14.9 ms at small's shape, the step
    faster in eight of eight interleaved pairs (median 37 ms of ~560); gradients as close to
    fp32's as the kernel's (relative error 0.0032 / 0.0032 / 0.0023 for q / k / v against its
    0.0026 / 0.0036 / 0.0035).
    """

    # `ctx` is autograd's context (Any in torch too): forward hangs on it what backward needs.
    forward = staticmethod(_flash_forward)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q, k, v, out, logsumexp = ctx.saved_tensors
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


def _backward_path(q: torch.Tensor, causal: bool, mask: torch.Tensor | None) -> str:
    """Which backward this attention call takes: "kernel" (PyTorch's), "fp32" or "blocked".

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
        if path == "blocked":
            return _HalfAttentionBlockedBackward.apply(q, k, v)
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
