"""Training a tokenizer: sample the input, run sentencepiece, measure characters per token.

`train_tokenizer` samples at most `max_training_chars` of the input, holds a slice out, trains, and
measures characters per token on that slice per language, so the number printed is what the model
will see on text it was not fitted to. The settings it trains with, and why, are `tokenizer.py`'s:
the `Tokenizer` it returns is what every run loads.
"""

from __future__ import annotations

import hashlib
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import sentencepiece as spm

from minigpt_cli.config.schema import MAX_VOCAB_SIZE, MIN_VOCAB_SIZE
from minigpt_cli.engine.core.events import EventCallback, emit
from minigpt_cli.engine.data.files import expand_paths, file_sha256, iter_text_chunks
from minigpt_cli.engine.data.tokenizer import (
    META_PIECES,
    SPECIAL_TOKENS,
    UNK_PIECE,
    Tokenizer,
    default_threads,
)
from minigpt_cli.engine.resources.governor import fractional_cpu_cap, run_duty_cycled
from minigpt_cli.errors import UserError

_MAX_SAMPLE_CHARS = 4000  # training lines are cut to this (sentencepiece skips longer ones)
_MAX_SENTENCE_BYTES = 4 * _MAX_SAMPLE_CHARS + 64
_HOLDOUT_EVERY = 20  # one training sample in this many (per language) is held out
_MIN_HELD_OUT_CHARS = 10_000
_FALLBACK_MEASURE_CHARS = 200_000
MIN_CHARACTER_COVERAGE = 0.98  # sentencepiece refuses lower
_CHAR_SHARE_OF_BUDGET = 0.5  # of the non-meta vocabulary; best chars/token on built-in text
_HEARTBEAT_SECONDS = 1.0
_READ_EVENT_SECONDS = 0.25
_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\).*?<= ?(\d+)", re.S)
_TOO_SMALL = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")

_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f]")
_KANA = re.compile(r"[\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9f]")
_HANGUL = re.compile(r"[\u1100-\u11ff\u3130-\u318f\uac00-\ud7af]")
_ASCII_LETTER = re.compile(r"[A-Za-z]")
_LATIN = re.compile(r"[A-Za-z\u00c0-\u024f]")
_LETTER = re.compile(r"[^\W\d_]")


def detect_language(text: str) -> str | None:
    """The dominant script of `text` as a language label, or None when it has no letters.

    "zh" when Han characters dominate, "ja" when kana is present alongside them, "ko" for Hangul,
    "en" for Latin letters, "other" for any other alphabet. Deliberately simple: it only has to
    tell apart the slices that chars/token is reported for, not identify languages in general.
    """
    if text.isascii():  # the common case, kept fast: training samples every line
        return "en" if _ASCII_LETTER.search(text) else None
    letters = len(_LETTER.findall(text))
    if not letters:
        return None
    han = len(_HAN.findall(text))
    kana = len(_KANA.findall(text))
    if han * 2 > letters and not kana:
        return "zh"
    hangul = len(_HANGUL.findall(text))
    latin = len(_LATIN.findall(text))
    japanese = kana + han if kana * 10 >= han and kana else 0
    scores = {
        "zh": 0 if japanese else han,
        "ja": japanese,
        "ko": hangul,
        "en": latin,
        "other": max(letters - han - kana - hangul - latin, 0),
    }
    return max(scores, key=lambda name: scores[name])


@dataclass
class TokenizerReport:
    """What `train_tokenizer` did: the numbers `tokenize train` prints and tokenizer.json keeps."""

    vocab_size: int
    seconds: float
    chars_per_token: dict[str, float]
    training_chars: int
    held_out_chars: int = 0
    held_out: bool = True  # False: too little text to hold any out; measured on training text
    character_coverage: float = 0.9995  # share of the training text whose characters got a piece
    model_path: Path | None = None
    sha256: str = ""
    notes: list[str] = field(default_factory=list)


@dataclass
class _Sample:
    """The text collected for training plus the slice held out to measure chars/token."""

    train: list[str] = field(default_factory=list)
    held_out: list[tuple[str, str]] = field(default_factory=list)  # (language, text)
    fallback: list[tuple[str, str]] = field(default_factory=list)  # training lines, if needed
    fallback_chars: int = 0
    training_chars: int = 0
    held_out_chars: int = 0
    inputs: list[dict[str, Any]] = field(default_factory=list)


def _split_long(line: str) -> Iterator[str]:
    """Cut a line longer than sentencepiece accepts, at a space near the limit when there is one."""
    while len(line) > _MAX_SAMPLE_CHARS:
        cut = line.rfind(" ", _MAX_SAMPLE_CHARS // 2, _MAX_SAMPLE_CHARS)
        cut = cut if cut > 0 else _MAX_SAMPLE_CHARS
        yield line[:cut]
        line = line[cut:]
    if line:
        yield line


@dataclass
class _Source:
    chunks: Iterator[tuple[str, bool]]
    total: int | None  # size of the whole input, in `unit`, when known
    unit: str  # "B" for files (bytes), "chars" for texts
    files: list[Path]


def _open_source(inputs: Iterable[str | Path] | str | Path) -> _Source:
    """Files and folders (Path objects, read by `files.py`) or texts (plain strings)."""
    if isinstance(inputs, str | Path):  # one path, or one text
        inputs = [inputs]
    iterator = iter(inputs)
    try:
        first = next(iterator)
    except StopIteration:
        raise UserError("no text to train the tokenizer on") from None
    if isinstance(first, Path):
        paths = [first, *iterator]
        if not all(isinstance(p, Path) for p in paths):
            raise TypeError("train_tokenizer takes paths (Path) or texts (str), not a mix")
        files = expand_paths(paths, kind="pretrain")
        total = sum(f.stat().st_size for f in files)
        return _Source(iter_text_chunks(files), total, "B", files)
    total_chars = sum(len(t) for t in inputs) if isinstance(inputs, Sequence) else None
    return _Source(_texts(chain([first], iterator)), total_chars, "chars", [])


def _texts(texts: Iterator[str | Path]) -> Iterator[tuple[str, bool]]:
    """Each text as one whole chunk; checked as it comes, since a generator is read only once."""
    for text in texts:
        if not isinstance(text, str):
            raise TypeError("train_tokenizer takes paths (Path) or texts (str), not a mix")
        yield text, True


def _collect(
    inputs: Iterable[str | Path] | str | Path,
    max_training_chars: int,
    seed: int,
    on_event: EventCallback | None,
    stage: str,
) -> _Sample:
    """Read (a uniform sample of) the input as training lines plus a held-out slice.

    When the input is larger than `max_training_chars`, each line is kept with the probability
    that makes the sample about that size, so the sample spans the whole input rather than its
    first files. One line in `_HOLDOUT_EVERY` of each language is held out (the 2nd, 22nd, ...),
    so every language with two lines or more gets a measured chars/token.
    """
    source = _open_source(inputs)
    sample = _Sample()
    rng = random.Random(seed)
    held_out_cap = max(_MIN_HELD_OUT_CHARS, max_training_chars // 20)
    seen_per_language: Counter = Counter()
    keep_probability: float | None = None if source.total else 1.0
    text_digest = hashlib.sha256()
    documents = 0
    read = 0
    last_event = time.monotonic()
    _progress(on_event, stage, "reading", 0, source.total, source.unit, "reading text")
    for chunk, last in source.chunks:
        documents += int(last)
        if not source.files:
            text_digest.update(chunk.encode("utf-8"))
            text_digest.update(b"\x00" if last else b"")
        chunk_bytes = len(chunk.encode("utf-8"))
        read += chunk_bytes if source.unit == "B" else len(chunk)
        if keep_probability is None:
            # The share of the input to keep, from its size and this chunk's chars per byte.
            assert source.total is not None
            per_unit = len(chunk) / max(chunk_bytes, 1) if source.unit == "B" else 1.0
            estimated_chars = max(source.total * per_unit, 1.0)
            keep_probability = min(1.0, 1.05 * max_training_chars / estimated_chars)
        for raw_line in chunk.split("\n"):
            if not raw_line.strip():
                continue
            for line in _split_long(raw_line):
                if keep_probability < 1.0 and rng.random() >= keep_probability:
                    continue
                language = detect_language(line)
                seen_per_language[language] += 1
                if (
                    language is not None
                    and seen_per_language[language] % _HOLDOUT_EVERY == 2
                    and sample.held_out_chars < held_out_cap
                ):
                    sample.held_out.append((language, line))
                    sample.held_out_chars += len(line)
                    continue
                sample.train.append(line)
                sample.training_chars += len(line)
                if language is not None and sample.fallback_chars < _FALLBACK_MEASURE_CHARS:
                    sample.fallback.append((language, line))
                    sample.fallback_chars += len(line)
            if sample.training_chars >= max_training_chars:
                break
        now = time.monotonic()
        if now - last_event >= _READ_EVENT_SECONDS:
            last_event = now
            done = min(read, source.total) if source.total else read
            message = f"reading text: {sample.training_chars:,} characters sampled"
            _progress(on_event, stage, "reading", done, source.total, source.unit, message)
        if sample.training_chars >= max_training_chars:
            break
    if source.files:
        sample.inputs = [
            {"path": str(path), "size": path.stat().st_size, "sha256": file_sha256(path)}
            for path in source.files
        ]
    else:
        sample.inputs = [{"texts": documents, "sha256": text_digest.hexdigest()}]
    if not sample.train:
        raise UserError("no text to train the tokenizer on (the input holds only blank lines)")
    return sample


def _progress(
    on_event: EventCallback | None,
    stage: str,
    phase: str,
    done: int,
    total: int | None,
    unit: str,
    message: str,
) -> None:
    emit(
        on_event,
        "progress",
        stage,
        task="tokenizer",
        phase=phase,
        done=done,
        total=total,
        unit=unit,
        message=message,
    )


def rare_characters(
    char_counts: Counter, coverage: float, max_chars: int
) -> tuple[set[str], float]:
    """Characters to keep out of the vocabulary so at most `max_chars` of them get a piece.

    sentencepiece gives a piece to the most frequent characters until their share of the text
    reaches `coverage`, and refuses to train when those do not fit the vocabulary (nor will it take
    a coverage below 0.98). With byte fallback every character stays encodable (as its UTF-8
    bytes), so leaving the rarest out is the right answer to a small vocabulary on text with many
    distinct characters, such as Chinese. Returns (the characters left out, the share of the text
    the kept ones cover); an empty set when sentencepiece's own choice already fits.
    """
    ranked = sorted(char_counts.items(), key=lambda item: (-item[1], item[0]))
    total = sum(count for _, count in ranked)
    kept = 0
    accumulated = 0
    for _, count in ranked:  # the loop sentencepiece runs
        if accumulated / total >= coverage:
            break
        accumulated += count
        kept += 1
    if kept <= max_chars:
        return set(), min(coverage, accumulated / total) if total else coverage
    covered = sum(count for _, count in ranked[:max_chars])
    return {char for char, _ in ranked[max_chars:]}, covered / total


def _without(lines: list[str], characters: set[str]) -> list[str]:
    """`lines` split at the given characters (removing them would invent neighbours)."""
    table = dict.fromkeys(map(ord, characters), "\n")
    return [part for line in lines for part in line.translate(table).split("\n") if part]


def _trainer_options(vocab_size: int, coverage: float, num_threads: int) -> dict[str, Any]:
    return {
        "model_type": "bpe",
        "vocab_size": vocab_size,
        "character_coverage": coverage,
        "byte_fallback": True,
        "split_digits": True,
        "normalization_rule_name": "identity",
        "remove_extra_whitespaces": False,
        "add_dummy_prefix": False,
        "allow_whitespace_only_pieces": True,
        "unk_id": 0,
        "bos_id": 1,
        "eos_id": 2,
        "pad_id": 3,
        "unk_piece": UNK_PIECE,
        "bos_piece": SPECIAL_TOKENS["bos"],
        "eos_piece": SPECIAL_TOKENS["eos"],
        "pad_piece": SPECIAL_TOKENS["pad"],
        "control_symbols": [
            SPECIAL_TOKENS[name] for name in ("system", "user", "assistant", "eot")
        ],
        "input_sentence_size": 0,  # we sampled already; train on all of it
        "max_sentence_length": _MAX_SENTENCE_BYTES,
        "num_threads": num_threads,
        "minloglevel": 3,  # sentencepiece's own log would clutter the terminal
    }


class VocabularyTooLarge(UserError):
    """The text supports fewer pieces than asked; `supported` is sentencepiece's maximum."""

    def __init__(self, message: str, supported: int) -> None:
        super().__init__(message)
        self.supported = supported


def _translate_training_error(error: Exception, vocab_size: int) -> Exception:
    message = str(error)
    too_high = _TOO_HIGH.search(message)
    if too_high:
        return VocabularyTooLarge(
            f"vocabulary size {vocab_size} is too large for this training text, which supports "
            f"at most {too_high.group(2)} tokens; use a smaller --vocab-size (or more text)",
            int(too_high.group(2)),
        )
    too_small = _TOO_SMALL.search(message)
    if too_small:
        return UserError(
            f"vocabulary size {vocab_size} is too small for the characters in this text "
            f"({too_small.group(2)} pieces needed); use a larger --vocab-size "
            "or a lower --character-coverage"
        )
    return RuntimeError(f"sentencepiece could not train the tokenizer: {message}")


def _train_to_bytes(lines: list[str], options: dict[str, Any]) -> bytes:
    """sentencepiece training into memory (module-level so a worker process can run it)."""
    import io

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buffer, **options)
    return buffer.getvalue()


def _train_model(
    lines: list[str],
    options: dict[str, Any],
    on_event: EventCallback | None,
    stage: str,
    message: str,
) -> bytes:
    """Run sentencepiece in a worker thread (a paused worker process under a fractional CPU cap),
    heartbeating from this one.

    sentencepiece trains in C++ without returning to Python, so without the thread there would be
    no progress to show, and Ctrl-C would wait until training ends; here the main thread stays
    free to report elapsed time and to be interrupted (the daemon worker dies with the process).
    """
    cap_cores = fractional_cpu_cap()
    if cap_cores is not None:
        # A fractional --max-cpu: the trainer runs in a child process the governor pauses.
        def heartbeat(elapsed: float) -> None:
            seconds = int(elapsed)
            _progress(on_event, stage, "training", seconds, None, "s", f"{message} ({seconds}s)")

        try:
            return run_duty_cycled(_train_to_bytes, (lines, options), cap_cores, heartbeat)
        except RuntimeError as error:
            raise _translate_training_error(error, options["vocab_size"]) from None

    result: dict[str, Any] = {}

    def work() -> None:
        try:
            result["model"] = _train_to_bytes(lines, options)
        except Exception as error:  # handed to the main thread
            result["error"] = error

    worker = threading.Thread(target=work, name="sentencepiece-train", daemon=True)
    started = time.monotonic()
    worker.start()
    while True:
        worker.join(_HEARTBEAT_SECONDS)
        if not worker.is_alive():
            break
        elapsed = int(time.monotonic() - started)
        _progress(on_event, stage, "training", elapsed, None, "s", f"{message} ({elapsed}s)")
    if "error" in result:
        raise _translate_training_error(result["error"], options["vocab_size"]) from None
    return result["model"]


def _measure(
    tokenizer: Tokenizer, samples: list[tuple[str, str]], num_threads: int
) -> dict[str, float]:
    """Characters per token for each language among `samples`."""
    chars: Counter = Counter()
    tokens: Counter = Counter()
    texts = [text for _, text in samples]
    for (language, text), ids in zip(
        samples, tokenizer.encode_batch(texts, num_threads=num_threads), strict=True
    ):
        chars[language] += len(text)
        tokens[language] += len(ids)
    ordered = sorted(chars, key=lambda language: -chars[language])
    return {language: round(chars[language] / tokens[language], 3) for language in ordered}


def tokenizer_meta(tokenizer: Tokenizer) -> dict[str, Any]:
    """What `tokenizer.json` says of every minigpt tokenizer, trained here or imported: the
    format a loader checks and the facts a run's tokenizer is compared by. `dummy_prefix` is
    written only for a tokenizer that has one (an imported Llama 2 tokenizer): the model file
    itself holds the flag the tokenizer acts on, this says it where a person reads."""
    meta: dict[str, Any] = {
        "format": "minigpt-tokenizer",
        "version": 1,
        "model_type": "bpe",
        "vocab_size": tokenizer.vocab_size,
        "sha256": tokenizer.sha256,
        "unk_id": tokenizer.unk_id,
        "special_tokens": tokenizer.special_tokens,
        "byte_fallback": True,
        "normalization": "identity",
    }
    if tokenizer.dummy_prefix:
        meta["dummy_prefix"] = True
    return meta


def train_tokenizer(
    inputs: Iterable[str | Path] | str | Path,
    vocab_size: int,
    out_dir: str | Path,
    *,
    character_coverage: float = 0.9995,
    max_training_chars: int = 20_000_000,
    seed: int = 0,
    num_threads: int | None = None,
    on_event: EventCallback | None = None,
    stage: str = "tokenize",
) -> TokenizerReport:
    """Train a BPE tokenizer on `inputs`; write tokenizer.model and tokenizer.json into `out_dir`.

    `inputs`: Path objects (files or folders of .txt / JSONL, read by `files.py`) or plain
    strings (each one document). At most `max_training_chars` are sampled; a slice is held out to
    measure characters per token per language. Progress is reported as `progress` events (task
    "tokenizer") under `stage`. A vocabulary too large for the text is a UserError; one too small
    for its characters leaves the rarest characters out (they are encoded as bytes), with a note.
    """
    if not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
        raise UserError(
            f"vocabulary size {vocab_size} is out of range: use {MIN_VOCAB_SIZE} to "
            f"{MAX_VOCAB_SIZE} (256 byte pieces and {META_PIECES - 256} special tokens are "
            "always in it)"
        )
    if not MIN_CHARACTER_COVERAGE <= character_coverage <= 1:
        raise UserError(
            f"character coverage must be between {MIN_CHARACTER_COVERAGE} and 1 (sentencepiece's "
            f"limits), got {character_coverage}"
        )
    if max_training_chars <= 0:
        raise UserError(f"max training characters must be positive, got {max_training_chars}")
    threads = num_threads or default_threads()
    started = time.monotonic()
    sample = _collect(inputs, max_training_chars, seed, on_event, stage)
    notes: list[str] = []
    max_chars = max(1, int((vocab_size - META_PIECES) * _CHAR_SHARE_OF_BUDGET))
    rare: set[str] = set()
    coverage = character_coverage
    if len(set().union(*sample.train)) > max_chars:  # only then can characters overflow
        counts = Counter(chain.from_iterable(sample.train))
        rare, coverage = rare_characters(counts, character_coverage, max_chars)
    if rare:
        sample.train = _without(sample.train, rare)
        note = (
            f"{len(rare):,} rare characters ({100 * (1 - coverage):.2f}% of the text) get no "
            f"piece of their own, to leave room for merges in a {vocab_size}-token vocabulary; "
            "they are encoded as UTF-8 bytes"
        )
        notes.append(note)
        emit(on_event, "note", stage, message=note)
    message = f"training BPE: {vocab_size:,} tokens on {sample.training_chars:,} characters"
    _progress(on_event, stage, "training", 0, None, "s", message)
    model_bytes = _train_model(
        sample.train,
        _trainer_options(vocab_size, character_coverage, threads),
        on_event,
        stage,
        message,
    )
    sample.train = []  # free the training text before measuring
    tokenizer = Tokenizer(model_bytes, source="<trained>")
    _progress(on_event, stage, "measuring", 0, None, "s", "measuring characters per token")
    held_out = bool(sample.held_out)
    chars_per_token = _measure(tokenizer, sample.held_out if held_out else sample.fallback, threads)
    if not held_out:
        notes.append("too little text to hold a slice out: chars/token measured on training text")
    seconds = time.monotonic() - started
    folder = Path(out_dir)
    meta = {
        **tokenizer_meta(tokenizer),
        "split_digits": True,
        "character_coverage": {"requested": character_coverage, "used": coverage},
        "training_chars": sample.training_chars,
        "held_out_chars": sample.held_out_chars,
        "chars_per_token": chars_per_token,
        "chars_per_token_measured_on": "held-out" if held_out else "training",
        "max_training_chars": max_training_chars,
        "seed": seed,
        "seconds": round(seconds, 3),
        "inputs": sample.inputs,
    }
    tokenizer.meta = meta
    model_path = tokenizer.save(folder)
    _progress(on_event, stage, "done", 1, 1, "step", f"tokenizer trained in {seconds:.1f}s")
    return TokenizerReport(
        vocab_size=tokenizer.vocab_size,
        seconds=seconds,
        chars_per_token=chars_per_token,
        training_chars=sample.training_chars,
        held_out_chars=sample.held_out_chars,
        held_out=held_out,
        character_coverage=coverage,
        model_path=model_path,
        sha256=tokenizer.sha256,
        notes=notes,
    )
