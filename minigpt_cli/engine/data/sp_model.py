"""A sentencepiece model file read and edited as protobuf, without the protobuf package.

The tokenizer (`tokenizer.py`) reads one flag here: a model with a dummy prefix (Llama 2's) is
run by a copy with the flag cleared (`without_dummy_prefix`), so that minigpt decides where a
text starts.

`minigpt import` keeps a checkpoint's tokenizer as a sentencepiece model, the one form minigpt's
`Tokenizer` loads, and sometimes has to change it: give the checkpoint's own begin/end-of-text
pieces minigpt's names, append the chat pieces it lacks, or build the model from a
`tokenizer.json`. sentencepiece's Python package ships `sentencepiece_model_pb2` for that, but it
needs the `protobuf` package, which minigpt does not depend on. The file's format is small and
stable (`sentencepiece_model.proto`): a `ModelProto` is a list of fields; field 1 (repeated) is a
piece (1: text, 2: score as a float, 3: type), field 2 the trainer spec, field 3 the normaliser
spec. So this module reads and writes protobuf's wire format for those fields only and keeps every
other field's bytes as they were: an edited model differs from the original only where it was
edited, and sentencepiece itself loads it (the caller checks by loading it into a `Tokenizer`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

# Piece types (ModelProto.SentencePiece.Type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
TYPE_NAMES = {1: "normal", 2: "unknown", 3: "control", 4: "user-defined", 5: "unused", 6: "byte"}

# TrainerSpec.ModelType.
UNIGRAM, BPE, WORD, CHAR = 1, 2, 3, 4
MODEL_TYPE_NAMES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}

_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5

# Field numbers used here (sentencepiece_model.proto).
_MODEL_PIECES, _MODEL_TRAINER, _MODEL_NORMALIZER = 1, 2, 3
_PIECE_TEXT, _PIECE_SCORE, _PIECE_TYPE = 1, 2, 3
TRAINER_MODEL_TYPE = 3
TRAINER_VOCAB_SIZE = 4
TRAINER_TREAT_WHITESPACE_AS_SUFFIX = 24
TRAINER_BYTE_FALLBACK = 35
TRAINER_UNK_ID, TRAINER_BOS_ID, TRAINER_EOS_ID, TRAINER_PAD_ID = 40, 41, 42, 43
TRAINER_BOS_PIECE, TRAINER_EOS_PIECE, TRAINER_PAD_PIECE = 46, 47, 48
NORMALIZER_NAME, NORMALIZER_CHARSMAP = 1, 2
NORMALIZER_ADD_DUMMY_PREFIX, NORMALIZER_REMOVE_EXTRA_WHITESPACES = 3, 4
NORMALIZER_ESCAPE_WHITESPACES = 5

# Field -> the proto's default, for the fields read here (an absent field has its default).
_TRAINER_DEFAULTS: dict[int, int] = {
    TRAINER_MODEL_TYPE: UNIGRAM,
    TRAINER_TREAT_WHITESPACE_AS_SUFFIX: 0,
    TRAINER_BYTE_FALLBACK: 0,
}
_NORMALIZER_DEFAULTS: dict[int, int] = {
    NORMALIZER_ADD_DUMMY_PREFIX: 1,
    NORMALIZER_REMOVE_EXTRA_WHITESPACES: 1,
    NORMALIZER_ESCAPE_WHITESPACES: 1,
}

Field = tuple[int, int, int | bytes]
"""(field number, wire type, value): an int for varints, the raw bytes otherwise."""


class ProtoError(ValueError):
    """The bytes are not a protobuf message of the expected shape."""


def _read_varint(data: bytes, position: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if position >= len(data) or shift > 63:
            raise ProtoError("truncated varint")
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # negative int32/int64 are ten-byte two's complement varints
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def parse(data: bytes) -> list[Field]:
    """A message's top-level fields, in file order."""
    fields: list[Field] = []
    position = 0
    while position < len(data):
        key, position = _read_varint(data, position)
        number, wire = key >> 3, key & 7
        value: int | bytes
        if wire == _VARINT:
            value, position = _read_varint(data, position)
        elif wire == _LEN:
            length, position = _read_varint(data, position)
            if position + length > len(data):
                raise ProtoError("truncated field")
            value, position = data[position : position + length], position + length
        elif wire in (_FIXED32, _FIXED64):
            size = 4 if wire == _FIXED32 else 8
            if position + size > len(data):
                raise ProtoError("truncated field")
            value, position = data[position : position + size], position + size
        else:
            raise ProtoError(f"unsupported wire type {wire}")
        if number == 0:
            raise ProtoError("field number 0")
        fields.append((number, wire, value))
    return fields


def serialise(fields: list[Field]) -> bytes:
    """The inverse of `parse`."""
    out = bytearray()
    for number, wire, value in fields:
        out += _varint(number << 3 | wire)
        if wire == _VARINT:
            assert isinstance(value, int)
            out += _varint(value)
        else:
            assert isinstance(value, bytes)
            if wire == _LEN:
                out += _varint(len(value))
            out += value
    return bytes(out)


Value = int | bytes | None


def _get(fields: list[Field], number: int, default: Value = None) -> Value:
    """The last value of field `number` (protobuf's rule for a repeated scalar), else `default`."""
    found = [value for field_number, _, value in fields if field_number == number]
    return found[-1] if found else default


def _set(fields: list[Field], number: int, wire: int, value: int | bytes) -> list[Field]:
    """`fields` with field `number` set to `value`, where it was (appended when absent)."""
    updated: list[Field] = []
    for item in fields:
        if item[0] != number:
            updated.append(item)
        elif all(other[0] != number for other in updated):
            updated.append((number, wire, value))
    if all(item[0] != number for item in updated):
        updated.append((number, wire, value))
    return updated


@dataclass
class Piece:
    """One vocabulary entry: its text (U+2581 for a space), score and type."""

    text: str
    score: float = 0.0
    type: int = NORMAL
    raw: bytes | None = field(default=None, compare=False, repr=False)
    """The bytes it was read from; written back as they were unless the piece was changed."""

    def encode(self) -> bytes:
        if self.raw is not None and Piece.decode(self.raw) == self:
            return self.raw
        fields: list[Field] = [
            (_PIECE_TEXT, _LEN, self.text.encode("utf-8")),
            (_PIECE_SCORE, _FIXED32, struct.pack("<f", self.score)),
        ]
        if self.type != NORMAL:  # sentencepiece leaves the default out
            fields.append((_PIECE_TYPE, _VARINT, self.type))
        return serialise(fields)

    @classmethod
    def decode(cls, data: bytes) -> Piece:
        fields = parse(data)
        text = _get(fields, _PIECE_TEXT, b"")
        score = _get(fields, _PIECE_SCORE, struct.pack("<f", 0.0))
        kind = _get(fields, _PIECE_TYPE, NORMAL)
        if not isinstance(text, bytes) or not isinstance(score, bytes) or len(score) != 4:
            raise ProtoError("malformed piece")
        value = struct.unpack("<f", score)[0]
        return cls(text.decode("utf-8"), value, int(kind or NORMAL), raw=bytes(data))


@dataclass
class SentencePieceModel:
    """A sentencepiece `ModelProto`: its pieces, trainer and normaliser specs, other fields kept."""

    pieces: list[Piece]
    trainer: list[Field] = field(default_factory=list)
    normalizer: list[Field] = field(default_factory=list)
    rest: list[Field] = field(default_factory=list)
    """Every other top-level field (self-test data, denormaliser), written back unchanged."""

    @classmethod
    def from_bytes(cls, data: bytes) -> SentencePieceModel:
        """Read a serialised model; `ProtoError` when it is not one."""
        pieces: list[Piece] = []
        trainer: list[Field] = []
        normalizer: list[Field] = []
        rest: list[Field] = []
        try:
            for number, wire, value in parse(data):
                if number == _MODEL_PIECES and isinstance(value, bytes):
                    pieces.append(Piece.decode(value))
                elif number == _MODEL_TRAINER and isinstance(value, bytes):
                    trainer = parse(value)
                elif number == _MODEL_NORMALIZER and isinstance(value, bytes):
                    normalizer = parse(value)
                else:
                    rest.append((number, wire, value))
        except UnicodeDecodeError as error:
            raise ProtoError("a piece is not UTF-8") from error
        if not pieces:
            raise ProtoError("no pieces")
        return cls(pieces, trainer, normalizer, rest)

    def to_bytes(self) -> bytes:
        fields: list[Field] = [(_MODEL_PIECES, _LEN, piece.encode()) for piece in self.pieces]
        fields.append((_MODEL_TRAINER, _LEN, serialise(self.trainer)))
        fields.append((_MODEL_NORMALIZER, _LEN, serialise(self.normalizer)))
        return serialise(fields + self.rest)

    # ------------------------------------------------------------------ the specs, read

    def trainer_int(self, number: int) -> int:
        value = _get(self.trainer, number, _TRAINER_DEFAULTS.get(number, 0))
        return int(value) if isinstance(value, int) else 0

    def normalizer_flag(self, number: int) -> bool:
        value = _get(self.normalizer, number, _NORMALIZER_DEFAULTS.get(number, 0))
        return bool(value)

    def normalizer_name(self) -> str:
        value = _get(self.normalizer, NORMALIZER_NAME, b"")
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else ""

    def has_charsmap(self) -> bool:
        value = _get(self.normalizer, NORMALIZER_CHARSMAP, b"")
        return isinstance(value, bytes) and len(value) > 0

    # ------------------------------------------------------------------ edits

    def set_trainer(self, number: int, value: int | str) -> None:
        """Set a trainer-spec field (an int32 id or a piece name); unchanged bytes when it
        already holds the value."""
        current = _get(self.trainer, number)
        if current == (value.encode("utf-8") if isinstance(value, str) else value):
            return
        if isinstance(value, str):
            self.trainer = _set(self.trainer, number, _LEN, value.encode("utf-8"))
        else:
            self.trainer = _set(self.trainer, number, _VARINT, value)


def minigpt_normalizer(*, dummy_prefix: bool = False) -> list[Field]:
    """The normaliser minigpt trains with (`tokenizer_training`): identity, no dummy prefix, no
    whitespace squeezing, spaces written as U+2581; with `dummy_prefix`, Llama 2's (the same but
    the prefix)."""
    return [
        (NORMALIZER_NAME, _LEN, b"identity"),
        (NORMALIZER_ADD_DUMMY_PREFIX, _VARINT, int(dummy_prefix)),
        (NORMALIZER_REMOVE_EXTRA_WHITESPACES, _VARINT, 0),
        (NORMALIZER_ESCAPE_WHITESPACES, _VARINT, 1),
    ]


def bpe_trainer(vocab_size: int, unk_id: int) -> list[Field]:
    """A trainer spec for a BPE model built rather than trained: the fields encoding reads
    (model type, byte fallback, the unknown piece's id); the other ids unset (-1)."""
    return [
        (TRAINER_MODEL_TYPE, _VARINT, BPE),
        (TRAINER_VOCAB_SIZE, _VARINT, vocab_size),
        (TRAINER_BYTE_FALLBACK, _VARINT, 1),
        (TRAINER_UNK_ID, _VARINT, unk_id),
        (TRAINER_BOS_ID, _VARINT, -1),
        (TRAINER_EOS_ID, _VARINT, -1),
        (TRAINER_PAD_ID, _VARINT, -1),
    ]


def _normalizer_span(data: bytes) -> tuple[int, int, bytes]:
    """(start, end, payload) of the top-level normaliser spec field of a serialised model (the
    last one, protobuf's rule; (len, len, b"") when absent). Walks the fields reading only keys
    and lengths: a 32k-piece model in milliseconds, where `SentencePieceModel` decodes every
    piece."""
    position, found = 0, (len(data), len(data), b"")
    while position < len(data):
        start = position
        key, position = _read_varint(data, position)
        wire = key & 7
        if wire == _LEN:
            length, position = _read_varint(data, position)
            end = position + length
            if end > len(data):
                raise ProtoError("truncated field")
            if key >> 3 == _MODEL_NORMALIZER:
                found = (start, end, data[position:end])
            position = end
        elif wire == _VARINT:
            _, position = _read_varint(data, position)
        elif wire in (_FIXED32, _FIXED64):
            position += 4 if wire == _FIXED32 else 8
        else:
            raise ProtoError(f"unsupported wire type {wire}")
    return found


def has_dummy_prefix(data: bytes) -> bool:
    """Whether the serialised model's normaliser adds a dummy prefix (sentencepiece's default,
    Llama 2's tokenizer): "▁" before the text, so "Hello" encodes as "▁Hello"."""
    return without_dummy_prefix(data) is not None


def without_dummy_prefix(data: bytes) -> bytes | None:
    """The serialised model with `normalizer_spec.add_dummy_prefix` cleared, every other byte as
    it was, or None when the flag is not set. The copy encodes `text` as the original encodes
    it minus the prefix, so the original's ids of a text are the copy's ids of " " + text (of a
    text that is not empty: sentencepiece prefixes nothing to nothing)."""
    start, end, payload = _normalizer_span(data)
    spec = parse(payload)
    default = _NORMALIZER_DEFAULTS[NORMALIZER_ADD_DUMMY_PREFIX]
    if not _get(spec, NORMALIZER_ADD_DUMMY_PREFIX, default):
        return None
    spec = _set(spec, NORMALIZER_ADD_DUMMY_PREFIX, _VARINT, 0)
    return data[:start] + serialise([(_MODEL_NORMALIZER, _LEN, serialise(spec))]) + data[end:]
