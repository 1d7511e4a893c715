"""`minigpt import HF_DIR --out RUN`: a local Hugging Face Llama checkpoint as a finished run.

The order keeps a refusal cheap and clean, as the export's does: the destination is checked, then
the whole folder (`hf_checkpoint.read_checkpoint`: config, tokenizer, every tensor's name, shape
and dtype from the safetensors headers), and only then are the weights read and the run written,
into a temporary folder beside RUN renamed into place at the end (`output.staged_folder`), so RUN
is whole or absent.

The run is what a finished pretraining run holds, so every verb takes it (`sft --from`, `dpo
--from`, `rlhf --from`, `generate`, `chat`, `eval`, `export`):

- `config.toml`: the `[model]` section from config.json (`hf_checkpoint.model_config`), every other
  section at its default;
- `model.safetensors`: the weights in fp32 (minigpt trains fp32 master weights; bf16 and fp16
  widen exactly), under the names minigpt already uses, which are transformers' own; the rows of
  pieces the import added (`hf_tokenizer_import`) start at the mean of the trained rows;
- `tokenizer.model` (+ minigpt's `tokenizer.json` describing it);
- `trainer_state.json`: finished, stage `import`, step 0, and under `sources` where it came from:
  the folder, config.json's SHA-256, the weight files, the tokenizer file and what was renamed or
  added; `metrics.jsonl`: one event row saying the same.

Memory: no model is built; the weights are read from the checkpoint's mapped file (fp32 tensors
are views of it; bf16 and fp16 ones are widened into new memory) and streamed into the run's file
one tensor at a time (`_save_weights`), so the peak is about one copy of the fp32 weights
(`benchmarks/import_hf.py` measures it).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import safe_open

from minigpt_cli.config.loader import dump_config
from minigpt_cli.config.schema import MAX_VOCAB_SIZE, MIN_VOCAB_SIZE, Config, TokenizerConfig
from minigpt_cli.engine.core.io import atomic_write_text
from minigpt_cli.engine.data.tokenizer_training import tokenizer_meta
from minigpt_cli.engine.export.hf_checkpoint import Checkpoint, read_checkpoint
from minigpt_cli.engine.export.output import staged_folder
from minigpt_cli.engine.runs.checkpoint import RunLock, holds_run
from minigpt_cli.engine.runs.files import (
    CONFIG_FILE,
    METRICS_FILE,
    MODEL_FILE,
    STATE_FILE,
    stream_tensors,
)
from minigpt_cli.errors import UserError

STAGE = "import"
"""The `stage` an imported run's trainer state records."""


@dataclass
class ImportReport:
    """What an import wrote, for the CLI's summary."""

    out: Path
    parameters: int
    vocab_size: int
    rows: int
    """Embedding rows of the checkpoint (the run has `vocab_size`)."""
    tokenizer_source: str
    dummy_prefix: bool = False
    """Whether the tokenizer has sentencepiece's dummy prefix (Llama 2's), kept by the run."""
    renamed: dict[str, str] = field(default_factory=dict)
    added: dict[str, int] = field(default_factory=dict)
    reserved: int = 0
    dtypes: list[str] = field(default_factory=list)
    weight_files: int = 1
    seconds: float = 0.0


def check_destination(out: Path, hf_dir: Path, *, overwrite: bool) -> None:
    """Refuse, before any work, a RUN the import may not write (one line, exit 2). --overwrite
    replaces a minigpt run (or an empty folder), never a folder holding anything else."""
    target, source = out.resolve(), hf_dir.resolve()
    if target == source or source.is_relative_to(target) or target.is_relative_to(source):
        raise UserError(
            f"{out}: overlaps the folder imported from ({hf_dir}); choose another --out"
        )
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise UserError(f"{out}: already exists; choose another --out, or pass --overwrite")
    if not out.is_dir() or out.is_symlink():
        raise UserError(f"{out}: not a folder; --overwrite replaces only a run")
    if any(out.iterdir()) and not holds_run(out):
        raise UserError(
            f"{out}: holds files that are not a minigpt run, which --overwrite never replaces"
        )


def _config(checkpoint: Checkpoint) -> Config:
    vocab = checkpoint.tokenizer.vocab_size
    try:
        tokenizer = TokenizerConfig(vocab_size=vocab)
    except ValidationError:
        raise UserError(
            f"{checkpoint.folder}: vocab_size {vocab:,}; minigpt's vocabularies hold "
            f"{MIN_VOCAB_SIZE:,} to {MAX_VOCAB_SIZE:,} pieces"
        ) from None
    return Config(model=checkpoint.model, tokenizer=tokenizer)


def load_weights(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    """The checkpoint's weights in fp32 under minigpt's names, the embedding (and an untied head)
    grown by the rows of the pieces the import added. Refuses a tied checkpoint whose
    `lm_head.weight` is not its embedding."""
    by_file: dict[Path, list[str]] = {}
    for name, path in checkpoint.weight_files.items():
        by_file.setdefault(path, []).append(name)
    tensors: dict[str, torch.Tensor] = {}
    for path, names in sorted(by_file.items()):
        with safe_open(str(path), framework="pt") as handle:
            for name in sorted(names):
                tensors[name] = handle.get_tensor(name).to(torch.float32).contiguous()
    embed_name, head_name = "model.embed_tokens.weight", "lm_head.weight"
    if checkpoint.model.tie_embeddings and head_name in tensors:
        head = tensors.pop(head_name)
        if not torch.equal(head, tensors[embed_name]):
            raise UserError(
                f"{checkpoint.weight_files[head_name]}: tensor {head_name} differs from "
                f"{embed_name}, but config.json has tie_word_embeddings = true"
            )
        del head
    imported = checkpoint.tokenizer
    vocab = imported.vocab_size
    new_ids = sorted(imported.added.values())
    for name in (embed_name, head_name):
        if name not in tensors:
            continue
        rows = tensors[name]
        if vocab > rows.shape[0]:
            extra = rows.new_zeros(vocab - rows.shape[0], rows.shape[1])
            rows = tensors[name] = torch.cat((rows, extra))
        elif new_ids:  # never written through to what may be the checkpoint's mapped file
            rows = tensors[name] = rows.clone()
        if new_ids:
            # A new piece starts where the trained ones are on average: its logit is then about
            # the average logit, not an outlier SFT would first have to undo.
            rows[new_ids] = rows[: imported.original_pieces].mean(dim=0)
    return tensors


def _state(checkpoint: Checkpoint, report: ImportReport) -> dict[str, Any]:
    """`trainer_state.json` of the run: finished at step 0, the source recorded."""
    folder = checkpoint.folder.resolve()
    files = sorted({path.name for path in checkpoint.weight_files.values()})
    sources = {
        "imported_from": str(folder),
        "architecture": "LlamaForCausalLM",
        "config_sha256": checkpoint.config_sha256,
        "weights": files,
        "weights_dtype": report.dtypes,
        "tokenizer": report.tokenizer_source,
        "tokenizer_dummy_prefix": report.dummy_prefix,
        "renamed_tokens": report.renamed,
        "added_tokens": report.added,
        "reserved_tokens": report.reserved,
    }
    return {
        "stage": STAGE,
        "step": 0,
        "tokens": 0,
        "elapsed": 0.0,
        "data_state": {},
        "rng": {},
        "extra": {},
        "files": [MODEL_FILE],
        "parent": None,
        "chat": False,
        "finished": True,
        "stop_reason": "imported",
        "sources": sources,
    }


def _tokenizer_meta(checkpoint: Checkpoint) -> dict[str, Any]:
    tokenizer = checkpoint.tokenizer.tokenizer
    return {
        **tokenizer_meta(tokenizer),
        "imported_from": str((checkpoint.folder / checkpoint.tokenizer.source).resolve()),
    }


def _save_weights(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """The bytes `runs.files.save_tensors` writes for these fp32 tensors (a run's weights are
    always that canonical file), streamed one tensor at a time by `runs.files.stream_tensors`
    and each dropped from `tensors` once written, so no serialised copy of the weights is ever
    held. Written in place: the staging folder is what is renamed into place whole."""
    shapes = {name: tuple(tensor.shape) for name, tensor in tensors.items()}
    stream_tensors(path, shapes, tensors.pop, {"format": "minigpt", "step": "0"})


def write_run(checkpoint: Checkpoint, folder: Path, report: ImportReport) -> int:
    """Write the run's files into `folder` (an empty staging folder); returns the parameter
    count."""
    config = _config(checkpoint)
    tensors = load_weights(checkpoint)
    parameters = sum(int(tensor.numel()) for tensor in tensors.values())
    _save_weights(folder / MODEL_FILE, tensors)
    tokenizer = checkpoint.tokenizer.tokenizer
    tokenizer.meta = _tokenizer_meta(checkpoint)
    tokenizer.save(folder)
    atomic_write_text(folder / CONFIG_FILE, dump_config(config))
    event = {
        "stage": STAGE,
        "kind": "event",
        "step": 0,
        "tokens": 0,
        "time": 0.0,
        "event": "import",
        "message": f"imported from {checkpoint.folder.resolve()}",
    }
    atomic_write_text(folder / METRICS_FILE, json.dumps(event, ensure_ascii=False) + "\n")
    state = _state(checkpoint, report)
    atomic_write_text(folder / STATE_FILE, json.dumps(state, indent=2, sort_keys=True) + "\n")
    return parameters


def import_hf(hf_dir: Path, out: Path, *, overwrite: bool = False) -> ImportReport:
    """Import the Hugging Face folder `hf_dir` as a finished run at `out`: whole, or (on any
    error) not at all, an earlier run at `out` then left as it was."""
    start = time.perf_counter()
    check_destination(out, hf_dir, overwrite=overwrite)
    checkpoint = read_checkpoint(hf_dir)  # every check; no tensor read yet
    _config(checkpoint)
    imported = checkpoint.tokenizer
    report = ImportReport(
        out=out,
        parameters=0,
        vocab_size=imported.vocab_size,
        rows=checkpoint.rows,
        tokenizer_source=imported.source,
        dummy_prefix=imported.tokenizer.dummy_prefix,
        renamed=imported.renamed,
        added=imported.added,
        reserved=imported.reserved,
        dtypes=checkpoint.dtypes,
        weight_files=len(set(checkpoint.weight_files.values())),
    )
    # A run being trained at `out` holds its lock: never replaced under it.
    lock = RunLock(out) if out.is_dir() else contextlib.nullcontext()
    with lock, staged_folder(out) as staging:
        report.parameters = write_run(checkpoint, staging, report)
    report.seconds = time.perf_counter() - start
    return report
