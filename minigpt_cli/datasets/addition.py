"""The addition family: sums of two numbers from 0 to 99, held out by operand pair."""

from __future__ import annotations

import functools
import random

from minigpt_cli.datasets._common import _held_out, _Item

MAX_OPERAND = 99


def _pair_held_out(a: int, b: int) -> bool:
    low, high = min(a, b), max(a, b)
    return _held_out(f"add:{low}+{high}", 10)


@functools.cache
def _addition_pairs(split: str) -> tuple[tuple[int, int], ...]:
    """Unordered operand pairs (a <= b) of one split."""
    want_val = split == "val"
    return tuple(
        (a, b)
        for a in range(MAX_OPERAND + 1)
        for b in range(a, MAX_OPERAND + 1)
        if _pair_held_out(a, b) == want_val
    )


def _draw_pair(rng: random.Random, split: str) -> tuple[int, int]:
    a, b = rng.choice(_addition_pairs(split))
    return (a, b) if rng.random() < 0.5 else (b, a)


_ADD_TEMPLATES = {
    "en": (
        ("What is {a} + {b}?", ""),
        ("What is {a} plus {b}?", ""),
        ("Add {a} and {b}.", ""),
        ("Calculate {a} + {b}.", ""),
        ("What is the sum of {a} and {b}?", ""),
        ("Add these two numbers.", "{a} + {b}"),
    ),
    "zh": (
        ("{a}加{b}等于多少？", ""),
        ("计算{a}+{b}。", ""),
        ("{a} + {b} 等于几？", ""),
        ("{a}和{b}的和是多少？", ""),
        ("请把这两个数相加。", "{a} + {b}"),
    ),
}


def _addition_sentence(lang: str, a: int, b: int, total: int) -> str:
    return f"{a} + {b} = {total}." if lang == "en" else f"{a}加{b}等于{total}。"


def _addition_item(rng: random.Random, split: str, lang: str) -> _Item:
    a, b = _draw_pair(rng, split)
    instruction, input_text = rng.choice(_ADD_TEMPLATES[lang])
    total = a + b
    wrong = total + rng.choice((-11, -10, -2, -1, 1, 2, 10, 11))
    if wrong < 0:
        wrong = total + rng.choice((1, 2, 10))
    return _Item(
        task="addition",
        lang=lang,
        instruction=instruction.format(a=a, b=b),
        input=input_text.format(a=a, b=b),
        answer=str(total),
        wrong=str(wrong),
        sentence=_addition_sentence(lang, a, b, total),
        wrong_sentence=_addition_sentence(lang, a, b, wrong),
    )
