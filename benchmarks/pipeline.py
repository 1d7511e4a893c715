"""What each stage adds: `minigpt quickstart` on the built-in data, timed and scored held out.

Runs the real command a user runs first (`minigpt quickstart --preset tiny`: tokenizer + pretrain
-> SFT -> DPO -> reward model + PPO -> eval, each stage with its default settings) in its own
process, and reports from what it wrote:

- the wall time of each stage (tokenizer training, data preparation and evaluations included) and
  of the whole command, and its peak RSS;
- held-out exact match per task family after each stage (the pretrained model asked zero-shot in
  the chat format), bits per byte on held-out text, preference accuracy on held-out pairs
  (implicit reward against the parent; ties count wrong), from the quickstart's eval.json;
- DPO's and the reward model's own held-out preference accuracy (their last eval rows).

With `--real DIR` (a folder of public sets as JSONL, named in the README) it also fine-tunes on
real text from the quickstart's pretrained model: SFT on sft_alpaca_en.jsonl and
sft_oasst_zh.jsonl, DPO on dpo_hh_helpful_en.jsonl, and reports their held-out losses and
preference accuracy.

    python benchmarks/pipeline.py                        # about 2 minutes on 2 cores
    python benchmarks/pipeline.py --real DATA  # plus the real-data runs
    python benchmarks/pipeline.py --workdir /tmp/p --keep  # reuse finished stages
    python benchmarks/pipeline.py --seed 1                 # another seed

It runs the `minigpt` of the folder it is started from, else the installed one (`python -m`), so
`cd ../other-checkout && python ~/minigpt/benchmarks/pipeline.py` times another version.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STAGES = ("pretrain", "sft", "dpo", "rlhf")


def run_verb(args: list[str], log: Path) -> float:
    """Run `minigpt ARGS` to completion; returns its wall time (skipped when already finished)."""
    out = Path(args[args.index("--out") + 1])
    state = out / "trainer_state.json"
    if state.exists() and json.loads(state.read_text()).get("finished"):
        timing = out / "benchmark_seconds.txt"
        return float(timing.read_text()) if timing.exists() else float("nan")
    start = time.perf_counter()
    with log.open("w") as handle:
        result = subprocess.run(
            [sys.executable, "-m", "minigpt_cli", *args, "--overwrite"],
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"minigpt {' '.join(args)} failed; see {log}")
    (out / "benchmark_seconds.txt").write_text(f"{seconds:.1f}")
    return seconds


def last_eval(run_dir: Path) -> dict[str, Any]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "eval"][-1]


def phases(out: Path, seconds: dict[str, float]) -> None:
    """Where each stage's wall time went: its training loop (the Trainer's own clock, its
    evaluations included) and the rest (tokenizer, encoding, reference log-probs, loading,
    the final save); the steps it ran of its limit and what stopped it."""
    print("\n| phase | wall time | training loop | outside the loop | steps | stopped by |")
    print("|---|---|---|---|---|---|")
    runs = {"pretrain": out / "pretrain", "sft": out / "sft", "dpo": out / "dpo"}
    runs |= {"reward": out / "rlhf" / "reward", "rlhf": out / "rlhf"}
    loops = {
        name: json.loads((run / "trainer_state.json").read_text()) for name, run in runs.items()
    }
    for name, state in loops.items():
        wall = None if name == "reward" else seconds.get(name)  # reward: inside rlhf's time
        loop = state["elapsed"]
        outside = wall - loop if wall is not None else None
        if name == "rlhf" and wall is not None:
            outside = wall - loop - loops["reward"]["elapsed"]
        cells = [
            name,
            f"{wall:.1f} s" if wall is not None else "(in rlhf)",
            f"{loop:.1f} s",
            f"{outside:.1f} s" if outside is not None else "",
            f"{state['step']} of {state.get('total_steps', '?')}",
            state.get("stop_reason", ""),
        ]
        print("| " + " | ".join(cells) + " |")
    print(f"| eval | {seconds.get('eval', float('nan')):.1f} s | | | | |")


def percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f} %"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="continue the quickstart in --workdir")
    parser.add_argument("--real", type=Path, default=None, help="folder with the real datasets")
    parser.add_argument("--seed", type=int, default=None, help="the quickstart's --seed")
    parser.add_argument(
        "--max-time",
        default=None,
        help="the quickstart's --max-time (its time budget; default none: every step)",
    )
    parser.add_argument(
        "--real-steps",
        type=int,
        default=150,
        help="optimizer steps of each real-data run (real records are long: the tiny preset's "
        "1,200 SFT steps would take most of an hour on 2 cores)",
    )
    args = parser.parse_args()
    folder = args.workdir or Path(tempfile.mkdtemp(prefix="minigpt-pipeline-"))
    out = folder / "quickstart"
    if out.exists() and not args.keep:
        shutil.rmtree(out)
    folder.mkdir(parents=True, exist_ok=True)
    command = ["quickstart", "--preset", "tiny", "--out", str(out)]
    if args.seed is not None:
        command += ["--seed", str(args.seed)]
    if args.max_time is not None:
        command += ["--max-time", args.max_time]
    start = time.perf_counter()
    with (folder / "quickstart.log").open("w") as handle:
        result = subprocess.run(
            [sys.executable, "-m", "minigpt_cli", *command], stdout=handle, stderr=subprocess.STDOUT
        )
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"minigpt {' '.join(command)} failed; see {folder / 'quickstart.log'}")
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024

    seconds = json.loads((out / "quickstart.json").read_text())["seconds"]
    report = json.loads((out / "eval.json").read_text())
    metrics = {Path(run["path"]).name: run["metrics"] for run in report["runs"]}
    families = sorted(key.split("/")[1] for key in metrics["sft"] if key.startswith("exact_match/"))
    print(f"work dir {out}; `minigpt {' '.join(command)}`: {wall:.0f} s, peak RSS {peak_mb:.0f} MB")
    print(f"eval data: {report['data']}\n")
    header = ["stage", "wall time", *families, "all", "bpb", "pref_accuracy"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name in STAGES:
        row = metrics[name]
        cells = [percent(row.get(f"exact_match/{f}")) for f in families]
        cells += [percent(row.get("exact_match")), f"{row.get('bpb', float('nan')):.3f}"]
        cells.append(percent(row.get("pref_accuracy")))
        print(f"| {name} | {seconds.get(name, float('nan')):.0f} s | " + " | ".join(cells) + " |")
    print(f"| eval | {seconds.get('eval', float('nan')):.0f} s |" + " |" * (len(header) - 2))
    phases(out, seconds)
    dpo = last_eval(out / "dpo")
    reward = last_eval(out / "rlhf" / "reward")
    print(
        f"\nDPO held-out (its own eval): pref_accuracy {percent(dpo['pref_accuracy'])}, margin "
        f"{dpo['margin']:.3f}; reward model held-out pref_accuracy "
        f"{percent(reward['pref_accuracy'])}"
    )
    if args.real:
        every = str(max(1, args.real_steps // 3))
        budget = ["--max-steps", str(args.real_steps), "--set", "log.progress=plain"]
        budget += ["--set", f"sft.eval_every={every}", "--set", f"dpo.eval_every={every}"]
        real_data(args.real, folder, out / "pretrain", budget)


def real_data(data: Path, folder: Path, pretrained: Path, plain: list[str]) -> None:
    """SFT on Alpaca (en) and OASST (zh), DPO on HH-helpful, from the built-in pretrain run;
    `plain` holds the shared flags (the step budget, plain progress)."""
    runs = [
        ("sft alpaca_en", ["sft", "--data", str(data / "sft_alpaca_en.jsonl")], "sft-alpaca"),
        ("sft oasst_zh", ["sft", "--data", str(data / "sft_oasst_zh.jsonl")], "sft-oasst"),
    ]
    print("\n| run | wall time | val_loss first eval -> last | pref_accuracy |")
    print("|---|---|---|---|")
    for label, verb, name in runs:
        out = folder / name
        wall = run_verb(
            [*verb, "--from", str(pretrained), "--out", str(out), *plain],
            folder / f"{name}.log",
        )
        evals = [
            json.loads(line)
            for line in (out / "metrics.jsonl").read_text().splitlines()
            if '"eval"' in line
        ]
        print(
            f"| {label} | {wall:.0f} s | {evals[0]['val_loss']:.3f} (step {evals[0]['step']}) -> "
            f"{evals[-1]['val_loss']:.3f} (step {evals[-1]['step']}) | |"
        )
    out = folder / "dpo-hh"
    wall = run_verb(
        [
            "dpo",
            "--data",
            str(data / "dpo_hh_helpful_en.jsonl"),
            "--from",
            str(folder / "sft-alpaca"),
            "--out",
            str(out),
            *plain,
        ],
        folder / "dpo-hh.log",
    )
    evals = [
        json.loads(line)
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if '"eval"' in line
    ]
    print(
        f"| dpo hh_helpful_en | {wall:.0f} s | {evals[0]['val_loss']:.3f} (step "
        f"{evals[0]['step']}) -> {evals[-1]['val_loss']:.3f} (step {evals[-1]['step']}) | "
        f"{100 * evals[0]['pref_accuracy']:.1f} % -> {100 * evals[-1]['pref_accuracy']:.1f} % |"
    )


if __name__ == "__main__":
    main()
