"""Chapter 3 (pretraining): BPE compression of English and Chinese, the data pipeline's numbers,
gradient accumulation checked on two real runs, and the loss and bits-per-byte curves."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from figkit import Kit, markdown_table, plain_log_axis

FIGURES = ["ch03-compression.png", "ch03-curves.png"]
TABLES = [
    "ch03-compression",
    "ch03-vocab-sweep",
    "ch03-data",
    "ch03-accumulation",
    "ch03-precision",
]

VOCAB_SIZES = (1000, 2000, 3000, 5000, 8000)
MEASURE_SEED = 1  # documents drawn with another seed than the tokenizer's training text (0)
MEASURE_DOCUMENTS = 1000
_ASCII_LETTER = re.compile(r"[A-Za-z]")


def make(kit: Kit) -> None:
    pretrain = kit.quickstart() / "pretrain"
    folder = kit.workdir / "ch03"
    folder.mkdir(exist_ok=True)
    train_text = folder / "pretrain.jsonl"
    measure_text = folder / f"pretrain-seed{MEASURE_SEED}.jsonl"
    if not train_text.is_file():
        kit.minigpt("data", "export", "--kind", "pretrain", "--out", train_text)
    if not measure_text.is_file():
        kit.minigpt(
            "data",
            "export",
            "--kind",
            "pretrain",
            "--seed",
            str(MEASURE_SEED),
            "-n",
            str(MEASURE_DOCUMENTS),
            "--out",
            measure_text,
        )
    lines = _lines_by_language(measure_text)
    _compression(kit, pretrain, lines)
    _vocab_sweep(kit, folder, train_text, lines, pretrain)
    _data(kit, pretrain)
    _accumulation(kit, pretrain)
    _precision(kit, folder)
    _curves(kit, pretrain)


def _lines_by_language(path: Path) -> dict[str, list[str]]:
    """The documents' lines that are purely English or purely Chinese (mixed lines left out)."""
    from minigpt_cli.engine.data.tokenizer_training import detect_language

    lines: dict[str, list[str]] = {"en": [], "zh": []}
    for record in map(json.loads, path.read_text("utf-8").splitlines()):
        for line in record["text"].split("\n"):
            language = detect_language(line)
            if language == "en" and line.isascii():
                lines["en"].append(line)
            elif language == "zh" and not _ASCII_LETTER.search(line):
                lines["zh"].append(line)
    return lines


def _measure(tokenizer: Any, lines: list[str]) -> dict[str, float]:
    tokens = sum(len(ids) for ids in tokenizer.encode_batch(lines))
    chars = sum(len(line) for line in lines)
    utf8 = sum(len(line.encode()) for line in lines)
    return {"lines": len(lines), "chars": chars, "bytes": utf8, "tokens": tokens}


def _compression(kit: Kit, pretrain: Path, lines: dict[str, list[str]]) -> None:
    from minigpt_cli.engine.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(pretrain)
    rows = []
    for language, texts in lines.items():
        m = _measure(tokenizer, texts)
        rows.append(
            [
                {"en": "English", "zh": "Chinese"}[language],
                f"{m['lines']:,}",
                f"{m['chars']:,}",
                f"{m['bytes']:,}",
                f"{m['bytes'] / m['chars']:.2f}",
                f"{m['tokens']:,}",
                f"{m['chars'] / m['tokens']:.2f}",
                f"{m['bytes'] / m['tokens']:.2f}",
            ]
        )
    header = [
        "language",
        "lines",
        "characters",
        "UTF-8 bytes",
        "bytes / character",
        "tokens",
        "characters / token",
        "bytes / token",
    ]
    kit.table("ch03-compression", markdown_table(header, rows))


def _vocab_sweep(
    kit: Kit, folder: Path, train_text: Path, lines: dict[str, list[str]], pretrain: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from minigpt_cli.engine.data.tokenizer import Tokenizer

    quickstart_sha = Tokenizer.load(pretrain).sha256
    measured: dict[str, list[float]] = {"en": [], "zh": []}
    rows = []
    for vocab in VOCAB_SIZES:
        out = folder / f"tokenizer-{vocab}"
        if not (out / "tokenizer.model").is_file():
            kit.minigpt(
                "tokenize",
                "train",
                "--input",
                train_text,
                "--vocab-size",
                str(vocab),
                "--out",
                out,
            )
        tokenizer = Tokenizer.load(out)
        row: list[Any] = [f"{vocab:,}"]
        for language in ("en", "zh"):
            m = _measure(tokenizer, lines[language])
            measured[language].append(m["bytes"] / m["tokens"])
            row += [f"{m['chars'] / m['tokens']:.2f}", f"{m['bytes'] / m['tokens']:.2f}"]
        coverage = json.loads((out / "tokenizer.json").read_text())["character_coverage"]
        row.append(f"{coverage['used']:.4f}")
        row.append("yes" if tokenizer.sha256 == quickstart_sha else "no")
        rows.append(row)
    header = [
        "vocab_size",
        "English chars / token",
        "English bytes / token",
        "Chinese chars / token",
        "Chinese bytes / token",
        "character coverage used",
        "same file as the quickstart's",
    ]
    kit.table("ch03-vocab-sweep", markdown_table(header, rows))

    figure, axis = plt.subplots(figsize=(7, 4))
    for language, name in (("en", "English"), ("zh", "Chinese")):
        axis.plot(VOCAB_SIZES, measured[language], "o-", label=name)
    axis.set(
        xlabel="vocab_size (sentencepiece BPE pieces)",
        ylabel="UTF-8 bytes per token",
        title="BPE compression on built-in text the tokenizer did not see",
    )
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    kit.save_figure(figure, "ch03-compression.png")
    plt.close(figure)


def _data(kit: Kit, pretrain: Path) -> None:
    from minigpt_cli.config.loader import read_run_config
    from minigpt_cli.datasets import BUILTIN_DATA_SEED
    from minigpt_cli.datasets.builtin import pretrain_records
    from minigpt_cli.engine.data.tokenizer import Tokenizer
    from minigpt_cli.engine.stages.pretrain import PretrainStage, training_split

    config = read_run_config(pretrain)
    train = config.stage_train("pretrain")
    tokenizer = Tokenizer.load(pretrain)
    texts = [r["text"] for r in pretrain_records(config.data.builtin_size, BUILTIN_DATA_SEED)]
    tokens = sum(len(ids) + 1 for ids in tokenizer.encode_batch(texts))  # + end-of-text each
    split = training_split(config, tokens)
    seq = config.model.context_length
    windows = PretrainStage.window_count(split, seq)
    state = json.loads((pretrain / "trainer_state.json").read_text())
    per_step = train.global_batch_size * seq
    rows = [
        ["documents (data.builtin_size)", f"{len(texts):,}"],
        ["characters", f"{sum(map(len, texts)):,}"],
        ["tokens, one end-of-text per document", f"{tokens:,}"],
        [f"training tokens (all but data.val_fraction = {config.data.val_fraction})", f"{split:,}"],
        ["validation tokens", f"{tokens - split:,}"],
        [f"training windows of {seq} + 1 tokens", f"{windows:,}"],
        [
            "sequences per step (global_batch_size) = micro-batch x accumulation",
            f"{train.global_batch_size} = {train.micro_batch_size} x "
            f"{train.global_batch_size // train.micro_batch_size}",
        ],
        ["tokens per optimizer step", f"{per_step:,}"],
        ["optimizer steps (max_steps)", f"{state['step']:,}"],
        ["tokens trained", f"{state['tokens']:,}"],
        [
            "epochs over the training windows",
            f"{state['step'] * train.global_batch_size / windows:.2f}",
        ],
    ]
    kit.table("ch03-data", markdown_table(["quickstart pretrain", "value"], rows))


def _accumulation(kit: Kit, pretrain: Path) -> None:
    from minigpt_cli.engine.runs.checkpoint import read_metrics
    from minigpt_cli.engine.runs.files import load_tensors

    runs = {}
    for micro in (8, 2):
        runs[micro] = kit.training_run(
            f"ch03-micro-{micro}",
            "pretrain",
            "--preset",
            "tiny",
            "--tokenizer",
            pretrain,
            "--max-steps",
            "30",
            "--precision",
            "fp32",
            "--seed",
            "0",
            "--set",
            f"train.micro_batch_size={micro}",
        )
    weights = {micro: load_tensors(run / "model.safetensors") for micro, run in runs.items()}
    difference = max(
        float((weights[8][name] - weights[2][name]).abs().max()) for name in weights[8]
    )
    scale = max(float(t.abs().max()) for t in weights[8].values())
    # Both runs scored on the same held-out text (their own validation would not be: it scores
    # `eval_batches` micro-batches, fewer windows for the smaller micro-batch).
    saved = kit.workdir / "ch03" / "accumulation-eval.json"
    if not saved.is_file():
        args = ("eval", runs[8], runs[2], "--no-generation", "--no-pref", "--output", saved)
        kit.minigpt(*args)
    report = json.loads(saved.read_text())
    held_out = {Path(run["path"]).name: run["metrics"] for run in report["runs"]}
    rows = []
    for micro, run in runs.items():
        last_train = [r for r in read_metrics(run) if r.get("kind") == "train"][-1]
        rows.append(
            [
                micro,
                8 // micro,
                last_train["step"],
                f"{last_train['loss']:.5f}",
                f"{held_out[run.name]['nll']:.5f}",
                f"{held_out[run.name]['bpb']:.5f}",
                f"{difference:.1e} (largest weight {scale:.2f})" if micro == 2 else "-",
            ]
        )
    header = [
        "micro_batch_size",
        "accumulation steps",
        "step",
        "train loss (last row)",
        "held-out nll (minigpt eval)",
        "held-out bpb",
        "largest weight difference to micro-batch 8",
    ]
    kit.table("ch03-accumulation", markdown_table(header, rows))


def _precision(kit: Kit, folder: Path) -> None:
    """What `--precision auto` measured and chose on the machine that ran this script."""
    saved = folder / "doctor.json"
    if not saved.is_file():
        saved.write_text(kit.minigpt("doctor", "--json"))
    report = json.loads(saved.read_text())
    measured, cpu = report["measurements"], report["facts"]["cpu"]
    features = [name for name, present in cpu["features"].items() if present]
    rows = [
        [
            {"fp32": "fp32", "fp32_medium": "fp32, matmul precision 'medium'", "bf16": "bf16"}[key],
            f"{measured['gflops'][key]:,.0f}",
            f"{measured['speedup'][key]:.2f}x",
            f"{measured['rel_error'][key]:.1e}",
        ]
        for key in measured["gflops"]
    ]
    rows.append([f"**auto chose**: {report['precision']['reason']}", "", "", ""])
    header = [
        f"{cpu['model']} ({', '.join(features)})",
        "matmul GFLOP/s",
        "speed vs fp32",
        "relative error vs fp64",
    ]
    kit.table("ch03-precision", markdown_table(header, rows))


def _curves(kit: Kit, pretrain: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from minigpt_cli.engine.runs.checkpoint import read_metrics

    metrics = read_metrics(pretrain)
    train = [r for r in metrics if r.get("kind") == "train"]
    evals = [r for r in metrics if r.get("kind") == "eval"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot([r["tokens"] / 1e6 for r in train], [r["loss"] for r in train], label="train loss")
    left.plot(
        [r["tokens"] / 1e6 for r in evals], [r["val_loss"] for r in evals], "o-", label="val_loss"
    )
    left.set(xlabel="tokens trained (millions)", ylabel="nats / token", yscale="log")
    left.set_title("Cross-entropy per token")
    plain_log_axis(left)
    right.plot(
        [r["tokens"] / 1e6 for r in evals], [r["val_bpb"] for r in evals], "o-", color="tab:green"
    )
    right.set(xlabel="tokens trained (millions)", ylabel="bits / UTF-8 byte")
    right.set_title("Validation bits per byte")
    for axis in (left, right):
        axis.grid(alpha=0.3)
    left.legend()
    figure.tight_layout()
    kit.save_figure(figure, "ch03-curves.png")
    plt.close(figure)
