"""What every part of the built-in generator shares: families, languages, the item, helpers."""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

from minigpt_cli.datasets import tables

TASK_FAMILIES: tuple[str, ...] = ("addition", "facts", "translation", "string_ops")
LANGS: tuple[str, ...] = ("en", "zh")


def join_instruction(instruction: str, input_text: str = "") -> str:
    """The user turn of an instruction record: the instruction, then its input on the next line.

    Defined once here so the built-in DPO/RL prompts and the SFT loader (engine/data/records.py)
    agree on what the model is shown.
    """
    return f"{instruction}\n{input_text}" if input_text else instruction


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


def _names(rng: random.Random, lang: str, k: int = 2) -> list[str]:
    return rng.sample(tables.NAMES_EN if lang == "en" else tables.NAMES_ZH, k)
