"""The translation family: single dictionary words between English and Chinese, both ways."""

from __future__ import annotations

import random

from minigpt_cli.datasets import tables
from minigpt_cli.datasets._common import _Item
from minigpt_cli.datasets.questions import _pick_question


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
