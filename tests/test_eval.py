"""`minigpt eval`: each metric against a hand computation or SFT's own numbers; the CLI contract."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from minigpt_cli.engine.data import chat_template
from minigpt_cli.engine.data.stage_records import builtin_records
from minigpt_cli.engine.evaluate import answers as eval_answers
from minigpt_cli.engine.evaluate import data as eval_data
from minigpt_cli.engine.evaluate import preferences as eval_preferences
from minigpt_cli.engine.evaluate import report as eval_report
from minigpt_cli.engine.evaluate import run as eval_run
from minigpt_cli.engine.metrics import text as text_metrics
from minigpt_cli.engine.metrics.exact_match import score_answers, select_per_family
from minigpt_cli.engine.runs.load import load_run
from tests.conftest import run_cli

# Long enough for three windows of the fixture's 64-token context, English and Chinese mixed.
TEXT = (
    "Once upon a time a small fox lived by the river. Every morning it counted the stones: "
    "one, two, three, and then it swam. 从前有一只小狐狸住在河边。它每天早上数石头。"
    "The capital of France is Paris, and the opposite of hot is cold. 十二加七等于十九。"
)


def _logprobs(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1, straight from the model's logits."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]]))[0].double()
    return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(ids[1:]).unsqueeze(1))[:, 0]


def _json_run(result_stdout: str, index: int = 0) -> dict:
    return json.loads(result_stdout)["runs"][index]


# ------------------------------------------------------------------------------ text metrics


def test_ppl_and_bpb_equal_the_hand_computation_from_logits(
    tiny_pretrain_run: Path, tiny_sft_run: Path, tmp_path: Path
) -> None:
    loaded = load_run(tiny_pretrain_run)
    model, tokenizer = loaded.model, loaded.tokenizer
    context = model.config.context_length
    ids = [tokenizer.eos_id, *tokenizer.encode(TEXT)]
    assert len(ids) > 2 * context + 1  # the document spans several windows
    nats = 0.0
    for start in range(0, len(ids) - 1, context):  # each window sees only its own tokens
        nats -= float(_logprobs(model, ids[start : start + context + 1]).sum())
    tokens, text_bytes = len(ids) - 1, len(TEXT.encode("utf-8"))

    score = text_metrics.score_text(model, tokenizer, [TEXT])
    assert score.tokens == tokens and score.bytes == text_bytes
    assert score.nats == pytest.approx(nats, rel=1e-5)
    # bits per byte times bytes is the text's information in bits, whatever the tokenizer.
    assert score.metrics()["bpb"] * text_bytes == pytest.approx(nats / math.log(2), rel=1e-4)

    text_file = tmp_path / "doc.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    result = run_cli(
        "eval", tiny_pretrain_run, "--text", text_file, "--no-generation", "--no-pref", "--json"
    )
    assert result.returncode == 0, result.stderr
    run = _json_run(result.stdout)
    assert run["counts"] == {"text_documents": 1, "text_tokens": tokens, "text_bytes": text_bytes}
    assert run["metrics"]["ppl"] == pytest.approx(math.exp(nats / tokens), abs=2e-3)
    assert run["metrics"]["bpb"] == pytest.approx(nats / math.log(2) / text_bytes, abs=2e-5)
    assert set(run["metrics"]) == {"nll", "ppl", "bpb"}


def test_windows_cover_every_token_once() -> None:
    windows = text_metrics.document_windows(list(range(10)), 4)
    assert windows == [([0, 1, 2, 3], [1, 2, 3, 4]), ([4, 5, 6, 7], [5, 6, 7, 8]), ([8], [9])]


def test_builtin_text_is_the_tail_pretraining_held_out(tiny_pretrain_run: Path) -> None:
    documents, line = eval_data.builtin_heldout_documents(tiny_pretrain_run)
    corpus = [r["text"] for r in builtin_records("pretrain", "train", 400, 0)]
    # Tiny fixture corpus: 400 documents, 5 % of the tokens held out: a few documents at the end.
    assert 5 <= len(documents) < 40
    assert documents == corpus[-len(documents) :]
    assert f"{len(documents)} built-in documents" in line


# ------------------------------------------------------------------------------ BLEU and ROUGE


def test_bleu_pools_sacrebleu_statistics_and_picks_the_tokenizer_per_language() -> None:
    from sacrebleu.metrics import BLEU

    english = ("the cat sat on the mat", "the cat is on the mat")
    chinese = ("我爱北京天安门", "我爱北京")
    assert text_metrics.bleu_tokenizer(english[1]) == "13a"
    assert text_metrics.bleu_tokenizer(chinese[1]) == "zh"
    # One language alone: exactly sacrebleu's corpus BLEU (4-grams present: effective order moot).
    alone = text_metrics.corpus_bleu([text_metrics.bleu_stats(*english)])
    assert alone == pytest.approx(
        BLEU(tokenize="13a").corpus_score([english[0]], [[english[1]]]).score
    )
    # Chinese by characters: precisions 4/7, 3/6, 2/5, 1/4, no brevity penalty (hypothesis longer).
    zh = text_metrics.corpus_bleu([text_metrics.bleu_stats(*chinese)])
    assert zh == pytest.approx(100 * (4 / 7 * 3 / 6 * 2 / 5 * 1 / 4) ** 0.25, abs=1e-6)
    # 13a sees one unsplit "word" on each side: nothing matches.
    assert text_metrics.corpus_bleu([text_metrics.bleu_stats(*chinese, tokenize="13a")]) == 0.0
    # Mixed corpus: each example keeps its own tokenizer, statistics pooled.
    both = [text_metrics.bleu_stats(*english), text_metrics.bleu_stats(*chinese)]
    correct = [a + b for a, b in zip(both[0].correct, both[1].correct, strict=True)]
    total = [a + b for a, b in zip(both[0].total, both[1].total, strict=True)]
    pooled = BLEU.compute_bleu(correct, total, 6 + 7, 6 + 4, smooth_method="exp").score
    assert text_metrics.corpus_bleu(both) == pytest.approx(pooled)
    # Right answers too short for 4-grams score 100 (effective order), not 0.
    short = [text_metrics.bleu_stats("two words", "two words"), text_metrics.bleu_stats("猫", "猫")]
    assert text_metrics.corpus_bleu(short) == pytest.approx(100.0)
    half = [text_metrics.bleu_stats("7", "7"), text_metrics.bleu_stats("8", "9")]
    assert text_metrics.corpus_bleu(half) == pytest.approx(50.0)  # unigram precision 1/2, BP 1


def test_rouge_by_hand_words_for_english_characters_for_chinese() -> None:
    scores = text_metrics.rouge_scores("The cat sat on the mat.", "the cat is on the mat")
    assert scores["rouge1"] == pytest.approx(5 / 6)  # the x2, cat, on, mat
    assert scores["rouge2"] == pytest.approx(3 / 5)  # the cat, on the, the mat
    assert scores["rougeL"] == pytest.approx(5 / 6)  # the cat on the mat
    assert text_metrics.lcs_length(list("abcde"), list("axcye")) == 3
    assert text_metrics.rouge_l(list("abcde"), list("axcye")) == pytest.approx(3 / 5)
    assert text_metrics.rouge_tokens("我爱北京, Paris 2024!") == [
        "我",
        "爱",
        "北",
        "京",
        "paris",
        "2024",
    ]
    chinese = text_metrics.rouge_scores("我爱北京", "我爱天津。")
    assert chinese == {"rouge1": 0.5, "rouge2": pytest.approx(1 / 3), "rougeL": 0.5}
    assert text_metrics.rouge_scores("", "anything") == {
        "rouge1": 0.0,
        "rouge2": 0.0,
        "rougeL": 0.0,
    }


def test_generation_metrics_per_family_and_overall() -> None:
    answers = [
        text_metrics.Answer("addition", "1+1?", "2", "2", True),
        text_metrics.Answer("addition", "2+2?", "4", "5", False),
        text_metrics.Answer("translation", "猫?", "cat", "cat", True),
        text_metrics.Answer(None, "free", "一只猫", "一只狗", False),
    ]
    metrics = text_metrics.generation_metrics(answers)
    assert metrics["exact_match"] == 0.5
    assert metrics["exact_match/addition"] == 0.5
    assert metrics["exact_match/translation"] == 1.0
    assert metrics["rouge1/addition"] == 0.5
    assert metrics["rouge1"] == pytest.approx(round((1 + 0 + 1 + 2 / 3) / 4, 4))
    assert not any(key.endswith("/None") or key.endswith("/") for key in metrics)


def test_per_family_draw_depends_on_the_seed_only() -> None:
    records = [{"task": f"t{i % 2}", "i": i} for i in range(40)] + [{"i": 99}]
    first = select_per_family(records, 5, seed=1)
    assert first == select_per_family(records, 5, seed=1)
    assert first != select_per_family(records, 5, seed=2)
    assert [r["i"] for r in first] == sorted(r["i"] for r in first)  # original order kept
    assert sum(r.get("task") == "t0" for r in first) == 5
    assert {"i": 99} in first  # untagged records are one more family
    assert select_per_family(records, None, seed=1) == records


# ------------------------------------------------------------------------------ exact match


def test_exact_match_equals_sfts_held_out_check(tiny_sft_run: Path, tmp_path: Path) -> None:
    # The records SFT's held-out check used (sft.exact_match_per_family=4 on the built-in val).
    records = select_per_family([r for r in builtin_records("sft", "val", 400) if r.get("task")], 4)
    loaded = load_run(tiny_sft_run)
    model, tokenizer = loaded.model, loaded.tokenizer
    theirs = score_answers(model, tokenizer, records, per_family=None)
    ours = eval_answers.answer_prompts(model, tokenizer, records)
    assert [a.prediction for a in ours] == [r.prediction for r in theirs]
    assert [a.correct for a in ours] == [r.correct for r in theirs]

    # A nontrivial score: references that equal the answers up to case and spacing match.
    short = eval_answers.answer_prompts(model, tokenizer, records, max_new_tokens=5)
    assert any(a.prediction.strip() for a in short[::2])
    twisted = []
    for index, (record, answer) in enumerate(zip(records, short, strict=True)):
        reference = f"  {answer.prediction.upper()} " if index % 2 == 0 else "no such answer"
        twisted.append(
            {
                **record,
                "messages": [*record["messages"][:-1], {"role": "assistant", "content": reference}],
            }
        )
    rescored = eval_answers.answer_prompts(model, tokenizer, twisted, max_new_tokens=5)
    assert [a.correct for a in rescored] == [i % 2 == 0 for i in range(len(records))]

    # Through the CLI, from a file of those records: the numbers SFT logged at its last eval.
    data = tmp_path / "held_out.jsonl"
    data.write_text(
        "".join(json.dumps({"messages": r["messages"], "task": r["task"]}) + "\n" for r in records),
        encoding="utf-8",
    )
    result = run_cli(
        "eval",
        tiny_sft_run,
        "--sft-data",
        data,
        "--per-family",
        "4",
        "--no-text",
        "--no-pref",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    metrics = _json_run(result.stdout)["metrics"]
    lines = (tiny_sft_run / "metrics.jsonl").read_text().splitlines()
    logged = [r for r in map(json.loads, lines) if r["kind"] == "eval"][-1]
    expected = {k: v for k, v in logged.items() if k.startswith("exact_match")}
    assert len(expected) == 5
    assert {k: metrics[k] for k in expected} == expected
    assert {"bleu", "rouge1", "rouge2", "rougeL", "bleu/addition"} <= set(metrics)


# ------------------------------------------------------------------------------ preferences


def test_a_tie_counts_as_wrong() -> None:
    assert eval_preferences.preference_accuracy([1.0, 2.0, 0.5], [1.0, 1.0, 0.7]) == pytest.approx(
        1 / 3
    )
    nan = float("nan")
    summary = eval_preferences.preference_summary(
        np.array([1.0, nan, 3.0]), np.array([0.0, 0.0, 3.0]), ["a", "a", "b"]
    )
    assert summary["pref_accuracy"] == 0.5  # the dropped pair (NaN) is left out, the tie is wrong
    assert summary["pref_accuracy/a"] == 1.0 and summary["pref_accuracy/b"] == 0.0
    assert summary["pref_margin"] == 0.5


PAIRS = [
    {"prompt": "What is 3 plus 4?", "chosen": "7", "rejected": "8", "task": "addition"},
    {"prompt": "Translate 猫 into English.", "chosen": "cat", "rejected": "dog", "task": "tr"},
    {
        "prompt": "What colour is snow?",
        "chosen": "white",
        "rejected": "I do not know.",
        "task": "tr",
    },
    {
        "prompt": "Human: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant:",
        "chosen": "4",
        "rejected": "5",
    },
]


def _reply_logp(
    model: torch.nn.Module, tokenizer: object, record: dict, key: str
) -> tuple[float, int]:
    """Summed log p(reply) and reply tokens from logits: the tokens after the prompt (an earlier
    assistant turn of a transcript prompt is context, not scored)."""
    from minigpt_cli.engine.data.records import normalise_record

    normal = normalise_record(record, "dpo")
    prompt = chat_template.prompt_ids(normal["prompt_messages"], tokenizer)
    ids, _ = chat_template.render_response(normal["prompt_messages"], normal[key], tokenizer)
    assert ids[: len(prompt)] == prompt
    reply = _logprobs(model, ids)[len(prompt) - 1 :]
    return float(reply.sum()), len(reply)


def test_preference_accuracy_uses_the_parent_for_sft_and_mean_logp_for_pretrain(
    tiny_pretrain_run: Path, tiny_sft_run: Path, tmp_path: Path
) -> None:
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in PAIRS), "utf-8")
    options = eval_report.EvalOptions(pref_data=(data,), parts=("preference",), per_family=None)
    report = eval_run.run_eval([tiny_sft_run, tiny_pretrain_run], options)
    sft, base = report.runs  # listed order, though the parent was scored first
    assert (sft.pref_score, base.pref_score) == (
        eval_report.PARENT_REWARD,
        eval_report.MEAN_LOGPROB,
    )
    assert sft.counts == base.counts == {"pairs": len(PAIRS)}

    base_model, tokenizer = load_run(tiny_pretrain_run).model, load_run(tiny_pretrain_run).tokenizer
    sft_model = load_run(tiny_sft_run).model
    reward, mean = {}, {}
    for key in ("chosen", "rejected"):
        reward[key], mean[key] = [], []
        for record in PAIRS:
            base_logp, count = _reply_logp(base_model, tokenizer, record, key)
            sft_logp, _ = _reply_logp(sft_model, tokenizer, record, key)
            reward[key].append(sft_logp - base_logp)
            mean[key].append(base_logp / count)
    for run, scores in ((sft, reward), (base, mean)):
        chosen, rejected = np.array(scores["chosen"]), np.array(scores["rejected"])
        assert run.metrics["pref_accuracy"] == round(float(np.mean(chosen > rejected)), 4)
        assert run.metrics["pref_margin"] == pytest.approx(np.mean(chosen - rejected), abs=2e-4)
        assert run.metrics["pref_accuracy/addition"] == float(chosen[0] > rejected[0])


# ------------------------------------------------------------------------------ the CLI


def test_json_is_identical_for_the_same_seed_and_output_writes_it(
    tiny_pretrain_run: Path, tiny_sft_run: Path, tmp_path: Path
) -> None:
    args = ["eval", tiny_pretrain_run, tiny_sft_run, "--per-family", "2", "--max-new-tokens", "4",
            "--samples", "1", "--seed", "3", "--json"]  # fmt: skip
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    out = tmp_path / "report.json"
    second = run_cli(*args, "--output", out)
    assert second.returncode == 0, second.stderr
    assert first.stdout == second.stdout
    assert out.read_text(encoding="utf-8") == first.stdout
    report = json.loads(first.stdout)
    base, sft = report["runs"]
    assert (base["stage"], sft["stage"]) == ("pretrain", "sft")
    assert (base["chat"], sft["chat"]) == (False, True)
    assert sft["parent"] == str(tiny_pretrain_run)
    assert base["counts"]["answers"] == 8  # 2 per family, 4 built-in families
    assert len(sft["samples"]) == 1 and set(sft["samples"][0]) == {
        "family", "prompt", "reference", "answer"
    }  # fmt: skip
    for key in ("ppl", "bpb", "bleu", "rouge1", "rouge2", "rougeL", "exact_match",
                "exact_match/addition", "bleu/facts", "pref_accuracy"):  # fmt: skip
        assert key in sft["metrics"] and key in base["metrics"]


def test_the_table_shows_runs_side_by_side(tiny_pretrain_run: Path, tiny_sft_run: Path) -> None:
    from rich.console import Console

    from minigpt_cli.cli.eval_cmd import print_report

    options = eval_report.EvalOptions(per_family=1, max_new_tokens=3, samples=1)
    report = eval_run.run_eval([tiny_pretrain_run, tiny_sft_run], options)
    console = Console(width=100, record=True, color_system=None)
    print_report(report, console)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 100
    names = [run.name for run in report.runs]
    assert len(set(names)) == 2  # both fixture folders are called "run": more of the path shows
    header = next(line for line in text.splitlines() if names[0] in line)
    assert names[1] in header
    assert f"{report.runs[0].metrics['bpb']:.3f}" in text
    assert "samples:" in text and "vs parent" in text and "mean logp" in text


def test_a_missing_run_exits_2_in_one_line_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-run"
    result = run_cli("eval", missing)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {missing}: no such run directory"]
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli("eval", empty)
    assert result.returncode == 2
    assert (
        len(result.stderr.strip().splitlines()) == 1 and f"{empty}: holds no model" in result.stderr
    )


def test_a_bad_data_line_exits_2_naming_file_and_line(tiny_sft_run: Path, tmp_path: Path) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 3}\n', encoding="utf-8")
    result = run_cli("eval", tiny_sft_run, "--sft-data", data, "--no-text", "--no-pref")
    assert result.returncode == 2
    assert f"{data}:2" in result.stderr and "Traceback" not in result.stderr
