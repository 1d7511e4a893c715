"""Preference pairs: a prompt and two replies as token sequences, for DPO and the reward model.

Shared by every user of (prompt, chosen, rejected) records, so DPO, the reward model and `minigpt
eval` render, cut and order pairs the same way:

- `load_dpo_records`: the user's pairs (already normalised to `{"prompt_messages", "chosen",
  "rejected", "task"}` by `engine.data`, a `Human: ... Assistant:` prompt split into turns) or the
  built-in pairs.
- `build_pairs`: render each prompt with the one chat template (`data.chat_template`) and append
  each reply and its end-of-turn token, so preference training scores exactly what SFT taught.
  What does not fit the context is cut, prompts from the left and replies from the right, and
  counted. `build_reward_pairs` builds them one id shorter for a reward model.
- `pad_pairs`: the chosen and the rejected sequences of a batch, right-padded together.
- `PairOrder`: which pair comes next, as a position a checkpoint saves and restores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from minigpt_cli.engine.data import chat_template
from minigpt_cli.engine.data.chat_template import ChatTokenizer
from minigpt_cli.engine.data.examples import exchange_starts, ids_fingerprint
from minigpt_cli.engine.data.stage_records import stage_records
from minigpt_cli.errors import UserError

if TYPE_CHECKING:
    from minigpt_cli.config.schema import Config


def load_dpo_records(paths: Sequence[Path] | None, split: str, config: Config) -> list[dict]:
    """Preference records `{"prompt_messages", "chosen", "rejected", "task"}` of `split` (see
    `data.stage_records`)."""
    return stage_records("dpo", paths, split, config.data.builtin_size, config.data.val_fraction)


@dataclass(frozen=True)
class PreferencePair:
    """One prompt with two replies, as full token sequences that share the prompt's ids.

    `*_mask[i]` is True when `*_ids[i]` is a reply token (the reply's end-of-turn included): only
    those are scored. Sequences hold at most `max_len + 1` ids (the model reads `ids[:-1]`).
    """

    chosen_ids: np.ndarray  # int64: prompt + chosen reply + end of turn
    chosen_mask: np.ndarray  # bool
    rejected_ids: np.ndarray  # int64: prompt + rejected reply + end of turn
    rejected_mask: np.ndarray  # bool
    prompt_len: int
    task: str | None

    @property
    def tokens(self) -> int:
        """Model inputs of both sequences (what a forward pass reads)."""
        return len(self.chosen_ids) - 1 + len(self.rejected_ids) - 1


@dataclass(frozen=True)
class PairStats:
    """What `build_pairs` did to the records, for the one line a verb prints."""

    records: int
    pairs: int
    prompts_truncated: int  # pairs whose prompt lost its oldest turns or tokens (kept)
    replies_truncated: int  # chosen or rejected replies cut at the end (each counted; kept)
    dropped: int  # pairs whose two replies became identical when cut: no preference (not kept)
    tokens: int  # model inputs of the kept pairs, both sequences, no padding
    reply_tokens: int  # scored reply tokens of the kept pairs
    max_len: int

    def describe(self) -> str:
        """e.g. '5,600 pairs, 190,000 tokens (40,000 scored); 3 prompts cut from the left ...'."""
        text = f"{self.pairs:,} pairs, {self.tokens:,} tokens ({self.reply_tokens:,} scored)"
        cuts = []
        if self.prompts_truncated:
            cuts.append(f"{self.prompts_truncated:,} prompts cut from the left")
        if self.replies_truncated:
            cuts.append(f"{self.replies_truncated:,} replies cut at the end")
        if cuts:
            text += f"; {' and '.join(cuts)} to fit {self.max_len} tokens"
        if self.dropped:
            text += (
                f"; {self.dropped:,} dropped: both replies identical after truncation, nothing "
                "to prefer (raise model.context_length or shorten the prompts)"
            )
        return text


def fit_prompt(
    messages: Sequence[dict], tokenizer: ChatTokenizer, limit: int
) -> tuple[list[int], list[dict], bool]:
    """(prompt ids, messages kept, truncated): the prompt in the template, at most `limit` ids.

    Cut from the left, because the latest turn is the one the replies answer: first the oldest
    user/assistant exchanges are dropped (the system message stays) while more than one is left,
    as SFT does, so the rest reads as a conversation; if the last turn alone is still too long, its
    oldest tokens go, keeping the leading begin-of-text id and the closing `<|assistant|>`.
    """
    if limit < 2:
        raise ValueError(f"a prompt needs at least 2 ids (begin of text, assistant), got {limit}")
    current = list(messages)
    ids = chat_template.prompt_ids(current, tokenizer)
    if len(ids) <= limit:
        return ids, current, False
    while len(ids) > limit:
        starts = exchange_starts(current)
        if len(starts) < 2:
            break
        current = current[: starts[0]] + current[starts[1] :]
        ids = chat_template.prompt_ids(current, tokenizer)
    if len(ids) > limit:
        ids = ids[:1] + ids[len(ids) - (limit - 1) :]
    return ids, current, True


def forward_length(pairs: Sequence[PreferencePair]) -> int:
    """The longest forward pass over `pairs`: a sequence of n ids is read as its first n - 1 (the
    last id is only a target), what the memory estimate must be given."""
    return max(1, max(max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs) - 1)


def build_pairs(
    records: Sequence[dict],
    tokenizer: ChatTokenizer,
    max_len: int,
    max_prompt_tokens: int | None = None,
) -> tuple[list[PreferencePair], PairStats]:
    """Token sequences of preference records, and counts of what was cut or dropped.

    `max_len` is the model's context length: each sequence keeps at most `max_len + 1` ids. The
    prompt is rendered once (the same ids start both sequences) and is cut from the LEFT
    (`fit_prompt`): to `max_prompt_tokens` when given, and when prompt and the longer reply do not
    fit, down to what leaves room for that reply, but never below half the context unless
    `max_prompt_tokens` says so. Replies are then cut from the RIGHT to the room left (their start
    is what the preference is about; a cut reply loses its end-of-turn). A reply is never cut to
    nothing: the room left is at least half the context, or `max_len + 1 - max_prompt_tokens` >= 2.
    Every cut is counted; a pair whose two replies become identical when cut carries no preference
    and is dropped and counted, never silently. Role-order problems raise `UserError` naming the
    record.
    """
    budget = max_len + 1
    if max_prompt_tokens is not None and max_prompt_tokens >= max_len:
        raise UserError(
            f"dpo.max_prompt_tokens ({max_prompt_tokens}) must be below model.context_length "
            f"({max_len}) to leave room for the replies"
        )
    pairs: list[PreferencePair] = []
    prompts_cut = replies_cut = identical = tokens = reply_tokens = 0
    for number, record in enumerate(records, start=1):
        messages = record["prompt_messages"]
        try:
            prompt = chat_template.prompt_ids(messages, tokenizer)
            replies = [
                _reply_ids(messages, record[key], tokenizer, prompt)
                for key in ("chosen", "rejected")
            ]
        except UserError as error:
            raise UserError(f"dpo record {number}: {error}") from None
        longest = max(len(reply) for reply in replies)
        limit = len(prompt)
        if max_prompt_tokens is not None:
            limit = min(limit, max_prompt_tokens)
        if limit + longest > budget:
            limit = min(limit, max(budget - longest, budget // 2))
        if limit < len(prompt):
            prompt, _, _ = fit_prompt(messages, tokenizer, limit)
            prompts_cut += 1
        room = budget - len(prompt)
        replies_cut += sum(len(reply) > room for reply in replies)
        replies = [reply[:room] for reply in replies]
        if replies[0] == replies[1]:
            identical += 1
            continue
        chosen_ids, chosen_mask = _sequence(prompt, replies[0])
        rejected_ids, rejected_mask = _sequence(prompt, replies[1])
        pair = PreferencePair(
            chosen_ids, chosen_mask, rejected_ids, rejected_mask, len(prompt), record.get("task")
        )
        pairs.append(pair)
        tokens += pair.tokens
        reply_tokens += len(replies[0]) + len(replies[1])
    stats = PairStats(
        records=len(records),
        pairs=len(pairs),
        prompts_truncated=prompts_cut,
        replies_truncated=replies_cut,
        dropped=identical,
        tokens=tokens,
        reply_tokens=reply_tokens,
        max_len=max_len,
    )
    return pairs, stats


def _reply_ids(
    messages: Sequence[dict], reply: str, tokenizer: ChatTokenizer, prompt: list[int]
) -> list[int]:
    """The reply's ids (its end-of-turn included) exactly as the chat template renders them."""
    ids, _ = chat_template.render_response(messages, reply, tokenizer)
    if ids[: len(prompt)] != prompt:
        raise AssertionError(
            "chat_template.render_response no longer extends chat_template.prompt_ids"
        )
    return ids[len(prompt) :]


def _sequence(prompt: list[int], reply: list[int]) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(prompt + reply, dtype=np.int64)
    mask = np.zeros(len(ids), dtype=bool)
    mask[len(prompt) :] = True
    return ids, mask


def pad_pairs(pairs: Sequence[PreferencePair], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), each (2n, width): the n chosen sequences, then the n rejected ones.

    Right padding needs no attention mask: causal attention never lets a real token see the padding
    after it, and padding is never scored (mask False).
    """
    sequences = [(p.chosen_ids, p.chosen_mask) for p in pairs]
    sequences += [(p.rejected_ids, p.rejected_mask) for p in pairs]
    width = max(len(ids) for ids, _ in sequences)
    ids_out = np.full((len(sequences), width), pad_id, dtype=np.int64)
    mask_out = np.zeros((len(sequences), width), dtype=bool)
    for row, (ids, mask) in enumerate(sequences):
        ids_out[row, : len(ids)] = ids
        mask_out[row, : len(mask)] = mask
    return torch.from_numpy(ids_out), torch.from_numpy(mask_out)


def build_reward_pairs(
    records: Sequence[dict],
    tokenizer: ChatTokenizer,
    context_length: int,
    max_prompt_tokens: int | None = None,
) -> tuple[list[PreferencePair], PairStats]:
    """`build_pairs` for a reward model: sequences of at most `context_length` ids.

    DPO's sequences hold `context + 1` ids because a language model reads `ids[:-1]` to predict
    `ids[1:]`; the reward model reads every id (the last is the one it scores), so the pairs are
    built for one id less. Same truncation rules, same counts.
    """
    return build_pairs(records, tokenizer, context_length - 1, max_prompt_tokens)


def pair_fingerprint(pairs: Sequence[PreferencePair]) -> str:
    """A short hash of every pair's ids, so a resume can refuse data that changed."""
    return ids_fingerprint(
        array for pair in pairs for array in (pair.chosen_ids, pair.rejected_ids)
    )


class PairOrder:
    """Which training pair comes next, as a position a checkpoint can save and restore.

    A permutation of the pairs per epoch, a pure function of (seed, epoch), taken `n` pairs at a
    time: `state()` (epoch + cursor) replays the exact batches, and 2 micro-batches of 2 pairs
    train the same 4 pairs as one micro-batch of 4. The state also records the pairs' count and
    fingerprint, so a resume on changed data is refused rather than silently reordered. Shared by
    every stage that trains on preference pairs (DPO, the reward model).
    """

    def __init__(self, pairs: Sequence[PreferencePair], seed: int, data_name: str) -> None:
        if not pairs:
            raise ValueError("PairOrder needs at least one pair")
        self.count = len(pairs)
        self.seed = seed
        self.data_name = data_name  # names the data in the refusal message ("DPO", "reward")
        self.fingerprint = pair_fingerprint(pairs)
        self.epoch = 0
        self.cursor = 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.count)

    def first_epoch(self) -> np.ndarray:
        """The first epoch's order: which pairs a run of n pairs draws first (DPO scores those)."""
        return self._epoch_order(0)

    def take(self, count: int) -> list[int]:
        """The indices of the next `count` pairs, crossing into the next epoch as needed."""
        indices = []
        for _ in range(count):
            if self.cursor >= len(self._order):
                self.epoch += 1
                self.cursor = 0
                self._order = self._epoch_order(self.epoch)
            indices.append(int(self._order[self.cursor]))
            self.cursor += 1
        return indices

    def epochs_done(self) -> float:
        return self.epoch + self.cursor / self.count

    def state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "pairs": self.count,
            "fingerprint": self.fingerprint,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        saved_count = state.get("pairs")
        saved_print = state.get("fingerprint")
        if (saved_count is not None and int(saved_count) != self.count) or (
            saved_print is not None and saved_print != self.fingerprint
        ):
            raise UserError(
                f"the {self.data_name} training data changed since the checkpoint ({saved_count} "
                f"pairs then, {self.count} now, or different pairs): resume with the same data "
                "and context length, or start over with --overwrite"
            )
        self.epoch = int(state["epoch"])
        self.cursor = int(state["cursor"])
        self._order = self._epoch_order(self.epoch)
