"""What SFT's text mix buys: held-out pretraining-text bits per byte against exact match and time.

Starts from a finished pretraining run (`--from`, e.g. the `pretrain` folder of a tiny
quickstart) and runs `minigpt sft` once per option, one thread each and a fixed step count, so
CPU seconds compare across options whatever else the machine runs:

- `off`: today's SFT before the mix (32 records a step, `sft.text_mix=0`);
- three mixes replacing some of the 32 records with pretraining-text windows (share, window
  length and loss weight as named);
- `preset`: the preset as it ships (tiny: 36 a step, 32 records and 4 windows of 32 tokens);
- `lr 1e-3 x 1800`: a smaller learning rate with more steps, no mix;
- `lora`: `--lora`, no mix.

Each run is then scored by `minigpt eval RUN --no-pref` (held-out exact match per family on 50
questions each, bits per byte on the built-in documents pretraining held out). With `--chain`
the preset's run is also followed by the quickstart's DPO and PPO (`minigpt dpo`, then `minigpt
rlhf --algo ppo` from the DPO run) and both are scored the same way.

    python benchmarks/sft_mix.py --from runs/quickstart-tiny/pretrain --chain
    python benchmarks/sft_mix.py --from runs/quickstart-tiny/pretrain --only preset,off
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FAMILIES = ("facts", "translation", "string_ops", "addition")
OLD_BATCH = ["--set", "sft.micro_batch_size=32", "--set", "sft.global_batch_size=32"]


def mix(share: float, chunk: int, weight: float) -> list[str]:
    return [
        *OLD_BATCH,
        *("--set", f"sft.text_mix={share}", "--set", f"sft.text_chunk={chunk}"),
        *("--set", f"sft.text_weight={weight}"),
    ]


OPTIONS: dict[str, list[str]] = {
    "off": [*OLD_BATCH, "--set", "sft.text_mix=0"],
    "mix 0.25, 64 tokens, weight 0.25": mix(0.25, 64, 0.25),
    "mix 0.0625, 32 tokens, weight 0.25": mix(0.0625, 32, 0.25),
    "mix 0.125, 32 tokens, weight 0.1": mix(0.125, 32, 0.1),
    "preset": [],
    "lr 1e-3 x 1800": [
        *OLD_BATCH,
        *("--set", "sft.text_mix=0", "--set", "sft.learning_rate=1e-3"),
        *("--set", "sft.min_lr=1e-4", "--max-steps", "1800"),
    ],
    "lora": [*OLD_BATCH, "--set", "sft.text_mix=0", "--lora"],
}


def minigpt(args: list[str], log: Path) -> tuple[float, float]:
    """Run one verb; (wall seconds, CPU seconds of the child)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with log.open("w") as handle:
        result = subprocess.run(
            [sys.executable, "-m", "minigpt_cli", *args], stdout=handle, stderr=subprocess.STDOUT
        )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode:
        raise SystemExit(f"minigpt {' '.join(args)} failed; see {log}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def score(run_dir: Path, folder: Path) -> dict[str, float]:
    out = folder / f"{run_dir.name}.eval.json"
    args = ["eval", str(run_dir), "--no-pref", "--samples", "0", "--json", "--output", str(out)]
    minigpt(args, folder / f"{run_dir.name}.eval.log")
    return json.loads(out.read_text())["runs"][0]["metrics"]


def row(name: str, wall: float | None, cpu: float | None, metrics: dict[str, float]) -> str:
    times = f"{wall:.0f} s | {cpu:.0f} s" if wall is not None and cpu is not None else "|"
    families = " | ".join(f"{100 * metrics[f'exact_match/{f}']:.0f} %" for f in FAMILIES)
    return f"| {name} | {times} | {families} | {100 * metrics['exact_match']:.1f} % | " + (
        f"{metrics['bpb']:.3f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="parent", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--only", default="", help="comma-separated option names")
    parser.add_argument("--chain", action="store_true", help="DPO and PPO after the preset's run")
    parser.add_argument("--steps", default="", help="every run this many steps (a smoke test)")
    args = parser.parse_args()
    folder = args.workdir or Path(tempfile.mkdtemp(prefix="minigpt-sft-mix-"))
    folder.mkdir(parents=True, exist_ok=True)
    chosen = [n for n in OPTIONS if not args.only or n in args.only.split(",")]
    common = ["--threads", "1", "--set", "log.progress=plain", "--overwrite"]
    steps = ["--max-steps", args.steps] if args.steps else []
    print(f"runs in {folder}", file=sys.stderr)
    print(f"pretrain bpb: {score(args.parent, folder)['bpb']:.3f}")
    print("| SFT option | wall | CPU | " + " | ".join(FAMILIES) + " | all | bpb |")
    print("|---|---|---|" + "---|" * (len(FAMILIES) + 2))
    for index, name in enumerate(chosen):
        run_dir = folder / f"sft-{index}"
        sft = ["sft", "--from", str(args.parent), "--out", str(run_dir), *common]
        wall, cpu = minigpt([*sft, *OPTIONS[name], *steps], folder / f"sft-{index}.log")
        print(row(name, wall, cpu, score(run_dir, folder)), flush=True)
        if args.chain and name == "preset":
            parent = run_dir
            for verb, extra in (("dpo", []), ("rlhf", ["--algo", "ppo"])):
                child = folder / f"{verb}-{index}"
                command = [
                    verb,
                    "--from",
                    str(parent),
                    "--out",
                    str(child),
                    *common,
                    *extra,
                    *steps,
                ]
                wall, cpu = minigpt(command, folder / f"{verb}-{index}.log")
                print(row(f"  then {verb}", wall, cpu, score(child, folder)), flush=True)
                parent = child


if __name__ == "__main__":
    main()
