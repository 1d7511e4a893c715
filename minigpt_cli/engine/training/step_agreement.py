"""What the ranks of a job decide together at the end of every step: whether to stop there (a
Ctrl-C on any rank, the deadline on rank 0's clock) and, under --max-time, the schedule.

Every rank must stop after the same step, or the ones that go on wait in a collective for the
ones that left. A Ctrl-C reaches the ranks at different moments (the terminal's, then torchrun's
copy a moment later), so under several processes it only raises a flag; at the end of each step
one all-reduce tells every rank whether any rank's flag is up, and all of them stop after that
step and save one checkpoint holding every rank's random state (an exact resume, like any save).
The same all-reduce carries rank 0's elapsed time: a time limit is read off one clock, and the
deadline schedule is planned by rank 0 alone and handed to the others, so every rank trains with
the same learning rate. One process needs none of this: `StepAgreement.active` is False and every
method returns what it was given.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

import torch.distributed as dist

from minigpt_cli.engine.training import distributed
from minigpt_cli.engine.training.pace import Schedule


class StepAgreement:
    """The stop decision and the deadline schedule, shared by every rank of the job."""

    def __init__(self, ranks: distributed.Ranks) -> None:
        self.ranks = ranks
        self.active = ranks.world_size > 1
        self.interrupt_requested = False  # this rank saw a Ctrl-C since the loop began

    @contextlib.contextmanager
    def interrupts_deferred(self) -> Iterator[None]:
        """While the steps run under several processes, a Ctrl-C raises the flag instead of
        KeyboardInterrupt (the step finishes; the ranks stop together at its end)."""
        if not self.active or threading.current_thread() is not threading.main_thread():
            yield
            return

        def flag(signum: int, frame: FrameType | None) -> None:
            self.interrupt_requested = True

        previous = signal.signal(signal.SIGINT, flag)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def step_end(self, elapsed: float) -> tuple[float, bool]:
        """(rank 0's elapsed seconds, whether any rank was interrupted), the same on every rank:
        one all-reduce of two numbers. One process: its own clock and its own flag."""
        if not self.active:
            return elapsed, self.interrupt_requested
        own = [elapsed if self.ranks.is_writer else 0.0, float(self.interrupt_requested)]
        rank0_elapsed, interrupted = distributed.sum_floats(own)
        return rank0_elapsed, interrupted > 0

    def share_schedule(self, schedule: Schedule) -> None:
        """Hand rank 0's deadline plan (and the pace it was made from) to every rank."""
        if not self.active:
            return
        state: list[Any] = [schedule.state() if self.ranks.is_writer else None]
        dist.broadcast_object_list(state, src=0)
        if not self.ranks.is_writer and state[0] is not None:
            schedule.load_state(state[0])
