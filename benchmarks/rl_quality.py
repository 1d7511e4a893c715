"""Does each fine-tuning stage make the model better, over three seeds? The figures of issue 14.

For every seed it runs what a user runs, with default settings and the tiny preset:

- `minigpt quickstart --seed S` (tokenizer + pretrain -> SFT -> DPO -> reward model + PPO, eval);
- from that quickstart's SFT run, `minigpt rlhf --algo grpo --reward rule` and
  `minigpt rlhf --algo ppo --reward rule` (the verifiable-reward RL the issue asks about);
- from its DPO run, `minigpt rlhf --reward-model <quickstart>/rlhf/reward` (the verb's default:
  PPO against the learned reward under the default KL control, the quickstart's reward model
  reused so that the run compares PPO, not reward models);
- `minigpt eval` of every run on ALL the built-in held-out prompts (`--per-family 0`, 100 per
  task family: one answer is one point), the reward model of that seed's quickstart scoring the
  answers, and bits per byte on the held-out pretraining text.

It prints, per stage: held-out exact match per family, bits per byte and the reward model's
score as the mean over the seeds with the spread (min..max); the wall time of each run; which
run the quickstart told the user to chat with; and SFT's own held-out exact match at each of its
evaluations (the "cliff" of translation), per seed.

    python benchmarks/rl_quality.py                       # 3 seeds, about an hour on 2 cores
    python benchmarks/rl_quality.py --seeds 0 --workdir /tmp/rq --keep   # reuse finished runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minigpt_cli.engine.evaluate.report import EvalReport, RunReport, best_chat_run  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rlhf import run as minigpt  # noqa: E402  (one way to run the verb and time it)

STAGES = ("pretrain", "sft", "dpo", "rlhf")
REWARD_MODEL = "<the quickstart's reward model>"  # replaced by its path, per seed
RL_RUNS = {  # name: (the quickstart stage it starts from, its flags)
    "grpo-rule": ("sft", ["--algo", "grpo", "--reward", "rule"]),
    "ppo-rule": ("sft", ["--algo", "ppo", "--reward", "rule"]),
    "ppo-model": ("dpo", ["--reward-model", REWARD_MODEL]),
}


def finished(run_dir: Path) -> bool:
    state = run_dir / "trainer_state.json"
    return state.exists() and bool(json.loads(state.read_text()).get("finished"))


def eval_rows(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if row["kind"] == "eval"]


def one_seed(seed: int, folder: Path, keep: bool) -> dict:
    """Every run of one seed, and the eval report of all of them."""
    quick = folder / f"quickstart-{seed}"
    seconds: dict[str, float] = {}
    if not (keep and all(finished(quick / stage) for stage in STAGES)):
        args = ["quickstart", "--preset", "tiny", "--seed", str(seed), "--out", str(quick)]
        seconds["quickstart"] = minigpt(
            [*args, "--set", "log.progress=plain"], quick.with_suffix(".log")
        )
    times = json.loads((quick / "quickstart.json").read_text())
    quick_report = json.loads((quick / "eval.json").read_text())
    best = best_chat_run(EvalReport([RunReport(**run) for run in quick_report["runs"]], {}, {}))
    chat_line = "" if best is None else f"minigpt chat {best.path}"
    runs = {stage: quick / stage for stage in STAGES}
    for name, (parent, flags) in RL_RUNS.items():
        out = folder / f"{name}-{seed}"
        if not (keep and finished(out)):
            reward = str(quick / "rlhf" / "reward")
            extra = [reward if flag == REWARD_MODEL else flag for flag in flags]
            args = ["rlhf", "--from", str(runs[parent]), *extra, "--seed", str(seed)]
            args += ["--out", str(out), "--overwrite", "--set", "log.progress=plain"]
            seconds[name] = minigpt(args, folder / f"{name}-{seed}.log")
        runs[name] = out
    report_file = folder / f"eval-{seed}.json"
    args = ["eval", *map(str, runs.values()), "--per-family", "0", "--samples", "0"]
    args += ["--reward-model", str(quick / "rlhf" / "reward"), "--output", str(report_file)]
    minigpt(args, folder / f"eval-{seed}.log")
    report = json.loads(report_file.read_text())
    metrics = {name: run["metrics"] for name, run in zip(runs, report["runs"], strict=True)}
    sft_curve = [
        (row["step"], {k.split("/")[1]: v for k, v in row.items() if k.startswith("exact_match/")})
        for row in eval_rows(runs["sft"])
    ]
    return {
        "metrics": metrics,
        "seconds": seconds,
        "quickstart_seconds": times,
        "chat": chat_line,
        "sft_curve": sft_curve,
    }


def spread(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    """'mean (min..max)' of the seeds' values, or the one value."""
    scaled = [scale * v for v in values]
    mean = statistics.fmean(scaled)
    if len(scaled) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({min(scaled):.{digits}f}..{max(scaled):.{digits}f})"


def print_tables(results: dict[int, dict]) -> None:
    seeds = sorted(results)
    first = results[seeds[0]]["metrics"]
    names = list(first)
    families = sorted(k.split("/")[1] for k in first["sft"] if k.startswith("exact_match/"))
    print(
        f"\n## Held-out exact match (%), bits per byte, reward: mean (min..max) over seeds {seeds}"
    )
    print("| run | " + " | ".join(families) + " | all | bpb | reward |")
    print("|---|" + "---|" * (len(families) + 3))
    for name in names:
        cells = []
        for key, scale, digits in [
            *((f"exact_match/{f}", 100.0, 1) for f in families),
            ("exact_match", 100.0, 1),
            ("bpb", 1.0, 3),
            ("reward", 1.0, 3),
        ]:
            values = [results[s]["metrics"][name].get(key) for s in seeds]
            present = [v for v in values if v is not None]
            cells.append(spread(present, scale, digits) if present else "-")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\n## Wall time (s) per seed")
    for seed in seeds:
        quick = results[seed]["quickstart_seconds"]
        parts = ", ".join(f"{k} {v:.0f}" for k, v in quick["seconds"].items())
        rl = ", ".join(
            f"{k} {v:.0f}" for k, v in results[seed]["seconds"].items() if k != "quickstart"
        )
        print(f"- seed {seed}: quickstart {quick['total_seconds']:.0f} ({parts}); {rl}")
        if results[seed]["chat"]:
            print(f"  quickstart named: {results[seed]['chat']}")
    print("\n## SFT's own held-out exact match (16 per family) at each evaluation")
    for seed in seeds:
        curve = "; ".join(
            f"step {step}: " + " ".join(f"{f[:5]} {100 * v:.0f}" for f, v in sorted(row.items()))
            for step, row in results[seed]["sft_curve"]
        )
        print(f"- seed {seed}: {curve}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="reuse runs that finished earlier")
    args = parser.parse_args()
    folder = args.workdir or Path(tempfile.mkdtemp(prefix="minigpt-rl-quality-"))
    folder.mkdir(parents=True, exist_ok=True)
    results = {}
    for seed in args.seeds:
        results[seed] = one_seed(seed, folder, args.keep)
        (folder / "results.json").write_text(json.dumps(results, indent=2))
    print_tables(results)
    print(f"\nruns and logs in {folder}")


if __name__ == "__main__":
    main()
