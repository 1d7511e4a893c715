"""How close DPO, the reward model and RLHF in 2 processes come to the one-process run.

The runs of `tests/test_distributed_rl.py` (the same flags, imported from it), on a tiny
pretrained and SFT-tuned parent built here as the test fixtures build theirs (or `--from` a
finished SFT run): DPO for 20 steps, PPO with a reward model trained here and GRPO against that
reward model for 3 iterations each, once in one process and once under `--nproc 2` (gloo, fp32,
one thread each). Prints, per run and logged statistic, the largest relative difference between
the two runs' train rows, and the largest absolute difference of the final weights: what the
tests' tolerances (1e-5 for DPO and the reward model, `RL_TOLERANCE` for RLHF) are set against.

    python benchmarks/ddp_rl_agreement.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from safetensors.torch import load_file  # noqa: E402

from tests.conftest import FINETUNE_SETS, TINY_SETS, set_args  # noqa: E402
from tests.test_distributed_rl import (  # noqa: E402
    DPO_RUN_FLAGS,
    DPO_RUN_SETS,
    GRPO,
    GRPO_SETS,
    PPO,
    REWARD_SETS,
    RL_SETS,
    RL_STATS,
)

FP32 = ["--precision", "fp32", "--device", "cpu", "--threads", "1"]


def minigpt(*args: str | Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "minigpt_cli", *map(str, args)]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout}{result.stderr}")


def train_rows(run_dir: Path) -> list[dict]:
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [row for row in rows if row["kind"] == "train"]


def differences(one: Path, two: Path, statistics: tuple[str, ...]) -> dict[str, float]:
    """Largest relative difference of each statistic over the train rows, and of the weights
    (absolute)."""
    found: dict[str, float] = {}
    for a, b in zip(train_rows(one), train_rows(two), strict=True):
        for key in statistics:
            if key in a:
                scale = max(abs(a[key]), 1e-12)
                found[key] = max(found.get(key, 0.0), abs(a[key] - b[key]) / scale)
    for file in ("model.safetensors", "value_head.safetensors"):
        if (one / file).exists():
            first, second = load_file(str(one / file)), load_file(str(two / file))
            largest = max(float((first[n] - second[n]).abs().max()) for n in first)
            found[f"{file.split('.')[0]} (abs)"] = largest
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="parent", type=Path, help="a finished SFT run")
    options = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ddp-rl-"))
    parent = options.parent
    if parent is None:
        pretrained, parent = work / "pretrain", work / "sft"
        minigpt("pretrain", "--out", pretrained, "--max-steps", "30", *FP32, *set_args(TINY_SETS))
        sft = ["--from", pretrained, "--out", parent, "--max-steps", "30", *FP32]
        minigpt("sft", *sft, *set_args(FINETUNE_SETS))
    reward = work / "ppo-1" / "reward"  # trained by the one-process PPO run, reused by GRPO
    runs = {
        "dpo": ["dpo", *DPO_RUN_FLAGS, *set_args(DPO_RUN_SETS)],
        "ppo": ["rlhf", *PPO, *set_args([*RL_SETS, *REWARD_SETS])],
        "grpo": ["rlhf", *GRPO, "--reward-model", str(reward), *set_args(GRPO_SETS)],
    }
    print(f"{'run':<12} {'statistic':<14} largest difference, 2 processes against 1")
    for name, (verb, *flags) in runs.items():
        one, two = work / f"{name}-1", work / f"{name}-2"
        minigpt(verb, "--from", parent, "--out", one, *FP32, *flags)
        minigpt(verb, "--from", parent, "--out", two, *FP32, *flags, "--nproc", "2")
        compared = [(name, one, two, RL_STATS if verb == "rlhf" else ("loss",))]
        if name == "ppo":
            compared.append(("ppo reward", one / "reward", two / "reward", ("loss",)))
        for label, first, second, statistics in compared:
            for key, value in differences(first, second, statistics).items():
                print(f"{label:<12} {key:<14} {value:.2e}")
    print(f"(runs kept in {work})")


if __name__ == "__main__":
    main()
