"""A minigpt tokenizer as Hugging Face `AutoTokenizer` files: the same ids, the same chat template.

Why a hand-built `tokenizer.json` rather than letting transformers convert `tokenizer.model`:
transformers' sentencepiece converter (the Llama one) replaces spaces by U+2581 in a normaliser,
so a literal U+2581 the user types becomes a space, while minigpt spells it as its three UTF-8
bytes (`data/tokenizer.py`). Writing the vocabulary with real spaces where sentencepiece writes
U+2581 needs no normaliser at all: a literal U+2581 is then not in the vocabulary and falls back
to its bytes, exactly as minigpt does. The merges are sentencepiece's pieces split into two
pieces that are both in the vocabulary, ranked by the merged piece's id (sentencepiece BPE orders
pieces by score), as transformers' own `generate_merges` ranks them. No BOS is added on encode:
`tokenizer(text).input_ids` equals `Tokenizer.encode(text)`.

A tokenizer with sentencepiece's dummy prefix (an imported Llama 2 one, `data/tokenizer.py`)
gets the normaliser Prepend(" ") and a decoder that strips that space: the `tokenizers` library
normalises each stretch of text between special tokens on its own, so the prefix lands where
minigpt puts it, at the start and after each special token (so in every message of the chat
template), and never on an empty stretch.

One difference remains and is documented: Hugging Face tokenizers match special tokens in raw
text (that is how `apply_chat_template` produces them), so a user who types "<|user|>" gets the
special id there, where minigpt gives plain text. Written as plain JSON: no `tokenizers` import.
"""

from __future__ import annotations

from typing import Any

from minigpt_cli.engine.data.tokenizer import SPECIAL_TOKENS, UNK_PIECE, Tokenizer

_SPACE_SYMBOL = "\u2581"

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' and not loop.first -%}"
    "{{- raise_exception('a system message may only come first') -}}"
    "{%- elif message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('unknown role ' + message['role'] + ' (expected system, user or "
    "assistant)') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|>' + message['content'] + '<|end_of_turn|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)
"""minigpt's one chat template (`data/chat_template.py:render`) in Jinja:
`<|begin_of_text|> (<|role|> content <|end_of_turn|>)* [<|assistant|>]`."""


def _hf_piece(piece: str) -> str:
    """A sentencepiece piece in the exported vocabulary: U+2581 (sentencepiece's space) as a
    real space, so the vocabulary needs no normaliser (see the module docstring)."""
    return piece.replace(_SPACE_SYMBOL, " ")


def _merges(vocab: dict[str, int], mergeable: set[str]) -> list[list[str]]:
    """Every split of a mergeable piece into two vocabulary pieces, ranked by the merged piece's
    id, then by the halves' ids (transformers' `generate_merges` order)."""
    ranked: list[tuple[int, int, int, str, str]] = []
    for piece in mergeable:
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((vocab[piece], vocab[left], vocab[right], left, right))
    ranked.sort()
    return [[left, right] for _, _, _, left, right in ranked]


def tokenizer_json(tokenizer: Tokenizer) -> dict[str, Any]:
    """The `tokenizer.json` (the `tokenizers` library's format) that encodes as `tokenizer` does:
    a byte-fallback BPE model, the reserved specials as added special tokens, and a dummy prefix
    when the tokenizer has one."""
    vocab: dict[str, int] = {}
    mergeable: set[str] = set()
    for token_id in range(tokenizer.vocab_size):
        raw = tokenizer.piece(token_id)
        reserved = tokenizer.is_byte(token_id) or tokenizer.is_control(token_id)
        piece = raw if reserved else _hf_piece(raw)
        vocab[piece] = token_id
        if not reserved and token_id != tokenizer.unk_id:
            mergeable.add(piece)
    specials = [
        {
            "id": token_id,
            "content": piece,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for piece, token_id in sorted(tokenizer.special_tokens.items(), key=lambda item: item[1])
    ]
    decoders: list[dict[str, Any]] = [{"type": "ByteFallback"}, {"type": "Fuse"}]
    if tokenizer.dummy_prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": specials,
        "normalizer": {"type": "Prepend", "prepend": " "} if tokenizer.dummy_prefix else None,
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": UNK_PIECE,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": _merges(vocab, mergeable),
        },
    }


def tokenizer_config(tokenizer: Tokenizer, context_length: int) -> dict[str, Any]:
    """`tokenizer_config.json`: the generic fast tokenizer class (it reads `tokenizer.json` as
    written, where a Llama class would rebuild its own pipeline), the special tokens, no BOS or
    EOS added on encode, and the chat template. No `unk_token`: transformers would make "<unk>"
    typed in text a special token, and byte fallback means the model never produces it."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKENS["bos"],
        "eos_token": SPECIAL_TOKENS["eos"],
        "pad_token": SPECIAL_TOKENS["pad"],
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": context_length,
        "chat_template": CHAT_TEMPLATE,
    }


def special_tokens_map() -> dict[str, str]:
    """`special_tokens_map.json`, which older transformers releases read besides the config."""
    return {
        "bos_token": SPECIAL_TOKENS["bos"],
        "eos_token": SPECIAL_TOKENS["eos"],
        "pad_token": SPECIAL_TOKENS["pad"],
    }
