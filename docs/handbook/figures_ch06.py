"""Chapter 6 (decoding): the same runs' outputs under every decoding setting (`minigpt generate`),
and the next-token distribution of one real prompt under temperature and top-p."""

from __future__ import annotations

import math
from pathlib import Path

from figkit import Kit, markdown_table

FIGURES = ["ch06-next-token.png"]
TABLES = ["ch06-base-outputs", "ch06-chat-outputs", "ch06-distribution"]

BASE_PROMPT = "The capital of France is"
CHAT_PROMPT = "What is 37 plus 48?"
NEW_TOKENS = "40"
# (label, flags): every sampled row draws with seed 1, so a reader gets the same text.
BASE_SETTINGS = [
    ("greedy", ["--greedy"]),
    ("greedy, repetition penalty 1.3", ["--greedy", "--repetition-penalty", "1.3"]),
    ("beam search, 4 beams", ["--num-beams", "4"]),
    ("temperature 0.7", ["-t", "0.7", "--top-k", "0", "--top-p", "1.0", "--seed", "1"]),
    ("temperature 1.5", ["-t", "1.5", "--top-k", "0", "--top-p", "1.0", "--seed", "1"]),
    ("temperature 1.0, top-k 5", ["-t", "1.0", "--top-k", "5", "--top-p", "1.0", "--seed", "1"]),
    ("temperature 1.0, top-p 0.9", ["-t", "1.0", "--top-k", "0", "--top-p", "0.9", "--seed", "1"]),
    ("the run's defaults", ["--seed", "1"]),
]
CHAT_SETTINGS = [
    ("greedy", ["--greedy"]),
    ("beam search, 4 beams", ["--num-beams", "4"]),
    ("the run's defaults, seed 1", ["--seed", "1"]),
    ("the run's defaults, seed 2", ["--seed", "2"]),
    ("temperature 1.5, seed 1", ["-t", "1.5", "--top-k", "0", "--top-p", "1.0", "--seed", "1"]),
]
TEMPERATURES = (0.5, 1.0, 1.5)
TOP_P = 0.9
SHOWN_TOKENS = 12


def _cell(text: str) -> str:
    """Generated text as one table cell: line breaks shown as ⏎, pipes escaped."""
    return text.strip("\n").replace("|", "\\|").replace("\n", " ⏎ ")


def _outputs(kit: Kit, run: Path, prompt: str, settings: list) -> list[list[str]]:
    rows = []
    for label, flags in settings:
        shown = " ".join(flags)
        text = kit.minigpt(
            "generate", run, "--prompt", prompt, "-n", NEW_TOKENS, "--no-echo", *flags
        )
        rows.append([label, f"`{shown}`", _cell(text)])
    return rows


def make(kit: Kit) -> None:
    quickstart = kit.quickstart()
    header = ["decoding", "flags", f"continuation ({NEW_TOKENS} tokens at most)"]
    base = _outputs(kit, quickstart / "pretrain", BASE_PROMPT, BASE_SETTINGS)
    kit.table("ch06-base-outputs", markdown_table(header, base))
    chat = _outputs(kit, quickstart / "sft", CHAT_PROMPT, CHAT_SETTINGS)
    kit.table("ch06-chat-outputs", markdown_table(["decoding", "flags", "answer"], chat))
    _distribution(kit, quickstart / "pretrain")


def _distribution(kit: Kit, run: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from minigpt_cli.engine.runs.load import load_run

    loaded = load_run(run)
    # as `minigpt generate` does: a base run reads the prompt as the start of a document
    ids = torch.tensor([[loaded.tokenizer.eos_id, *loaded.tokenizer.encode(BASE_PROMPT)]])
    with torch.no_grad():
        logits = loaded.model(ids)[0, -1].float()
    order = torch.argsort(logits, descending=True)
    pieces = [repr(loaded.tokenizer.decode([int(i)]))[1:-1] for i in order[:SHOWN_TOKENS]]
    figure, axes = plt.subplots(1, len(TEMPERATURES), figsize=(12, 3.8), sharey=True)
    rows = []
    for axis, temperature in zip(axes, TEMPERATURES, strict=True):
        probs = torch.softmax(logits / temperature, dim=-1)[order]
        before = probs.cumsum(0) - probs
        nucleus = int((before < TOP_P).sum())
        entropy = float(-(probs * probs.clamp_min(1e-30).log()).sum()) / math.log(2)
        shown = probs[:SHOWN_TOKENS].tolist()
        colours = ["tab:blue" if i < nucleus else "lightgray" for i in range(SHOWN_TOKENS)]
        axis.bar(range(SHOWN_TOKENS), shown, color=colours)
        axis.set_xticks(range(SHOWN_TOKENS), pieces, rotation=70, fontsize=8)
        axis.set_title(f"temperature {temperature:g}: top-p {TOP_P} keeps {nucleus}")
        rows.append(
            [
                f"{temperature:g}",
                f"{float(probs[0]):.3f}",
                f"{float(probs[:5].sum()):.3f}",
                f"{entropy:.2f}",
                f"{nucleus:,}",
            ]
        )
    axes[0].set_ylabel("probability of the next token")
    figure.suptitle(
        f"Next token after {BASE_PROMPT!r} (quickstart pretrain run; blue: the nucleus)"
    )
    figure.tight_layout()
    kit.save_figure(figure, "ch06-next-token.png")
    plt.close(figure)
    header = [
        "temperature",
        f"p(most likely: {pieces[0]!r})",
        "p(5 most likely)",
        "entropy (bits)",
        f"tokens in the top-p {TOP_P} nucleus",
    ]
    kit.table("ch06-distribution", markdown_table(header, rows))
