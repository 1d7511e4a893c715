"""The preference part of `minigpt eval`: log-probabilities of both replies of every pair under one
run, and the accuracy and margin of the implicit reward (or of the mean log-probability when the
run has no parent), built and scored exactly as DPO builds and scores its pairs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from minigpt_cli.engine.data.pairs import build_pairs, pad_pairs
from minigpt_cli.engine.data.tokenizer import Tokenizer
from minigpt_cli.engine.model.gpt import GPT
from minigpt_cli.engine.objectives.preference import preference_metrics, sequence_logps
from minigpt_cli.engine.resources.governor import throttle_point

PAIR_BATCH = 8  # preference pairs (16 sequences) scored per forward pass


@dataclass(frozen=True)
class PairScores:
    """Per record: summed reply log-probs and reply tokens, chosen and rejected (NaN: the pair was
    dropped by `pairs.build_pairs`, both replies identical after truncation)."""

    chosen: np.ndarray  # float64 (records,)
    rejected: np.ndarray
    chosen_tokens: np.ndarray  # int64 (records,)
    rejected_tokens: np.ndarray


def pair_batches(count: int) -> int:
    """How many forward passes `score_pairs` makes for `count` records (for progress totals)."""
    return math.ceil(count / PAIR_BATCH)


@torch.no_grad()
def score_pairs(
    model: GPT,
    tokenizer: Tokenizer,
    records: Sequence[dict],
    *,
    max_prompt_tokens: int | None = None,
    on_batch: Callable[[], None] | None = None,
) -> PairScores:
    """log p(reply | prompt) of both replies of every record, with DPO's own pair building
    (`pairs.build_pairs`: the chat template, prompts cut from the left, replies from the right) and
    scoring (`preference.sequence_logps`)."""
    context = int(model.config.context_length)
    kept: list[tuple[int, Any]] = []
    for index, record in enumerate(records):
        # One record at a time, so a dropped pair is known by its index (and stays aligned with
        # the parent's scores).
        pairs, _ = build_pairs([record], tokenizer, context, max_prompt_tokens)
        kept.extend((index, pair) for pair in pairs)
    result = PairScores(
        np.full(len(records), np.nan),
        np.full(len(records), np.nan),
        np.zeros(len(records), dtype=np.int64),
        np.zeros(len(records), dtype=np.int64),
    )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(kept), PAIR_BATCH):
            throttle_point()
            chunk = kept[start : start + PAIR_BATCH]
            ids, mask = pad_pairs([pair for _, pair in chunk], tokenizer.pad_id)
            logps = sequence_logps(model, ids.to(device), mask.to(device)).double().cpu().numpy()
            counts = mask[:, 1:].sum(dim=1).numpy()
            for row, (index, _) in enumerate(chunk):
                result.chosen[index] = logps[row]
                result.rejected[index] = logps[len(chunk) + row]
                result.chosen_tokens[index] = counts[row]
                result.rejected_tokens[index] = counts[len(chunk) + row]
            if on_batch is not None:
                on_batch()
    finally:
        model.train(was_training)
    return result


def preference_accuracy(chosen: Sequence[float], rejected: Sequence[float]) -> float:
    """Share of pairs whose chosen score is strictly above the rejected one: a tie is wrong, so a
    run that has not moved from its parent scores 0, not 0.5 (as `preference_metrics`)."""
    if len(chosen) == 0:
        return 0.0
    # Differences against zero: `preference_metrics` compares in float32, which could round two
    # close float64 scores into a tie; the sign of their difference survives the cast.
    differences = np.asarray(chosen, dtype=np.float64) - np.asarray(rejected, dtype=np.float64)
    return preference_metrics(torch.from_numpy(differences), torch.zeros(len(differences)))[
        "pref_accuracy"
    ]


def preference_scores(own: PairScores, parent: PairScores | None) -> tuple[np.ndarray, np.ndarray]:
    """(chosen, rejected) scores per record: the implicit reward log p_run - log p_parent with a
    parent, else the mean log-probability per reply token. NaN where a pair was dropped."""
    if parent is not None:
        return own.chosen - parent.chosen, own.rejected - parent.rejected
    with np.errstate(invalid="ignore", divide="ignore"):
        return own.chosen / own.chosen_tokens, own.rejected / own.rejected_tokens


def preference_summary(
    chosen: np.ndarray, rejected: np.ndarray, families: Sequence[str | None]
) -> dict[str, float]:
    """`pref_accuracy` and `pref_margin` (mean chosen - rejected score), overall and per family;
    dropped pairs (NaN) are left out."""
    valid = ~(np.isnan(chosen) | np.isnan(rejected))

    def summary(selected: np.ndarray) -> dict[str, float]:
        if not selected.any():
            return {}
        accuracy = preference_accuracy(chosen[selected].tolist(), rejected[selected].tolist())
        margin = float(np.mean(chosen[selected] - rejected[selected]))
        return {"pref_accuracy": round(accuracy, 4), "pref_margin": round(margin, 4)}

    metrics = summary(valid)
    family_array = np.array([f or "" for f in families], dtype=object)
    for family in sorted({f for f in families if f}):
        values = summary(valid & (family_array == family))
        metrics.update({f"{key}/{family}": value for key, value in values.items()})
    return metrics
