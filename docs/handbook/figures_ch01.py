"""Chapter 1 (foundations): the learning-rate schedule and loss of a real run, the deadline-planned
schedule of a `--max-time` run, the weight-decay groups, and loss / perplexity / bits per byte."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from figkit import Kit, markdown_table, plain_log_axis

FIGURES = ["ch01-schedule-loss.png", "ch01-max-time.png"]
TABLES = ["ch01-eval", "ch01-decay-groups", "ch01-max-time"]

MAX_TIME = "60s"
# More steps than a minute holds, so the deadline, not the step count, ends the run.
MAX_STEPS = "5000"


def _rows(run: Path, kind: str) -> list[dict]:
    from minigpt_cli.engine.runs.checkpoint import read_metrics

    return [row for row in read_metrics(run) if row.get("kind") == kind]


def make(kit: Kit) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from minigpt_cli.config.loader import read_run_config
    from minigpt_cli.engine.data.tokenizer import Tokenizer
    from minigpt_cli.engine.training import limits, optim

    pretrain = kit.quickstart() / "pretrain"
    config = read_run_config(pretrain)
    train = config.stage_train("pretrain")
    state = json.loads((pretrain / "trainer_state.json").read_text())
    total = int(state["total_steps"])
    warmup, _ = limits.warmup_steps(train.warmup_steps, total)
    vocab = Tokenizer.load(pretrain).vocab_size

    # The logged rate of row `step` is the rate step `step - 1` (0-based) ran with.
    train_rows = _rows(pretrain, "train")
    eval_rows = _rows(pretrain, "eval")
    logged = [(row["step"], row["lr"]) for row in train_rows]
    steps = range(total)
    curve = [
        optim.learning_rate(s, total, warmup, train.learning_rate, train.min_lr) for s in steps
    ]
    gap = max(abs(lr - curve[step - 1]) for step, lr in logged)
    print(f"  largest |logged lr - optim.learning_rate|: {gap:.3g}")
    assert gap < 1e-12, gap

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot([s + 1 for s in steps], curve, label="optim.learning_rate(step)")
    left.plot(*zip(*logged, strict=True), "o", markersize=3, label="lr in metrics.jsonl")
    left.axvline(warmup, color="grey", linestyle=":", label=f"end of warmup ({warmup})")
    left.set(xlabel="optimizer step", ylabel="learning rate", title="Warmup + cosine (tiny)")
    left.legend()
    right.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], label="train loss")
    right.plot(
        [r["step"] for r in eval_rows],
        [r["val_loss"] for r in eval_rows],
        "o-",
        label="validation loss",
    )
    right.axhline(math.log(vocab), color="grey", linestyle="--", label=f"ln V = ln {vocab}")
    right.set(
        xlabel="optimizer step", ylabel="cross-entropy (nats/token)", title="Loss", yscale="log"
    )
    plain_log_axis(right)
    right.legend()
    for axis in (left, right):
        axis.grid(alpha=0.3)
    figure.tight_layout()
    kit.save_figure(figure, "ch01-schedule-loss.png")
    plt.close(figure)

    rows = []
    for row in eval_rows:
        bytes_per_token = row["val_loss"] / math.log(2) / row["val_bpb"]
        rows.append(
            [
                row["step"],
                f"{row['val_loss']:.4f}",
                f"{math.exp(row['val_loss']):.3f}",
                f"{row['val_ppl']:.3f}",
                f"{row['val_bpb']:.4f}",
                f"{bytes_per_token:.3f}",
            ]
        )
    header = [
        "step",
        "val_loss (nats/token)",
        "exp(val_loss)",
        "val_ppl (logged)",
        "val_bpb",
        "val_loss / ln 2 / val_bpb",
    ]
    kit.table("ch01-eval", markdown_table(header, rows))

    _decay_groups(kit, config, vocab)
    _max_time(kit, pretrain, plt)


def _decay_groups(kit: Kit, config: Any, vocab: int) -> None:
    import torch

    from minigpt_cli.engine.model.gpt import GPT
    from minigpt_cli.engine.training import optim

    model = GPT(config.model, vocab)
    train = config.stage_train("pretrain")
    optimizer, names = optim.build_optimizer(model, train, torch.device("cpu"))
    rows = []
    index = 0
    for group in optimizer.param_groups:
        params = group["params"]
        group_names = [names[index + i] for i in range(len(params))]
        index += len(params)
        kinds = sorted({name.rsplit(".", 2)[-2] for name in group_names})
        rows.append(
            [
                group["weight_decay"],
                len(params),
                f"{sum(p.numel() for p in params):,}",
                ", ".join(kinds),
            ]
        )
    header = ["weight_decay", "tensors", "parameters", "modules (by name)"]
    kit.table("ch01-decay-groups", markdown_table(header, rows))


def _max_time(kit: Kit, pretrain: Path, plt: Any) -> None:
    run = kit.training_run(
        "ch01-max-time",
        "pretrain",
        "--preset",
        "tiny",
        "--tokenizer",
        pretrain,
        "--max-time",
        MAX_TIME,
        "--max-steps",
        MAX_STEPS,
        "--seed",
        "0",
    )
    from minigpt_cli.config.loader import read_run_config

    train = read_run_config(run).stage_train("pretrain")
    rows = _rows(run, "train")
    state = json.loads((run / "trainer_state.json").read_text())
    figure, axis = plt.subplots(figsize=(7, 4.4))
    axis.plot([r["step"] for r in rows], [r["lr"] for r in rows], "o-", markersize=3, label="lr")
    axis.axhline(train.min_lr, color="grey", linestyle=":", label="min_lr")
    axis.set(xlabel="optimizer step", ylabel="learning rate", title=f"--max-time {MAX_TIME}")
    twin = axis.twinx()
    twin.plot(
        [r["step"] for r in rows],
        [r["horizon"] for r in rows],
        color="tab:red",
        label="planned horizon (step)",
    )
    twin.set_ylabel("planned last step", color="tab:red")
    lines = axis.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    axis.legend(
        lines[0] + more[0],
        lines[1] + more[1],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.15),
        ncol=3,
    )
    axis.grid(alpha=0.3)
    figure.tight_layout()
    kit.save_figure(figure, "ch01-max-time.png")
    plt.close(figure)
    header = [
        "stop",
        "steps run",
        "horizon at the first log row",
        "last planned horizon",
        "last lr",
        "min_lr",
    ]
    body = [
        [
            state["stop_reason"],
            state["step"],
            rows[0]["horizon"],
            rows[-1]["horizon"],
            f"{rows[-1]['lr']:.3g}",
            f"{train.min_lr:.3g}",
        ]
    ]
    kit.table("ch01-max-time", markdown_table(header, body))
