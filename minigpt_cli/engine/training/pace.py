"""Where a run's wall time goes, measured as it trains: for a --max-time schedule and the ETA.

A run limited by `--max-time` cannot know its number of steps in advance, so the Trainer asks
`Pace` how many more steps fit before the deadline (step time, evaluations and saves included) and
re-plans the cosine schedule (`SchedulePlan`) after every step, so the last step before the
deadline runs at (or within a hair of) `min_lr` instead of stopping part-way down a cosine planned
for `max_steps`. Both are saved in `trainer_state.json` (`schedule`), so a resumed run continues
the same plan from the same measurements; the same estimate gives the logged ETA.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Any

WINDOW = 16
"""Iterations whose median time is the step time: recent enough to follow a machine whose speed
changes (another program starts), median so one slow iteration (a pause, garbage collection,
compilation on a resumed run's first step) does not move the plan."""


@dataclass(frozen=True)
class SchedulePlan:
    """The cosine's progress (0 at the end of warmup, 1 at `min_lr`) runs linearly from
    `progress` at step `start` to 1 at step `horizon`.

    Re-planning starts a new line from where the old one is at that step, so the learning rate
    never jumps (and never rises again) when the horizon moves; a run planned once from its start
    (`progress` 0) is exactly the plain cosine of `optim.learning_rate`.
    """

    start: int
    progress: float
    horizon: int

    def progress_at(self, step: int) -> float:
        """Progress of the cosine at `step` (clamped to 0 before `start` and to 1 after)."""
        span = max(self.horizon - self.start, 1)
        done = max(step - self.start, 0)
        return min(self.progress + done * (1.0 - self.progress) / span, 1.0)

    def replanned(self, step: int, horizon: int) -> SchedulePlan:
        """The plan that continues this one's progress at `step` and reaches 1 at `horizon`."""
        start = max(step, self.start)  # still in warmup: the line starts where warmup ends
        return SchedulePlan(start, self.progress_at(start), horizon)

    def to_dict(self) -> dict[str, Any]:
        return {"start": self.start, "progress": self.progress, "horizon": self.horizon}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SchedulePlan:
        return cls(int(data["start"]), float(data["progress"]), int(data["horizon"]))


def planned_learning_rate(
    step: int, plan: SchedulePlan, warmup_steps: int, peak: float, floor: float
) -> float:
    """`optim.learning_rate`'s warmup and cosine, the cosine's progress taken from `plan`."""
    floor = min(floor, peak)
    if warmup_steps and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    return floor + 0.5 * (1.0 + math.cos(math.pi * plan.progress_at(step))) * (peak - floor)


class Pace:
    """Measured seconds of an iteration (one optimizer step, or an RL iteration's steps), of an
    evaluation and of a checkpoint save; predicts the wall time of the steps still to run.

    The run's first iteration is left out (lazy initialisation, kernel selection, compilation):
    it is the same iteration in a resumed run, so what is measured does not depend on where a run
    was resumed. An evaluation or save not yet seen counts as free until one is measured.
    """

    def __init__(self, unit: int) -> None:
        self.unit = unit
        self.iterations: deque[float] = deque(maxlen=WINDOW)
        self.eval_seconds = 0.0
        self.save_seconds = 0.0
        self._partial = 0.0  # seconds of the iteration under way (RL: its steps so far)

    def add_step(self, step: int, seconds: float) -> None:
        """Record the wall seconds of optimizer step `step` (1-based), all its per-step work in."""
        self._partial += seconds
        if step % self.unit:
            return
        if step > self.unit:  # not the first iteration
            self.iterations.append(self._partial)
        self._partial = 0.0

    def step_seconds(self) -> float | None:
        """The median iteration's seconds per optimizer step; None before any was measured."""
        if not self.iterations:
            return None
        return statistics.median(self.iterations) / self.unit

    def seconds_for(self, step: int, steps: int, eval_every: int, save_every: int) -> float | None:
        """Wall seconds from now (after step `step`, its evaluation and save still to come) to the
        end of step `step + steps`; None before any step was measured.

        `eval_every` and `save_every` are in optimizer steps. The evaluation and save after the
        last of those steps are not counted: a time limit ends the steps, and they follow.
        """
        per_step = self.step_seconds()
        if per_step is None:
            return None
        evals = _multiples(step, step + steps - 1, eval_every) if steps > 0 else 0
        saves = _multiples(step, step + steps - 1, save_every) if steps > 0 else 0
        return steps * per_step + evals * self.eval_seconds + saves * self.save_seconds

    def steps_within(
        self, step: int, seconds: float, eval_every: int, save_every: int, limit: int
    ) -> int | None:
        """How many steps after `step` it takes for the wall time to reach `seconds` from now:
        the step whose end first reaches the deadline, which is where a time limit stops the run
        (at most `limit`); None before any step was measured."""
        per_step = self.step_seconds()
        if per_step is None or per_step <= 0:
            return None
        low, high = 1, max(1, min(limit, math.ceil(seconds / per_step) + 1))
        if self._cost(step, high, eval_every, save_every) < seconds:
            return high  # only when `limit` binds
        while low < high:  # the smallest n whose cost reaches `seconds` (the cost grows with n)
            middle = (low + high) // 2
            if self._cost(step, middle, eval_every, save_every) >= seconds:
                high = middle
            else:
                low = middle + 1
        return low

    def _cost(self, step: int, steps: int, eval_every: int, save_every: int) -> float:
        cost = self.seconds_for(step, steps, eval_every, save_every)
        assert cost is not None
        return cost

    def to_dict(self) -> dict[str, Any]:
        return {
            "iterations": list(self.iterations),
            "eval_seconds": self.eval_seconds,
            "save_seconds": self.save_seconds,
            "partial": self._partial,
        }

    def load(self, data: dict[str, Any]) -> None:
        """Restore what `to_dict` saved (a checkpoint from before this existed: nothing)."""
        self.iterations = deque((float(x) for x in data.get("iterations", [])), maxlen=WINDOW)
        self.eval_seconds = float(data.get("eval_seconds", 0.0))
        self.save_seconds = float(data.get("save_seconds", 0.0))
        self._partial = float(data.get("partial", 0.0))


def _multiples(first: int, last: int, every: int) -> int:
    """How many of first, first + 1, ..., last are multiples of `every`."""
    if last < first:
        return 0
    return last // every - (first - 1) // every
