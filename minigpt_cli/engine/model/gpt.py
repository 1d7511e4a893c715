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

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys  # what load_state_dict returns
from torch.utils.checkpoint import checkpoint

from minigpt_cli.config import params
from minigpt_cli.config.schema import ModelConfig
from minigpt_cli.engine.model.layers import KVCache, LlamaBackbone
from minigpt_cli.engine.model.loss import IGNORE_INDEX, FusedLinearCrossEntropy

Reduction = Literal["mean", "sum", "none"]

# Under bf16 autocast on the CPU (oneDNN's kernels) every new sequence length costs memory the
# process never gets back: SFT's batches, each as wide as its longest record, grew the quickstart's
# RSS from 0.9 to 2.0 GB over 1,200 steps, where fp32 stayed flat at 0.55 GB. Padding the length
# to a multiple of 8 inside the forward (the padding after the real tokens, which causal attention
# never lets them see, and is cut off again) keeps a handful of shapes and the RSS flat.
CPU_AUTOCAST_LENGTH_MULTIPLE = 8

# The fused head and loss skip ignored positions on the CPU (see `scored_rows`), keeping a multiple
# of this many rows: a handful of matmul shapes, for the reason above.
SCORED_ROWS_MULTIPLE = 32


def language_model(model: nn.Module) -> GPT:
    """The GPT inside a `torch.compile` wrapper: stages that call its methods (`hidden_states`,
    `group_losses`) rather than its forward run them eagerly."""
    return cast(GPT, getattr(model, "_orig_mod", model))


def scored_rows(targets: torch.Tensor) -> torch.Tensor | None:
    """Indices of the rows of flat `targets` the output head must see, or None for all of them.

    SFT's records are mostly prompt and padding (IGNORE_INDEX targets: on the built-in data 186 of
    828 positions a step are answers), yet the head's products and the softmax over the vocabulary
    cost the same for an ignored row as for a scored one. The scored rows come first, then as many
    ignored ones (which add nothing) as round the count up to `SCORED_ROWS_MULTIPLE`. None when that
    saves nothing (pretraining, whose targets are all scored, keeps its exact path), off the CPU
    (counting the rows would wait for the device) and under torch.compile (a data-dependent shape).
    """
    return kept_rows(targets != IGNORE_INDEX)


def kept_rows(scored_mask: torch.Tensor) -> torch.Tensor | None:
    """`scored_rows` for a flat boolean mask of the rows that count (RL's real response tokens)."""
    if scored_mask.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    ignored = ~scored_mask
    scored = scored_mask.numel() - int(ignored.sum())
    kept = max(SCORED_ROWS_MULTIPLE, -(-scored // SCORED_ROWS_MULTIPLE) * SCORED_ROWS_MULTIPLE)
    if kept >= scored_mask.numel():
        return None
    filler = ignored.nonzero().squeeze(1)[: kept - scored]
    return torch.cat((scored_mask.nonzero().squeeze(1), filler))


class GPT(nn.Module):
    """Llama-style causal language model; parameter names match HF `LlamaForCausalLM`.

    `forward(input_ids)` gives logits; `forward(input_ids, targets)` gives `(None, loss)` (logits
    are skipped because the fused loss never builds them; pass `return_logits=True` to get them).
    With a `KVCache` the call appends to the cache, which is how generation decodes one token at a
    time in O(context) instead of O(context^2) work.
    """

    # The rotary tables are buffers (register_buffer below); declared here so their type is known.
    rope_cos: torch.Tensor
    rope_sin: torch.Tensor

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
        reference = self.model.embed_tokens.weight
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
        # The embedding, not the head: an int8 head (`quantize.Int8Linear`) computes in this dtype.
        return self.model.embed_tokens.weight.dtype

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
        hidden, padding = self._padded_hidden_states(input_ids, kv_cache, start_pos)
        return hidden[:, : hidden.shape[1] - padding] if padding else hidden

    def _padded_hidden_states(
        self, input_ids: torch.Tensor, kv_cache: KVCache | None, start_pos: int | None
    ) -> tuple[torch.Tensor, int]:
        """`hidden_states` and the positions added after the tokens (see `_length_padding`)."""
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
        padding = self._length_padding(input_ids, kv_cache, limit - start_pos)
        if padding:
            input_ids = F.pad(input_ids, (0, padding))
            seq += padding
        dtype = self._compute_dtype(input_ids.device)
        # (T, 1, head_dim): broadcasts over batch and heads of a (B, T, heads, head_dim) tensor.
        cos = self.rope_cos[start_pos : start_pos + seq].to(dtype).unsqueeze(1)
        sin = self.rope_sin[start_pos : start_pos + seq].to(dtype).unsqueeze(1)
        half = sin.shape[-1] // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)  # see layers._apply_rotary
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
        return self.model.norm(x), padding

    @staticmethod
    def _length_padding(input_ids: torch.Tensor, kv_cache: KVCache | None, room: int) -> int:
        """Positions to add after a CPU bf16/fp16 forward's tokens (see
        `CPU_AUTOCAST_LENGTH_MULTIPLE`); none with a KV cache, on other devices, or in fp32."""
        if kv_cache is not None or input_ids.device.type != "cpu":
            return 0
        if not torch.is_autocast_enabled("cpu"):
            return 0
        seq = input_ids.shape[1]
        return max(0, min(-seq % CPU_AUTOCAST_LENGTH_MULTIPLE, room - seq))

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
        seq = input_ids.shape[1]
        if targets is not None and targets.shape != input_ids.shape:
            raise ValueError(
                f"targets shape {tuple(targets.shape)} differs from input_ids "
                f"{tuple(input_ids.shape)}"
            )
        hidden, padding = self._padded_hidden_states(input_ids, kv_cache, start_pos)
        if targets is None:
            hidden = hidden[:, seq - 1 : seq] if last_only else hidden[:, :seq]
            return self.lm_head(hidden)
        if padding:  # the head and the loss keep the padded length too, the padding not scored
            targets = F.pad(targets, (0, padding), value=IGNORE_INDEX)
        logits = self.lm_head(hidden) if return_logits or reduction == "none" else None
        loss = self._loss(hidden, targets, logits, reduction)
        if padding:
            logits = None if logits is None else logits[:, :seq]
            loss = loss[:, :seq] if reduction == "none" else loss
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
            flat_hidden, flat_targets = hidden.flatten(0, 1), targets.flatten().long()
            rows = scored_rows(flat_targets)
            if rows is not None:
                flat_hidden = flat_hidden.index_select(0, rows)
                flat_targets = flat_targets.index_select(0, rows)
            total = FusedLinearCrossEntropy.apply(
                flat_hidden,
                self.lm_head.weight,
                flat_targets,
                self._compute_dtype(hidden.device),
                grad_on and hidden.requires_grad,
                grad_on and self.lm_head.weight.requires_grad,
            )
        if reduction == "mean":
            count = (targets != IGNORE_INDEX).sum().clamp(min=1)
            return total / count
        return total

    def group_losses(
        self, input_ids: torch.Tensor, targets: torch.Tensor, group_rows: Sequence[int]
    ) -> list[torch.Tensor]:
        """Summed loss of each group of consecutive rows (`group_rows` sizes), from one forward.

        For a stage that weighs groups of sequences differently (SFT's answers and its plain-text
        windows): one pass through the layers for all rows rather than one per group. A tiny
        model's step is mostly per-call work, so on the built-in SFT data the one pass (both
        groups padded to one length) made a step 64 -> 48 ms (the head on scored rows included).
        """
        if sum(group_rows) != input_ids.shape[0] or targets.shape != input_ids.shape:
            raise ValueError(
                f"groups of {list(group_rows)} rows for input_ids {tuple(input_ids.shape)} and "
                f"targets {tuple(targets.shape)}"
            )
        hidden, padding = self._padded_hidden_states(input_ids, None, None)
        if padding:
            targets = F.pad(targets, (0, padding), value=IGNORE_INDEX)
        losses, start = [], 0
        for rows in group_rows:
            stop = start + rows
            losses.append(self._loss(hidden[start:stop], targets[start:stop], None, "sum"))
            start = stop
        return losses

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

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> _IncompatibleKeys:
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
