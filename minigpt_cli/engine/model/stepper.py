"""One decoding step (one new token per row, through the KV cache) without `nn.Module` machinery.

Profiling a batch-1 greedy decode of the `tiny` preset (torch.profiler and cProfile, 128 tokens)
showed about half of each token's time outside the matrix products: module calls and their hooks
(32 a token), dtype conversions that do nothing (57 a token), slicing, and the matrix-vector
products themselves running on `F.linear`'s (out, in) weight layout, which MKL multiplies by a
single row about 1.5-2x slower than an (in, out) copy of the same matrix (measured on the output
head, 5000 x 128, and on small's 10000 x 512). `DecodeStep` therefore prepares, once per decoding
call, the projections as (in, out) copies with q/k/v and gate/up stacked, and runs the layer
arithmetic as plain tensor calls on 2-D (batch, width) activations (a 3-D product costs a reshape
more). A later profile (tiny, torch.profiler) found the norms the costliest small calls: PyTorch's
`rms_norm` is a C++ composite of about eight kernels on the CPU, 9-10 us where the product after it
takes 3-4. Where the projection is fp32 the norm's weight is folded into the copy's rows, leaving
x / rms(x) in three kernels (`_unit_rms`), and the residual additions after the output and down
projections run inside the product (`addmm`): tiny 1,289-1,327 -> 1,463-1,517 tokens/s on one
thread, small fp32 212-215 -> 223-236 on two. It reuses the layers' rotary and attention code, so
the numbers differ from the module forward by float rounding only (summation order, the folded
weight, the norm's root squared back); greedy tokens are tested equal to the no-cache forward,
and were identical on 100 of 100 prompts of a trained tiny run.

The copies live as long as the `DecodeStep` (one `generate` call, one chat answer): weights can
change in place between two calls (see `layers.reuse_stacked_weights`), and a decode costs one
extra copy of the weights in memory while it runs. Inside `layers.frozen_weights` (a server) the
step is built once and kept. Models this cannot run exactly (training mode,
autocast, LoRA-wrapped projections, any other projection type) decode through `GPT.forward`;
`projection_of` is where a new projection kind (int8 weights) plugs in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minigpt_cli.engine.model.gpt import GPT
from minigpt_cli.engine.model.layers import (
    DecoderLayer,
    KVCache,
    RMSNorm,
    _apply_rotary,
    attend,
    frozen_weights_cache,
    fused_rms_norm_applies,
)

Projection = Callable[[torch.Tensor], torch.Tensor]


def _transposed(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """The weights stacked along their outputs, as one contiguous (in, out) matrix."""
    stacked = weights[0] if len(weights) == 1 else torch.cat(list(weights))
    return stacked.t().contiguous()


def projection_of(modules: Sequence[nn.Module]) -> Projection | None:
    """One callable computing every module's output, concatenated along the last dimension.

    Plain `nn.Linear`s (no bias) become one (in, out) matrix product; a module that knows how to
    stack itself with its own kind (`stacked_projection`, e.g. `quantize.Int8Linear`) provides its
    own. None when the modules cannot be run here (a LoRA wrapper, a bias, mixed kinds).
    """
    kinds = {type(module) for module in modules}
    if len(kinds) != 1:  # e.g. int8 q beside fp32 k/v: each its own product, then joined
        parts = [projection_of((module,)) for module in modules]
        if any(part is None for part in parts):
            return None
        return lambda x: torch.cat([part(x) for part in parts if part is not None], dim=-1)
    kind = kinds.pop()
    if kind is nn.Linear:
        linears = [module for module in modules if isinstance(module, nn.Linear)]
        if any(linear.bias is not None for linear in linears):
            return None
        matrix = _transposed([linear.weight for linear in linears])
        return lambda x: torch.matmul(x, matrix)
    stack = getattr(kind, "stacked_projection", None)
    return stack(modules) if stack is not None else None


@dataclass(frozen=True)
class _Layer:
    input_norm: Projection
    qkv: Projection
    out_added: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # residual + out(y)
    post_norm: Projection
    gate_up: Projection
    down_added: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # residual + down(h)


def norm_function(norm: RMSNorm, dtype: torch.dtype) -> Projection:
    """The norm of activations in `dtype` as one call: `F.rms_norm` where that is PyTorch's C++
    norm, bitwise equal to `RMSNorm.forward` (fp32 activations and weight, see
    `layers.fused_rms_norm_applies`), else the module's own forward."""
    weight, shape, eps = norm.weight, (norm.weight.shape[0],), norm.eps
    if not fused_rms_norm_applies(dtype, weight):
        return norm.forward
    return lambda x: F.rms_norm(x, shape, weight, eps)


def _unit_rms(eps: float, width: int, device: torch.device) -> Projection:
    """x / rms(x) in fp32, the norm without its weight (folded into the next product).

    Three kernels (vector norm, eps + norm²/width, times its reciprocal square root) where
    `F.rms_norm` runs about eight on the CPU (its C++ composite: casts, power, mean, division):
    5 against 9-10 us a call at tiny's width, nine calls a token. Equal to the module's norm to
    float rounding (the root is squared back: about one unit in the last place).
    """
    epsilon = torch.tensor(eps, dtype=torch.float32, device=device)
    inverse_width = 1.0 / width

    def unit(x: torch.Tensor) -> torch.Tensor:
        length = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        return x * torch.addcmul(epsilon, length, length, value=inverse_width).rsqrt_()

    return unit


def _normed_projection(
    norm: RMSNorm, modules: Sequence[nn.Module], dtype: torch.dtype
) -> tuple[Projection, Projection] | None:
    """(norm, projection) computing `projection(norm(x))` for 2-D activations in `dtype`.

    For fp32 bias-free `nn.Linear`s the norm's weight is folded into the rows of the (in, out)
    matrix, (x / rms · w) @ W = (x / rms) @ (w · W), so the norm is the cheap `_unit_rms`; any
    other kind keeps the module norm and `projection_of`. None when the modules cannot run here.
    """
    linears = [module for module in modules if type(module) is nn.Linear]
    weight = norm.weight
    foldable = (
        dtype == torch.float32
        and weight.dtype == torch.float32
        and len(linears) == len(modules)
        and all(linear.bias is None and linear.weight.dtype == dtype for linear in linears)
    )
    if foldable:
        matrix = _transposed([linear.weight for linear in linears]) * weight.detach()[:, None]
        unit = _unit_rms(norm.eps, weight.shape[0], weight.device)
        return unit, lambda x: torch.mm(x, matrix)
    projection = projection_of(modules)
    return None if projection is None else (norm_function(norm, dtype), projection)


def _residual_projection(
    module: nn.Module,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """`residual + module(x)` for 2-D x: one `addmm` for a plain bias-free `nn.Linear` (the
    addition inside the product's kernel), else the projection and an addition."""
    if type(module) is nn.Linear and module.bias is None:
        matrix = _transposed([module.weight])
        return lambda residual, x: torch.addmm(residual, x, matrix)
    projection = projection_of((module,))
    if projection is None:
        return None
    return lambda residual, x: residual + projection(x)


class DecodeStep:
    """`step(token_ids, cache)`: logits (B, vocab) of one new token per row, appended to `cache`.

    Build it with `DecodeStep.for_model(model)`, which falls back to the module forward when the
    model cannot be run here; either way the call means the same as
    `model(token_ids.unsqueeze(1), kv_cache=cache)[:, -1]`.
    """

    def __init__(
        self, model: GPT, layers: list[_Layer], final_norm: Projection, head: Projection
    ) -> None:
        config = model.config
        self._model = model
        self._layers = layers
        self._final_norm = final_norm
        self._head = head
        self._embedding = model.model.embed_tokens.weight
        self._heads = (config.n_head, config.kv_heads, config.head_dim)
        # Every position's rotary rows in the compute dtype, the sine's first half negated (the
        # layout `layers._apply_rotary` takes, as GPT.hidden_states prepares it each forward).
        dtype = model.model.embed_tokens.weight.dtype
        half = config.head_dim // 2
        sin = model.rope_sin.to(dtype)
        self._cos = model.rope_cos.to(dtype).unsqueeze(1)
        self._sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1).unsqueeze(1)

    @classmethod
    def for_model(cls, model: GPT) -> Callable[[torch.Tensor, KVCache], torch.Tensor]:
        """The fast step for `model` in its current weights, or the module forward; inside
        `layers.frozen_weights` the step built by an earlier call is reused."""
        frozen = frozen_weights_cache()
        key = ("decode_step", id(model))
        if frozen is not None and key in frozen and not model.training:
            step: DecodeStep | None = frozen[key]
        else:
            step = cls._build(model)
            if frozen is not None and step is not None:
                frozen[key] = step
        if step is not None:
            return step

        def forward(token_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
            logits = model(token_ids.unsqueeze(1), kv_cache=cache)
            assert isinstance(logits, torch.Tensor)  # no targets: logits only
            return logits[:, -1]

        return forward

    @classmethod
    def _build(cls, model: GPT) -> DecodeStep | None:
        device = model.model.embed_tokens.weight.device
        if model.training or torch.is_autocast_enabled(device.type):
            return None
        if type(model.model.embed_tokens) is not nn.Embedding:
            return None
        dtype = model.model.embed_tokens.weight.dtype  # the activations' dtype
        layers = []
        for block in model.model.layers:
            assert isinstance(block, DecoderLayer)
            attention, mlp = block.self_attn, block.mlp
            attention_in = _normed_projection(
                block.input_layernorm, (attention.q_proj, attention.k_proj, attention.v_proj), dtype
            )
            mlp_in = _normed_projection(
                block.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj), dtype
            )
            out_added = _residual_projection(attention.o_proj)
            down_added = _residual_projection(mlp.down_proj)
            if attention_in is None or mlp_in is None or out_added is None or down_added is None:
                return None
            layers.append(_Layer(*attention_in, out_added, *mlp_in, down_added))
        head = _normed_projection(model.model.norm, (model.lm_head,), dtype)
        return None if head is None else cls(model, layers, *head)

    def __call__(self, token_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        heads, kv_heads, head_dim = self._heads
        batch = token_ids.shape[0]
        position = cache.length
        if position >= cache.max_len:
            raise ValueError(f"position {position} exceeds the cache length {cache.max_len}")
        end = position + 1
        cos, sin = self._cos[position:end], self._sin[position:end]  # (1, 1, head_dim)
        qk_heads = heads + kv_heads
        x = F.embedding(token_ids, self._embedding)  # (B, dim): 2-D products throughout
        for layer, keys, values in zip(self._layers, cache.keys, cache.values, strict=True):
            qkv = layer.qkv(layer.input_norm(x)).view(batch, 1, -1, head_dim)
            qk, v = qkv.split_with_sizes((qk_heads, kv_heads), 2)
            q, k = _apply_rotary(qk, cos, sin).split_with_sizes((heads, kv_heads), 2)
            # Written into the cache's slot for this position, then read back up to it.
            keys.select(2, position).copy_(k.squeeze(1))
            values.select(2, position).copy_(v.squeeze(1))
            k, v = keys.narrow(2, 0, end), values.narrow(2, 0, end)
            if k.dtype != x.dtype:  # a cache kept in another dtype, as GPT.forward allows
                k, v = k.to(x.dtype), v.to(x.dtype)
            y = attend(q.transpose(1, 2), k, v, heads, kv_heads)  # (B, heads, 1, head_dim)
            x = layer.out_added(x, y.reshape(batch, heads * head_dim))
            gate, up = layer.gate_up(layer.post_norm(x)).chunk(2, dim=-1)
            x = layer.down_added(x, F.silu(gate).mul_(up))
        cache.length = end
        return self._head(self._final_norm(x))
