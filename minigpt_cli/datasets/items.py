"""Question items of every family, drawn balanced over family and language."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

from minigpt_cli.datasets._common import LANGS, TASK_FAMILIES, _Item
from minigpt_cli.datasets.addition import _addition_item
from minigpt_cli.datasets.facts import _facts_item
from minigpt_cli.datasets.string_ops import _string_ops_item
from minigpt_cli.datasets.translation import _translation_item

_ITEM_MAKERS: dict[str, Callable[[random.Random, str, str], _Item]] = {
    "addition": _addition_item,
    "facts": _facts_item,
    "translation": _translation_item,
    "string_ops": _string_ops_item,
}


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
