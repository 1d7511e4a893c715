"""SFT's examples: conversations in the chat template as ids whose targets say what is learned.

Shared by `minigpt sft` (training and validation examples), `minigpt data inspect` (what a record
becomes) and DPO's prompt fitting (the same truncation of old exchanges):

- `load_sft_records`: the user's records (any of the three SFT formats, already normalised to
  `{"messages", "task"}` by `engine.data`) or the built-in instruction data.
- `build_examples`: render every conversation with the one chat template
  (`data.chat_template`), turn the loss mask into targets (`IGNORE_INDEX` wherever nothing is
  learned), and truncate what does not fit the context. Truncation is counted, never silent (see
  `render_example` for the policy).
- `pad_batch`: right-padded inputs and targets of a batch, padding targets ignored.

Where the loss ignores tokens: `build_examples` writes `IGNORE_INDEX` (-100, from engine.model)
into the targets of every position whose next token is not trained (prompt, role tokens, bos) and
`pad_batch` pads targets with it; `GPT.forward(..., reduction="sum")` then skips those positions,
so padding and masked tokens contribute neither loss nor gradient.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from minigpt_cli.engine.data import chat_template
from minigpt_cli.engine.data.chat_template import ChatTokenizer
from minigpt_cli.engine.data.stage_records import stage_records
from minigpt_cli.engine.model.loss import IGNORE_INDEX
from minigpt_cli.errors import UserError

if TYPE_CHECKING:
    from minigpt_cli.config.schema import Config


def load_sft_records(paths: Sequence[Path] | None, split: str, config: Config) -> list[dict]:
    """SFT records `{"messages", "task"}` of `split` (see `data.stage_records`)."""
    return stage_records("sft", paths, split, config.data.builtin_size, config.data.val_fraction)


@dataclass(frozen=True)
class RenderedConversation:
    """One conversation in the template after fitting it to the context."""

    ids: list[int]
    mask: list[bool]
    truncated: bool  # anything was cut (earlier turns dropped, or the end cut off)
    dropped_turns: int  # earlier user/assistant exchanges removed to make it fit


def exchange_starts(messages: Sequence[dict]) -> list[int]:
    """Indices of the user messages that open each user/assistant exchange."""
    return [i for i, m in enumerate(messages) if m["role"] == "user"]


def render_example(
    messages: Sequence[dict],
    tokenizer: ChatTokenizer,
    max_len: int | None,
    train_on_prompt: bool = False,
) -> RenderedConversation:
    """Render `messages` and fit them into `max_len + 1` ids (`max_len` inputs, shifted targets).

    Truncation policy, chosen so what remains is still a coherent conversation to learn from:
    1. drop the oldest user/assistant exchanges (the system message stays) while more than one
       exchange is left, as a chat front end drops old history, until it fits;
    2. if the last exchange alone is still too long, keep the start and cut the end (the answer's
       end and its end-of-turn token are lost; if no trained token is left, `build_examples`
       drops the example and counts it).
    `max_len=None` means no limit.
    """
    ids, mask = chat_template.render(messages, tokenizer, train_on_prompt=train_on_prompt)
    if max_len is None or len(ids) <= max_len + 1:
        return RenderedConversation(ids, mask, False, 0)
    dropped = 0
    current = list(messages)
    while len(ids) > max_len + 1:
        starts = exchange_starts(current)
        if len(starts) < 2:
            break
        current = current[: starts[0]] + current[starts[1] :]
        dropped += 1
        ids, mask = chat_template.render(current, tokenizer, train_on_prompt=train_on_prompt)
    return RenderedConversation(ids[: max_len + 1], mask[: max_len + 1], True, dropped)


@dataclass(frozen=True)
class SftExample:
    """Model inputs and next-token targets (`IGNORE_INDEX` where nothing is learned)."""

    input_ids: np.ndarray  # int64, ids[:-1]
    targets: np.ndarray  # int64, ids[1:] with untrained positions set to IGNORE_INDEX
    task: str | None
    loss_tokens: int

    def __len__(self) -> int:
        return len(self.input_ids)


def ids_fingerprint(arrays: Iterable[np.ndarray]) -> str:
    """A short hash of token-id arrays, each length-prefixed, saved with a checkpoint's data
    position: the count of examples alone can match after the data changed, and a resume on
    other data would then continue a different curve without a word."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(len(array).to_bytes(4, "little"))
        digest.update(np.ascontiguousarray(array, dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class BuildStats:
    """What `build_examples` did to the records, for the one line a verb prints."""

    records: int
    examples: int
    truncated: int  # examples cut to fit the context (kept)
    dropped: int  # examples with no trained token left after truncation (not kept)
    tokens: int  # input tokens of the kept examples (no padding)
    loss_tokens: int  # trained tokens of the kept examples
    max_len: int | None

    def describe(self) -> str:
        """e.g. '5,600 examples, 190,000 tokens (40,000 trained); 3 truncated to 256 tokens'."""
        text = f"{self.examples:,} examples, {self.tokens:,} tokens ({self.loss_tokens:,} trained)"
        if self.truncated:
            text += f"; {self.truncated:,} truncated to {self.max_len} tokens"
        if self.dropped:
            text += (
                f"; {self.dropped:,} dropped: nothing left to learn after truncation "
                "(raise model.context_length or shorten the prompts)"
            )
        return text


def build_examples(
    records: Sequence[dict],
    tokenizer: ChatTokenizer,
    max_len: int | None,
    train_on_prompt: bool = False,
) -> tuple[list[SftExample], BuildStats]:
    """Training examples from `{"messages", "task"}` records, and counts of what was cut.

    `max_len` is the model's context length (inputs per example). Every too-long record is
    truncated (`render_example`) and counted in `stats.truncated`; one left with no trained token
    is not kept and is counted in `stats.dropped`, so nothing disappears unreported. A conversation
    whose turns are out of order raises `UserError` naming the record.
    """
    examples: list[SftExample] = []
    truncated = dropped = tokens = loss_tokens = 0
    for number, record in enumerate(records, start=1):
        try:
            rendered = render_example(record["messages"], tokenizer, max_len, train_on_prompt)
        except UserError as error:
            raise UserError(f"sft record {number}: {error}") from None
        truncated += rendered.truncated
        ids = np.asarray(rendered.ids, dtype=np.int64)
        trained = np.asarray(rendered.mask[1:], dtype=bool)
        count = int(trained.sum())
        if count == 0:
            dropped += 1
            continue
        targets = np.where(trained, ids[1:], IGNORE_INDEX)
        examples.append(SftExample(ids[:-1], targets, record.get("task"), count))
        tokens += len(ids) - 1
        loss_tokens += count
    stats = BuildStats(
        len(records), len(examples), truncated, dropped, tokens, loss_tokens, max_len
    )
    return examples, stats


def pad_batch(examples: Sequence[SftExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded (inputs, targets) of the batch's longest example; padding targets ignored.

    Right padding needs no attention mask: causal attention never lets a real token see the
    padding after it, and padded positions carry `IGNORE_INDEX` targets.
    """
    width = max(len(example) for example in examples)
    inputs = np.full((len(examples), width), pad_id, dtype=np.int64)
    targets = np.full((len(examples), width), IGNORE_INDEX, dtype=np.int64)
    for row, example in enumerate(examples):
        inputs[row, : len(example)] = example.input_ids
        targets[row, : len(example)] = example.targets
    return {"input_ids": torch.from_numpy(inputs), "targets": torch.from_numpy(targets)}
