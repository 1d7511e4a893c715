"""The built-in data generator: deterministic, balanced, and honest about what it holds out."""

from __future__ import annotations

import functools
import re
import statistics

import pytest

from minigpt_cli.datasets import (
    _common,
    addition,
    builtin,
    facts,
    questions,
    string_ops,
    tables,
    translation,
)
from minigpt_cli.engine.data.records import normalise_record
from minigpt_cli.engine.data.stage_records import builtin_records

_FACTS_ASKED = ("capital", "sound", "colour", "opposite")
SMALL = 400  # records per kind/split in most tests: enough for every family and language


@pytest.fixture(scope="module")
def pretrain_default() -> list[dict]:
    return builtin.pretrain_records(builtin.default_size("pretrain"))


@pytest.fixture(scope="module")
def pretrain_text(pretrain_default: list[dict]) -> str:
    return "\n\n".join(doc["text"] for doc in pretrain_default)


# --------------------------------------------------------------------------------------------
# Shape, determinism, sizes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", builtin.KINDS)
def test_same_seed_same_data_other_seed_other_data(kind: str) -> None:
    first = builtin.records(kind, "train", 50, seed=3)
    assert first == builtin.records(kind, "train", 50, seed=3)
    assert first != builtin.records(kind, "train", 50, seed=4)


@pytest.mark.parametrize("kind", builtin.KINDS)
def test_fewer_records_are_a_prefix_of_more(kind: str) -> None:
    # `data show -n 5` must show the first five records a stage trains on.
    assert builtin.records(kind, "train", 30, 1) == builtin.records(kind, "train", 80, 1)[:30]


def test_record_fields_and_types() -> None:
    for record in builtin.pretrain_records(50):
        assert set(record) == {"text", "task"} and record["task"] in builtin.PRETRAIN_TOPICS
        assert record["text"].strip()
    expected = {
        "sft": {"instruction", "input", "output", "task"},
        "dpo": {"prompt", "chosen", "rejected", "task"},
        "rlhf": {"prompt", "answer", "task"},
    }
    for kind, fields in expected.items():
        for split in builtin.SPLITS:
            for record in builtin.records(kind, split, SMALL, 0):
                assert set(record) - {"history"} == fields, record
                assert record["task"] in builtin.TASK_FAMILIES
                assert all(isinstance(record[f], str) for f in fields)
                normalise_record(record, kind)  # every built-in record is valid input


def test_history_only_on_a_few_training_records() -> None:
    train = builtin.sft_records("train", 2000, 0)
    with_history = [r for r in train if "history" in r]
    assert 0.02 < len(with_history) / len(train) < 0.07
    for record in with_history:
        assert 1 <= len(record["history"]) <= 2
        assert all(len(turn) == 2 and all(turn) for turn in record["history"])
    assert not any("history" in r for r in builtin.sft_records("val", SMALL, 0))
    messages = normalise_record(with_history[0], "sft")["messages"]
    assert [m["role"] for m in messages][-2:] == ["user", "assistant"]
    assert len(messages) == 2 * len(with_history[0]["history"]) + 2


@pytest.mark.parametrize("kind", ["sft", "dpo", "rlhf"])
def test_families_and_languages_are_balanced(kind: str) -> None:
    records = builtin.records(kind, "train", 800, 5)
    for family in builtin.TASK_FAMILIES:
        share = sum(r["task"] == family for r in records) / len(records)
        assert share == pytest.approx(1 / len(builtin.TASK_FAMILIES), abs=0.01)
    text_of = {"sft": "instruction", "dpo": "prompt", "rlhf": "prompt"}[kind]
    chinese = sum(bool(re.search(r"[\u4e00-\u9fff]", r[text_of])) for r in records)
    assert 0.45 < chinese / len(records) < 0.75  # zh questions, plus en questions about zh words


def test_default_sizes_and_dispatch() -> None:
    assert builtin.default_size("pretrain") == builtin.DEFAULT_TRAIN_SIZE == 6000
    assert builtin.default_size("sft", "val") == 400
    assert builtin.default_size("sft", "val", train_size=600) == 40
    assert builtin.default_size("dpo", "val", train_size=20) == builtin.MIN_VAL_SIZE
    assert len(builtin.records("rlhf", "val")) == 400
    assert builtin.records("sft", "train", 0) == []
    with pytest.raises(ValueError, match="no separate val split"):
        builtin.records("pretrain", "val", 5)
    with pytest.raises(ValueError, match="unknown data kind"):
        builtin.records("chat", "train", 5)
    with pytest.raises(ValueError, match="negative"):
        builtin.sft_records("train", -1)
    assert "built-in" in builtin.describe("sft", "train", 6000)


def test_default_pretraining_corpus_size_and_topics(
    pretrain_default: list[dict],
) -> None:
    docs = pretrain_default
    size = sum(len(d["text"].encode("utf-8")) for d in docs)
    assert 1_000_000 < size < 4_000_000  # a tokenizer trains in seconds, a tiny model sees it twice
    topics = {d["task"] for d in docs}
    assert topics == set(builtin.PRETRAIN_TOPICS)
    # Shuffled: the last 5 % (what the trainer holds out) covers every topic too.
    assert {d["task"] for d in docs[-len(docs) // 20 :]} == topics
    assert re.search(r"[\u4e00-\u9fff]", docs[-1]["text"] + docs[-2]["text"] + docs[-3]["text"])


def test_builtin_records_glue_normalises() -> None:
    sft = builtin_records("sft", "val", size=300, seed=0)
    assert len(sft) == 20 and all("messages" in r and r["task"] for r in sft)
    assert builtin_records("reward", "train", 10)[0]["prompt_messages"][0]["role"] == "user"
    assert builtin_records("pretrain", "train", 10)[0]["text"]


# --------------------------------------------------------------------------------------------
# The tables behind the data
# --------------------------------------------------------------------------------------------


def test_tables_give_one_answer_per_question() -> None:
    english = [en for en, _ in tables.DICTIONARY]
    chinese = [zh for _, zh in tables.DICTIONARY]
    assert len(set(english)) == len(english) and len(set(chinese)) == len(chinese)
    for rows in (tables.CAPITALS, tables.ANIMAL_SOUNDS, tables.COLOURS_OF_THINGS):
        assert len({r[0] for r in rows}) == len(rows) and len({r[2] for r in rows}) == len(rows)
    words = [w for pair in tables.OPPOSITE_PAIRS for w in pair[:2]]
    assert len(set(words)) == len(words)


def test_every_fact_and_dictionary_entry_is_stated_in_pretraining(pretrain_text: str) -> None:
    for relation in facts._RELATIONS:
        for row in relation.rows:
            for lang in builtin.LANGS:
                subject, answer = facts._fact_row(relation, row, lang)
                forms = [facts._fill(t, subject, answer) for t in relation.statements[lang]]
                assert any(form in pretrain_text for form in forms), (relation.name, row, lang)
    for en, zh in tables.DICTIONARY:
        assert en in pretrain_text and zh in pretrain_text
        templates = [t for ts in translation._DICTIONARY_STATEMENTS.values() for t in ts]
        forms = [t.format(en=en, zh=zh) for t in templates]
        assert any(form in pretrain_text for form in forms) or f"{en} - {zh}" in pretrain_text


# --------------------------------------------------------------------------------------------
# Held-out splits are disjoint by construction
# --------------------------------------------------------------------------------------------


def _user_text(kind: str, record: dict) -> str:
    if kind == "sft":
        return builtin.join_instruction(record["instruction"], record["input"])
    return record["prompt"]


@functools.cache
def _seed_7_records(kind: str, split: str, n: int) -> tuple[dict, ...]:
    """`builtin.records(kind, split, n, 7)`, generated once: the tests below only read them."""
    return tuple(builtin.records(kind, split, n, 7))


def _records_of(kind: str, split: str, family: str, n: int = 1200) -> list[dict]:
    return [r for r in _seed_7_records(kind, split, n) if r["task"] == family]


def _pair(text: str) -> tuple[int, int]:
    numbers = [int(x) for x in re.findall(r"\d+", text)]
    assert len(numbers) == 2, text
    return min(numbers), max(numbers)


@pytest.mark.parametrize("kind", ["sft", "dpo", "rlhf"])
def test_addition_operand_pairs_are_held_out(kind: str) -> None:
    train = {_pair(_user_text(kind, r)) for r in _records_of(kind, "train", "addition")}
    val = {_pair(_user_text(kind, r)) for r in _records_of(kind, "val", "addition")}
    assert len(val) > 50 and not train & val
    assert all(addition._pair_held_out(*p) for p in val)
    assert not any(addition._pair_held_out(*p) for p in train)


def _checked_working(answer: str, a: int, b: int) -> int:
    """The total a working states, after checking each of its steps; fails on a wrong step."""
    match = re.fullmatch(
        r"(\d)\+(\d)=(\d+)(?:, |，)(\d)\+(\d)\+([01])=(\d+)(?:, so |，所以是)(\d+)", answer
    )
    assert match, answer
    ua, ub, units, ta, tb, carry, tens, total = (int(x) for x in match.groups())
    assert {(ua, ta), (ub, tb)} == {(a % 10, a // 10), (b % 10, b // 10)}, answer
    assert units == ua + ub and carry == units // 10 and tens == ta + tb + carry, answer
    assert total == 10 * tens + units % 10, answer
    return total


def test_addition_answers_are_right() -> None:
    for record in builtin.sft_records("val", SMALL, 2) + builtin.sft_records("train", SMALL, 2):
        if record["task"] == "addition":
            a, b = _pair(_user_text("sft", record))
            if record["output"].isdigit():  # SFT's bare totals (addition.WORKED_SHARE)
                assert int(record["output"]) == a + b
            else:
                assert _checked_working(record["output"], a, b) == a + b
    bare_wrong = 0
    for record in builtin.dpo_records("train", SMALL, 2):
        if record["task"] == "addition":
            a, b = _pair(record["prompt"])
            right = str(a + b)
            assert re.search(rf"(^|\D){right}\D*$", record["chosen"])
            assert not re.search(rf"(^|\D){right}\D*$", record["rejected"])
            if record["rejected"].isdigit():
                # Against a right working, the total of the classic mistake (the carry flipped).
                _checked_working(record["chosen"], a, b)
                assert abs(int(record["rejected"]) - (a + b)) == 10
                bare_wrong += 1
    assert bare_wrong > 10


def test_pretraining_never_shows_a_held_out_pair(
    pretrain_default: list[dict],
) -> None:
    checked = 0
    for doc in pretrain_default:
        if doc["task"] == "addition":
            for line in doc["text"].splitlines():
                numbers = [int(x) for x in re.findall(r"\d+", line)]
                a, b = numbers[:2]
                if len(numbers) == 3:
                    assert a + b == numbers[2], line
                else:  # a worked sum: "47 + 58: 7+8=15, 4+5+1=10, so 105"
                    worked = line.split("：" if "：" in line else ": ", 1)[1]
                    assert _checked_working(worked, a, b) == a + b, line
                assert not addition._pair_held_out(a, b), line
                checked += 1
        elif doc["task"] == "quiz":
            for question in re.findall(r"(?:Q:|问：)\n(.*?)\n(?:A:|答：)\n", doc["text"], re.S):
                numbers = [int(x) for x in re.findall(r"\d+", question)]
                if len(numbers) == 2:
                    assert not addition._pair_held_out(*numbers), question
    assert checked > 5_000


@functools.cache
def _subject_patterns(names: tuple[str, ...]) -> list[re.Pattern[str]]:
    forms = []
    for name in sorted(names, key=len, reverse=True):
        article = _common._article(name)
        forms += [_common._cap(article), article, _common._cap(name), name]
    return [re.compile(rf"(?<![A-Za-z]){re.escape(form)}(?![A-Za-z])") for form in forms]


@functools.cache
def _skeleton(text: str, names: tuple[str, ...]) -> str:
    """The phrasing of a question with its subject (the longest known name in it) as `{s}`."""
    for pattern in _subject_patterns(names):
        if pattern.search(text):
            return pattern.sub("{s}", text, count=1)
    raise AssertionError(f"no known subject in {text!r}")


@pytest.mark.parametrize("kind", ["sft", "dpo", "rlhf"])
def test_facts_and_translation_val_phrasings_are_unseen(kind: str, pretrain_text: str) -> None:
    subjects = tuple({r[i] for rel in facts._RELATIONS for r in rel.rows for i in (0, 2)})
    words = tuple(w for pair in tables.DICTIONARY for w in pair)
    for family, names in (("facts", subjects), ("translation", words)):
        train = {_skeleton(_user_text(kind, r), names) for r in _records_of(kind, "train", family)}
        val_records = _records_of(kind, "val", family)
        val = {_skeleton(_user_text(kind, r), names) for r in val_records}
        assert len(val) >= 8 and not train & val, family
        for record in val_records:  # nor does pretraining ever ask a held-out question
            assert _user_text(kind, record) not in pretrain_text


@pytest.fixture(scope="module")
def training_characters(pretrain_default: list[dict]) -> set[str]:
    """Every character any training text holds, all kinds together: what a tokenizer learns from."""
    texts = [doc["text"] for doc in pretrain_default]
    for kind in ("sft", "dpo", "rlhf"):
        for record in builtin.records(kind, "train"):
            for value in record.values():
                if isinstance(value, str):
                    texts.append(value)
                elif isinstance(value, list):  # sft history: [[user, assistant], ...]
                    texts.extend(text for turn in value for text in turn)
    return set("".join(texts))


@pytest.mark.parametrize("kind", ["sft", "dpo", "rlhf"])
def test_held_out_phrasings_use_only_characters_seen_in_training(
    kind: str, training_characters: set[str]
) -> None:
    # A character no training text holds is a byte-fallback token the model never trained on: a
    # held-out question containing one would test byte noise, not phrasing. (Subjects and words
    # are checked too: pretraining states every one of them. string_ops holds out words and
    # addition operand pairs, so only facts and translation hold out phrasings.)
    subjects = tuple({r[i] for rel in facts._RELATIONS for r in rel.rows for i in (0, 2)})
    words = tuple(w for pair in tables.DICTIONARY for w in pair)
    expected_phrasings = {
        family: sum(
            len(builtin.held_out_phrasings(a, lang)) for a in asked for lang in builtin.LANGS
        )
        for family, asked in (("facts", _FACTS_ASKED), ("translation", ("en2zh", "zh2en")))
    }
    for family, names in (("facts", subjects), ("translation", words)):
        phrasings = set()
        for record in builtin.records(kind, "val"):
            if record["task"] != family:
                continue
            text = _user_text(kind, record)
            phrasing = _skeleton(text, names)
            phrasings.add(phrasing)
            unseen = sorted(set(text) - training_characters)
            assert not unseen, f"{phrasing!r} has characters no training text holds: {unseen}"
        assert len(phrasings) == expected_phrasings[family], family  # every phrasing was checked


def _list_words(text: str) -> list[str]:
    """The words of a string_ops question: its input, one a line (en) or joined by "、" (zh)."""
    return re.split(r"、|\n", text.split("\n", 1)[1])


@pytest.mark.parametrize("kind", ["sft", "dpo", "rlhf"])
def test_string_ops_lists_are_held_out(kind: str) -> None:
    lists: dict[str, set[tuple[str, ...]]] = {}
    for split in builtin.SPLITS:
        lists[split] = set()
        for record in _records_of(kind, split, "string_ops"):
            words = _list_words(_user_text(kind, record))
            assert 2 <= len(words) <= 6 and len(set(words)) == len(words)
            assert builtin.list_split(words) == split, words
            lists[split].add(tuple(words))
        assert len(lists[split]) > 100
    assert not lists["train"] & lists["val"]
    # Held out are the lists, not the words: every word of a held-out list is one the model has
    # seen in training lists (copying a word it never saw in a list is out of a tiny model's reach).
    train_words = {w for words in lists["train"] for w in words}
    val_words = {w for words in lists["val"] for w in words}
    assert len(val_words - train_words) <= len(val_words) // 20


_STRING_OPS_INSTRUCTIONS = {
    instruction
    for by_lang in string_ops._STRING_OPS.values()
    for phrasings in by_lang.values()
    for instruction, _ in phrasings
}


def _template_skeleton(template: str) -> str:
    """A question template written the way `_skeleton` writes a question: subject as `{s}`."""
    return template.replace("{As}", "{s}").replace("{as}", "{s}").replace("{S}", "{s}")


def test_held_out_questions_combine_a_frame_and_a_relation_seen_apart_in_training() -> None:
    # A held-out question is a (frame, relation/direction) pair never seen in training, while
    # that frame is trained with other relations and that relation with other frames.
    subjects = tuple({r[i] for rel in facts._RELATIONS for r in rel.rows for i in (0, 2)})
    words = tuple(w for pair in tables.DICTIONARY for w in pair)
    normal = _template_skeleton
    train: set[str] = set()
    val: set[str] = set()
    for family, names in (("facts", subjects), ("translation", words)):
        for split, seen in (("train", train), ("val", val)):
            for record in _records_of("sft", split, family, 6000):
                seen.add(_skeleton(_user_text("sft", record), names))
    for asked in builtin.ASKED:
        for lang in builtin.LANGS:
            held_out = {normal(t) for t in builtin.held_out_phrasings(asked, lang)}
            framed, own = builtin.training_phrasings(asked, lang)
            assert len(held_out) == 2 and held_out <= val, (asked, lang)
            if lang == "zh":  # nothing after the noun phrase for BPE to merge with
                phrase = questions._NOUN_PHRASES[asked][lang]
                assert all(t.endswith(phrase + "。") for t in held_out), held_out
            assert not held_out & train and not held_out & {normal(t) for t in own}
            assert len({normal(t) for t in framed} & train) == 8, (asked, lang)
            for index, frame in enumerate(questions._FRAMES[lang]):
                if not builtin.frame_held_out(index, asked, lang):
                    continue
                trained_with = [
                    other
                    for other in builtin.ASKED
                    if normal(frame.replace("{q}", questions._NOUN_PHRASES[other][lang])) in train
                ]
                assert len(trained_with) >= 4 and asked not in trained_with, (frame, asked)


def test_string_ops_answers_are_right() -> None:
    for record in builtin.sft_records("val", SMALL, 1):
        if record["task"] != "string_ops":
            continue
        text = _user_text("sft", record)
        words = _list_words(text)
        sep = "、" if "、" in text else "\n"
        allowed = {sep.join(reversed(words)), words[0], words[-1], str(len(words))}
        assert record["output"] in allowed


def test_pretraining_lists_are_training_lists(
    pretrain_default: list[dict],
) -> None:
    checked = set()
    for doc in pretrain_default:
        if doc["task"] == "string_ops":
            pattern = r"(?:a list of words:\n|这是一组词：)(.*?)(?:\nBackwards|。倒过来)"
            for listed in re.findall(pattern, doc["text"], re.S):
                checked.add(tuple(re.split(r"、|\n", listed)))
        elif doc["task"] == "quiz":  # a quiz asks string_ops questions too
            for question in re.findall(r"(?:Q:|问：)\n(.*?)\n(?:A:|答：)\n", doc["text"], re.S):
                if question.split("\n")[0] in _STRING_OPS_INSTRUCTIONS:
                    checked.add(tuple(_list_words(question)))
    assert len(checked) > 1000
    assert {builtin.list_split(words) for words in checked} == {"train"}


# --------------------------------------------------------------------------------------------
# DPO pairs: right vs wrong or unhelpful, and length says nothing
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", builtin.SPLITS)
def test_dpo_lengths_are_balanced(split: str) -> None:
    pairs = builtin.dpo_records(split, 2000 if split == "train" else 400, 0)
    # The one exception, by design: addition's right working against a bare wrong total.
    worked = [p for p in pairs if p["task"] == "addition" and p["rejected"].isdigit()]
    assert worked and all(len(p["chosen"]) > len(p["rejected"]) for p in worked)
    pairs = [p for p in pairs if p not in worked]
    chosen = statistics.mean(len(p["chosen"]) for p in pairs)
    rejected = statistics.mean(len(p["rejected"]) for p in pairs)
    assert abs(chosen - rejected) / chosen < 0.10
    differing = [p for p in pairs if len(p["chosen"]) != len(p["rejected"])]
    longer_wins = sum(len(p["chosen"]) > len(p["rejected"]) for p in differing) / len(differing)
    assert 0.35 < longer_wins < 0.65  # "pick the longer one" is no better than a coin
    assert all(p["chosen"] != p["rejected"] for p in pairs)


def test_dpo_rejected_is_wrong_or_unhelpful() -> None:
    unhelpful = {reply for replies in builtin._UNHELPFUL.values() for reply in replies}
    pairs = builtin.dpo_records("train", 800, 0)
    kinds = {"unhelpful": 0, "wrong": 0}
    for pair in pairs:
        kinds["unhelpful" if pair["rejected"] in unhelpful else "wrong"] += 1
        assert pair["chosen"] not in unhelpful
    assert 0.15 < kinds["unhelpful"] / len(pairs) < 0.35


def test_rlhf_answers_match_sft_outputs_for_the_same_question() -> None:
    answers = {r["prompt"]: r["answer"] for r in builtin.rlhf_records("train", 1500, 0)}
    matched = 0
    for record in builtin.sft_records("train", 1500, 0):
        question = _user_text("sft", record)
        if question in answers:
            # SFT answers some sums with the bare total; the rule still asks for the working.
            output = record["output"]
            want = answers[question]
            assert want == output or output == addition.bare_total(want)
            matched += 1
    assert matched > 50


def test_sft_answers_a_share_of_sums_bare_and_everything_else_works_them_out() -> None:
    """Training SFT gives the bare total for about 1 - WORKED_SHARE of its sums; the held-out
    references, the RLHF answers, DPO's chosen replies and the pretraining text never do."""
    train = [r for r in builtin.sft_records("train", 4000, 1) if r["task"] == "addition"]
    bare = sum(r["output"].isdigit() for r in train) / len(train)
    assert bare == pytest.approx(1 - addition.WORKED_SHARE, abs=0.05)
    val = [r for r in builtin.sft_records("val", SMALL, 1) if r["task"] == "addition"]
    rlhf = [r for r in builtin.rlhf_records("train", SMALL, 1) if r["task"] == "addition"]
    assert not any(r["output"].isdigit() for r in val)
    assert not any(r["answer"].isdigit() for r in rlhf)
    dpo = [r for r in builtin.dpo_records("train", SMALL, 1) if r["task"] == "addition"]
    assert not any(r["chosen"].isdigit() for r in dpo)
    assert addition.bare_total("7+8=15，4+5+1=10，所以是105") == "105"
    assert addition.bare_total("7+8=15, 4+5+1=10, so 105") == "105"
