"""Chapter 5 (preference learning and RLHF): what the reward model learned, what each stage of the
quickstart adds, and reward hacking on a real run: PPO against the learned reward with the KL
penalty off, beside the same run under the default ceiling KL control."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from figkit import Kit, markdown_table

FIGURES = ["ch05-kl.png"]
TABLES = ["ch05-reward-model", "ch05-stages", "ch05-kl", "ch05-answers"]

FAMILIES = ("addition", "facts", "string_ops", "translation")
ITERATIONS = 120
# Each control at PPO's default learning rate (3e-5) and at its former default (1e-4, README "RLHF:
# the KL control"), where an unleashed policy drifts within minutes instead of hundreds of
# iterations. Run name -> (learning rate, flags).
RUNS = {
    "ch05-kl-off": ("1e-4", ["--kl-coef", "0"]),
    "ch05-kl-ceiling": ("1e-4", []),
    "ch05-kl-off-3e-5": ("3e-5", ["--kl-coef", "0"]),
    "ch05-kl-ceiling-3e-5": ("3e-5", []),
}
LABELS = {
    "ch05-kl-off": "penalty off, lr 1e-4",
    "ch05-kl-ceiling": "ceiling control, lr 1e-4",
    "ch05-kl-off-3e-5": "penalty off, lr 3e-5",
    "ch05-kl-ceiling-3e-5": "ceiling control, lr 3e-5 (defaults)",
}
STYLES = {
    "ch05-kl-off": ("tab:red", "-"),
    "ch05-kl-ceiling": ("tab:blue", "-"),
    "ch05-kl-off-3e-5": ("tab:red", "--"),
    "ch05-kl-ceiling-3e-5": ("tab:blue", "--"),
}
SMOOTH = 10  # iterations in the moving mean of the rollouts' reward (one iteration: 16 responses)
TABLE_EVERY = 40  # iterations between the rows of the table (the runs evaluate every 20)
EVAL_PER_FAMILY = 25


def make(kit: Kit) -> None:
    quickstart = kit.quickstart()
    folder = kit.workdir / "ch05"
    folder.mkdir(exist_ok=True)
    _reward_model(kit, quickstart / "rlhf" / "reward")
    _stages(kit, quickstart)
    runs = {
        name: kit.training_run(
            name,
            "rlhf",
            "--from",
            quickstart / "dpo",
            "--reward-model",
            quickstart / "rlhf" / "reward",
            "--seed",
            "0",
            "--threads",
            "1",
            "--max-steps",
            str(ITERATIONS),
            *flags,
            "--set",
            f"rlhf.learning_rate={learning_rate}",
            "--set",
            "rlhf.eval_every=20",
            "--set",
            "rlhf.eval_prompts=100",
        )
        for name, (learning_rate, flags) in RUNS.items()
    }
    _kl(kit, runs)
    _answers(kit, quickstart, runs, folder)


def _reward_model(kit: Kit, reward: Path) -> None:
    from minigpt_cli.engine.runs.checkpoint import read_metrics

    rows = [
        [
            r["step"],
            f"{r['val_loss']:.3f}",
            f"{100 * r['pref_accuracy']:.1f}",
            f"{r['chosen_score']:+.2f}",
            f"{r['rejected_score']:+.2f}",
            f"{r['margin']:.2f}",
        ]
        for r in read_metrics(reward)
        if r.get("kind") == "eval"
    ]
    header = [
        "step",
        "held-out Bradley-Terry loss",
        "held-out pref_accuracy (%)",
        "mean score, chosen",
        "mean score, rejected",
        "margin",
    ]
    kit.table("ch05-reward-model", markdown_table(header, rows))


def _stages(kit: Kit, quickstart: Path) -> None:
    """The quickstart's own evaluation (`eval.json`): what DPO and RLHF changed after SFT."""
    report = json.loads((quickstart / "eval.json").read_text())
    rows = []
    for run in report["runs"]:
        if run["name"] == "pretrain":
            continue
        metrics = run["metrics"]
        rows.append(
            [run["name"]]
            + [f"{100 * metrics[f'exact_match/{family}']:.0f}" for family in FAMILIES]
            + [
                f"{100 * metrics['pref_accuracy']:.1f}",
                f"{metrics['pref_margin']:.2f}",
                f"{metrics['reward']:+.3f}",
            ]
        )
    header = [
        "quickstart stage",
        *(f"{family} (%)" for family in FAMILIES),
        "pref_accuracy (%)",
        "pref_margin",
        "reward model's score",
    ]
    kit.table("ch05-stages", markdown_table(header, rows))


def _curves(run: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], float]:
    """(train rows, eval rows, optimizer steps per iteration) of an RLHF run."""
    from minigpt_cli.engine.runs.checkpoint import read_metrics

    rows = read_metrics(run)
    state = json.loads((run / "trainer_state.json").read_text())
    return (
        [r for r in rows if r.get("kind") == "train"],
        [r for r in rows if r.get("kind") == "eval"],
        state["step"] / ITERATIONS,
    )


def _kl(kit: Kit, runs: dict[str, Path]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = []
    figure, axes = plt.subplots(1, 4, figsize=(16, 4))
    reward_axis, kl_axis, coef_axis, match_axis = axes
    for name, run in runs.items():
        train, evals, per_iteration = _curves(run)
        colour, line = STYLES[name]
        previous = 0
        for row in evals:
            since = [r for r in train if previous < r["step"] <= row["step"]]
            iteration = row["step"] / per_iteration
            previous = row["step"]
            if iteration % TABLE_EVERY:
                continue
            kl = sum(r["kl"] for r in since) / len(since) if since else 0.0
            table.append(
                [
                    LABELS[name],
                    f"{iteration:.0f}",
                    f"{row['reward_mean']:+.3f}",
                    f"{kl:.2f}",
                    f"{since[-1]['kl_coef']:.3g}" if since else "-",
                    f"{100 * row['exact_match']:.0f}",
                    " / ".join(f"{100 * row[f'exact_match/{f}']:.0f}" for f in FAMILIES),
                    f"{row['distinct_2']:.3f}",
                ]
            )
        iterations = [r["step"] / per_iteration for r in train]
        style = {"color": colour, "linestyle": line, "label": LABELS[name]}
        rewards = [r["reward_mean"] for r in train]
        smoothed = [
            sum(rewards[max(0, i - SMOOTH + 1) : i + 1])
            / len(rewards[max(0, i - SMOOTH + 1) : i + 1])
            for i in range(len(rewards))
        ]
        reward_axis.plot(iterations, smoothed, **style)
        kl_axis.plot(iterations, [r["kl"] for r in train], alpha=0.8, **style)
        if "ceiling" in name:
            coef_axis.plot(iterations, [r["kl_coef"] for r in train], **style)
        match_axis.plot(
            [r["step"] / per_iteration for r in evals],
            [100 * r["exact_match"] for r in evals],
            marker="o",
            **style,
        )
    reward_axis.set(
        xlabel="PPO iteration", ylabel=f"reward model's score (moving mean of {SMOOTH} iterations)"
    )
    reward_axis.set_title("Reward of the sampled responses")
    kl_axis.set(xlabel="PPO iteration", ylabel="nats per response", yscale="symlog")
    kl_axis.set_title("KL to the reference (DPO model)")
    coef_axis.set(xlabel="PPO iteration", ylabel="kl_coef", yscale="log")
    coef_axis.set_title("The controller's coefficient")
    match_axis.set(xlabel="PPO iteration", ylabel="%", ylim=(0, 100))
    match_axis.set_title("Exact match, 100 held-out prompts")
    for axis in axes:
        axis.grid(alpha=0.3)
    reward_axis.legend(fontsize=8)
    figure.tight_layout()
    kit.save_figure(figure, "ch05-kl.png")
    plt.close(figure)
    header = [
        "run",
        "iteration",
        "held-out reward",
        "KL per response (train rows since the last eval)",
        "kl_coef",
        "exact match (%)",
        " / ".join(FAMILIES) + " (%)",
        "distinct-2",
    ]
    kit.table("ch05-kl", markdown_table(header, table))


def _answers(kit: Kit, quickstart: Path, runs: dict[str, Path], folder: Path) -> None:
    """The same held-out questions answered by the DPO model and both PPO runs (minigpt eval)."""
    saved = folder / "eval.json"
    if not saved.is_file():
        kit.minigpt(
            "eval",
            quickstart / "dpo",
            *runs.values(),
            "--reward-model",
            quickstart / "rlhf" / "reward",
            "--no-text",
            "--no-pref",
            "--per-family",
            str(EVAL_PER_FAMILY),
            "--samples",
            "4",
            "--output",
            saved,
        )
    report = json.loads(saved.read_text())["runs"]
    names = {"dpo": "DPO (the start)", **LABELS}
    prompts = {tuple(sample["prompt"] for sample in run["samples"]) for run in report}
    assert len(prompts) == 1, "minigpt eval showed different questions per run"
    summary = [
        [
            names[Path(run["path"]).name],
            f"{run['metrics']['reward']:+.3f}",
            f"{100 * run['metrics']['exact_match']:.0f}",
        ]
        for run in report
    ]
    lines = [
        markdown_table(["run", "reward model's score", "exact match (%)"], summary),
        "",
        markdown_table(
            ["question (reference)", *(names[Path(run["path"]).name] for run in report)],
            [
                [
                    f"{sample['prompt']} ({sample['reference']})".replace("\n", " ").replace(
                        "|", "/"
                    ),
                    *(
                        run["samples"][index]["answer"].replace("\n", " ").replace("|", "/")
                        for run in report
                    ),
                ]
                for index, sample in enumerate(report[0]["samples"])
            ],
        ),
    ]
    kit.table("ch05-answers", "\n".join(lines))
