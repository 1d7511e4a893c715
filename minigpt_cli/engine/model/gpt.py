"""The network: a Llama-style decoder with Hugging Face `LlamaForCausalLM` tensor names.

Every stage (pretrain, SFT, DPO, RLHF) trains this one module and generate/chat/eval decode with
it, so it carries the few things they need beyond a plain forward pass: a preallocated KV cache for
incremental decoding, a loss that can be summed (the Trainer normalises over a whole global batch),
per-token losses (preference and RL stages score sequences), and optional activation checkpointing
(a memory lever for the resource governor).

Why these choices:
- Llama layout (RMSNorm, rotary positions, SwiGLU, optional grouped-query attention, no biases) is
  what current small models use, and matching HF's names and rotary convention (`rotate_half`, cos
  and sin repeated over both halves of a head) makes export a rename, not a weight permutation.
- Speed on a laptop CPU comes from doing fewer, larger kernels: q/k/v (and gate/up) stay separate
  modules with HF names, but when they are plain `nn.Linear` their weights are concatenated for one
  matmul, and rotary embeddings are applied to queries and keys in one pass. The output head and the
  cross entropy run chunk by chunk in one fused autograd function, so the (tokens x vocabulary)
  logits are never materialised during training: on the `tiny` preset that tensor is most of the
  memory traffic of a step.
- Norms and the loss are computed in fp32 even under bf16 autocast, which keeps training stable.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from minigpt_cli.config import params
from minigpt_cli.config.schema import ModelConfig

IGNORE_INDEX = -100
"""Target id that contributes no loss (padding, prompt tokens in SFT): PyTorch's and HF's value."""

Reduction = Literal["mean", "sum", "none"]

# Logits the fused loss holds at once (16 MB in fp32): large enough for efficient matmuls, small
# enough to stay near the CPU caches. Measured on `tiny` (2048 rows x 5000): 512-1024 rows per
# chunk ran the head + loss forward and backward 1.7x faster than materialised logits; 2048 less.
_LOSS_CHUNK_ELEMENTS = 4 * 2**20

# scaled_dot_product_attention learnt grouped-query attention (`enable_gqa`) in PyTorch 2.5.
_SDPA_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)


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

    def reorder(self, rows: torch.Tensor) -> None:
        """Make row i hold what row `rows[i]` held: beam search keeps the survivors' histories."""
        filled = self.length
        for buffer in (*self.keys, *self.values):
            buffer[:, :, :filled] = buffer[rows, :, :filled]


def _rms_normalise(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / rms(x), 1 / rms(x)) computed in at least fp32."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps))
    return x * rstd, rstd


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm with a hand-written backward.

    PyTorch has no fused CPU kernel for `rms_norm`: its composite forward and autograd backward
    run about a dozen element-wise kernels. This runs five in backward and measured 2-4x faster
    forward + backward on the CPU, which is a few percent of a `tiny` training step (9 norms).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # type: ignore[override]
        normed, rstd = _rms_normalise(x, eps)
        ctx.save_for_backward(normed, rstd, weight)
        ctx.x_dtype = x.dtype
        return (normed * weight.to(normed.dtype)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        normed, rstd, weight = ctx.saved_tensors
        grad = grad_out.to(normed.dtype)
        grad_weight = (grad * normed).flatten(0, -2).sum(0).to(weight.dtype)
        scaled = grad * weight.to(normed.dtype)
        # d/dx of w * x * rstd: rstd * (g*w - x_hat * mean(g*w * x_hat)).
        mean = (scaled * normed).mean(-1, keepdim=True)
        grad_x = torch.addcmul(scaled, normed, mean, value=-1.0).mul_(rstd)
        return grad_x.to(ctx.x_dtype), grad_weight, None


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale, computed in fp32 whatever the input dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _RMSNormFunction.apply(x, self.weight, self.eps)
        normed, _ = _rms_normalise(x, self.eps)
        return (normed * self.weight.to(normed.dtype)).to(x.dtype)


_STACKED_WEIGHTS: contextvars.ContextVar[dict[int, torch.Tensor] | None] = contextvars.ContextVar(
    "stacked_weights", default=None
)


@contextlib.contextmanager
def reuse_stacked_weights() -> Iterator[None]:
    """Within this block (one decoding call) stacked q/k/v and gate/up weights are built once.

    Decoding calls the model once per token; re-stacking the projections each time would cost as
    much as the matmul it saves. The stacked copies live only as long as the block: weights can
    change between two calls without any trace the cache could check (fused AdamW updates
    parameters in place without bumping their version counters), so nothing survives a call.
    """
    token = _STACKED_WEIGHTS.set({})
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
            qkv = F.linear(x, weight).view(batch, seq, h + 2 * kv, hd)
            qk = _apply_rotary(qkv[:, :, : h + kv], cos, sin)
            return qk[:, :, :h], qk[:, :, h:], qkv[:, :, h + kv :]
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
        grouped = {}
        if self.n_kv_head != self.n_head:
            if _SDPA_GQA:
                grouped = {"enable_gqa": True}  # no copies of the shared keys/values
            else:
                repeats = self.n_head // self.n_kv_head
                k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=causal,
            dropout_p=self.dropout if self.training else 0.0,
            **grouped,
        )
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
            gate, up = F.linear(x, weight).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
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


# A target probability below this has lost precision (fp32 denormals) or underflowed to zero; such
# rows (a loss above ~69 nats: only a diverging model) get their loss from an exact logsumexp.
_TINY_PROBABILITY = 1e-30


def _softmax_and_losses(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax of fp32 `logits` (rows x vocab) and each row's cross entropy (0 where not valid).

    On the CPU, PyTorch's softmax kernel is 2-3x faster than log_softmax (measured: 7 vs 19 ms on
    1024 x 5000), so the loss is read off the softmax as -log p(target), falling back to an exact
    logsumexp only when some target probability is too small for that to be accurate (checking is
    free on the CPU). Elsewhere log_softmax is as fast and exact, and needs no check (which would
    synchronise a GPU, or break a torch.compile graph; compiled kernels are fused anyway).
    """
    if logits.device.type == "cpu" and not torch.compiler.is_compiling():
        probs = torch.softmax(logits, dim=-1)
        picked = probs.gather(1, target).squeeze(1)
        picked = torch.where(valid, picked, 1.0)
        if bool((picked < _TINY_PROBABILITY).any()):
            exact = torch.logsumexp(logits, dim=-1) - logits.gather(1, target).squeeze(1)
            return probs, torch.where(valid, exact, 0.0)
        return probs, -picked.log()
    logprobs = torch.log_softmax(logits, dim=-1)
    losses = torch.where(valid, -logprobs.gather(1, target).squeeze(1), 0.0)
    return logprobs.exp_(), losses


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Output head + summed cross entropy over row chunks, gradients computed in the forward pass.

    The plain path materialises (tokens x vocabulary) logits, a float copy, log-softmax and its
    gradient: several passes over the largest tensor of a small model's step. Here each chunk's
    logits are used for the loss and immediately turned into the chunk's gradient (softmax minus
    one-hot), so only the (small) gradients of the inputs are kept for backward. The result is one
    scalar, the summed loss, so the upstream gradient is a single number that scales both saved
    gradients exactly. Softmax and losses are fp32; the matmuls run in `compute_dtype` (the
    autocast dtype when autocast is on).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        compute_dtype: torch.dtype,
        need_hidden_grad: bool,
        need_weight_grad: bool,
    ) -> torch.Tensor:
        want_grad = need_hidden_grad or need_weight_grad
        rows = hidden.shape[0]
        chunk = max(1, _LOSS_CHUNK_ELEMENTS // weight.shape[0])
        h = hidden.to(compute_dtype)
        w = weight.to(compute_dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(h) if need_hidden_grad else None
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            if need_weight_grad
            else None
        )
        for start in range(0, rows, chunk):
            stop = min(start + chunk, rows)
            h_chunk = h[start:stop]
            logits = F.linear(h_chunk, w).float()
            target = targets[start:stop]
            valid = target != IGNORE_INDEX
            safe_target = torch.where(valid, target, 0).unsqueeze(1)
            probs, token_losses = _softmax_and_losses(logits, safe_target, valid)
            total += token_losses.sum()
            if want_grad:
                # d loss_i / d logits_i = softmax_i - onehot(target_i); zero for ignored rows.
                minus_one = torch.full_like(safe_target, -1, dtype=probs.dtype)
                probs.scatter_add_(1, safe_target, minus_one)
                grad_logits = probs.to(compute_dtype)
                # Ignored rows must contribute nothing: zero them on the narrow (rows x n_embd)
                # side rather than on the wide (rows x vocabulary) gradient.
                keep = valid.unsqueeze(1).to(compute_dtype)
                if grad_hidden is not None:
                    grad_hidden[start:stop] = (grad_logits @ w).mul_(keep)
                if grad_weight is not None:
                    masked_hidden = h_chunk * keep
                    if compute_dtype == torch.float32:
                        grad_weight.addmm_(grad_logits.t(), masked_hidden)
                    else:
                        grad_weight += grad_logits.t() @ masked_hidden
        ctx.save_for_backward(grad_hidden, grad_weight)  # None where not needed
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        scale = grad_total.float()
        g_hidden = None if grad_hidden is None else (grad_hidden.float() * scale).to(hidden_dtype)
        g_weight = None if grad_weight is None else (grad_weight * scale).to(weight_dtype)
        return g_hidden, g_weight, None, None, None, None


class GPT(nn.Module):
    """Llama-style causal language model; parameter names match HF `LlamaForCausalLM`.

    `forward(input_ids)` gives logits; `forward(input_ids, targets)` gives `(None, loss)` (logits
    are skipped because the fused loss never builds them; pass `return_logits=True` to get them).
    With a `KVCache` the call appends to the cache, which is how generation decodes one token at a
    time in O(context) instead of O(context^2) work.
    """

    def __init__(self, model_cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        self.config = model_cfg
        self.vocab_size = vocab_size
        self.model = LlamaBackbone(model_cfg, vocab_size)
        self.lm_head = nn.Linear(model_cfg.n_embd, vocab_size, bias=False)
        if model_cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = self._rotary_tables(model_cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @staticmethod
    def _rotary_tables(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of every position, (context, head_dim), both halves repeated as HF Llama does."""
        half = cfg.head_dim // 2
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(half, dtype=torch.float64) / half))
        positions = torch.arange(cfg.context_length, dtype=torch.float64)
        angles = torch.outer(positions, inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().float(), angles.sin().float()

    def reset_rotary(self) -> None:
        """Recompute the rotary tables in place (after `to_empty()` from the meta device)."""
        cos, sin = self._rotary_tables(self.config)
        self.rope_cos = cos.to(self.rope_cos.device)
        self.rope_sin = sin.to(self.rope_sin.device)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2/nanoGPT initialisation: N(0, init_std) for matrices, residual outputs scaled down.

        The two projections that write into the residual stream (o_proj, down_proj) get std /
        sqrt(2 * n_layer), so the stream's variance stays O(1) however deep the model is; norms
        start at 1. This is what keeps every preset stable at the default learning rate.
        """
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layer)
        for name, param in self.named_parameters():
            if param.dim() == 1:
                nn.init.ones_(param)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(param, mean=0.0, std=residual_std)
            else:
                nn.init.normal_(param, mean=0.0, std=std)

    # ----------------------------------------------------------------------------------------
    # sizes

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Trainable parameters (a shared embedding/head counted once), optionally without them."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.model.embed_tokens.weight.numel()
            if not self.config.tie_embeddings:
                total -= self.lm_head.weight.numel()
        return total

    def estimate_flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (see `config.params.flops_per_token`), for MFU."""
        return params.flops_per_token(self.config, self.vocab_size, seq_len)

    def new_kv_cache(
        self,
        batch_size: int,
        max_len: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """An empty cache for `batch_size` sequences of up to `max_len` (default: the context)."""
        reference = self.lm_head.weight
        length = self.config.context_length if max_len is None else max_len
        if not 1 <= length <= self.config.context_length:
            raise ValueError(
                f"cache length {length} must be between 1 and the context length "
                f"{self.config.context_length}"
            )
        return KVCache(
            self.config.n_layer,
            batch_size,
            self.config.kv_heads,
            length,
            self.config.head_dim,
            dtype=dtype or reference.dtype,
            device=device or reference.device,
        )

    # ----------------------------------------------------------------------------------------
    # forward

    def _compute_dtype(self, device: torch.device) -> torch.dtype:
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return self.lm_head.weight.dtype

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        *,
        kv_cache: KVCache | None = None,
        start_pos: int | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states (B, T, n_embd): what the output head reads.

        Exposed for stages that put their own head on the backbone (a reward or value model).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, time), got shape {tuple(input_ids.shape)}")
        seq = input_ids.shape[1]
        if start_pos is None:
            start_pos = kv_cache.length if kv_cache is not None else 0
        limit = kv_cache.max_len if kv_cache is not None else self.config.context_length
        if start_pos + seq > limit:
            raise ValueError(
                f"positions {start_pos}..{start_pos + seq - 1} exceed the "
                f"{'cache' if kv_cache is not None else 'context'} length {limit}"
            )
        dtype = self._compute_dtype(input_ids.device)
        # (T, 1, head_dim): broadcasts over batch and heads of a (B, T, heads, head_dim) tensor.
        cos = self.rope_cos[start_pos : start_pos + seq].to(dtype).unsqueeze(1)
        sin = self.rope_sin[start_pos : start_pos + seq].to(dtype).unsqueeze(1)
        half = sin.shape[-1] // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)  # see _apply_rotary
        x = self.model.embed_tokens(input_ids)
        recompute = (
            self.config.activation_checkpointing
            and self.training
            and kv_cache is None
            and torch.is_grad_enabled()
        )
        for index, layer in enumerate(self.model.layers):
            if recompute:
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin, kv_cache, index, start_pos)
        if kv_cache is not None:
            kv_cache.length = start_pos + seq
        return self.model.norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        kv_cache: KVCache | None = None,
        start_pos: int | None = None,
        reduction: Reduction = "mean",
        return_logits: bool = False,
        last_only: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor | None, torch.Tensor]:
        """Logits (B, T, vocab), or `(logits or None, loss)` when `targets` (B, T) are given.

        - `targets`: next-token ids; `IGNORE_INDEX` (-100) positions contribute nothing.
        - `reduction`: "mean" over non-ignored tokens, "sum" (the Trainer divides by the global
          batch's token count), or "none" for per-token losses (B, T) with 0 at ignored positions.
        - `kv_cache`/`start_pos`: write this call's keys/values at `start_pos` (default: the cache's
          current length) and attend over everything cached so far.
        - `last_only`: logits of the last position only (B, 1, vocab), what decoding needs.
        """
        hidden = self.hidden_states(input_ids, kv_cache=kv_cache, start_pos=start_pos)
        if targets is None:
            if last_only:
                hidden = hidden[:, -1:]
            return self.lm_head(hidden)
        if targets.shape != input_ids.shape:
            raise ValueError(
                f"targets shape {tuple(targets.shape)} differs from input_ids "
                f"{tuple(input_ids.shape)}"
            )
        logits = self.lm_head(hidden) if return_logits or reduction == "none" else None
        loss = self._loss(hidden, targets, logits, reduction)
        return logits, loss

    def _loss(
        self,
        hidden: torch.Tensor,
        targets: torch.Tensor,
        logits: torch.Tensor | None,
        reduction: Reduction,
    ) -> torch.Tensor:
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        if logits is not None or type(self.lm_head) is not nn.Linear:
            if logits is None:
                logits = self.lm_head(hidden)
            per_token = F.cross_entropy(
                logits.float().flatten(0, 1),
                targets.flatten().long(),
                ignore_index=IGNORE_INDEX,
                reduction="none" if reduction == "none" else "sum",
            )
            total = per_token.view_as(targets) if reduction == "none" else per_token
        else:
            grad_on = torch.is_grad_enabled()
            total = _FusedLinearCrossEntropy.apply(
                hidden.flatten(0, 1),
                self.lm_head.weight,
                targets.flatten().long(),
                self._compute_dtype(hidden.device),
                grad_on and hidden.requires_grad,
                grad_on and self.lm_head.weight.requires_grad,
            )
        if reduction == "mean":
            count = (targets != IGNORE_INDEX).sum().clamp(min=1)
            return total / count
        return total

    # ----------------------------------------------------------------------------------------
    # weights in and out

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights to save: HF names, no shared tensors (safetensors refuses them).

        With tied embeddings `lm_head.weight` is the embedding matrix, so it is left out, exactly
        as HF does for `tie_word_embeddings`; `load_state_dict` restores the tie. LoRA adapter
        tensors (`...lora_A.weight`, `...lora_B.weight`) are left out too: they live in their own
        file (engine/model/lora.py), so an adapted model still exports its plain base weights.
        """
        state = {
            name: tensor.detach()
            for name, tensor in self.state_dict().items()
            if ".lora_A." not in name and ".lora_B." not in name
        }
        if self.config.tie_embeddings:
            state.pop("lm_head.weight", None)
        return state

    def load_exported_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Inverse of `export_state_dict`: every weight must be present (strict), tie restored.

        On a LoRA-adapted model the adapter tensors are not expected (they are not exported); the
        base weights are still checked strictly.
        """
        adapters = {name for name in self.state_dict() if ".lora_A." in name or ".lora_B." in name}
        if not adapters:
            self.load_state_dict(tensors, strict=True)
            return
        result = self.load_state_dict(tensors, strict=False)
        missing = [name for name in result.missing_keys if name not in adapters]
        if missing or result.unexpected_keys:
            raise RuntimeError(
                f"Error(s) in loading state_dict for {type(self).__name__}: missing keys "
                f"{missing}, unexpected keys {result.unexpected_keys}"
            )

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        """Load weights, accepting a tied checkpoint without `lm_head.weight` (or with a copy)."""
        state = dict(state_dict)
        if self.config.tie_embeddings and "model.embed_tokens.weight" in state:
            head = state.get("lm_head.weight")
            embed = state["model.embed_tokens.weight"]
            if head is not None and head is not embed and not torch.equal(head, embed):
                raise ValueError(
                    "lm_head.weight differs from model.embed_tokens.weight, but the model "
                    "config ties them (tie_embeddings = true)"
                )
            state["lm_head.weight"] = embed
        result = super().load_state_dict(state, strict=strict, assign=assign)
        if self.config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        return result
