"""Reading the user's data files: streamed, checked in full before training, every problem located.

Why a whole-file scan first: a bad line found an hour into training wastes the hour. `validate`
reads everything once and raises one `UserError` naming each problem as `path:line: what is wrong`
(the first 20, then a count), so the user fixes them all in one go. The readers use the same checks,
so data that validates also loads.

Pretraining text is `.txt` (a whole file is one document, streamed in chunks of about 1 MB cut at
line ends, so a file of any size reads in bounded memory) or JSONL; the other kinds are JSONL
records, each turned into its stage format by `records.normalise_record`. A folder stands for the
data files inside it (recursively, sorted, hidden ones skipped). `.json` files holding one JSON
array of records are accepted too (read whole: meant for SFT-sized files). UTF-8 with or without a
BOM; CRLF line ends become LF.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minigpt_cli.engine.data.records import (
    RecordError,
    check_kind,
    json_type,
    normalise_record,
    normalise_text,
)
from minigpt_cli.errors import UserError, location

RECORD_KINDS = ("sft", "dpo", "reward", "rlhf")

CHUNK_BYTES = 1 << 20  # pretraining text is handed out in pieces of about this size
MAX_LISTED_PROBLEMS = 20
MAX_PROBLEMS_PER_FILE = 10  # past this many bad lines a file is probably not text: stop
_LONG_LINE_FACTOR = 4  # a line longer than this many chunks is cut mid-line
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class DataSummary:
    """What `validate` found: how many files, records (documents for pretrain) and bytes."""

    files: int
    records: int
    bytes: int


# ----------------------------------------------------------------------------------------------
# Problem collection
# ----------------------------------------------------------------------------------------------


class _Problems:
    """Collects `path:line: problem` lines; in strict mode the first one raises at once."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.count = 0
        self.listed: list[str] = []

    def add(self, path: Path | str, line: int | None, message: str) -> None:
        text = f"{location(path, line)}: {message}"
        if self.strict:
            raise UserError(text)
        self.count += 1
        if len(self.listed) < MAX_LISTED_PROBLEMS:
            self.listed.append(text)

    def raise_if_any(self) -> None:
        if not self.count:
            return
        if self.count == 1:
            raise UserError(self.listed[0])
        lines = [f"{self.count} problems in the data:"]
        lines += [f"  {text}" for text in self.listed]
        if self.count > len(self.listed):
            lines.append(f"  ... and {self.count - len(self.listed)} more problems")
        raise UserError("\n".join(lines))


# ----------------------------------------------------------------------------------------------
# Paths
# ----------------------------------------------------------------------------------------------


def _folder_suffixes(kind: str | None) -> tuple[str, ...]:
    return (".jsonl",) if kind in RECORD_KINDS else (".txt", ".jsonl")


def _expand(paths: Iterable[str | Path], kind: str | None, problems: _Problems) -> list[Path]:
    out: list[Path] = []
    seen: set[Path] = set()
    for given in paths:
        path = Path(given).expanduser()
        if path.is_dir():
            suffixes = _folder_suffixes(kind)
            found = sorted(
                p
                for p in path.rglob("*")
                if p.suffix.lower() in suffixes
                and p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                names = " or ".join(suffixes)
                problems.add(path, None, f"empty folder: no {names} files in it")
            files = found
        elif path.exists():
            files = [path]
        else:
            problems.add(path, None, "no such file or folder")
            files = []
        for file in files:
            key = file.resolve()
            if key not in seen:
                seen.add(key)
                out.append(file)
    return out


def expand_paths(paths: Iterable[str | Path], kind: str | None = None) -> list[Path]:
    """The data files that `paths` stand for: files as given, folders by their data files.

    Folders contribute `.txt` and `.jsonl` files (only `.jsonl` for record kinds), recursively, in
    sorted order, skipping hidden names. Missing paths and folders without data files are reported
    together in one `UserError`.
    """
    problems = _Problems(strict=False)
    files = _expand(paths, kind, problems)
    problems.raise_if_any()
    return files


# ----------------------------------------------------------------------------------------------
# Low-level readers (report problems to a `_Problems`)
# ----------------------------------------------------------------------------------------------


def _decode(piece: bytes, path: Path, first_line: int, problems: _Problems) -> tuple[str, int]:
    """Decode a piece that starts at `first_line`; bad bytes become problems (one per line).

    Returns the text (bad bytes replaced, only seen when not strict) and the problem count.
    """
    try:
        return piece.decode("utf-8"), 0
    except UnicodeDecodeError:
        pass
    parts: list[str] = []
    found = 0
    pos = 0
    while pos < len(piece):
        try:
            parts.append(piece[pos:].decode("utf-8"))
            break
        except UnicodeDecodeError as error:
            bad = pos + error.start
            line_start = piece.rfind(b"\n", 0, bad) + 1
            column = len(piece[line_start:bad].decode("utf-8", errors="replace")) + 1
            line = first_line + piece.count(b"\n", 0, bad)
            problems.add(
                path,
                line,
                f"invalid UTF-8 (byte 0x{piece[bad]:02x} at column {column}); "
                "save the file as UTF-8",
            )
            found += 1
            next_line = piece.find(b"\n", bad)
            end = len(piece) if next_line < 0 else next_line + 1
            parts.append(piece[pos:end].decode("utf-8", errors="replace"))
            pos = end
            if found >= MAX_PROBLEMS_PER_FILE:
                break
    return "".join(parts), found


def _txt_pieces(path: Path, problems: _Problems, chunk_bytes: int) -> Iterator[str]:
    """Decoded pieces of a text file, each about `chunk_bytes`, cut after a line end.

    BOM stripped, CRLF turned into LF. Only a line longer than a few chunks is cut inside (at a
    character boundary, never between CR and LF). Memory stays a few chunks whatever the file size.
    """
    line = 1
    carry = b""
    first = True
    bad = 0
    with path.open("rb") as handle:
        while True:
            block = handle.read(chunk_bytes)
            if first:
                first = False
                if block.startswith(_BOM):
                    block = block[len(_BOM) :]
            data = carry + block if carry else block
            if not block:
                piece, carry = data, b""
            else:
                cut = data.rfind(b"\n") + 1
                if cut == 0:
                    if len(data) < _LONG_LINE_FACTOR * chunk_bytes:
                        carry = data
                        continue
                    cut = _utf8_boundary(data)
                    if data[cut - 1 : cut] == b"\r":
                        cut -= 1
                piece, carry = data[:cut], data[cut:]
            if piece:
                text, found = _decode(piece, path, line, problems)
                bad += found
                line += piece.count(b"\n")
                if bad >= MAX_PROBLEMS_PER_FILE:
                    problems.add(
                        path, None, "too many problems, stopped reading: is it UTF-8 text?"
                    )
                    return
                yield text.replace("\r\n", "\n")
            if not block:
                return


def _utf8_boundary(data: bytes) -> int:
    """A cut position at the end of `data`, moved before a trailing character left incomplete."""
    end = len(data)
    start = end
    while start > 1 and end - start < 3 and (data[start - 1] & 0xC0) == 0x80:
        start -= 1
    lead = data[start - 1]
    if lead < 0xC0:  # ASCII, or not UTF-8 at all (decoding will say so): cut anywhere
        return end
    need = 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
    return end if end - (start - 1) >= need else start - 1


def _json_lines(path: Path, problems: _Problems) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank line of a JSONL file."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM) :]
            text, bad = _decode(raw, path, number, problems)
            if bad or not text.strip():
                continue
            try:
                yield number, json.loads(text.rstrip("\r\n"))
            except json.JSONDecodeError as error:
                problems.add(path, number, f"invalid JSON: {error.msg} (column {error.colno})")


def _json_array(path: Path, problems: _Problems) -> Iterator[tuple[int, Any]]:
    """(line number, value) for each element of a `.json` file holding one array (read whole)."""
    raw = path.read_bytes()
    if raw.startswith(_BOM):
        raw = raw[len(_BOM) :]
    text, bad = _decode(raw, path, 1, problems)
    if bad:
        return
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    line = 1 + text.count("\n", 0, pos)
    counted = pos
    expect_value = True
    while True:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        if pos >= len(text):
            problems.add(path, text.count("\n") + 1, "invalid JSON: the array is not closed")
            return
        if text[pos] == "]":
            rest = text[pos + 1 :]
            if rest.strip():
                offset = pos + 1 + len(rest) - len(rest.lstrip())
                problems.add(
                    path,
                    1 + text.count("\n", 0, offset),
                    "invalid JSON: extra data after the array",
                )
            return
        if not expect_value:
            if text[pos] != ",":
                line += text.count("\n", counted, pos)
                counted = pos
                problems.add(path, line, "invalid JSON: expected ',' or ']' between records")
                return
            pos += 1
            expect_value = True
            continue
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as error:
            problems.add(path, error.lineno, f"invalid JSON: {error.msg} (column {error.colno})")
            return
        yield line, value
        pos = end
        expect_value = False


def _json_values(path: Path, problems: _Problems) -> Iterator[tuple[int, Any]]:
    """Values of a JSONL file, or of a `.json` file holding either an array or JSONL."""
    if path.suffix.lower() == ".json":
        with path.open("rb") as handle:
            head = handle.read(4096).removeprefix(_BOM).lstrip()
        if head.startswith(b"["):
            yield from _json_array(path, problems)
            return
    yield from _json_lines(path, problems)


def _check_file(path: Path, kind: str, problems: _Problems) -> bool:
    """Whether `path` is a readable data file for `kind` (problems reported otherwise)."""
    suffix = path.suffix.lower()
    allowed = (".txt", ".jsonl", ".json") if kind == "pretrain" else (".jsonl", ".json")
    if suffix not in allowed:
        if kind != "pretrain" and suffix == ".txt":
            problems.add(path, None, f"{kind} data must be JSONL (.jsonl), not plain text")
        else:
            shown = f"'{suffix}'" if suffix else "no extension"
            problems.add(
                path,
                None,
                f"unknown data format ({shown}): expected " + " or ".join(allowed[:-1]),
            )
        return False
    try:
        size = path.stat().st_size
    except OSError as error:
        problems.add(path, None, f"cannot read: {error.strerror}")
        return False
    if size == 0:
        problems.add(path, None, "empty file")
        return False
    return True


# ----------------------------------------------------------------------------------------------
# Public readers
# ----------------------------------------------------------------------------------------------


def _scan_records(
    files: list[Path], kind: str, problems: _Problems, keep: bool
) -> tuple[list[dict], int, int]:
    """Read every record of every file; returns (records if keep, record count, bytes)."""
    records: list[dict] = []
    count = 0
    total_bytes = 0
    for path in files:
        if not _check_file(path, kind, problems):
            continue
        total_bytes += path.stat().st_size
        before = problems.count
        if kind == "pretrain" and path.suffix.lower() == ".txt":
            has_text = False
            pieces = []
            for piece in _txt_pieces(path, problems, CHUNK_BYTES):
                has_text = has_text or bool(piece.strip())
                if keep:
                    pieces.append(piece)
            if problems.count > before:
                continue
            if not has_text:
                problems.add(path, None, "empty file (only whitespace)")
                continue
            count += 1
            if keep:
                records.append({"text": "".join(pieces), "task": None})
            continue
        in_file = 0
        for line, value in _json_values(path, problems):
            try:
                record = normalise_record(value, kind)
            except RecordError as error:
                problems.add(path, line, str(error))
                continue
            if kind == "pretrain" and not record["text"]:
                continue  # an empty document adds nothing; not worth stopping a run for
            in_file += 1
            if keep:
                records.append(record)
        if in_file == 0 and problems.count == before:
            problems.add(path, None, "empty file (no records in it)")
        count += in_file
    return records, count, total_bytes


def validate(paths: Iterable[str | Path], kind: str) -> DataSummary:
    """Scan all of `paths` as `kind` data; raise one `UserError` listing every problem.

    Reads everything (streaming, so any size fits in memory) before a run starts, so no bad line
    surfaces mid-training. Returns what it found, for a one-line summary.
    """
    check_kind(kind)
    problems = _Problems(strict=False)
    files = _expand(paths, kind, problems)
    _, count, total_bytes = _scan_records(files, kind, problems, keep=False)
    problems.raise_if_any()
    return DataSummary(files=len(files), records=count, bytes=total_bytes)


def read_records(paths: Iterable[str | Path], kind: str) -> list[dict]:
    """All records of `paths` in canonical form (see `normalise_record`), checked in full.

    For pretrain this loads whole documents into memory (`{"text", "task"}` each): fine for
    samples and small corpora; stream large corpora with `iter_text_chunks`.
    """
    check_kind(kind)
    problems = _Problems(strict=False)
    files = _expand(paths, kind, problems)
    records, _, _ = _scan_records(files, kind, problems, keep=True)
    problems.raise_if_any()
    if not records:
        raise UserError(f"no {kind} records found in {', '.join(str(p) for p in files)}")
    return records


def iter_text_chunks(
    paths: Iterable[str | Path], chunk_bytes: int = CHUNK_BYTES
) -> Iterator[tuple[str, bool]]:
    """Pretraining text as `(chunk, is_last_chunk_of_document)`, streamed in bounded memory.

    A `.txt` file is one document, handed out in chunks of about `chunk_bytes` cut at line ends;
    each JSONL line `{"text": ...}` is one document (a single chunk). The first problem met raises
    `UserError` (`path:line: ...`); call `validate` first to hear about all of them at once.
    """
    problems = _Problems(strict=True)
    for path in _expand(paths, "pretrain", problems):
        if not _check_file(path, "pretrain", problems):
            continue
        if path.suffix.lower() == ".txt":
            pending: str | None = None
            has_text = False
            for piece in _txt_pieces(path, problems, chunk_bytes):
                has_text = has_text or bool(piece.strip())
                if pending is not None:
                    yield pending, False
                pending = piece
            if not has_text or pending is None:
                problems.add(path, None, "empty file (only whitespace)")
            else:
                yield pending, True
            continue
        found = 0
        for line, value in _json_values(path, problems):
            try:
                record = normalise_text(value) if isinstance(value, dict) else None
            except RecordError as error:
                problems.add(path, line, str(error))
                continue
            if record is None:
                problems.add(path, line, f"expected a JSON object, got {json_type(value)}")
                continue
            if record["text"]:
                found += 1
                yield record["text"], True
        if not found:
            problems.add(path, None, "empty file (no documents in it)")


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in blocks (any size, bounded memory).

    How tokenizer.json and token shards identify their input files, so a changed file is noticed.
    """
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
