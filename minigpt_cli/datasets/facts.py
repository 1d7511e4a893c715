"""The facts family: four fact tables, their statements, and questions about them."""

from __future__ import annotations

import random
from dataclasses import dataclass

from minigpt_cli.datasets import tables
from minigpt_cli.datasets._common import _article, _cap, _Item
from minigpt_cli.datasets.questions import _pick_question


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
