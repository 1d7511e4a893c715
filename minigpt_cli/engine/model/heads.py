"""The heads RLHF puts on the policy's network: a reward model's scalar score, PPO's value head.

Both reuse the GPT's `hidden_states` (its trunk) and add one linear layer to n_embd -> 1:

- `RewardModel`: backbone + `score`; the reward of a sequence is the head applied to the final
  hidden state of its last real token (the only position that has read the whole reply), as HF's
  `LlamaForSequenceClassification` and TRL's reward trainer do. Its exported tensors are HF's
  names for that class (`model.*` and `score.weight`), so a reward run's `model.safetensors`
  exports by renaming nothing. `reward_model_from_policy` builds one from (a copy of) the policy.
- `PolicyWithValue`: the PPO model, the policy plus a value head on the same trunk; `policy_of`
  unwraps it (or returns a GRPO policy as it is).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import cast

import torch
from torch import nn

from minigpt_cli.config.schema import ModelConfig
from minigpt_cli.engine.model.gpt import GPT
from minigpt_cli.engine.model.lora import has_lora, merge_lora

SCORE_WEIGHT = "score.weight"
"""The scalar head's tensor, HF `LlamaForSequenceClassification`'s name for it."""

_LM_HEAD_WEIGHT = "lm_head.weight"


class RewardModel(nn.Module):
    """A GPT backbone with a linear scalar head; `forward(ids, lengths)` gives one score per row.

    The backbone is the GPT itself (its `hidden_states`), so everything a Trainer or checkpoint
    touches works unchanged: `config` is the backbone's (activation checkpointing toggles act on
    it), `vocab_size`, `export_state_dict()` / `load_exported_state_dict()`. The language-model
    head is not used: tied to the embeddings it costs nothing; untied it is frozen and not
    exported, like HF's sequence-classification layout.

    LoRA adapters are refused: a Trainer would save only the adapter file and lose the head.
    `reward_model_from_policy` merges a LoRA policy's adapters first.
    """

    def __init__(self, backbone: GPT) -> None:
        super().__init__()
        if has_lora(backbone):
            raise ValueError(
                "the backbone has LoRA adapters: merge them first (reward_model_from_policy does)"
            )
        self.backbone = backbone
        self.config: ModelConfig = backbone.config
        self.vocab_size = backbone.vocab_size
        width = backbone.config.n_embd
        self.score = nn.Linear(width, 1, bias=False)
        # Ziegler et al. 2019 (lm-human-preferences): std 1/sqrt(d + 1), so initial scores are
        # O(1) and the backbone gets a gradient from the first step.
        nn.init.normal_(self.score.weight, std=1.0 / math.sqrt(width + 1))
        self.score.to(device=backbone.lm_head.weight.device, dtype=backbone.lm_head.weight.dtype)
        if not backbone.config.tie_embeddings:
            backbone.lm_head.requires_grad_(False)

    @property
    def _tied(self) -> bool:
        return bool(self.config.tie_embeddings)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameters the reward depends on: the backbone (no untied output head) and the head."""
        total = self.backbone.num_parameters(exclude_embeddings) + self.score.weight.numel()
        if not self._tied and not exclude_embeddings:
            total -= self.backbone.lm_head.weight.numel()
        return total

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) fp32 scores of right-padded `input_ids` (B, T) with `lengths` real ids per row.

        Causal attention means a real token never sees the padding after it, so neither the
        padding's ids nor its amount change a score. `lengths=None`: every row is full.
        """
        hidden = self.backbone.hidden_states(input_ids)
        batch, width = input_ids.shape
        if lengths is None:
            last = torch.full((batch,), width - 1, dtype=torch.long, device=input_ids.device)
        else:
            lengths = lengths.to(device=input_ids.device, dtype=torch.long)
            if lengths.shape != (batch,) or bool(((lengths < 1) | (lengths > width)).any()):
                raise ValueError(
                    f"lengths must be (batch,) = ({batch},) values in 1..{width}, got "
                    f"{lengths.tolist()}"
                )
            last = lengths - 1
        picked = hidden[torch.arange(batch, device=hidden.device), last]
        return self.score(picked).squeeze(-1).float()

    def position_scores(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) fp32: the head applied at every position (a value model's per-token values).

        InstructGPT initialises PPO's value function from the reward model; this is that use.
        """
        return self.score(self.backbone.hidden_states(input_ids)).squeeze(-1).float()

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """HF `LlamaForSequenceClassification` tensors: the backbone's `model.*`, `score.weight`."""
        state = self.backbone.export_state_dict()
        state.pop(_LM_HEAD_WEIGHT, None)
        state[SCORE_WEIGHT] = self.score.weight.detach()
        return state

    def load_exported_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Inverse of `export_state_dict`; strict (every tensor present, nothing extra)."""
        if SCORE_WEIGHT not in tensors:
            raise RuntimeError(f"no {SCORE_WEIGHT}: these are not a reward model's weights")
        backbone = {name: t for name, t in tensors.items() if name != SCORE_WEIGHT}
        if not self._tied:
            # Not part of the reward: keep the current (frozen) head so the GPT loads strictly.
            backbone[_LM_HEAD_WEIGHT] = self.backbone.lm_head.weight.detach()
        self.backbone.load_exported_state_dict(backbone)
        with torch.no_grad():
            self.score.weight.copy_(tensors[SCORE_WEIGHT])


def reward_model_from_policy(policy: GPT) -> RewardModel:
    """A trainable reward model initialised from (a copy of) the policy, LoRA adapters merged.

    The policy itself is left untouched (it is trained next, by PPO). Draws the head's
    initialisation from torch's global generator: seed first for a reproducible run.
    """
    backbone = copy.deepcopy(policy)
    if has_lora(backbone):
        merge_lora(backbone)
    backbone.requires_grad_(True)
    model = RewardModel(backbone)
    model.train(policy.training)
    return model


class PolicyWithValue(nn.Module):
    """The PPO model: the policy GPT plus a scalar value head on its final hidden states.

    Sharing the trunk keeps one model in memory (early TRL's `ValueHead` design) instead of a
    second network of the policy's size. The run's `model.safetensors` (or adapter) stays a plain
    language model that generate/chat/eval load; the head is saved beside it.
    """

    policy: GPT
    value_head: nn.Linear

    def __init__(self, policy: GPT) -> None:
        super().__init__()
        self.policy = policy
        self.value_head = nn.Linear(policy.config.n_embd, 1, bias=False)
        nn.init.zeros_(self.value_head.weight)  # values start at 0: returns are learned from there

    @property
    def config(self) -> ModelConfig:
        return self.policy.config

    @property
    def vocab_size(self) -> int:
        return int(self.policy.vocab_size)


def policy_of(model: nn.Module) -> GPT:
    """The language model inside a PPO wrapper (or the model itself for GRPO)."""
    if isinstance(model, PolicyWithValue):
        return model.policy
    # A GRPO policy: the GPT itself, or torch.compile's wrapper of it (a Trainer's loss gets that),
    # which forwards every attribute to the GPT.
    return cast(GPT, model)
