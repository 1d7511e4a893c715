"""Supervised fine-tuning: conversations in the chat template, loss on the assistant's tokens only.

`run_sft`, the engine function behind `minigpt sft`, builds the examples (`data.examples`: every
conversation rendered with the one chat template, targets `IGNORE_INDEX` wherever nothing is
learned, truncation counted) and trains an `SftStage` on the one Trainer (`training.finetune`
starts the policy from the parent run and finishes the run).

`SftStage`: batches are length-grouped so padding stays small, yet the order is a pure function
of (seed, epoch), so resuming replays the exact batches. Evaluation reports held-out loss and
exact match per task family (`metrics.exact_match`, which DPO and `minigpt eval` report the same
way).

Where the loss ignores tokens: the examples' targets hold `IGNORE_INDEX` (-100, from engine.model)
at every position whose next token is not trained (prompt, role tokens, bos) and `pad_batch` pads
targets with it; `GPT.forward(..., reduction="sum")` then skips those positions, so padding and
masked tokens contribute neither loss nor gradient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F

from minigpt_cli.config.schema import Config
from minigpt_cli.engine.core.events import EventCallback, emit
from minigpt_cli.engine.data.examples import SftExample, build_examples, ids_fingerprint, pad_batch
from minigpt_cli.engine.data.shards import TokenRange
from minigpt_cli.engine.metrics.exact_match import held_out_exact_match
from minigpt_cli.engine.metrics.text import score_windows, token_byte_lengths
from minigpt_cli.engine.model.gpt import GPT, language_model
from minigpt_cli.engine.model.loss import IGNORE_INDEX
from minigpt_cli.engine.resources.memory import fit_memory
from minigpt_cli.engine.training import distributed
from minigpt_cli.engine.training.finetune import (
    FinetuneInputs,
    finish_finetune,
    start_finetune,
    train_and_val_records,
    trainable_parameters,
)
from minigpt_cli.engine.training.run_spec import RunSpec
from minigpt_cli.engine.training.stage import EVAL_BATCH, Batch, StageBase
from minigpt_cli.engine.training.text_mix import chain_text
from minigpt_cli.errors import UserError

GROUPS_PER_WINDOW = 16  # length sorting happens within windows of this many micro-batches
TEXT_STREAM = 1  # the text windows' order draws from its own generator: [seed, TEXT_STREAM, epoch]
MIX_SCALE = 1_000_000  # text_mix in millionths, so which sequences are text is exact integer math


@dataclass
class TextMix:
    """Plain pretraining text in SFT batches (`[sft] text_mix`), and held-out text to score.

    `train` is a token stream cut into non-overlapping windows of `chunk` tokens (plus the next
    token as the last target), as pretraining cuts its stream; `share` of the sequences are
    windows, placed by exact integer arithmetic on the count of sequences drawn, so every
    micro-batch (and so every step) holds its share and a resume places them identically. Each
    text token's loss counts `weight` times an answer token's (both in the step's sum and in what
    it is divided by): 32-token windows would otherwise drown ~8-token answers.
    """

    train: TokenRange | None
    share: float = 0.0
    chunk: int = 64
    weight: float = 1.0
    held_out: list[tuple[list[int], list[int]]] = field(default_factory=list)


def _pad_to(rows: torch.Tensor, length: int, value: int) -> torch.Tensor:
    """(B, T) `rows` padded on the right with `value` to (B, length)."""
    missing = length - rows.shape[1]
    return F.pad(rows, (0, missing), value=value) if missing else rows


def _group_losses(
    model: torch.nn.Module, ids: torch.Tensor, targets: torch.Tensor, groups: tuple[int, int]
) -> list[torch.Tensor]:
    """`GPT.group_losses` of the network (through DDP's forward via `forward_through`)."""
    return language_model(model).group_losses(ids, targets, groups)


class SftStage(StageBase):
    """Length-grouped batches of SFT examples; loss on trained tokens only.

    Batch order (a pure function of seed and epoch, so `data_state` = epoch + cursor replays it):
    shuffle the examples, sort each window of `GROUPS_PER_WINDOW` micro-batches by length, cut it
    into groups of `group_size` (the configured micro-batch), shuffle the groups. Neighbours in a
    group have similar lengths, so padding stays small, while which examples meet, and in what
    order the groups come, still changes every epoch. When the example count is not a multiple of
    `group_size` the last group is completed with its nearest-length neighbours (a few examples
    appear twice in that epoch), so micro-batches stay aligned with groups across epochs.

    With a `TextMix`, a share of every micro-batch's sequences are pretraining-text windows (their
    own order, from the seed and the text's own epoch): groups are then the examples of one
    micro-batch, its size less its windows. Where the group's examples are shorter than a window
    its text comes as more, narrower windows (`next_batch`): on the built-in data a step then runs
    806 positions on average instead of 1,263 (README "Fine-tuning").
    """

    name = "sft"

    def __init__(
        self,
        train_examples: Sequence[SftExample],
        val_examples: Sequence[SftExample],
        *,
        seq_len: int,
        seed: int,
        pad_id: int,
        group_size: int,
        eval_sequences: int,
        tokenizer: Any = None,
        exact_match_records: Sequence[dict] = (),
        exact_match_per_family: int = 16,
        token_bytes: np.ndarray | None = None,
        eval_batch: int = EVAL_BATCH,
        text: TextMix | None = None,
    ) -> None:
        if not train_examples:
            raise UserError("no SFT training examples (all were empty or too long)")
        if not val_examples:
            raise UserError("no SFT validation examples (add data or pass --val-data)")
        self.train_examples = list(train_examples)
        self.val_examples = list(val_examples)
        self.seq_len = seq_len
        self.seed = seed
        self.pad_id = pad_id
        self.group_size = max(1, group_size)
        self.tokenizer = tokenizer
        self.exact_match_records = list(exact_match_records)
        self.exact_match_per_family = exact_match_per_family
        self.token_bytes = None if token_bytes is None else torch.from_numpy(token_bytes)
        self.lengths = np.array([len(e) for e in self.train_examples], dtype=np.int64)
        self.fingerprint = ids_fingerprint(
            array for e in self.train_examples for array in (e.input_ids, e.targets)
        )
        self.text = text or TextMix(train=None)
        self.text_windows = 0
        if self.text.train is not None and self.text.share > 0:
            self.text_windows = (len(self.text.train) - 1) // self.text.chunk
        self.mix = round(self.text.share * MIX_SCALE) if self.text_windows else 0
        # Length groups hold the examples of one micro-batch: its sequences less its text windows.
        self.group_size -= min(self.group_size - 1, round(self.group_size * self.mix / MIX_SCALE))
        answer_tokens = float(np.mean([e.loss_tokens for e in self.train_examples]))
        share = self.mix / MIX_SCALE
        self.mean_loss_tokens = (1 - share) * answer_tokens + share * self.text.chunk
        count = min(len(self.val_examples), max(1, eval_sequences))
        picks = np.linspace(0, len(self.val_examples) - 1, count).round().astype(np.int64)
        val_subset = [self.val_examples[i] for i in sorted(set(picks.tolist()))]
        self.eval_subset = sorted(val_subset, key=len)  # similar lengths batch together
        self.eval_batch = eval_batch  # the caller lowers it to the micro-batch
        self.epoch = 0
        self.cursor = 0
        self._order = self._epoch_order(0)
        self.sequences = 0  # sequences drawn so far, text included: where the text slots fall
        self.text_epoch = 0
        self.text_cursor = 0
        self._text_order = self._text_epoch_order(0)

    # ------------------------------------------------------------------------------ order

    def _epoch_order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        size = self.group_size
        window = size * GROUPS_PER_WINDOW
        shuffled = rng.permutation(len(self.train_examples))
        groups: list[np.ndarray] = []
        partial: np.ndarray | None = None
        for start in range(0, len(shuffled), window):
            chunk = shuffled[start : start + window]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            whole = len(chunk) // size * size
            groups.extend(chunk[i : i + size] for i in range(0, whole, size))
            if whole < len(chunk):
                if len(chunk) >= size:
                    partial = chunk[-size:]  # the longest `size`: overlaps the previous group
                else:
                    partial = np.concatenate([chunk, np.resize(shuffled, size - len(chunk))])
        if partial is not None:
            groups.append(partial)
        order = rng.permutation(len(groups))
        return np.concatenate([groups[i] for i in order])

    def _text_epoch_order(self, epoch: int) -> np.ndarray:
        if not self.text_windows:
            return np.zeros(0, dtype=np.int64)
        rng = np.random.default_rng([self.seed, TEXT_STREAM, epoch])
        return rng.permutation(self.text_windows)

    def text_count(self, drawn: int, num_sequences: int) -> int:
        """How many of the `num_sequences` after the first `drawn` are text windows: sequence i is
        text when floor((i + 1) * share) passes an integer, so any run of sequences holds its
        share to within one, whatever the micro-batch size."""
        before = drawn * self.mix // MIX_SCALE
        return (drawn + num_sequences) * self.mix // MIX_SCALE - before

    def _next_text(self, count: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`count` windows, each the first `width` tokens of the next `chunk`-token window."""
        assert self.text.train is not None
        chunk, rows = self.text.chunk, []
        for _ in range(count):
            if self.text_cursor >= len(self._text_order):
                self.text_epoch += 1
                self.text_cursor = 0
                self._text_order = self._text_epoch_order(self.text_epoch)
            start = int(self._text_order[self.text_cursor]) * chunk
            rows.append(np.asarray(self.text.train[start : start + width + 1], dtype=np.int64))
            self.text_cursor += 1
        data = torch.from_numpy(np.stack(rows))
        return data[:, :-1], data[:, 1:]

    def next_batch(self, num_sequences: int) -> Batch:
        texts = self.text_count(self.sequences, num_sequences)
        self.sequences += num_sequences
        picked = []
        for _ in range(num_sequences - texts):
            if self.cursor >= len(self._order):
                self.epoch += 1
                self.cursor = 0
                self._order = self._epoch_order(self.epoch)
            picked.append(self.train_examples[int(self._order[self.cursor])])
            self.cursor += 1
        batch = pad_batch(picked, self.pad_id) if picked else {}
        if texts:
            # Records shorter than a window: the share's text tokens in windows of their width
            # (each window's first tokens), so no record is padded to a window's length.
            chunk = self.text.chunk
            width = min(chunk, batch["input_ids"].shape[1]) if picked else chunk
            count = -(-texts * chunk // width)
            batch["text_ids"], batch["text_targets"] = self._next_text(count, width)
        return batch

    def count_tokens(self, batch: Batch) -> int:
        answers = int((batch["targets"] != IGNORE_INDEX).sum()) if "targets" in batch else 0
        return answers + (batch["text_targets"].numel() if "text_targets" in batch else 0)

    def loss_normaliser(self, batch: Batch) -> float:
        """Answer tokens plus text tokens at their weight: a token-weighted mean of the two."""
        answers = int((batch["targets"] != IGNORE_INDEX).sum()) if "targets" in batch else 0
        text = batch["text_targets"].numel() if "text_targets" in batch else 0
        return answers + self.text.weight * text

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        if "text_targets" not in batch:
            _, total = model(batch["input_ids"], targets=batch["targets"], reduction="sum")
            return total, {}
        text_targets = batch["text_targets"]
        if "targets" in batch:
            # Examples and text windows in one forward (one length, the longer of the two), each
            # group's loss summed apart so the text tokens take their weight.
            length = max(batch["input_ids"].shape[1], text_targets.shape[1])
            ids = torch.cat(
                [
                    _pad_to(batch["input_ids"], length, self.pad_id),
                    _pad_to(batch["text_ids"], length, self.pad_id),
                ]
            )
            targets = torch.cat(
                [
                    _pad_to(batch["targets"], length, IGNORE_INDEX),
                    _pad_to(text_targets, length, IGNORE_INDEX),
                ]
            )
            groups = (batch["input_ids"].shape[0], text_targets.shape[0])
            answers, text_loss = distributed.forward_through(
                model, _group_losses, ids, targets, groups
            )
        else:
            answers = None
            _, text_loss = model(batch["text_ids"], targets=text_targets, reduction="sum")
        metrics = {"text_loss": float(text_loss.detach()) / text_targets.numel()}
        weighted = self.text.weight * text_loss
        return (weighted if answers is None else answers + weighted), metrics

    # ------------------------------------------------------------------------------ evaluation

    def validation_loss(self, model: torch.nn.Module) -> dict[str, float]:
        """Mean loss per trained token on the held-out examples (and bits per byte when known)."""
        device = next(model.parameters()).device
        total_nats, total_tokens, total_bytes = 0.0, 0, 0
        size = max(1, self.eval_batch)
        for start in range(0, len(self.eval_subset), size):
            batch = pad_batch(self.eval_subset[start : start + size], self.pad_id)
            targets = batch["targets"]
            _, loss = model(
                batch["input_ids"].to(device), targets=targets.to(device), reduction="sum"
            )
            total_nats += float(loss)
            trained = targets != IGNORE_INDEX
            total_tokens += int(trained.sum())
            if self.token_bytes is not None:
                total_bytes += int(self.token_bytes[targets[trained]].sum())
        mean = total_nats / max(total_tokens, 1)
        metrics = {"val_loss": round(mean, 5), "val_ppl": round(math.exp(min(mean, 50.0)), 3)}
        if self.token_bytes is not None and total_bytes:
            metrics["val_bpb"] = round(total_nats / math.log(2) / total_bytes, 5)
        if self.token_bytes is not None and self.text.held_out:
            score = score_windows(
                cast(GPT, model),
                self.text.held_out,
                self.token_bytes.numpy(),
                self.pad_id,
                batch_size=size,
            )
            if score.bytes:  # held-out pretraining text: forgetting, visible as it happens
                metrics["text_bpb"] = round(score.nats / math.log(2) / score.bytes, 5)
        return metrics

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        gpt = cast(GPT, model)  # SFT trains a GPT (LoRA adapts its layers in place)
        records, per_family = self.exact_match_records, self.exact_match_per_family
        held_out = held_out_exact_match(gpt, self.tokenizer, records, per_family)
        return {**self.validation_loss(model), **held_out}

    # ------------------------------------------------------------------------------ position

    def epochs_done(self) -> float:
        return self.epoch + self.cursor / len(self._order)

    def sequences_per_epoch(self) -> int:
        """Sequences drawn while every example is seen once: text windows make a step's share."""
        return math.ceil(len(self.train_examples) * MIX_SCALE / (MIX_SCALE - self.mix))

    def data_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "examples": len(self.train_examples),
            "fingerprint": self.fingerprint,
            "group_size": self.group_size,
        }
        if self.mix:
            state["text"] = {
                "sequences": self.sequences,
                "epoch": self.text_epoch,
                "cursor": self.text_cursor,
                "windows": self.text_windows,
                "mix": self.mix,
            }
        return state

    def load_data_state(self, state: dict[str, Any]) -> None:
        saved = state.get("examples")
        saved_print = state.get("fingerprint")  # absent from checkpoints before it was saved
        if (saved is not None and int(saved) != len(self.train_examples)) or (
            saved_print is not None and saved_print != self.fingerprint
        ):
            raise UserError(
                f"the SFT training data changed since the checkpoint ({saved} examples then, "
                f"{len(self.train_examples)} now, or different examples): resume with the same "
                "data and context length, or start over with --overwrite"
            )
        text = state.get("text") or {}
        if (int(text.get("windows", 0)), int(text.get("mix", 0))) != (self.text_windows, self.mix):
            then = f"{text.get('windows', 0)} windows at {text.get('mix', 0) / MIX_SCALE:g}"
            raise UserError(
                f"the SFT text mix changed since the checkpoint ({then} then, "
                f"{self.text_windows} at {self.mix / MIX_SCALE:g} now): resume with the same "
                "pretraining text and sft.text_mix, or start over with --overwrite"
            )
        self.group_size = int(state.get("group_size", self.group_size))
        self.epoch = int(state["epoch"])
        self.cursor = int(state["cursor"])
        self._order = self._epoch_order(self.epoch)
        self.sequences = int(text.get("sequences", 0))
        self.text_epoch = int(text.get("epoch", 0))
        self.text_cursor = int(text.get("cursor", 0))
        self._text_order = self._text_epoch_order(self.text_epoch)


@dataclass
class SftInputs(FinetuneInputs):
    """A fine-tuning run's inputs plus pretraining text to mix in (`--text`; none: the chain's)."""

    text: list[Path] = field(default_factory=list)


def sft_text(
    config: Config,
    inputs: FinetuneInputs,
    tokenizer: Any,
    run_dir: Path,
    on_event: EventCallback | None,
    held_out_windows: int,
) -> TextMix:
    """The text mix `[sft]` asks for (the chain's pretraining text, or `--text`), and held-out
    text for `text_bpb` even when mixing is off. One note line says what is mixed, or why not."""
    settings, context = config.sft, config.model.context_length
    chunk = min(settings.text_chunk, context)
    mixing = settings.text_mix > 0
    files = list(getattr(inputs, "text", []) or [])
    chain = chain_text(
        inputs.from_run,
        tokenizer,
        context,
        text_files=files,
        cache_dir=run_dir / "shards",
        on_event=on_event,
        held_out_windows=held_out_windows,
        encode=mixing,
    )
    train = chain.train if mixing else None
    if mixing and train is not None and (len(train) - 1) // chunk < 1:
        chain.note, train = f"{chain.source} is shorter than one {chunk}-token window", None
    if mixing and train is None:
        emit(
            on_event,
            "note",
            "sft",
            message=f"text mix off: {chain.note}; pass --text FILE to mix pretraining text "
            "(or --set sft.text_mix=0 to silence this)",
        )
    elif mixing:
        emit(
            on_event,
            "note",
            "sft",
            message=f"text mix: {settings.text_mix:.0%} of each step's sequences are "
            f"{chunk}-token windows of {chain.source}, each token weighing "
            f"{settings.text_weight:g} of an answer token",
        )
    return TextMix(
        train=train,
        share=settings.text_mix,
        chunk=chunk,
        weight=settings.text_weight,
        held_out=chain.held_out,
    )


def run_sft(
    config: Config, spec: RunSpec, inputs: FinetuneInputs, on_event: EventCallback | None = None
) -> dict[str, Any]:
    """Fine-tune (or resume) an SFT run in `spec.run_dir`; returns the Trainer's summary."""
    setup = start_finetune(config, spec, inputs, "sft", on_event)
    train, tokenizer, sft_settings = setup.train, setup.tokenizer, config.sft
    train_records, val_records = train_and_val_records("sft", inputs, config)
    context = config.model.context_length
    train_examples, train_stats = build_examples(
        train_records, tokenizer, context, sft_settings.train_on_prompt
    )
    val_examples, val_stats = build_examples(
        val_records, tokenizer, context, sft_settings.train_on_prompt
    )
    emit(on_event, "note", "sft", message=f"training: {train_stats.describe()}")
    emit(on_event, "note", "sft", message=f"validation: {val_stats.describe()}")
    eval_sequences = train.eval_batches * train.micro_batch_size
    # Rank 0 encodes the mixed text first; under torchrun the others then reuse its shards.
    text = distributed.first_rank(
        lambda: sft_text(config, inputs, tokenizer, spec.run_dir, on_event, eval_sequences)
    )
    text_bytes = 0 if text.train is None else 4 * len(text.train)
    micro_batch, governor_messages = fit_memory(
        config,
        tokenizer.vocab_size,
        setup.precision.dtype_name,
        16 * (train_stats.tokens + val_stats.tokens) + text_bytes,  # ids and targets, int64
        on_event,
        measure_baseline=True,
        stage="sft",
        trainable_params=trainable_parameters(setup.model),
        # Batches are padded to their longest example, never to the context length.
        seq_len=max(text.chunk, *(len(e) for e in [*train_examples, *val_examples])),
    )
    spec.events.extend({"event": "governor", "message": m} for m in governor_messages)
    stage = SftStage(
        train_examples,
        val_examples,
        seq_len=context,
        seed=train.seed,
        pad_id=tokenizer.pad_id,
        group_size=train.micro_batch_size,
        eval_sequences=eval_sequences,
        tokenizer=tokenizer,
        exact_match_records=[r for r in val_records if r.get("task")],
        exact_match_per_family=sft_settings.exact_match_per_family,
        token_bytes=token_byte_lengths(tokenizer),
        eval_batch=min(EVAL_BATCH, micro_batch),
        text=text,
    )
    return finish_finetune(config, spec, inputs, setup, stage, micro_batch, on_event)
