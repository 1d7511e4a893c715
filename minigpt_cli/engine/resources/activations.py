"""Bytes one micro-batch's forward and backward hold, counted tensor by tensor from the model code.

The activations term of the memory estimate (`estimate.py`), kept apart because it mirrors the
model line by line: `model/layers.py` decides which tensors autograd saves, this module counts them
(a test checks the count against saved-tensor hooks on the real model), so a change to one is a
change to the other. Plain arithmetic on the config, like the estimate: no torch import.
"""

from __future__ import annotations

from dataclasses import dataclass

from minigpt_cli.config.schema import ModelConfig

MMAP_MAX_BYTES = 32 * 2**20
"""glibc's ceiling for its adaptive mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX): blocks
at least this large always get their own mapping, so they neither fragment the heap nor stay
resident once freed."""

LOSS_CHUNK_ROWS = 256
"""Rows of logits the fused loss holds at once, at most (`engine.model.loss` reads it from here, so
the count and the code cannot drift apart; why 256 is said there)."""

LOSS_GRAD_GROUP_ROWS = 512
"""Under autocast, rows whose logit gradients the fused loss gathers (in the compute dtype) for one
product of the head's gradient. Measured on an AMX CPU, `small`'s bf16 training step (2,048 rows,
10,000 words, interleaved 24 steps each): 578 ms a product per 256-row chunk, 560 ms at 512, 559
at 1,024, 555 at 2,048; each product is a (vocabulary x width) matrix converted and added into the
fp32 sum, as costly as the chunk's matmul."""

LOSS_GRAD_GROUP_MIN_WEIGHTS = 2**21
"""Heads with fewer weights keep one product per chunk: at `tiny`'s 5,000 x 128 the conversions are
cheap (head and loss of 1,024 rows: 13.8 ms either way, bf16), and a grouping changes the bf16
rounding of the head's gradient, so every seed's run would take another (equally accurate) path."""


def loss_grad_grouped(vocab_size: int, n_embd: int) -> bool:
    """Whether the fused loss gathers chunks for the head's gradient under autocast (see above)."""
    return vocab_size * n_embd >= LOSS_GRAD_GROUP_MIN_WEIGHTS


ATTENTION_KEY_BLOCK = 64
"""Keys per block of the blocked attention backward (`engine.model.attention._blocked_backward`,
which runs where compiled kernels are unavailable): at `small`'s shape 64 measured 10.4-11.0 ms a
layer, 128 10.7-12.1 and the whole 256 in one block 13.7-13.9."""


def half_attention_backward(head_dim: int, seq_len: int, bf16: bool) -> str:
    """Which backward a causal bf16 (or fp16, `bf16` false) CPU attention of this shape runs
    (`engine.model.attention`, where the measurements are): "fp32" (PyTorch's fp32 kernel) for
    heads narrower than 64 or sequences of 128 positions or fewer, "square" (batched products
    over whole positions x positions squares, bf16 only) up to 256 positions, "kernel" (PyTorch's
    own) beyond, where the squares measured slower (`medium`'s 512: 134-137 against 92-96 ms
    forward and backward), and for fp16. One rule for the model and for this count."""
    if head_dim < 64 or seq_len <= 128:
        return "fp32"
    return "square" if seq_len <= 256 and bf16 else "kernel"


_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def _dtype_bytes(precision: str) -> int:
    try:
        return _DTYPE_BYTES[precision]
    except KeyError:
        raise ValueError(
            f"precision must be one of {', '.join(_DTYPE_BYTES)}, got {precision!r}"
        ) from None


def _layer_tensors(cfg: ModelConfig, compute: int) -> list[int]:
    """Bytes per token of each tensor autograd saves in one decoder layer (`DecoderLayer`).

    Counted from what each op keeps for backward (checked with saved-tensor hooks):
    - each RMSNorm: the fp32 normalised input and 1/rms, and its output, which the next matmul
      saves (in the compute dtype);
    - attention: the fused q/k/v projection (its whole storage stays alive: v is a view of it),
      the rotated queries and keys (one tensor), SDPA's output (which o_proj saves) and its fp32
      log-sum-exp per head (the CPU flash kernel: no T x T matrix, grouped heads included);
    - SwiGLU: the fused gate/up output (silu saves a view of it), silu(gate), and silu(gate) * up
      (which down_proj saves).
    The residual stream itself is saved by nothing.
    """
    d, f, hd = cfg.n_embd, cfg.ffn_dim, cfg.head_dim
    heads, kv = cfg.n_head, cfg.kv_heads
    norm = [4 * d, 4, compute * d]
    attention = [
        compute * (heads + 2 * kv) * hd,
        compute * (heads + kv) * hd,
        compute * heads * hd,
        4 * heads,
    ]
    mlp = [compute * 2 * f, compute * f, compute * f]
    return norm + attention + norm + mlp


def _saved_per_layer_fixed(cfg: ModelConfig, compute: int) -> int:
    """Bytes saved per layer whatever the batch: the concatenated q/k/v and gate/up weights
    (`model.layers._concat_weights` makes them per forward and the matmul saves them)."""
    d, f, hd = cfg.n_embd, cfg.ffn_dim, cfg.head_dim
    qkv = (cfg.n_head + 2 * cfg.kv_heads) * hd * d
    stacked = compute * (qkv + 2 * f * d)
    if compute != 4:
        # Autocast caches a low-precision copy of each plain weight (o_proj, down_proj).
        stacked += compute * (cfg.n_head * hd * d + f * d)
    return stacked


@dataclass(frozen=True)
class ActivationBytes:
    """One micro-batch's activations: saved for backward, the short-lived working set on top, and
    how much of the saved bytes sit in blocks glibc maps on their own (>= MMAP_MAX_BYTES)."""

    saved: int
    working_set: int
    mapped: int

    @property
    def live(self) -> int:
        return self.saved + self.working_set

    @property
    def heap(self) -> int:
        """Live bytes served from the heap (what fragments and stays resident)."""
        return self.live - self.mapped


def activation_bytes(
    model_cfg: ModelConfig,
    vocab_size: int,
    *,
    tokens: int,
    precision: str = "fp32",
    activation_checkpointing: bool = False,
) -> ActivationBytes:
    """Live bytes of one micro-batch of `tokens` tokens (see `ActivationBytes`).

    The working set is the largest short-lived allocation on top of what is saved: a chunk of
    logits and their softmax in the fused loss (fp32; under autocast also the low-precision
    logits, and the gradients of a group of chunks), the SwiGLU backward of the last layer
    (gradients of gate/up, silu and their product), or a bf16/fp16 attention backward run in fp32
    or over whole positions x positions squares, whichever is larger.
    """
    compute = _dtype_bytes(precision)
    d, f = model_cfg.n_embd, model_cfg.ffn_dim
    layers = model_cfg.n_layer
    per_layer = [tokens * size for size in _layer_tensors(model_cfg, compute)]
    layer_saved = sum(per_layer) + _saved_per_layer_fixed(model_cfg, compute)
    layer_mapped = sum(size for size in per_layer if size >= MMAP_MAX_BYTES)
    if activation_checkpointing:
        # Each layer keeps only its fp32 input; backward recomputes one layer at a time.
        inputs = tokens * 4 * d
        saved = layers * inputs + layer_saved
        mapped = layers * inputs * (inputs >= MMAP_MAX_BYTES) + layer_mapped
    else:
        saved = layers * layer_saved
        mapped = layers * layer_mapped
    # Embedding (its int64 ids), final norm (fp32 normalised input, 1/rms) and the fused loss,
    # which keeps d(loss)/d(hidden) in the compute dtype and d(loss)/d(head) in fp32.
    saved += tokens * (8 + 4 * d + 4 + compute * d) + 4 * vocab_size * d
    rows = min(tokens, LOSS_CHUNK_ROWS)
    loss_chunk = rows * vocab_size * 8  # fp32 logits and softmax
    if compute != 4:  # the chunk's logits, and the group's logit gradients, in the compute dtype
        group = rows
        if loss_grad_grouped(vocab_size, d):
            group = min(tokens, max(rows, LOSS_GRAD_GROUP_ROWS))
        loss_chunk += (rows + group) * vocab_size * compute
    mlp_backward = tokens * compute * 3 * f
    attention_backward = 0
    path = half_attention_backward(
        model_cfg.head_dim, model_cfg.context_length, bf16=precision == "bf16"
    )
    if compute != 4 and model_cfg.kv_heads == model_cfg.n_head:
        per_head = tokens * model_cfg.n_head * model_cfg.head_dim
        if path == "fp32":
            # `model.attention._HalfAttentionFp32Backward`: fp32 copies of q, k, v, the output and
            # its gradient, and the three fp32 gradients, for one layer at a time.
            attention_backward = per_head * 4 * 8
        elif path == "square":
            # `model.attention._square_backward`: flat bf16 copies of q, k, v and the output's
            # gradient, fp32 q and k for the scores, the three bf16 gradients (22 bytes an
            # element), and over every (query, key) pair the fp32 scores and the bf16 dO·vᵀ,
            # probabilities and scores' gradient (10 bytes). Without compiled kernels
            # `_blocked_backward` runs: the same copies, fp32 row sums and q gradient (32 bytes
            # an element), and 14 bytes for each key of one key block. The larger of the two.
            squares = tokens * model_cfg.n_head * model_cfg.context_length
            block = tokens * model_cfg.n_head * min(ATTENTION_KEY_BLOCK, model_cfg.context_length)
            attention_backward = max(per_head * 22 + squares * 10, per_head * 32 + block * 14)
    return ActivationBytes(saved, max(loss_chunk, mlp_backward, attention_backward), mapped)


def evaluation_bytes(
    model_cfg: ModelConfig, vocab_size: int, *, tokens: int, precision: str = "fp32"
) -> int:
    """Live bytes of a forward pass without gradients over `tokens` tokens (validation).

    Nothing is saved, so the peak is the larger of one layer's tensors alive at once (the residual
    stream, the norm's fp32 output and its compute-dtype copy, then gate/up, silu and their product)
    and the fused loss's chunk of logits and softmax beside the final hidden states.
    """
    compute = _dtype_bytes(precision)
    d, f, hd = model_cfg.n_embd, model_cfg.ffn_dim, model_cfg.head_dim
    heads, kv = model_cfg.n_head, model_cfg.kv_heads
    attention = 4 * 2 * d + compute * (
        d + (heads + 2 * kv) * hd + 2 * (heads + kv) * hd + heads * hd
    )
    mlp = 4 * 2 * d + compute * (d + 4 * f)
    rows = min(tokens, LOSS_CHUNK_ROWS)
    loss = rows * vocab_size * (8 + (compute if compute != 4 else 0)) + tokens * (4 + compute) * d
    return max(tokens * max(attention, mlp), loss)
