"""Data loading: formats, normalisation, every error path with its `path:line`, bounded memory."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from minigpt_cli.cli.app import app
from minigpt_cli.datasets import builtin
from minigpt_cli.engine.data.files import (
    MAX_PROBLEMS_PER_FILE,
    expand_paths,
    iter_text_chunks,
    read_records,
    validate,
)
from minigpt_cli.engine.data.records import RecordError, normalise_record
from minigpt_cli.errors import UserError

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "data"


def write_jsonl(path: Path, rows: list, raw_lines: list[str] | None = None) -> Path:
    lines = [json.dumps(row, ensure_ascii=False) for row in rows] + (raw_lines or [])
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def error_of(call, *args) -> str:
    with pytest.raises(UserError) as info:
        call(*args)
    return str(info.value)


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "minigpt_cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={**os.environ, "COLUMNS": "120"},
    )


# --------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------


def test_folders_expand_to_their_data_files_sorted_and_recursive(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / ".hidden").mkdir()
    for name in ("b/2.txt", "a.jsonl", "c.txt", "notes.md", ".secret.txt", ".hidden/x.txt"):
        (tmp_path / name).write_text("x\n", encoding="utf-8")
    assert expand_paths([tmp_path]) == [
        tmp_path / "a.jsonl",
        tmp_path / "b/2.txt",
        tmp_path / "c.txt",
    ]
    assert expand_paths([tmp_path], kind="sft") == [tmp_path / "a.jsonl"]
    # The same file named twice (directly and through its folder) is read once.
    assert expand_paths([tmp_path / "c.txt", tmp_path]) == [
        tmp_path / "c.txt",
        tmp_path / "a.jsonl",
        tmp_path / "b/2.txt",
    ]


def test_missing_paths_and_empty_folders_are_reported_together(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("no data here", encoding="utf-8")
    message = error_of(expand_paths, [tmp_path / "nope.txt", tmp_path / "empty"])
    assert message.splitlines() == [
        "2 problems in the data:",
        f"  {tmp_path / 'nope.txt'}: no such file or folder",
        f"  {tmp_path / 'empty'}: empty folder: no .txt or .jsonl files in it",
    ]
    assert "no .jsonl files" in error_of(validate, [tmp_path / "empty"], "dpo")


# --------------------------------------------------------------------------------------------
# Pretraining text
# --------------------------------------------------------------------------------------------


def test_txt_is_one_document_in_line_aligned_chunks(tmp_path: Path) -> None:
    lines = [f"line {i} 第{i}行 " + "x" * (i % 17) for i in range(400)]
    text = "\n".join(lines) + "\n"
    path = tmp_path / "a.txt"
    path.write_text(text, encoding="utf-8")
    chunks = list(iter_text_chunks([path], chunk_bytes=512))
    assert len(chunks) > 10
    assert "".join(c for c, _ in chunks) == text
    assert [last for _, last in chunks] == [False] * (len(chunks) - 1) + [True]
    assert all(c.endswith("\n") for c, _ in chunks)


def test_bom_and_crlf_are_tolerated(tmp_path: Path) -> None:
    path = tmp_path / "win.txt"
    path.write_bytes("\ufeffhello\r\nworld 世界\r\n".encode())
    assert list(iter_text_chunks([path])) == [("hello\nworld 世界\n", True)]
    jsonl = tmp_path / "win.jsonl"
    jsonl.write_bytes(b'\xef\xbb\xbf{"text": "a\\r\\nb"}\r\n{"text": "c"}\r\n')
    assert list(iter_text_chunks([jsonl])) == [("a\nb", True), ("c", True)]
    sft = tmp_path / "sft.jsonl"
    sft.write_bytes(b'\xef\xbb\xbf{"prompt": "p", "completion": "c"}\r\n\r\n')
    assert read_records([sft], "sft") == [
        {
            "messages": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}],
            "task": None,
        }
    ]


def test_a_line_longer_than_chunks_is_cut_between_characters(tmp_path: Path) -> None:
    text = ("汉字abc\r" * 3000) + "\r\nend"  # one 30 KB line, CR inside, CRLF at its end
    path = tmp_path / "long.txt"
    path.write_bytes(text.encode("utf-8"))
    chunks = [c for c, _ in iter_text_chunks([path], chunk_bytes=1000)]
    assert len(chunks) > 3
    assert "".join(chunks) == text.replace("\r\n", "\n")


def test_documents_from_several_files_and_jsonl_lines(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("first file\n", encoding="utf-8")
    write_jsonl(tmp_path / "b.jsonl", [{"text": "doc one", "id": 1}, {"text": ""}, {"text": "two"}])
    chunks = list(iter_text_chunks([tmp_path]))
    assert chunks == [("first file\n", True), ("doc one", True), ("two", True)]
    summary = validate([tmp_path], "pretrain")
    assert (summary.files, summary.records) == (2, 3)


# --------------------------------------------------------------------------------------------
# Error paths: each one names the place
# --------------------------------------------------------------------------------------------


def test_empty_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    blank = tmp_path / "blank.txt"
    blank.write_bytes(b"\xef\xbb\xbf \n\r\n\t\n")
    blank_jsonl = tmp_path / "blank.jsonl"
    blank_jsonl.write_text("\n\n", encoding="utf-8")
    assert error_of(validate, [empty], "pretrain") == f"{empty}: empty file"
    assert error_of(validate, [blank], "pretrain") == f"{blank}: empty file (only whitespace)"
    assert error_of(lambda: list(iter_text_chunks([blank]))) == (
        f"{blank}: empty file (only whitespace)"
    )
    assert (
        error_of(validate, [blank_jsonl], "sft") == f"{blank_jsonl}: empty file (no records in it)"
    )
    assert error_of(read_records, [empty.with_suffix(".jsonl")], "sft").endswith(
        "no such file or folder"
    )


def test_invalid_utf8_names_the_line_even_in_a_later_chunk(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    body = b"".join(f"good line {i}\n".encode() for i in range(200))
    path.write_bytes(body + b"caf\xe9 au lait\n" + body + b"\xff\xfe\n")
    message = error_of(validate, [path], "pretrain")
    assert message.splitlines() == [
        "2 problems in the data:",
        f"  {path}:201: invalid UTF-8 (byte 0xe9 at column 4); save the file as UTF-8",
        f"  {path}:402: invalid UTF-8 (byte 0xff at column 1); save the file as UTF-8",
    ]
    # Small chunks: the bad line sits in a later chunk than the first, and is still line 201.
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}:201: invalid UTF-8 \(byte 0xe9"):
        list(iter_text_chunks([path], chunk_bytes=64))
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_bytes(
        b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xc3(", "completion": "b"}\n'
    )
    assert error_of(validate, [jsonl], "sft") == (
        f"{jsonl}:2: invalid UTF-8 (byte 0xc3 at column 13); save the file as UTF-8"
    )


def test_binary_file_stops_after_a_few_problems(tmp_path: Path) -> None:
    path = tmp_path / "image.txt"
    path.write_bytes(b"\x89PNG\n" + b"\xff\xd8\n" * 100_000)
    lines = error_of(validate, [path], "pretrain").splitlines()
    assert lines[0] == f"{MAX_PROBLEMS_PER_FILE + 1} problems in the data:"
    assert lines[1] == f"  {path}:1: invalid UTF-8 (byte 0x89 at column 1); save the file as UTF-8"
    assert lines[-1] == f"  {path}: too many problems, stopped reading: is it UTF-8 text?"


def test_json_problems_each_with_their_line(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "sft.jsonl",
        [
            {"instruction": "ok", "output": "fine"},
            {"instruction": "no output"},
            {"instruction": "bad type", "output": 42},
            {"prompt": "only prompt"},
            {"question": "q", "reply": "r"},
            {"messages": [{"role": "robot", "content": "x"}]},
            {"messages": [{"role": "user", "content": "hi"}]},
            {"instruction": "i", "output": "o", "history": [["only one"]]},
            {"instruction": "i", "output": "o", "task": 3},
        ],
        raw_lines=["[1, 2]", '{"instruction": "unterminated', "", "   "],
    )
    message = error_of(validate, [path], "sft")
    assert message.splitlines() == [
        "10 problems in the data:",
        f"  {path}:2: missing field 'output' (instruction records need 'instruction' and "
        "'output'; 'input', 'history' optional)",
        f"  {path}:3: field 'output' must be a string, got a number",
        f"  {path}:4: missing field 'completion' (prompt/completion records need both 'prompt' "
        "and 'completion')",
        f"  {path}:5: unknown sft record format (fields: 'question', 'reply'); expected an object "
        'with "instruction" and "output" (optional "input", "history"), or "prompt" and '
        '"completion", or "messages"',
        f"  {path}:6: messages[0]: unknown role 'robot' (expected system, user or assistant)",
        f"  {path}:7: 'messages' has no assistant message to learn from",
        f"  {path}:8: history[0] must be a pair of strings [user, assistant]",
        f"  {path}:9: field 'task' must be a string, got a number",
        f"  {path}:10: expected a JSON object, got an array",
        f"  {path}:11: invalid JSON: Unterminated string starting at (column 17)",
    ]


def test_dpo_and_rlhf_problems(tmp_path: Path) -> None:
    dpo = write_jsonl(
        tmp_path / "dpo.jsonl",
        [
            {"prompt": "p", "chosen": "a"},
            {"prompt": "p", "chosen": "same", "rejected": "same"},
            {"prompt": ["p"], "chosen": "a", "rejected": "b"},
            {"instruction": "i", "output": "o"},
            {"prompt": "Human: hi\n\nAssistant: hello", "chosen": "a", "rejected": "b"},
        ],
    )
    assert error_of(validate, [dpo], "dpo").splitlines()[1:] == [
        f"  {dpo}:1: missing field 'rejected' (dpo records need 'prompt', 'chosen' and 'rejected')",
        f"  {dpo}:2: 'chosen' and 'rejected' are identical: nothing to prefer",
        f"  {dpo}:3: field 'prompt' must be a string, got an array",
        f"  {dpo}:4: unknown dpo record format (fields: 'instruction', 'output'); expected an "
        'object with "prompt", "chosen" and "rejected"; this looks like sft data',
        f"  {dpo}:5: the prompt must end with the user's turn (then 'Assistant:')",
    ]
    rlhf = write_jsonl(
        tmp_path / "rl.jsonl",
        [{"prompt": "q", "answer": True}, {"prompt": ""}, {"question": "q"}, {"prompt": "q"}],
    )
    assert error_of(validate, [rlhf], "rlhf").splitlines()[1:] == [
        f"  {rlhf}:1: field 'answer' must be a string or a number, got a boolean",
        f"  {rlhf}:2: field 'prompt' is empty",
        f"  {rlhf}:3: unknown rlhf record format (fields: 'question'); expected an object with "
        '"prompt" (and optionally "answer")',
    ]


def test_wrong_kind_and_unknown_file_formats(tmp_path: Path) -> None:
    txt = tmp_path / "notes.txt"
    txt.write_text("hello\n", encoding="utf-8")
    csv = tmp_path / "table.csv"
    csv.write_text("a,b\n", encoding="utf-8")
    assert (
        error_of(validate, [txt], "sft")
        == f"{txt}: sft data must be JSONL (.jsonl), not plain text"
    )
    assert error_of(validate, [csv], "pretrain") == (
        f"{csv}: unknown data format ('.csv'): expected .txt or .jsonl"
    )
    jsonl = write_jsonl(tmp_path / "pre.jsonl", [{"text": 5}, {"body": "x"}])
    assert error_of(validate, [jsonl], "pretrain").splitlines()[1:] == [
        f"  {jsonl}:1: field 'text' must be a string, got a number",
        f"  {jsonl}:2: missing field 'text' (pretraining JSONL needs one {{\"text\": ...}} object "
        "a line)",
    ]
    with pytest.raises(UserError, match="unknown data kind 'chat'"):
        validate([jsonl], "chat")


def test_more_than_twenty_problems_are_counted(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "many.jsonl", [{"prompt": "p"}] * 27)
    lines = error_of(validate, [path], "sft").splitlines()
    assert lines[0] == "27 problems in the data:"
    assert len(lines) == 1 + 20 + 1
    assert lines[20].startswith(f"  {path}:20: missing field 'completion'")
    assert lines[-1] == "  ... and 7 more problems"


def test_json_array_files_report_the_line_of_each_element(tmp_path: Path) -> None:
    path = tmp_path / "alpaca.json"
    path.write_text(
        textwrap.dedent(
            """\
            [
              {"instruction": "a", "input": "", "output": "b"},
              {"instruction": "c",
               "input": "",
               "output": "d"},
              {"instruction": "no output"}
            ]
            """
        ),
        encoding="utf-8",
    )
    assert error_of(validate, [path], "sft") == (
        f"{path}:6: missing field 'output' (instruction records need 'instruction' and 'output'; "
        "'input', 'history' optional)"
    )
    path.write_text('[{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]')
    assert [r["messages"][-1]["content"] for r in read_records([path], "sft")] == ["b", "d"]
    path.write_text('[{"instruction": "a", "output": "b"},\n {"instruction": }]')
    assert error_of(validate, [path], "sft") == (
        f"{path}:2: invalid JSON: Expecting value (column 18)"
    )


# --------------------------------------------------------------------------------------------
# Normalisation of every accepted format
# --------------------------------------------------------------------------------------------


def test_sft_formats_normalise_to_messages() -> None:
    record = {
        "instruction": "Translate.",
        "input": "cat",
        "output": "猫",
        "history": [["hi", "hello"]],
        "system": "Be brief.",
        "task": "translation",
        "extra": {"ignored": True},
    }
    assert normalise_record(record, "sft") == {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "Translate.\ncat"},
            {"role": "assistant", "content": "猫"},
        ],
        "task": "translation",
    }
    hh = {"prompt": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:", "completion": "d"}
    assert [m["content"] for m in normalise_record(hh, "sft")["messages"]] == ["a", "b", "c", "d"]
    messages = {
        "messages": [
            {"role": "user", "content": "q", "name": "x"},
            {"role": "assistant", "content": "a"},
        ]
    }
    assert normalise_record(messages, "sft")["messages"][0] == {"role": "user", "content": "q"}


def test_dpo_human_assistant_prompts_and_transcripts() -> None:
    expected_turns = [
        {"role": "user", "content": "Name a fruit."},
        {"role": "assistant", "content": "Apple."},
        {"role": "user", "content": "Another?"},
    ]
    prompt = "\n\nHuman: Name a fruit.\n\nAssistant: Apple.\n\nHuman: Another?\n\nAssistant:"
    split = normalise_record({"prompt": prompt, "chosen": " Pear.", "rejected": " No."}, "dpo")
    assert split == {
        "prompt_messages": expected_turns,
        "chosen": "Pear.",
        "rejected": "No.",
        "task": None,
    }
    # Anthropic-HH style: whole transcripts, no prompt field.
    transcript = {"chosen": prompt + " Pear.", "rejected": prompt + " No."}
    assert normalise_record(transcript, "reward") == split
    assert normalise_record({"prompt": prompt, **transcript}, "dpo") == split
    plain = normalise_record({"prompt": "2+2", "chosen": "2+2 = 4", "rejected": "2+2 = 5"}, "dpo")
    assert (plain["chosen"], plain["rejected"]) == ("2+2 = 4", "2+2 = 5")
    diverging = {"chosen": "Human: a\n\nAssistant: x", "rejected": "Human: b\n\nAssistant: y"}
    with pytest.raises(RecordError, match="different conversations"):
        normalise_record(diverging, "dpo")


def test_a_speaker_going_on_after_an_inline_marker_is_one_turn() -> None:
    # As in Anthropic HH: "Human:" written inline is not a turn, so the assistant speaks twice.
    prompt = (
        "Human: Sharpen knives?\n\nAssistant: Use a stone.  Human:  Thanks.\n\n"
        "Assistant: Anything else?\n\nHuman: No stone?\n\nAssistant:"
    )
    record = normalise_record({"prompt": prompt, "chosen": "A rod.", "rejected": "No."}, "dpo")
    assert record["prompt_messages"] == [
        {"role": "user", "content": "Sharpen knives?"},
        {"role": "assistant", "content": "Use a stone.  Human:  Thanks.\n\nAnything else?"},
        {"role": "user", "content": "No stone?"},
    ]


def test_rlhf_answers_become_strings() -> None:
    assert normalise_record({"prompt": "6 * 7?", "answer": 42}, "rlhf") == {
        "prompt_messages": [{"role": "user", "content": "6 * 7?"}],
        "answer": "42",
        "task": None,
    }
    assert normalise_record({"prompt": "Say hi."}, "rlhf")["answer"] is None


def test_example_files_are_valid_for_their_kind() -> None:
    for kind in ("pretrain", "sft", "dpo", "rlhf"):
        folder = EXAMPLES / kind
        summary = validate([folder], kind)
        assert summary.records >= 3, kind
    sft = read_records([EXAMPLES / "sft"], "sft")
    assert any(m["role"] == "system" for r in sft for m in r["messages"])
    assert any(len(r["messages"]) >= 4 for r in sft)  # history and multi-turn examples
    dpo = read_records([EXAMPLES / "dpo"], "dpo")
    assert any(len(r["prompt_messages"]) == 3 for r in dpo)  # the Human/Assistant example
    rlhf = read_records([EXAMPLES / "rlhf"], "rlhf")
    assert {r["answer"] is None for r in rlhf} == {True, False}


# --------------------------------------------------------------------------------------------
# Bounded memory on a big file
# --------------------------------------------------------------------------------------------


RSS_PROBE = """
import resource, sys
from minigpt_cli.engine.data.files import iter_text_chunks, validate
path = sys.argv[1]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
summary = validate([path], "pretrain")
chars = chunks = 0
for chunk, last in iter_text_chunks([path]):
    chars += len(chunk)
    chunks += 1
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(chars, chunks, summary.bytes, (after - before) // 1024)
"""


def test_reading_a_200_mb_file_keeps_memory_bounded(tmp_path: Path) -> None:
    line = "The quick brown fox 跳过了懒狗 and counts 12345.\r\n"
    block = line * (1_000_000 // len(line.encode()))
    path = tmp_path / "big.txt"
    with path.open("w", encoding="utf-8", newline="") as handle:
        for _ in range(200):
            handle.write(block)
    size = path.stat().st_size
    try:
        result = subprocess.run(
            [sys.executable, "-c", RSS_PROBE, str(path)],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
    finally:
        path.unlink()
    chars, chunks, scanned, grown_mb = (int(x) for x in result.stdout.split())
    assert size > 190_000_000 and scanned == size
    assert chars == len(block.replace("\r\n", "\n")) * 200
    assert chunks >= 150  # streamed in ~1 MB pieces, not read whole
    assert grown_mb < 100, f"peak RSS grew by {grown_mb} MB while reading {size / 1e6:.0f} MB"


# --------------------------------------------------------------------------------------------
# CLI: show and export
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "split"), [("sft", "val"), ("dpo", "train"), ("rlhf", "val")])
def test_export_reads_back_identically(tmp_path: Path, kind: str, split: str) -> None:
    out = tmp_path / f"{kind}.jsonl"
    result = CliRunner().invoke(
        app, ["data", "export", "--kind", kind, "--split", split, "-n", "120", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert f"wrote 120 built-in {kind} {split} records" in result.output
    generated = builtin.records(kind, split, 120, 0)
    assert read_records([out], kind) == [normalise_record(r, kind) for r in generated]
    if kind == "sft":
        assert [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()] == generated


def test_export_pretrain_reads_back_as_the_same_documents(tmp_path: Path) -> None:
    out = tmp_path / "corpus.jsonl"
    result = CliRunner().invoke(
        app, ["data", "export", "--kind", "pretrain", "-n", "50", "--seed", "2", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    expected = builtin.pretrain_records(50, seed=2)
    assert [text for text, _ in iter_text_chunks([out])] == [r["text"] for r in expected]
    assert read_records([out], "pretrain") == expected


def test_show_prints_readable_samples() -> None:
    result = CliRunner().invoke(app, ["data", "show", "--kind", "sft", "-n", "3", "--split", "val"])
    assert result.exit_code == 0, result.output
    records = builtin.sft_records("val", 3, 0)
    assert result.output.startswith("3 of 400 built-in sft val records (seed 0")
    for record in records:
        assert f"assistant: {record['output']}" in result.output
        assert record["instruction"] in result.output
    pretrain = CliRunner().invoke(app, ["data", "show", "--kind", "pretrain", "-n", "2"])
    assert pretrain.exit_code == 0
    first = builtin.pretrain_records(1)[0]["text"]
    assert len(first) > 300 and first[:100].replace("\n", "\n    ") in pretrain.output
    assert first[:400].replace("\n", "\n    ") not in pretrain.output  # long documents are cut
    assert " …" in pretrain.output


def test_show_user_files() -> None:
    result = CliRunner().invoke(
        app, ["data", "show", "--kind", "dpo", "--data", str(EXAMPLES / "dpo"), "-n", "10"]
    )
    assert result.exit_code == 0, result.output
    assert "chosen: A puppy." in result.output and "rejected: No idea." in result.output
    text = CliRunner().invoke(
        app, ["data", "show", "--kind", "pretrain", "--data", str(EXAMPLES / "pretrain")]
    )
    assert text.exit_code == 0 and "small robot" in text.output and "太阳" in text.output


def test_cli_errors_exit_2_with_the_location(tmp_path: Path) -> None:
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "completion": "c"}], ["{oops"])
    result = run_cli("data", "show", "--kind", "sft", "--data", str(bad))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: {bad}:2: invalid JSON: Expecting property name enclosed in double quotes "
        "(column 2)"
    )
    assert "Traceback" not in result.stderr
    no_val = run_cli("data", "show", "--kind", "pretrain", "--split", "val")
    assert no_val.returncode == 2 and "no separate val split" in no_val.stderr
    out = tmp_path / "exists.jsonl"
    out.write_text("keep me\n", encoding="utf-8")
    refused = run_cli("data", "export", "--kind", "rlhf", "--out", str(out))
    assert refused.returncode == 2 and "already exists" in refused.stderr
    assert out.read_text(encoding="utf-8") == "keep me\n"
    wrong_kind = run_cli("data", "show", "--kind", "chat")
    assert wrong_kind.returncode == 2 and "chat" in wrong_kind.stderr
