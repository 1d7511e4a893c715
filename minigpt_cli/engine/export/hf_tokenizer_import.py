"""A Hugging Face folder's tokenizer made into a minigpt tokenizer, exactly or not at all.

minigpt's tokenizer is a sentencepiece BPE model with byte fallback, minigpt's normalisation
(identity, no whitespace squeezing; a dummy prefix or none) and seven reserved control pieces
(`data/tokenizer.py`); everything downstream relies on those properties (line-by-line encoding of
corpora, `decode(encode(x)) == x`, the chat template's markers, and `export --format hf`'s
`tokenizer.json`, which is derived from the pieces). So an imported tokenizer is accepted only
when it already encodes text that way, and is then kept piece for piece:

- `tokenizer.model` (preferred when both are there): the sentencepiece model itself, with or
  without a dummy prefix (Llama 2's, TinyLlama's and Mistral's tokenizers have one; minigpt's
  tokenizer then adds it where a text starts, exactly as sentencepiece does). Refused, naming the
  field: a model type other than BPE, no byte fallback, a normaliser other than identity,
  whitespace squeezing, user-defined pieces.
- `tokenizer.json` alone: accepted when it is a sentencepiece BPE written out: a byte-fallback
  BPE whose merges are exactly the vocabulary's splits ranked by the merged piece's id (then
  sentencepiece, merging by piece score, and the `tokenizers` library, merging by rank, make the
  same ids), either as `minigpt export` writes one (`hf_tokenizer.tokenizer_json`: spaces as
  spaces, no pre-tokeniser, no normaliser or a Prepend(" ") one for a dummy prefix) or as
  transformers 4's converter wrote Llama 2's (pieces with "▁", the normaliser Prepend("▁") then
  Replace(" ", "▁"): sentencepiece's dummy prefix exactly). It is rebuilt as a sentencepiece
  model (`sp_model`). Refused, naming the key: a byte-level BPE (GPT-2, Llama 3: `pre_tokenizer`
  ByteLevel), the Metaspace pre-tokeniser (transformers 5 writes it for Llama tokenizers: it
  adds no "▁" before a text that starts with a space, where sentencepiece adds one, so some
  texts get other ids; the `tokenizer.model` it came from imports), WordPiece or Unigram:
  minigpt's tokenizer cannot represent them exactly.

Special pieces: minigpt needs its seven (begin/end of text, pad, the three roles, end of turn).
The checkpoint's own begin-of-text, end-of-text and pad pieces (config.json's `bos_token_id`,
`eos_token_id`, `pad_token_id`), when they are control pieces, are renamed to minigpt's names:
the same ids, so the model keeps what it learnt about them. Those still missing (normally the
role and end-of-turn markers) are appended as new control pieces; `hf_import` gives them new
embedding rows (the mean of the trained rows), which SFT then trains. Control pieces are never
produced from text, so neither change alters how any text is encoded.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minigpt_cli.engine.data import sp_model
from minigpt_cli.engine.data.sp_model import (
    BYTE,
    CONTROL,
    NORMAL,
    UNKNOWN,
    Piece,
    ProtoError,
    SentencePieceModel,
)
from minigpt_cli.engine.data.tokenizer import MODEL_FILE as SP_FILE
from minigpt_cli.engine.data.tokenizer import SPECIAL_TOKENS, UNK_PIECE, Tokenizer
from minigpt_cli.engine.export.hf_tokenizer import _merges
from minigpt_cli.errors import UserError

HF_TOKENIZER_FILE = "tokenizer.json"
_BYTE_PIECE = re.compile(r"^<0x[0-9A-F]{2}>$")
_SPACE_SYMBOL = "\u2581"
# config.json's id keys -> minigpt's special names they stand for.
_CONFIG_IDS = {"bos_token_id": "bos", "eos_token_id": "eos", "pad_token_id": "pad"}
_TRAINER_FIELDS = {
    "bos": (sp_model.TRAINER_BOS_ID, sp_model.TRAINER_BOS_PIECE),
    "eos": (sp_model.TRAINER_EOS_ID, sp_model.TRAINER_EOS_PIECE),
    "pad": (sp_model.TRAINER_PAD_ID, sp_model.TRAINER_PAD_PIECE),
}


@dataclass
class ImportedTokenizer:
    """The minigpt tokenizer of a checkpoint and what was done to make it one."""

    tokenizer: Tokenizer
    source: str
    """The file it came from (`tokenizer.model` or `tokenizer.json`)."""
    original_pieces: int
    renamed: dict[str, str] = field(default_factory=dict)
    """The checkpoint's piece -> minigpt's name for it (same id)."""
    added: dict[str, int] = field(default_factory=dict)
    """minigpt pieces appended -> their ids (each gets an embedding row at import)."""
    reserved: int = 0
    """Control pieces `<|reserved_N|>` naming embedding rows the checkpoint had beyond its
    tokenizer, so the vocabulary covers every row."""

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size


def _refuse(path: Path, what: str) -> UserError:
    return UserError(f"{path}: {what}")


def check_representable(model: SentencePieceModel, path: Path) -> None:
    """Refuse, naming the field, a sentencepiece model that does not encode as minigpt's do."""
    kind = model.trainer_int(sp_model.TRAINER_MODEL_TYPE)
    if kind != sp_model.BPE:
        name = sp_model.MODEL_TYPE_NAMES.get(kind, str(kind))
        raise _refuse(path, f"trainer_spec.model_type = {name}: minigpt represents BPE only")
    if not model.trainer_int(sp_model.TRAINER_BYTE_FALLBACK):
        raise _refuse(
            path,
            "trainer_spec.byte_fallback = false: minigpt needs byte fallback (every text encodes "
            "and decodes back exactly)",
        )
    if model.trainer_int(sp_model.TRAINER_TREAT_WHITESPACE_AS_SUFFIX):
        raise _refuse(path, "trainer_spec.treat_whitespace_as_suffix = true: not supported")
    name = model.normalizer_name()
    if model.has_charsmap() or name not in ("identity", ""):
        shown = name or "custom"
        raise _refuse(
            path, f"normalizer_spec.name = {shown}: minigpt normalises nothing (identity)"
        )
    for number, key, wanted in (
        (sp_model.NORMALIZER_REMOVE_EXTRA_WHITESPACES, "remove_extra_whitespaces", False),
        (sp_model.NORMALIZER_ESCAPE_WHITESPACES, "escape_whitespaces", True),
    ):
        if model.normalizer_flag(number) != wanted:
            raise _refuse(
                path,
                f"normalizer_spec.{key} = {str(not wanted).lower()}: minigpt's tokenizer "
                f"has {key} = {str(wanted).lower()}, so it cannot encode text as this one does",
            )
    for piece in model.pieces:
        if piece.type not in (NORMAL, UNKNOWN, CONTROL, BYTE):
            kind_name = sp_model.TYPE_NAMES.get(piece.type, str(piece.type))
            raise _refuse(path, f"piece {piece.text!r} is {kind_name}: not supported")


def _config_id(config: dict[str, Any], key: str) -> int | None:
    value = config.get(key)
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def adopt_specials(
    model: SentencePieceModel, config: dict[str, Any], rows: int, path: Path
) -> tuple[dict[str, str], dict[str, int], int]:
    """Give `model` minigpt's special pieces (see the module docstring): (renamed, added,
    reserved fillers). `rows` is the checkpoint's embedding size."""
    texts = {piece.text: index for index, piece in enumerate(model.pieces)}
    renamed: dict[str, str] = {}
    unknown = [i for i, piece in enumerate(model.pieces) if piece.type == UNKNOWN]
    if UNK_PIECE not in texts and unknown:
        old = model.pieces[unknown[0]].text
        model.pieces[unknown[0]].text = UNK_PIECE
        renamed[old] = UNK_PIECE
    for key, name in _CONFIG_IDS.items():
        wanted = SPECIAL_TOKENS[name]
        token_id = _config_id(config, key)
        if wanted in texts or token_id is None or not 0 <= token_id < len(model.pieces):
            continue
        piece = model.pieces[token_id]
        if piece.type != CONTROL or piece.text in SPECIAL_TOKENS.values():
            continue
        renamed[piece.text] = wanted
        piece.text = wanted
        texts[wanted] = token_id
    for name, wanted in SPECIAL_TOKENS.items():
        index = texts.get(wanted)
        if index is not None and model.pieces[index].type != CONTROL:
            raise _refuse(path, f"piece {wanted!r} is not a control piece (minigpt reserves it)")
        if name in _TRAINER_FIELDS and index is not None:
            id_field, piece_field = _TRAINER_FIELDS[name]
            model.set_trainer(id_field, index)
            model.set_trainer(piece_field, wanted)
    if len(model.pieces) > rows:
        raise _refuse(
            path,
            f"{len(model.pieces):,} pieces, but config.json's vocab_size is {rows:,} (the "
            "embedding has a row for each id)",
        )
    added: dict[str, int] = {}
    for wanted in SPECIAL_TOKENS.values():
        if wanted not in texts:
            added[wanted] = len(model.pieces)
            texts[wanted] = len(model.pieces)
            model.pieces.append(Piece(wanted, 0.0, CONTROL))
            name = next(key for key, value in SPECIAL_TOKENS.items() if value == wanted)
            if name in _TRAINER_FIELDS:
                id_field, piece_field = _TRAINER_FIELDS[name]
                model.set_trainer(id_field, texts[wanted])
                model.set_trainer(piece_field, wanted)
    reserved = 0
    while len(model.pieces) < rows:
        model.pieces.append(Piece(f"<|reserved_{reserved}|>", 0.0, CONTROL))
        reserved += 1
    model.set_trainer(sp_model.TRAINER_VOCAB_SIZE, len(model.pieces))
    return renamed, added, reserved


# ------------------------------------------------------------------------- tokenizer.json


def _merge_pairs(merges: Any, path: Path) -> list[list[str]]:
    if not isinstance(merges, list):
        raise _refuse(path, "model.merges is not a list")
    pairs = []
    for merge in merges:
        if isinstance(merge, str):
            left, _, right = merge.partition(" ")
            pairs.append([left, right])
        elif isinstance(merge, list) and len(merge) == 2:
            pairs.append([str(merge[0]), str(merge[1])])
        else:
            raise _refuse(path, f"model.merges holds {merge!r}, not a pair")
    return pairs


# The normalisers of a sentencepiece dummy prefix: minigpt's export (spaces kept as spaces) and
# transformers 4's Llama converter (spaces written as "▁", as in the pieces).
_PREPEND_SPACE = {"type": "Prepend", "prepend": " "}
_LLAMA_NORMALIZER = {
    "type": "Sequence",
    "normalizers": [
        {"type": "Prepend", "prepend": _SPACE_SYMBOL},
        {"type": "Replace", "pattern": {"String": " "}, "content": _SPACE_SYMBOL},
    ],
}


def _spaces_and_prefix(data: dict[str, Any], path: Path) -> tuple[str, bool]:
    """(the character the vocabulary writes a space as, whether a dummy prefix is added), from
    the `normalizer` and `pre_tokenizer`, or a one-line refusal naming the key."""
    pre = data.get("pre_tokenizer")
    if pre is not None:
        kind = pre.get("type") if isinstance(pre, dict) else pre
        why = (
            "it adds no \u2581 before a text that starts with a space, where the sentencepiece "
            "model it stands for adds one, so some texts would get other ids; import the folder "
            "with its tokenizer.model"
            if kind == "Metaspace"
            else "minigpt's tokenizer has none, so it cannot encode text as this one does (a "
            "sentencepiece tokenizer.model may be importable)"
        )
        raise _refuse(path, f"pre_tokenizer = {kind}: {why}")
    normalizer = data.get("normalizer")
    if normalizer is None:
        return " ", False
    if normalizer == _PREPEND_SPACE:
        return " ", True
    if normalizer == _LLAMA_NORMALIZER:
        return _SPACE_SYMBOL, True
    kind = normalizer.get("type") if isinstance(normalizer, dict) else normalizer
    raise _refuse(
        path,
        f"normalizer = {kind}: minigpt's tokenizer normalises nothing (it adds at most "
        "sentencepiece's dummy prefix), so it cannot encode text as this one does",
    )


def from_tokenizer_json(data: Any, path: Path) -> SentencePieceModel:
    """The sentencepiece model a `tokenizer.json` is the writing-out of, or a one-line refusal
    naming the key that makes it something else (see the module docstring)."""
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise _refuse(path, "not a tokenizers file (no model object)")
    bpe = data["model"]
    if bpe.get("type") != "BPE":
        raise _refuse(path, f"model.type = {bpe.get('type')!r}: minigpt represents BPE only")
    space, dummy_prefix = _spaces_and_prefix(data, path)
    other = _SPACE_SYMBOL if space == " " else " "
    if not bpe.get("byte_fallback"):
        raise _refuse(path, "model.byte_fallback = false: minigpt needs byte fallback")
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "ignore_merges"):
        if bpe.get(key):
            raise _refuse(path, f"model.{key} = {bpe[key]!r}: not supported")
    vocab = bpe.get("vocab")
    if not isinstance(vocab, dict):
        raise _refuse(path, "model.vocab is not an object")
    specials: set[str] = set()
    for token in data.get("added_tokens") or []:
        content, token_id = token.get("content"), token.get("id")
        if not token.get("special"):
            raise _refuse(path, f"added token {content!r} is not special: not supported")
        if vocab.setdefault(content, token_id) != token_id:
            raise _refuse(path, f"added token {content!r} has id {token_id} and another in vocab")
        specials.add(str(content))
    by_id = {int(token_id): str(piece) for piece, token_id in vocab.items()}
    if sorted(by_id) != list(range(len(by_id))):
        raise _refuse(path, "model.vocab ids are not 0..N-1")
    unk = bpe.get("unk_token")
    if unk not in vocab:
        raise _refuse(path, f"model.unk_token = {unk!r} is not in the vocabulary")
    pieces: list[Piece] = []
    mergeable: set[str] = set()
    for token_id in range(len(by_id)):
        text = by_id[token_id]
        if text == unk:
            pieces.append(Piece(text, 0.0, UNKNOWN))
        elif text in specials:
            pieces.append(Piece(text, 0.0, CONTROL))
        elif _BYTE_PIECE.match(text):
            pieces.append(Piece(text, 0.0, BYTE))
        else:
            if other in text:
                raise _refuse(
                    path,
                    f"model.vocab piece {text!r} holds {other!r}, which this tokenizer never "
                    f"produces (it writes a space as {space!r}): minigpt cannot represent it "
                    "exactly",
                )
            pieces.append(Piece(text.replace(" ", _SPACE_SYMBOL), -float(token_id), NORMAL))
            mergeable.add(text)
    if _merge_pairs(bpe.get("merges"), path) != _merges(vocab, mergeable):
        raise _refuse(
            path,
            "model.merges are not a sentencepiece BPE's (every split of a piece, ranked by the "
            "piece's id): minigpt cannot represent this tokenizer exactly",
        )
    unk_id = int(vocab[unk])
    return SentencePieceModel(
        pieces,
        trainer=sp_model.bpe_trainer(len(pieces), unk_id),
        normalizer=sp_model.minigpt_normalizer(dummy_prefix=dummy_prefix),
    )


def load(folder: Path, config: dict[str, Any], rows: int) -> ImportedTokenizer:
    """The checkpoint's tokenizer as a minigpt tokenizer (see the module docstring)."""
    sp_path, json_path = folder / SP_FILE, folder / HF_TOKENIZER_FILE
    if sp_path.is_file():
        path = sp_path
        try:
            model = SentencePieceModel.from_bytes(sp_path.read_bytes())
        except ProtoError as error:
            raise _refuse(sp_path, f"not a sentencepiece model ({error})") from None
    elif json_path.is_file():
        path = json_path
        try:
            data = json.loads(json_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise _refuse(json_path, f"not JSON ({error})") from None
        model = from_tokenizer_json(data, json_path)
    else:
        raise UserError(
            f"{folder}: no {SP_FILE} or {HF_TOKENIZER_FILE} (the tokenizer the weights were "
            "trained with)"
        )
    check_representable(model, path)
    original = len(model.pieces)
    renamed, added, reserved = adopt_specials(model, config, rows, path)
    tokenizer = Tokenizer(model.to_bytes(), source=path)  # its own one-line refusals
    return ImportedTokenizer(tokenizer, path.name, original, renamed, added, reserved)
