"""Pretraining documents (stories aside: see `stories`) and the mix they are drawn in."""

from __future__ import annotations

import random
from collections.abc import Callable

from minigpt_cli.datasets import tables
from minigpt_cli.datasets._common import LANGS, TASK_FAMILIES, _article, _names
from minigpt_cli.datasets.addition import _draw_pair, working
from minigpt_cli.datasets.facts import _RELATIONS, _fact_row, _fact_statement, _fill
from minigpt_cli.datasets.items import _make_item
from minigpt_cli.datasets.stories import _story_en, _story_zh
from minigpt_cli.datasets.string_ops import _LIST_SEP, _draw_list
from minigpt_cli.datasets.translation import _DICTIONARY_STATEMENTS

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


# language -> the five ways a sum is written, in style order; the last tells of a gift, with
# {things} the counted things ("apples"; in Chinese with their measure word, "个苹果").
_SUM_LINES = {
    "en": (
        "{a} + {b} = {total}",
        "{a} plus {b} is {total}.",
        "If you add {a} and {b}, you get {total}.",
        "The sum of {a} and {b} is {total}.",
        "{name} has {a} {things}. {friend} gives {name} {b} more. Now {name} has {total} {things}.",
        "{a} + {b}: {working}",
    ),
    "zh": (
        "{a} + {b} = {total}",
        "{a}加{b}等于{total}。",
        "{a}和{b}的和是{total}。",
        "把{a}和{b}加起来，得到{total}。",
        "{name}有{a}{things}，{friend}又给了{name}{b}{things}，现在{name}一共有{total}{things}。",
        "{a}加{b}：{working}",
    ),
}


def _arithmetic_doc(rng: random.Random) -> tuple[str, str]:
    lang = rng.choice(LANGS)
    lines = []
    for _ in range(rng.randint(10, 16)):
        a, b = _draw_pair(rng, "train")
        fields: dict[str, object] = {"a": a, "b": b, "total": a + b}
        fields["working"] = working(a, b, lang)[0]
        style = rng.randrange(6)
        if style == 4:  # the gift: two names and the things given
            name, friend = _names(rng, lang)
            things = rng.choice(_COUNTABLE)[LANGS.index(lang)]
            fields.update(name=name, friend=friend, things=things)
        lines.append(_SUM_LINES[lang][style].format(**fields))
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
