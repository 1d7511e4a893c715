"""Built-in bilingual (English + Chinese) data for every stage, generated on the spot: no download.

Why generated rather than shipped: a seeded generator is small, deterministic, and lets every task
family hold out exactly what it means to test. The families are chosen so a tiny model (d128, four
layers) learns them in minutes on a laptop CPU, and their answers are short and checkable exactly.

Task families (`TASK_FAMILIES`), each asked in English and in Chinese:

- ``addition``: the sum of two numbers from 0 to 99. Held out: every unordered operand pair whose
  CRC-32 falls in one tenth (520 of the 5050 pairs). Neither order of a held-out pair ever
  appears in training data, pretraining text included.
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

import functools
import random
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from minigpt_cli.datasets import tables

TASK_FAMILIES: tuple[str, ...] = ("addition", "facts", "translation", "string_ops")
PRETRAIN_TOPICS: tuple[str, ...] = (*TASK_FAMILIES, "story", "quiz")
KINDS: tuple[str, ...] = ("pretrain", "sft", "dpo", "rlhf")
SPLITS: tuple[str, ...] = ("train", "val")
LANGS: tuple[str, ...] = ("en", "zh")

DEFAULT_TRAIN_SIZE = 6000  # equals [data] builtin_size's default
MAX_VAL_SIZE = 400
MIN_VAL_SIZE = 10
HISTORY_RATE = 0.04  # share of SFT training records that carry earlier turns
MAX_OPERAND = 99

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
    unhelpful tone are what separates chosen from rejected, never length.
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


def join_instruction(instruction: str, input_text: str = "") -> str:
    """The user turn of an instruction record: the instruction, then its input on the next line.

    Defined once here so the built-in DPO/RL prompts and the SFT loader (engine/data/records.py)
    agree on what the model is shown.
    """
    return f"{instruction}\n{input_text}" if input_text else instruction


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


def _held_out(key: str, one_in: int) -> bool:
    """Fixed membership of the held-out split (CRC-32 is stable across runs and platforms)."""
    return zlib.crc32(key.encode("utf-8")) % one_in == 0


def _article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


@dataclass(frozen=True)
class _Item:
    """One question with its right answer, a plausible wrong one, and both as sentences."""

    task: str
    lang: str
    instruction: str
    input: str
    answer: str
    wrong: str
    sentence: str
    wrong_sentence: str

    @property
    def user_text(self) -> str:
        return join_instruction(self.instruction, self.input)


def _draw_items(rng: random.Random, split: str, n: int) -> Iterator[_Item]:
    """`n` items, balanced over (family, language) in blocks of eight; held-out ones distinct.

    A generator, so a caller's own draws for record i happen before item i+1 is drawn: that is
    what keeps a shorter list a prefix of a longer one.
    """
    combos = [(family, lang) for family in TASK_FAMILIES for lang in LANGS]
    seen: set[str] = set()
    block: list[tuple[str, str]] = []
    for _ in range(n):
        if not block:
            block = combos[:]
            rng.shuffle(block)
        family, lang = block.pop()
        item = _make_item(rng, split, family, lang)
        if split == "val":
            for _ in range(50):  # held-out sets are small: avoid asking the same thing twice
                if item.user_text not in seen:
                    break
                item = _make_item(rng, split, family, lang)
            seen.add(item.user_text)
        yield item


def _make_item(rng: random.Random, split: str, family: str, lang: str) -> _Item:
    return _ITEM_MAKERS[family](rng, split, lang)


# ----------------------------------------------------------------------------------------------
# addition
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# facts
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Relation:
    """A fact table with its statement forms (questions come from `_pick_question`)."""

    name: str
    rows: tuple[tuple[str, str, str, str], ...]  # subject_en, answer_en, subject_zh, answer_zh
    statements: dict[str, tuple[str, ...]]


def _opposite_rows() -> tuple[tuple[str, str, str, str], ...]:
    rows = []
    for en_a, en_b, zh_a, zh_b in tables.OPPOSITE_PAIRS:
        rows.append((en_a, en_b, zh_a, zh_b))
        rows.append((en_b, en_a, zh_b, zh_a))
    return tuple(rows)


# Questions are asked in two ways. Shared frames ("Do you know {q}?", "你知道{q}吗？") wrap a noun
# phrase naming what is asked ("the capital of {s}", "{s}的首都", "the Chinese word for {s}"); each
# fact relation and each translation direction also has phrasings of its own, training only. The
# held-out questions are (frame, asked) combinations: for each relation or direction, two of the
# ten frames are never used with it in any training text, while both frames are used with other
# relations and directions. A held-out question is therefore a combination the model never saw,
# built from a frame and a noun phrase it saw separately; every character of it occurs in training.
_FRAMES = {
    "en": (
        "What is {q}?",
        "Tell me {q}.",
        "Do you know {q}?",
        "Please tell me {q}.",
        "Can you tell me {q}?",
        "I want to know {q}.",
        "Name {q}.",
        "Give {q}.",
        "Could you tell me {q}?",
        "I would like to know {q}.",
    ),
    "zh": (
        "{q}是什么？",
        "请说出{q}。",
        "你知道{q}吗？",
        "告诉我{q}。",
        "请问{q}是哪一个？",
        "我想知道{q}。",
        "{q}是哪个？",
        "说说{q}。",
        "请你说出{q}。",
        "我想问{q}。",
    ),
}
# What a frame can ask, in a fixed order: the order decides which combinations are held out.
ASKED: tuple[str, ...] = ("capital", "sound", "colour", "opposite", "en2zh", "zh2en")
_NOUN_PHRASES = {
    "capital": {"en": "the capital of {s}", "zh": "{s}的首都"},
    "sound": {"en": "the sound {as} makes", "zh": "{s}的叫声"},
    "colour": {"en": "the colour of {s}", "zh": "{s}的颜色"},
    "opposite": {"en": "the opposite of {s}", "zh": "{s}的反义词"},
    "en2zh": {"en": "the Chinese word for {s}", "zh": "“{s}”的中文"},
    "zh2en": {"en": "the English word for {s}", "zh": "“{s}”的英文"},
}
# Frame numbers held out, per language and asked. Every frame is held out for at most two of the
# six, and the two translation directions hold out different frames (so "the Chinese word for"
# trains with the frames "the English word for" is tested with, and the other way round).
# Chinese BPE merges a noun phrase with the characters after it ("丹麦的首都是", "的中文是什么" are
# single pieces), so a frame that goes on after the noun phrase would give a held-out question a
# piece no training question has: a test of tokenization, not of phrasing. Chinese therefore holds
# out only frames that end with the noun phrase and "。" (1, 3, 5, 7, 8, 9); English, whose pieces
# stop at spaces, holds out any.
_HELD_OUT_FRAMES = {
    "en": {
        "capital": (0, 6),
        "sound": (2, 8),
        "colour": (4, 9),
        "opposite": (1, 5),
        "en2zh": (3, 5),
        "zh2en": (1, 7),
    },
    "zh": {
        "capital": (1, 5),
        "sound": (3, 7),
        "colour": (5, 8),
        "opposite": (7, 9),
        "en2zh": (8, 1),
        "zh2en": (9, 3),
    },
}
FRAME_SHARE = 0.8  # share of training questions asked through a shared frame


def frame_held_out(frame: int, asked: str, lang: str) -> bool:
    """Whether frame number `frame` asking `asked` in `lang` is held out (two per `asked`)."""
    return frame in _HELD_OUT_FRAMES[lang][asked]


def held_out_phrasings(asked: str, lang: str) -> tuple[str, ...]:
    """The held-out question templates for `asked` in `lang` ({s} is the subject or word)."""
    phrase = _NOUN_PHRASES[asked][lang]
    return tuple(
        frame.replace("{q}", phrase)
        for index, frame in enumerate(_FRAMES[lang])
        if frame_held_out(index, asked, lang)
    )


def training_phrasings(asked: str, lang: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(shared-frame templates, own templates) that training text may use for `asked` in `lang`."""
    phrase = _NOUN_PHRASES[asked][lang]
    framed = tuple(
        frame.replace("{q}", phrase)
        for index, frame in enumerate(_FRAMES[lang])
        if not frame_held_out(index, asked, lang)
    )
    return framed, _OWN_PHRASINGS[asked][lang]


def _pick_question(rng: random.Random, split: str, asked: str, lang: str) -> str:
    if split == "val":
        return rng.choice(held_out_phrasings(asked, lang))
    framed, own = training_phrasings(asked, lang)
    return rng.choice(framed if rng.random() < FRAME_SHARE else own)


# Phrasings of one relation or direction only, training only (none is a shared-frame form).
_OWN_PHRASINGS = {
    "capital": {
        "en": (
            "{s} has which capital city?",
            "Which city is the capital of {s}?",
            "What is the capital city of {s}?",
        ),
        "zh": ("{s}的首都叫什么？", "{s}的首都是哪个城市？", "{s}的首都是哪里？"),
    },
    "sound": {
        "en": ("What sound does {as} make?", "What does {as} say?", "What noise does {as} make?"),
        "zh": ("{s}怎么叫？", "{s}是怎么叫的？"),
    },
    "colour": {
        "en": ("What colour is {s}?", "Which colour is {s}?"),
        "zh": ("{s}是什么颜色的？", "{s}是什么颜色？"),
    },
    "opposite": {
        "en": ("What word is the opposite of {s}?", "Which word is the opposite of {s}?"),
        "zh": ("{s}的反义词是哪个词？", "{s}的反义词是什么词？"),
    },
    "en2zh": {
        "en": (
            "Translate into Chinese.\n{s}",
            "How do you say {s} in Chinese?",
            "Say {s} in Chinese.",
        ),
        "zh": ("把这个词翻译成中文。\n{s}", "{s}用中文怎么说？", "“{s}”翻译成中文是什么？"),
    },
    "zh2en": {
        "en": (
            "Translate into English.\n{s}",
            "What does {s} mean in English?",
            "Say {s} in English.",
        ),
        "zh": ("把这个词翻译成英文。\n{s}", "{s}用英文怎么说？", "“{s}”翻译成英文是什么？"),
    },
}

_RELATIONS: tuple[_Relation, ...] = (
    _Relation(
        name="capital",
        rows=tables.CAPITALS,
        statements={
            "en": (
                "The capital of {s} is {a}.",
                "{a} is the capital of {s}.",
                "{s} has its capital in {a}.",
                "The capital city of {s} is {a}.",
                "{a} is the capital city of {s}.",
            ),
            "zh": (
                "{s}的首都是{a}。",
                "{a}是{s}的首都。",
                "{s}的首都叫{a}。",
                "{s}的首都城市是{a}。",
            ),
        },
    ),
    _Relation(
        name="sound",
        rows=tables.ANIMAL_SOUNDS,
        statements={
            "en": (
                "{As} says {a}.",
                "The {s} goes {a}.",
                "{As} makes the sound {a}.",
                "When {as} talks, it says {a}.",
            ),
            "zh": ("{s}的叫声是{a}。", "{s}{a}地叫。", "{s}会发出{a}的声音。"),
        },
    ),
    _Relation(
        name="colour",
        rows=tables.COLOURS_OF_THINGS,
        statements={
            "en": ("{S} is {a}.", "The colour of {s} is {a}.", "{S} has a {a} colour."),
            "zh": ("{s}是{a}的。", "{s}的颜色是{a}。"),
        },
    ),
    _Relation(
        name="opposite",
        rows=_opposite_rows(),
        statements={
            "en": ("The opposite of {s} is {a}.", "{S} is the opposite of {a}."),
            "zh": ("{s}的反义词是{a}。", "{s}和{a}意思相反。"),
        },
    ),
)


def _fill(template: str, subject: str, answer: str = "") -> str:
    return template.format(
        s=subject,
        S=_cap(subject),
        a=answer,
        **(
            {"as": _article(subject), "As": _cap(_article(subject))}
            if subject[:1].isascii()
            else {"as": subject, "As": subject}
        ),
    )


def _fact_row(rel: _Relation, row: tuple[str, str, str, str], lang: str) -> tuple[str, str]:
    return (row[0], row[1]) if lang == "en" else (row[2], row[3])


def _facts_item(rng: random.Random, split: str, lang: str) -> _Item:
    rel = rng.choice(_RELATIONS)
    row = rng.choice(rel.rows)
    subject, answer = _fact_row(rel, row, lang)
    others = sorted({_fact_row(rel, r, lang)[1] for r in rel.rows} - {answer})
    wrong = rng.choice(others)
    statement = rel.statements[lang][0]
    return _Item(
        task="facts",
        lang=lang,
        instruction=_fill(_pick_question(rng, split, rel.name, lang), subject),
        input="",
        answer=answer,
        wrong=wrong,
        sentence=_fill(statement, subject, answer),
        wrong_sentence=_fill(statement, subject, wrong),
    )


def _fact_statement(rng: random.Random, lang: str) -> str:
    rel = rng.choice(_RELATIONS)
    subject, answer = _fact_row(rel, rng.choice(rel.rows), lang)
    return _fill(rng.choice(rel.statements[lang]), subject, answer)


# ----------------------------------------------------------------------------------------------
# translation
# ----------------------------------------------------------------------------------------------


def _translation_sentence(lang: str, direction: str, word: str, target: str) -> str:
    if lang == "en":
        into = "Chinese" if direction == "en2zh" else "English"
        return f"The {into} word for {word} is {target}."
    into = "中文" if direction == "en2zh" else "英文"
    return f"“{word}”的{into}是“{target}”。"


def _translation_item(rng: random.Random, split: str, lang: str) -> _Item:
    direction = rng.choice(("en2zh", "zh2en"))
    en, zh = rng.choice(tables.DICTIONARY)
    word, target = (en, zh) if direction == "en2zh" else (zh, en)
    other_en, other_zh = rng.choice([pair for pair in tables.DICTIONARY if pair[0] != en])
    wrong = other_zh if direction == "en2zh" else other_en
    instruction, _, input_text = _pick_question(rng, split, direction, lang).partition("\n")
    return _Item(
        task="translation",
        lang=lang,
        instruction=instruction.replace("{s}", word),
        input=input_text.replace("{s}", word),
        answer=target,
        wrong=wrong,
        sentence=_translation_sentence(lang, direction, word, target),
        wrong_sentence=_translation_sentence(lang, direction, word, wrong),
    )


_DICTIONARY_STATEMENTS = {
    "en": (
        "The Chinese word for {en} is {zh}.",
        "{zh} means {en} in English.",
        "In Chinese, {en} is {zh}.",
        "The English word for {zh} is {en}.",
    ),
    "zh": (
        "“{en}”的中文是“{zh}”。",
        "{zh}的英文是{en}。",
        "{en}在中文里是{zh}。",
        "英语的{en}就是中文的{zh}。",
    ),
}


# ----------------------------------------------------------------------------------------------
# string_ops (operations on lists of words; held out: the words themselves)
# ----------------------------------------------------------------------------------------------


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


_ITEM_MAKERS: dict[str, Callable[[random.Random, str, str], _Item]] = {
    "addition": _addition_item,
    "facts": _facts_item,
    "translation": _translation_item,
    "string_ops": _string_ops_item,
}

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


# ----------------------------------------------------------------------------------------------
# Pretraining documents
# ----------------------------------------------------------------------------------------------


def _names(rng: random.Random, lang: str, k: int = 2) -> list[str]:
    return rng.sample(tables.NAMES_EN if lang == "en" else tables.NAMES_ZH, k)


# "On a rainy day" needs no weather sentence after it (and must not get "Snow fell softly.").
_TIMES_SAYING_WEATHER = {time for pair in tables.STORY_TIMES[-3:] for time in pair}


def _one_story_en(rng: random.Random) -> str:
    name, friend = _names(rng, "en")
    time, _ = rng.choice(tables.STORY_TIMES)
    place, _ = rng.choice(tables.STORY_PLACES)
    animal, _, _ = rng.choice(tables.STORY_ANIMALS)
    thing, _, _ = rng.choice(tables.STORY_THINGS)
    adj, _ = rng.choice(tables.STORY_ANIMAL_ADJECTIVES)
    adj2, _ = rng.choice(tables.STORY_ADJECTIVES)
    sad, _ = rng.choice(tables.STORY_SAD_FEELINGS)
    feeling2, _ = rng.choice(tables.STORY_FEELINGS)
    weather, _ = rng.choice(tables.STORY_WEATHER)
    ending, _ = rng.choice(tables.STORY_ENDINGS)
    plot = rng.randrange(3)
    lines = [f"{time}, {name} went to the {place} with {friend}."]
    if rng.random() < 0.6 and time not in _TIMES_SAYING_WEATHER:
        lines.append(weather)
    if plot == 0:  # a lost thing
        lines += [
            f"There they met {_article(adj)} {animal}.",
            f"The {animal} looked {sad} because it had lost its {adj2} {thing}.",
            f'"We can help you," said {friend}.',
            f"{name} looked under a tree and {friend} looked behind a rock.",
            f"At last {name} found the {thing} and gave it back to the {animal}.",
            f"The {animal} was so {rng.choice(('happy', 'proud', 'calm'))} that it danced.",
        ]
    elif plot == 1:  # sharing
        lines += [
            f"{name} had {_article(adj2)} {thing} in a bag.",
            f"{friend} did not have anything and felt {sad}.",
            f'"Let us share," said {name}, and {name} gave the {thing} to {friend}.',
            f"{friend} smiled and said thank you.",
            f"Then they saw {_article(adj)} {animal} playing near the {place}.",
        ]
    else:  # counting
        k = rng.randint(2, 9)
        lines += [
            f"{name} wanted to count the birds in the sky.",
            f'"I see {k} birds," said {name}.',
            f'"No, there are {k + 1}," said {friend}, and they both laughed.',
            f"{_cap(_article(adj))} {animal} watched them from far away.",
            f"{friend} felt {feeling2} and drew a picture of the {animal}.",
        ]
    lines.append(f"In the end, {name} and {friend} {ending}.")
    return " ".join(lines)


def _one_story_zh(rng: random.Random) -> str:
    name, friend = _names(rng, "zh")
    _, time = rng.choice(tables.STORY_TIMES)
    _, place = rng.choice(tables.STORY_PLACES)
    _, animal, animal_mw = rng.choice(tables.STORY_ANIMALS)
    _, thing, thing_mw = rng.choice(tables.STORY_THINGS)
    _, adj = rng.choice(tables.STORY_ANIMAL_ADJECTIVES)
    _, adj2 = rng.choice(tables.STORY_ADJECTIVES)
    _, sad = rng.choice(tables.STORY_SAD_FEELINGS)
    _, feeling2 = rng.choice(tables.STORY_FEELINGS)
    _, weather = rng.choice(tables.STORY_WEATHER)
    _, ending = rng.choice(tables.STORY_ENDINGS)
    plot = rng.randrange(3)
    lines = [f"{time}，{name}和{friend}一起去了{place}。"]
    if rng.random() < 0.6 and time not in _TIMES_SAYING_WEATHER:
        lines.append(weather)
    if plot == 0:
        lines += [
            f"他们在那里遇到了一{animal_mw}{adj}的{animal}。",
            f"{animal}看起来很{sad}，因为它丢了一{thing_mw}{adj2}的{thing}。",
            f"{friend}说：“我们来帮你吧。”",
            f"{name}在树下找，{friend}在石头后面找。",
            f"最后{name}找到了{thing}，把它还给了{animal}。",
            f"{animal}高兴得跳起舞来。",
        ]
    elif plot == 1:
        lines += [
            f"{name}的包里有一{thing_mw}{adj2}的{thing}。",
            f"{friend}什么也没有，觉得有点{sad}。",
            f"{name}说：“我们一起分享吧。”然后把{thing}给了{friend}。",
            f"{friend}笑着说：“谢谢你！”",
            f"这时，他们看见一{animal_mw}{adj}的{animal}在{place}旁边玩。",
        ]
    else:
        k = rng.randint(2, 9)
        lines += [
            f"{name}想数一数天上的鸟。",
            f"{name}说：“我看见了{k}只鸟。”",
            f"{friend}说：“不对，是{k + 1}只。”两个人都笑了。",
            f"一{animal_mw}{adj}的{animal}在远处看着他们。",
            f"{friend}觉得很{feeling2}，就画了一张{animal}的画。",
        ]
    lines.append(f"最后，{name}和{friend}{ending}。")
    return "".join(lines)


def _story_en(rng: random.Random) -> tuple[str, str]:
    return "\n\n".join(_one_story_en(rng) for _ in range(rng.randint(1, 3))), "story"


def _story_zh(rng: random.Random) -> tuple[str, str]:
    return "\n\n".join(_one_story_zh(rng) for _ in range(rng.randint(1, 3))), "story"


_NEUTRAL_PEOPLE = tuple(
    pair for pair in tables.PEOPLE if pair[0] in {"friend", "teacher", "student", "doctor", "child"}
)


def _parallel_pair(rng: random.Random) -> tuple[str, str]:
    i = rng.randrange(len(tables.NAMES_EN))
    name_en, name_zh = tables.NAMES_EN[i], tables.NAMES_ZH[i]
    pattern = rng.randrange(6)
    if pattern == 0:
        en, zh = rng.choice(tables.FOOD)
        return f"{name_en} likes {en}.", f"{name_zh}喜欢{zh}。"
    if pattern == 1:
        en, zh, _ = rng.choice(tables.STORY_ANIMALS)
        colour_en, colour_zh = rng.choice(tables.COLOURS)
        return f"The {en} is {colour_en}.", f"{zh}是{colour_zh}的。"
    if pattern == 2:
        en, zh, mw = rng.choice(tables.STORY_THINGS)
        return f"I see {_article(en)}.", f"我看见一{mw}{zh}。"
    if pattern == 3:
        en, zh = rng.choice(_NEUTRAL_PEOPLE)
        return f"{name_en} is my {en}.", f"{name_zh}是我的{zh}。"
    if pattern == 4:
        place_en, place_zh = rng.choice(tables.STORY_PLACES)
        when_en, when_zh = rng.choice((("today", "今天"), ("tomorrow", "明天")))
        return f"We go to the {place_en} {when_en}.", f"我们{when_zh}去{place_zh}。"
    en, zh, _ = rng.choice(tables.STORY_THINGS)
    return f"The {en} is on the table.", f"{zh}在桌子上。"


def _parallel_doc(rng: random.Random) -> tuple[str, str]:
    lines = [rng.choice(("English and Chinese:", "中英对照：", "Sentences in two languages."))]
    for _ in range(rng.randint(8, 14)):
        en, zh = _parallel_pair(rng)
        lines += [en, zh]
    return "\n".join(lines), "translation"


def _facts_doc(rng: random.Random) -> tuple[str, str]:
    lang = rng.choice(LANGS)
    headings = {
        "en": ("Some facts.", "Did you know?", "Facts about the world.", ""),
        "zh": ("一些常识。", "你知道吗？", "关于世界的知识。", ""),
    }[lang]
    if rng.random() < 0.4:  # a whole table in one go, in one phrasing style
        rel = rng.choice(_RELATIONS)
        rows = rng.sample(rel.rows, min(len(rel.rows), rng.randint(10, 18)))
        lines = [_fill(rng.choice(rel.statements[lang]), *_fact_row(rel, r, lang)) for r in rows]
    else:
        lines = [_fact_statement(rng, lang) for _ in range(rng.randint(10, 18))]
    heading = rng.choice(headings)
    sep = " " if lang == "en" else ""
    body = sep.join(lines)
    return (f"{heading}\n{body}" if heading else body), "facts"


def _dictionary_doc(rng: random.Random) -> tuple[str, str]:
    lang = rng.choice(LANGS)
    entries = rng.sample(tables.DICTIONARY, rng.randint(12, 22))
    if rng.random() < 0.3:  # a word list
        heading = "Word list:" if lang == "en" else "单词表："
        sep = rng.choice((" - ", ": ", " = "))
        lines = [heading] + [
            f"{en}{sep}{zh}" if lang == "en" else f"{zh}{sep}{en}" for en, zh in entries
        ]
        return "\n".join(lines), "translation"
    templates = _DICTIONARY_STATEMENTS[lang]
    lines = [rng.choice(templates).format(en=en, zh=zh) for en, zh in entries]
    return ("\n" if rng.random() < 0.5 else (" " if lang == "en" else "")).join(
        lines
    ), "translation"


_COUNTABLE = (
    ("apples", "个苹果"),
    ("books", "本书"),
    ("stickers", "张贴纸"),
    ("coins", "个硬币"),
    ("marbles", "颗弹珠"),
    ("cookies", "块饼干"),
    ("pencils", "支铅笔"),
)


def _arithmetic_doc(rng: random.Random) -> tuple[str, str]:
    lang = rng.choice(LANGS)
    lines = []
    for _ in range(rng.randint(10, 16)):
        a, b = _draw_pair(rng, "train")
        total = a + b
        style = rng.randrange(5)
        if lang == "en":
            if style == 0:
                lines.append(f"{a} + {b} = {total}")
            elif style == 1:
                lines.append(f"{a} plus {b} is {total}.")
            elif style == 2:
                lines.append(f"If you add {a} and {b}, you get {total}.")
            elif style == 3:
                lines.append(f"The sum of {a} and {b} is {total}.")
            else:
                name, friend = _names(rng, "en")
                things, _ = rng.choice(_COUNTABLE)
                lines.append(
                    f"{name} has {a} {things}. {friend} gives {name} {b} more. "
                    f"Now {name} has {total} {things}."
                )
        else:
            if style == 0:
                lines.append(f"{a} + {b} = {total}")
            elif style == 1:
                lines.append(f"{a}加{b}等于{total}。")
            elif style == 2:
                lines.append(f"{a}和{b}的和是{total}。")
            elif style == 3:
                lines.append(f"把{a}和{b}加起来，得到{total}。")
            else:
                name, friend = _names(rng, "zh")
                _, unit = rng.choice(_COUNTABLE)
                lines.append(
                    f"{name}有{a}{unit}，{friend}又给了{name}{b}{unit}，"
                    f"现在{name}一共有{total}{unit}。"
                )
    return "\n".join(lines), "addition"


def _lists_doc(rng: random.Random) -> tuple[str, str]:
    lang = rng.choice(LANGS)
    sep = _LIST_SEP[lang]
    parts = []
    for _ in range(rng.randint(3, 6)):
        words = _draw_list(rng, lang, "train", 3, 5)
        listed, backwards = sep.join(words), sep.join(reversed(words))
        if lang == "en":
            parts.append(
                f"Here is a list of words:\n{listed}\nBackwards, the list reads:\n{backwards}\n"
                f"The first word is {words[0]} and the last word is {words[-1]}. "
                f"The list has {len(words)} words."
            )
        else:
            parts.append(
                f"这是一组词：{listed}。倒过来是：{backwards}。"
                f"第一个词是{words[0]}，最后一个词是{words[-1]}。这组词一共有{len(words)}个。"
            )
    return "\n\n".join(parts), "string_ops"


def _quiz_doc(rng: random.Random) -> tuple[str, str]:
    # Question and answer each start a line, as they start a chat turn: same tokens as in SFT.
    lang = rng.choice(LANGS)
    q, a = ("Q:", "A:") if lang == "en" else ("问：", "答：")
    blocks = []
    for _ in range(rng.randint(8, 14)):
        item = _make_item(rng, "train", rng.choice(TASK_FAMILIES), lang)
        blocks.append(f"{q}\n{item.user_text}\n{a}\n{item.answer}")
    return "\n\n".join(blocks), "quiz"


_PRETRAIN_MIX: tuple[tuple[Callable[[random.Random], tuple[str, str]], float], ...] = (
    (_story_en, 0.12),
    (_story_zh, 0.10),
    (_parallel_doc, 0.07),
    (_facts_doc, 0.16),
    (_dictionary_doc, 0.10),
    (_arithmetic_doc, 0.10),
    (_lists_doc, 0.10),
    (_quiz_doc, 0.25),  # closest to what SFT asks: questions and answers, training split only
)
