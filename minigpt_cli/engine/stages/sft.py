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
from typing import Any, cast

import numpy as np
import torch

from minigpt_cli.config.schema import Config
from minigpt_cli.engine.core.events import EventCallback, emit
from minigpt_cli.engine.data.examples import SftExample, build_examples, pad_batch
from minigpt_cli.engine.metrics.exact_match import held_out_exact_match
from minigpt_cli.engine.metrics.text import token_byte_lengths
from minigpt_cli.engine.model.gpt import GPT
from minigpt_cli.engine.model.loss import IGNORE_INDEX
from minigpt_cli.engine.resources.memory import fit_memory
from minigpt_cli.engine.training.finetune import (
    FinetuneInputs,
    finish_finetune,
    start_finetune,
    train_and_val_records,
    trainable_parameters,
)
from minigpt_cli.engine.training.stage import EVAL_BATCH, Batch, StageBase
from minigpt_cli.engine.training.trainer import RunSpec
from minigpt_cli.errors import UserError

GROUPS_PER_WINDOW = 16  # length sorting happens within windows of this many micro-batches


class SftStage(StageBase):
    """Length-grouped batches of SFT examples; loss on trained tokens only.

    Batch order (a pure function of seed and epoch, so `data_state` = epoch + cursor replays it):
    shuffle the examples, sort each window of `GROUPS_PER_WINDOW` micro-batches by length, cut it
    into groups of `group_size` (the configured micro-batch), shuffle the groups. Neighbours in a
    group have similar lengths, so padding stays small, while which examples meet, and in what
    order the groups come, still changes every epoch. When the example count is not a multiple of
    `group_size` the last group is completed with its nearest-length neighbours (a few examples
    appear twice in that epoch), so micro-batches stay aligned with groups across epochs.
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
        self.mean_loss_tokens = float(np.mean([e.loss_tokens for e in self.train_examples]))
        count = min(len(self.val_examples), max(1, eval_sequences))
        picks = np.linspace(0, len(self.val_examples) - 1, count).round().astype(np.int64)
        val_subset = [self.val_examples[i] for i in sorted(set(picks.tolist()))]
        self.eval_subset = sorted(val_subset, key=len)  # similar lengths batch together
        self.eval_batch = eval_batch  # the caller lowers it to the micro-batch
        self.epoch = 0
        self.cursor = 0
        self._order = self._epoch_order(0)

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

    def next_batch(self, num_sequences: int) -> Batch:
        picked = []
        for _ in range(num_sequences):
            if self.cursor >= len(self._order):
                self.epoch += 1
                self.cursor = 0
                self._order = self._epoch_order(self.epoch)
            picked.append(self.train_examples[int(self._order[self.cursor])])
            self.cursor += 1
        return pad_batch(picked, self.pad_id)

    def count_tokens(self, batch: Batch) -> int:
        return int((batch["targets"] != IGNORE_INDEX).sum())

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        _, loss = model(batch["input_ids"], targets=batch["targets"], reduction="sum")
        return loss, {}

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
        return len(self.train_examples)

    def data_state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "examples": len(self.train_examples),
            "group_size": self.group_size,
        }

    def load_data_state(self, state: dict[str, Any]) -> None:
        saved = state.get("examples")
        if saved is not None and int(saved) != len(self.train_examples):
            raise UserError(
                f"the SFT training data changed since the checkpoint ({saved} examples then, "
                f"{len(self.train_examples)} now): resume with the same data, or start over "
                "with --overwrite"
            )
        self.group_size = int(state.get("group_size", self.group_size))
        self.epoch = int(state["epoch"])
        self.cursor = int(state["cursor"])
        self._order = self._epoch_order(self.epoch)


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
    micro_batch, governor_messages = fit_memory(
        config,
        tokenizer.vocab_size,
        setup.precision.dtype_name,
        16 * (train_stats.tokens + val_stats.tokens),  # ids and targets, int64
        on_event,
        measure_baseline=True,
        stage="sft",
        trainable_params=trainable_parameters(setup.model),
        # Batches are padded to their longest example, never to the context length.
        seq_len=max(len(e) for e in [*train_examples, *val_examples]),
    )
    spec.events.extend({"event": "governor", "message": m} for m in governor_messages)
    stage = SftStage(
        train_examples,
        val_examples,
        seq_len=context,
        seed=train.seed,
        pad_id=tokenizer.pad_id,
        group_size=train.micro_batch_size,
        eval_sequences=train.eval_batches * train.micro_batch_size,
        tokenizer=tokenizer,
        exact_match_records=[r for r in val_records if r.get("task")],
        exact_match_per_family=sft_settings.exact_match_per_family,
        token_bytes=token_byte_lengths(tokenizer),
        eval_batch=min(EVAL_BATCH, micro_batch),
    )
    return finish_finetune(config, spec, inputs, setup, stage, micro_batch, on_event)
