"""What a training verb hands the Trainer besides its config (`RunSpec`), and how a Ctrl-C
comes back (`TrainingInterrupted`): the names the stages and the CLI use without the loop."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class TrainingInterrupted(Exception):
    """Ctrl-C during training: a checkpoint was saved at `step`; the CLI prints how to resume."""

    def __init__(self, run_dir: Path, step: int) -> None:
        super().__init__(f"interrupted at step {step}")
        self.run_dir = run_dir
        self.step = step


@dataclass
class RunSpec:
    """Everything about a run that is not in the config: where, from what, resumed or not."""

    run_dir: Path
    resume: bool = False
    parent: str | None = None
    chat: bool = False
    sources: dict[str, Any] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)  # logged as event rows at start
