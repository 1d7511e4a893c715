"""Token shards: a corpus encoded once into flat binary files that training memory-maps.

Why this layout: pretraining reads windows of a token stream at random offsets; flat arrays of
uint16 (uint32 for vocabularies past 65,536) on disk give that for any corpus size with no
parsing and the page cache as the only memory cost. A folder holds `shard-00000.bin`,
`shard-00001.bin`, ... (at most `shard_tokens` each, little-endian) and `meta.json`.

`meta.json` is written last and removed first: a folder with a meta is always complete, so an
interrupted encode is simply redone. It records the tokenizer's sha256 and every input's sha256, so
re-running on unchanged inputs reuses the shards, and a changed input or tokenizer re-encodes.
Documents end with the tokenizer's end-of-text id; the UTF-8 bytes of text encoded are kept so
bits per byte can be computed from a loss per token.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from minigpt_cli.engine.core.events import EventCallback, emit
from minigpt_cli.engine.core.io import atomic_write_text, before_write, make_dir
from minigpt_cli.engine.data.files import expand_paths, file_sha256, iter_text_chunks
from minigpt_cli.engine.resources.governor import throttle_point
from minigpt_cli.errors import UserError

if TYPE_CHECKING:
    from minigpt_cli.engine.data.tokenizer import Tokenizer

META_FILE = "meta.json"
FORMAT = "minigpt-token-shards"
VERSION = 1
DEFAULT_SHARD_TOKENS = 50_000_000
_SHARD_NAME = "shard-{:05d}.bin"
_PARTIAL_SUFFIX = ".partial"
_BATCH_BYTES = 1 << 20  # text encoded per sentencepiece call (and per progress event)


def shard_dtype(vocab_size: int) -> np.dtype:
    """The narrowest dtype holding every id below `vocab_size`: uint16 up to 65,536 ids."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def is_shard_folder(path: str | Path) -> bool:
    """True when `path` is a folder written by `encode_to_shards` (it has a meta.json)."""
    folder = Path(path)
    return folder.is_dir() and (folder / META_FILE).is_file()


def _shard_path(folder: Path, index: int) -> Path:
    return folder / _SHARD_NAME.format(index)


def _describe_inputs(files: list[Path], hashes: list[str] | None) -> list[dict[str, Any]]:
    records = []
    for index, path in enumerate(files):
        stat = path.stat()
        record: dict[str, Any] = {
            "path": str(path.resolve()),
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
        }
        if hashes is not None:
            record["sha256"] = hashes[index]
        records.append(record)
    return records


def _hash_files(files: list[Path]) -> list[str]:
    return [file_sha256(path) for path in files]


def _read_meta(folder: Path) -> dict[str, Any] | None:
    """The folder's meta.json when it is one of ours, else None (never raises)."""
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return None
    return meta


def _shards_intact(folder: Path, meta: dict[str, Any]) -> bool:
    try:
        itemsize = np.dtype(meta["dtype"]).itemsize
        for shard in meta["shards"]:
            path = folder / shard["file"]
            if not path.is_file() or path.stat().st_size != int(shard["tokens"]) * itemsize:
                return False
    except (KeyError, TypeError, ValueError):
        return False
    return True


def _reusable(
    folder: Path,
    tokenizer: Tokenizer,
    files: list[Path],
    shard_tokens: int,
    hashes: list[str] | None,
) -> tuple[dict[str, Any] | None, list[str] | None]:
    """(the existing meta if the shards can be reused, the input hashes if they were computed).

    Cheap checks first (tokenizer, layout, file count and sizes); inputs are hashed only when those
    all match, since a hash reads every byte.
    """
    meta = _read_meta(folder)
    if meta is None or meta.get("version") != VERSION:
        return None, hashes
    old_inputs = meta.get("inputs")
    if (
        meta.get("tokenizer_sha256") != tokenizer.sha256
        or meta.get("shard_tokens") != shard_tokens
        or not isinstance(old_inputs, list)
        or len(old_inputs) != len(files)
    ):
        return None, hashes
    try:
        if [int(record["size"]) for record in old_inputs] != [f.stat().st_size for f in files]:
            return None, hashes
        old_hashes = [record["sha256"] for record in old_inputs]
    except (KeyError, TypeError, ValueError):
        return None, hashes
    hashes = hashes if hashes is not None else _hash_files(files)
    if old_hashes != hashes or not _shards_intact(folder, meta):
        return None, hashes
    return meta, hashes


def reusable_shards(
    tokenizer: Tokenizer,
    inputs: Iterable[str | Path],
    out_dir: str | Path,
    *,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
) -> dict[str, Any] | None:
    """The meta of shards in `out_dir` that `encode_to_shards` would reuse as they are, else None.

    Lets a caller skip a full validation pass of the inputs when nothing needs encoding.
    """
    files = expand_paths(list(inputs), kind="pretrain")
    meta, _ = _reusable(Path(out_dir), tokenizer, files, shard_tokens, None)
    return meta


def shards_on_disk(folder: str | Path) -> int:
    """Bytes of the shard files in `folder`, complete or partial: what a new encode removes
    (`_clear`) before it writes, so a disk plan counts them as space given back."""
    total = 0
    for path in Path(folder).glob("shard-*.bin*"):
        with contextlib.suppress(OSError):
            total += path.stat().st_size
    return total


def unchanged_shards(folder: str | Path, tokenizer_sha256: str, files: list[Path]) -> bool:
    """Whether `encode_to_shards` will reuse the shards in `folder` for `files`, judged without
    reading the inputs: `_reusable`'s checks with each input's modification time standing in for
    its sha256 (which the encode then confirms). For a disk plan, before any encoding."""
    folder_path = Path(folder)
    meta = _read_meta(folder_path)
    if meta is None or meta.get("version") != VERSION:
        return False
    if meta.get("tokenizer_sha256") != tokenizer_sha256:
        return False
    if meta.get("shard_tokens") != DEFAULT_SHARD_TOKENS:
        return False
    try:
        recorded = [
            (str(record["path"]), int(record["size"]), int(record["mtime_ns"]))
            for record in meta.get("inputs", [])
        ]
        current = [
            (str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns) for path in files
        ]
    except (KeyError, TypeError, ValueError, OSError):
        return False
    return recorded == current and _shards_intact(folder_path, meta)


class _ShardWriter:
    """Appends token arrays to numbered partial files, starting a new one every `shard_tokens`."""

    def __init__(self, folder: Path, dtype: np.dtype, shard_tokens: int) -> None:
        self.folder = folder
        self.dtype = dtype
        self.shard_tokens = shard_tokens
        self.partials: list[Path] = []
        self.counts: list[int] = []
        self._handle: BinaryIO | None = None

    def write(self, tokens: np.ndarray) -> None:
        position = 0
        while position < len(tokens):
            if self._handle is None:
                path = _shard_path(self.folder, len(self.partials)).with_suffix(
                    ".bin" + _PARTIAL_SUFFIX
                )
                self.partials.append(path)
                self.counts.append(0)
                before_write(path)
                self._handle = path.open("wb")
            room = self.shard_tokens - self.counts[-1]
            part = tokens[position : position + room]
            before_write(self.partials[-1])
            self._handle.write(part.astype(self.dtype, copy=False).tobytes())
            self.counts[-1] += len(part)
            position += len(part)
            if self.counts[-1] == self.shard_tokens:
                self._close()

    def _close(self) -> None:
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None

    def finish(self) -> list[tuple[Path, int]]:
        self._close()
        return list(zip(self.partials, self.counts, strict=True))

    def abort(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        for path in self.partials:
            with contextlib.suppress(OSError):
                path.unlink()


def _clear(folder: Path) -> None:
    """Remove meta.json first (the folder stops counting as complete), then old shard files."""
    with contextlib.suppress(FileNotFoundError):
        (folder / META_FILE).unlink()
    for path in folder.glob("shard-*.bin*"):
        with contextlib.suppress(OSError):
            path.unlink()


def _lines(text: str) -> list[str]:
    """`text` cut after each newline (only "\\n": `str.splitlines` also cuts at \\r, \\x0c, ...)."""
    parts = text.split("\n")
    lines = [part + "\n" for part in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def _encode_batch(
    tokenizer: Tokenizer, chunks: list[tuple[str, bool, bool]], num_threads: int | None
) -> list[int]:
    """Ids of several `(text, first, last)` chunks in order, end-of-text after each document's
    last chunk; `first` marks a document's first chunk, the one a dummy prefix starts
    (`Tokenizer.encode`); every other chunk, and every line after a document's first, continues
    the document.

    When no vocabulary piece holds a newline (every tokenizer `train_tokenizer` makes), lines are
    encoded independently, in parallel, with the same result as encoding each chunk whole.
    """
    ids: list[int] = []
    if tokenizer.splits_at_newlines:
        lines: list[str] = []
        continues: list[bool] = []
        ends: list[int] = []
        for text, first, _ in chunks:
            chunk_lines = _lines(text)
            lines.extend(chunk_lines)
            continues.extend(not first or index > 0 for index in range(len(chunk_lines)))
            ends.append(len(lines))
        encoded = tokenizer.encode_batch(lines, num_threads=num_threads, continuation=continues)
        start = 0
        for (_, _, last), end in zip(chunks, ends, strict=True):
            for line_ids in encoded[start:end]:
                ids.extend(line_ids)
            start = end
            if last:
                ids.append(tokenizer.eos_id)
        return ids
    for text, first, last in chunks:
        ids.extend(tokenizer.encode(text, continuation=not first))
        if last:
            ids.append(tokenizer.eos_id)
    return ids


def _encode_progress(
    on_event: EventCallback | None, stage: str, done: int, total: int, message: str
) -> None:
    emit(
        on_event,
        "progress",
        stage,
        task="encode",
        done=done,
        total=total,
        unit="B",
        message=message,
    )


def encode_to_shards(
    tokenizer: Tokenizer,
    inputs: Iterable[str | Path],
    out_dir: str | Path,
    *,
    on_event: EventCallback | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    num_threads: int | None = None,
    stage: str = "tokenize",
) -> dict[str, Any]:
    """Encode pretraining text (files or folders) into token shards in `out_dir`; return the meta.

    Streams: memory stays about one batch of text whatever the corpus size. Re-running with the
    same tokenizer on unchanged inputs (same bytes, by sha256) reuses the shards and returns their
    meta with `"reused": True`. Progress: `progress` events with task "encode" in bytes of input.
    """
    if shard_tokens <= 0:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    folder = Path(out_dir)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder}: exists and is not a folder")
    files = expand_paths(list(inputs), kind="pretrain")
    existing, hashes = _reusable(folder, tokenizer, files, shard_tokens, None)
    total_bytes = sum(path.stat().st_size for path in files)
    if existing is not None:
        _encode_progress(
            on_event, stage, total_bytes, total_bytes, "inputs unchanged: reusing the shards"
        )
        return {**existing, "reused": True}
    hashes = hashes if hashes is not None else _hash_files(files)
    described = _describe_inputs(files, hashes)

    started = time.monotonic()
    make_dir(folder)
    _clear(folder)
    dtype = shard_dtype(tokenizer.vocab_size)
    writer = _ShardWriter(folder, dtype, shard_tokens)
    documents = 0
    text_bytes = 0
    done_before = 0
    _encode_progress(on_event, stage, 0, total_bytes, "encoding")
    try:
        for path, record in zip(files, described, strict=True):
            in_file = 0
            pending: list[tuple[str, bool, bool]] = []
            pending_bytes = 0
            first = True  # a file starts a document
            for chunk, last in iter_text_chunks([path]):
                size = len(chunk.encode("utf-8"))
                pending.append((chunk, first, last))
                first = last
                pending_bytes += size
                documents += int(last)
                text_bytes += size
                if pending_bytes >= _BATCH_BYTES:
                    throttle_point()
                    ids = _encode_batch(tokenizer, pending, num_threads)
                    writer.write(np.asarray(ids, dtype=dtype))
                    in_file += pending_bytes
                    pending, pending_bytes = [], 0
                    done = done_before + min(in_file, record["size"])
                    _encode_progress(on_event, stage, done, total_bytes, "encoding")
            if pending:
                ids = _encode_batch(tokenizer, pending, num_threads)
                writer.write(np.asarray(ids, dtype=dtype))
            done_before += record["size"]
            _encode_progress(on_event, stage, done_before, total_bytes, "encoding")
        written = writer.finish()
    except BaseException:
        writer.abort()
        raise
    try:
        shards = []
        for index, (partial, count) in enumerate(written):
            final = _shard_path(folder, index)
            before_write(final)
            os.replace(partial, final)
            shards.append({"file": final.name, "tokens": count})
        total_tokens = sum(count for _, count in written)
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "dtype": dtype.name,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "tokenizer_sha256": tokenizer.sha256,
            "shard_tokens": shard_tokens,
            "shards": shards,
            "total_tokens": total_tokens,
            "documents": documents,
            "text_bytes": text_bytes,
            "bytes_per_token": round(text_bytes / total_tokens, 4) if total_tokens else None,
            "inputs": described,
            "seconds": round(time.monotonic() - started, 3),
        }
        atomic_write_text(folder / META_FILE, json.dumps(meta, indent=2))
    except BaseException:
        _clear(folder)  # shards without their meta are never used: leave none behind
        raise
    return {**meta, "reused": False}


def encode_texts_to_array(
    tokenizer: Tokenizer, texts: Iterable[str], num_threads: int | None = None
) -> np.ndarray:
    """In-memory counterpart of `encode_to_shards` for small corpora (the built-in data).

    Each text is a document followed by end-of-text; the array has the shard dtype.
    """
    documents = [(text, True, True) for text in texts]
    ids = _encode_batch(tokenizer, documents, num_threads) if documents else []
    return np.asarray(ids, dtype=shard_dtype(tokenizer.vocab_size))


class TokenShards:
    """A read-only view of a shard folder as one token sequence (memory-mapped, any size).

    `len()` is the total token count; `shards[a:b]` returns int64 ids across shard boundaries;
    `shards[i]` one id. Opening checks every shard's size against meta.json, so a truncated or
    missing file is a clean error rather than garbage tokens mid-training.
    """

    def __init__(self, path: str | Path) -> None:
        folder = Path(path)
        if not folder.is_dir():
            raise UserError(f"{folder}: no such token shard folder")
        meta_path = folder / META_FILE
        if not meta_path.is_file():
            raise UserError(
                f"{folder}: not a token shard folder (no {META_FILE}); create one with "
                "`minigpt tokenize encode` (an interrupted encode leaves none: run it again)"
            )
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise UserError(f"{meta_path}: unreadable shard meta ({error})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise UserError(f"{meta_path}: not a minigpt token shard meta")
        try:
            dtype = np.dtype(str(meta["dtype"])).newbyteorder("<")
            entries = [(str(s["file"]), int(s["tokens"])) for s in meta["shards"]]
        except (KeyError, TypeError, ValueError) as error:
            raise UserError(f"{meta_path}: malformed shard meta ({error})") from None
        if dtype.kind != "u" or dtype.itemsize not in (2, 4):
            raise UserError(f"{meta_path}: unsupported token dtype {meta['dtype']!r}")
        self.folder = folder
        self.meta: dict[str, Any] = meta
        self.dtype = dtype
        self._arrays: list[np.ndarray] = []
        for name, tokens in entries:
            shard = folder / name
            if not shard.is_file():
                raise UserError(f"{shard}: shard file missing; run `minigpt tokenize encode` again")
            expected = tokens * dtype.itemsize
            found = shard.stat().st_size
            if found != expected:
                problem = "truncated" if found < expected else "longer than recorded"
                raise UserError(
                    f"{shard}: {problem} ({found:,} bytes, expected {expected:,}); "
                    "run `minigpt tokenize encode` again"
                )
            if tokens:
                self._arrays.append(np.memmap(shard, dtype=dtype, mode="r", shape=(tokens,)))
        counts = [len(array) for array in self._arrays]
        self._offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self._length = int(self._offsets[-1])

    # ---------------------------------------------------------------------------- facts

    def __len__(self) -> int:
        return self._length

    @property
    def documents(self) -> int:
        return int(self.meta.get("documents", 0))

    @property
    def text_bytes(self) -> int:
        return int(self.meta.get("text_bytes", 0))

    @property
    def bytes_per_token(self) -> float:
        """UTF-8 bytes of text per token (end-of-text tokens included): bits/byte = loss / this."""
        return self.text_bytes / self._length if self._length else 0.0

    @property
    def tokenizer_sha256(self) -> str | None:
        return self.meta.get("tokenizer_sha256")

    def __repr__(self) -> str:
        return (
            f"TokenShards({str(self.folder)!r}, tokens={self._length:,}, "
            f"shards={len(self._arrays)}, dtype={self.dtype.name})"
        )

    # ---------------------------------------------------------------------------- reading

    def _range(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) as int64, gathered across shards."""
        if stop <= start:
            return np.empty(0, dtype=np.int64)
        first = int(np.searchsorted(self._offsets, start, side="right")) - 1
        parts = []
        index = first
        position = start
        while position < stop:
            base = int(self._offsets[index])
            end = min(stop, int(self._offsets[index + 1]))
            parts.append(self._arrays[index][position - base : end - base])
            position = end
            index += 1
        out = np.empty(stop - start, dtype=np.int64)
        filled = 0
        for part in parts:
            out[filled : filled + len(part)] = part
            filled += len(part)
        return out

    def __getitem__(self, key: int | slice) -> np.ndarray | int:
        if isinstance(key, slice):
            start, stop, step = key.indices(self._length)
            if step == 1:
                return self._range(start, stop)
            if step > 0:
                return self._range(start, stop)[::step]
            low = stop + 1
            return self._range(low, start + 1)[::-1][::-step]
        if isinstance(key, int | np.integer):
            index = int(key)
            if index < 0:
                index += self._length
            if not 0 <= index < self._length:
                raise IndexError(f"token index {key} out of range ({self._length} tokens)")
            return int(self._range(index, index + 1)[0])
        raise TypeError(f"TokenShards indices must be integers or slices, not {type(key).__name__}")


class TokenRange:
    """A window onto a token stream (array or memory-mapped shards) without copying it."""

    def __init__(self, source: Any, start: int = 0, stop: int | None = None) -> None:
        self.source = source
        self.start = start
        self.stop = len(source) if stop is None else stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, key: slice) -> np.ndarray:
        begin, end, _ = key.indices(len(self))
        return np.asarray(self.source[self.start + begin : self.start + end])
