"""What RLHF adds on the built-in data: PPO and GRPO with the rule reward, PPO with a learned one.

Starts from a finished SFT run (`--from`, e.g. the `sft` folder `benchmarks/pipeline.py` leaves)
and runs the real verb three times, each limited by `--max-time` (default 2 minutes of RL):

- `minigpt rlhf --algo ppo --reward rule` and `--algo grpo --reward rule`: held-out exact match
  per task family before (the SFT run) and after, and the mean reward and KL per iteration;
- `minigpt rlhf --algo ppo --reward model` (the reward model trained first, its held-out
  preference accuracy reported): held-out reward before/after, response length and distinct-2,
  so that reward hacking by repetition or length would show.

With `--real DIR` (a folder of public sets as JSONL, named in the README) it also trains a
reward model on dpo_hh_helpful_en.jsonl (real human preferences) and reports its held-out
preference accuracy.

    python benchmarks/rlhf.py --from /tmp/minigpt-pipeline/quickstart/sft
    python benchmarks/rlhf.py --from /tmp/minigpt-pipeline/quickstart/sft --real DATA
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def rows(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def run(args: list[str], log: Path) -> float:
    start = time.perf_counter()
    with log.open("w") as handle:
        result = subprocess.run(
            [sys.executable, "-m", "minigpt_cli", *args], stdout=handle, stderr=subprocess.STDOUT
        )
    if result.returncode:
        raise SystemExit(f"minigpt {' '.join(args)} failed; see {log}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="parent", type=Path, required=True)
    parser.add_argument("--max-time", default="2m")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--real", type=Path, default=None, help="folder with the real datasets")
    args = parser.parse_args()
    folder = args.workdir or Path(tempfile.mkdtemp(prefix="minigpt-rlhf-"))
    common = ["--from", str(args.parent), "--max-time", args.max_time, "--max-steps", "1000"]
    common += ["--set", "log.progress=plain", "--overwrite"]
    runs = {
        "ppo-rule": ["--algo", "ppo", "--reward", "rule"],
        "grpo-rule": ["--algo", "grpo", "--reward", "rule"],
        "ppo-model": ["--algo", "ppo", "--reward", "model"],
    }
    for name, extra in runs.items():
        out = folder / name
        seconds = run(["rlhf", *common, *extra, "--out", str(out)], folder / f"{name}.log")
        evals, train = rows(out, "eval"), rows(out, "train")
        first, last = evals[0], evals[-1]
        print(f"\n## {name}: {seconds:.0f} s wall, {len(train)} iterations ({folder / name})")
        families = sorted(k for k in last if k.startswith("exact_match/"))
        print(
            "| when | reward_mean | response_len | distinct_2 | "
            + " | ".join(f.split("/")[1] for f in families)
            + " |"
        )
        print("|---|---|---|---|" + "---|" * len(families))
        for label, row in (("before", first), ("after", last)):
            cells = " | ".join(f"{100 * row[f]:.0f} %" for f in families)
            print(
                f"| {label} (step {row['step']}) | {row['reward_mean']:.3f} | "
                f"{row['response_len']:.1f} | {row['distinct_2']:.3f} | {cells} |"
            )
        curve = ", ".join(f"{r['reward_mean']:.2f}/{r['kl']:.3f}" for r in train)
        print(f"reward_mean/kl per iteration: {curve}")
        if name == "ppo-model":
            reward_eval = rows(out / "reward", "eval")[-1]
            print(
                f"reward model held-out pref_accuracy {100 * reward_eval['pref_accuracy']:.1f} % "
                f"(margin {reward_eval['margin']:.3f})"
            )
    if args.real:
        real_reward_model(args.parent, args.real / "dpo_hh_helpful_en.jsonl", folder)


def real_reward_model(parent: Path, pairs: Path, folder: Path) -> None:
    """A reward model trained on real human preference pairs (one PPO iteration follows it)."""
    out = folder / "ppo-model-hh"
    args = ["rlhf", "--from", str(parent), "--reward", "model", "--preference-data", str(pairs)]
    args += ["--max-steps", "1", "--set", "log.progress=plain", "--overwrite", "--out", str(out)]
    seconds = run(args, folder / "ppo-model-hh.log")
    evals = rows(out / "reward", "eval")
    print(
        f"\n## reward model on {pairs.name}: {seconds:.0f} s wall; held-out pref_accuracy "
        f"{100 * evals[0]['pref_accuracy']:.1f} % at step {evals[0]['step']} -> "
        f"{100 * evals[-1]['pref_accuracy']:.1f} % at step {evals[-1]['step']} "
        f"(margin {evals[-1]['margin']:.3f})"
    )


if __name__ == "__main__":
    main()
