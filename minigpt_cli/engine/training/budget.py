"""A time budget shared by the phases of one pipeline: `minigpt quickstart --max-time`.

The quickstart runs pretrain -> SFT -> DPO -> reward model -> RLHF -> eval, each with its
preset's step limit. On a machine too slow to run them all within the budget, fixed smaller step
counts would be wrong on every other machine, so the budget is split as the pipeline goes, from
measurements: each phase has work that does not shrink with its step count (the tokenizer, the
encoding, DPO's reference log-probabilities, the final evaluation: `OUTSIDE_SECONDS`) and a
training loop that does (`LOOP_SECONDS`), both measured on one machine. When a phase's loop
starts, the time left is what the budget has not spent, less the fixed work of the phases after
it (scaled by how fast this machine did its fixed work so far against the measured one). That is
shared among the loops still to run by `BUDGET_WEIGHTS`, no loop getting more than its whole run
needs on this machine (its `LOOP_SECONDS`, scaled the same way), the rest going to the others:
when the budget is tight SFT, which carries the eval table, gets most of it; when it is nearly
enough, the loops whose share covers their whole run keep it and the others share what remains.
Time a loop did not use (its step limit came first) passes to the loops after it, and time one
overran comes out of them.

The Trainer asks for its loop's seconds when the loop starts (`phase_time_limit`) and trains under
them as an ordinary `max_time`, so it plans its cosine for the time it has (`pace.Schedule`) and
ends annealed. On a machine fast enough for the whole pipeline every step limit comes first and
the budget changes nothing.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field

from minigpt_cli.config.schema import parse_duration

PHASES = ("pretrain", "sft", "dpo", "reward", "rlhf", "eval")

# Measured: `python benchmarks/pipeline.py --seed 0 --max-time 1h` (a budget that never binds) on a
# 2-core Sapphire Rapids emulating a CPU without bf16, with the tiny preset's steps (README "What
# each stage adds"). Only ratios are used: a machine's speed is measured as the pipeline runs.
# Pretraining's loop was measured evaluating once; it now evaluates every 100 steps, two more
# evaluations of 0.53 s each there.
LOOP_SECONDS = {
    "pretrain": 24.0,
    "sft": 73.5,
    "dpo": 4.1,
    "reward": 2.0,
    "rlhf": 4.1,
}
"""Each training phase's loop (the Trainer's own clock, its evaluations included)."""
OUTSIDE_SECONDS = {
    "pretrain": 4.2,
    "sft": 1.4,
    "dpo": 2.2,
    "reward": 0.9,
    "rlhf": 0.7,
    "eval": 5.6,
}
"""Each phase's work outside its loop (before it: tokenizer, encoding, loading, reference
log-probabilities; after it: the last save), and the whole of the final evaluation."""
BUDGET_WEIGHTS = {"pretrain": 40.0, "sft": 190.0, "dpo": 4.0, "reward": 5.6, "rlhf": 6.0}
"""How a budget too small for every loop is shared, chosen by the final eval table at
`--max-time 125s` with the preset's earlier, longer steps (pretraining 1,200, DPO 400, RLHF 80;
the same machine, seed 0; README "A time budget for the quickstart"): its
exact match was 18-25.5 % with the loops' own seconds as weights, 50.5 % with pretrain 60 /
SFT 150 / DPO 8 / RLHF 12, 44.5-56.5 % with these; on seeds 1 and 2, not used to choose them,
15.5 -> 29.0 % and 16.5 -> 45.5 %. SFT, even from a short pretraining, learns the table; DPO and
RLHF add little in a few steps."""
BEFORE_LOOP_SECONDS = {"pretrain": 3.8, "sft": 1.29, "dpo": 1.97, "reward": 0.86}
"""The part of `OUTSIDE_SECONDS` before the loop of each stage's first phase: what the
pipeline can time on this machine to learn its speed before the loop starts."""


@dataclass
class PipelineBudget:
    """`seconds` of wall time from `start` for `phases` (in order, eval last), handed out to
    their training loops as each starts. `clock` is `time.perf_counter` (a test's fake one)."""

    seconds: float
    start: float
    phases: Sequence[str]
    clock: Callable[[], float] = time.perf_counter
    before_loop: dict[str, float] = field(default_factory=dict)  # measured here, by phase
    given: dict[str, float] = field(default_factory=dict)  # each loop's seconds, as handed out
    _stage_began: float | None = None

    def begin_stage(self) -> None:
        """Mark a stage's start: the time to its first loop is this machine's fixed work."""
        self._stage_began = self.clock()

    def speed_factor(self) -> float:
        """How much longer this machine took for the fixed work measured so far than the
        machine of `BEFORE_LOOP_SECONDS` (1 before any was measured)."""
        reference = sum(BEFORE_LOOP_SECONDS[phase] for phase in self.before_loop)
        if not reference:
            return 1.0
        return max(sum(self.before_loop.values()) / reference, 0.1)

    def loop_seconds(self, phase: str) -> float | None:
        """The seconds `phase`'s training loop may take, asked as it starts; None for a phase
        this budget does not cover."""
        if phase not in self.phases:
            return None
        now = self.clock()
        if self._stage_began is not None and phase in BEFORE_LOOP_SECONDS:
            self.before_loop[phase] = now - self._stage_began
        self._stage_began = None  # a stage's later loop (RLHF after its reward model) is not timed
        later = list(self.phases[self.phases.index(phase) + 1 :])
        speed = self.speed_factor()
        reserve = speed * sum(OUTSIDE_SECONDS[name] for name in later)
        left = max(self.start + self.seconds - now - reserve, 0.0)
        loops = [name for name in [phase, *later] if name in BUDGET_WEIGHTS]
        shares = split(left, loops, {name: speed * LOOP_SECONDS[name] for name in loops})
        if shares[phase] >= speed * LOOP_SECONDS[phase]:
            # Enough for its whole run: all the others do not get (its step limit ends it, and
            # what it does not use passes on).
            shares[phase] = left - sum(value for name, value in shares.items() if name != phase)
        self.given[phase] = shares[phase]
        return self.given[phase]

    def record(self) -> dict[str, object]:
        """What quickstart.json keeps of the split: the budget, each loop's seconds, the fixed
        work measured before each stage's loop and the speed factor it gave."""
        return {
            "seconds": self.seconds,
            "loop_seconds": {name: round(value, 1) for name, value in self.given.items()},
            "before_loop_seconds": {k: round(v, 2) for k, v in self.before_loop.items()},
            "speed_factor": round(self.speed_factor(), 3),
        }


def split(seconds: float, loops: Sequence[str], needs: dict[str, float]) -> dict[str, float]:
    """`seconds` shared among `loops` by `BUDGET_WEIGHTS`, none above its `needs` (the seconds
    its whole run takes): a loop whose share would exceed that gets exactly it, and the rest is
    shared again among the others (water-filling)."""
    shares: dict[str, float] = {}
    open_loops = list(loops)
    while open_loops:
        weight = sum(BUDGET_WEIGHTS[name] for name in open_loops)
        offer = {name: seconds * BUDGET_WEIGHTS[name] / weight for name in open_loops}
        full = [name for name in open_loops if offer[name] >= needs[name]]
        if not full:
            shares.update(offer)
            break
        for name in full:
            shares[name] = needs[name]
            seconds -= needs[name]
            open_loops.remove(name)
    return shares


_BUDGET: ContextVar[PipelineBudget | None] = ContextVar("pipeline_budget", default=None)


@contextlib.contextmanager
def active(pipeline: PipelineBudget | None) -> Iterator[None]:
    """Training loops started inside this block take their time from `pipeline` (None: none)."""
    token = _BUDGET.set(pipeline)
    try:
        yield
    finally:
        _BUDGET.reset(token)


def phase_time_limit(
    phase: str, configured: str | None, elapsed_before: float
) -> tuple[str | None, str | None]:
    """The `max_time` a phase's run trains under, and a note when the pipeline's budget set it.

    Called as the training loop starts: the limit counts the run's own training time, so a
    resumed run's earlier time (`elapsed_before`) is added to the loop's seconds. A loop given
    no time still trains one iteration (a run with no step is no model). A smaller `max_time`
    the config already asks for is kept.
    """
    pipeline = _BUDGET.get()
    seconds = pipeline.loop_seconds(phase) if pipeline is not None else None
    if seconds is None:
        return configured, None
    limit = elapsed_before + seconds
    if configured is not None and parse_duration(configured) <= limit:
        return configured, None
    return f"{max(limit, 0.1):.1f}s", (
        f"training for {limit:.0f} s at most, this stage's part of the pipeline's time budget: "
        "the schedule is planned to end annealed within them"
    )
