"""The string_ops family: operations on lists of words; held out: the lists themselves."""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence

from minigpt_cli.datasets import tables
from minigpt_cli.datasets._common import _held_out, _Item


@functools.cache
def _word_pool(lang: str) -> tuple[str, ...]:
    # Dictionary words only: pretraining spells them out often enough that the tokenizer learns
    # each as one piece, and naming the last word of a list is then a copy of one token.
    return tuple(sorted(en if lang == "en" else zh for en, zh in tables.DICTIONARY))


def list_split(words: Sequence[str]) -> str:
    """Which split an ordered word list belongs to in the string_ops family ("train" or "val")."""
    return "val" if _held_out("list:" + "|".join(words), 10) else "train"


def _draw_list(rng: random.Random, lang: str, split: str, low: int, high: int) -> list[str]:
    """A list of `low`..`high` distinct words whose order is in `split` (rejection sampling)."""
    while True:
        words = rng.sample(_word_pool(lang), rng.randint(low, high))
        if list_split(words) == split:
            return words


# English lists put one word on each line: a word at the start of a line is tokenized the way the
# answer is (no leading-space marker), so naming or reversing words is a copy of the same tokens.
# Chinese has no such marker, and "、" is how Chinese writes a list.
_LIST_SEP = {"en": "\n", "zh": "、"}

# op -> language -> (instruction, input) phrasings; the list is always the input.
_STRING_OPS = {
    "last": {
        "en": (
            ("What is the last word in this list?", "{list}"),
            ("Which word comes last in this list?", "{list}"),
        ),
        "zh": (("这组词里最后一个词是什么？", "{list}"), ("最后一个词是哪个？", "{list}")),
    },
    "count": {
        "en": (
            ("How many words are in this list?", "{list}"),
            ("Count the words in this list.", "{list}"),
        ),
        "zh": (("这组词一共有几个？", "{list}"), ("数一数有几个词。", "{list}")),
    },
}
_OP_WEIGHTS = {"last": 0.6, "count": 0.4}
_LIST_LENGTHS = {"last": (3, 5), "count": (2, 5)}


def _string_op_answers(op: str, words: list[str], lang: str) -> tuple[str, str]:
    """The right answer and a plausible wrong one for `op` on `words`."""
    if op == "last":
        return words[-1], words[0]
    count = len(words)
    return str(count), str(count + 1 if count < 4 else count - 1)


def _string_op_sentence(op: str, lang: str, value: str) -> str:
    if lang == "en":
        return {
            "last": "The last word is {v}.",
            "count": "There are {v} words.",
        }[op].format(v=value)
    return {
        "last": "最后一个词是{v}。",
        "count": "一共有{v}个词。",
    }[op].format(v=value)


def _string_ops_item(rng: random.Random, split: str, lang: str) -> _Item:
    op = rng.choices(tuple(_OP_WEIGHTS), tuple(_OP_WEIGHTS.values()))[0]
    low, high = _LIST_LENGTHS[op]
    words = _draw_list(rng, lang, split, low, high)
    listed = _LIST_SEP[lang].join(words)
    instruction, input_text = rng.choice(_STRING_OPS[op][lang])
    answer, wrong = _string_op_answers(op, words, lang)
    return _Item(
        task="string_ops",
        lang=lang,
        instruction=instruction.format(list=listed),
        input=input_text.format(list=listed),
        answer=answer,
        wrong=wrong,
        sentence=_string_op_sentence(op, lang, answer),
        wrong_sentence=_string_op_sentence(op, lang, wrong),
    )
