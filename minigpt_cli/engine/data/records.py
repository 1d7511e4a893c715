"""Reading the user's data: streamed, checked in full before any training, every problem located.

Why a whole-file scan first: a bad line found an hour into training wastes the hour. `validate`
reads everything once and raises one `UserError` naming each problem as `path:line: what is wrong`
(the first 20, then a count), so the user fixes them all in one go. The readers use the same checks,
so data that validates also loads.

Formats (DESIGN.md "Data formats"):

- pretrain: `.txt` (a whole file is one document; streamed in chunks of about 1 MB cut at line ends,
  so a file of any size reads in bounded memory) and JSONL with one `{"text": ...}` document a line.
- sft: `{"instruction", "input"?, "output", "history"?, "system"?}`, `{"prompt", "completion"}`,
  `{"messages": [{"role", "content"}, ...]}`; all become `{"messages": [...], "task"}`.
- dpo (and reward): `{"prompt", "chosen", "rejected"}`; a prompt in `Human: ... Assistant:` form is
  split into turns. Full Anthropic-HH transcripts without a prompt field are split too. All become
  `{"prompt_messages": [...], "chosen", "rejected", "task"}`.
- rlhf: `{"prompt", "answer"?}` -> `{"prompt_messages": [...], "answer": str | None, "task"}`.

A folder stands for the data files inside it (recursively, sorted, hidden ones skipped). `.json`
files holding one JSON array of records are accepted too (read whole: meant for SFT-sized files).
UTF-8 with or without a BOM; CRLF line ends become LF. Unknown extra fields are ignored.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minigpt_cli.datasets import builtin
from minigpt_cli.engine.data.chat_template import role_problem
from minigpt_cli.errors import UserError, location

KINDS = ("pretrain", "sft", "dpo", "reward", "rlhf")
RECORD_KINDS = ("sft", "dpo", "reward", "rlhf")
ROLES = ("system", "user", "assistant")

CHUNK_BYTES = 1 << 20  # pretraining text is handed out in pieces of about this size
MAX_LISTED_PROBLEMS = 20
MAX_PROBLEMS_PER_FILE = 10  # past this many bad lines a file is probably not text: stop
_LONG_LINE_FACTOR = 4  # a line longer than this many chunks is cut mid-line
_BOM = b"\xef\xbb\xbf"

_EXPECTED = {
    "pretrain": 'a .txt file, or JSONL with one {"text": ...} object a line',
    "sft": (
        'an object with "instruction" and "output" (optional "input", "history"), '
        'or "prompt" and "completion", or "messages"'
    ),
    "dpo": 'an object with "prompt", "chosen" and "rejected"',
    "reward": 'an object with "prompt", "chosen" and "rejected"',
    "rlhf": 'an object with "prompt" (and optionally "answer")',
}


class RecordError(ValueError):
    """One record is malformed; the message says how (the caller adds `path:line`)."""


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


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


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
# Record normalisation
# ----------------------------------------------------------------------------------------------


def _string(
    obj: dict, key: str, *, required: bool = True, allow_empty: bool = True, needs: str = ""
) -> str | None:
    """`obj[key]`, checked to be a string; `needs` says what the format needs when it is missing."""
    if key not in obj or obj[key] is None:
        if required:
            raise RecordError(f"missing field '{key}'" + (f" ({needs})" if needs else ""))
        return None
    value = obj[key]
    if not isinstance(value, str):
        raise RecordError(f"field '{key}' must be a string, got {_json_type(value)}")
    if not allow_empty and not value.strip():
        raise RecordError(f"field '{key}' is empty")
    return value


def _task(obj: dict) -> str | None:
    return _string(obj, "task", required=False)


_HH_TURN = re.compile(r"(?:^|\n)[ \t]*(Human|Assistant):[ \t]?")


def looks_like_human_assistant(text: str) -> bool:
    """Whether `text` is an Anthropic-HH style transcript (`Human: ... Assistant: ...`)."""
    return text.lstrip().startswith("Human:") and "Assistant:" in text


def split_human_assistant(text: str) -> list[dict[str, str]]:
    """Turn `Human: ... Assistant: ...` text into chat messages.

    The empty `Assistant:` at the end (where the reply goes) is dropped, so a prompt becomes the
    conversation so far, ending with the user's turn. Two turns of the same speaker in a row (real
    transcripts have them, e.g. where a marker was written inline and the speaker went on) are one
    turn, so the conversation alternates as the chat template requires.
    """
    pieces = _HH_TURN.split(text.strip())
    turns: list[dict[str, str]] = []
    lead = pieces[0].strip()
    if lead:
        turns.append({"role": "system", "content": lead})
    for speaker, content in zip(pieces[1::2], pieces[2::2], strict=True):
        role = "user" if speaker == "Human" else "assistant"
        turns.append({"role": role, "content": content.strip()})
    if turns and turns[-1]["role"] == "assistant" and not turns[-1]["content"]:
        turns.pop()
    messages: list[dict[str, str]] = []
    for turn in turns:
        if messages and messages[-1]["role"] == turn["role"]:
            parts = (messages[-1]["content"], turn["content"])
            messages[-1] = {"role": turn["role"], "content": "\n\n".join(p for p in parts if p)}
        else:
            messages.append(turn)
    return messages


def _prompt_messages(prompt: str) -> list[dict[str, str]]:
    if looks_like_human_assistant(prompt):
        messages = split_human_assistant(prompt)
        if not messages or messages[-1]["role"] != "user":
            raise RecordError("the prompt must end with the user's turn (then 'Assistant:')")
        return messages
    return [{"role": "user", "content": prompt}]


def _check_messages(value: Any, field: str = "messages") -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise RecordError(f"field '{field}' must be an array of messages, got {_json_type(value)}")
    if not value:
        raise RecordError(f"field '{field}' is empty")
    out = []
    for index, message in enumerate(value):
        where = f"{field}[{index}]"
        if not isinstance(message, dict):
            raise RecordError(f"{where} must be an object, got {_json_type(message)}")
        for key in ("role", "content"):
            if key not in message:
                raise RecordError(f"{where} is missing '{key}'")
            if not isinstance(message[key], str):
                got = _json_type(message[key])
                raise RecordError(f"{where}: '{key}' must be a string, got {got}")
        if message["role"] not in ROLES:
            raise RecordError(
                f"{where}: unknown role {message['role']!r} (expected system, user or assistant)"
            )
        out.append({"role": message["role"], "content": message["content"]})
    return out


def _normalise_sft(obj: dict) -> dict:
    task = _task(obj)
    if "messages" in obj:
        messages = _check_messages(obj["messages"])
        if not any(m["role"] == "assistant" for m in messages):
            raise RecordError("'messages' has no assistant message to learn from")
        if messages[-1]["role"] != "assistant":
            raise RecordError("the last message must be the assistant's")
        if not messages[-1]["content"].strip():
            raise RecordError("the last assistant message is empty")
        problem = role_problem(messages)  # the chat template's rule, reported with the line
        if problem:
            raise RecordError(problem)
        return {"messages": messages, "task": task}
    if "instruction" in obj or "output" in obj:
        needs = "instruction records need 'instruction' and 'output'; 'input', 'history' optional"
        instruction = _string(obj, "instruction", needs=needs)
        input_text = _string(obj, "input", required=False) or ""
        output = _string(obj, "output", allow_empty=False, needs=needs)
        user = builtin.join_instruction(instruction or "", input_text)
        if not user.strip():
            raise RecordError("fields 'instruction' and 'input' are both empty")
        messages = _system_message(obj)
        messages += _history(obj.get("history"))
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        return {"messages": messages, "task": task}
    if "prompt" in obj or "completion" in obj:
        needs = "prompt/completion records need both 'prompt' and 'completion'"
        prompt = _string(obj, "prompt", allow_empty=False, needs=needs)
        completion = _string(obj, "completion", allow_empty=False, needs=needs)
        messages = _system_message(obj) + _prompt_messages(prompt or "")
        messages.append({"role": "assistant", "content": completion or ""})
        return {"messages": messages, "task": task}
    raise _unknown_format(obj, "sft")


def _system_message(obj: dict) -> list[dict[str, str]]:
    system = _string(obj, "system", required=False)
    return [{"role": "system", "content": system}] if system else []


def _history(value: Any) -> list[dict[str, str]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise RecordError(
            f"field 'history' must be an array of [user, assistant] pairs, got {_json_type(value)}"
        )
    messages = []
    for index, turn in enumerate(value):
        if (
            not isinstance(turn, list)
            or len(turn) != 2
            or not all(isinstance(part, str) for part in turn)
        ):
            raise RecordError(f"history[{index}] must be a pair of strings [user, assistant]")
        messages += [
            {"role": "user", "content": turn[0]},
            {"role": "assistant", "content": turn[1]},
        ]
    return messages


def _split_transcript(text: str, field: str) -> tuple[str, str]:
    marker = text.rfind("Assistant:")
    if marker < 0:
        raise RecordError(f"field '{field}' has no 'Assistant:' turn")
    end = marker + len("Assistant:")
    return text[:end], text[end:].strip()


def _normalise_pair(obj: dict, kind: str) -> dict:
    if "chosen" not in obj and "rejected" not in obj and "prompt" not in obj:
        raise _unknown_format(obj, kind)
    task = _task(obj)
    needs = f"{kind} records need 'prompt', 'chosen' and 'rejected'"
    chosen = _string(obj, "chosen", needs=needs)
    rejected = _string(obj, "rejected", needs=needs)
    assert chosen is not None and rejected is not None
    if "prompt" in obj and obj["prompt"] is not None:
        prompt = _string(obj, "prompt", allow_empty=False)
        assert prompt is not None
        if looks_like_human_assistant(prompt):
            if chosen.startswith(prompt) and rejected.startswith(prompt):  # whole transcripts
                chosen, rejected = chosen[len(prompt) :], rejected[len(prompt) :]
            chosen, rejected = chosen.strip(), rejected.strip()
    elif looks_like_human_assistant(chosen) and looks_like_human_assistant(rejected):
        prompt, chosen = _split_transcript(chosen, "chosen")
        other_prompt, rejected = _split_transcript(rejected, "rejected")
        if prompt.strip() != other_prompt.strip():
            raise RecordError("'chosen' and 'rejected' continue different conversations")
    else:
        raise RecordError(f"missing field 'prompt' ({needs})")
    if not chosen.strip():
        raise RecordError("field 'chosen' is empty")
    if not rejected.strip():
        raise RecordError("field 'rejected' is empty")
    if chosen == rejected:
        raise RecordError("'chosen' and 'rejected' are identical: nothing to prefer")
    return {
        "prompt_messages": _prompt_messages(prompt),
        "chosen": chosen,
        "rejected": rejected,
        "task": task,
    }


def _normalise_rlhf(obj: dict) -> dict:
    if "prompt" not in obj:
        if "instruction" in obj or "messages" in obj or "chosen" in obj:
            raise RecordError('missing field \'prompt\' (rlhf records are {"prompt", "answer"?})')
        raise _unknown_format(obj, "rlhf")
    task = _task(obj)
    prompt = _string(obj, "prompt", allow_empty=False)
    answer = obj.get("answer")
    if isinstance(answer, bool) or not (answer is None or isinstance(answer, str | int | float)):
        raise RecordError(f"field 'answer' must be a string or a number, got {_json_type(answer)}")
    if answer is not None and not isinstance(answer, str):
        answer = str(answer)
    return {"prompt_messages": _prompt_messages(prompt or ""), "answer": answer, "task": task}


def _normalise_text(obj: dict) -> dict:
    if "text" not in obj:
        raise RecordError(
            "missing field 'text' (pretraining JSONL needs one {\"text\": ...} object a line)"
        )
    text = _string(obj, "text")
    return {"text": (text or "").replace("\r\n", "\n"), "task": _task(obj)}


def _unknown_format(obj: dict, kind: str) -> RecordError:
    fields = ", ".join(f"'{key}'" for key in list(obj)[:8]) or "none"
    return RecordError(
        f"unknown {kind} record format (fields: {fields}); expected {_EXPECTED[kind]}"
    )


def normalize_record(obj: Any, kind: str) -> dict:
    """The canonical form of one record of `kind`, or `RecordError` saying what is wrong.

    sft -> `{"messages", "task"}`; dpo/reward -> `{"prompt_messages", "chosen", "rejected",
    "task"}`; rlhf -> `{"prompt_messages", "answer", "task"}`; pretrain -> `{"text", "task"}`.
    `task` is None when the record has none. Built-in records go through here too, so a stage
    sees one shape whatever the source.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown data kind {kind!r} (expected one of {', '.join(KINDS)})")
    if not isinstance(obj, dict):
        raise RecordError(f"expected a JSON object, got {_json_type(obj)}")
    try:
        if kind == "pretrain":
            return _normalise_text(obj)
        if kind == "sft":
            return _normalise_sft(obj)
        if kind in ("dpo", "reward"):
            return _normalise_pair(obj, kind)
        return _normalise_rlhf(obj)
    except RecordError as error:
        guess = _guess_kind(obj)
        if guess is not None and guess != kind and {guess, kind} != {"dpo", "reward"}:
            raise RecordError(f"{error}; this looks like {guess} data") from None
        raise


def _guess_kind(obj: dict) -> str | None:
    """Which kind of data a record looks like, to say so when it was given as another kind."""
    if "chosen" in obj and "rejected" in obj:
        return "dpo"
    if "messages" in obj or "output" in obj or "completion" in obj:
        return "sft"
    if "prompt" in obj and "answer" in obj:
        return "rlhf"
    if "text" in obj and not {"prompt", "instruction"} & set(obj):
        return "pretrain"
    return None


# ----------------------------------------------------------------------------------------------
# Public readers
# ----------------------------------------------------------------------------------------------


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise UserError(f"unknown data kind {kind!r} (expected one of {', '.join(KINDS)})")


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
                record = normalize_record(value, kind)
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
    _check_kind(kind)
    problems = _Problems(strict=False)
    files = _expand(paths, kind, problems)
    _, count, total_bytes = _scan_records(files, kind, problems, keep=False)
    problems.raise_if_any()
    return DataSummary(files=len(files), records=count, bytes=total_bytes)


def read_records(paths: Iterable[str | Path], kind: str) -> list[dict]:
    """All records of `paths` in canonical form (see `normalize_record`), checked in full.

    For pretrain this loads whole documents into memory (`{"text", "task"}` each): fine for
    samples and small corpora; stream large corpora with `iter_text_chunks`.
    """
    _check_kind(kind)
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
                record = _normalise_text(value) if isinstance(value, dict) else None
            except RecordError as error:
                problems.add(path, line, str(error))
                continue
            if record is None:
                problems.add(path, line, f"expected a JSON object, got {_json_type(value)}")
                continue
            if record["text"]:
                found += 1
                yield record["text"], True
        if not found:
            problems.add(path, None, "empty file (no documents in it)")


# ----------------------------------------------------------------------------------------------
# Built-in data, in the same canonical shape
# ----------------------------------------------------------------------------------------------


def builtin_records(
    kind: str, split: str = "train", size: int | None = None, seed: int = 0
) -> list[dict]:
    """The built-in data for `kind`, normalised exactly as a `--data` file would be.

    `size` is the training size (`[data] builtin_size`); a val split gets its share of it (see
    `datasets.builtin.default_size`). Pretraining records stay `{"text", "task"}`.
    """
    _check_kind(kind)
    generator_kind = "dpo" if kind == "reward" else kind
    try:
        count = builtin.default_size(generator_kind, split, size)
        raw = builtin.records(generator_kind, split, count, seed)
    except ValueError as error:
        raise UserError(str(error)) from None
    return [normalize_record(record, kind) for record in raw]


def builtin_documents(size: int | None = None, seed: int = 0) -> list[str]:
    """The built-in pretraining corpus as a list of documents (a few MB at the default size)."""
    return [record["text"] for record in builtin_records("pretrain", "train", size, seed)]


_KIND_NOUN = {"sft": "SFT record", "dpo": "preference pair", "rlhf": "prompt"}
VAL_SPLIT_SEED = 0  # the held-out share of --data files: the same whatever the training seed


def split_records(
    records: Sequence[dict], val_fraction: float, kind: str = "sft"
) -> tuple[list[dict], list[dict]]:
    """(train, val): a fixed-seed random `val_fraction` (at least one record) held out, order
    kept. Random rather than the tail, because a file sorted by topic would hold out one topic."""
    import numpy as np

    if len(records) < 2:
        raise UserError(
            f"only {len(records)} {_KIND_NOUN.get(kind, 'record')}: need at least 2 to hold one "
            "out for validation (add data or pass --val-data)"
        )
    held = max(1, round(len(records) * val_fraction))
    chosen = set(np.random.default_rng(VAL_SPLIT_SEED).permutation(len(records))[:held].tolist())
    train = [r for i, r in enumerate(records) if i not in chosen]
    val = [r for i, r in enumerate(records) if i in chosen]
    return train, val


def stage_records(
    kind: str, paths: Sequence[Path] | None, split: str, builtin_size: int, val_fraction: float
) -> list[dict]:
    """Normalised records of `kind` for `split` ("train", "val" or "all").

    No paths: the built-in data (`builtin_size` training records, seed 0; its val split is held
    out by construction). With paths: "train"/"val" split the files' records by `split_records`,
    and "all" returns everything (what `--val-data` files are).
    """
    if split not in ("train", "val", "all"):
        raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
    if not paths:
        return builtin_records(kind, "train" if split == "all" else split, builtin_size, 0)
    records = read_records(list(paths), kind)
    if split == "all":
        return records
    train, val = split_records(records, val_fraction, kind)
    return train if split == "train" else val
