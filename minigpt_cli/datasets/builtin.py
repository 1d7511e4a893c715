"""Built-in bilingual (English + Chinese) data for every stage, generated on the spot: no download.

Why generated rather than shipped: a seeded generator is small, deterministic, and lets every task
family hold out exactly what it means to test. The families are chosen so a tiny model (d128, four
layers) learns them in minutes on a laptop CPU, and their answers are short and checkable exactly.

Task families (`TASK_FAMILIES`), each asked in English and in Chinese:

- ``addition``: the sum of two numbers from 0 to 99, answered with its working, units first
  ("7+8=15, 4+5+1=10, so 105"; see `addition`). Held out: every unordered operand pair whose
  CRC-32 falls in one tenth (520 of the 5050 pairs). Neither order of a held-out pair ever
  appears in training data, pretraining text included. SFT's training records answer about three
  sums in ten with the bare total (`addition.WORKED_SHARE`), so SFT leaves room that RL with the
  exact-answer rule closes; every other record, held-out references included, works it out.
- ``facts``: four fixed tables (capital of a country, sound an animal makes, colour of a thing,
  opposite of a word). Pretraining text states every fact in many ways. Held out: question
  phrasings, as combinations. Ten shared question frames per language ("Do you know {q}?",
  "我想知道{q}。", ...) wrap a noun phrase naming what is asked ("the capital of {s}", "{s}的首都");
  for each relation and language two frames are held out (`frame_held_out`): never used with that
  relation in any training text, pretraining included, while the same frames are trained with
  other relations and with the translation directions. So a held-out question pairs a frame and a
  relation the model only ever saw apart, and every character of it occurs in training text.
  (Chinese holds out only frames that end with the noun phrase, so BPE cuts the held-out question
  into pieces training questions also have.) Each relation also has training-only phrasings.
- ``translation``: single words between English and Chinese, both directions, from a 110-word
  dictionary that pretraining text spells out. Held out: the question phrasings, as for facts (the
  two directions count as two more things a frame can ask, each with two held-out frames).
- ``string_ops``: name the last word of a list of words, or count its words. Held out: the lists.
  An ordered list belongs to the held-out split by its CRC-32 (one in ten, `list_split`); no
  training record, pretraining text included, holds a held-out list, and the held-out lists are
  drawn from the same words as the training lists (the dictionary's, in either language). So
  held-out items test the operation on lists never seen, not on words never seen: copying a word
  the model never saw inside a list is out of reach of a tiny model in minutes (measured: 0 % on
  such words, where training words reach 70 %+), as are naming the first word or reversing a list
  (they need a two-step attention circuit that did not form in this budget; pretraining text
  still spells them out).

The held-out part of each family is fixed (it does not depend on the seed), so data generated with
different seeds for different stages never leaks held-out items into any training split. The seed
picks which items, phrasings and orders are drawn. Records are drawn one after another from one
random stream, so `records(kind, split, n, seed)` is a prefix of the same call with a larger `n`,
and the tail of the pretraining records is as representative as the head (the pretraining trainer
holds out the last 5 % of tokens).

Record shapes: pretrain ``{"text", "task"}``; sft ``{"instruction", "input", "output", "task"}``
with ``"history": [[user, assistant], ...]`` on about 4 % of training records; dpo ``{"prompt",
"chosen", "rejected", "task"}``, where chosen is right and rejected is wrong or unhelpful, their
lengths balanced so that length says nothing; rlhf ``{"prompt", "answer", "task"}``.
"""

from __future__ import annotations

import random

from minigpt_cli.datasets._common import LANGS, TASK_FAMILIES, join_instruction
from minigpt_cli.datasets.addition import MAX_OPERAND, WORKED_SHARE, bare_total
from minigpt_cli.datasets.documents import _PRETRAIN_MIX
from minigpt_cli.datasets.items import _draw_items, _make_item
from minigpt_cli.datasets.questions import (
    ASKED,
    FRAME_SHARE,
    frame_held_out,
    held_out_phrasings,
    training_phrasings,
)
from minigpt_cli.datasets.string_ops import list_split

# The generator lives in the modules beside this one: `_common` (families, languages, the item
# type), one module a task family (`addition`, `facts`, `translation`, `string_ops`, with the
# question phrasings facts and translation share in `questions`), `items` (balanced draws of
# them), `stories` and `documents` (pretraining text). This module keeps the entry points and
# re-exports the names callers import from it.
__all__ = [
    "ASKED",
    "DEFAULT_TRAIN_SIZE",
    "FRAME_SHARE",
    "HISTORY_RATE",
    "KINDS",
    "LANGS",
    "MAX_OPERAND",
    "MAX_VAL_SIZE",
    "MIN_VAL_SIZE",
    "PRETRAIN_TOPICS",
    "SPLITS",
    "TASK_FAMILIES",
    "default_size",
    "describe",
    "dpo_records",
    "frame_held_out",
    "held_out_phrasings",
    "join_instruction",
    "list_split",
    "pretrain_records",
    "records",
    "rlhf_records",
    "sft_records",
    "training_phrasings",
]

PRETRAIN_TOPICS: tuple[str, ...] = (*TASK_FAMILIES, "story", "quiz")
KINDS: tuple[str, ...] = ("pretrain", "sft", "dpo", "rlhf")
SPLITS: tuple[str, ...] = ("train", "val")

DEFAULT_TRAIN_SIZE = 6000  # equals [data] builtin_size's default
MAX_VAL_SIZE = 400
MIN_VAL_SIZE = 10
HISTORY_RATE = 0.04  # share of SFT training records that carry earlier turns

# ----------------------------------------------------------------------------------------------
# Sizes and the public entry points
# ----------------------------------------------------------------------------------------------


def default_size(kind: str, split: str = "train", train_size: int | None = None) -> int:
    """How many records the built-in data gives for `kind`/`split` when the user says nothing.

    Training splits default to `DEFAULT_TRAIN_SIZE` (the `[data] builtin_size` default); a held-out
    split is a fifteenth of the training size, kept between 10 and 400 records so that evaluating
    it (one generation per record) stays a matter of seconds on a CPU.
    """
    _check_kind_split(kind, split)
    train = DEFAULT_TRAIN_SIZE if train_size is None else int(train_size)
    if split == "train":
        return train
    return max(MIN_VAL_SIZE, min(MAX_VAL_SIZE, train // 15))


def records(kind: str, split: str = "train", n: int | None = None, seed: int = 0) -> list[dict]:
    """Dispatch to the generator for `kind`; `n=None` means `default_size(kind, split)`."""
    _check_kind_split(kind, split)
    count = default_size(kind, split) if n is None else n
    if kind == "pretrain":
        return pretrain_records(count, seed)
    return {"sft": sft_records, "dpo": dpo_records, "rlhf": rlhf_records}[kind](split, count, seed)


def describe(kind: str, split: str, n: int) -> str:
    """One line a verb prints when it falls back to the built-in data (no --data given)."""
    what = {
        "pretrain": "pretraining documents (stories, facts, dictionary, arithmetic)",
        "sft": "instruction records",
        "dpo": "preference pairs",
        "rlhf": "prompts with checkable answers",
    }[kind]
    families = ", ".join(TASK_FAMILIES)
    return (
        f"no --data given: using {n} built-in {split} {what}, English and Chinese, "
        f"task families {families} (see `minigpt data show --kind {kind}`)"
    )


def pretrain_records(n: int, seed: int = 0) -> list[dict]:
    """`n` pretraining documents `{"text", "task"}`: stories, facts, dictionary, sums, quizzes.

    Only training-split items appear (no held-out operand pair, phrasing or word), so pretraining
    teaches the facts and the dictionary without ever showing a held-out question.
    """
    _check_count(n)
    rng = _rng("pretrain", "train", seed)
    makers, weights = zip(*_PRETRAIN_MIX, strict=True)
    out: list[dict] = []
    for _ in range(n):
        maker = rng.choices(makers, weights)[0]
        text, topic = maker(rng)
        out.append({"text": text, "task": topic})
    return out


def sft_records(split: str, n: int, seed: int = 0) -> list[dict]:
    """`n` instruction records `{"instruction", "input", "output", "task"}` (+ `"history"`).

    Families and languages are balanced: every run of eight records holds each (family, language)
    combination once, in random order. Held-out records are distinct from one another as long as
    the held-out item space allows.
    """
    _check_kind_split("sft", split)
    _check_count(n)
    rng = _rng("sft", split, seed)
    out: list[dict] = []
    for item in _draw_items(rng, split, n):
        record: dict = {"instruction": item.instruction, "input": item.input}
        record["output"] = item.answer
        if split == "train" and item.task == "addition" and rng.random() >= WORKED_SHARE:
            record["output"] = bare_total(item.answer)  # see `addition.WORKED_SHARE`
        if split == "train" and rng.random() < HISTORY_RATE:
            earlier = [_make_item(rng, split, rng.choice(TASK_FAMILIES), item.lang)]
            if rng.random() < 0.5:
                earlier.append(_make_item(rng, split, rng.choice(TASK_FAMILIES), item.lang))
            record["history"] = [[e.user_text, e.answer] for e in earlier]
        record["task"] = item.task
        out.append(record)
    return out


def dpo_records(split: str, n: int, seed: int = 0) -> list[dict]:
    """`n` preference pairs `{"prompt", "chosen", "rejected", "task"}`.

    Half the pairs set the short right answer against a short wrong one, a quarter a right answer
    written as a sentence against the same sentence with a wrong value, and a quarter a right
    sentence against an unhelpful reply picked to be about as long. So a wrong value and an
    unhelpful tone are what separates chosen from rejected, not length, with one exception:
    addition's short pairs set the right working against the bare wrong total, because a wrong
    working there made DPO unlearn the right one (see `addition._addition_item`).
    """
    _check_kind_split("dpo", split)
    _check_count(n)
    rng = _rng("dpo", split, seed)
    out: list[dict] = []
    for item in _draw_items(rng, split, n):
        form = rng.random()
        if form < 0.5:
            chosen, rejected = item.answer, item.wrong
        elif form < 0.75:
            chosen, rejected = item.sentence, item.wrong_sentence
        else:
            chosen, rejected = item.sentence, _unhelpful(rng, item.lang, len(item.sentence))
        out.append(
            {"prompt": item.user_text, "chosen": chosen, "rejected": rejected, "task": item.task}
        )
    return out


def rlhf_records(split: str, n: int, seed: int = 0) -> list[dict]:
    """`n` prompts `{"prompt", "answer", "task"}` whose answer a rule can check exactly."""
    _check_kind_split("rlhf", split)
    _check_count(n)
    rng = _rng("rlhf", split, seed)
    return [
        {"prompt": item.user_text, "answer": item.answer, "task": item.task}
        for item in _draw_items(rng, split, n)
    ]


# ----------------------------------------------------------------------------------------------
# Plumbing
# ----------------------------------------------------------------------------------------------


def _check_kind_split(kind: str, split: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown data kind {kind!r} (expected one of {', '.join(KINDS)})")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (expected train or val)")
    if kind == "pretrain" and split != "train":
        raise ValueError(
            "pretraining text has no separate val split: the trainer holds out the last "
            "5 % of its tokens (use --split train)"
        )


def _check_count(n: int) -> None:
    if n < 0:
        raise ValueError(f"record count must not be negative, got {n}")


def _rng(kind: str, split: str, seed: int) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`, independent of PYTHONHASHSEED.
    return random.Random(f"minigpt-builtin/{kind}/{split}/{seed}")


# ----------------------------------------------------------------------------------------------
# DPO: unhelpful replies, picked by length
# ----------------------------------------------------------------------------------------------

_UNHELPFUL = {
    "en": (
        "No idea.",
        "I don't know.",
        "Who can say?",
        "Not telling.",
        "I am not sure about that.",
        "Why do you want to know?",
        "I would rather not say.",
        "Please look it up yourself.",
        "Sorry, I cannot answer this question.",
        "That is hard. Maybe ask someone else.",
        "Let me think... no, I have no idea at all.",
        "I do not really feel like answering that one.",
        "That question is too difficult for me to answer today.",
        "Hmm, I am not able to help with that question, sorry.",
    ),
    "zh": (
        "不知道。",
        "我不清楚。",
        "谁知道呢？",
        "我不想说。",
        "你自己查吧。",
        "这个我不太清楚。",
        "你问这个干什么？",
        "对不起，我回答不了。",
        "这个问题太难了，你去问别人吧。",
        "让我想想……还是不知道。",
        "我现在不想回答这个问题。",
        "这个问题我真的答不上来，抱歉。",
    ),
}


def _unhelpful(rng: random.Random, lang: str, length: int) -> str:
    """An unhelpful reply about `length` characters long (one of the two nearest, at random)."""
    ranked = sorted(_UNHELPFUL[lang], key=lambda reply: (abs(len(reply) - length), reply))
    return rng.choice(ranked[:2])
