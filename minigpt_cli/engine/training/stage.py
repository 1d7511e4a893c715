"""The contract between a training stage and the one Trainer: the `Stage` protocol and its defaults.

Every hook the Trainer calls is declared here, with the default `StageBase` gives it, so a stage
that implements the protocol knows everything it is asked for, and the Trainer calls each hook
plainly (no probing for optional attributes).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Protocol, TypeAlias

import torch

from minigpt_cli.engine.model.gpt import GPT
from minigpt_cli.engine.model.heads import PolicyWithValue, RewardModel
from minigpt_cli.engine.runs.load import language_model_files, load_language_model_files

Batch = dict[str, torch.Tensor]
# Every kind of model a stage trains: a language model (pretraining, SFT, DPO, GRPO), a reward
# model, or PPO's policy with its value head. The Trainer reads only what they share (`config`).
TrainedModel: TypeAlias = GPT | RewardModel | PolicyWithValue
# What a checkpoint writes for the model: file name -> (tensors, safetensors metadata).
WeightFiles = dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]]

EVAL_BATCH = 8  # sequences per evaluation forward, unless the fitted micro-batch is smaller


class Stage(Protocol):
    """What a training stage supplies to the Trainer. `StageBase` gives the defaults."""

    name: str
    # Tokens per training sequence (the context length, for most stages): the attention length
    # MFU is computed with, and the loss tokens per sequence when `mean_loss_tokens` is None.
    seq_len: int
    # Loss tokens per training example when examples vary in length (fine-tuning: the mean trained
    # tokens of an example), so --max-tokens counts what it says; None: `seq_len`.
    mean_loss_tokens: float | None
    # Optimizer steps per iteration (RL: per rollout). The Trainer then counts max_steps and the
    # *_every cadences in iterations, and time/token/epoch limits stop a run only between them.
    steps_per_iteration: int
    # An eval row at step 0, before any update: the baseline a stage's gains are read against.
    evaluate_at_start: bool
    # Sequences (or pairs) per evaluation forward; the run function sets it to at most the fitted
    # micro-batch, which is what the memory plan assumed for validation. Not read by the Trainer.
    eval_batch: int

    def next_batch(self, num_sequences: int) -> Batch:
        """The next `num_sequences` training examples (CPU tensors; the trainer moves them)."""

    def count_tokens(self, batch: Batch) -> int:
        """Tokens that carry loss in `batch` (padding and masked prompt tokens excluded): tokens
        seen, throughput, MFU and --max-tokens."""

    def loss_normaliser(self, batch: Batch) -> float:
        """What a step's summed loss is divided by, summed over its micro-batches: the loss tokens
        (`count_tokens`), or pairs for preference stages, which average per pair."""

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Summed loss over the batch's loss tokens, and metrics to average into the log line."""

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Held-out metrics (val_loss, val_ppl, val_bpb, ...)."""

    def epochs_done(self) -> float:
        """Passes over the training data so far (for --epochs)."""

    def sequences_per_epoch(self) -> int:
        """Training examples in one pass (to turn --epochs into steps)."""

    def data_state(self) -> dict[str, Any]:
        """The data position, JSON-serialisable."""

    def load_data_state(self, state: dict[str, Any]) -> None:
        """Restore a position from `data_state`."""

    def before_step(self, model: torch.nn.Module, step: int) -> None:
        """Work between optimizer steps (RL rollouts); a no-op for supervised stages."""

    def extra_state(self) -> dict[str, Any]:
        """Anything else the stage must checkpoint (JSON-serialisable)."""

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore `extra_state`."""

    def weight_files(self, model: torch.nn.Module) -> WeightFiles:
        """The files a checkpoint holds for `model`'s trained weights."""

    def load_weight_files(self, model: torch.nn.Module, folder: Path) -> None:
        """Restore what `weight_files` wrote into `folder` (a resume)."""


class StageBase(ABC):
    """The Stage protocol's defaults, for a stage that trains a language model token by token with
    no between-step work or state beyond its data position (stages override what differs)."""

    seq_len: int  # every stage sets its own
    mean_loss_tokens: float | None = None
    steps_per_iteration: int = 1
    evaluate_at_start: bool = False
    eval_batch: int = EVAL_BATCH

    @abstractmethod
    def count_tokens(self, batch: Batch) -> int:
        """Each stage counts its own loss tokens (the default normaliser divides by them)."""

    def loss_normaliser(self, batch: Batch) -> float:
        return self.count_tokens(batch)

    def before_step(self, model: torch.nn.Module, step: int) -> None:
        return None

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        return None

    def weight_files(self, model: torch.nn.Module) -> WeightFiles:
        """The whole model, or only the adapters of a LoRA run (the parent holds the rest)."""
        assert isinstance(model, GPT | RewardModel), "a stage of another model overrides this"
        return language_model_files(model)

    def load_weight_files(self, model: torch.nn.Module, folder: Path) -> None:
        assert isinstance(model, GPT | RewardModel), "a stage of another model overrides this"
        load_language_model_files(model, folder)
