"""Chapter 7 (evaluation): every metric of `minigpt eval` for the quickstart's four stages, exact
match per task family per stage, and the wrong answers of each family sorted into kinds."""

from __future__ import annotations

import json
import re
from collections import Counter

from figkit import Kit, markdown_table

FIGURES = ["ch07-exact-match.png"]
TABLES = ["ch07-metrics", "ch07-errors", "ch07-error-examples"]

STAGES = ("pretrain", "sft", "dpo", "rlhf")
FAMILIES = ("addition", "facts", "string_ops", "translation")
EXAMPLES_PER_FAMILY = 2
_NUMBER = re.compile(r"^-?\d+$")
_STEP = re.compile(r"(\d+(?:\+\d+)+)=(\d+)")


def make(kit: Kit) -> None:
    quickstart = kit.quickstart()
    report = json.loads((quickstart / "eval.json").read_text("utf-8"))
    _metrics_table(kit, report)
    answers_file = kit.workdir / "ch07" / "answers.json"
    answers_file.parent.mkdir(exist_ok=True)
    kit.minigpt(
        "eval",
        *(quickstart / stage for stage in STAGES),
        "--no-text",
        "--no-pref",
        "--samples",
        "200",
        "--output",
        answers_file,
    )
    answers = {run["stage"]: run["samples"] for run in json.loads(answers_file.read_text())["runs"]}
    _exact_match_figure(kit, answers)
    _errors(kit, answers)


def _metrics_table(kit: Kit, report: dict) -> None:
    columns = [
        ("ppl", "perplexity", "{:.3f}"),
        ("bpb", "bits per byte", "{:.4f}"),
        ("bleu", "BLEU", "{:.1f}"),
        ("rouge1", "ROUGE-1 F1", "{:.3f}"),
        ("rougeL", "ROUGE-L F1", "{:.3f}"),
        ("exact_match", "exact match", "{:.3f}"),
        ("pref_accuracy", "preference accuracy", "{:.3f}"),
        ("reward", "reward (learned)", "{:+.3f}"),
    ]
    rows = []
    for run in report["runs"]:
        metrics = run["metrics"]
        rows.append([run["stage"], *(form.format(metrics[key]) for key, _, form in columns)])
    kit.table("ch07-metrics", markdown_table(["run", *(name for _, name, _ in columns)], rows))


def _correct(answer: dict) -> bool:
    from minigpt_cli.engine.metrics.exact_match import normalise_answer

    return normalise_answer(answer["answer"]) == normalise_answer(answer["reference"])


def _exact_match_figure(kit: Kit, answers: dict[str, list[dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / len(STAGES)
    for index, stage in enumerate(STAGES):
        shares = []
        for family in FAMILIES:
            mine = [a for a in answers[stage] if a["family"] == family]
            shares.append(sum(map(_correct, mine)) / len(mine))
        positions = [f + (index - (len(STAGES) - 1) / 2) * width for f in range(len(FAMILIES))]
        axis.bar(positions, shares, width, label=stage)
    axis.set_xticks(range(len(FAMILIES)), FAMILIES)
    axis.set_ylabel("exact match (greedy)")
    axis.set_ylim(0, 1.15)  # room for the legend above the bars (the pretrained run scores 0)
    axis.legend(ncol=4, loc="upper center", fontsize=8)
    axis.set_title("Held-out exact match per task family, quickstart stages (minigpt eval)")
    figure.tight_layout()
    kit.save_figure(figure, "ch07-exact-match.png")
    plt.close(figure)


def _steps(text: str) -> list[tuple[str, str]]:
    """A worked addition answer's steps as (operands, sum): "9+6=15, 0+1+1=2" gives
    [("9+6", "15"), ("0+1+1", "2")]."""
    return _STEP.findall(text)


def classify(answer: dict) -> str:
    """The kind of a wrong answer, from the first rule that fits."""
    from minigpt_cli.engine.metrics.exact_match import normalise_answer
    from minigpt_cli.engine.metrics.text import is_cjk

    prediction, reference = (
        normalise_answer(answer["answer"]),
        normalise_answer(answer["reference"]),
    )
    if not prediction:
        return "no answer"
    if prediction.startswith(reference):
        return "right answer, then kept going"
    if answer["family"] == "addition":
        mine, right = _steps(prediction), _steps(reference)
        if not mine:
            return "not a worked sum"
        for (operands, total), (right_operands, right_total) in zip(mine, right, strict=False):
            if operands != right_operands:
                return "digit misread"
            if total != right_total:
                return "arithmetic slip"
        return "steps right, result wrong"
    if is_cjk(prediction) != is_cjk(reference):
        return "wrong language"
    if _NUMBER.match(prediction) and _NUMBER.match(reference):
        return "miscounted"
    prompt = normalise_answer(answer["prompt"])
    if answer["family"] == "string_ops":
        return "another word of the list" if prediction in prompt else "a word not in the list"
    if prediction in prompt:
        return "echoed the question"
    return "wrong word"


def _errors(kit: Kit, answers: dict[str, list[dict]]) -> None:
    rows = []
    for stage in ("sft", "rlhf"):
        for family in FAMILIES:
            mine = [a for a in answers[stage] if a["family"] == family]
            wrong = [a for a in mine if not _correct(a)]
            kinds = Counter(classify(a) for a in wrong)
            described = ", ".join(f"{kind} {count}" for kind, count in kinds.most_common())
            rows.append([stage, family, f"{len(wrong)} of {len(mine)}", described or "-"])
    kit.table("ch07-errors", markdown_table(["run", "family", "wrong", "kinds"], rows))
    examples = []
    for family in FAMILIES:
        wrong = [a for a in answers["sft"] if a["family"] == family and not _correct(a)]
        for answer in wrong[:EXAMPLES_PER_FAMILY]:
            examples.append(
                [
                    family,
                    _cell(answer["prompt"]),
                    _cell(answer["reference"]),
                    _cell(answer["answer"]),
                    classify(answer),
                ]
            )
    header = ["family", "prompt", "reference", "sft's answer", "kind"]
    kit.table("ch07-error-examples", markdown_table(header, examples))


def _cell(text: str) -> str:
    return text.strip().replace("|", "\\|").replace("\n", " ⏎ ")
