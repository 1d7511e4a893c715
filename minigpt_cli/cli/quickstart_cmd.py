"""`minigpt quickstart`: every stage on the built-in data, in one folder, under one dashboard.

tokenizer + pretrain -> SFT -> DPO -> reward model + GRPO -> eval, each stage the same code its own
verb runs (same config system, run directories, caps and exact resume), so the quickstart is a
faithful demonstration rather than a separate toy. Re-running it continues: a finished stage is
skipped, a stage with a checkpoint resumes, so a Ctrl-C (or a killed laptop) loses at most the
steps since the last checkpoint.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from minigpt_cli.cli import common

if TYPE_CHECKING:
    from rich.console import Console

    from minigpt_cli.cli.render import PipelineRenderer
    from minigpt_cli.engine.evaluate.report import EvalOptions, EvalReport

TRAINING_STAGES = ("pretrain", "sft", "dpo", "rlhf")
# The dashboard's rows: the reward model trains inside the rlhf stage but is a stage of its own
# to the person watching (its own run directory, its own progress).
DASHBOARD_ROWS = ("pretrain", "sft", "dpo", "reward", "rlhf", "eval")
EVAL_FILE = "eval.json"
TIMES_FILE = "quickstart.json"  # wall seconds of the stages this invocation ran

OutDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--out",
        help="Folder for the pipeline: one run directory per stage, and eval.json "
        "(default runs/quickstart-<preset>).",
    ),
]
BudgetOpt = Annotated[
    str | None,
    typer.Option(
        "--max-time",
        help="Wall time for the whole pipeline, tokenizer to eval (90s, 5m, 1h): each stage's "
        "loop gets its measured share of the time left and plans its schedule for it. Default: "
        "[quickstart] max_time, none (every stage's steps in full).",
    ),
]


def stage_dirs(out: Path) -> dict[str, Path]:
    """Where each stage's run directory lives inside the quickstart folder."""
    return {stage: out / stage for stage in TRAINING_STAGES}


def stage_status(run_dir: Path, stage: str | None = None, sub_run: str | None = None) -> str:
    """`finished`, `resume` (a checkpoint to continue from), or `start` (nothing usable yet).

    A run whose last publication a crash cut short is `resume`, never `finished`: its verb's
    --resume finishes the publication, which a skipped stage would leave torn for the next
    stage to load. With `stage` and `sub_run` (rlhf and its reward model's folder), a checkpoint
    of the sub-run alone is enough to resume (`training.find_resume`).
    """
    from minigpt_cli.cli import training
    from minigpt_cli.engine.runs import checkpoint as ckpt

    if not run_dir.is_dir():
        return "start"
    point = ckpt.find_resume_point(run_dir)
    if point is None:
        found = training.find_resume(run_dir, stage, sub_run) if stage and sub_run else None
        return "start" if found is None else "resume"
    if point != run_dir:
        return "resume"
    return "finished" if ckpt.read_state(point).get("finished") else "resume"


def quickstart(
    preset: common.PresetOpt = None,
    out: OutDirOpt = None,
    max_time: BudgetOpt = None,
    max_memory: common.MaxMemoryOpt = None,
    max_cpu: common.MaxCpuOpt = None,
    seed: common.SeedOpt = None,
    config_file: common.ConfigOpt = None,
    device: common.DeviceOpt = None,
    sets: common.SetOpt = None,
) -> None:
    """The whole pipeline on built-in data: tokenizer, pretrain, SFT, DPO, RLHF (GRPO), eval.

    One dashboard shows every stage; the eval table at the end shows what each stage added.
    Re-running the same command continues: finished stages are skipped, a stopped one resumes.
    Tune a stage with --set, e.g. --set sft.max_steps=200. With --max-time the pipeline ends
    within a time budget: each stage trains for its measured share of it.
    """
    from rich.console import Console

    from minigpt_cli.cli import dpo_cmd, pretrain_cmd, rlhf_cmd, sft_cmd, training
    from minigpt_cli.cli.render import PipelineRenderer
    from minigpt_cli.config.loader import load_config
    from minigpt_cli.engine.core.units import format_duration
    from minigpt_cli.engine.evaluate.report import EvalOptions
    from minigpt_cli.engine.resources.governor import release_memory
    from minigpt_cli.engine.runs import checkpoint as ckpt
    from minigpt_cli.engine.runs.files import REWARD_DIR
    from minigpt_cli.engine.training import budget, distributed

    # Its DPO and RLHF stages do not run split yet: refused before any stage rather than midway.
    distributed.refuse_unsupported("quickstart", None, distributed.from_environment().world_size)
    preset_name = preset or "tiny"
    folder = out or Path("runs") / f"quickstart-{preset_name}"
    dirs = stage_dirs(folder)
    # [eval] says how much to evaluate, [quickstart] how long it may all take: read now so a bad
    # --set fails before training.
    pipeline_config = load_config(preset_name, config_file, {}, sets or [])
    eval_section = pipeline_config.eval
    budget_seconds = _budget_seconds(max_time, pipeline_config.quickstart.max_time)
    eval_options = EvalOptions.from_config(
        eval_section,
        seed=seed or 0,
        device=device or "auto",
        # The reward model RLHF trained judges every stage's answers: what RLHF optimised.
        reward_model=dirs["rlhf"] / REWARD_DIR,
    )
    continue_command = f"minigpt quickstart --out {folder}" + (
        f" --preset {preset}" if preset else ""
    )
    shared = {
        "max_memory": max_memory,
        "max_cpu": max_cpu,
        "seed": seed,
        "device": device,
        "sets": sets,
    }
    verbs = {
        "pretrain": lambda **kw: pretrain_cmd.pretrain(preset=preset_name, **kw),
        "sft": lambda **kw: sft_cmd.sft(from_run=dirs["pretrain"], **kw),
        "dpo": lambda **kw: dpo_cmd.dpo(from_run=dirs["sft"], **kw),
        # The built-in prompts have exact answers: RLHF optimises the reward model's score and the
        # exact-answer rule together (GRPO, `default_algorithm`), which over three seeds kept every
        # family within 2 points of DPO, where PPO against the reward model alone lost up to 10.
        "rlhf": lambda **kw: rlhf_cmd.rlhf(from_run=dirs["dpo"], reward="both", **kw),
    }
    console = Console(highlight=False)
    within = f", within {format_duration(budget_seconds)}" if budget_seconds else ""
    console.print(
        f"quickstart ({preset_name}): {' -> '.join(DASHBOARD_ROWS)} on the built-in data, in "
        f"{folder}/{within}",
        markup=False,
    )
    started = _command_start()
    timings: dict[str, float] = {}
    phases = _phases_to_run(dirs)
    pipeline_budget = (
        budget.PipelineBudget(budget_seconds, started, phases) if budget_seconds else None
    )
    with (
        PipelineRenderer(list(DASHBOARD_ROWS), console=console) as dashboard,
        training.shared_display(dashboard, continue_command),
        budget.active(pipeline_budget),
    ):
        for stage in TRAINING_STAGES:
            status = stage_status(dirs[stage], stage, REWARD_DIR if stage == "rlhf" else None)
            if stage == "rlhf" and stage_status(dirs[stage] / REWARD_DIR) == "finished":
                dashboard.stage_skipped("reward", "finished earlier")
            if status == "finished":
                dashboard.stage_skipped(stage, "finished earlier")
                continue
            stage_start = time.perf_counter()
            if pipeline_budget is not None:
                pipeline_budget.begin_stage()
            verbs[stage](
                out=dirs[stage],
                resume=status == "resume",
                # A stage stopped before its first checkpoint left nothing to continue: redo it.
                overwrite=status == "start" and ckpt.holds_run(dirs[stage]),
                # --config seeds a new run; a resumed one continues with its saved config.toml.
                config_file=None if status == "resume" else config_file,
                **shared,
            )
            timings[stage] = time.perf_counter() - stage_start
            release_memory()
        eval_start = time.perf_counter()
        dashboard.stage_running("eval", f"evaluating {len(TRAINING_STAGES)} runs side by side")
        report = _evaluate(folder, dirs, eval_options, dashboard)
        timings["eval"] = time.perf_counter() - eval_start
        dashboard.stage_finished("eval", f"done in {format_duration(timings['eval'])}")
    total_seconds = time.perf_counter() - started
    cut = _cut_by_budget(dirs, phases) if pipeline_budget is not None else {}
    split = pipeline_budget.record() if pipeline_budget is not None else None
    _save_times(folder / TIMES_FILE, timings, total_seconds, split, cut)
    _print_summary(console, report, folder, dirs, timings, total_seconds)
    if cut:
        steps = ", ".join(
            f"{name} at step {step} of {total}" for name, (step, total) in cut.items()
        )
        console.print(
            f"the {format_duration(budget_seconds or 0)} budget ended {steps}; "
            "without --max-time (or with a longer one) every stage trains all its steps",
            markup=False,
        )


def _command_start() -> float:
    """When the user started this command, on `time.perf_counter`'s clock: the process's start when
    run as `minigpt` (the interpreter's start and the imports are waited for too), else now."""
    if not common.COMMAND_STARTED:
        return time.perf_counter()
    import psutil

    main_clock, main_wall = common.COMMAND_STARTED[0]
    launched = main_wall - psutil.Process().create_time()  # interpreter start, imports
    return main_clock - min(max(launched, 0.0), 10.0)


def _budget_seconds(flag: str | None, configured: str) -> float | None:
    """The pipeline's time budget in seconds: --max-time, else [quickstart] max_time; None for
    "none" (every stage's step limit in full)."""
    from minigpt_cli.config.schema import parse_budget
    from minigpt_cli.errors import UserError

    try:
        return parse_budget(flag if flag is not None else configured)
    except ValueError as error:
        raise UserError(f"--max-time: {error}") from None


def _phases_to_run(dirs: dict[str, Path]) -> list[str]:
    """The budget's phases this invocation runs (finished stages are skipped), eval last."""
    from minigpt_cli.engine.runs.files import REWARD_DIR

    phases = []
    for stage in TRAINING_STAGES:
        if stage_status(dirs[stage], stage, REWARD_DIR if stage == "rlhf" else None) == "finished":
            continue
        if stage == "rlhf" and stage_status(dirs[stage] / REWARD_DIR) != "finished":
            phases.append("reward")
        phases.append(stage)
    return [*phases, "eval"]


def _cut_by_budget(dirs: dict[str, Path], phases: list[str]) -> dict[str, tuple[int, int]]:
    """The runs of this invocation (`phases`) the time budget stopped before their step limit:
    name -> (step reached, step limit). The reward model is a run of its own inside rlhf/."""
    from minigpt_cli.engine.runs import checkpoint as ckpt
    from minigpt_cli.engine.runs.files import REWARD_DIR

    folders = {**dirs, "reward": dirs["rlhf"] / REWARD_DIR}
    cut = {}
    for name in phases:
        state = ckpt.read_state(folders[name]) if name in folders else {}
        if state.get("stop_reason") == "max_time":
            cut[name] = (int(state["step"]), int(state["total_steps"]))
    return cut


def _save_times(
    path: Path,
    timings: dict[str, float],
    total_seconds: float,
    split: dict[str, object] | None,
    cut: dict[str, tuple[int, int]],
) -> None:
    """Record how long each stage took, as measured around its verb (data preparation, tokenizer
    and evaluations included), so the figures a person reads later are the measured ones; with
    the time budget's split (`PipelineBudget.record`), and the runs it stopped early (step
    reached, step limit)."""
    from minigpt_cli.engine.core.io import atomic_write_text

    record = {
        "seconds": {stage: round(value, 1) for stage, value in timings.items()},
        "total_seconds": round(total_seconds, 1),
        "budget": split,
        "cut_by_budget": {name: list(steps) for name, steps in cut.items()},
    }
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")


def _evaluate(
    folder: Path, dirs: dict[str, Path], options: EvalOptions, dashboard: PipelineRenderer
) -> EvalReport:
    """Evaluate every stage's run side by side; the report is also kept as eval.json."""
    from minigpt_cli.engine.core.io import atomic_write_text
    from minigpt_cli.engine.evaluate.run import run_eval

    report = run_eval([dirs[stage] for stage in TRAINING_STAGES], options, dashboard)
    atomic_write_text(
        folder / EVAL_FILE, json.dumps(report.to_json(), indent=2, ensure_ascii=False) + "\n"
    )
    return report


def _print_summary(
    console: Console,
    report: EvalReport,
    folder: Path,
    dirs: dict[str, Path],
    timings: dict[str, float],
    total_seconds: float,
) -> None:
    from minigpt_cli.cli.eval_cmd import print_report
    from minigpt_cli.engine.core.units import format_duration
    from minigpt_cli.engine.evaluate.report import BEST_RUN_RULE, best_chat_run

    print_report(report, console)
    if timings:
        ran = ", ".join(f"{stage} {format_duration(sec)}" for stage, sec in timings.items())
        console.print(f"time: {format_duration(total_seconds)} in all ({ran})", markup=False)
    console.print(f"evaluation saved in {folder / EVAL_FILE}", markup=False)
    best = best_chat_run(report)
    if best is not None:
        console.print(
            f"chat with the best run ({BEST_RUN_RULE}):\n  minigpt chat {best.path}", markup=False
        )


def register(app: typer.Typer) -> None:
    """Add `minigpt quickstart`."""
    app.command("quickstart")(quickstart)
