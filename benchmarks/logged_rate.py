"""Logged tokens/s and ETA against the wall clock a user waits.

Runs `minigpt pretrain --preset tiny` for two lengths (default 40 and 240 steps) on text whose
tokenizer and shards are made once beforehand, so the two runs differ only by their extra steps:
the wall clock between them (process start to exit, measured from outside) over the extra tokens
is what a step really costs, all per-step work, evaluations and saves included. Against it: the
rate the longer run logged (over its train rows after the first), also against the run's own
clock over the same rows (the same process at the same moments, so a busy machine cancels out),
and each row's ETA against the time the rest of the run really took.

    python benchmarks/logged_rate.py --data tinyshakespeare.txt
    python benchmarks/logged_rate.py --data t.txt --repo /elsewhere/minigpt --repo .  # interleaved

`--repo` runs the CLI of another checkout (repeat it to interleave several, in turn, per repeat).
Prints one markdown row per run pair and the median and range per checkout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _cli(repo: Path, *args: str) -> float:
    """Run the CLI of `repo` (its package first on the path); returns the wall seconds."""
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "minigpt_cli", *args],
        cwd=repo,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - start


def _rows(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if row["kind"] == "train"]


def measure(repo: Path, base: Path, steps: tuple[int, int], threads: int) -> dict[str, float]:
    walls, tokens = [], []
    for count in steps:
        run_dir = base / f"run-{count}"
        walls.append(
            _cli(
                repo,
                "pretrain",
                "--preset",
                "tiny",
                "--data",
                str(base / "shards"),
                "--tokenizer",
                str(base / "tok"),
                "--max-steps",
                str(count),
                "--threads",
                str(threads),
                "--out",
                str(run_dir),
                "--overwrite",
                "--set",
                "log.progress=plain",
            )
        )
        rows = _rows(run_dir)
        tokens.append(rows[-1]["tokens"])
    wall_rate = (tokens[1] - tokens[0]) / (walls[1] - walls[0])
    rows = _rows(base / f"run-{steps[1]}")[1:]  # the first row's window holds the warm-up step
    # The logged rate over the rows, each row's tokens weighted by the seconds it says they took,
    # against the run's own clock (the rows' `time`) over the same rows: measured in the same
    # process at the same moments, so what other programs do cancels out.
    window_tokens = [b["tokens"] - a["tokens"] for a, b in zip(rows, rows[1:], strict=False)]
    logged = sum(window_tokens) / sum(
        t / row["tokens_per_sec"] for t, row in zip(window_tokens, rows[1:], strict=True)
    )
    clock = sum(window_tokens) / (rows[-1]["time"] - rows[0]["time"])
    last = rows[-1]
    eta_errors = [
        abs(row["eta_sec"] - (last["time"] - row["time"])) / (last["time"] - row["time"])
        for row in rows[:-1]
        if last["time"] - row["time"] > 5
    ]
    return {
        "wall_rate": wall_rate,
        "logged": logged,
        "clock": clock,
        "eta_error": statistics.median(eta_errors) if eta_errors else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--repo", type=Path, action="append", default=[])
    parser.add_argument("--steps", type=int, nargs=2, default=(40, 240))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    repos = [path.resolve() for path in args.repo] or [REPO]
    results: dict[Path, list[dict[str, float]]] = {repo: [] for repo in repos}
    print(
        "| checkout | wall clock between the runs, tokens/s | logged by the longer run | vs wall "
        "| its own clock over its rows | logged vs own clock | ETA error, median row |"
    )
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        _cli(repos[0], "tokenize", "train", "--input", str(args.data), "--out", str(base / "tok"))
        _cli(
            repos[0],
            "tokenize",
            "encode",
            "--tokenizer",
            str(base / "tok"),
            "--input",
            str(args.data),
            "--out",
            str(base / "shards"),
        )
        for _ in range(args.repeats):
            for repo in repos:
                row = measure(repo, base, tuple(args.steps), args.threads)
                results[repo].append(row)
                print(_line(repo.name, row), flush=True)
    print()
    for repo, rows in results.items():
        for against in ("wall_rate", "clock"):
            ratios = [100 * (row["logged"] / row[against] - 1) for row in rows]
            print(
                f"{repo.name}: logged vs {against}: median {statistics.median(ratios):+.1f} % "
                f"(range {min(ratios):+.1f} to {max(ratios):+.1f} %)"
            )
        errors = [100 * row["eta_error"] for row in rows]
        print(f"{repo.name}: ETA error, median of runs: {statistics.median(errors):.1f} %")


def _line(name: str, row: dict[str, float]) -> str:
    wall, logged, clock = row["wall_rate"], row["logged"], row["clock"]
    return (
        f"| {name} | {wall:,.0f} | {logged:,.0f} | {100 * (logged / wall - 1):+.1f} % "
        f"| {clock:,.0f} | {100 * (logged / clock - 1):+.1f} % | {100 * row['eta_error']:.1f} % |"
    )


if __name__ == "__main__":
    main()
