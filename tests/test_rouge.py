"""ROUGE-1/2/L against Google's rouge-score: the same precision, recall and F1 for the same tokens.

Our ROUGE is hand-written (see `engine.metrics.text`); this holds it to the reference package. On
English, rouge-score tokenises with its own tokenizer (no stemmer) and ours must find the same
words; on Chinese, rouge-score is handed a tokenizer that splits the way `rouge_tokens` promises
(each Han character alone, other text as lower-cased runs of letters and digits).
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minigpt_cli.engine.metrics.text import rouge, rouge_scores, rouge_tokens

# rouge-score is a test-only dependency (the `test` extra): without it this file is skipped.
rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
rouge_tokenize = pytest.importorskip("rouge_score.tokenize")

TYPES = ["rouge1", "rouge2", "rougeL"]

# (answer, reference): word order, repeats (clipped counts), case, punctuation, digits, one-word
# answers, no overlap, identical, and empty sides.
ENGLISH = [
    ("The cat sat on the mat.", "the cat is on the mat"),
    ("the the the the", "the cat sat on the mat"),
    ("mat the on sat cat the", "the cat sat on the mat"),
    ("Paris", "Paris"),
    ("paris", "The capital of France is Paris."),
    ("12 plus 7 is 19", "19"),
    ("I don't know, sorry!", "I do not know"),
    ("a b a b a b", "b a b a"),
    ("red green blue", "cyan magenta yellow"),
    ("Once upon a time, a fox lived by the river.", "Once upon a time a fox lived by the river"),
    ("", "anything at all"),
    ("something", ""),
    ("", ""),
    ("!!! ...", "a reference"),
]

# Chinese answers, some with Latin words or digits inside and Chinese punctuation.
CHINESE = [
    ("我爱北京", "我爱天津。"),
    ("我爱北京天安门", "我爱北京"),
    ("猫猫猫", "一只猫"),
    ("十二加七等于十九。", "十九"),
    ("巴黎是法国的首都", "法国的首都是巴黎。"),
    ("答案是 19", "19"),
    ("我用 Python 写代码", "我用python写程序。"),
    ("一只狗", "一只猫"),
    ("", "一只猫"),
    ("你好，世界！", "你好世界"),
]


class CharacterTokenizer:
    """For rouge-score: Han characters one by one, other text as lower-cased ASCII words (the
    fixtures hold nothing else), written independently of `rouge_tokens`."""

    def tokenize(self, text: str) -> list[str]:
        return re.findall(r"[\u4e00-\u9fff]|[a-z0-9]+", text.lower())


def assert_same(ours: dict, theirs: dict) -> None:
    for key in TYPES:
        expected = theirs[key]
        got = ours[key]
        assert got.precision == pytest.approx(expected.precision, abs=1e-9), key
        assert got.recall == pytest.approx(expected.recall, abs=1e-9), key
        assert got.fmeasure == pytest.approx(expected.fmeasure, abs=1e-9), key


@pytest.mark.parametrize(("answer", "reference"), ENGLISH)
def test_english_equals_rouge_score(answer: str, reference: str) -> None:
    scorer = rouge_scorer.RougeScorer(TYPES, use_stemmer=False)
    assert rouge_tokens(answer) == rouge_tokenize.tokenize(answer, None)
    assert rouge_tokens(reference) == rouge_tokenize.tokenize(reference, None)
    # rouge-score takes (target, prediction): the reference first.
    assert_same(rouge(answer, reference), scorer.score(reference, answer))
    assert rouge_scores(answer, reference) == {
        key: score.fmeasure for key, score in rouge(answer, reference).items()
    }


@pytest.mark.parametrize(("answer", "reference"), CHINESE)
def test_chinese_by_character_equals_rouge_score(answer: str, reference: str) -> None:
    tokenizer = CharacterTokenizer()
    scorer = rouge_scorer.RougeScorer(TYPES, use_stemmer=False, tokenizer=tokenizer)
    assert rouge_tokens(answer) == tokenizer.tokenize(answer)
    assert rouge_tokens(reference) == tokenizer.tokenize(reference)
    assert_same(rouge(answer, reference), scorer.score(reference, answer))


def test_rouge_scores_chinese_that_rouge_scores_own_tokenizer_drops() -> None:
    """Why ours is kept: rouge-score's default tokenizer sees no tokens in Chinese at all."""
    scorer = rouge_scorer.RougeScorer(TYPES, use_stemmer=False)
    assert scorer.score("我爱天津", "我爱北京")["rouge1"].fmeasure == 0.0
    assert rouge("我爱北京", "我爱天津")["rouge1"].fmeasure == 0.5


WORDS = st.lists(st.sampled_from(["the", "cat", "sat", "on", "mat", "a", "7"]), max_size=12)


@given(answer=WORDS, reference=WORDS)
@settings(max_examples=200, deadline=None)
def test_any_word_sequences_equal_rouge_score(answer: list[str], reference: list[str]) -> None:
    scorer = rouge_scorer.RougeScorer(TYPES, use_stemmer=False)
    answer_text, reference_text = " ".join(answer), " ".join(reference)
    assert_same(rouge(answer_text, reference_text), scorer.score(reference_text, answer_text))
