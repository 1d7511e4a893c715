"""Chapter 4 (supervised fine-tuning): the data inspector's view of the loss mask, a chat example
drawn token by token, LoRA's adapter sizes per preset, and exact match per family before and after
SFT (with and without the pretraining text mixed into SFT's batches)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from figkit import Kit, markdown_table, plain_log_axis

FIGURES = ["ch04-masking.png", "ch04-exact-match.png"]
TABLES = ["ch04-inspect", "ch04-lora", "ch04-text-mix"]

PRESETS = ("tiny", "small", "medium", "large")
FAMILIES = ("addition", "facts", "string_ops", "translation")
INSPECTED = 5  # the first built-in SFT records: one of every family, addition in both languages
CONVERSATION = (4, 10)  # two of those records (English additions) as one two-turn chat
NO_MIX = "ch04-no-text-mix"
COLOURS = {"pretrain": "tab:gray", "sft": "tab:blue", NO_MIX: "tab:orange"}


def make(kit: Kit) -> None:
    quickstart = kit.quickstart()
    folder = kit.workdir / "ch04"
    folder.mkdir(exist_ok=True)
    _inspect(kit, quickstart)
    _masking(kit, quickstart, folder)
    _lora(kit)
    no_mix = kit.training_run(
        NO_MIX,
        "sft",
        "--from",
        quickstart / "pretrain",
        "--seed",
        "0",
        "--threads",
        "1",
        "--set",
        "sft.text_mix=0",
    )
    _text_mix(kit, quickstart, no_mix, folder)


def _inspect(kit: Kit, quickstart: Path) -> None:
    """`minigpt data inspect` as a reader sees it when its output is not a terminal."""
    shown = kit.minigpt(
        "data", "inspect", "--kind", "sft", "--run", quickstart / "pretrain", "-n", str(INSPECTED)
    )
    shown = shown.replace(str(quickstart), "runs/quickstart").rstrip()
    kit.table("ch04-inspect", f"```text\n{shown}\n```")


def _masking(kit: Kit, quickstart: Path, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from minigpt_cli.datasets.builtin import records
    from minigpt_cli.engine.data.chat_template import render
    from minigpt_cli.engine.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(quickstart / "pretrain")
    chosen = [records("sft", "train", max(CONVERSATION) + 1, seed=0)[i] for i in CONVERSATION]
    messages = []
    for record in chosen:
        messages.append({"role": "user", "content": record["instruction"]})
        messages.append({"role": "assistant", "content": record["output"]})
    (folder / "conversation.json").write_text(json.dumps(messages, ensure_ascii=False, indent=1))
    ids, mask = render(messages, tokenizer)
    special = set(tokenizer.special_ids)
    pieces = [
        tokenizer.decode([token], keep_special=True)
        if token in special
        else tokenizer.decode([token]).replace(" ", "\u00b7")
        for token in ids
    ]

    figure, axis = plt.subplots(figsize=(11, 2.4))
    x, y, row_height, width_limit = 0.0, 0.0, 1.0, 60.0
    bottom = y
    for piece, trained, token in zip(pieces, mask, ids, strict=True):
        width = max(len(piece), 1) * 0.62 + 0.5
        if x + width > width_limit:
            x, y = 0.0, y - row_height * 1.25
        colour = "#7fc97f" if trained else ("#bdbdbd" if token in special else "#e8e8e8")
        bottom = min(bottom, y)
        axis.add_patch(Rectangle((x, y), width, row_height, facecolor=colour, edgecolor="white"))
        axis.text(x + width / 2, y + row_height / 2, piece, ha="center", va="center", fontsize=8.5)
        x += width + 0.15
        if token == tokenizer.eot_id:
            x, y = 0.0, y - row_height * 1.25
    axis.set_xlim(-0.5, width_limit + 0.5)
    axis.set_ylim(bottom - 0.3, row_height + 0.3)
    axis.axis("off")
    trained_count = sum(mask)
    axis.set_title(
        f"One two-turn chat in the template: {len(ids)} tokens, {trained_count} trained "
        "(green: loss on this token; grey: context only)",
        fontsize=10,
    )
    figure.tight_layout()
    kit.save_figure(figure, "ch04-masking.png")
    plt.close(figure)


def _lora(kit: Kit) -> None:
    """Adapter parameters per preset at the default rank, on each group of projections."""
    from minigpt_cli.config import params
    from minigpt_cli.config.loader import load_config
    from minigpt_cli.config.schema import LoraConfig
    from minigpt_cli.engine.model.lora import count_lora_parameters

    rows = []
    for name in PRESETS:
        config = load_config(preset=name)
        model, vocab = config.model, config.tokenizer.vocab_size
        total = params.count_parameters(model, vocab)
        row: list[Any] = [name, f"{total:,}"]
        for group in ("attention", "mlp", "all"):
            settings = LoraConfig(r=config.lora.r, targets=group)
            adapter = count_lora_parameters(model, settings)
            row.append(f"{adapter:,} ({100 * adapter / total:.2f} %)")
        full_bytes = 16 * total  # fp32 weights + gradients + two AdamW moments
        lora_bytes = 4 * total + 16 * count_lora_parameters(model, LoraConfig(r=config.lora.r))
        row.append(f"{full_bytes / 2**20:,.0f} MiB -> {lora_bytes / 2**20:,.0f} MiB")
        rows.append(row)
    r = load_config(preset="tiny").lora.r
    header = [
        "preset",
        "parameters",
        f"LoRA r={r} on attention (q, k, v, o)",
        "on the MLP (gate, up, down)",
        "on all seven",
        "weights + gradients + AdamW, full -> LoRA attention",
    ]
    kit.table("ch04-lora", markdown_table(header, rows))


def _text_mix(kit: Kit, quickstart: Path, no_mix: Path, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from minigpt_cli.config.loader import read_run_config
    from minigpt_cli.engine.runs.checkpoint import read_metrics

    saved = folder / "eval.json"
    if not saved.is_file():
        runs = (quickstart / "pretrain", quickstart / "sft", no_mix)
        kit.minigpt("eval", *runs, "--no-pref", "--samples", "0", "--output", saved)
    report = {
        Path(run["path"]).name: run["metrics"] for run in json.loads(saved.read_text())["runs"]
    }
    mixed, unmixed = (read_run_config(run).sft for run in (quickstart / "sft", no_mix))
    labels = {
        "pretrain": "pretrained (before SFT)",
        "sft": f"SFT, text_mix {mixed.text_mix}, text_weight {mixed.text_weight} (quickstart)",
        NO_MIX: f"SFT, text_mix {unmixed.text_mix}",
    }
    rows = []
    for name, label in labels.items():
        metrics = report[name]
        rows.append(
            [label]
            + [f"{100 * metrics[f'exact_match/{family}']:.0f}" for family in FAMILIES]
            + [f"{100 * metrics['exact_match']:.1f}", f"{metrics['bpb']:.3f}"]
        )
    header = ["run", *(f"{f} (%)" for f in FAMILIES), "exact match (%)", "held-out text bpb"]
    kit.table("ch04-text-mix", markdown_table(header, rows))

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.27
    for offset, (name, label) in enumerate(labels.items()):
        values = [100 * report[name][f"exact_match/{family}"] for family in FAMILIES]
        positions = [i + (offset - 1) * width for i in range(len(FAMILIES))]
        left.bar(positions, values, width, label=label, color=COLOURS[name])
    left.set_xticks(range(len(FAMILIES)), FAMILIES)
    left.set(ylabel="exact match, % (50 held-out questions each)", ylim=(0, 125))
    left.set_title("Exact match per family (minigpt eval)")
    left.legend(fontsize=8, loc="upper center", ncol=2)
    for run, name in ((quickstart / "sft", "sft"), (no_mix, NO_MIX)):
        evals = [r for r in read_metrics(run) if r.get("kind") == "eval"]
        steps, bpb = [r["step"] for r in evals], [r["text_bpb"] for r in evals]
        right.plot(steps, bpb, "o-", label=labels[name], color=COLOURS[name])
    right.axhline(
        report["pretrain"]["bpb"],
        color="grey",
        linestyle="--",
        label=labels["pretrain"] + " (eval)",
    )
    right.set(xlabel="SFT step", ylabel="bits / UTF-8 byte", yscale="log")
    plain_log_axis(right)
    right.set_title("Held-out pretraining text during SFT (text_bpb)")
    right.legend(fontsize=8)
    for axis in (left, right):
        axis.grid(alpha=0.3)
    figure.tight_layout()
    kit.save_figure(figure, "ch04-exact-match.png")
    plt.close(figure)
