"""Chapter 8 (engineering): the memory estimate's terms per preset against the RSS of short real
runs, and throughput and MFU as the trainer computes them."""

from __future__ import annotations

import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

from figkit import Kit, markdown_table

FIGURES = ["ch08-memory.png"]
TABLES = ["ch08-memory", "ch08-measured", "ch08-throughput", "ch08-resume"]

PRESETS = ("tiny", "small", "medium", "large")
# Short fp32 runs on one thread whose RSS is read against the estimate (steps, log every).
# Small takes one micro-batch of 8 x 256 tokens a step (global batch 8), to keep the run short.
MEASURED = {"tiny": ("20", "5"), "small": ("3", "1")}
TERMS = ("framework", "weights", "gradients", "optimizer", "activations", "allocator", "data")
MiB = 2**20
# The crash: SIGKILL at the 40th file write of the run (engine/core/io.py's fault seam), which
# lands in the saving of a late snapshot of this 60-step run.
KILL_AT = "kill@40"
RESUME_STEPS = ("--max-steps", "60", "--threads", "1", "--set", "train.save_every=20")
RESUME_STEPS += ("--set", "train.eval_every=20", "--set", "train.log_every=10")
_PRINTED = re.compile(r"memory: estimated peak ([\d,]+) MB(?P<rest>.*?)(?:; cap|$)", re.M)
_STEP_PEAK = re.compile(r"a training step peaks at ([\d,]+) MB")


def make(kit: Kit) -> None:
    quickstart = kit.quickstart()
    estimates = _estimates()
    measured = {name: _measure(kit, quickstart, name, *plan) for name, plan in MEASURED.items()}
    rows = []
    for name, estimate in estimates.items():
        rows.append(
            [
                name,
                *(f"{getattr(estimate, term) / MiB:,.0f}" for term in TERMS),
                f"{estimate.step_peak / MiB:,.0f}",
                f"{estimate.total / MiB:,.0f} ({estimate.peak_when})",
            ]
        )
    header = [
        "preset (fp32)",
        *(f"{term} MB" for term in TERMS),
        "step peak MB",
        "estimated peak MB (when)",
    ]
    kit.table("ch08-memory", markdown_table(header, rows))
    kit.table(
        "ch08-measured",
        markdown_table(
            [
                "run",
                "printed: step peak MB",
                "printed: whole-run peak MB",
                "estimate between steps MB",
                "measured rss_mb (largest logged)",
            ],
            [
                [
                    f"{name}: {MEASURED[name][0]} steps, fp32, 1 thread",
                    f"{m['step_peak']:,}",
                    f"{m['peak']:,}",
                    f"{estimates[name].resident / MiB + estimates[name].settled_heap / MiB:,.0f}",
                    f"{m['rss_mb']:,.0f}",
                ]
                for name, m in measured.items()
            ],
        ),
    )
    _figure(kit, estimates, measured)
    _resume(kit, quickstart)
    _throughput(
        kit,
        {f"quickstart pretrain (tiny, {_ran_in(quickstart / 'pretrain')})": quickstart / "pretrain"}
        | {f"{name}, fp32, 1 thread": m["run"] for name, m in measured.items()},
    )


def _ran_in(run: Path) -> str:
    """What `--precision auto` chose and the threads the run trained on, from its folder."""
    from minigpt_cli.engine.runs.checkpoint import read_metrics, read_state

    chosen = [row["message"] for row in read_metrics(run) if row.get("event") == "precision"]
    threads = read_state(run)["threads"]
    precision = chosen[0].split(":")[0] if chosen else "precision not logged"
    return f"auto: {precision}, {threads} thread{'s' if threads != 1 else ''}"


def _estimates() -> dict:
    from minigpt_cli.config.loader import load_config
    from minigpt_cli.engine.resources.estimate import estimate_for_config

    return {
        name: estimate_for_config(load_config(preset=name), precision="fp32") for name in PRESETS
    }


def _measure(kit: Kit, quickstart: Path, name: str, steps: str, log_every: str) -> dict:
    out = kit.workdir / "ch08" / f"{name}-fp32"
    args = ["--preset", name, "--max-steps", steps, "--precision", "fp32", "--threads", "1"]
    if name == "tiny":
        args += ["--tokenizer", str(quickstart / "pretrain")]
    else:
        args += ["--set", "train.global_batch_size=8"]
    shown = kit.minigpt(
        "pretrain", *args, "--set", f"train.log_every={log_every}", "--out", out, "--overwrite"
    )
    printed = _PRINTED.search(shown)  # the progress lines go to stdout when it is not a terminal
    if printed is None:
        raise SystemExit(f"pretrain --preset {name} printed no memory estimate")
    step_peak = _STEP_PEAK.search(printed[0])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rss = max(row["rss_mb"] for row in rows if "rss_mb" in row)
    peak = int(printed[1].replace(",", ""))
    return {
        "run": out,
        "peak": peak,
        "step_peak": int(step_peak[1].replace(",", "")) if step_peak else peak,
        "rss_mb": rss,
    }


def _figure(kit: Kit, estimates: dict, measured: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 3.8), gridspec_kw={"width_ratios": [1, 2]})
    for axis, names in zip(axes, (list(MEASURED), list(PRESETS)), strict=True):
        for index, name in enumerate(names):
            left = 0.0
            for term_index, term in enumerate(TERMS):
                value = getattr(estimates[name], term) / MiB
                axis.barh(
                    index,
                    value,
                    left=left,
                    color=f"C{term_index}",
                    label=term if index == 0 else None,
                )
                left += value
            if name in measured:
                axis.plot(
                    measured[name]["rss_mb"],
                    index,
                    "kD",
                    label="measured rss_mb" if index == 0 else None,
                )
                axis.plot(
                    measured[name]["step_peak"],
                    index,
                    "k|",
                    markersize=18,
                    label="printed step peak" if index == 0 else None,
                )
        axis.set_yticks(range(len(names)), names)
        axis.set_xlabel("MB (2^20 bytes)")
    axes[0].set_title("measured presets")
    axes[1].set_title("every preset, fp32 training step")
    axes[1].legend(fontsize=7, loc="lower right")
    figure.suptitle("Memory estimate per term (engine/resources/estimate.py) against measured RSS")
    figure.tight_layout()
    kit.save_figure(figure, "ch08-memory.png")
    plt.close(figure)


def _throughput(kit: Kit, runs: dict[str, Path]) -> None:
    from minigpt_cli.config.loader import read_run_config
    from minigpt_cli.config.params import flops_per_token
    from minigpt_cli.engine.data.tokenizer import Tokenizer

    rows = []
    for label, run in runs.items():
        config = read_run_config(run)
        vocab = Tokenizer.load(run).vocab_size
        per_token = flops_per_token(config.model, vocab)
        train = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        train = [row for row in train if row.get("kind") == "train" and row.get("mfu")]
        rate = statistics.median(row["tokens_per_sec"] for row in train)
        mfu = statistics.median(row["mfu"] for row in train)
        rows.append(
            [
                label,
                f"{per_token / 1e6:,.1f}",
                f"{rate:,.0f}",
                f"{per_token * rate / 1e9:,.1f}",
                f"{per_token * rate / mfu / 1e9:,.0f}",
                f"{100 * mfu:.1f} %",
            ]
        )
    header = [
        "run",
        "training MFLOP / token",
        "tokens/s (median)",
        "achieved GFLOP/s",
        "peak GFLOP/s (measured matmul)",
        "MFU (median)",
    ]
    kit.table("ch08-throughput", markdown_table(header, rows))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _resume(kit: Kit, quickstart: Path) -> None:
    """One run trained straight through; the same run killed mid-write and resumed: same bytes?"""
    folder = kit.workdir / "ch08"
    common = ["--preset", "tiny", "--tokenizer", str(quickstart / "pretrain"), *RESUME_STEPS]
    straight, crashed = folder / "resume-straight", folder / "resume-crashed"
    kit.minigpt("pretrain", *common, "--out", straight, "--overwrite")
    # Through a subprocess of its own: Kit.minigpt stops at a failed command, and this one is
    # meant to die. Logged like the others, with its environment.
    words = ["pretrain", *common, "--out", str(crashed), "--overwrite"]
    shown = f"MINIGPT_FAULT={KILL_AT} minigpt " + " ".join(words)
    print(f"$ {shown}", flush=True)
    with kit.log.open("a", encoding="utf-8") as log:
        log.write(shown + "\n")
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        "MINIGPT_FAULT": KILL_AT,
    }
    killed = subprocess.run(
        [sys.executable, "-m", "minigpt_cli", *words], env=env, capture_output=True, text=True
    )
    if killed.returncode != -9:
        raise SystemExit(f"the crashed run was not killed (exit {killed.returncode})")
    saved = sorted(path.name for path in (crashed / "checkpoints").glob("step-*"))
    kit.minigpt("pretrain", *common, "--out", crashed, "--resume")
    rows = [json.loads(line) for line in (crashed / "metrics.jsonl").read_text().splitlines()]
    resumed_at = next(row["step"] for row in rows if row.get("event") == "resume")
    table = [
        [
            "straight through",
            "0",
            "-",
            _sha(straight / "model.safetensors"),
            _sha(straight / "optimizer.safetensors"),
        ],
        [
            f"`MINIGPT_FAULT={KILL_AT}`, then `--resume`",
            "-9 (SIGKILL), then 0",
            f"snapshots on disk: {', '.join(saved)}; resumed at step {resumed_at}",
            _sha(crashed / "model.safetensors"),
            _sha(crashed / "optimizer.safetensors"),
        ],
    ]
    header = ["60-step tiny run", "exit", "resume", "model.safetensors sha256", "optimizer sha256"]
    kit.table("ch08-resume", markdown_table(header, table))
