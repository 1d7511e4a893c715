"""The tokenizer: exact round trip, inert special-token strings, stable ids, honest chars/token,
clean errors for every bad input, and the `tokenize train` verb end to end."""

from __future__ import annotations

import hashlib
import io
import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from hypothesis import example, given, settings
from hypothesis import strategies as st

from minigpt_cli.engine.data.tokenizer import META_FILE, MODEL_FILE, SPECIAL_TOKENS, Tokenizer
from minigpt_cli.engine.data.tokenizer_training import (
    detect_language,
    rare_characters,
    train_tokenizer,
)
from minigpt_cli.errors import UserError

VOCAB = 500
_WORDS = (
    "the a quick brown fox jumps over lazy dog and cat with hat in house on tree river "
    "mountain small model learns words from text every day people read write numbers"
)
EN_WORDS = _WORDS.split()
ZH_CHARS = list(
    "我们你他她是的了在有这个人中大不上为和国地到以说时要就出会可也学习模型文字数据今天"
)


def mixed_corpus(documents: int, seed: int = 0) -> list[str]:
    """English and Chinese lines (with digits and punctuation), a few per document."""
    rng = random.Random(seed)
    out = []
    for _ in range(documents):
        lines = []
        for _ in range(rng.randint(2, 6)):
            if rng.random() < 0.5:
                words = rng.choices(EN_WORDS, k=rng.randint(4, 14))
                lines.append(" ".join(words).capitalize() + f" {rng.randint(0, 999)}.")
            else:
                lines.append("".join(rng.choices(ZH_CHARS, k=rng.randint(6, 24))) + "。")
        out.append("\n".join(lines))
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Tokenizer, Path]:
    out = tmp_path_factory.mktemp("tok")
    events: list = []
    report = train_tokenizer(mixed_corpus(400), VOCAB, out, on_event=events.append)
    report.events = events  # type: ignore[attr-defined]
    return report, Tokenizer.load(out), out


@pytest.fixture(scope="module")
def tok(trained: tuple[object, Tokenizer, Path]) -> Tokenizer:
    return trained[1]


# ------------------------------------------------------------------------------ round trip

TRICKY = [
    "",
    " ",
    "   leading spaces",
    "trailing spaces   ",
    "\n\nnewlines\n",
    "\ttabs\tand\r\ncarriage returns\r",
    "\u2581",
    "a\u2581b \u2581\u2581 c",
    "emoji 😀👍🏽 and flags 🇫🇷",
    "中文和English混合 123",
    "nul \x00 byte and \x7f delete",
    "<|user|>hello<|end_of_turn|>",
    "<unk> <s> </s> <0x41>",
    "digits 1234567890 3.14159",
    "\u200b zero width \ufeff bom inside",
    "combining e\u0301 and precomposed \u00e9",
    "𠀀𪜀 rare han 😀\U0010ffff",
]


@given(st.text(max_size=300))
@settings(max_examples=300, deadline=None)
@example("\u2581")
@example("  \n\t\u2581x")
def test_decode_encode_is_identity_for_any_text(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


@given(st.lists(st.sampled_from(TRICKY + ["\n", " ", "x", "中", "<|", "|>"]), max_size=12))
@settings(max_examples=200, deadline=None)
def test_round_trip_of_concatenated_tricky_pieces(tok: Tokenizer, parts: list[str]) -> None:
    text = "".join(parts)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert not set(ids) & set(tok.special_ids)


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_tricky_examples(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


def test_decode_of_concatenated_encodings_is_concatenated_text(tok: Tokenizer) -> None:
    parts = ["Hello world\n", "  我们 \u2581 ", "😀", "\n"]
    ids = [i for part in parts for i in tok.encode(part)]
    assert tok.decode(ids) == "".join(parts)


# ------------------------------------------------------------------------------ special tokens


@given(st.lists(st.sampled_from([*SPECIAL_TOKENS.values(), "<unk>", "hi ", "\n"]), max_size=10))
@settings(max_examples=100, deadline=None)
def test_special_token_strings_in_text_never_encode_to_special_ids(
    tok: Tokenizer, parts: list[str]
) -> None:
    text = "".join(parts)
    ids = tok.encode(text)
    assert not set(ids) & set(tok.special_ids)
    assert tok.unk_id not in ids
    assert tok.decode(ids) == text


def test_typed_special_token_stays_plain_text(tok: Tokenizer) -> None:
    ids = tok.encode("<|user|>")
    assert ids != [tok.user_id]
    assert len(ids) > 1
    assert tok.decode(ids) == "<|user|>"


def test_special_ids_are_distinct_and_stable(tok: Tokenizer) -> None:
    expected = {
        "bos_id": 1,
        "eos_id": 2,
        "pad_id": 3,
        "system_id": 4,
        "user_id": 5,
        "assistant_id": 6,
        "eot_id": 7,
    }
    assert {name: getattr(tok, name) for name in expected} == expected
    assert tok.unk_id == 0
    assert tok.special_ids == (1, 2, 3, 4, 5, 6, 7)
    assert len(set(tok.special_ids)) == 7
    assert tok.special_tokens == {piece: i + 1 for i, piece in enumerate(SPECIAL_TOKENS.values())}
    for token_id in tok.special_ids:
        assert tok.is_control(token_id)
    assert tok.piece(tok.user_id) == "<|user|>"


def test_decode_drops_specials_unless_asked_to_keep_them(tok: Tokenizer) -> None:
    ids = [tok.bos_id, tok.user_id, *tok.encode("hi there"), tok.eot_id, tok.eos_id]
    assert tok.decode(ids) == "hi there"
    kept = tok.decode(ids, keep_special=True)
    assert kept == "<|begin_of_text|><|user|>hi there<|end_of_turn|><|end_of_text|>"


def test_decode_accepts_numpy_and_rejects_out_of_range(tok: Tokenizer) -> None:
    ids = np.asarray(tok.encode("numbers 42"), dtype=np.uint16)
    assert tok.decode(ids) == "numbers 42"
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="out of range"):
        tok.piece(-1)


# ------------------------------------------------------------------------------ properties


def test_settings_byte_fallback_split_digits_no_newline_pieces(tok: Tokenizer) -> None:
    assert tok.vocab_size == VOCAB == len(tok)
    assert sum(tok.is_byte(i) for i in range(tok.vocab_size)) == 256
    assert tok.token_id("<0x0A>") is not None
    assert tok.token_id("no such piece") is None
    pieces = [tok.piece(i) for i in range(tok.vocab_size)]
    # split digits: no piece holds two digits; lines: no piece holds a newline
    plain = [p for i, p in enumerate(pieces) if not tok.is_byte(i) and not tok.is_control(i)]
    assert not [p for p in plain if sum(c.isdigit() for c in p) > 1]
    assert not [p for i, p in enumerate(pieces) if "\n" in p and not tok.is_byte(i)]
    assert tok.splits_at_newlines
    assert tok.encode("2024") == [tok.token_id(d) for d in "2024"]


def test_encode_batch_equals_encode(tok: Tokenizer) -> None:
    texts = [*mixed_corpus(20, seed=5), *TRICKY]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, num_threads=1) == [tok.encode(t) for t in texts]
    assert tok.encode_batch([]) == []


def test_sha256_is_the_model_bytes_hash(trained: tuple[object, Tokenizer, Path]) -> None:
    _, tok, folder = trained
    digest = hashlib.sha256((folder / MODEL_FILE).read_bytes()).hexdigest()
    assert tok.sha256 == digest


# ------------------------------------------------------------------------------ training report


def test_report_measures_chars_per_token_for_english_and_chinese(
    trained: tuple[object, Tokenizer, Path],
) -> None:
    report, tok, folder = trained
    assert report.vocab_size == VOCAB
    assert set(report.chars_per_token) == {"en", "zh"}
    # English words merge into multi-character pieces; Chinese at this size stays near 1.
    assert report.chars_per_token["en"] > 2.0
    assert 0.5 < report.chars_per_token["zh"] < report.chars_per_token["en"]
    assert report.held_out and report.held_out_chars > 0
    assert report.training_chars > 10 * report.held_out_chars
    assert report.seconds > 0
    meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    assert meta["sha256"] == tok.sha256
    assert meta["vocab_size"] == VOCAB
    assert meta["special_tokens"]["<|end_of_text|>"] == tok.eos_id
    assert meta["chars_per_token"] == report.chars_per_token
    assert meta["inputs"][0]["texts"] == 400
    assert len(meta["inputs"][0]["sha256"]) == 64


def test_progress_events_report_each_phase(trained: tuple[object, Tokenizer, Path]) -> None:
    events = trained[0].events  # type: ignore[attr-defined]
    progress = [e for e in events if e.kind == "progress"]
    assert progress and all(e.data["task"] == "tokenizer" for e in progress)
    assert all(e.stage == "tokenize" for e in progress)
    phases = [e.data["phase"] for e in progress]
    assert phases[0] == "reading" and phases[-1] == "done"
    assert "training" in phases and "measuring" in phases
    assert all({"done", "total", "unit", "message"} <= set(e.data) for e in progress)


def test_held_out_slice_is_not_trained_on(tmp_path: Path) -> None:
    # A word that occurs only on held-out lines (the 2nd English line) never becomes a piece.
    rng = random.Random(2)
    lines = [" ".join(rng.choices(EN_WORDS, k=15)) for _ in range(200)]
    lines[1] = "zyx " * 500  # trained on, this would give pieces "zy", "zyx", "▁zyx"
    report = train_tokenizer(lines, 330, tmp_path)
    tok = Tokenizer.load(tmp_path)
    assert report.held_out_chars >= len(lines[1])
    assert all("zy" not in tok.piece(i) for i in range(tok.vocab_size) if "azy" not in tok.piece(i))
    assert report.chars_per_token["en"] < 1.5  # the unseen word costs about a token per letter


def test_sample_spans_the_whole_input_when_capped(tmp_path: Path) -> None:
    english = [" ".join(random.Random(i).choices(EN_WORDS, k=12)) for i in range(300)]
    chinese = ["".join(random.Random(i).choices(ZH_CHARS, k=30)) for i in range(300)]
    report = train_tokenizer(english + chinese, 400, tmp_path, max_training_chars=10_000)
    assert report.training_chars <= 10_000 + 100  # stops within a line of the cap
    assert set(report.chars_per_token) == {"en", "zh"}  # from the start and the end


def test_training_is_deterministic(tmp_path: Path) -> None:
    corpus = mixed_corpus(60, seed=3)
    first = train_tokenizer(corpus, 400, tmp_path / "a", num_threads=1)
    second = train_tokenizer(corpus, 400, tmp_path / "b", num_threads=1)
    assert first.sha256 == second.sha256


def test_sentencepiece_output_is_silenced(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    train_tokenizer(mixed_corpus(50, seed=9), 400, tmp_path)
    captured = capfd.readouterr()
    assert captured.out == ""
    assert captured.err == ""


def test_train_from_txt_and_jsonl_files(tmp_path: Path) -> None:
    corpus = mixed_corpus(80, seed=4)
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("\n".join(corpus[:40]) + "\n", encoding="utf-8")
    with (data / "b.jsonl").open("w", encoding="utf-8") as handle:
        for doc in corpus[40:]:
            handle.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
    report = train_tokenizer([data], 400, tmp_path / "tok")
    assert set(report.chars_per_token) == {"en", "zh"}
    meta = json.loads((tmp_path / "tok" / META_FILE).read_text(encoding="utf-8"))
    hashes = {Path(r["path"]).name: r["sha256"] for r in meta["inputs"]}
    assert hashes == {
        name: hashlib.sha256((data / name).read_bytes()).hexdigest()
        for name in ("a.txt", "b.jsonl")
    }


# ------------------------------------------------------------------------------ limits


def test_vocabulary_too_large_for_the_text_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"too large.*at most \d+ tokens.*--vocab-size") as info:
        train_tokenizer(["hello world, a tiny text"] * 20, 5000, tmp_path)
    assert "\n" not in str(info.value)
    assert not (tmp_path / MODEL_FILE).exists()


@pytest.mark.parametrize("size", [100, 319, 300_000])
def test_vocabulary_out_of_range_is_a_user_error(tmp_path: Path, size: int) -> None:
    with pytest.raises(UserError, match="out of range"):
        train_tokenizer(["some text"], size, tmp_path)


def test_character_coverage_below_sentencepiece_limit_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="character coverage"):
        train_tokenizer(mixed_corpus(10), 400, tmp_path, character_coverage=0.95)


def test_blank_input_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no text"):
        train_tokenizer(["   ", "\n\n"], 400, tmp_path)
    with pytest.raises(UserError, match="no text"):
        train_tokenizer([], 400, tmp_path)


def test_many_distinct_characters_fit_a_small_vocabulary(tmp_path: Path) -> None:
    rng = random.Random(1)
    han = [chr(0x4E00 + i) for i in range(1200)]
    weights = [1 / (i + 1) for i in range(len(han))]
    texts = ["".join(rng.choices(han, weights=weights, k=40)) for _ in range(400)]
    events: list = []
    report = train_tokenizer(texts, 320, tmp_path, on_event=events.append)
    tok = Tokenizer.load(tmp_path)
    assert tok.vocab_size == 320
    assert report.character_coverage < 0.9995
    assert any("rare characters" in e.data["message"] for e in events if e.kind == "note")
    rare = "".join(han[-30:])  # no piece of their own: spelled as bytes, still exact
    assert tok.decode(tok.encode(rare)) == rare
    assert len(tok.encode(rare)) == 3 * len(rare)


def test_rare_characters_keeps_sentencepiece_choice_when_it_fits() -> None:
    counts = Counter({"a": 50, "b": 30, "c": 15, "d": 5})
    assert rare_characters(counts, 0.9995, 10) == (set(), 0.9995)
    dropped, covered = rare_characters(counts, 0.9995, 2)
    assert dropped == {"c", "d"}
    assert covered == pytest.approx(0.8)


@pytest.mark.parametrize(
    ("text", "language"),
    [
        ("The quick brown fox.", "en"),
        ("我们今天学习模型。", "zh"),
        ("我们 like 中文 very much", "en"),
        ("私はカタカナと漢字を読みます", "ja"),
        ("한국어 문장입니다", "ko"),
        ("Привет, мир", "other"),
        ("123 + 456 = 579", None),
        ("", None),
    ],
)
def test_detect_language(text: str, language: str | None) -> None:
    assert detect_language(text) == language


# ------------------------------------------------------------------------------ load / save


def test_load_from_folder_file_and_run_directory(
    trained: tuple[object, Tokenizer, Path], tmp_path: Path
) -> None:
    _, tok, folder = trained
    assert Tokenizer.load(folder / MODEL_FILE).sha256 == tok.sha256
    run = tmp_path / "runs" / "pretrain-tiny"
    run.mkdir(parents=True)
    (run / "config.toml").write_text("[model]\n", encoding="utf-8")
    saved = tok.save(run)
    assert saved == run / MODEL_FILE
    assert saved.read_bytes() == (folder / MODEL_FILE).read_bytes()
    loaded = Tokenizer.load(run)
    assert loaded.sha256 == tok.sha256
    assert loaded.meta["chars_per_token"] == tok.meta["chars_per_token"]
    assert loaded.encode("模型 model 12") == tok.encode("模型 model 12")
    assert not list(run.glob(".*.tmp"))  # atomic write leaves no temp file


def test_load_errors_are_one_line_user_errors(tmp_path: Path) -> None:
    cases = {}
    cases["missing"] = tmp_path / "nope"
    empty_dir = tmp_path / "empty_dir"
    empty_dir.mkdir()
    cases["no model in folder"] = empty_dir
    empty = tmp_path / "empty.model"
    empty.write_bytes(b"")
    cases["empty"] = empty
    corrupt = tmp_path / "corrupt.model"
    corrupt.write_bytes(b"this is not a protobuf \x00\xff\x13")
    cases["corrupt"] = corrupt
    for name, path in cases.items():
        with pytest.raises(UserError) as info:
            Tokenizer.load(path)
        message = str(info.value)
        assert str(path) in message, name
        assert "\n" not in message, name


def test_plain_sentencepiece_model_is_refused(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["hello world again and again"] * 50),
        model_writer=buffer,
        model_type="bpe",
        vocab_size=300,
        byte_fallback=True,
        minloglevel=3,
    )
    path = tmp_path / "plain.model"
    path.write_bytes(buffer.getvalue())
    with pytest.raises(UserError, match=r"not a minigpt tokenizer.*<\|begin_of_text\|>"):
        Tokenizer.load(path)


# ------------------------------------------------------------------------------ CLI


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "minigpt_cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_train_prints_vocab_time_and_chars_per_token(tmp_path: Path) -> None:
    data = tmp_path / "corpus.txt"
    data.write_text("\n".join(mixed_corpus(300, seed=7)) + "\n", encoding="utf-8")
    result = run_cli(
        "tokenize", "train", "--input", data, "--vocab-size", "450", "--out", tmp_path / "tok"
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "vocabulary size: 450" in out
    assert "time:" in out
    line = next(line for line in out.splitlines() if line.startswith("characters per token"))
    assert "held-out" in line
    ratios = dict(part.split() for part in line.split(": ", 1)[1].split(", "))
    assert set(ratios) == {"en", "zh"}
    assert float(ratios["en"]) > float(ratios["zh"]) > 0
    assert Tokenizer.load(tmp_path / "tok").vocab_size == 450
    assert "training BPE" in result.stderr  # the status (plain lines: stderr is not a tty)
    assert "trainer_interface" not in result.stderr  # sentencepiece's own log stays silent


def test_cli_train_errors_exit_2_with_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "missing.txt"
    result = run_cli("tokenize", "train", "--input", missing, "--out", tmp_path / "tok")
    assert result.returncode == 2
    assert str(missing) in result.stderr
    assert "Traceback" not in result.stderr

    small = tmp_path / "small.txt"
    small.write_text("just a few words here\n", encoding="utf-8")
    result = run_cli("tokenize", "train", "-i", small, "--vocab-size", "5000", "--out", tmp_path)
    assert result.returncode == 2
    assert "too large" in result.stderr and "--vocab-size" in result.stderr
    assert "Traceback" not in result.stderr

    result = run_cli("tokenize", "train", "-i", small, "--vocab-size", "10", "--out", tmp_path)
    assert result.returncode == 2
    assert "--vocab-size" in result.stderr and "320" in result.stderr
