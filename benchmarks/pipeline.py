"""What each stage adds: pretrain -> SFT -> DPO on the built-in data, timed and scored held out.

Runs the real verbs with their default settings (`minigpt pretrain --preset tiny`, `minigpt sft
--from ...`, `minigpt dpo --from ...`), each in its own process, and reports

- the wall time of each verb (tokenizer training, data preparation and evaluations included);
- held-out exact match per task family after each stage (the pretrained model is asked zero-shot
  in the chat format), on `--per-family` held-out questions per family;
- DPO's held-out preference accuracy (implicit reward against the SFT model; ties count wrong).

With `--real DIR` (the project's ../shared/data) it also fine-tunes on real text: SFT on
sft_alpaca_en.jsonl and sft_oasst_zh.jsonl, DPO on dpo_hh_helpful_en.jsonl, and reports their
held-out losses and preference accuracy.

    python benchmarks/pipeline.py                        # about 8 minutes on 2 cores
    python benchmarks/pipeline.py --real ../shared/data  # plus the real-data runs
    python benchmarks/pipeline.py --workdir /tmp/p --keep  # reuse finished stages
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


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


def held_out_exact_match(run_dir: Path, per_family: int) -> dict[str, float]:
    import torch

    from minigpt_cli.engine.checkpoint import load_run
    from minigpt_cli.engine.data import builtin_records
    from minigpt_cli.engine.sft import exact_match_by_family

    torch.set_num_threads(2)
    loaded = load_run(run_dir)
    records = builtin_records("sft", "val", 400, 0)
    return exact_match_by_family(loaded.model, loaded.tokenizer, records, per_family=per_family)


def last_eval(run_dir: Path) -> dict[str, Any]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "eval"][-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="reuse finished runs in --workdir")
    parser.add_argument("--per-family", type=int, default=100)
    parser.add_argument("--real", type=Path, default=None, help="folder with the real datasets")
    args = parser.parse_args()
    folder = args.workdir or Path(tempfile.mkdtemp(prefix="minigpt-pipeline-"))
    folder.mkdir(parents=True, exist_ok=True)
    if not args.keep:
        for child in ("pretrain", "sft", "dpo"):
            (folder / child / "trainer_state.json").unlink(missing_ok=True)
    plain = ["--set", "log.progress=plain"]
    stages = [
        ("pretrain", ["pretrain", "--preset", "tiny", "--out", str(folder / "pretrain"), *plain]),
        ("sft", ["sft", "--from", str(folder / "pretrain"), "--out", str(folder / "sft"), *plain]),
        ("dpo", ["dpo", "--from", str(folder / "sft"), "--out", str(folder / "dpo"), *plain]),
    ]
    seconds: dict[str, float] = {}
    scores: dict[str, dict[str, float]] = {}
    for name, verb in stages:
        seconds[name] = run_verb(verb, folder / f"{name}.log")
        scores[name] = held_out_exact_match(folder / name, args.per_family)
        print(f"{name}: {seconds[name]:.0f} s, {scores[name]}", flush=True)

    families = sorted(k for k in scores["sft"] if k.startswith("exact_match/"))
    print(f"\nwork dir {folder}; held-out exact match on {args.per_family} questions per family\n")
    header = ["stage", "wall time", *[f.split("/")[1] for f in families], "all"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name in ("pretrain", "sft", "dpo"):
        cells = [f"{100 * scores[name][f]:.0f} %" for f in [*families, "exact_match"]]
        print(f"| {name} | {seconds[name]:.0f} s | " + " | ".join(cells) + " |")
    dpo = last_eval(folder / "dpo")
    print(
        f"\nDPO held-out: pref_accuracy {100 * dpo['pref_accuracy']:.1f} %, margin "
        f"{dpo['margin']:.3f}, chosen reward {dpo['chosen_reward']:.3f}, rejected reward "
        f"{dpo['rejected_reward']:.3f}"
    )
    if args.real:
        real_data(args.real, folder, plain)


def real_data(data: Path, folder: Path, plain: list[str]) -> None:
    """SFT on Alpaca (en) and OASST (zh), DPO on HH-helpful, from the built-in pretrain run."""
    runs = [
        ("sft alpaca_en", ["sft", "--data", str(data / "sft_alpaca_en.jsonl")], "sft-alpaca"),
        ("sft oasst_zh", ["sft", "--data", str(data / "sft_oasst_zh.jsonl")], "sft-oasst"),
    ]
    print("\n| run | wall time | first val_loss | last val_loss | pref_accuracy |")
    print("|---|---|---|---|---|")
    for label, verb, name in runs:
        out = folder / name
        wall = run_verb(
            [*verb, "--from", str(folder / "pretrain"), "--out", str(out), *plain],
            folder / f"{name}.log",
        )
        evals = [
            json.loads(line)
            for line in (out / "metrics.jsonl").read_text().splitlines()
            if '"eval"' in line
        ]
        print(
            f"| {label} | {wall:.0f} s | {evals[0]['val_loss']:.3f} | "
            f"{evals[-1]['val_loss']:.3f} | |"
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
        f"| dpo hh_helpful_en | {wall:.0f} s | {evals[0]['val_loss']:.3f} | "
        f"{evals[-1]['val_loss']:.3f} | {100 * evals[0]['pref_accuracy']:.1f} % -> "
        f"{100 * evals[-1]['pref_accuracy']:.1f} % |"
    )


if __name__ == "__main__":
    main()
