"""PPO against a learned reward under different KL controls: does the reward rise without hacking?

For each parent run (`--from`, repeatable: the quickstart's `dpo` and/or `sft`) the reward model
is trained once (`minigpt rlhf --max-steps 1`, its `reward/` folder) and every configuration then
reuses it with `--reward-model`, so the sweep compares PPO, not reward-model noise. Each run is
the real verb with fixed `--max-steps` and `--threads 1` (figures do not depend on load), evaluated
every `--eval-every` iterations on `--eval-prompts` held-out prompts (greedy answers).

Printed per parent and configuration (mean over `--seeds`, with the spread min..max when there
are several): the held-out reward-model score, distinct-2 and each family's exact match before
(the parent, iteration 0) and after; whether the issue-14 goal holds (reward up, every family
within 3 points, distinct-2 down by at most 0.05); and the curves: reward / KL per response /
mean exact match at each evaluation (KL: the mean of the train rows since the last evaluation).

    python benchmarks/rlhf_kl.py --from runs/quickstart-tiny/dpo --from runs/quickstart-tiny/sft
    python benchmarks/rlhf_kl.py --from runs/quickstart-tiny/dpo --configs default,kl-off \\
        --seeds 0 1 2 --max-steps 300
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.rlhf import rows, run  # noqa: E402

# The sweep's default configurations. Any name of the forms `fixed-C` (kl_coef C, no target),
# `target-T[-cC][-hH]` (the KL held under T nats per response by the default ceiling control,
# starting at C, horizon H responses; the config's defaults where left out) and
# `ziegler-T[-cC][-hH]` (the same steered towards T both ways, `rlhf.kl_control = "target"`) is
# understood too (`config_flags`).
CONFIGS = ["default", "kl-off", "fixed-0.05", "fixed-0.2", "fixed-1", "target-0.05", "target-0.1"]


def config_flags(name: str) -> list[str]:
    """The `minigpt rlhf` flags of a sweep configuration's name (see CONFIGS)."""
    if name == "default":
        return []
    if name == "kl-off":
        return ["--kl-coef", "0"]
    kind, _, rest = name.partition("-")
    parts = rest.split("-")
    try:
        if kind == "fixed" and len(parts) == 1:
            return ["--kl-coef", str(float(parts[0])), "--target-kl", "0"]
        if kind in ("target", "ziegler"):
            flags = ["--target-kl", str(float(parts[0]))]
            if kind == "ziegler":
                flags += ["--set", "rlhf.kl_control=target"]
            for part in parts[1:]:
                if part.startswith("c"):
                    flags += ["--kl-coef", str(float(part[1:]))]
                elif part.startswith("h"):
                    flags += ["--set", f"rlhf.kl_horizon={int(part[1:])}"]
                else:
                    raise ValueError(part)
            return flags
    except ValueError:
        pass
    raise SystemExit(
        f"unknown config {name!r}: default, kl-off, fixed-C, target-T[-cC][-hH] or ziegler-T[...]"
    )


GOAL_POINTS = 3.0  # every family's exact match within this many points of the parent
GOAL_DISTINCT = 0.05  # distinct-2 may fall by at most this


def spread(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    """`mean` or `mean (min..max)` over seeds."""
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    low, high = min(values) * scale, max(values) * scale
    return f"{mean:.{digits}f} ({low:.{digits}f}..{high:.{digits}f})"


AT: int | None = None  # --at: read the runs as they stood at this iteration


def upto(out: Path, kind: str) -> list[dict]:
    """The run's rows of `kind` up to iteration --at (all without it). The learning rate is
    constant, so a run read at iteration N is the run of N iterations."""
    found = rows(out, kind)
    if AT is None:
        return found
    last = AT * steps_per_iteration(out)
    return [r for r in found if r["step"] <= last]


def steps_per_iteration(out: Path) -> int:
    """Optimizer steps of one PPO iteration: rows count steps, the run's budget iterations."""
    train = rows(out, "train")
    return max(1, int(train[-1]["step"]) // len(train))


def curve(out: Path) -> list[tuple[int, float, float, float]]:
    """(iteration, held-out reward, mean train KL per response since the last eval, mean EM)."""
    evals, train = upto(out, "eval"), upto(out, "train")
    per = steps_per_iteration(out)
    points, previous = [], 0
    for row in evals:
        step = int(row["step"])
        window = [r["kl"] for r in train if previous < r["step"] <= step]
        families = [v for k, v in row.items() if k.startswith("exact_match/")]
        points.append(
            (
                step // per,
                float(row["reward_mean"]),
                statistics.fmean(window) if window else 0.0,
                statistics.fmean(families) if families else 0.0,
            )
        )
        previous = step
    return points


def summarise(name: str, outs: list[Path]) -> None:
    """One configuration's before/after table, goal verdict and curves over its seeds."""
    firsts = [upto(o, "eval")[0] for o in outs]
    lasts = [upto(o, "eval")[-1] for o in outs]
    families = sorted(k for k in lasts[0] if k.startswith("exact_match/"))
    train = [upto(o, "train") for o in outs]
    tail = [statistics.fmean(r["kl"] for r in t[-max(1, len(t) // 10) :]) for t in train]
    coef = [t[-1].get("kl_coef", float("nan")) for t in train]
    iterations = lasts[0]["step"] // steps_per_iteration(outs[0])
    print(f"\n### {name}: {len(outs)} seed(s), {iterations} iterations")
    print(
        "| when | reward | distinct_2 | response_len | "
        + " | ".join(f.split("/")[1] for f in families)
        + " |"
    )
    print("|---|---|---|---|" + "---|" * len(families))
    for label, group in (("before", firsts), ("after", lasts)):
        cells = " | ".join(spread([r[f] for r in group], 100, 0) for f in families)
        print(
            f"| {label} | {spread([r['reward_mean'] for r in group])} | "
            f"{spread([r['distinct_2'] for r in group])} | "
            f"{spread([r['response_len'] for r in group], digits=1)} | {cells} |"
        )
    drops = [
        max(100 * (f[k] - la[k]) for k in families) for f, la in zip(firsts, lasts, strict=True)
    ]
    gains = [la["reward_mean"] - f["reward_mean"] for f, la in zip(firsts, lasts, strict=True)]
    fall = [f["distinct_2"] - la["distinct_2"] for f, la in zip(firsts, lasts, strict=True)]
    held = [
        g > 0 and d <= GOAL_POINTS and x <= GOAL_DISTINCT
        for g, d, x in zip(gains, drops, fall, strict=True)
    ]
    print(
        f"reward gain {spread(gains)}; largest family drop {spread(drops, digits=0)} points; "
        f"distinct-2 fall {spread(fall)}; KL per response over the last tenth {spread(tail)}; "
        f"final kl_coef {spread(coef)}; goal held in {sum(held)}/{len(held)} seed(s)"
    )
    for seed_out in outs:
        points = " ".join(f"{s}:{r:.2f}/{k:.2f}/{100 * e:.0f}" for s, r, k, e in curve(seed_out))
        print(f"curve {seed_out.name} (iteration:reward/KL/EM%): {points}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="parents", type=Path, action="append", required=True)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--max-steps", type=int, default=300, help="PPO iterations per run")
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--eval-prompts", type=int, default=None, help="default: the config's")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (one thread each)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument(
        "--report", action="store_true", help="only print what --workdir already holds"
    )
    parser.add_argument("--at", type=int, default=None, help="report at this iteration")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="extra --set")
    args = parser.parse_args()
    global AT
    AT = args.at
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    flags_of = {name: config_flags(name) for name in names}
    folder = args.workdir or Path(tempfile.mkdtemp(prefix="minigpt-rlhf-kl-"))
    folder.mkdir(parents=True, exist_ok=True)
    common = ["--threads", "1", "--set", "log.progress=plain", "--set", "log.plot=false"]
    common += ["--set", f"rlhf.eval_every={args.eval_every}", "--set", "rlhf.samples_every=0"]
    if args.eval_prompts:
        common += ["--set", f"rlhf.eval_prompts={args.eval_prompts}"]
    for item in args.sets:
        common += ["--set", item]
    for parent in args.parents:
        base = folder / parent.name
        reward_run = base / "reward-model"
        if not args.report and not (reward_run / "reward" / "trainer_state.json").exists():
            run(
                ["rlhf", "--from", str(parent), "--max-steps", "1", "--out", str(reward_run)]
                + ["--overwrite", *common],
                folder / f"{parent.name}.reward.log",
            )
        jobs = [(name, seed, base / f"{name}-seed{seed}") for name in names for seed in args.seeds]

        def one(
            job: tuple[str, int, Path], parent: Path = parent, reward_run: Path = reward_run
        ) -> None:
            name, seed, out = job
            if (out / "trainer_state.json").exists() and '"finished": true' in (
                out / "trainer_state.json"
            ).read_text():
                return  # already measured (rerunning the script only adds what is missing)
            flags = ["rlhf", "--from", str(parent), "--reward-model", str(reward_run / "reward")]
            flags += ["--max-steps", str(args.max_steps), "--seed", str(seed), "--out", str(out)]
            run([*flags, "--overwrite", *common, *flags_of[name]], out.parent / f"{out.name}.log")

        if not args.report:
            with ThreadPoolExecutor(args.jobs) as pool:
                list(pool.map(one, jobs))
        accuracy = rows(reward_run / "reward", "eval")[-1]["pref_accuracy"]
        print(f"\n## from {parent} (reward model held-out pair accuracy {100 * accuracy:.1f} %)")
        for name in names:
            summarise(name, [base / f"{name}-seed{seed}" for seed in args.seeds])


if __name__ == "__main__":
    main()
