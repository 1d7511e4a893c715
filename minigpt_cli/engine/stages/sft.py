"""Supervised fine-tuning: conversations in the chat template, loss on the assistant's tokens only.

The pieces `minigpt sft` assembles (`run_sft`, at the end, puts them together):

- `load_sft_records`: the user's records (any of the three SFT formats, already normalised to
  `{"messages", "task"}` by `engine.data`) or the built-in instruction data.
- `build_examples`: render every conversation with the one chat template
  (`data.chat_template`), turn the loss mask into targets (`IGNORE_INDEX` wherever nothing is
  learned), and truncate what does not fit the context. Truncation is counted, never silent (see
  `render_example` for the policy).
- `SftStage`: the Trainer's `Stage` for these examples. Batches are length-grouped so padding
  stays small, yet the order is a pure function of (seed, epoch), so resuming replays the exact
  batches. Evaluation reports held-out loss and exact match per task family.
- `exact_match_by_family`: greedy answers to held-out prompts, compared after `normalise_answer`.
  Public because DPO and `minigpt eval` report the same numbers the same way.

Where the loss ignores tokens: `build_examples` writes `IGNORE_INDEX` (-100, from engine.model)
into the targets of every position whose next token is not trained (prompt, role tokens, bos) and
`SftStage.next_batch` pads targets with it; `GPT.forward(..., reduction="sum")` then skips those
positions, so padding and masked tokens contribute neither loss nor gradient.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from minigpt_cli.engine.core.events import EventCallback, emit
from minigpt_cli.engine.data import chat_template
from minigpt_cli.engine.model.gpt import IGNORE_INDEX, reuse_stacked_weights
from minigpt_cli.engine.training.trainer import EVAL_BATCH, Batch, StageBase
from minigpt_cli.errors import UserError

if TYPE_CHECKING:
    from minigpt_cli.config.schema import Config

GROUPS_PER_WINDOW = 16  # length sorting happens within windows of this many micro-batches
EXACT_MATCH_MARGIN = 8  # new tokens allowed beyond the longest reference answer (+ end of turn)
EXACT_MATCH_BATCH = 32  # held-out prompts decoded together


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def train_and_val_records(kind: str, inputs: FinetuneInputs, config: Config) -> tuple[list, list]:
    """A fine-tuning run's (train, val) records of `kind`: with `--val-data`, every `--data`
    record trains and the val files validate; else a fixed share of `--data` (or the built-in
    held-out split) validates."""
    from minigpt_cli.engine.data.records import stage_records

    size, fraction = config.data.builtin_size, config.data.val_fraction
    data = inputs.data or None
    if inputs.val_data:
        train = stage_records(kind, data, "all" if data else "train", size, fraction)
        return train, stage_records(kind, inputs.val_data, "all", size, fraction)
    return stage_records(kind, data, "train", size, fraction), stage_records(
        kind, data, "val", size, fraction
    )


def load_sft_records(paths: Sequence[Path] | None, split: str, config: Config) -> list[dict]:
    """SFT records `{"messages", "task"}` of `split` (see `data.stage_records`)."""
    from minigpt_cli.engine.data.records import stage_records

    return stage_records("sft", paths, split, config.data.builtin_size, config.data.val_fraction)


@dataclass(frozen=True)
class RenderedConversation:
    """One conversation in the template after fitting it to the context."""

    ids: list[int]
    mask: list[bool]
    truncated: bool  # anything was cut (earlier turns dropped, or the end cut off)
    dropped_turns: int  # earlier user/assistant exchanges removed to make it fit


def _exchange_starts(messages: Sequence[dict]) -> list[int]:
    """Indices of the user messages that open each user/assistant exchange."""
    return [i for i, m in enumerate(messages) if m["role"] == "user"]


def render_example(
    messages: Sequence[dict], tokenizer: Any, max_len: int | None, train_on_prompt: bool = False
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
        starts = _exchange_starts(current)
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
    tokenizer: Any,
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


def pad_batch(examples: Sequence[SftExample], pad_id: int) -> Batch:
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


# ----------------------------------------------------------------------------------------------
# Exact match
# ----------------------------------------------------------------------------------------------


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


def select_per_family(records: Sequence[dict], per_family: int | None) -> list[dict]:
    """The first `per_family` records of each task family, in their original order (None: all)."""
    if per_family is None:
        return list(records)
    taken: dict[str | None, int] = {}
    chosen = []
    for record in records:
        family = record.get("task")
        if taken.get(family, 0) < per_family:
            taken[family] = taken.get(family, 0) + 1
            chosen.append(record)
    return chosen


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
@reuse_stacked_weights()
def greedy_complete(
    model: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: Sequence[int]
) -> list[list[int]]:
    """Greedy continuations of several prompts of different lengths, decoded as one batch.

    No padding and no attention mask are needed: every row starts at position 0, the shared
    prefill covers the shortest prompt, and a row whose prompt is longer is fed its own next
    prompt token (instead of the argmax) until its prompt is used up. Each row therefore sees
    exactly its own tokens, and the result equals decoding it alone (up to float summation order).
    Stop ids end a row and are not returned. Prompts are cut to their last `context -
    max_new_tokens` tokens when prompt plus answer would not fit the context.
    """
    if not prompts:
        return []
    context = int(model.config.context_length)
    budget = max(1, min(int(max_new_tokens), context - 1))
    keep = context - budget
    rows = [[int(t) for t in prompt][-keep:] for prompt in prompts]
    if any(not row for row in rows):
        raise ValueError("every prompt needs at least one token")
    lengths = [len(row) for row in rows]
    total = max(lengths) + budget
    device = _model_device(model)
    history = torch.zeros(len(rows), total, dtype=torch.long, device=device)
    for index, row in enumerate(rows):
        history[index, : len(row)] = torch.tensor(row, dtype=torch.long)
    in_prompt_until = torch.tensor(lengths, device=device)
    stops = {int(s) for s in stop_ids}
    was_training = model.training
    model.eval()
    try:
        cache = model.new_kv_cache(len(rows), max_len=total)
        position = min(lengths)
        logits = model(history[:, :position], kv_cache=cache, last_only=True)[:, -1]
        outputs: list[list[int]] = [[] for _ in rows]
        active = [True] * len(rows)
        while True:
            chosen = logits.argmax(dim=-1)
            from_prompt = position < in_prompt_until
            next_ids = torch.where(from_prompt, history[:, position], chosen)
            for index, token in enumerate(next_ids.tolist()):
                if position < lengths[index] or not active[index]:
                    continue
                if token in stops:
                    active[index] = False
                    continue
                outputs[index].append(token)
                if len(outputs[index]) >= budget:
                    active[index] = False
            if not any(active) or position + 1 >= total:
                break
            history[:, position] = next_ids
            logits = model(next_ids.unsqueeze(1), kv_cache=cache)[:, -1]
            position += 1
    finally:
        model.train(was_training)
    return outputs


def score_answers(
    model: Any,
    tokenizer: Any,
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
    from minigpt_cli.engine.resources.governor import throttle_point

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
        outputs = greedy_complete(model, [items[i][3] for i in batch], budget, stops)
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
    model: Any,
    tokenizer: Any,
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
    model: Any, tokenizer: Any, records: Sequence[dict], per_family: int
) -> dict[str, float]:
    """A stage's exact-match evaluation, or nothing when it has no records or it is switched off
    (`exact_match_per_family = 0`)."""
    if not records or per_family <= 0 or tokenizer is None:
        return {}
    return exact_match_by_family(model, tokenizer, records, per_family=per_family)


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------


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
        device = _model_device(model)
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
        metrics = self.validation_loss(model)
        metrics.update(
            held_out_exact_match(
                model, self.tokenizer, self.exact_match_records, self.exact_match_per_family
            )
        )
        return metrics

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


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


@dataclass
class FinetuneInputs:
    """What a fine-tuning verb starts from: the parent run, data files (none = built-in), LoRA."""

    from_run: Path
    data: list[Path]
    val_data: list[Path]
    lora: bool = False
    merge: bool = False
    preference_data: list[Path] = field(default_factory=list)  # rlhf: the reward model's pairs
    reward_model: Path | None = None  # rlhf: a reward run to reuse instead of training one


def prepare_model(
    from_run: Path, lora: bool, settings: Any, seed: int, on_event: EventCallback | None, stage: str
) -> tuple[Any, Any]:
    """The starting policy: the parent's weights, with adapters when asked (or inherited).

    A LoRA parent keeps training its own adapter (DESIGN.md: a child of a LoRA run trains the same
    adapter further); a full parent gets fresh adapters with `--lora`, or trains every weight.
    Rebuilt the same way on --resume, before the Trainer restores the checkpoint over it.
    """
    from minigpt_cli.engine.model import lora as lora_lib
    from minigpt_cli.engine.runs.checkpoint import load_run
    from minigpt_cli.engine.training.trainer import seed_everything

    loaded = load_run(from_run)
    model = loaded.model
    seed_everything(seed)  # adapter initialisation draws from the seeded generator
    if lora_lib.has_lora(model):
        trainable = lora_lib.mark_only_lora_trainable(model)
        emit(
            on_event,
            "note",
            stage,
            message=f"continuing the parent's LoRA adapter ({trainable:,} trainable parameters)",
        )
    elif lora:
        trainable = lora_lib.apply_lora(model, settings)
        total = sum(p.numel() for p in model.parameters())
        emit(
            on_event,
            "note",
            stage,
            message=f"LoRA r={settings.r} alpha={settings.alpha:g} on "
            f"{', '.join(settings.targets)}: {trainable:,} trainable parameters "
            f"({100 * trainable / total:.1f}% of {total:,})",
        )
    else:
        model.requires_grad_(True)
    model.train()
    return model, loaded.tokenizer


def trainable_parameters(model: torch.nn.Module) -> int:
    """Parameters the optimizer updates (LoRA: the adapters only), for the memory estimate."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def finish_lora_run(model: torch.nn.Module, run_dir: Path, merge: bool) -> str | None:
    """After training: with `--merge`, also write the merged weights as `model.safetensors`."""
    from minigpt_cli.engine.model import lora as lora_lib
    from minigpt_cli.engine.runs.checkpoint import MODEL_FILE, save_tensors

    if not (merge and lora_lib.has_lora(model)):
        return None
    merged = copy.deepcopy(model)
    lora_lib.merge_lora(merged)
    save_tensors(run_dir / MODEL_FILE, merged.export_state_dict(), {"format": "minigpt"})
    return f"merged the adapter into {run_dir / MODEL_FILE}"


@dataclass
class FinetuneSetup:
    """What every fine-tuning run starts from: its hyperparameters, device and starting policy."""

    train: Any  # TrainConfig of the stage
    device: torch.device
    precision: Any
    model: torch.nn.Module
    tokenizer: Any


def start_finetune(
    config: Config,
    spec: Any,
    inputs: FinetuneInputs,
    stage: str,
    on_event: EventCallback | None,
) -> FinetuneSetup:
    """Device, precision and the starting policy on it, its tokenizer copied into the run."""
    from minigpt_cli.engine.hardware.device import (
        apply_matmul_precision,
        resolve_device,
        resolve_precision,
    )
    from minigpt_cli.engine.model import lora as lora_lib
    from minigpt_cli.engine.runs.checkpoint import MODEL_FILE

    train = config.stage_train(stage)
    device = resolve_device(train.device)
    precision = resolve_precision(train.precision, device)
    apply_matmul_precision(precision)
    model, tokenizer = prepare_model(
        inputs.from_run, inputs.lora, config.lora, train.seed, on_event, stage
    )
    if lora_lib.has_lora(model):
        config.lora = lora_lib.lora_settings(model)
        if spec.resume:  # a merged file from an earlier finish would shadow the newer adapter
            (spec.run_dir / MODEL_FILE).unlink(missing_ok=True)
    tokenizer.save(spec.run_dir)
    model.to(device)
    return FinetuneSetup(train, device, precision, model, tokenizer)


def finish_finetune(
    config: Config,
    spec: Any,
    inputs: FinetuneInputs,
    setup: FinetuneSetup,
    stage: Any,
    micro_batch: int,
    on_event: EventCallback | None,
) -> dict[str, Any]:
    """Train `stage` to the end with the one Trainer; with --merge, write the merged weights.

    `stage` evaluates in batches of at most `micro_batch` (its `eval_batch`, set by the caller),
    which is what the memory plan assumed for validation.
    """
    from minigpt_cli.engine.training.trainer import Trainer

    trainer = Trainer(
        config,
        stage,
        setup.model,
        spec,
        device=setup.device,
        precision=setup.precision,
        on_event=on_event,
        vocab_size=setup.tokenizer.vocab_size,
        micro_batch_size=micro_batch,
    )
    summary = trainer.fit()
    note = finish_lora_run(getattr(setup.model, "policy", setup.model), spec.run_dir, inputs.merge)
    if note:
        emit(on_event, "note", stage.name, message=note)
    return summary


def run_sft(
    config: Config, spec: Any, inputs: FinetuneInputs, on_event: EventCallback | None = None
) -> dict[str, Any]:
    """Fine-tune (or resume) an SFT run in `spec.run_dir`; returns the Trainer's summary."""
    from minigpt_cli.engine.resources.memory import fit_memory
    from minigpt_cli.engine.stages.pretrain import token_byte_lengths

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
