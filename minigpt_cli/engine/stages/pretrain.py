"""Pretraining: next-token prediction over a token stream, and the pipeline that builds that stream.

`run_pretrain` is the one engine function behind `minigpt pretrain`: it finds or trains the
tokenizer, encodes the data (built-in text when no --data is given), splits off validation, builds
or loads the model and hands a `PretrainStage` to the Trainer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minigpt_cli.config.schema import Config, TrainConfig
from minigpt_cli.datasets import BUILTIN_DATA_SEED
from minigpt_cli.datasets.builtin import pretrain_records
from minigpt_cli.engine.core.events import EventCallback, emit
from minigpt_cli.engine.core.seeding import seed_everything
from minigpt_cli.engine.data.shards import (
    TokenRange,
    TokenShards,
    encode_to_shards,
    is_shard_folder,
)
from minigpt_cli.engine.data.stage_records import validation_split
from minigpt_cli.engine.data.tokenizer import Tokenizer
from minigpt_cli.engine.data.tokenizer_training import VocabularyTooLarge, train_tokenizer
from minigpt_cli.engine.hardware.monitor import tree_rss_bytes
from minigpt_cli.engine.metrics.text import token_byte_lengths
from minigpt_cli.engine.model.gpt import GPT
from minigpt_cli.engine.resources.governor import tokenizer_training_chars
from minigpt_cli.engine.resources.memory import (
    fit_memory,
    memory_cap_bytes,
    refuse_what_cannot_fit,
)
from minigpt_cli.engine.runs.files import MODEL_FILE, TOKENIZER_FILE
from minigpt_cli.engine.runs.load import load_model_weights
from minigpt_cli.engine.training import distributed
from minigpt_cli.engine.training.finetune import resolve_hardware
from minigpt_cli.engine.training.optim import plan_steps
from minigpt_cli.engine.training.run_spec import RunSpec
from minigpt_cli.engine.training.stage import EVAL_BATCH, Batch, StageBase
from minigpt_cli.engine.training.trainer import Trainer
from minigpt_cli.errors import UserError


class PretrainStage(StageBase):
    """Non-overlapping windows of the token stream, reshuffled every epoch from the seed."""

    name = "pretrain"

    def __init__(
        self,
        train_tokens: TokenRange,
        val_tokens: TokenRange,
        seq_len: int,
        seed: int,
        token_bytes: np.ndarray,
        eval_sequences: int,
        eval_batch: int = EVAL_BATCH,
    ) -> None:
        self.train_tokens = train_tokens
        self.val_tokens = val_tokens
        self.seq_len = seq_len
        self.seed = seed
        self.token_bytes = torch.from_numpy(token_bytes)
        self.num_windows = self.window_count(len(train_tokens), seq_len)
        if self.num_windows < 1:
            raise UserError(
                f"too little training text: {len(train_tokens)} tokens, need more than one "
                f"context window of {seq_len} (add data or lower model.context_length)"
            )
        val_windows = self.window_count(len(val_tokens), seq_len)
        if val_windows < 1:
            raise UserError(
                f"too little validation text: {len(val_tokens)} tokens for a {seq_len}-token "
                "window (raise data.val_fraction or pass a larger --val-data)"
            )
        count = min(val_windows, eval_sequences)
        self.val_starts = np.linspace(0, (val_windows - 1) * seq_len, count).astype(np.int64)
        self.val_starts = (self.val_starts // seq_len) * seq_len
        self.eval_batch = eval_batch  # at most the micro-batch: `run_shape` lowers it
        self.epoch = 0
        self.cursor = 0
        self._order = self._permutation(0)

    @staticmethod
    def window_count(tokens: int, seq_len: int) -> int:
        """Whole windows in a stream of `tokens`: each holds `seq_len` inputs and the token after
        them, the last input's target, so consecutive windows share no input."""
        return (tokens - 1) // seq_len

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)

    def _windows(self, tokens: TokenRange, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.stack(
            [np.asarray(tokens[s : s + self.seq_len + 1], dtype=np.int64) for s in starts]
        )
        data = torch.from_numpy(rows)
        return data[:, :-1], data[:, 1:]

    def next_batch(self, num_sequences: int) -> Batch:
        starts = []
        for _ in range(num_sequences):
            if self.cursor >= self.num_windows:
                self.epoch += 1
                self.cursor = 0
                self._order = self._permutation(self.epoch)
            starts.append(int(self._order[self.cursor]) * self.seq_len)
            self.cursor += 1
        inputs, targets = self._windows(self.train_tokens, np.array(starts))
        return {"input_ids": inputs, "targets": targets}

    def count_tokens(self, batch: Batch) -> int:
        return int(batch["targets"].numel())

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        _, loss = model(batch["input_ids"], targets=batch["targets"], reduction="sum")
        return loss, {}

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        total_nats, total_tokens, total_bytes = 0.0, 0, 0
        device = next(model.parameters()).device
        for index in range(0, len(self.val_starts), self.eval_batch):
            inputs, targets = self._windows(
                self.val_tokens, self.val_starts[index : index + self.eval_batch]
            )
            _, loss = model(inputs.to(device), targets=targets.to(device), reduction="sum")
            total_nats += float(loss)
            total_tokens += targets.numel()
            total_bytes += int(self.token_bytes[targets].sum())
        mean = total_nats / max(total_tokens, 1)
        return {
            "val_loss": round(mean, 5),
            "val_ppl": round(math.exp(min(mean, 50.0)), 3),
            "val_bpb": round(total_nats / math.log(2) / max(total_bytes, 1), 5),
        }

    def epochs_done(self) -> float:
        return self.epoch + self.cursor / self.num_windows

    def sequences_per_epoch(self) -> int:
        return self.num_windows

    def data_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_data_state(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.cursor = int(state["cursor"])
        self._order = self._permutation(self.epoch)


@dataclass
class PretrainInputs:
    """Where the text and tokenizer come from (None everywhere = the built-in corpus)."""

    data: list[Path] = field(default_factory=list)
    val_data: list[Path] = field(default_factory=list)
    tokenizer: Path | None = None
    from_run: Path | None = None


def _builtin_texts(config: Config) -> list[str]:
    return [r["text"] for r in pretrain_records(config.data.builtin_size, seed=BUILTIN_DATA_SEED)]


def _encode_texts(tokenizer: Tokenizer, texts: list[str]) -> np.ndarray:
    ids: list[int] = []
    for encoded in tokenizer.encode_batch(texts):
        ids.extend(encoded)
        ids.append(tokenizer.eos_id)
    return np.asarray(ids, dtype=np.int32)


def _prepare_tokenizer(
    config: Config,
    inputs: PretrainInputs,
    run_dir: Path,
    resume: bool,
    on_event: EventCallback | None,
) -> Any:
    own = run_dir / TOKENIZER_FILE
    if resume and own.exists():
        return Tokenizer.load(run_dir)
    source = inputs.tokenizer or inputs.from_run
    if source is not None:
        tokenizer = Tokenizer.load(source)
        tokenizer.save(run_dir)
        return tokenizer
    if any(is_shard_folder(p) for p in inputs.data):
        raise UserError(
            "--data is a shard folder: pass the tokenizer that encoded it with --tokenizer DIR"
        )
    emit(on_event, "note", "pretrain", message="training a tokenizer on the training text")
    training_input: Any = list(inputs.data) if inputs.data else _builtin_texts(config)

    def train(vocab_size: int) -> Any:
        return train_tokenizer(
            training_input,
            vocab_size,
            run_dir,
            character_coverage=config.tokenizer.character_coverage,
            max_training_chars=_tokenizer_chars_under_cap(config, on_event),
            on_event=on_event,
            stage="pretrain",
        )

    try:
        report = train(config.tokenizer.vocab_size)
    except VocabularyTooLarge as error:
        if inputs.data:
            raise  # the user's own text: they choose the size
        # The built-in corpus is small; a large preset's vocabulary is meant for real corpora.
        emit(
            on_event,
            "note",
            "pretrain",
            message=f"the built-in corpus supports at most {error.supported:,} tokenizer "
            f"pieces: using {error.supported:,} instead of {config.tokenizer.vocab_size:,}",
        )
        report = train(error.supported)
    emit(on_event, "tokenizer", "pretrain", report=report)
    return Tokenizer.load(run_dir)


def _tokenizer_chars_under_cap(config: Config, on_event: EventCallback | None) -> int:
    wanted = config.tokenizer.max_training_chars
    cap = memory_cap_bytes(config.resources)
    chars = tokenizer_training_chars(wanted, cap, tree_rss_bytes())
    if chars < 10_000:
        raise UserError(
            f"no room to train a tokenizer under the {cap / 2**20:,.0f} MB memory cap "
            "(the process already holds most of it): raise --max-memory"
        )
    if chars < wanted:
        emit(
            on_event,
            "governor",
            "pretrain",
            message=f"tokenizer sample lowered from {wanted:,} to {chars:,} characters "
            f"to stay under the {cap / 2**20:,.0f} MB memory cap",
        )
    return chars


def _token_stream(
    tokenizer: Tokenizer, paths: list[Path], cache_dir: Path, on_event: EventCallback | None
) -> TokenRange:
    """Memory-mapped tokens of `paths` (encoded once into `cache_dir`, reused when unchanged)."""
    if len(paths) == 1 and is_shard_folder(paths[0]):
        shards = TokenShards(paths[0])
        expected = shards.meta.get("tokenizer_sha256")
        if expected and expected != tokenizer.sha256:
            raise UserError(f"{paths[0]}: shards were encoded with a different tokenizer")
    else:
        encode_to_shards(tokenizer, paths, cache_dir, on_event=on_event, stage="pretrain")
        shards = TokenShards(cache_dir)
    return TokenRange(shards)


def load_tokens(
    config: Config,
    inputs: PretrainInputs,
    tokenizer: Tokenizer,
    run_dir: Path,
    on_event: EventCallback | None,
) -> tuple[TokenRange, TokenRange]:
    """Training and validation token streams (validation: --val-data, else the tail)."""
    if inputs.data:
        tokens = _token_stream(tokenizer, inputs.data, run_dir / "shards" / "train", on_event)
    else:
        emit(on_event, "note", "pretrain", message="no --data given: using the built-in corpus")
        tokens = TokenRange(_encode_texts(tokenizer, _builtin_texts(config)))
    if inputs.val_data:
        val = _token_stream(tokenizer, inputs.val_data, run_dir / "shards" / "val", on_event)
        return tokens, val
    split = training_split(config, len(tokens))
    return (
        TokenRange(tokens.source, tokens.start, tokens.start + split),
        TokenRange(tokens.source, tokens.start + split, tokens.stop),
    )


def training_split(config: Config, tokens: int) -> int:
    """How many of `tokens` train when validation is the stream's tail (no --val-data): all but
    the last `data.val_fraction`."""
    return validation_split(tokens, config.data.val_fraction)


@dataclass(frozen=True)
class RunShape:
    """How a pretraining run is laid out over its tokens: windows, steps and validation passes.

    `run_pretrain` builds its stage from it and `doctor` times a preset's default run by it, so a
    change to pretraining's layout reaches the recommendation by itself.
    """

    train: TrainConfig
    seq_len: int
    train_windows: int
    eval_sequences: int  # validation windows scored at each evaluation
    eval_batch: int  # validation windows per forward pass

    @property
    def steps(self) -> int:
        """Optimizer steps, as the Trainer plans them: a step is a global batch of windows."""
        batch = self.train.global_batch_size
        return plan_steps(self.train, batch * self.seq_len, batch, self.train_windows)

    @property
    def tokens(self) -> int:
        """Tokens the run trains on."""
        return self.steps * self.train.global_batch_size * self.seq_len

    @property
    def evaluations(self) -> int:
        """Validation passes: every `eval_every` steps, and at the last step."""
        return -(-self.steps // self.train.eval_every)

    @property
    def eval_forwards(self) -> int:
        """Forward passes of one validation pass."""
        return -(-self.eval_sequences // self.eval_batch)


def run_shape(
    config: Config, train_tokens: int, val_tokens: int, micro_batch_size: int
) -> RunShape:
    """The layout of a pretraining run on `train_tokens` and `val_tokens` tokens, at the
    micro-batch the memory plan chose (a validation forward is at most that large)."""
    train = config.stage_train("pretrain")
    seq = config.model.context_length
    val_windows = max(1, PretrainStage.window_count(val_tokens, seq))
    return RunShape(
        train=train,
        seq_len=seq,
        train_windows=max(1, PretrainStage.window_count(train_tokens, seq)),
        eval_sequences=min(val_windows, train.eval_batches * train.micro_batch_size),
        eval_batch=min(EVAL_BATCH, micro_batch_size),
    )


def run_pretrain(
    config: Config,
    spec: RunSpec,
    inputs: PretrainInputs,
    on_event: EventCallback | None = None,
) -> dict[str, Any]:
    """Train (or resume) a pretraining run in `spec.run_dir`; returns the Trainer's summary."""
    train = config.stage_train("pretrain")
    device, precision = resolve_hardware(train)
    refuse_what_cannot_fit(config, precision.dtype_name)
    # Under torchrun rank 0 trains (or copies) the tokenizer and encodes the text; the other
    # ranks wait, then load the tokenizer it wrote and reuse its shards.
    tokenizer = distributed.first_rank(
        lambda: _prepare_tokenizer(config, inputs, spec.run_dir, spec.resume, on_event),
        lambda: Tokenizer.load(spec.run_dir),
    )
    config.tokenizer.vocab_size = tokenizer.vocab_size
    train_tokens, val_tokens = distributed.first_rank(
        lambda: load_tokens(config, inputs, tokenizer, spec.run_dir, on_event)
    )
    emit(
        on_event,
        "note",
        "pretrain",
        message=f"{len(train_tokens):,} training tokens, {len(val_tokens):,} validation tokens",
    )
    micro_batch, governor_messages = fit_memory(
        config,
        tokenizer.vocab_size,
        precision.dtype_name,
        4 * (len(train_tokens) + len(val_tokens)),
        on_event,
        measure_baseline=True,
    )
    spec.events.extend({"event": "governor", "message": m} for m in governor_messages)
    shape = run_shape(config, len(train_tokens), len(val_tokens), micro_batch)
    stage = PretrainStage(
        train_tokens,
        val_tokens,
        config.model.context_length,
        seed=train.seed,
        token_bytes=token_byte_lengths(tokenizer),
        eval_sequences=shape.eval_sequences,
        eval_batch=shape.eval_batch,
    )
    seed_everything(train.seed)
    model = GPT(config.model, tokenizer.vocab_size)
    if inputs.from_run is not None and not spec.resume:
        load_model_weights(model, inputs.from_run / MODEL_FILE)
    model.to(device)
    trainer = Trainer(
        config,
        stage,
        model,
        spec,
        device=device,
        precision=precision,
        on_event=on_event,
        vocab_size=tokenizer.vocab_size,
        micro_batch_size=micro_batch,
    )
    return trainer.fit()
