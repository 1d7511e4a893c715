"""Progress reporting without a terminal: the engine emits events, the CLI (or a test) renders them.

Keeping the engine free of printing is what lets `quickstart` draw every stage in one dashboard and
lets tests assert on exactly what a user would be shown.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Event:
    """One thing that happened: `kind` says what (step, eval, checkpoint, note, progress, ...)."""

    kind: str
    stage: str
    data: dict[str, Any] = field(default_factory=dict)


EventCallback = Callable[[Event], None]


def emit(on_event: EventCallback | None, kind: str, stage: str, /, **data: Any) -> None:
    """Send an event if anyone listens; engine code calls this instead of printing."""
    if on_event is not None:
        on_event(Event(kind, stage, data))
