"""Whole token sequences scored by a trained reward model: PPO's rewards, `minigpt eval`'s judge.

Batched and gradient-free, in the reward model's eval mode; the caller decides how a too-long
sequence is cut, since cutting changes what is judged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from minigpt_cli.engine.model.heads import RewardModel


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
