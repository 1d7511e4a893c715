"""The tokenizer: sentencepiece BPE that gives back exactly the text it was given.

Why these settings:

- identity normalisation, no dummy prefix, no whitespace squeezing, byte fallback:
  `decode(encode(x)) == x` for any Unicode text, so bits per byte are honest and nothing a user
  types is altered. The one character sentencepiece cannot round-trip on its own is U+2581 (its
  stand-in for a space); `encode` spells a literal one as its three UTF-8 byte pieces instead.
- digits split: arithmetic in the built-in data is learned digit by digit, not as memorised chunks.
- reserved special tokens are *control* symbols: sentencepiece never produces them from text, so a
  user typing "<|user|>" gets plain text, and only the chat template can emit a turn marker.
- training text is fed as lines, so no piece ever contains a newline: a document can be encoded
  line by line (in parallel, in chunks) and give exactly the ids of encoding it whole.

A tokenizer imported from a Llama checkpoint (`minigpt import`) may have sentencepiece's dummy
prefix (Llama 2's, TinyLlama's, Mistral's tokenizer.model): "▁" before a text, so "Hello" is
"▁Hello". The model file keeps the flag (`dummy_prefix`; every tokenizer minigpt trains has it
off, and nothing changes for them), but sentencepiece would put the prefix before every piece of
text it is handed, and minigpt hands it pieces that do not start a text: the lines of a document
(shards), the rest of a reply cut at a stop string. So the flag is cleared in the processor that
encodes, and `encode` adds the prefix itself, as a space before the text, where a text starts
(exactly sentencepiece's ids, `tests/test_import.py`): at the start of a document, and of each
segment between special tokens, since special tokens are not text (each message of the chat
template, as Hugging Face's `tokenizer.json` with a Prepend normaliser and llama.cpp's
`add_space_prefix` both encode it). `encode(..., continuation=True)` is text that continues
earlier text: no prefix. `decode` drops the prefix's space at the start of each segment, as
sentencepiece does at the start of a text, so `decode(encode(x)) == x` still holds.

Training one (sampling the input, sentencepiece's options, measuring chars/token) is
`tokenizer_training.py`; this module is what every run loads.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm

from minigpt_cli.engine.core.io import atomic_write_bytes, atomic_write_text, make_dir
from minigpt_cli.engine.data import sp_model
from minigpt_cli.engine.hardware.monitor import thread_budget
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


def _without_dummy_prefix(
    processor: spm.SentencePieceProcessor, model_bytes: bytes, source: str | Path
) -> bytes | None:
    """The model with its dummy prefix cleared (`sp_model.without_dummy_prefix`), or None when it
    has none. The file is read only when encoding "a" shows a leading "▁": a model without the
    prefix (every one minigpt trains) is never parsed, so loading it costs what it did."""
    pieces = processor.EncodeAsPieces("a")
    if not pieces or not str(pieces[0]).startswith(_SPACE_SYMBOL):
        return None
    try:
        return sp_model.without_dummy_prefix(model_bytes)
    except sp_model.ProtoError as error:
        raise UserError(f"{source}: not a sentencepiece tokenizer model ({error})") from None


def default_threads() -> int:
    """The threads the CPU cap allows, else the CPUs this process may run on (taskset/cgroup)."""
    budget = thread_budget()
    if budget is not None:
        return budget
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


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
        self._sp = processor  # encodes (never adds a prefix)
        self._sp_decode = processor  # decodes (drops a dummy prefix's space at a text's start)
        cleared = _without_dummy_prefix(processor, model_bytes, source)
        self.dummy_prefix = cleared is not None
        """Whether a text starts with sentencepiece's dummy prefix (see the module docstring)."""
        self._segment_ends: frozenset[int] = frozenset()  # ids after which a text starts
        if cleared is not None:
            self._sp = spm.SentencePieceProcessor()
            self._sp.LoadFromSerializedProto(cleared)
            self._segment_ends = frozenset(i for i in range(size) if processor.IsControl(i))
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

    def encode(self, text: str, *, continuation: bool = False) -> list[int]:
        """Token ids of `text`; never a special id, whatever characters the text holds.

        With a dummy prefix (see the module docstring) a text starts with it unless
        `continuation` says the text continues earlier text (the next line of a document, the
        rest of a reply); without one, `continuation` changes nothing.
        """
        if self.dummy_prefix and text and not continuation:
            text = " " + text
        if _SPACE_SYMBOL not in text:
            return list(self._sp.EncodeAsIds(text))
        ids: list[int] = []
        for index, part in enumerate(text.split(_SPACE_SYMBOL)):
            if index:
                ids.extend(self._space_symbol_ids)
            if part:
                ids.extend(self._sp.EncodeAsIds(part))
        return ids

    def encode_batch(
        self,
        texts: Sequence[str],
        num_threads: int | None = None,
        *,
        continuation: Sequence[bool] | None = None,
    ) -> list[list[int]]:
        """`[encode(t, continuation=c) for t, c in zip(texts, continuation)]` (no text a
        continuation when `continuation` is None), computed by sentencepiece's threads (same
        ids)."""
        texts = list(texts)
        if not texts:
            return []
        if self.dummy_prefix:
            flags = list(continuation) if continuation is not None else [False] * len(texts)
            if len(flags) != len(texts):
                raise ValueError(f"{len(flags)} continuation flags for {len(texts)} texts")
            texts = [
                " " + text if text and not flag else text
                for text, flag in zip(texts, flags, strict=True)
            ]
        threads = num_threads or default_threads()
        plain = [i for i, text in enumerate(texts) if _SPACE_SYMBOL not in text]
        out: list[list[int]] = [[] for _ in texts]
        if plain:
            encoded = self._sp.Encode([texts[i] for i in plain], out_type=int, num_threads=threads)
            for i, ids in zip(plain, encoded, strict=True):
                out[i] = ids
        if len(plain) != len(texts):
            for i, text in enumerate(texts):
                if _SPACE_SYMBOL in text:  # any prefix is already there
                    out[i] = self.encode(text, continuation=True)
        return out

    def decode(self, ids: Iterable[int], keep_special: bool = False) -> str:
        """Text of `ids`. Special ids are dropped, or shown by name with `keep_special=True`.

        A byte sequence that is not valid UTF-8 (a cut-off character) becomes U+FFFD. With a
        dummy prefix, the space it stands for is dropped at the start of `ids` and after every
        control id (where `encode` puts one: the start of a text or segment).
        """
        values = ids.tolist() if hasattr(ids, "tolist") else list(ids)  # numpy arrays too
        values = [int(v) for v in values]
        size = self.vocab_size
        for value in values:
            if not 0 <= value < size:
                raise ValueError(f"token id {value} is out of range (vocabulary size {size})")
        if not keep_special and self._segment_ends.isdisjoint(values):
            return self._sp_decode.DecodeIds(values)
        decoder = self._sp_decode
        parts: list[str] = []
        run: list[int] = []
        for value in values:
            if value in self._special_names or value in self._segment_ends:
                parts.append(decoder.DecodeIds(run))
                if keep_special:
                    parts.append(self._special_names.get(value, ""))
                run = []
            else:
                run.append(value)
        parts.append(decoder.DecodeIds(run))
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

    def score(self, token_id: int) -> float:
        """The piece's sentencepiece score: for BPE, minus its merge rank (a higher score merges
        first). An export that re-implements the encoder (GGUF for llama.cpp) needs it."""
        return float(self._sp.GetScore(int(token_id)))

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
        make_dir(folder)
        target = folder / MODEL_FILE
        atomic_write_bytes(target, self._bytes)
        if self.meta:
            atomic_write_text(
                folder / META_FILE, json.dumps(self.meta, indent=2, ensure_ascii=False)
            )
        return target
