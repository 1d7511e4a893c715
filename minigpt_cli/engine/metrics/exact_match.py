"""Exact match: greedy answers to held-out prompts compared with the reference answers.

One implementation for every place that reports it, so the numbers agree: SFT's and DPO's
held-out evaluation (`held_out_exact_match`), RLHF's evaluation and rule reward (`score_answers`,
`rule_scores`) and `minigpt eval` (`score_answers`, `select_per_family`). Answers match when equal
after `normalise_answer`.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from minigpt_cli.engine.data import chat_template
from minigpt_cli.engine.data.tokenizer import Tokenizer
from minigpt_cli.engine.inference import greedy
from minigpt_cli.engine.model.gpt import GPT
from minigpt_cli.engine.resources.governor import throttle_point
from minigpt_cli.errors import UserError

EXACT_MATCH_MARGIN = 8  # new tokens allowed beyond the longest reference answer (+ end of turn)
EXACT_MATCH_BATCH = 32  # held-out prompts decoded together


_STEP_SEPARATOR = re.compile("[,\uff0c]")  # a step of a worked answer ends at a comma (or ，)


def step_credit(response: str, answer: str) -> float:
    """1.0 for the answer (after `normalise_answer`); for a worked answer, the share of its steps
    the response got right in place; otherwise 0.0.

    A worked answer is one whose reference has two steps or more, separated by commas ("7+8=15,
    4+5+1=10, so 105"). Its credit is the number of steps equal at the same position over the
    longer step count: one wrong sum and the total it carries into earn 1/3, a total copied wrong
    2/3, a bare total 0. Why: all or nothing gives GRPO, which learns only from the differences
    inside a group of samples, nothing when a group fails together; marking each step, as a
    teacher marks working, also says which step went wrong. One-step answers (a word, a count)
    stay all or nothing, so this rule differs from exact match only on worked sums.
    """
    got, want = normalise_answer(response), normalise_answer(answer)
    if got == want:
        return 1.0
    want_steps = [step.strip() for step in _STEP_SEPARATOR.split(want)]
    if len(want_steps) < 2:
        return 0.0
    got_steps = [step.strip() for step in _STEP_SEPARATOR.split(got)]
    right = sum(g == w for g, w in zip(got_steps, want_steps, strict=False))
    return right / max(len(want_steps), len(got_steps))


def normalise_answer(text: str) -> str:
    """An answer as exact match compares it: trimmed, case-folded, whitespace runs made one space.

    `str.split()` splits on every Unicode space (the ideographic U+3000 included), so Chinese and
    English answers are treated alike; nothing else (punctuation, width) is changed.
    """
    return " ".join(text.casefold().split())


@dataclass(frozen=True)
class AnswerResult:
    """One held-out prompt answered greedily, for exact match and for showing samples."""

    family: str | None
    prompt_messages: list[dict]
    reference: str
    prediction: str
    correct: bool


def _prompt_and_reference(record: dict) -> tuple[list[dict], str]:
    """(prompt messages, reference answer) of an sft record, or an rlhf record with an answer."""
    if "messages" in record:
        messages = list(record["messages"])
        if not messages or messages[-1]["role"] != "assistant":
            raise ValueError("an exact-match record must end with the assistant's answer")
        return messages[:-1], messages[-1]["content"]
    if record.get("answer") is not None and "prompt_messages" in record:
        return list(record["prompt_messages"]), str(record["answer"])
    raise ValueError("exact match needs sft records or rlhf records with an answer")


def select_per_family(
    records: Sequence[dict], per_family: int | None, seed: int | None = None
) -> list[dict]:
    """At most `per_family` records of each task family (untagged records form one family), in
    their original order (None: all of them).

    Without `seed`, the first `per_family` of each family (a stage's held-out check: the same
    prompts at every evaluation); with it, drawn with `seed` (`minigpt eval`: a pure function of
    (records, per_family, seed)).
    """
    if per_family is None:
        return list(records)
    by_family: dict[str | None, list[int]] = {}
    for index, record in enumerate(records):
        by_family.setdefault(record.get("task"), []).append(index)
    chosen: list[int] = []
    for family, indices in by_family.items():
        if len(indices) <= per_family:
            chosen.extend(indices)
        elif seed is None:
            chosen.extend(indices[:per_family])
        else:
            stream = zlib.crc32((family or "").encode("utf-8"))
            picks = np.random.default_rng([seed, stream]).permutation(len(indices))[:per_family]
            chosen.extend(indices[i] for i in picks.tolist())
    return [records[i] for i in sorted(chosen)]


def score_answers(
    model: GPT,
    tokenizer: Tokenizer,
    records: Sequence[dict],
    *,
    per_family: int | None = 16,
    batch_size: int = EXACT_MATCH_BATCH,
    margin: int = EXACT_MATCH_MARGIN,
    max_new_tokens: int | None = None,
    on_batch: Callable[[], None] | None = None,
) -> list[AnswerResult]:
    """Greedy answers to held-out prompts (the first `per_family` of each task family).

    Prompts are sorted by length and decoded `batch_size` at a time; each batch may generate the
    longest reference of the batch plus `margin` tokens (plus the end of turn), so a model that
    does not stop after its answer is marked wrong rather than decoded forever. `max_new_tokens`
    replaces that budget; `on_batch` is called after each batch (progress for `minigpt eval`).
    """
    chosen = select_per_family(records, per_family)
    items = []
    for record in chosen:
        messages, reference = _prompt_and_reference(record)
        items.append(
            (record.get("task"), messages, reference, chat_template.prompt_ids(messages, tokenizer))
        )
    order = sorted(range(len(items)), key=lambda i: len(items[i][3]))
    predictions: dict[int, str] = {}
    stops = chat_template.stop_token_ids(tokenizer)
    for start in range(0, len(order), max(1, batch_size)):
        throttle_point()
        batch = order[start : start + max(1, batch_size)]
        budget = max_new_tokens
        if budget is None:
            budget = max(len(tokenizer.encode(items[i][2])) for i in batch) + margin
        outputs = greedy.greedy_complete(model, [items[i][3] for i in batch], budget, stops)
        for index, output in zip(batch, outputs, strict=True):
            predictions[index] = tokenizer.decode(output)
        if on_batch is not None:
            on_batch()
    results = []
    for index, (family, messages, reference, _) in enumerate(items):
        prediction = predictions[index]
        correct = normalise_answer(prediction) == normalise_answer(reference)
        results.append(AnswerResult(family, messages, reference, prediction, correct))
    return results


def summarise_exact_match(results: Sequence[AnswerResult]) -> dict[str, float]:
    """`exact_match` over all results and `exact_match/<family>` per task family (untagged records
    count in the overall figure only). Empty when there are no results."""
    if not results:
        return {}
    metrics = {"exact_match": round(sum(r.correct for r in results) / len(results), 4)}
    families = sorted({r.family for r in results if r.family})
    for family in families:
        mine = [r for r in results if r.family == family]
        metrics[f"exact_match/{family}"] = round(sum(r.correct for r in mine) / len(mine), 4)
    return metrics


def exact_match_by_family(
    model: GPT,
    tokenizer: Tokenizer,
    records: Sequence[dict],
    *,
    per_family: int | None = 16,
    batch_size: int = EXACT_MATCH_BATCH,
    margin: int = EXACT_MATCH_MARGIN,
) -> dict[str, float]:
    """`{"exact_match": x, "exact_match/<family>": y, ...}` from greedy answers to `records`.

    `records` are sft records (`{"messages", "task"}`, the last message the reference answer) or
    rlhf records with an `answer`. Answers match when equal after `normalise_answer`.
    """
    results = score_answers(
        model, tokenizer, records, per_family=per_family, batch_size=batch_size, margin=margin
    )
    return summarise_exact_match(results)


def held_out_exact_match(
    model: GPT, tokenizer: Tokenizer, records: Sequence[dict], per_family: int
) -> dict[str, float]:
    """A stage's exact-match evaluation, or nothing when it has no records or it is switched off
    (`exact_match_per_family = 0`)."""
    if not records or per_family <= 0 or tokenizer is None:
        return {}
    return exact_match_by_family(model, tokenizer, records, per_family=per_family)


def rule_scores(records: Sequence[dict], responses: Sequence[str]) -> torch.Tensor:
    """The rule reward of each response: `step_credit` against the record's answer."""
    scores = []
    for record, response in zip(records, responses, strict=True):
        answer = record.get("answer")
        if answer is None:
            raise UserError(
                "the rule reward needs prompts with an 'answer' (use --reward model otherwise)"
            )
        scores.append(step_credit(response, str(answer)))
    return torch.tensor(scores)
