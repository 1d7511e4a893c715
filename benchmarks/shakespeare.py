"""Validation bits per byte over wall time on tinyshakespeare (last 10 % held out).

The reference point: a tiny character-level nanoGPT-style model reaches about 2.7 bits per byte on
this split in about 70 s on the 2-core development machine. Bits per byte do not depend on the
tokenizer, so a BPE model and a character model compare directly.

    python benchmarks/shakespeare.py                        # tiny preset defaults
    python benchmarks/shakespeare.py --extra --set tokenizer.vocab_size=2000
    python benchmarks/shakespeare.py --extra --max-time 100s   # a deadline-planned run

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
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more CLI flags")
    args = parser.parse_args()
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
            "--set",
            "train.eval_every=25",
            *args.extra,
        ]
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    print(
        f"command: minigpt pretrain --preset {args.preset} --data train.txt --val-data val.txt "
        f"--set train.eval_every=25 {' '.join(args.extra)}".rstrip()
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


if __name__ == "__main__":
    main()
