"""When a run stops, and what its length tells the user: the Trainer's limit checks as plain
functions of the config and the counters, so the loop reads them in one line each."""

from __future__ import annotations

import math
from collections.abc import Callable

from minigpt_cli.config.schema import TrainConfig


def warmup_steps(warmup: int, total_steps: int) -> tuple[int, str | None]:
    """The warmup a run of `total_steps` takes: at most a tenth of it, with a note when cut."""
    limit = max(total_steps // 10, 0)
    if warmup <= limit:
        return warmup, None
    note = (
        f"warmup shortened from {warmup} to {limit} steps (a tenth of this {total_steps}-step run)"
    )
    return limit, note


def epochs_cut_short(
    train: TrainConfig, sequences_per_epoch: int, sequences_per_step: int, unit: int
) -> str | None:
    """A note when max_steps ends a run before the epochs it was asked for, else None."""
    if train.epochs is None or train.max_steps is None:
        return None
    wanted = math.ceil(train.epochs * sequences_per_epoch / (sequences_per_step * unit))
    if wanted <= train.max_steps:
        return None
    return (
        f"max_steps {train.max_steps} ends the run before {train.epochs:g} epochs (about "
        f"{wanted} steps): pass --max-steps {wanted} to train them all"
    )


def stop_reason(
    train: TrainConfig,
    *,
    step: int,
    total_steps: int,
    unit: int,
    tokens: int,
    epochs_done: Callable[[], float],
    elapsed: float,
    max_seconds: float | None,
) -> str:
    """Which limit the run has reached after `step` ("" for none). Limits other than the step
    count end a run only between iterations (an RL iteration is `unit` optimizer steps)."""
    if step >= total_steps:
        return "max_steps"
    if step % unit:
        return ""
    if train.max_tokens is not None and tokens >= train.max_tokens:
        return "max_tokens"
    if train.epochs is not None and epochs_done() >= train.epochs:
        return "epochs"
    if max_seconds is not None and elapsed >= max_seconds:
        return "max_time"
    return ""
