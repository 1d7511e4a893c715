"""Token shards: exact content, document separators, dtype choice, reuse and re-encode, slicing
across shard boundaries, damaged folders, and the `tokenize encode` verb end to end."""

from __future__ import annotations

import functools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minigpt_cli.engine.data import shards as shards_module
from minigpt_cli.engine.data.files import iter_text_chunks
from minigpt_cli.engine.data.shards import (
    META_FILE,
    TokenShards,
    encode_texts_to_array,
    encode_to_shards,
    is_shard_folder,
    reusable_shards,
    shard_dtype,
)
from minigpt_cli.engine.data.tokenizer import Tokenizer
from minigpt_cli.engine.data.tokenizer_training import train_tokenizer
from minigpt_cli.errors import UserError

WORDS = ["the", "cat", "sat", "on", "a", "mat", "while", "model", "learns", "from", "day", "42"]
ZH = list("我们你他是的了在有这个人中大不上为和国地到以说时要就出会可也")


def documents(count: int, seed: int = 0) -> list[str]:
    """Multi-line English/Chinese documents, some with leading spaces and blank lines."""
    rng = random.Random(seed)
    docs = []
    for _ in range(count):
        lines = []
        for _ in range(rng.randint(1, 5)):
            if rng.random() < 0.5:
                lines.append("  " * rng.randint(0, 1) + " ".join(rng.choices(WORDS, k=8)))
            else:
                lines.append("".join(rng.choices(ZH, k=12)) + "。")
            if rng.random() < 0.2:
                lines.append("")
        docs.append("\n".join(lines))
    return docs


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    folder = tmp_path_factory.mktemp("tok")
    train_tokenizer(documents(300, seed=1), 400, folder)
    return Tokenizer.load(folder)


def write_corpus(folder: Path) -> tuple[Path, list[str]]:
    """A folder with one .txt document and a JSONL file of documents; returns the texts in order."""
    folder.mkdir()
    docs = documents(30, seed=2)
    (folder / "a.txt").write_text(docs[0] + "\n", encoding="utf-8")
    with (folder / "b.jsonl").open("w", encoding="utf-8") as handle:
        for doc in docs[1:]:
            handle.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
    return folder, [docs[0] + "\n", *docs[1:]]


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, list[str]]:
    return write_corpus(tmp_path / "corpus")


def expected_tokens(tok: Tokenizer, docs: list[str]) -> list[int]:
    return [i for doc in docs for i in [*tok.encode(doc), tok.eos_id]]


# ------------------------------------------------------------------------------ content


def test_dtype_is_uint16_while_ids_fit_else_uint32() -> None:
    assert shard_dtype(320) == np.uint16
    assert shard_dtype(65_535) == np.uint16
    assert shard_dtype(65_536) == np.uint16  # ids 0..65535 all fit
    assert shard_dtype(65_537) == np.uint32
    assert shard_dtype(262_144) == np.uint32
    assert shard_dtype(5000).byteorder in ("<", "=")  # little-endian on disk
    with pytest.raises(ValueError):
        shard_dtype(0)


def test_shards_hold_each_document_followed_by_end_of_text(
    tok: Tokenizer, corpus: tuple[Path, list[str]], tmp_path: Path
) -> None:
    folder, docs = corpus
    meta = encode_to_shards(tok, [folder], tmp_path / "shards")
    assert meta["reused"] is False
    shards = TokenShards(tmp_path / "shards")
    tokens = shards[:].tolist()
    assert tokens == expected_tokens(tok, docs)
    assert tokens.count(tok.eos_id) == len(docs) == meta["documents"] == shards.documents
    assert tokens[-1] == tok.eos_id
    pieces = np.split(np.asarray(tokens), np.flatnonzero(np.asarray(tokens) == tok.eos_id) + 1)
    assert [tok.decode(p) for p in pieces[:-1]] == docs  # eos separates the documents exactly
    assert meta["dtype"] == "uint16" and shards.dtype == np.uint16
    assert meta["total_tokens"] == len(shards) == len(tokens)
    assert meta["text_bytes"] == sum(len(doc.encode("utf-8")) for doc in docs)
    assert shards.bytes_per_token == pytest.approx(meta["text_bytes"] / len(tokens))
    assert meta["tokenizer_sha256"] == tok.sha256 == shards.tokenizer_sha256
    assert [Path(r["path"]).name for r in meta["inputs"]] == ["a.txt", "b.jsonl"]
    assert all(len(r["sha256"]) == 64 and r["size"] > 0 for r in meta["inputs"])
    on_disk = json.loads((tmp_path / "shards" / META_FILE).read_text(encoding="utf-8"))
    assert "reused" not in on_disk and on_disk["total_tokens"] == len(tokens)
    assert is_shard_folder(tmp_path / "shards") and not is_shard_folder(folder)


def test_small_chunks_and_batches_give_the_same_tokens_as_whole_documents(
    tok: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A long .txt document read in 64-byte chunks, encoded in 200-byte batches, line by line.
    doc = "\n".join(documents(40, seed=3)) + "\n"
    path = tmp_path / "long.txt"
    path.write_text(doc, encoding="utf-8")
    small_chunks = functools.partial(iter_text_chunks, chunk_bytes=64)
    monkeypatch.setattr(shards_module, "iter_text_chunks", small_chunks)
    monkeypatch.setattr(shards_module, "_BATCH_BYTES", 200)
    events: list = []
    encode_to_shards(tok, [path], tmp_path / "shards", on_event=events.append)
    assert TokenShards(tmp_path / "shards")[:].tolist() == [*tok.encode(doc), tok.eos_id]
    progress = [e.data for e in events if e.kind == "progress"]
    assert all(p["task"] == "encode" and p["unit"] == "B" for p in progress)
    done = [p["done"] for p in progress]
    assert len(done) > 3 and done == sorted(done)
    assert done[-1] == progress[-1]["total"] == path.stat().st_size


def test_encode_texts_to_array_matches_the_shard_layout(tok: Tokenizer) -> None:
    docs = documents(10, seed=4)
    array = encode_texts_to_array(tok, docs)
    assert array.dtype == np.uint16
    assert array.tolist() == expected_tokens(tok, docs)
    assert encode_texts_to_array(tok, []).size == 0


# ------------------------------------------------------------------------------ slicing


@pytest.fixture(scope="module")
def small_shards(
    tok: Tokenizer, tmp_path_factory: pytest.TempPathFactory
) -> tuple[TokenShards, np.ndarray]:
    base = tmp_path_factory.mktemp("small-shards")
    folder, docs = write_corpus(base / "corpus")
    meta = encode_to_shards(tok, [folder], base / "shards", shard_tokens=37)
    shards = TokenShards(base / "shards")
    assert len(meta["shards"]) == -(-len(shards) // 37) > 3
    assert [s["tokens"] for s in meta["shards"][:-1]] == [37] * (len(meta["shards"]) - 1)
    return shards, np.asarray(expected_tokens(tok, docs), dtype=np.int64)


def test_slices_across_shard_boundaries(small_shards: tuple[TokenShards, np.ndarray]) -> None:
    shards, full = small_shards
    assert len(shards) == len(full)
    for start, stop in [(0, 37), (30, 80), (36, 38), (37, 74), (5, len(full)), (0, 0), (50, 10)]:
        piece = shards[start:stop]
        assert piece.dtype == np.int64
        assert np.array_equal(piece, full[start:stop]), (start, stop)
    assert np.array_equal(shards[-40:], full[-40:])
    assert np.array_equal(shards[::-3], full[::-3])
    assert np.array_equal(shards[100:10:-7], full[100:10:-7])
    assert shards[37] == full[37] and shards[-1] == full[-1]
    assert isinstance(shards[0], int)
    with pytest.raises(IndexError):
        shards[len(full)]
    with pytest.raises(TypeError):
        shards["0"]  # type: ignore[index]


@given(data=st.data())
@settings(max_examples=150, deadline=None)
def test_any_slice_equals_the_flat_array(
    small_shards: tuple[TokenShards, np.ndarray], data: st.DataObject
) -> None:
    shards, full = small_shards
    key = data.draw(st.slices(len(full) + 5))
    assert np.array_equal(shards[key], full[key])


# ------------------------------------------------------------------------------ reuse


def test_unchanged_inputs_reuse_the_shards_changed_inputs_re_encode(
    tok: Tokenizer, corpus: tuple[Path, list[str]], tmp_path: Path
) -> None:
    folder, docs = corpus
    out = tmp_path / "shards"
    first = encode_to_shards(tok, [folder], out)
    shard_file = out / first["shards"][0]["file"]
    written = shard_file.stat().st_mtime_ns

    again = encode_to_shards(tok, [folder], out)
    assert again["reused"] is True
    assert shard_file.stat().st_mtime_ns == written
    assert reusable_shards(tok, [folder], out) is not None

    # A new mtime with the same bytes is still the same input (compared by hash).
    os.utime(folder / "a.txt", ns=(written + 10**9, written + 10**9))
    assert encode_to_shards(tok, [folder], out)["reused"] is True

    # Same size, different bytes: re-encoded.
    text = (folder / "a.txt").read_text(encoding="utf-8")
    first_letter = next(i for i, char in enumerate(text) if char.isascii() and char.isalpha())
    changed = text[:first_letter] + text[first_letter].swapcase() + text[first_letter + 1 :]
    assert changed != text and len(changed.encode()) == len(text.encode())
    (folder / "a.txt").write_text(changed, encoding="utf-8")
    assert reusable_shards(tok, [folder], out) is None
    redone = encode_to_shards(tok, [folder], out)
    assert redone["reused"] is False
    assert TokenShards(out)[:].tolist() == expected_tokens(tok, [changed, *docs[1:]])


def test_another_tokenizer_or_layout_re_encodes(
    tok: Tokenizer, corpus: tuple[Path, list[str]], tmp_path: Path
) -> None:
    folder, docs = corpus
    out = tmp_path / "shards"
    encode_to_shards(tok, [folder], out)
    other_dir = tmp_path / "other"
    train_tokenizer(documents(200, seed=8), 350, other_dir)
    other = Tokenizer.load(other_dir)
    meta = encode_to_shards(other, [folder], out)
    assert meta["reused"] is False and meta["tokenizer_sha256"] == other.sha256
    assert TokenShards(out)[:].tolist() == expected_tokens(other, docs)
    assert encode_to_shards(other, [folder], out, shard_tokens=50)["reused"] is False
    assert len(list(out.glob("shard-*.bin"))) == len(
        json.loads((out / META_FILE).read_text())["shards"]
    )


def test_interrupted_encode_is_redone_and_leftovers_removed(
    tok: Tokenizer, corpus: tuple[Path, list[str]], tmp_path: Path
) -> None:
    folder, docs = corpus
    out = tmp_path / "shards"
    encode_to_shards(tok, [folder], out, shard_tokens=40)
    # What a kill mid-encode leaves: no meta, a partial file, a stale shard from a bigger run.
    (out / META_FILE).unlink()
    (out / "shard-00000.bin.partial").write_bytes(b"\x01\x02")
    (out / "shard-00999.bin").write_bytes(b"\x00" * 8)
    with pytest.raises(UserError, match="no meta.json"):
        TokenShards(out)
    meta = encode_to_shards(tok, [folder], out, shard_tokens=40)
    assert meta["reused"] is False
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([META_FILE, *(s["file"] for s in meta["shards"])])
    assert TokenShards(out)[:].tolist() == expected_tokens(tok, docs)


def test_failed_encode_leaves_no_meta_and_no_partial_files(tok: Tokenizer, tmp_path: Path) -> None:
    good = tmp_path / "good.txt"
    good.write_text("fine text here\n", encoding="utf-8")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": 3}\n', encoding="utf-8")
    out = tmp_path / "shards"
    with pytest.raises(UserError, match=r"bad\.jsonl:2"):
        encode_to_shards(tok, [good, bad], out)
    assert list(out.iterdir()) == []


# ------------------------------------------------------------------------------ damage


def test_truncated_shard_is_a_user_error_and_is_re_encoded(
    tok: Tokenizer, corpus: tuple[Path, list[str]], tmp_path: Path
) -> None:
    folder, docs = corpus
    out = tmp_path / "shards"
    meta = encode_to_shards(tok, [folder], out, shard_tokens=40)
    victim = out / meta["shards"][1]["file"]
    victim.write_bytes(victim.read_bytes()[:-3])
    with pytest.raises(UserError) as info:
        TokenShards(out)
    assert str(victim) in str(info.value) and "truncated" in str(info.value)
    redone = encode_to_shards(tok, [folder], out, shard_tokens=40)
    assert redone["reused"] is False
    assert TokenShards(out)[:].tolist() == expected_tokens(tok, docs)
    victim.unlink()
    with pytest.raises(UserError, match="missing"):
        TokenShards(out)


def test_opening_something_that_is_not_a_shard_folder(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such"):
        TokenShards(tmp_path / "nowhere")
    with pytest.raises(UserError, match="no meta.json"):
        TokenShards(tmp_path)
    (tmp_path / META_FILE).write_text("{not json", encoding="utf-8")
    with pytest.raises(UserError, match="unreadable"):
        TokenShards(tmp_path)
    (tmp_path / META_FILE).write_text('{"format": "something else"}', encoding="utf-8")
    with pytest.raises(UserError, match="not a minigpt"):
        TokenShards(tmp_path)


def test_output_path_that_is_a_file_is_a_user_error(
    tok: Tokenizer, corpus: tuple[Path, list[str]], tmp_path: Path
) -> None:
    target = tmp_path / "file"
    target.write_text("x", encoding="utf-8")
    with pytest.raises(UserError, match="not a folder"):
        encode_to_shards(tok, [corpus[0]], target)


# ------------------------------------------------------------------------------ CLI


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "minigpt_cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_train_then_encode_then_reuse(tmp_path: Path, corpus: tuple[Path, list[str]]) -> None:
    folder, docs = corpus
    train_text = tmp_path / "train.txt"
    train_text.write_text("\n".join(documents(300, seed=6)) + "\n", encoding="utf-8")
    result = run_cli(
        "tokenize", "train", "-i", train_text, "--vocab-size", "400", "--out", tmp_path / "tok"
    )
    assert result.returncode == 0, result.stderr
    assert "vocabulary size: 400" in result.stdout

    args = ["tokenize", "encode", "--tokenizer", tmp_path / "tok", "--input", folder]
    result = run_cli(*args, "--out", tmp_path / "shards")
    assert result.returncode == 0, result.stderr
    tok = Tokenizer.load(tmp_path / "tok")
    expected = expected_tokens(tok, docs)
    assert f"tokens: {len(expected):,} (uint16) in 1 shard; {len(docs)} documents" in result.stdout
    assert "reused: no" in result.stdout
    assert "encoded 100%" in result.stderr  # plain progress lines when stderr is not a tty
    assert TokenShards(tmp_path / "shards")[:].tolist() == expected

    result = run_cli(*args, "--out", tmp_path / "shards")
    assert result.returncode == 0, result.stderr
    assert "reused: yes" in result.stdout


def test_cli_encode_errors_exit_2_naming_the_path(tmp_path: Path, tok: Tokenizer) -> None:
    tok.save(tmp_path / "tok")
    missing = tmp_path / "missing.txt"
    result = run_cli(
        "tokenize", "encode", "--tokenizer", tmp_path / "tok", "-i", missing, "-o", tmp_path / "s"
    )
    assert result.returncode == 2
    assert str(missing) in result.stderr and "Traceback" not in result.stderr

    text = tmp_path / "ok.txt"
    text.write_text("hello\n", encoding="utf-8")
    result = run_cli(
        "tokenize", "encode", "--tokenizer", tmp_path / "nope", "-i", text, "-o", tmp_path / "s"
    )
    assert result.returncode == 2
    assert str(tmp_path / "nope") in result.stderr and "Traceback" not in result.stderr
