"""What every training verb does around its engine call, written once.

pretrain, sft, dpo and rlhf differ in their inputs and their engine function; the rest is the same
promise to the user: the config they asked for (or the run's own on --resume), a refusal to write
over a run without --resume/--overwrite, one run per directory (a lock), a refusal before any work
when the disk has no room for what the run will write, the CPU caps applied before any work, one
progress display, a Ctrl-C that saves and prints the resume command, and "already finished" when
there is nothing left to do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from minigpt_cli.cli import common
from minigpt_cli.errors import RunFailed, UserError, advice_for, cause_of

if TYPE_CHECKING:
    from minigpt_cli.cli.render import EventRenderer
    from minigpt_cli.config.schema import Config
    from minigpt_cli.engine.core.events import EventCallback
    from minigpt_cli.engine.training.run_spec import RunSpec


@dataclass(frozen=True)
class ResumePoint:
    """What a `--resume` continues: the run's own newest complete checkpoint, or, for a run that
    stopped before its own first save, the checkpoint of the sub-run it trains first (RLHF's
    reward model in `reward/`), which records the sources of the run it belongs to.

    `config_dir` holds the config.toml the resumed run uses (the sub-run's is the whole config
    of its run: both are dumped from the one Config); `own` is False when only the sub-run has
    something to continue, so the run's own training starts at step 0.
    """

    path: Path
    config_dir: Path
    sources: dict[str, Any]
    threads: int | None
    parent: str | None
    own: bool


@dataclass
class TrainingRun:
    """A training verb's resolved request: where, with which config, continuing what."""

    stage: str
    run_dir: Path
    config: Config
    resume: bool
    overwrite: bool
    saved_sources: dict[str, Any] = field(default_factory=dict)
    threads: int | None = None
    thread_source: str = "set explicitly"
    resume_point: ResumePoint | None = None

    @property
    def resumes_own_checkpoint(self) -> bool:
        """Whether the stage's own Trainer restores a checkpoint (RunSpec.resume)."""
        return self.resume_point is not None and self.resume_point.own


@dataclass(frozen=True)
class SharedDisplay:
    """A display that outlives one verb: `quickstart` runs every stage inside one dashboard.

    `continue_command` is what a Ctrl-C tells the user to run to go on (the pipeline, not the
    stage's own verb).
    """

    renderer: EventRenderer
    continue_command: str


_SHARED_DISPLAY: ContextVar[SharedDisplay | None] = ContextVar("shared_display", default=None)


@contextlib.contextmanager
def shared_display(renderer: EventRenderer, continue_command: str) -> Iterator[None]:
    """Run training verbs called inside this block through `renderer` instead of their own."""
    token = _SHARED_DISPLAY.set(SharedDisplay(renderer, continue_command))
    try:
        yield
    finally:
        _SHARED_DISPLAY.reset(token)


def nothing_to_resume(run_dir: Path) -> UserError:
    """The one answer to `--resume` of a run killed before it saved anything to continue."""
    return UserError(
        f"{run_dir}: nothing to resume (no complete checkpoint there: the run stopped "
        "before its first save); start it again with the same command and --overwrite "
        "instead of --resume"
    )


def find_resume(run_dir: Path, stage: str, sub_run: str | None = None) -> ResumePoint | None:
    """What `--resume` of the `stage` run in `run_dir` continues (see `ResumePoint`), or None.

    `sub_run` names the folder of a first phase that checkpoints on its own (rlhf: `reward`);
    its trainer state keeps the sources of the run it belongs to under the run's stage name.
    """
    from minigpt_cli.engine.runs import checkpoint as ckpt

    point = ckpt.find_resume_point(run_dir) if run_dir.is_dir() else None
    own = point is not None
    folder = run_dir if own else run_dir / sub_run if sub_run else None
    if not own and folder is not None and folder.is_dir():
        point = ckpt.find_resume_point(folder)
    if folder is None or point is None:
        return None
    state = ckpt.read_state(point)
    sources = state.get("sources", {})
    if not own:
        sources = sources.get(stage)
        if not isinstance(sources, dict):  # a sub-run from before it recorded them
            return None
    return ResumePoint(point, folder, sources, state.get("threads"), state.get("parent"), own)


def prepare(
    stage: str,
    *,
    run_dir: Path,
    preset: str | None,
    config_file: Path | None,
    overrides: dict[str, Any],
    sets: list[str] | None,
    resume: bool,
    overwrite: bool,
    sub_run: str | None = None,
) -> TrainingRun:
    """Resolve the config and, on --resume, what the run recorded about its inputs and threads.

    `sub_run`: see `find_resume` (a resume may continue only that first phase).
    """
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other: choose one")
    point = find_resume(run_dir, stage, sub_run) if resume else None
    if resume and point is None:
        raise nothing_to_resume(run_dir)
    config = common.resolve_config(
        stage,
        preset=preset,
        config_file=config_file,
        overrides=overrides,
        sets=sets,
        run_dir=point.config_dir if point is not None else run_dir,
        resume=resume,
    )
    run = TrainingRun(stage, run_dir, config, resume, overwrite, threads=config.resources.threads)
    if point is not None:
        run.resume_point = point
        run.saved_sources = point.sources
        # The same thread count gives the same float reductions: resume stays bit-exact.
        if run.threads is None and point.threads:
            run.threads = point.threads
            run.thread_source = "as when the run started, for exact resume"
    return run


def execute(
    run: TrainingRun,
    spec: RunSpec,
    engine: Callable[[Config, RunSpec, EventCallback], dict[str, Any]],
) -> dict[str, Any]:
    """Lock the run directory, apply the caps, run `engine(config, spec, on_event)` with progress.

    Exit 130 after a Ctrl-C (a checkpoint was saved); says so when a resumed run had nothing left.
    """
    from minigpt_cli.cli.render import EventRenderer
    from minigpt_cli.engine.hardware.device import resolve_device
    from minigpt_cli.engine.resources.governor import apply_resources
    from minigpt_cli.engine.runs import checkpoint as ckpt
    from minigpt_cli.engine.runs.space import free_bytes, plan_run_disk
    from minigpt_cli.engine.training import distributed
    from minigpt_cli.engine.training.run_spec import TrainingInterrupted

    # Under torchrun every rank runs this verb: what cannot run split is refused on every rank
    # alike (rank 0 says so, app.main keeps the others quiet) before any rank waits for another.
    launch = distributed.from_environment()
    train = run.config.stage_train(run.stage)
    distributed.refuse_unsupported(run.stage, train.max_time, launch.world_size)
    distributed.check_split(
        train.global_batch_size, train.micro_batch_size, launch.world_size, run.stage
    )
    if run.stage == "rlhf":
        distributed.check_prompt_share(run.config.rlhf.rollout_batch_size, launch.world_size)
    shared = _SHARED_DISPLAY.get()
    continue_command = (
        shared.continue_command
        if shared is not None
        else f"minigpt {run.stage} --out {run.run_dir} --resume"
    )
    if shared is None and launch.world_size > 1:  # resumed bitwise by the same world size
        continue_command += (
            f" --nproc {launch.world_size}"
            if launch.local_world_size == launch.world_size
            else f" (under torchrun, {launch.world_size} processes as before)"
        )
    # Under quickstart the pipeline's command both continues and restarts a stage.
    restart_command = shared.continue_command if shared is not None else None
    device_type = resolve_device(train.device).type if launch.world_size > 1 else "cpu"
    with (
        distributed.process_group(device_type) as ranks,
        _machine_failures(run, continue_command, restart_command),
        _lost_contact(run, continue_command),
        contextlib.ExitStack() as held,
    ):

        def take_run_dir() -> str:
            """Rank 0's (the only writer's) claim on the run directory, before any rank trains."""
            folder = common.check_output(run.run_dir)  # a path under a file, no permission
            held.enter_context(ckpt.RunLock(run.run_dir))
            if ckpt.holds_run(run.run_dir) and not (run.resume or run.overwrite):
                raise UserError(
                    f"{run.run_dir} already holds a run: pass --resume to continue it or "
                    "--overwrite to start over (or --out to train elsewhere)"
                )
            if run.overwrite:
                ckpt.clear_run(run.run_dir)
            elif run.resume_point is not None and not run.resume_point.own:
                # Only the sub-run continues: what the run's own training wrote before the kill
                # (metrics rows, its config) is redone from step 0, so it goes.
                ckpt.clear_run(run.run_dir, keep=(run.resume_point.config_dir.name,))
            ckpt.remove_temporaries(run.run_dir)  # what a killed writer left half-made
            if run.resume:  # a publication a crash cut short, and the pruning after it
                ckpt.republish(run.run_dir, run.config.stage_train(run.stage).keep_last)
            # Room for every snapshot, shard and file the run will write, before it writes any
            # (and before a tokenizer is trained): a full disk is met here, not at a save an
            # hour in.
            disk = plan_run_disk(
                run.stage,
                run.config,
                run.run_dir,
                spec.sources,
                resume=run.resume,
                hard_links=folder.hard_links,
            )
            free = free_bytes(run.run_dir)
            if not disk.fits(free):
                raise UserError(disk.refusal(run.run_dir, free))
            return disk.line(free)

        disk_line = distributed.first_rank(take_run_dir, lambda: "")
        thread_note = apply_resources(run.config.resources, run.threads, run.thread_source)
        with contextlib.ExitStack() as stack:
            render: EventCallback
            if not ranks.is_writer:
                render = _silent  # rank 0 shows the whole job's progress
            else:
                renderer = (
                    shared.renderer
                    if shared is not None
                    else stack.enter_context(EventRenderer(run.config.log.progress))
                )
                each = f" in each of {ranks.world_size} processes" if ranks.world_size > 1 else ""
                renderer.print(f"{run.stage}: {thread_note}{each}")
                renderer.print(f"{run.stage}: {disk_line}")
                render = renderer
            try:
                summary = engine(run.config, spec, render)
            except TrainingInterrupted as stop:
                if not ranks.is_writer:
                    raise typer.Exit(130) from None
                renderer.close()
                typer.echo(
                    f"\ninterrupted: checkpoint saved at step {stop.step}. Resume with:\n"
                    f"  {continue_command}",
                    err=True,
                )
                raise typer.Exit(130) from None
    if not ranks.is_writer:
        return summary
    if summary.get("nothing_to_do"):
        typer.echo(
            f"{run.run_dir}: already finished at step {summary['step']} "
            f"(of {summary['total_steps']}); pass a larger --max-steps to extend it"
        )
    return summary


@contextlib.contextmanager
def _lost_contact(run: TrainingRun, continue_command: str) -> Iterator[None]:
    """Under torchrun: a collective that failed because another rank died or hung becomes
    RunFailed's one line (what was kept, how to continue) instead of a traceback."""
    from minigpt_cli.engine.training import distributed

    try:
        yield
    except Exception as error:
        lost = distributed.lost_contact(error) if distributed.world_size() > 1 else None
        if lost is None:
            raise
        raise RunFailed(lost_contact_line(run, lost, continue_command)) from error


def lost_contact_line(run: TrainingRun, what: str, continue_command: str) -> str:
    """One line for a job whose ranks lost each other (one died, or hung past the timeout)."""
    from minigpt_cli.engine.runs import checkpoint as ckpt

    try:
        point = ckpt.find_resume_point(run.run_dir) if run.run_dir.is_dir() else None
        step = ckpt.read_state(point)["step"] if point is not None else None
    except (OSError, UserError):
        step = None
    kept = (
        f"kept the checkpoint at step {step}; continue with: {continue_command}"
        if step is not None
        else "no checkpoint had been saved yet: start again with the same command and --overwrite"
    )
    return f"lost contact with another process of the job ({what}): one died or hung; {kept}"


def _silent(event: Any) -> None:
    """The progress display of a rank other than 0 under torchrun: none."""


@contextlib.contextmanager
def _machine_failures(
    run: TrainingRun, continue_command: str, restart_command: str | None
) -> Iterator[None]:
    """Turn an OSError from taking the lock to the last save into RunFailed's one line."""
    try:
        yield
    except OSError as error:
        raise RunFailed(failure_line(run, error, continue_command, restart_command)) from error


def failure_line(
    run: TrainingRun, error: OSError, continue_command: str, restart_command: str | None = None
) -> str:
    """One line for a run the machine stopped: what happened, what was kept, what to run next
    (`continue_command` from a checkpoint; `restart_command` when none was saved, by default the
    same command with --overwrite)."""
    from minigpt_cli.engine.runs import checkpoint as ckpt

    where = f"{error.filename}: " if error.filename is not None else ""
    happened = f"{where}{cause_of(error)} during {run.stage}"
    try:
        point = ckpt.find_resume_point(run.run_dir) if run.run_dir.is_dir() else None
        step = ckpt.read_state(point)["step"] if point is not None else None
    except (OSError, UserError):
        point, step = None, None
    if point is None or step is None:
        restart = (
            f"start again with: {restart_command}"
            if restart_command
            else "start again with the same command and --overwrite"
        )
        return (
            f"{happened}; nothing was kept (no checkpoint had been saved yet); "
            f"{advice_for(error)}, then {restart}"
        )
    return (
        f"{happened}; kept the checkpoint at step {step} ({point}); "
        f"{advice_for(error)}, then continue with: {continue_command}"
    )
