"""The tokenizer: sentencepiece BPE that gives back exactly the text it was given.

Why these settings (DESIGN.md "Tokenizer and chat format"):

- identity normalisation, no dummy prefix, no whitespace squeezing, byte fallback:
  `decode(encode(x)) == x` for any Unicode text, so bits per byte are honest and nothing a user
  types is altered. The one character sentencepiece cannot round-trip on its own is U+2581 (its
  stand-in for a space); `encode` spells a literal one as its three UTF-8 byte pieces instead.
- digits split: arithmetic in the built-in data is learned digit by digit, not as memorised chunks.
- reserved special tokens are *control* symbols: sentencepiece never produces them from text, so a
  user typing "<|user|>" gets plain text, and only the chat template can emit a turn marker.
- training text is fed as lines, so no piece ever contains a newline: a document can be encoded
  line by line (in parallel, in chunks) and give exactly the ids of encoding it whole.

`train_tokenizer` samples at most `max_training_chars` of the input, holds a slice out, trains, and
measures characters per token on that slice per language, so the number printed is what the model
will see on text it was not fitted to.
"""

from __future__ import annotations

import hashlib
import json
import os
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
from minigpt_cli.engine.core.io import atomic_write_bytes, atomic_write_text
from minigpt_cli.errors import UserError

MODEL_FILE = "tokenizer.model"
META_FILE = "tokenizer.json"

UNK_PIECE = "<unk>"
# Reserved special tokens, in id order after <unk> (id 0): ids 1..7 in every minigpt tokenizer.
SPECIAL_TOKENS: dict[str, str] = {
    "bos": "<|begin_of_text|>",
    "eos": "<|end_of_text|>",
    "pad": "<|pad|>",
    "system": "<|system|>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
    "eot": "<|end_of_turn|>",
}
# unk + the reserved specials + 256 byte-fallback pieces: what every vocabulary holds before any
# character or merge.
META_PIECES = 1 + len(SPECIAL_TOKENS) + 256

_SPACE_SYMBOL = "\u2581"  # sentencepiece's visible space; a literal one is encoded as bytes
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


def default_threads() -> int:
    """The threads the CPU cap allows, else the CPUs this process may run on (taskset/cgroup)."""
    from minigpt_cli.engine.hardware.monitor import thread_budget

    budget = thread_budget()
    if budget is not None:
        return budget
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


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


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------


class Tokenizer:
    """A trained minigpt tokenizer: encode/decode text, special-token ids, identity (sha256)."""

    unk_id: int
    bos_id: int
    eos_id: int
    pad_id: int
    system_id: int
    user_id: int
    assistant_id: int
    eot_id: int

    def __init__(
        self, model_bytes: bytes, *, source: str | Path = "<memory>", meta: dict | None = None
    ) -> None:
        """Load a serialized sentencepiece model; `source` names it in error messages."""
        if not model_bytes:
            raise UserError(f"{source}: empty tokenizer file")
        processor = spm.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(model_bytes)
        except (RuntimeError, OSError, ValueError) as error:
            raise UserError(
                f"{source}: not a sentencepiece tokenizer model (corrupt or wrong file: {error})"
            ) from None
        size = processor.GetPieceSize()
        if size <= META_PIECES:
            raise UserError(f"{source}: not a minigpt tokenizer (only {size} pieces)")
        self._sp = processor
        self._bytes = bytes(model_bytes)
        self._sha256 = hashlib.sha256(self._bytes).hexdigest()
        self.source = str(source)
        self.meta: dict[str, Any] = dict(meta or {})
        self.unk_id = self._required_id(UNK_PIECE, control=False)
        for name, piece in SPECIAL_TOKENS.items():
            setattr(self, f"{name}_id", self._required_id(piece, control=True))
        self._special_names = {self._id_of(piece): piece for piece in SPECIAL_TOKENS.values()}
        self.special_ids: tuple[int, ...] = tuple(sorted(self._special_names))
        # The three byte pieces that spell a literal U+2581, which plain sentencepiece would
        # turn into a space on decode.
        self._space_symbol_ids = [
            self._required_byte(value) for value in _SPACE_SYMBOL.encode("utf-8")
        ]
        # When no piece holds a newline, line-by-line encoding equals whole-text encoding.
        self.splits_at_newlines = not any(
            "\n" in processor.IdToPiece(i) for i in range(size) if not processor.IsByte(i)
        )

    # ---------------------------------------------------------------------------- loading

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Open a tokenizer: a folder holding tokenizer.model (a tokenizer or run dir) or the file.

        Every problem (missing, empty, corrupt, not a minigpt tokenizer) is a one-line UserError.
        """
        given = Path(path).expanduser()
        if given.is_dir():
            model_path = given / MODEL_FILE
            if not model_path.is_file():
                raise UserError(
                    f"{given}: no {MODEL_FILE} in this folder "
                    "(train one with `minigpt tokenize train`)"
                )
        elif given.is_file():
            model_path = given
        else:
            raise UserError(f"{given}: no such tokenizer file or folder")
        try:
            data = model_path.read_bytes()
        except OSError as error:
            raise UserError(f"{model_path}: cannot read tokenizer: {error.strerror}") from None
        meta: dict | None = None
        meta_path = model_path.with_name(META_FILE)
        if meta_path.is_file():
            try:
                loaded = json.loads(meta_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                loaded = None  # the meta is informational; the model file is the truth
            if (
                isinstance(loaded, dict)
                and loaded.get("sha256") == hashlib.sha256(data).hexdigest()
            ):
                meta = loaded
        return cls(data, source=model_path, meta=meta)

    def _id_of(self, piece: str) -> int:
        return int(self._sp.PieceToId(piece))

    def _required_id(self, piece: str, control: bool) -> int:
        token_id = self._id_of(piece)
        found = self._sp.IdToPiece(token_id) == piece
        if not found or (control and not self._sp.IsControl(token_id)):
            raise UserError(
                f"{self.source}: not a minigpt tokenizer (special token {piece} is missing); "
                "train one with `minigpt tokenize train`"
            )
        return token_id

    def _required_byte(self, value: int) -> int:
        piece = f"<0x{value:02X}>"
        token_id = self._id_of(piece)
        if self._sp.IdToPiece(token_id) != piece or not self._sp.IsByte(token_id):
            raise UserError(f"{self.source}: not a minigpt tokenizer (no byte fallback)")
        return token_id

    # ---------------------------------------------------------------------------- identity

    @property
    def vocab_size(self) -> int:
        """Number of ids (pieces), specials included: the model's embedding rows."""
        return int(self._sp.GetPieceSize())

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def sha256(self) -> str:
        """Hash of the model bytes: token shards and runs record it to detect a tokenizer swap."""
        return self._sha256

    @property
    def model_bytes(self) -> bytes:
        """The serialized sentencepiece model, exactly as saved."""
        return self._bytes

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special token name (e.g. "<|user|>") -> id."""
        return {piece: token_id for token_id, piece in self._special_names.items()}

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, sha256={self.sha256[:12]}...)"

    # ---------------------------------------------------------------------------- encode / decode

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; never a special id, whatever characters the text holds."""
        if _SPACE_SYMBOL not in text:
            return list(self._sp.EncodeAsIds(text))
        ids: list[int] = []
        for index, part in enumerate(text.split(_SPACE_SYMBOL)):
            if index:
                ids.extend(self._space_symbol_ids)
            if part:
                ids.extend(self._sp.EncodeAsIds(part))
        return ids

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        """`[encode(t) for t in texts]`, computed by sentencepiece's threads (same ids)."""
        texts = list(texts)
        if not texts:
            return []
        threads = num_threads or default_threads()
        plain = [i for i, text in enumerate(texts) if _SPACE_SYMBOL not in text]
        out: list[list[int]] = [[] for _ in texts]
        if plain:
            encoded = self._sp.Encode([texts[i] for i in plain], out_type=int, num_threads=threads)
            for i, ids in zip(plain, encoded, strict=True):
                out[i] = ids
        if len(plain) != len(texts):
            for i, text in enumerate(texts):
                if _SPACE_SYMBOL in text:
                    out[i] = self.encode(text)
        return out

    def decode(self, ids: Iterable[int], keep_special: bool = False) -> str:
        """Text of `ids`. Special ids are dropped, or shown by name with `keep_special=True`.

        A byte sequence that is not valid UTF-8 (a cut-off character) becomes U+FFFD.
        """
        values = ids.tolist() if hasattr(ids, "tolist") else list(ids)  # numpy arrays too
        values = [int(v) for v in values]
        size = self.vocab_size
        for value in values:
            if not 0 <= value < size:
                raise ValueError(f"token id {value} is out of range (vocabulary size {size})")
        if not keep_special:
            return self._sp.DecodeIds(values)
        parts: list[str] = []
        run: list[int] = []
        for value in values:
            if value in self._special_names:
                parts.append(self._sp.DecodeIds(run))
                parts.append(self._special_names[value])
                run = []
            else:
                run.append(value)
        parts.append(self._sp.DecodeIds(run))
        return "".join(parts)

    # ---------------------------------------------------------------------------- inspection

    def piece(self, token_id: int) -> str:
        """The vocabulary entry of `token_id` as sentencepiece stores it (space shown as U+2581)."""
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(
                f"token id {token_id} is out of range (vocabulary size {self.vocab_size})"
            )
        return str(self._sp.IdToPiece(int(token_id)))

    def token_id(self, piece: str) -> int | None:
        """The id of a vocabulary entry, or None when there is no such piece."""
        token_id = self._id_of(piece)
        return token_id if self._sp.IdToPiece(token_id) == piece else None

    def is_control(self, token_id: int) -> bool:
        """True for special (control) tokens, which decode to nothing."""
        return bool(self._sp.IsControl(int(token_id)))

    def is_byte(self, token_id: int) -> bool:
        """True for the 256 byte-fallback pieces `<0x00>`..`<0xFF>`."""
        return bool(self._sp.IsByte(int(token_id)))

    # ---------------------------------------------------------------------------- saving

    def save(self, directory: str | Path) -> Path:
        """Write tokenizer.model (and its tokenizer.json, when known) into `directory`, atomically.

        Returns the model file's path.
        """
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / MODEL_FILE
        atomic_write_bytes(target, self._bytes)
        if self.meta:
            atomic_write_text(
                folder / META_FILE, json.dumps(self.meta, indent=2, ensure_ascii=False)
            )
        return target


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


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


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in blocks (any size, bounded memory)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class _Source:
    chunks: Iterator[tuple[str, bool]]
    total: int | None  # size of the whole input, in `unit`, when known
    unit: str  # "B" for files (bytes), "chars" for texts
    files: list[Path]


def _open_source(inputs: Iterable[str | Path] | str | Path) -> _Source:
    """Files and folders (Path objects, read by the data module) or texts (plain strings)."""
    if isinstance(inputs, str | Path):  # one path, or one text
        inputs = [inputs]
    iterator = iter(inputs)
    try:
        first = next(iterator)
    except StopIteration:
        raise UserError("no text to train the tokenizer on") from None
    if isinstance(first, Path):
        from minigpt_cli.engine.data.records import expand_paths, iter_text_chunks

        paths = [first, *iterator]
        if not all(isinstance(p, Path) for p in paths):
            raise TypeError("train_tokenizer takes paths (Path) or texts (str), not a mix")
        files = expand_paths(paths, kind="pretrain")
        total = sum(f.stat().st_size for f in files)
        return _Source(iter_text_chunks(files), total, "B", files)
    total_chars = sum(len(t) for t in inputs) if isinstance(inputs, Sequence) else None
    texts = chain([first], iterator)
    return _Source(((text, True) for text in texts), total_chars, "chars", [])


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
    from minigpt_cli.engine.resources.governor import fractional_cpu_cap, run_duty_cycled

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

    `inputs`: Path objects (files or folders of .txt / JSONL, read by the data module) or plain
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
        "format": "minigpt-tokenizer",
        "version": 1,
        "model_type": "bpe",
        "vocab_size": tokenizer.vocab_size,
        "sha256": tokenizer.sha256,
        "unk_id": tokenizer.unk_id,
        "special_tokens": tokenizer.special_tokens,
        "byte_fallback": True,
        "split_digits": True,
        "normalization": "identity",
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
