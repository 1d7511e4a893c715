"""Crash consistency: training killed with SIGKILL at random instants resumes bit for bit.

For each stage (pretrain; SFT full and LoRA; DPO; RLHF: PPO with the rule reward, and PPO with a
reward model trained in the run) this runs the real command once unkilled (the reference), then
`--trials` times: the same command killed with SIGKILL, then `minigpt VERB --out RUN --resume`
(or, when the kill came before the first checkpoint and minigpt says "nothing to resume" with exit
status 2, the same command again with `--overwrite`), and compares the run directory with the
reference byte for byte:

- every safetensors file (model, adapter, value head, optimizer moments; the top level, every
  kept snapshot under checkpoints/, and the reward model's sub-run reward/), and tokenizer.model;
- every trainer_state.json apart from its wall-clock fields (`WALL_CLOCK_FIELDS`) and with the
  run's own path written as `<run>` (sources name the reward model's folder inside the run);
- no temporary left behind: names starting with "." and ending .tmp or .link, *.partial, a lock.

Where the kills fall: most trials are killed at an instant drawn uniformly over the reference's
wall time (seeded); `--publication-share` of them (default a quarter) are killed exactly during
snapshot publication with `MINIGPT_FAULT=kill@N` (the seam in engine/core/io.py), N drawn from the
write indices that fall inside a checkpoint save of the reference, from creating the snapshot's
temporary folder to swapping in its trainer_state.json. Those indices come from a write trace of
the reference: every run here is started through `TRACER`, which records each write the seam sees
(index and path) and changes nothing else, so each trial also says where it died.

With `--load` (the default) a busy loop runs on every core during the references and the trials,
as when the user keeps working. Every command passes `--threads 1`: the thread count decides the
order of float reductions, and by default it depends on how busy the machine is when a run starts,
so a run started under load and one started on an idle machine are not comparable bit for bit
(a resumed run reuses the count its checkpoint recorded). fp32 on the CPU, tiny shapes (as
tests/conftest.py's TINY_SETS / FINETUNE_SETS, longer so that training is a fair share of a run's
wall time).

    python benchmarks/crash_consistency.py                 # 20 trials a stage, both cores busy
    python benchmarks/crash_consistency.py --trials 3 --stages pretrain dpo --no-load
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

WALL_CLOCK_FIELDS = ("elapsed",)
"""trainer_state.json keys that measure time (seconds trained so far), never equal run to run."""

# The tracer: `python -c TRACER VERB ARGS` runs `minigpt VERB ARGS` with every write the seam sees
# logged to $CRASH_TRACE as "index<TAB>path" (index as MINIGPT_FAULT counts them). With
# $CRASH_KILL_AT = "PATH#K" it arms MINIGPT_FAULT=kill@1 at the K-th write of PATH, so the seam
# itself kills the process there (the tests name a write by its file, robust to new writes).
TRACER = """
import os, sys
import minigpt_cli.engine.core.io as io
seam, count, seen = io.before_write, 0, 0
log = open(os.environ["CRASH_TRACE"], "w", encoding="utf-8")
path_at, _, nth = os.environ.get("CRASH_KILL_AT", "").rpartition("#")
def traced(path):
    global count, seen
    count += 1
    log.write(f"{count}\\t{path}\\n")
    log.flush()
    if path_at and str(path) == path_at:
        seen += 1
        if seen == int(nth):
            os.environ[io.FAULT_ENV] = "kill@1"
    seam(path)
io.before_write = traced
from minigpt_cli.cli.app import main
sys.argv[0] = "minigpt"
main()
"""

_TINY = [
    "model.n_embd=64",
    "model.n_layer=2",
    "model.n_head=2",
    "model.context_length=64",
    "tokenizer.vocab_size=600",
    "data.builtin_size=400",
    "log.plot=false",
    "log.progress=plain",
]
_BATCH = {
    "micro_batch_size": 4,
    "global_batch_size": 8,
    "warmup_steps": 2,
    "eval_every": 20,
    "save_every": 10,
    "log_every": 5,
}
_FT = [f"{section}.{key}={value}" for section in ("train", "sft") for key, value in _BATCH.items()]
_FT += ["train.eval_batches=2", "sft.exact_match_per_family=2", "dpo.exact_match_per_family=2"]
_RL = [
    "rlhf.rollout_batch_size=8",
    "rlhf.global_batch_size=8",
    "rlhf.micro_batch_size=8",
    "rlhf.max_new_tokens=8",
    "rlhf.eval_prompts=8",
    "rlhf.samples_every=0",
    "rlhf.eval_every=4",
    "rlhf.save_every=2",
]
_REWARD = [f"reward.{key}={value}" for key, value in {**_BATCH, "max_steps": 60}.items()]
COMMON = ["--precision", "fp32", "--device", "cpu", "--threads", "1"]


def _sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


@dataclass(frozen=True)
class Stage:
    """A command under test: its verb, its arguments (no --out) and the run it starts from."""

    name: str
    verb: str
    args: tuple[str, ...]
    parent: str | None = None  # the stage whose reference run is this one's --from


STAGES = {
    stage.name: stage
    for stage in (
        Stage("pretrain", "pretrain", ("--max-steps", "60", *_sets([*_TINY, *_FT]))),
        Stage("sft", "sft", ("--max-steps", "60", *_sets([*_TINY, *_FT])), "pretrain"),
        Stage(
            "sft-lora", "sft", ("--lora", "--max-steps", "60", *_sets([*_TINY, *_FT])), "pretrain"
        ),
        Stage("dpo", "dpo", ("--max-steps", "60", *_sets([*_TINY, *_FT])), "sft"),
        Stage(
            "rlhf-rule",
            "rlhf",
            ("--reward", "rule", "--max-steps", "12", *_sets([*_TINY, *_FT, *_RL])),
            "sft",
        ),
        Stage(
            "rlhf-reward-model",
            "rlhf",
            (
                "--reward",
                "model",
                "--max-steps",
                "4",
                *_sets([*_TINY, *_FT, *_RL, *_REWARD]),
            ),
            "sft",
        ),
    )
}


# ----------------------------------------------------------------------------- running minigpt


def minigpt(
    args: list[str],
    *,
    trace: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """`minigpt ARGS` in its own process (through the tracer when `trace` is given)."""
    code = ["-c", TRACER] if trace is not None else ["-m", "minigpt_cli"]
    full_env = {**os.environ, **(env or {})}
    if trace is not None:
        full_env["CRASH_TRACE"] = str(trace)
    return subprocess.run(
        [sys.executable, *code, *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_trace(trace: Path) -> list[str]:
    """The paths the traced process wrote, in order (element i is write i + 1)."""
    if not trace.exists():
        return []
    return [line.split("\t", 1)[1] for line in trace.read_text(encoding="utf-8").splitlines()]


_BUILDING = re.compile(r"^(?P<run>.*)/checkpoints/\.step-\d+\.tmp$")


def publication_windows(paths: list[str]) -> list[tuple[int, int]]:
    """Write indices (1-based, inclusive) of each checkpoint save in a trace: from creating the
    snapshot's temporary folder to swapping in the run's trainer_state.json."""
    windows, open_at = [], {}
    for index, path in enumerate(paths, start=1):
        building = _BUILDING.match(path)
        if building:
            open_at[building["run"]] = index
        elif path.endswith("/trainer_state.json") and "/checkpoints/" not in path:
            run = path.rsplit("/", 1)[0]
            if run in open_at:
                windows.append((open_at.pop(run), index))
    return windows


def resume_or_restart(stage: Stage, run_dir: Path, command: list[str]) -> tuple[str, str]:
    """Continue a killed run as its user would: `--resume`, or when nothing was saved yet the
    same command with `--overwrite`. Returns (how, output) with how one of "resumed",
    "restarted", "already finished"; raises on any other outcome."""
    result = minigpt([stage.verb, "--out", str(run_dir), "--resume"])
    output = result.stdout + result.stderr
    if result.returncode == 2 and "nothing to resume" in result.stderr:
        again = minigpt([*command, "--overwrite"])
        if again.returncode != 0:
            raise RuntimeError(f"restart failed ({again.returncode}): {again.stderr[-2000:]}")
        return "restarted", output + again.stdout + again.stderr
    if result.returncode != 0:
        raise RuntimeError(f"resume failed ({result.returncode}): {output[-2000:]}")
    return ("already finished" if "already finished" in result.stdout else "resumed"), output


# ----------------------------------------------------------------------------- comparing runs


def _compared_files(run_dir: Path) -> dict[str, Path]:
    found = {}
    for path in sorted(run_dir.rglob("*")):
        if path.name.startswith(".") or not path.is_file():
            continue
        if path.suffix == ".safetensors" or path.name in ("trainer_state.json", "tokenizer.model"):
            found[str(path.relative_to(run_dir))] = path
    return found


def comparable_state(path: Path, run_dir: Path) -> dict:
    """A trainer_state.json without its wall-clock fields, the run's own path as `<run>`."""
    text = path.read_text(encoding="utf-8")
    for spelling in {str(run_dir), str(run_dir.resolve())}:
        text = text.replace(json.dumps(spelling)[1:-1], "<run>")
    state = json.loads(text)
    for key in WALL_CLOCK_FIELDS:
        state.pop(key, None)
    return state


def compare_runs(reference: Path, trial: Path) -> list[str]:
    """What differs between two run directories (empty: bitwise equal as described above)."""
    expected, found = _compared_files(reference), _compared_files(trial)
    problems = [f"missing {name}" for name in sorted(expected.keys() - found.keys())]
    problems += [f"extra {name}" for name in sorted(found.keys() - expected.keys())]
    for name in sorted(expected.keys() & found.keys()):
        if name.endswith("trainer_state.json"):
            want = comparable_state(expected[name], reference)
            got = comparable_state(found[name], trial)
            if want != got:
                keys = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
                problems.append(f"{name} differs in {', '.join(keys)}")
        elif expected[name].read_bytes() != found[name].read_bytes():
            problems.append(f"{name} differs")
    return problems


def leftover_temporaries(run_dir: Path) -> list[str]:
    """Temporary files or folders a killed writer left and no later run removed, and locks."""
    left = []
    for path in run_dir.rglob("*"):
        name = path.name
        if (
            (name.startswith(".") and name.endswith((".tmp", ".link")))
            or name.endswith(".partial")
            or name == ".lock"
        ):
            left.append(str(path.relative_to(run_dir)))
    return sorted(left)


# ----------------------------------------------------------------------------- trials


@dataclass
class Trial:
    """One kill and what followed."""

    kind: str  # "instant" or "publication"
    at: str  # "3.41 s" or "kill@57"
    last_write: str = ""  # the last write the killed process began ("" if none)
    during_publication: bool = False
    killed: bool = True  # False: the run ended before the instant came
    how: str = ""  # resumed / restarted / already finished
    problems: list[str] = field(default_factory=list)


@dataclass
class Reference:
    run_dir: Path
    command: list[str]
    wall: float
    paths: list[str]  # what it wrote, in order
    windows: list[tuple[int, int]]


def build_reference(stage: Stage, folder: Path, parents: dict[str, Path]) -> Reference:
    run_dir = folder / stage.name / "reference"
    command = [stage.verb, *stage.args, *COMMON]
    if stage.parent:
        command += ["--from", str(parents[stage.parent])]
    command += ["--out", str(run_dir)]
    shutil.rmtree(folder / stage.name, ignore_errors=True)
    trace = folder / stage.name / "reference.trace"
    trace.parent.mkdir(parents=True)
    start = time.perf_counter()
    result = minigpt(command, trace=trace)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"reference {stage.name} failed: {result.stderr[-3000:]}")
    paths = read_trace(trace)
    return Reference(
        run_dir, command[: command.index("--out")], wall, paths, publication_windows(paths)
    )


def run_trial(stage: Stage, ref: Reference, trial: Trial, folder: Path) -> Trial:
    run_dir = folder / stage.name / "trial"
    shutil.rmtree(run_dir, ignore_errors=True)
    trace = folder / stage.name / "trial.trace"
    command = [*ref.command, "--out", str(run_dir)]
    env = {**os.environ, "CRASH_TRACE": str(trace)}
    if trial.kind == "publication":
        env["MINIGPT_FAULT"] = trial.at
        process = subprocess.run(
            [sys.executable, "-c", TRACER, *command], env=env, capture_output=True, timeout=600
        )
        trial.killed = process.returncode == -signal.SIGKILL
    else:
        seconds = float(trial.at.split()[0])
        child = subprocess.Popen(
            [sys.executable, "-c", TRACER, *command],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            child.wait(timeout=seconds)
            trial.killed = False
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGKILL)
            child.wait()
    written = read_trace(trace)
    trial.last_write = written[-1].replace(str(run_dir), "<run>") if written else ""
    last = len(written)
    trial.during_publication = trial.killed and any(a <= last <= b for a, b in ref.windows)
    if trial.kind == "publication":  # the writes are deterministic: it died where planned
        planned = ref.paths[int(trial.at.split("@")[1]) - 1].replace(str(ref.run_dir), "<run>")
        if trial.last_write != planned:
            trial.problems.append(f"killed at {trial.last_write}, not at {planned} as planned")
    try:
        trial.how, _ = resume_or_restart(stage, run_dir, command)
    except RuntimeError as error:
        trial.how = "failed"
        trial.problems.append(str(error))
    trial.problems += compare_runs(ref.run_dir, run_dir)
    trial.problems += [f"left behind: {name}" for name in leftover_temporaries(run_dir)]
    if trial.problems:
        kept = folder / stage.name / f"failed-{trial.at.replace(' ', '')}"
        shutil.rmtree(kept, ignore_errors=True)
        run_dir.rename(kept)
        trial.problems.append(f"kept in {kept}")
    else:
        shutil.rmtree(run_dir)
    return trial


def plan_trials(ref: Reference, trials: int, share: float, rng: random.Random) -> list[Trial]:
    """`trials` kills: `share` of them at publication writes, the rest at uniform instants."""
    writes = [n for start, end in ref.windows for n in range(start, end + 1)]
    publication = round(trials * share) if writes else 0
    kinds = ["publication"] * publication + ["instant"] * (trials - publication)
    rng.shuffle(kinds)
    planned = []
    for kind in kinds:
        if kind == "publication":
            planned.append(Trial(kind, f"kill@{rng.choice(writes)}"))
        else:
            planned.append(Trial(kind, f"{rng.uniform(0, ref.wall):.2f} s"))
    return planned


@dataclass
class Load:
    """A busy loop on every core, as another program keeping the machine busy."""

    processes: list[subprocess.Popen] = field(default_factory=list)

    def start(self) -> None:
        for _ in range(os.cpu_count() or 1):
            self.processes.append(subprocess.Popen([sys.executable, "-c", "while True: pass"]))

    def stop(self) -> None:
        for process in self.processes:
            process.kill()
            process.wait()


def needed(names: list[str]) -> Iterator[str]:
    """`names` and the stages their parents come from, parents first."""
    done: list[str] = []

    def visit(name: str) -> None:
        parent = STAGES[name].parent
        if parent:
            visit(parent)
        if name not in done:
            done.append(name)

    for name in names:
        visit(name)
    yield from done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20, help="kills per stage")
    parser.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--publication-share",
        type=float,
        default=0.25,
        help="share of the kills made at a write of a checkpoint save (MINIGPT_FAULT=kill@N)",
    )
    parser.add_argument(
        "--load",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep every core busy with another process during the runs (default on)",
    )
    parser.add_argument(
        "--kill-at",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="instead of drawing the kills: one trial per N, killed with MINIGPT_FAULT=kill@N",
    )
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    folder = args.workdir or Path(tempfile.mkdtemp(prefix="minigpt-crash-"))
    folder.mkdir(parents=True, exist_ok=True)
    # One speed cache for every run here, filled before the first traced run by a short run of
    # the same shape and thread count, so that no traced run writes it (its writes would shift
    # the write indices between the reference and a trial).
    os.environ["MINIGPT_CACHE_DIR"] = str(folder / "cache")
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    warm = STAGES["pretrain"]
    result = minigpt(
        [
            warm.verb,
            *warm.args,
            *COMMON,
            "--max-steps",
            "1",
            "--out",
            str(folder / "warm"),
            "--overwrite",
        ]
    )
    if result.returncode != 0:
        raise SystemExit(f"could not run minigpt: {result.stderr[-3000:]}")
    print(f"work dir {folder}; {args.trials} kills a stage, seed {args.seed}, load {args.load}")
    load = Load()
    if args.load:
        load.start()
    rows, parents, failures = [], {}, 0
    started = time.perf_counter()
    try:
        for name in needed(args.stages):
            stage = STAGES[name]
            ref = build_reference(stage, folder, parents)
            parents[name] = ref.run_dir
            if name not in args.stages:
                continue
            print(
                f"\n## {name}: `minigpt {' '.join(ref.command)} --out RUN` "
                f"(reference {ref.wall:.1f} s, {len(ref.windows)} checkpoint saves)"
            )
            rng = random.Random(f"{args.seed}-{name}")
            trials = []
            planned = (
                [Trial("publication", f"kill@{n}") for n in args.kill_at]
                if args.kill_at
                else plan_trials(ref, args.trials, args.publication_share, rng)
            )
            for trial in planned:
                run_trial(stage, ref, trial, folder)
                trials.append(trial)
                verdict = (
                    "equal" if not trial.problems else "DIFFERENT: " + "; ".join(trial.problems)
                )
                where = "during publication" if trial.during_publication else ""
                if not trial.killed:
                    where = "ran to the end first"
                print(
                    f"  {trial.at:>10} {trial.how:<16} last write {trial.last_write or '-'} "
                    f"{where} -> {verdict}",
                    flush=True,
                )
            failures += sum(bool(t.problems) for t in trials)
            rows.append((name, trials))
    finally:
        load.stop()
    minutes = (time.perf_counter() - started) / 60
    command = " ".join(["python", "benchmarks/crash_consistency.py", *sys.argv[1:]])
    print(f"\n{minutes:.1f} minutes; `{command}`")
    print(
        "\n| stage | trials | killed before first checkpoint | killed during publication "
        "| ran to the end first | bitwise equal |"
    )
    print("|---|---|---|---|---|---|")
    for name, trials in rows:
        print(
            f"| {name} | {len(trials)} | {sum(t.how == 'restarted' for t in trials)} | "
            f"{sum(t.during_publication for t in trials)} | "
            f"{sum(not t.killed for t in trials)} | "
            f"{sum(not t.problems for t in trials)} / {len(trials)} |"
        )
    if failures:
        raise SystemExit(f"{failures} trial(s) not bitwise equal (kept in {folder})")


if __name__ == "__main__":
    main()
