"""The generation part of `minigpt eval`: one run's greedy answers to held-out prompts, decoded
exactly as SFT's held-out check decodes them, and a reward model's score of those answers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from minigpt_cli.engine.data import chat_template
from minigpt_cli.engine.data.tokenizer import Tokenizer
from minigpt_cli.engine.inference.scoring import score_texts
from minigpt_cli.engine.metrics.exact_match import EXACT_MATCH_BATCH, score_answers
from minigpt_cli.engine.metrics.text import Answer
from minigpt_cli.engine.model.gpt import GPT
from minigpt_cli.engine.runs.files import TOKENIZER_FILE
from minigpt_cli.engine.runs.load import RewardRun, load_reward_model
from minigpt_cli.errors import UserError


def _check_ends_with_answer(records: Sequence[dict]) -> None:
    """A reference answer is the conversation's last assistant turn; without one, say so."""
    for record in records:
        messages = record.get("messages") or []
        if not messages or messages[-1]["role"] != "assistant":
            raise UserError("an SFT record for evaluation must end with the assistant's answer")


def answer_batches(count: int) -> int:
    """How many decoding batches `answer_prompts` makes (for progress totals)."""
    return math.ceil(count / EXACT_MATCH_BATCH)


def answer_prompts(
    model: GPT,
    tokenizer: Tokenizer,
    records: Sequence[dict],
    *,
    max_new_tokens: int | None = None,
    on_batch: Callable[[], None] | None = None,
) -> list[Answer]:
    """Greedy answers to SFT records, in their order, decoded by SFT's own held-out check
    (`exact_match.score_answers`), so exact match equals `exact_match_by_family` on the same
    records."""
    _check_ends_with_answer(records)
    results = score_answers(
        model,
        tokenizer,
        records,
        per_family=None,
        max_new_tokens=max_new_tokens,
        on_batch=on_batch,
    )
    answers = []
    for result in results:
        user_turns = [m["content"] for m in result.prompt_messages if m["role"] == "user"]
        prompt = user_turns[-1] if user_turns else ""
        answers.append(
            Answer(
                result.family,
                prompt,
                result.reference,
                result.prediction,
                result.correct,
                tuple(result.prompt_messages),
            )
        )
    return answers


def reward_metrics(
    reward_run: RewardRun, tokenizer: Tokenizer, answers: Sequence[Answer]
) -> dict[str, float]:
    """The reward model's mean score of the answers (each as prompt + reply in the chat template,
    as RLHF scores its rollouts), overall and per task family: what RLHF optimised, measured on
    held-out prompts for every run alike."""
    context = reward_run.model.config.context_length
    sequences = [
        chat_template.render_response(list(a.prompt_messages), a.prediction, tokenizer)[0][
            -context:
        ]
        for a in answers
    ]
    scores = score_texts(reward_run.model, sequences, pad_id=tokenizer.pad_id).tolist()
    metrics = {"reward": round(sum(scores) / len(scores), 4)}
    for family in sorted({a.family for a in answers if a.family}):
        mine = [score for score, a in zip(scores, answers, strict=True) if a.family == family]
        metrics[f"reward/{family}"] = round(sum(mine) / len(mine), 4)
    return metrics


def load_reward_judge(path: Path, first_run: Path, device: torch.device) -> RewardRun:
    """The reward run that judges every run's answers; its tokenizer must be the runs' own (the
    scores are of token ids), which holds for every run of one pipeline."""
    judge = load_reward_model(path, str(device))
    if (path / TOKENIZER_FILE).read_bytes() != (first_run / TOKENIZER_FILE).read_bytes():
        raise UserError(
            f"{path}: this reward model has another tokenizer than {first_run}; it can only "
            "judge runs of the pipeline it was trained in"
        )
    return judge
