"""One decoding step (one new token per row, through the KV cache) without `nn.Module` machinery.

Profiling a batch-1 greedy decode of the `tiny` preset (torch.profiler and cProfile, 128 tokens)
showed about half of each token's time outside the matrix products: module calls and their hooks
(32 a token), dtype conversions that do nothing (57 a token), slicing, and the matrix-vector
products themselves running on `F.linear`'s (out, in) weight layout, which MKL multiplies by a
single row about 1.5-2x slower than an (in, out) copy of the same matrix (measured on the output
head, 5000 x 128, and on small's 10000 x 512). `DecodeStep` therefore prepares, once per decoding
call, the projections as (in, out) copies with q/k/v and gate/up stacked, and runs the layer
arithmetic as plain tensor calls. It reuses the layers' own norm, rotary and attention code, so the
numbers differ from the module forward only by the matrix product's summation order (logits agree
to float rounding; greedy tokens are tested equal to the no-cache forward).

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
    out: Projection
    post_norm: Projection
    gate_up: Projection
    down: Projection


def norm_function(norm: RMSNorm, dtype: torch.dtype) -> Projection:
    """The norm of activations in `dtype` as one call: `F.rms_norm` where that is PyTorch's C++
    norm, bitwise equal to `RMSNorm.forward` (fp32 activations and weight, see
    `layers.fused_rms_norm_applies`: 18 -> 10 us a call at small's width, no Python between its
    kernels; 13 calls a token of `small`), else the module's own forward."""
    weight, shape, eps = norm.weight, (norm.weight.shape[0],), norm.eps
    if not fused_rms_norm_applies(dtype, weight):
        return norm.forward
    return lambda x: F.rms_norm(x, shape, weight, eps)


class DecodeStep:
    """`step(token_ids, cache)`: logits (B, vocab) of one new token per row, appended to `cache`.

    Build it with `DecodeStep.for_model(model)`, which falls back to the module forward when the
    model cannot be run here; either way the call means the same as
    `model(token_ids.unsqueeze(1), kv_cache=cache)[:, -1]`.
    """

    def __init__(self, model: GPT, layers: list[_Layer], head: Projection) -> None:
        config = model.config
        self._model = model
        self._layers = layers
        self._head = head
        self._embedding = model.model.embed_tokens.weight
        self._final_norm = norm_function(model.model.norm, self._embedding.dtype)
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
            parts = (
                projection_of((attention.q_proj, attention.k_proj, attention.v_proj)),
                projection_of((attention.o_proj,)),
                projection_of((mlp.gate_proj, mlp.up_proj)),
                projection_of((mlp.down_proj,)),
            )
            if any(part is None for part in parts):
                return None
            qkv, out, gate_up, down = parts
            assert qkv is not None and out is not None and gate_up is not None and down is not None
            input_norm = norm_function(block.input_layernorm, dtype)
            post_norm = norm_function(block.post_attention_layernorm, dtype)
            layers.append(_Layer(input_norm, qkv, out, post_norm, gate_up, down))
        head = projection_of((model.lm_head,))
        return None if head is None else cls(model, layers, head)

    def __call__(self, token_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        heads, kv_heads, head_dim = self._heads
        batch = token_ids.shape[0]
        position = cache.length
        if position >= cache.max_len:
            raise ValueError(f"position {position} exceeds the cache length {cache.max_len}")
        end = position + 1
        cos, sin = self._cos[position:end], self._sin[position:end]  # (1, 1, head_dim)
        qk_heads = heads + kv_heads
        x = F.embedding(token_ids.unsqueeze(1), self._embedding)
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
            y = attend(q.transpose(1, 2), k, v, heads, kv_heads)
            x = x + layer.out(y.transpose(1, 2).reshape(batch, 1, heads * head_dim))
            gate, up = layer.gate_up(layer.post_norm(x)).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate).mul_(up))
        cache.length = end
        return self._head(self._final_norm(x))[:, 0]
