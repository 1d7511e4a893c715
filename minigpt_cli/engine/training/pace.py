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

from minigpt_cli.engine.training import optim

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


class Schedule:
    """One training session's learning rate: the plain warmup and cosine to the step limit, or,
    with a deadline (`--max-time`), the cosine planned for the step the deadline falls on.

    It holds what the plan is made from (the `Pace`), the plan, and the warmup (shortened once
    against the deadline's first plan); `state()` is what a checkpoint keeps of it, and a resumed
    run built from that state continues the same plan from the same measurements.
    """

    def __init__(
        self,
        *,
        peak: float,
        floor: float,
        warmup: int,
        total_steps: int,
        unit: int,
        eval_every: int,
        save_every: int,
        deadline: bool,
        saved: dict[str, Any] | None = None,
    ) -> None:
        """`eval_every`/`save_every` in optimizer steps; `saved`: a resumed run's `state()`.

        Without a deadline the plan is the plain cosine to `total_steps`; with one it starts the
        same (the step limit is the horizon until a step has been measured) and `replan` moves
        the horizon to where the deadline falls. A saved state counts only with a deadline (a
        run resumed without --max-time goes back to the plain cosine).
        """
        self.peak, self.floor = peak, floor
        self.total_steps, self.unit = total_steps, unit
        self.eval_every, self.save_every = eval_every, save_every
        self.deadline = deadline
        self.pace = Pace(unit)
        self.plan = SchedulePlan(warmup, 0.0, total_steps)
        self.warmup = warmup
        self.warmup_planned = False  # the warmup is shortened against the deadline's horizon once
        if saved and deadline:
            self.load_state(saved)

    def load_state(self, saved: dict[str, Any]) -> None:
        """Continue from `state()`: a resumed run's, or rank 0's plan handed to the other ranks."""
        self.pace.load(saved.get("pace", {}))
        if "plan" in saved:
            self.plan = SchedulePlan.from_dict(saved["plan"])
        self.warmup = int(saved.get("warmup", self.warmup))
        self.warmup_planned = bool(saved.get("warmup_planned", False))

    def learning_rate(self, step: int) -> float:
        if not self.deadline:
            return optim.learning_rate(step, self.total_steps, self.warmup, self.peak, self.floor)
        return planned_learning_rate(step, self.plan, self.warmup, self.peak, self.floor)

    def replan(self, step: int, remaining: float) -> str | None:
        """Move the horizon to the step where `remaining` seconds run out, measured; returns a
        note when the warmup had to be shortened.

        The step limit (max_steps, max_tokens, epochs) still caps it; a time limit stops a run
        only between iterations, so the horizon is a whole number of them.
        """
        if remaining <= 0:
            return None
        steps = self.pace.steps_within(
            step, remaining, self.eval_every, self.save_every, self.total_steps - step
        )
        if steps is None:
            return None
        horizon = min(self.total_steps, self.unit * math.ceil((step + steps) / self.unit))
        note = None
        if not self.warmup_planned:
            self.warmup_planned = True
            note = self._shorten_warmup(step, horizon)
        if horizon != self.plan.horizon:
            # The same horizon is the same line: kept, so a deadline the step limit beats
            # trains at the plain cosine's very rates (a new line would round differently).
            self.plan = self.plan.replanned(step, horizon)
        return note

    def _shorten_warmup(self, step: int, horizon: int) -> str | None:
        """A warmup longer than a tenth of the deadline's first planned horizon is shortened to
        that tenth, as the Trainer does against the step limit: once, at the first plan (the
        horizon moves later, and a warmup that moved with it would move the rate up and down)."""
        limit = horizon // 10
        if self.warmup <= limit or step >= self.warmup:
            return None
        note = (
            f"warmup shortened from {self.warmup} to {limit} steps "
            f"(a tenth of the {horizon} steps planned to fit --max-time)"
        )
        self.warmup = limit
        self.plan = SchedulePlan(max(limit, step), 0.0, horizon)
        return note

    def eta(
        self, step: int, elapsed: float, max_seconds: float | None, window_step: float
    ) -> float:
        """Seconds to the end of the last step: the measured pace over the steps left (the
        evaluations and saves among them included), capped by a time limit. Before a step has
        been measured, `window_step` (the newest train row's seconds per step) stands in."""
        left = self.total_steps - step
        seconds = self.pace.seconds_for(step, left, self.eval_every, self.save_every)
        if seconds is None:
            seconds = left * window_step
        if max_seconds is not None:
            seconds = min(seconds, max(max_seconds - elapsed, 0.0))
        return seconds

    def state(self) -> dict[str, Any] | None:
        """What a checkpoint keeps: the plan and its measurements, for a deadline run only (any
        other run's plan follows from total_steps alone)."""
        if not self.deadline:
            return None
        return {
            "plan": self.plan.to_dict(),
            "pace": self.pace.to_dict(),
            "warmup": self.warmup,
            "warmup_planned": self.warmup_planned,
        }


def _multiples(first: int, last: int, every: int) -> int:
    """How many of first, first + 1, ..., last are multiples of `every`."""
    if last < first:
        return 0
    return last // every - (first - 1) // every
