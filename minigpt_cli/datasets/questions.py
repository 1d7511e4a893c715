"""Question phrasings of facts and translation: shared frames, own phrasings, which are held out."""

from __future__ import annotations

import random

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
_OWN_PHRASINGS: dict[str, dict[str, tuple[str, ...]]] = {
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
