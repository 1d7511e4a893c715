"""The decoder's building blocks: KV cache, RMSNorm, rotary positions, attention, SwiGLU, layer.

`GPT` (gpt.py) stacks these; HF Llama's module and tensor names are kept here, so export is a
rename. What makes them fast on a laptop CPU, each explained where it is done: RMSNorm's
hand-written backward, q/k/v (and gate/up) weights stacked for one matmul (built once per decoding
call by `reuse_stacked_weights`), and one rotary pass over queries and keys together.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from minigpt_cli.config.schema import ModelConfig
from minigpt_cli.engine.model import kernels
from minigpt_cli.engine.model.attention import attend

# Models this wide and wider take the hand-written backwards of the q/k rotary, SwiGLU and
# RMSNorm's row sums below. Measured at `small`'s width (512; activations of 1-6M elements), with
# the stacked weights' cast, a bf16 step 561-573 -> 546-551 ms (three interleaved rounds). At
# `tiny`'s (128) the same step was 1-2 % slower (five rounds: the Python of an autograd.Function
# weighs more than the passes it saves), and a narrow model keeps autograd's for another reason
# too: its runs stay bitwise those of before, and the quickstart's scores swing by tens of points
# between two equally accurate rounding paths (its SFT, at micro-batch 36, has activations as
# large as small's pretraining: the hand-written path moved seed 1's addition score 40 -> 2 %).
FUSED_BACKWARD_MIN_WIDTH = 512


class KVCache:
    """Preallocated keys and values of every layer for one batch of sequences being decoded.

    Allocating once (rather than concatenating each step) keeps decoding free of per-token memory
    allocation. `length` is how many positions are filled; `GPT.forward` writes at `start_pos` and
    advances it.
    """

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_kv_head: int,
        max_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.batch_size = batch_size
        self.max_len = max_len
        self.length = 0

    def reset(self) -> None:
        """Forget every cached position (the buffers are reused, not freed)."""
        self.length = 0

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only rows `rows`, in that order (new, smaller buffers): a batch whose finished
        sequences leave it stops paying for them at every later step."""
        self.keys = [buffer.index_select(0, rows) for buffer in self.keys]
        self.values = [buffer.index_select(0, rows) for buffer in self.values]
        self.batch_size = len(rows)

    def reorder(self, rows: torch.Tensor) -> None:
        """Make row i hold what row `rows[i]` held: beam search keeps the survivors' histories."""
        filled = self.length
        for buffer in (*self.keys, *self.values):
            buffer[:, :, :filled] = buffer[rows, :, :filled]


# PyTorch's own RMSNorm forward (`aten::_fused_rms_norm`, which F.rms_norm calls), newer than the
# oldest torch this package supports. On the CPU it is the same few element-wise kernels as
# `_rms_normalise` times the weight, bitwise (checked in tests/test_model.py), but dispatched from
# C++ with no Python between them, and it returns 1/rms for a backward; it has no CPU backward.
_FUSED_RMS_NORM = hasattr(torch.ops.aten, "_fused_rms_norm")


def fused_rms_norm_applies(dtype: torch.dtype, weight: torch.Tensor) -> bool:
    """Whether `_fused_rms_norm` computes the norm of `dtype` inputs: fp32 inputs and weight on the
    CPU (it computes in the input's dtype, and warns and falls back when the two differ)."""
    return (
        _FUSED_RMS_NORM
        and weight.device.type == "cpu"
        and dtype == torch.float32
        and weight.dtype == torch.float32
        and not torch.compiler.is_compiling()
    )


def _rms_normalise(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / rms(x), 1 / rms(x)) computed in at least fp32."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps))
    return x * rstd, rstd


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm with a hand-written backward.

    PyTorch has no fused CPU kernel for `rms_norm`: its composite forward and autograd backward
    run about a dozen element-wise kernels. This backward runs five to seven (measured 2-4x
    faster forward + backward on the CPU). From `FUSED_BACKWARD_MIN_WIDTH` on, the row sums of
    g·w·x̂ it needs are one matrix-vector product of the g·x̂ the weight's gradient sums anyway,
    not a product and a mean (1.44 -> 1.13-1.17 ms at small's shape, fp32).
    """

    # `ctx` is autograd's context (Any in torch too): forward hangs on it what backward needs.
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float, feeds_matmul: bool
    ) -> torch.Tensor:
        ctx.x_dtype = x.dtype
        ctx.compiled = False
        low = feeds_matmul and torch.is_autocast_enabled("cpu")
        if (
            low
            and fused_rms_norm_applies(x.dtype, weight)
            and x.shape[-1] >= FUSED_BACKWARD_MIN_WIDTH
        ):
            # A norm whose output only enters an autocast matmul: one compiled kernel each way
            # (`kernels`), the forward writing the low-precision copy autocast would make. (With
            # an fp32 output the compiled pair measured no faster than this class's eager path.)
            out_dtype = torch.get_autocast_dtype("cpu")
            fused = kernels.rms_norm_forward(x, weight, eps, out_dtype)
            if fused is not None:
                ctx.save_for_backward(x, fused[1], weight)
                ctx.compiled = ctx.saved_input = True
                return fused[0]
        if fused_rms_norm_applies(x.dtype, weight):
            # PyTorch's forward (the residual stream is fp32 under autocast too); the backward
            # rebuilds x * rstd from the input it keeps instead of a normalised copy.
            out, rstd = torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], weight, eps)
            ctx.save_for_backward(x, rstd, weight)
            ctx.saved_input = True
            return out
        normed, rstd = _rms_normalise(x, eps)
        ctx.save_for_backward(normed, rstd, weight)
        ctx.saved_input = False
        return (normed * weight.to(normed.dtype)).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        normed, rstd, weight = ctx.saved_tensors
        if ctx.compiled:
            fused = kernels.rms_norm_backward(grad_out, normed, rstd, weight)
            if fused is not None:  # fp32 input and weight (`fused_rms_norm_applies`): no casts
                return fused[0], fused[1], None, None
        if ctx.saved_input:
            normed = normed * rstd
        # One dtype throughout: a CPU kernel mixing bf16 and fp32 operands takes a slow,
        # unvectorised path (measured: slower than the conversion pass it would save).
        grad = grad_out.to(normed.dtype)
        scale = weight.to(normed.dtype)
        grad_normed = grad * normed
        grad_weight = grad_normed.flatten(0, -2).sum(0).to(weight.dtype)
        scaled = grad * scale
        # d/dx of w·x·rstd: rstd·(g·w − x̂·mean(g·w·x̂)).
        if grad.shape[-1] >= FUSED_BACKWARD_MIN_WIDTH:
            # The row sums of g·w·x̂ as one matrix-vector product, (g·x̂) @ w.
            row_sums = grad_normed.flatten(0, -2).mv(scale).view(*grad.shape[:-1], 1)
            means = row_sums.mul_(1.0 / normed.shape[-1])
        else:
            means = (scaled * normed).mean(-1, keepdim=True)
        grad_x = torch.addcmul(scaled, normed, means, value=-1.0)
        return grad_x.mul_(rstd).to(ctx.x_dtype), grad_weight, None, None


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale, computed in fp32 whatever the input dtype."""

    def __init__(self, dim: int, eps: float, feeds_matmul: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        # True where the output only enters a linear layer (a decoder layer's two norms): under
        # autocast the norm may then hand over the low-precision copy the matmul would make.
        self.feeds_matmul = feeds_matmul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _RMSNormFunction.apply(x, self.weight, self.eps, self.feeds_matmul)
        if fused_rms_norm_applies(x.dtype, self.weight):  # PyTorch's, through its C++ binding
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        normed, _ = _rms_normalise(x, self.eps)
        return (normed * self.weight.to(normed.dtype)).to(x.dtype)


_STACKED_WEIGHTS: contextvars.ContextVar[dict[int, torch.Tensor] | None] = contextvars.ContextVar(
    "stacked_weights", default=None
)


_FROZEN_WEIGHTS: contextvars.ContextVar[dict[object, Any] | None] = contextvars.ContextVar(
    "frozen_weights", default=None
)


@contextlib.contextmanager
def frozen_weights(cache: dict[object, Any]) -> Iterator[None]:
    """A promise that no weight changes while any block holding `cache` runs (a server's models).

    Inside it, what decoding prepares from the weights (the stacked projections below,
    `stepper.DecodeStep`'s copies) is kept in `cache` and reused by every later decoding call given
    the same `cache`, in any thread, instead of being rebuilt per call: for a model served request
    after request, that rebuilding is most of the time to the first token. The copies cost their
    bytes for as long as `cache` lives. Never use it around training.
    """
    token = _FROZEN_WEIGHTS.set(cache)
    try:
        yield
    finally:
        _FROZEN_WEIGHTS.reset(token)


def frozen_weights_cache() -> dict[object, Any] | None:
    """The cache of the enclosing `frozen_weights` block, or None."""
    return _FROZEN_WEIGHTS.get()


@contextlib.contextmanager
def reuse_stacked_weights() -> Iterator[None]:
    """Within this block (one decoding call) stacked q/k/v and gate/up weights are built once.

    Decoding calls the model once per token; re-stacking the projections each time would cost as
    much as the matmul it saves. The stacked copies live only as long as the block: weights can
    change between two calls without any trace the cache could check (fused AdamW updates
    parameters in place without bumping their version counters), so nothing survives a call,
    unless the call runs inside `frozen_weights`, whose cache keeps them.
    """
    frozen = _FROZEN_WEIGHTS.get()
    token = _STACKED_WEIGHTS.set({} if frozen is None else frozen.setdefault("stacked", {}))
    try:
        yield
    finally:
        _STACKED_WEIGHTS.reset(token)


def _concat_weights(owner: nn.Module, linears: tuple[nn.Linear, ...]) -> torch.Tensor:
    """The weights of several projections stacked for one matmul.

    While training this is a cheap concatenation that autograd differentiates through; inside
    `reuse_stacked_weights` (decoding, no gradients) the stacked copy is made once per call.
    """
    weights = [linear.weight for linear in linears]
    cache = _STACKED_WEIGHTS.get()
    if cache is None or torch.compiler.is_compiling() or torch.is_grad_enabled():
        device = weights[0].device.type
        if torch.is_autocast_enabled(device) and not torch.compiler.is_compiling():
            # The autocast dtype's copy stacked directly, the copy autocast's matmul would make of
            # the fp32 stack: a pass less over it (small's gate/up: 0.45 -> 0.28 ms a forward).
            low = torch.get_autocast_dtype(device)
            return torch.cat([weight.to(low) for weight in weights])
        return torch.cat(weights)
    stacked = cache.get(id(owner))
    if stacked is None:
        stacked = cache[id(owner)] = torch.cat(weights)
    return stacked


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """HF Llama's rotary embedding, x·cos + rotate_half(x)·sin, for x laid out (B, T, heads, dim).

    rotate_half(x) = (-x2, x1) is computed as roll(x) = (x2, x1) times a sin whose first half is
    negated (`signed_sin`, prepared once per forward): one kernel instead of a negation and a
    concatenation, about a quarter faster forward and backward on the CPU.
    """
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


def _fused_backward_pays(x: torch.Tensor, width: int) -> bool:
    """Whether `x`'s uses in a model `width` wide take the hand-written backwards below: the
    model is wide enough (`FUSED_BACKWARD_MIN_WIDTH`) and autograd will differentiate them,
    outside torch.compile (whose compiled kernels fuse what they save)."""
    return (
        width >= FUSED_BACKWARD_MIN_WIDTH
        and torch.is_grad_enabled()
        and x.requires_grad
        and not torch.compiler.is_compiling()
    )


class _RotaryQKV(torch.autograd.Function):
    """Rotated queries and keys, and values, from one stacked (B, T, q + 2·kv heads, dim) output.

    The forward is `_apply_rotary` on the q/k part, split. The backward writes the three
    gradients straight into one buffer shaped like the input, where autograd concatenated q's
    and k's, ran the rotary's backward as four passes (two products, a roll, a sum), then
    concatenated again with v's. The rotation is orthogonal: its backward is x·cos +
    roll(x)·roll(signed_sin), the forward's own form. Values differ from autograd's by float
    rounding only (the sum is rounded once, not twice).
    """

    # `ctx` is autograd's context (Any in torch too): forward hangs on it what backward needs.
    @staticmethod
    def forward(
        ctx: Any, qkv: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, heads: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        kv = (qkv.shape[2] - heads) // 2
        qk, v = qkv.split((heads + kv, kv), 2)
        q, k = _apply_rotary(qk, cos, signed_sin).split((heads, kv), 2)
        ctx.save_for_backward(cos, signed_sin)
        ctx.layout = (qkv.shape, heads, kv)
        return q, k, v

    @staticmethod
    def backward(
        ctx: Any, grad_q: torch.Tensor, grad_k: torch.Tensor, grad_v: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        cos, signed_sin = ctx.saved_tensors
        shape, heads, kv = ctx.layout
        grad = torch.empty(shape, dtype=grad_q.dtype, device=grad_q.device)
        into_q, into_k, into_v = grad.split((heads, kv, kv), 2)
        half = shape[-1] // 2
        rolled_sin = signed_sin.roll(half, dims=-1)
        for incoming, into in ((grad_q, into_q), (grad_k, into_k)):
            torch.addcmul(incoming * cos, incoming.roll(half, dims=-1), rolled_sin, out=into)
        into_v.copy_(grad_v)
        return grad, None, None, None


class _SwiGLU(torch.autograd.Function):
    """silu(gate) · up from one stacked (..., 2 · ffn) gate/up output.

    Same values as autograd's, bitwise, forward and backward; the backward writes both halves of
    the gradient into one buffer where autograd concatenated them, a pass over the block's
    largest activation (measured 6.9 -> 4.7 ms forward + backward at small's shape in bf16).
    """

    # `ctx` is autograd's context (Any in torch too): forward hangs on it what backward needs.
    @staticmethod
    def forward(ctx: Any, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        activated = F.silu(gate)
        ctx.save_for_backward(gate_up, activated)
        return activated * up

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        gate_up, activated = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        grad_gate_up = torch.empty_like(gate_up)
        into_gate, into_up = grad_gate_up.chunk(2, dim=-1)
        torch.mul(grad, activated, out=into_up)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=into_gate)
        return grad_gate_up


class Attention(nn.Module):
    """Causal self-attention with rotary positions, grouped-query heads and an optional KV cache."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.n_kv_head = cfg.kv_heads
        self.head_dim = cfg.head_dim
        self.dropout = cfg.dropout
        d = cfg.n_embd
        self.q_proj = nn.Linear(d, self.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, d, bias=False)

    def _project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys (both rotated) and values, each (B, T, heads, head_dim)."""
        batch, seq, _ = x.shape
        h, kv, hd = self.n_head, self.n_kv_head, self.head_dim
        plain = nn.Linear
        if type(self.q_proj) is plain and type(self.k_proj) is plain and type(self.v_proj) is plain:
            # One matmul instead of three; one rotary pass over queries and keys together. Modules
            # that wrap these projections (LoRA) take the general path below.
            weight = _concat_weights(self, (self.q_proj, self.k_proj, self.v_proj))
            # Split, not sliced: a split's backward is one concatenation, where each slice's
            # fills a zeroed full-size gradient that autograd then adds to its sibling's.
            qkv = F.linear(x, weight).view(batch, seq, h + 2 * kv, hd)
            if _fused_backward_pays(qkv, x.shape[-1]):
                return _RotaryQKV.apply(qkv, cos, sin, h)
            qk, v = qkv.split((h + kv, kv), 2)
            q, k = _apply_rotary(qk, cos, sin).split((h, kv), 2)
            return q, k, v
        q = _apply_rotary(self.q_proj(x).view(batch, seq, h, hd), cos, sin)
        k = _apply_rotary(self.k_proj(x).view(batch, seq, kv, hd), cos, sin)
        return q, k, self.v_proj(x).view(batch, seq, kv, hd)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache | None,
        layer: int,
        start_pos: int,
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        q, k, v = self._project(x, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        mask = None
        causal = True
        if kv_cache is not None:
            end = start_pos + seq
            kv_cache.keys[layer][:, :, start_pos:end] = k
            kv_cache.values[layer][:, :, start_pos:end] = v
            k = kv_cache.keys[layer][:, :, :end]
            v = kv_cache.values[layer][:, :, :end]
            if k.dtype != q.dtype and not torch.is_autocast_enabled(q.device.type):
                k, v = k.to(q.dtype), v.to(q.dtype)
            if seq == 1:
                causal = False  # one new query may look at every cached position
            elif start_pos > 0:
                # Several new queries after a cached prefix: query i sees keys 0 .. start_pos + i.
                causal = False
                rows = torch.arange(start_pos, end, device=x.device).unsqueeze(1)
                mask = torch.arange(end, device=x.device).unsqueeze(0) <= rows
        dropout = self.dropout if self.training else 0.0
        y = attend(q, k, v, self.n_head, self.n_kv_head, mask, causal, dropout)
        y = y.transpose(1, 2).reshape(batch, seq, self.n_head * self.head_dim)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(self.gate_proj) is nn.Linear and type(self.up_proj) is nn.Linear:
            weight = _concat_weights(self, (self.gate_proj, self.up_proj))
            gate_up = F.linear(x, weight)
            if _fused_backward_pays(gate_up, x.shape[-1]):
                return self.down_proj(_SwiGLU.apply(gate_up))
            gate, up = gate_up.chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps, feeds_matmul=True)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps, feeds_matmul=True)
        self.mlp = MLP(cfg)
        self.dropout = cfg.dropout

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropout and self.training:
            return F.dropout(x, self.dropout, training=True)
        return x

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache | None = None,
        layer: int = 0,
        start_pos: int = 0,
    ) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, layer, start_pos)
        x = x + self._drop(attn)
        return x + self._drop(self.mlp(self.post_attention_layernorm(x)))


class LlamaBackbone(nn.Module):
    """The `model.` prefix of HF's names: embeddings, decoder layers, final norm."""

    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
