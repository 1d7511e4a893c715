"""Logged tokens/s and ETA against the wall clock a user waits.

Runs `minigpt pretrain --preset tiny` for two lengths (default 40 and 240 steps) on text whose
tokenizer and shards are made once beforehand, so the two runs differ only by their extra steps:
the wall clock between them (process start to exit, measured from outside) over the extra tokens
is what a step really costs, all per-step work, evaluations and saves included. Against it: the
rate the longer run logged (its train rows between the first and the last one, and the median
row), and each row's ETA against the time the rest of the run really took.

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
    rows = _rows(base / f"run-{steps[1]}")
    first, last = rows[0], rows[-1]
    logged = (last["tokens"] - first["tokens"]) / (last["time"] - first["time"])
    median_row = statistics.median(row["tokens_per_sec"] for row in rows[1:])
    eta_errors = [
        abs(row["eta_sec"] - (last["time"] - row["time"])) / (last["time"] - row["time"])
        for row in rows[1:-1]
        if last["time"] - row["time"] > 5
    ]
    return {
        "wall_rate": wall_rate,
        "rows_rate": logged,
        "median_row": median_row,
        "eta_error": statistics.median(eta_errors) if eta_errors else float("nan"),
        "eta_worst": max(eta_errors) if eta_errors else float("nan"),
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
        "| checkout | wall-clock tokens/s | logged (rows) | vs wall | median row | vs wall |"
        " ETA error, median | worst |"
    )
    print("|---|---|---|---|---|---|---|---|")
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
        for key in ("rows_rate", "median_row"):
            ratios = [100 * (row[key] / row["wall_rate"] - 1) for row in rows]
            print(
                f"{repo.name}: {key} vs wall clock: median {statistics.median(ratios):+.1f} % "
                f"(range {min(ratios):+.1f} to {max(ratios):+.1f} %)"
            )
        errors = [row["eta_error"] for row in rows]
        print(f"{repo.name}: ETA error, median of runs: {100 * statistics.median(errors):.1f} %")


def _line(name: str, row: dict[str, float]) -> str:
    wall = row["wall_rate"]
    rows, median = row["rows_rate"], row["median_row"]
    return (
        f"| {name} | {wall:,.0f} | {rows:,.0f} | {100 * (rows / wall - 1):+.1f} % "
        f"| {median:,.0f} | {100 * (median / wall - 1):+.1f} % "
        f"| {100 * row['eta_error']:.1f} % | {100 * row['eta_worst']:.1f} % |"
    )


if __name__ == "__main__":
    main()
