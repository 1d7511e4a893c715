"""The reward model of RLHF: the policy's backbone with a scalar head, trained on preference pairs.

InstructGPT's recipe on the user's own small model: copy the starting policy, replace its output
head with a linear `score` head (n_embd -> 1), and train the whole network so that the chosen reply
of each pair scores above the rejected one (Bradley-Terry). PPO then asks it for the reward of
each sampled response.

The pieces (`minigpt rlhf` assembles them):

- `RewardModel`: backbone + `score`; the reward of a sequence is the head applied to the final
  hidden state of its last real token (the only position that has read the whole reply), as HF's
  `LlamaForSequenceClassification` and TRL's reward trainer do. Its exported tensors are HF's
  names for that class (`model.*` and `score.weight`), so a reward run's `model.safetensors`
  exports by renaming nothing.
- `bradley_terry_loss` / `reward_metrics`: -log sigmoid(score_chosen - score_rejected) and the
  held-out figures (`pref_accuracy`, ties counting as wrong, as in DPO).
- `RewardStage`: the Trainer's `Stage`, on the same pairs as DPO (`dpo.build_pairs`, built one id
  shorter by `build_reward_pairs` because the reward model reads every id, the last included) and
  the same resumable order (`dpo.PairOrder`).
- `score_texts`: batched, gradient-free scores of token sequences (rollouts).
- `load_reward_model`: a trained reward model from its run directory, safetensors only.

Loss normalisation: `loss` returns the sum of per-pair losses and `loss_normaliser` the number of
pairs, so the Trainer optimises the mean loss per pair however a step is split into micro-batches.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from minigpt_cli.engine.stages.dpo import (
    PairOrder,
    PairStage,
    PairStats,
    PreferencePair,
    build_pairs,
    pad_pairs,
    preference_metrics,
)
from minigpt_cli.engine.training.trainer import EVAL_BATCH, Batch
from minigpt_cli.errors import UserError

if TYPE_CHECKING:
    from minigpt_cli.config.schema import Config, ModelConfig
    from minigpt_cli.engine.data.tokenizer import Tokenizer
    from minigpt_cli.engine.model.gpt import GPT

SCORE_WEIGHT = "score.weight"
"""The scalar head's tensor, HF `LlamaForSequenceClassification`'s name for it."""

_LM_HEAD_WEIGHT = "lm_head.weight"


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


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
        from minigpt_cli.engine.model.lora import has_lora

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
    from minigpt_cli.engine.model.lora import has_lora, merge_lora

    backbone = copy.deepcopy(policy)
    if has_lora(backbone):
        merge_lora(backbone)
    backbone.requires_grad_(True)
    model = RewardModel(backbone)
    model.train(policy.training)
    return model


# ----------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """(B,) per-pair losses -log sigmoid(chosen - rejected): the Bradley-Terry likelihood of the
    human choice when P(chosen preferred) = sigmoid(score difference) (InstructGPT, TRL)."""
    return -F.logsigmoid(chosen_scores.float() - rejected_scores.float())


def reward_metrics(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> dict[str, float]:
    """`pref_accuracy` (chosen strictly above rejected; a tie is wrong), mean `margin`,
    `chosen_score` and `rejected_score`: DPO's figures (`dpo.preference_metrics`) under the
    reward model's names."""
    metrics = preference_metrics(chosen_scores, rejected_scores)
    return {
        "pref_accuracy": metrics["pref_accuracy"],
        "margin": metrics["margin"],
        "chosen_score": metrics["chosen_reward"],
        "rejected_score": metrics["rejected_reward"],
    }


# ----------------------------------------------------------------------------------------------
# Data and the stage
# ----------------------------------------------------------------------------------------------


def build_reward_pairs(
    records: Sequence[dict],
    tokenizer: Any,
    context_length: int,
    max_prompt_tokens: int | None = None,
) -> tuple[list[PreferencePair], PairStats]:
    """`dpo.build_pairs` for a reward model: sequences of at most `context_length` ids.

    DPO's sequences hold `context + 1` ids because a language model reads `ids[:-1]` to predict
    `ids[1:]`; the reward model reads every id (the last is the one it scores), so the pairs are
    built for one id less. Same truncation rules, same counts.
    """
    return build_pairs(records, tokenizer, context_length - 1, max_prompt_tokens)


def _lengths(pairs: Sequence[PreferencePair]) -> torch.Tensor:
    """Real ids per row of `pad_pairs(pairs)`: the chosen sequences, then the rejected ones."""
    chosen = [len(p.chosen_ids) for p in pairs]
    rejected = [len(p.rejected_ids) for p in pairs]
    return torch.tensor(chosen + rejected, dtype=torch.long)


class RewardStage(PairStage):
    """Batches of preference pairs; the Bradley-Terry loss of the reward model's two scores.

    Order: `dpo.PairOrder` (a per-epoch permutation, a pure function of (seed, epoch)), so
    `data_state` replays the exact batches, accumulation equals one big batch, and a resume on
    changed data is refused. A batch holds the chosen and rejected sequences padded together
    (2n rows, chosen first), their lengths and the pair indices.

    `center_coef` > 0 adds TRL's `center_rewards_coefficient` term, coef * (chosen + rejected)^2
    per pair, which keeps scores centred on 0 (the loss only sees differences) so that PPO's
    rewards start on a sensible scale. `val_loss` reports the Bradley-Terry loss alone.
    """

    name = "reward"
    evaluate_at_start = True  # the untrained head's held-out accuracy: the "before" (about chance)

    def __init__(
        self,
        train_pairs: Sequence[PreferencePair],
        val_pairs: Sequence[PreferencePair],
        *,
        seq_len: int,
        seed: int,
        pad_id: int,
        eval_pairs: int | None = None,
        center_coef: float = 0.0,
        eval_batch: int = EVAL_BATCH,
    ) -> None:
        if not train_pairs:
            raise UserError(
                "no reward-model training pairs (all were empty or identical after truncation)"
            )
        if not val_pairs:
            raise UserError("no reward-model validation pairs (add data or pass --val-data)")
        if center_coef < 0:
            raise ValueError(f"center_coef must be >= 0, got {center_coef}")
        longest = max(
            max(len(p.chosen_ids), len(p.rejected_ids)) for p in [*train_pairs, *val_pairs]
        )
        if longest > seq_len:
            raise ValueError(
                f"a pair holds {longest} ids, more than the context ({seq_len}): build reward "
                "pairs with build_reward_pairs(records, tokenizer, context_length)"
            )
        self.train_pairs = list(train_pairs)
        self.seq_len = seq_len
        # Scored reply tokens per pair: what the Trainer plans --max-tokens and throughput with.
        self.mean_loss_tokens = float(
            np.mean([p.chosen_mask.sum() + p.rejected_mask.sum() for p in self.train_pairs])
        )
        self.pad_id = pad_id
        self.center_coef = center_coef
        count = len(val_pairs) if eval_pairs is None else min(len(val_pairs), max(1, eval_pairs))
        picks = np.linspace(0, len(val_pairs) - 1, count).round().astype(np.int64)
        self.val_pairs = [val_pairs[i] for i in sorted(set(picks.tolist()))]
        self.eval_batch = eval_batch  # pairs per evaluation forward; the caller may lower it
        self.order = PairOrder(self.train_pairs, seed, "reward-model")

    # ------------------------------------------------------------------------------ batches

    def next_batch(self, num_sequences: int) -> Batch:
        """The next `num_sequences` pairs (2 x that many sequences)."""
        indices = self.order.take(num_sequences)
        pairs = [self.train_pairs[i] for i in indices]
        ids, mask = pad_pairs(pairs, self.pad_id)
        return {
            "ids": ids,
            "mask": mask,
            "lengths": _lengths(pairs),
            "pair_index": torch.tensor(indices, dtype=torch.long),
        }

    def count_tokens(self, batch: Batch) -> int:
        """Reply tokens in the batch (both replies): throughput and --max-tokens, as in DPO."""
        return int(batch["mask"].sum())

    def loss_normaliser(self, batch: Batch) -> int:
        """Pairs in the batch: the Trainer divides by this, so a step averages per pair."""
        return int(batch["pair_index"].shape[0])

    def pair_scores(
        self, model: torch.nn.Module, ids: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen scores, rejected scores) of a padded batch whose first half is the chosen."""
        scores = model(ids, lengths)
        pairs = ids.shape[0] // 2
        return scores[:pairs], scores[pairs:]

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        chosen, rejected = self.pair_scores(model, batch["ids"], batch["lengths"])
        losses = bradley_terry_loss(chosen, rejected)
        if self.center_coef:
            losses = losses + self.center_coef * (chosen + rejected) ** 2
        return losses.sum(), reward_metrics(chosen, rejected)

    # ------------------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Mean Bradley-Terry loss (`val_loss`) and `reward_metrics` over the held-out pairs."""
        device = next(model.parameters()).device
        chosen, rejected = [], []
        size = max(1, self.eval_batch)
        for start in range(0, len(self.val_pairs), size):
            pairs = self.val_pairs[start : start + size]
            ids, _ = pad_pairs(pairs, self.pad_id)
            chosen_scores, rejected_scores = self.pair_scores(
                model, ids.to(device), _lengths(pairs).to(device)
            )
            chosen.append(chosen_scores.float().cpu())
            rejected.append(rejected_scores.float().cpu())
        all_chosen, all_rejected = torch.cat(chosen), torch.cat(rejected)
        result = {"val_loss": float(bradley_terry_loss(all_chosen, all_rejected).mean())}
        result.update(reward_metrics(all_chosen, all_rejected))
        return {key: round(value, 5) for key, value in result.items()}

    # ------------------------------------------------------------------------------ position


# ----------------------------------------------------------------------------------------------
# Using a trained reward model
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def score_texts(
    reward_model: RewardModel,
    sequences: Sequence[Sequence[int]],
    *,
    batch_size: int = 16,
    pad_id: int = 0,
    autocast: Callable[[], AbstractContextManager[Any]] | None = None,
) -> torch.Tensor:
    """(len(sequences),) fp32 CPU scores of whole token sequences (prompt + response), no grad.

    Sequences are scored in batches of similar length (less padding), in eval mode (restored
    after), and returned in the order given. Each must hold 1..context_length ids: cutting one
    would change what is judged, so the caller decides.
    """
    limit = reward_model.config.context_length
    for index, sequence in enumerate(sequences):
        if not 1 <= len(sequence) <= limit:
            raise ValueError(
                f"sequence {index} has {len(sequence)} ids; a reward model scores 1..{limit}"
            )
    context = autocast or nullcontext
    device = next(reward_model.parameters()).device
    scores = torch.empty(len(sequences), dtype=torch.float32)
    by_length = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    was_training = reward_model.training
    reward_model.eval()
    try:
        for start in range(0, len(by_length), max(1, batch_size)):
            rows = by_length[start : start + max(1, batch_size)]
            width = max(len(sequences[i]) for i in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            for row, index in enumerate(rows):
                ids[row, : len(sequences[index])] = torch.as_tensor(sequences[index])
            lengths = torch.tensor([len(sequences[i]) for i in rows], dtype=torch.long)
            with context():
                batch_scores = reward_model(ids.to(device), lengths.to(device))
            scores[torch.tensor(rows)] = batch_scores.float().cpu()
    finally:
        reward_model.train(was_training)
    return scores


@dataclass
class RewardRun:
    """A trained reward model with what came with it (as `checkpoint.LoadedRun` for a GPT)."""

    run_dir: Path
    model: RewardModel
    tokenizer: Tokenizer
    config: Config
    state: dict[str, Any]


def load_reward_model(run_dir: str | Path, device: str = "cpu") -> RewardRun:
    """Open a reward run directory: config, tokenizer, state, weights (backbone + score), eval mode.

    Read as `checkpoint.load_run` reads a run (config.toml via `read_run_config`, safetensors only,
    names and shapes checked against the config), but the weights must include `score.weight`:
    a language model's run directory is refused with a message saying what is expected.
    """
    from safetensors import safe_open

    from minigpt_cli.config.loader import read_run_config
    from minigpt_cli.engine.data.tokenizer import Tokenizer
    from minigpt_cli.engine.model.gpt import GPT
    from minigpt_cli.engine.runs.checkpoint import (
        MODEL_FILE,
        load_model_weights,
        read_metadata,
        read_state,
    )

    folder = Path(run_dir)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such reward-model directory")
    config = read_run_config(folder)
    tokenizer = Tokenizer.load(folder)
    state = read_state(folder)
    path = folder / MODEL_FILE
    if not path.is_file():
        raise UserError(f"{folder}: no {MODEL_FILE} (the reward model has not saved weights yet)")
    read_metadata(path)  # a pickle or truncated file gets its one-line error here
    with safe_open(str(path), framework="pt") as handle:
        names = set(handle.keys())
    if SCORE_WEIGHT not in names:
        raise UserError(
            f"{path}: not a reward model (no {SCORE_WEIGHT}); pass the reward/ directory of an "
            "rlhf run, not a language model's run"
        )
    model = RewardModel(GPT(config.model, tokenizer.vocab_size))
    load_model_weights(model, path)  # type: ignore[arg-type]  # duck-typed: export/load pair
    model.to(device).eval()
    return RewardRun(folder, model, tokenizer, config, state)
