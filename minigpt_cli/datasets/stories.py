"""Short stories for pretraining, told in English or Chinese from the same random draws."""

from __future__ import annotations

import random

from minigpt_cli.datasets import tables
from minigpt_cli.datasets._common import LANGS, _article, _cap, _names

# "On a rainy day" needs no weather sentence after it (and must not get "Snow fell softly.").
_TIMES_SAYING_WEATHER = {time for pair in tables.STORY_TIMES[-3:] for time in pair}

# language -> (first line, last line) of every story.
_STORY_FRAME = {
    "en": (
        "{time}, {name} went to the {place} with {friend}.",
        "In the end, {name} and {friend} {ending}.",
    ),
    "zh": ("{time}，{name}和{friend}一起去了{place}。", "最后，{name}和{friend}{ending}。"),
}
# language -> the three plots, in order: a lost thing, sharing, counting. English articles are
# fields of their own ({a_adj}: "a big", "an old"; {A_adj}: the same capitalised), Chinese measure
# words too ({animal_mw}, {thing_mw}); {mood} and {k} are drawn for the plot that uses them.
_STORY_PLOTS = {
    "en": (
        (  # a lost thing
            "There they met {a_adj} {animal}.",
            "The {animal} looked {sad} because it had lost its {adj2} {thing}.",
            '"We can help you," said {friend}.',
            "{name} looked under a tree and {friend} looked behind a rock.",
            "At last {name} found the {thing} and gave it back to the {animal}.",
            "The {animal} was so {mood} that it danced.",
        ),
        (  # sharing
            "{name} had {a_adj2} {thing} in a bag.",
            "{friend} did not have anything and felt {sad}.",
            '"Let us share," said {name}, and {name} gave the {thing} to {friend}.',
            "{friend} smiled and said thank you.",
            "Then they saw {a_adj} {animal} playing near the {place}.",
        ),
        (  # counting
            "{name} wanted to count the birds in the sky.",
            '"I see {k} birds," said {name}.',
            '"No, there are {k_more}," said {friend}, and they both laughed.',
            "{A_adj} {animal} watched them from far away.",
            "{friend} felt {feeling2} and drew a picture of the {animal}.",
        ),
    ),
    "zh": (
        (
            "他们在那里遇到了一{animal_mw}{adj}的{animal}。",
            "{animal}看起来很{sad}，因为它丢了一{thing_mw}{adj2}的{thing}。",
            "{friend}说：“我们来帮你吧。”",
            "{name}在树下找，{friend}在石头后面找。",
            "最后{name}找到了{thing}，把它还给了{animal}。",
            "{animal}高兴得跳起舞来。",
        ),
        (
            "{name}的包里有一{thing_mw}{adj2}的{thing}。",
            "{friend}什么也没有，觉得有点{sad}。",
            "{name}说：“我们一起分享吧。”然后把{thing}给了{friend}。",
            "{friend}笑着说：“谢谢你！”",
            "这时，他们看见一{animal_mw}{adj}的{animal}在{place}旁边玩。",
        ),
        (
            "{name}想数一数天上的鸟。",
            "{name}说：“我看见了{k}只鸟。”",
            "{friend}说：“不对，是{k_more}只。”两个人都笑了。",
            "一{animal_mw}{adj}的{animal}在远处看着他们。",
            "{friend}觉得很{feeling2}，就画了一张{animal}的画。",
        ),
    ),
}
_STORY_JOIN = {"en": " ", "zh": ""}


def _one_story(rng: random.Random, lang: str) -> str:
    """One story in `lang`.

    Both languages draw the same things in the same order from the same tables (whose rows are
    English, Chinese[, measure word]), then fill their own templates.
    """
    column = LANGS.index(lang)
    name, friend = _names(rng, lang)
    time = rng.choice(tables.STORY_TIMES)[column]
    place = rng.choice(tables.STORY_PLACES)[column]
    animal = rng.choice(tables.STORY_ANIMALS)
    thing = rng.choice(tables.STORY_THINGS)
    adj = rng.choice(tables.STORY_ANIMAL_ADJECTIVES)[column]
    adj2 = rng.choice(tables.STORY_ADJECTIVES)[column]
    sad = rng.choice(tables.STORY_SAD_FEELINGS)[column]
    feeling2 = rng.choice(tables.STORY_FEELINGS)[column]
    weather = rng.choice(tables.STORY_WEATHER)[column]
    ending = rng.choice(tables.STORY_ENDINGS)[column]
    plot = rng.randrange(3)
    fields: dict[str, object] = {
        "name": name,
        "friend": friend,
        "time": time,
        "place": place,
        "animal": animal[column],
        "animal_mw": animal[2],
        "thing": thing[column],
        "thing_mw": thing[2],
        "adj": adj,
        "adj2": adj2,
        "sad": sad,
        "feeling2": feeling2,
        "ending": ending,
    }
    if lang == "en":
        fields.update(a_adj=_article(adj), A_adj=_cap(_article(adj)), a_adj2=_article(adj2))
    first, last = _STORY_FRAME[lang]
    lines = [first.format(**fields)]
    if rng.random() < 0.6 and time not in _TIMES_SAYING_WEATHER:
        lines.append(weather)
    if plot == 0 and lang == "en":  # how the animal felt: said (and drawn) in English only
        fields["mood"] = rng.choice(("happy", "proud", "calm"))
    elif plot == 2:
        k = rng.randint(2, 9)
        fields.update(k=k, k_more=k + 1)
    lines += [template.format(**fields) for template in _STORY_PLOTS[lang][plot]]
    lines.append(last.format(**fields))
    return _STORY_JOIN[lang].join(lines)


def _story_en(rng: random.Random) -> tuple[str, str]:
    return "\n\n".join(_one_story(rng, "en") for _ in range(rng.randint(1, 3))), "story"


def _story_zh(rng: random.Random) -> tuple[str, str]:
    return "\n\n".join(_one_story(rng, "zh") for _ in range(rng.randint(1, 3))), "story"
