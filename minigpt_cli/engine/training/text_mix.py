"""The chain's own pretraining text, for fine-tuning to rehearse and to be measured on.

SFT on a small model forgets the language it was pretrained on (held-out bits per byte 0.42 ->
4.5 on the tiny preset) unless some plain text stays in its batches, as nanochat's mid-training
keeps it. Which text: what the chain's pretraining run (its root) trained on, minus what
evaluation holds out, so rehearsing never touches a document `minigpt eval` scores.

- Built-in corpus: the documents lying wholly before the validation tail (`builtin_split`, which
  `minigpt eval` uses for its held-out documents too: one split, `data.stage_records.
  document_split`).
- `--data` files: the root run's encoded `shards/train` (or the shard folder it trained on, or
  its files encoded again when they still exist), its training part only.
- `--text` files given to the fine-tuning verb: those, whole.
- A chain rooted in an imported checkpoint (`minigpt import`) has no pretraining text here: only
  `--text` gives it some.

When none is available `chain_text` says why in one line and the caller trains without text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from minigpt_cli.config.loader import read_run_config
from minigpt_cli.config.schema import Config
from minigpt_cli.engine.core.events import EventCallback
from minigpt_cli.engine.data.shards import (
    TokenRange,
    TokenShards,
    encode_to_shards,
    is_shard_folder,
)
from minigpt_cli.engine.data.stage_records import (
    builtin_documents,
    document_split,
    validation_split,
)
from minigpt_cli.engine.data.tokenizer import Tokenizer
from minigpt_cli.engine.runs.checkpoint import read_state
from minigpt_cli.engine.runs.load import ancestors

Window = tuple[list[int], list[int]]  # (inputs, targets), as metrics.text scores them
HELD_OUT_DOCUMENTS = 16  # built-in documents SFT's `text_bpb` scores: cheap, yet not one story


def chain_root(run_dir: Path) -> Path:
    """The first run of `run_dir`'s chain: normally the pretraining run."""
    return ([run_dir, *ancestors(run_dir)])[-1]


def pretrained_on_builtin(root: Path) -> bool:
    """Whether `root` pretrained on the built-in corpus (no --data, not continued from a run, not
    imported by `minigpt import`)."""
    sources = read_state(root).get("sources") or {}
    return not (sources.get("data") or sources.get("from_run") or sources.get("imported_from"))


@dataclass
class BuiltinSplit:
    """The built-in corpus of a chain's root as pretraining laid it out, and how it was split."""

    root: Path
    config: Config  # the root's
    documents: list[str]
    encoded: list[list[int]]  # each document's ids, without the end-of-text id after it
    trained: list[int]  # indices of documents pretraining trained on whole
    held_out: list[int]  # indices of documents wholly in its validation tail


def builtin_split(root: Path, tokenizer: Tokenizer | None = None) -> BuiltinSplit:
    """Rebuild `root`'s built-in corpus (its `data.builtin_size`, its tokenizer) and split it.

    The built-in corpus has no separate validation split: pretraining validates on the last
    `data.val_fraction` of its tokens (`stage_records.document_split` says which documents lie
    wholly on each side). (A root pretrained with --val-data trained on every document:
    `chain_text` reads that from its sources.)
    """
    config = read_run_config(root)
    documents = builtin_documents(config.data.builtin_size, seed=0)
    encoded = (tokenizer or Tokenizer.load(root)).encode_batch(documents)
    trained, held_out = document_split([len(ids) for ids in encoded], config.data.val_fraction)
    return BuiltinSplit(root, config, documents, encoded, trained, held_out)


@dataclass
class ChainText:
    """Text for a fine-tuning run: a training stream to cut windows from, held-out windows."""

    train: TokenRange | None  # None: nothing to rehearse (`note` says why)
    held_out: list[Window] = field(default_factory=list)
    source: str = ""  # where `train` came from, for the note line
    note: str | None = None  # why there is no training text


def _stream(encoded: Sequence[Sequence[int]], eos_id: int) -> np.ndarray:
    """Documents end to end, each followed by an end-of-text id: pretraining's own layout."""
    ids: list[int] = []
    for document in encoded:
        ids.extend(document)
        ids.append(eos_id)
    return np.asarray(ids, dtype=np.int32)


def _spread(count: int, wanted: int) -> list[int]:
    """`wanted` indices (at most `count`) evenly spread over range(count)."""
    if count <= 0 or wanted <= 0:
        return []
    picks = np.linspace(0, count - 1, min(count, wanted)).round().astype(np.int64)
    return sorted(set(picks.tolist()))


def _stream_windows(tokens: TokenRange, context: int, wanted: int) -> list[Window]:
    """`wanted` non-overlapping windows of a held-out stream, spread along it."""
    windows = (len(tokens) - 1) // context
    result = []
    for index in _spread(windows, wanted):
        chunk = tokens[index * context : index * context + context + 1].astype(np.int64).tolist()
        result.append((chunk[:-1], chunk[1:]))
    return result


def _document_windows(
    documents: Sequence[Sequence[int]], eos_id: int, context: int
) -> list[Window]:
    """Each document from an end-of-text id, in non-overlapping windows: `minigpt eval`'s way."""
    windows: list[Window] = []
    for ids in documents:
        full = [eos_id, *ids]
        for start in range(0, len(full) - 1, context):
            chunk = full[start : start + context + 1]
            windows.append((chunk[:-1], chunk[1:]))
    return windows


def _shard_stream(folder: Path, tokenizer: Tokenizer) -> TokenRange | None:
    if not is_shard_folder(folder):
        return None
    shards = TokenShards(folder)
    if shards.meta.get("tokenizer_sha256") not in (None, tokenizer.sha256):
        return None  # encoded with another tokenizer: not this chain's ids
    return TokenRange(shards)


def _files_stream(
    paths: Sequence[Path], tokenizer: Tokenizer, cache_dir: Path, on_event: EventCallback | None
) -> TokenRange | None:
    """The root's --data: its shard folder, or its files encoded here (reused on resume)."""
    if len(paths) == 1 and is_shard_folder(paths[0]):
        return _shard_stream(paths[0], tokenizer)
    if not paths or not all(p.exists() for p in paths):
        return None
    encode_to_shards(tokenizer, list(paths), cache_dir, on_event=on_event, stage="sft")
    return TokenRange(TokenShards(cache_dir))


def chain_text(
    parent: Path,
    tokenizer: Tokenizer,
    context: int,
    *,
    text_files: Sequence[Path] = (),
    cache_dir: Path,
    on_event: EventCallback | None = None,
    held_out_windows: int = 32,
    encode: bool = True,
) -> ChainText:
    """The pretraining text of `parent`'s chain (or `text_files`) to rehearse, and held-out windows
    of its validation text to score (`held_out_windows` at most; built-in: whole documents).

    `cache_dir` is where files are encoded when they must be (the fine-tuning run's own folder);
    with `encode` False nothing is encoded (only held-out text is wanted: no stream from files).
    """
    root = chain_root(parent)
    sources = read_state(root).get("sources") or {}
    chain = ChainText(train=None)
    if pretrained_on_builtin(root):
        split = builtin_split(root, tokenizer)
        if sources.get("val_data"):  # validated on other text: every document trained
            trained = split.encoded
            held = _shard_stream(root / "shards" / "val", tokenizer)
            chain.held_out = (
                [] if held is None else _stream_windows(held, context, held_out_windows)
            )
        else:
            trained = [split.encoded[i] for i in split.trained]
            spread = _spread(len(split.held_out), HELD_OUT_DOCUMENTS)
            picked = [split.encoded[split.held_out[i]] for i in spread]
            chain.held_out = _document_windows(picked, tokenizer.eos_id, context)
            chain.held_out = chain.held_out[:held_out_windows]
        chain.train = TokenRange(_stream(trained, tokenizer.eos_id))
        chain.source = (
            f"the {len(trained):,} built-in documents {root} pretrained on "
            f"({len(chain.train):,} tokens, the held-out tail excluded)"
        )
    elif sources.get("imported_from"):
        chain.note = (
            f"{root} was imported from {sources['imported_from']}, whose pretraining text is "
            "not here"
        )
    else:
        paths = [Path(p) for p in sources.get("data") or []]
        stream = _shard_stream(root / "shards" / "train", tokenizer)
        if stream is None and encode:
            stream = _files_stream(paths, tokenizer, cache_dir / "root", on_event)
        val_paths = [Path(p) for p in sources.get("val_data") or []]
        if stream is not None:
            if val_paths:
                chain.train = stream
                held = _shard_stream(root / "shards" / "val", tokenizer)
                if held is None and len(val_paths) == 1:
                    held = _shard_stream(val_paths[0], tokenizer)
            else:
                split_at = validation_split(len(stream), read_run_config(root).data.val_fraction)
                chain.train = TokenRange(stream.source, stream.start, stream.start + split_at)
                held = TokenRange(stream.source, stream.start + split_at, stream.stop)
            chain.source = (
                f"{root}'s pretraining text ({len(chain.train):,} tokens, its held-out part "
                "excluded)"
            )
            if held is not None:
                chain.held_out = _stream_windows(held, context, held_out_windows)
        else:
            described = ", ".join(str(p) for p in paths) or "no recorded files"
            chain.note = (
                f"{root} was pretrained on text that is no longer here ({described}; no "
                f"{root / 'shards' / 'train'})"
            )
    if text_files and encode:
        cache = cache_dir / "text"
        encode_to_shards(tokenizer, list(text_files), cache, on_event=on_event, stage="sft")
        chain.train = TokenRange(TokenShards(cache))
        chain.source = (
            f"{', '.join(str(p) for p in text_files)} ({len(chain.train):,} tokens, all of it)"
        )
        chain.note = None
    return chain
