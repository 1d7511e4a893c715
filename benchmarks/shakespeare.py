"""Validation bits per byte over wall time on tinyshakespeare (last 10 % held out).

The peer (`--peer`): nanoGPT's CPU recipe for the same text (`benchmarks/nanogpt_char.py`, a
character-level model), run in turn with minigpt on the same split and the same training time.
Bits per byte do not depend on the tokenizer, so a BPE model and a character model compare
directly.

    python benchmarks/shakespeare.py                        # tiny preset defaults
    python benchmarks/shakespeare.py --extra --set tokenizer.vocab_size=2000
    python benchmarks/shakespeare.py --extra --max-time 100s   # a deadline-planned run
    python benchmarks/shakespeare.py --peer --repeats 2 --eval-every 0 \
        --extra --config examples/shakespeare.toml          # the 100-second recipe, nanoGPT beside

Needs Karpathy's tinyshakespeare.txt (--data PATH). Prints the curve as a markdown table,
then the last evaluation against the best one seen and the last logged learning rate: a run that
ends annealed ends at (or within noise of) its best, at min_lr.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--peer", action="store_true", help="run nanoGPT's CPU recipe in turn")
    parser.add_argument("--repeats", type=int, default=1, help="rounds (minigpt, then the peer)")
    parser.add_argument("--peer-time", type=float, default=100.0, help="peer's training seconds")
    parser.add_argument(
        "--eval-every", type=int, default=25, help="minigpt's eval_every (0: the config's)"
    )
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more CLI flags")
    args = parser.parse_args()
    ends = []
    for _ in range(args.repeats):
        ends.append(("minigpt", *_minigpt(args)))
        if args.peer:
            ends.append(("nanoGPT CPU recipe", *_peer(args)))
    if len(ends) > 1:
        print("\n| round | run | wall time (s) | val bits/byte at the end |")
        print("|---|---|---|---|")
        for index, (name, wall, bits) in enumerate(ends):
            print(f"| {index // (2 if args.peer else 1) + 1} | {name} | {wall:.0f} | {bits:.3f} |")


def _peer(args: argparse.Namespace) -> tuple[float, float]:
    """nanoGPT's recipe in its own process (torch's default threads, as a user runs it)."""
    command = [
        sys.executable,
        str(REPO / "benchmarks" / "nanogpt_char.py"),
        "--data",
        str(args.data),
        "--max-time",
        str(args.peer_time),
        "--json",
    ]
    start = time.perf_counter()
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    wall = time.perf_counter() - start
    curve = [json.loads(line) for line in output.splitlines()]
    print(f"\nnanoGPT's CPU recipe (benchmarks/nanogpt_char.py), wall time {wall:.0f} s\n")
    print("| step | training time (s) | val bits/byte |")
    print("|---|---|---|")
    for row in curve:
        print(f"| {row['step']} | {row['time']:.0f} | {row['val_bpb']:.3f} |")
    return wall, curve[-1]["val_bpb"]


def _minigpt(args: argparse.Namespace) -> tuple[float, float]:
    text = args.data.read_text(encoding="utf-8")
    cut = text.rfind("\n", 0, int(len(text) * 0.9)) + 1
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        (base / "train.txt").write_text(text[:cut], encoding="utf-8")
        (base / "val.txt").write_text(text[cut:], encoding="utf-8")
        run_dir = base / "run"
        command = [
            sys.executable,
            "-m",
            "minigpt_cli",
            "pretrain",
            "--preset",
            args.preset,
            "--data",
            str(base / "train.txt"),
            "--val-data",
            str(base / "val.txt"),
            "--out",
            str(run_dir),
            *(["--set", f"train.eval_every={args.eval_every}"] if args.eval_every else []),
            *args.extra,
        ]
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    print(
        f"command: minigpt pretrain --preset {args.preset} --data train.txt --val-data val.txt "
        + (f"--set train.eval_every={args.eval_every} " if args.eval_every else "")
        + " ".join(args.extra)
    )
    print(f"wall time including tokenizer and encoding: {wall:.0f} s\n")
    print("| step | training time (s) | tokens | val bits/byte |")
    print("|---|---|---|---|")
    for row in evals:
        print(f"| {row['step']} | {row['time']:.0f} | {row['tokens']:,} | {row['val_bpb']:.3f} |")
    train = [r for r in rows if r["kind"] == "train"]
    best = min(evals, key=lambda r: r["val_bpb"])
    print(
        f"\nend: val bits/byte {evals[-1]['val_bpb']:.3f} at step {evals[-1]['step']}; "
        f"best {best['val_bpb']:.3f} at step {best['step']}; last logged lr {train[-1]['lr']:.3g}"
    )
    return wall, evals[-1]["val_bpb"]


if __name__ == "__main__":
    main()
