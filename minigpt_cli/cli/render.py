"""Turns engine events into what a person sees: a live rich display on a terminal, plain lines
otherwise (logs, pipes, CI). Imported inside verbs only, since it pulls in rich."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from minigpt_cli.engine.core.events import Event
from minigpt_cli.engine.core.units import format_duration


def format_rate(tokens_per_sec: float) -> str:
    return (
        f"{tokens_per_sec / 1000:.1f}k tok/s"
        if tokens_per_sec >= 1000
        else f"{tokens_per_sec:.0f} tok/s"
    )


def step_line(data: dict[str, Any]) -> str:
    """The one-line summary of a training step shared by both display modes."""
    parts = [f"loss {data['loss']:.4f}"] if "loss" in data else []
    if "lr" in data:
        parts.append(f"lr {data['lr']:.2e}")
    if "tokens_per_sec" in data:
        parts.append(format_rate(data["tokens_per_sec"]))
    if data.get("mfu") is not None:
        parts.append(f"MFU {100 * data['mfu']:.1f}%")
    if "rss_mb" in data:
        parts.append(f"mem {data['rss_mb']:.0f}/{data.get('rss_cap_mb', 0):.0f} MB")
    if "cpu_pct" in data:
        parts.append(f"cpu {data['cpu_pct']:.0f}/{data.get('cpu_cap_pct', 100):.0f}%")
    if "eta_sec" in data:
        parts.append(f"ETA {format_duration(data['eta_sec'])}")
    return " | ".join(parts)


def eval_line(data: dict[str, Any]) -> str:
    skip = {"stage", "kind", "step", "tokens", "time"}
    values = []
    for key, value in data.items():
        if key in skip:
            continue
        values.append(f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}")
    return ", ".join(values)


class EventRenderer:
    """Callable event sink; use as a context manager so the live display is closed cleanly."""

    def __init__(self, mode: str = "auto", console: Console | None = None) -> None:
        self.console = console or Console(highlight=False)
        live = sys.stdout.isatty() if mode == "auto" else mode == "rich"
        self.quiet = mode == "none"
        self.live = live and not self.quiet
        self.progress: Progress | None = None
        self.tasks: dict[str, TaskID] = {}
        self._last_progress: dict[str, float] = {}
        self._last_phase: dict[str, object] = {}

    def __enter__(self) -> EventRenderer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def print(self, text: str) -> None:
        if self.quiet:
            return
        if self.progress is not None:
            self.progress.console.print(text, markup=False, highlight=False)
        else:
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def _ensure_progress(self) -> Progress:
        if self.progress is None:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[info]}"),
                console=self.console,
                transient=False,
            )
            self.progress.start()
        return self.progress

    def __call__(self, event: Event) -> None:
        handler = getattr(self, f"_on_{event.kind}", None)
        if handler is not None:
            handler(event)

    # ------------------------------------------------------------------------ event handlers

    def _on_note(self, event: Event) -> None:
        self.print(f"{event.stage}: {event.data['message']}")

    def _on_progress(self, event: Event) -> None:
        data = event.data
        key = f"{event.stage}:{data['task']}"
        if self.live:
            progress = self._ensure_progress()
            if key not in self.tasks:
                self.tasks[key] = progress.add_task(data["task"], total=data.get("total"), info="")
            info = data.get("message", "")
            progress.update(
                self.tasks[key], completed=data.get("done", 0), total=data.get("total"), info=info
            )
            return
        # Plain mode prints quarters of known totals, and a heartbeat only when its phase changes.
        total, done = data.get("total"), data.get("done", 0)
        if not total:
            phase = data.get("phase", data.get("message", ""))
            if self._last_phase.get(key) != phase:
                self._last_phase[key] = phase
                self.print(f"{event.stage}: {data['task']}: {data.get('message', phase)}")
            return
        fraction = done / total
        last = self._last_progress.get(key, -1.0)
        if fraction >= 1.0 or fraction - last >= 0.25:
            self._last_progress[key] = fraction
            self.print(f"{event.stage}: {data['task']} {100 * fraction:.0f}%")

    def _on_stage_start(self, event: Event) -> None:
        data = event.data
        verb = "resuming" if data.get("resumed") else "training"
        self.print(
            f"{event.stage}: {verb} to step {data['total_steps']} "
            f"({data['tokens_per_step']:,} tokens/step, micro-batch {data['micro_batch_size']} "
            f"x {data['accumulation']} accumulation{_shared_by(data)}) -> {data['run_dir']}"
        )
        self.print(f"{event.stage}: precision {data['precision']}")
        if self.live:
            self._start_row(event)

    def _start_row(self, event: Event) -> None:
        """The live row a training stage's steps advance."""
        data = event.data
        progress = self._ensure_progress()
        self.tasks[f"{event.stage}:train"] = progress.add_task(
            event.stage, total=data["total_steps"], completed=data["step"], info=""
        )

    def _on_step(self, event: Event) -> None:
        data = event.data
        line = step_line(data)
        if self.live and f"{event.stage}:train" in self.tasks:
            assert self.progress is not None
            # A --max-time run's planned last step moves as its pace is measured.
            self.progress.update(
                self.tasks[f"{event.stage}:train"],
                total=data["total_steps"],
                completed=data["step"],
                info=line,
            )
        else:
            self.print(f"{event.stage} step {data['step']}/{data['total_steps']} | {line}")

    def _on_eval(self, event: Event) -> None:
        self.print(f"{event.stage} eval @ step {event.data['step']}: {eval_line(event.data)}")

    def _on_checkpoint(self, event: Event) -> None:
        if not self.live:
            self.print(f"{event.stage}: checkpoint saved at step {event.data['step']}")

    def _on_governor(self, event: Event) -> None:
        self.print(f"{event.stage}: governor: {event.data['message']}")

    def _on_tokenizer(self, event: Event) -> None:
        report = event.data["report"]
        ratios = ", ".join(f"{lang} {value:.2f}" for lang, value in report.chars_per_token.items())
        self.print(
            f"{event.stage}: tokenizer trained: {report.vocab_size} pieces in "
            f"{report.seconds:.1f}s; characters per token: {ratios}"
        )

    def _on_stage_end(self, event: Event) -> None:
        self.close()
        data = event.data
        parts = [
            f"{event.stage}: done at step {data['step']} ({data['stop_reason']}) in "
            f"{format_duration(data['seconds'])}, {data['tokens']:,} tokens"
        ]
        if "val_loss" in data:
            parts.append(f"val_loss {data['val_loss']:.4f}")
        if "val_bpb" in data:
            parts.append(f"val_bpb {data['val_bpb']:.4f}")
        self.print(", ".join(parts))
        self.print(f"{event.stage}: run saved in {data['run_dir']}")


class PipelineRenderer(EventRenderer):
    """One dashboard for several stages (`quickstart`): a row per stage from the start, each
    filled in as its stage runs and finished with its summary, under one overall row whose clock
    is the whole pipeline's.

    Stage rows stay on screen (the base renderer closes its display at each stage's end), so a
    person sees at a glance what is done, what runs now and what is left.
    """

    OVERALL = "quickstart"

    def __init__(
        self, stages: list[str], mode: str = "auto", console: Console | None = None
    ) -> None:
        super().__init__(mode, console)
        self.stages = list(stages)
        self.done: dict[str, str] = {}

    def __enter__(self) -> PipelineRenderer:
        if self.live:
            progress = self._ensure_progress()
            self.tasks[self.OVERALL] = progress.add_task(
                self.OVERALL, total=len(self.stages), info=""
            )
            for stage in self.stages:
                self.tasks[f"{stage}:train"] = progress.add_task(
                    f"  {stage}", total=None, start=False, info="waiting"
                )
        return self

    def _advance_overall(self) -> None:
        if self.live and self.progress is not None and self.OVERALL in self.tasks:
            self.progress.update(self.tasks[self.OVERALL], completed=len(self.done))

    def stage_skipped(self, stage: str, reason: str) -> None:
        """A stage that needs no work this time (finished by an earlier run)."""
        self.done[stage] = reason
        if self.live and self.progress is not None:
            self.progress.update(self.tasks[f"{stage}:train"], total=1, completed=1, info=reason)
        self.print(f"{stage}: {reason}")
        self._advance_overall()

    def stage_running(self, stage: str, info: str) -> None:
        """Mark a stage started that emits no training `stage_start` event (e.g. eval)."""
        self.print(f"{stage}: {info}")
        if self.live and self.progress is not None:
            task = self.tasks[f"{stage}:train"]
            self.progress.start_task(task)
            self.progress.update(task, info=info)

    def _on_progress(self, event: Event) -> None:
        # Sub-steps (tokenizer, encoding, reference log-probs, eval parts) get an indented row
        # under the stage rows while they run and leave when done, so the dashboard stays the
        # list of stages rather than a growing log.
        if not self.live:
            super()._on_progress(event)
            return
        data = event.data
        key = f"{event.stage}:{data['task']}"
        progress = self._ensure_progress()
        if key not in self.tasks:
            self.tasks[key] = progress.add_task(
                f"    {event.stage} · {data['task']}", total=data.get("total"), info=""
            )
        total, done = data.get("total"), data.get("done", 0)
        progress.update(self.tasks[key], completed=done, total=total, info=data.get("message", ""))
        if total and done >= total:
            progress.remove_task(self.tasks.pop(key))

    def _drop_sub_rows(self) -> None:
        """Remove what is left of earlier sub-steps (one without a total never completes)."""
        if self.progress is None:
            return
        keep = {self.OVERALL, *(f"{stage}:train" for stage in self.stages)}
        for key in [key for key in self.tasks if key not in keep]:
            self.progress.remove_task(self.tasks.pop(key))

    def stage_finished(self, stage: str, summary: str) -> None:
        """Mark a stage done without a training `stage_end` event (e.g. eval)."""
        self.done[stage] = summary
        if self.live and self.progress is not None:
            self._drop_sub_rows()
            task = self.tasks[f"{stage}:train"]
            self.progress.update(task, total=1, completed=1, info=summary)
        self._advance_overall()

    def _start_row(self, event: Event) -> None:
        key = f"{event.stage}:train"
        if key not in self.tasks:  # a stage without a row of its own
            super()._start_row(event)
            return
        assert self.progress is not None
        self._drop_sub_rows()
        data = event.data
        self.progress.start_task(self.tasks[key])
        self.progress.update(
            self.tasks[key], total=data["total_steps"], completed=data["step"], info=""
        )

    def _on_stage_end(self, event: Event) -> None:
        if not self.live or f"{event.stage}:train" not in self.tasks:
            super()._on_stage_end(event)
            if event.stage in self.stages:
                self.done[event.stage] = "done"
                self._advance_overall()
            return
        data = event.data
        parts = [f"done in {format_duration(data['seconds'])}"]
        for key in ("val_loss", "pref_accuracy", "reward_mean"):
            if isinstance(data.get(key), float):
                parts.append(f"{key} {data[key]:.3f}")
        summary = ", ".join(parts)
        self.print(f"{event.stage}: {summary} -> {data['run_dir']}")
        self.stage_finished(event.stage, summary)


def _shared_by(data: dict[str, Any]) -> str:
    """Under torchrun: how the step's micro-batches are shared (nothing for one process)."""
    world = int(data.get("world_size") or 1)
    return f", shared by {world} processes" if world > 1 else ""
