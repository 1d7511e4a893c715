"""The addition family: sums of two numbers from 0 to 99, held out by operand pair, answered by
working them out digit by digit, the family where reinforcement learning has room to help.

The answer is the working, units first: "7+8=15, 4+5+1=10, so 105" for 47 + 58 (Chinese:
"7+8=15，4+5+1=10，所以是105"). Why: digits are single tokens and a model writes the answer left
to right, so the bare sum needs the carry before its first digit; a four-layer model then learns a
lookup table of the pairs it saw (measured: 0-6 % on held-out pairs). Worked out, each step is a
small table (a digit plus a digit, plus the carry it just wrote) that transfers to pairs never
seen. The reference is the whole working, so exact match (and the rule reward) accept only a right
working, not a lucky total.

SFT answers a share of its sums bare (`WORKED_SHARE`): about three in ten of the training
questions on addition get the bare total ("105"), as instruction data written by people mixes
answers that show their working with answers that do not. Held-out references, RLHF prompts, DPO's
chosen replies and the pretraining text always work the sum out. Why: with every SFT answer worked
out, SFT alone reached 84-96 % of the held-out sums (seeds 0-2), leaving reinforcement learning
with the exact-answer rule nothing to show (GRPO +4 points at most). With the bare share, SFT
leaves the model undecided between the two ways of answering, and a bare total of an unseen pair
is almost always wrong: held-out exact match after SFT falls into the range where a verifiable
reward can work (see the README, "RLHF with a verifiable reward"), and GRPO with the rule reward
learns to work every sum out, as reasoning-RL (DeepSeek-R1's rule rewards) teaches a model to
show its working because working is what gets rewarded. Measured on the way (seed 0, the tiny
quickstart's pretraining): keeping only a tenth of SFT's addition questions left 0 % (the steps
themselves unlearned), three tenths 26 % with GRPO-rule adding 6 points (errors of one in single
steps, which 80 GRPO iterations barely move; a learning rate of 5e-4 was no faster); half the
answers bare left 7 %. With three in ten bare (seed 0): SFT 33 % (33 answers bare, 33 of the 67
worked ones right), GRPO-rule 50 % (2 bare, 50 of 98 worked right): the gain is the switch to
working every sum out.
"""

from __future__ import annotations

import functools
import random
import re

from minigpt_cli.datasets._common import _held_out, _Item

MAX_OPERAND = 99
WORKED_SHARE = 0.7
"""Share of SFT's training questions on addition answered with the working; the rest with the bare
total (see the module docstring). Held-out references, DPO, RLHF and pretraining text always work
the sum out."""


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


def working(a: int, b: int, lang: str, flip_carry: bool = False) -> tuple[str, int]:
    """The answer worked digit by digit, units first, and its total.

    `flip_carry` makes the classic mistake (the carry dropped, or one added that is not there).
    """
    units = a % 10 + b % 10
    carry = units // 10
    if flip_carry:
        carry = 1 - carry
    tens = a // 10 + b // 10 + carry
    total = tens * 10 + units % 10
    head = f"{a % 10}+{b % 10}={units}"
    if lang == "en":
        return f"{head}, {a // 10}+{b // 10}+{carry}={tens}, so {total}", total
    return f"{head}，{a // 10}+{b // 10}+{carry}={tens}，所以是{total}", total


def bare_total(answer: str) -> str:
    """The total at the end of a worked answer ("7+8=15, 4+5+1=10, so 105" -> "105")."""
    return re.split(r"[ 是]", answer)[-1]


def _addition_item(rng: random.Random, split: str, lang: str) -> _Item:
    a, b = _draw_pair(rng, split)
    instruction, input_text = rng.choice(_ADD_TEMPLATES[lang])
    answer, total = working(a, b, lang)
    # DPO's short wrong answer is the total a flipped carry gives, bare, not a wrong working:
    # DPO on the right working against one wrong in a single digit lowered the right working
    # too (held-out addition 87 % -> 29 % after the quickstart's DPO; with RPO's NLL on the
    # chosen reply added, 33 %; against the sum worked from the wrong end, wrong from its first
    # digit, 48 %), while against the bare wrong total it stays (88 %).
    wrong = working(a, b, lang, flip_carry=True)[1]
    return _Item(
        task="addition",
        lang=lang,
        instruction=instruction.format(a=a, b=b),
        input=input_text.format(a=a, b=b),
        answer=answer,
        wrong=str(wrong),
        sentence=_addition_sentence(lang, a, b, total),
        wrong_sentence=_addition_sentence(lang, a, b, wrong),
    )
