"""The Trainer's mechanisms, in-process on random tokens: schedule, accumulation, stopping rules."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from minigpt_cli.config.loader import load_config, read_run_config
from minigpt_cli.config.schema import parse_duration
from minigpt_cli.engine.core.events import Event
from minigpt_cli.engine.core.seeding import seed_everything
from minigpt_cli.engine.hardware.device import resolve_precision
from minigpt_cli.engine.model.gpt import GPT
from minigpt_cli.engine.stages.pretrain import PretrainStage, TokenRange
from minigpt_cli.engine.training import budget, optim, step_timing
from minigpt_cli.engine.training.optim import learning_rate
from minigpt_cli.engine.training.pace import Pace, SchedulePlan, planned_learning_rate
from minigpt_cli.engine.training.run_spec import RunSpec, TrainingInterrupted
from minigpt_cli.engine.training.trainer import Trainer

VOCAB = 320
SETS = [
    "model.n_embd=32",
    "model.n_layer=1",
    "model.n_head=2",
    "model.context_length=16",
    "train.warmup_steps=0",
    "train.eval_every=1000",
    "train.save_every=1000",
    "train.log_every=1",
    "train.eval_batches=1",
    "log.plot=false",
]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _train(tmp_path: Path, sets: list[str], tokens: int = 4000) -> tuple[GPT, list[Event]]:
    config = load_config("tiny", sets=[*SETS, *sets])
    stream = np.random.default_rng(0).integers(0, VOCAB, tokens).astype(np.int32)
    stage = PretrainStage(
        TokenRange(stream[: tokens - 200]),
        TokenRange(stream[tokens - 200 :]),
        config.model.context_length,
        seed=0,
        token_bytes=np.ones(VOCAB, dtype=np.int64),
        eval_sequences=4,
    )
    seed_everything(0)
    model = GPT(config.model, VOCAB)
    events: list[Event] = []
    trainer = Trainer(
        config,
        stage,
        model,
        RunSpec(run_dir=tmp_path),
        device=torch.device("cpu"),
        precision=resolve_precision("fp32", torch.device("cpu"), measurements={}),
        on_event=events.append,
        vocab_size=VOCAB,
    )
    trainer.fit()
    return model, events


def test_schedule_warms_up_linearly_then_decays_to_the_floor() -> None:
    rates = [learning_rate(s, 100, 10, 1.0, 0.1) for s in range(101)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert rates[10] == pytest.approx(1.0)
    assert rates[55] == pytest.approx(0.1 + 0.5 * 0.9)
    assert rates[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(rates[10:], rates[11:], strict=False))
    assert learning_rate(50, 100, 0, 1e-4, 1e-3) == pytest.approx(1e-4)  # floor clamped to peak


def test_accumulation_gives_the_same_update_as_one_big_batch(tmp_path: Path) -> None:
    big, _ = _train(
        tmp_path / "a",
        ["train.micro_batch_size=8", "train.global_batch_size=8", "train.max_steps=3"],
    )
    accumulated, _ = _train(
        tmp_path / "b",
        ["train.micro_batch_size=2", "train.global_batch_size=8", "train.max_steps=3"],
    )
    for (name, a), (_, b) in zip(
        big.named_parameters(), accumulated.named_parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def _steps(events: list[Event]) -> list[int]:
    return [e.data["step"] for e in events if e.kind == "step"]


def test_max_tokens_and_epochs_stop_the_run(tmp_path: Path) -> None:
    tokens_per_step = 4 * 16
    _, events = _train(
        tmp_path / "tokens",
        [
            "train.micro_batch_size=4",
            "train.global_batch_size=4",
            f"pretrain.max_tokens={5 * tokens_per_step}",
        ],
    )
    assert _steps(events)[-1] == 5
    windows = (3800 - 1) // 16
    _, events = _train(
        tmp_path / "epochs",
        ["train.micro_batch_size=4", "train.global_batch_size=4", "pretrain.epochs=0.5"],
    )
    assert _steps(events)[-1] == math.ceil(0.5 * windows / 4)
    end = [e for e in events if e.kind == "stage_end"][-1]
    assert end.data["stop_reason"] in ("max_steps", "epochs")


def test_a_long_warmup_is_shortened_with_a_note(tmp_path: Path) -> None:
    _, events = _train(
        tmp_path,
        [
            "train.micro_batch_size=4",
            "train.global_batch_size=4",
            "train.max_steps=20",
            "train.warmup_steps=15",
        ],
    )
    notes = [e.data["message"] for e in events if e.kind == "note"]
    assert any("warmup shortened from 15 to 2 steps" in note for note in notes)
    first = [e for e in events if e.kind == "step"][0]
    assert first.data["lr"] == pytest.approx(load_config("tiny").train.learning_rate / 2)


def test_max_time_stops_early_and_still_evaluates(tmp_path: Path) -> None:
    _, events = _train(
        tmp_path,
        [
            "train.micro_batch_size=4",
            "train.global_batch_size=4",
            "train.max_steps=100000",
            "pretrain.max_time=1s",
        ],
    )
    end = [e for e in events if e.kind == "stage_end"][-1]
    assert end.data["stop_reason"] == "max_time"
    assert end.data["step"] < 100000
    assert [e for e in events if e.kind == "eval"], "the final evaluation always runs"


def test_a_step_limit_that_cuts_the_epochs_short_is_announced(tmp_path: Path) -> None:
    _, events = _train(
        tmp_path,
        [
            "train.micro_batch_size=4",
            "train.global_batch_size=4",
            "train.max_steps=3",
            "pretrain.epochs=2",
        ],
    )
    windows = (3800 - 1) // 16
    notes = [e.data["message"] for e in events if e.kind == "note"]
    wanted = math.ceil(2 * windows / 4)
    assert f"max_steps 3 ends the run before 2 epochs (about {wanted} steps)" in " ".join(notes)
    assert _steps(events)[-1] == 3


def test_the_trainer_and_doctors_timed_step_make_the_same_update(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`doctor --budget` times the update a run really makes: the Trainer's steps and the timed
    step (`step_timing`) both backpropagate through `optim.backward` and update through
    `optim.apply_update`, with the run's clipping."""
    calls: list[tuple[str, str, Any]] = []  # (function, calling module, grad_clip)

    def spy(name: str) -> Callable[..., Any]:
        real = getattr(optim, name)

        def record(*args: Any, **kwargs: Any) -> Any:
            caller = sys._getframe(1).f_globals["__name__"].rsplit(".", 1)[-1]
            calls.append((name, caller, args[1] if name == "apply_update" else None))
            return real(*args, **kwargs)

        return record

    for name in ("backward", "apply_update"):
        monkeypatch.setattr(optim, name, spy(name))
    sets = ["train.max_steps=1", "train.grad_clip=0.5"]
    _train(tmp_path, sets)
    config = load_config("tiny", sets=[*SETS, *sets])
    precision = resolve_precision("fp32", torch.device("cpu"), measurements={})
    train = config.stage_train("pretrain")
    step_timing.measure_training_step(
        config.model, VOCAB, train, 2, 2, device="cpu", precision=precision
    )
    assert {(name, caller) for name, caller, _ in calls} == {
        (name, caller)
        for name in ("backward", "apply_update")
        for caller in ("trainer", "step_timing")
    }
    assert {clip for name, _, clip in calls if name == "apply_update"} == {0.5}


class FakeClock:
    """Wall time that passes only when the stage works: each micro-batch drawn costs
    `batch_seconds`, each evaluation `eval_seconds`. Binary fractions, so every sum is exact."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def _clocked_train(
    run_dir: Path,
    sets: list[str],
    clock: FakeClock,
    *,
    resume: bool = False,
    interrupt_at_step: int | None = None,
    batch_seconds: float = 0.25,
    eval_seconds: float = 1.0,
) -> tuple[GPT, list[Event]]:
    """`_train` on a fake clock; optionally Ctrl-C while drawing step `interrupt_at_step`'s batch
    (1-based), or resume the run in `run_dir`."""
    config = load_config("tiny", sets=[*SETS, *sets])
    stream = np.random.default_rng(0).integers(0, VOCAB, 4000).astype(np.int32)
    stage = PretrainStage(
        TokenRange(stream[:3800]),
        TokenRange(stream[3800:]),
        config.model.context_length,
        seed=0,
        token_bytes=np.ones(VOCAB, dtype=np.int64),
        eval_sequences=4,
    )
    draw, evaluate = stage.next_batch, stage.evaluate
    events: list[Event] = []

    def next_batch(num_sequences: int) -> dict[str, torch.Tensor]:
        done = [e.data["step"] for e in events if e.kind == "step"]
        if interrupt_at_step is not None and (done[-1] if done else 0) == interrupt_at_step - 1:
            raise KeyboardInterrupt
        clock.now += batch_seconds
        return draw(num_sequences)

    def timed_evaluate(model: torch.nn.Module) -> dict[str, float]:
        clock.now += eval_seconds
        return evaluate(model)

    stage.next_batch = next_batch  # type: ignore[method-assign]
    stage.evaluate = timed_evaluate  # type: ignore[method-assign]
    seed_everything(0)
    model = GPT(config.model, VOCAB)
    trainer = Trainer(
        config,
        stage,
        model,
        RunSpec(run_dir=run_dir, resume=resume),
        device=torch.device("cpu"),
        precision=resolve_precision("fp32", torch.device("cpu"), measurements={}),
        on_event=events.append,
        vocab_size=VOCAB,
        clock=clock,
    )
    with contextlib.suppress(TrainingInterrupted):
        trainer.fit()
    return model, events


# 0.25 s a step (one micro-batch), 1 s an evaluation every 10 steps, 10 s of training: steps end
# at 0.25 s each, evaluations after steps 10, 20 and 30 push step 30's end to 9.5 s and the
# deadline falls in step 31 (10.75 s). Log every step, so every learning rate is seen.
DEADLINE = [
    "train.micro_batch_size=4",
    "train.global_batch_size=4",
    "train.max_steps=100000",
    "train.eval_every=10",
    "pretrain.max_time=10s",
]


def test_a_time_limited_run_plans_its_schedule_to_end_at_min_lr(tmp_path: Path) -> None:
    _, events = _clocked_train(tmp_path, DEADLINE, FakeClock())
    config = load_config("tiny", sets=[*SETS, *DEADLINE])
    peak, floor = config.train.learning_rate, config.train.min_lr
    end = [e for e in events if e.kind == "stage_end"][-1]
    assert (end.data["stop_reason"], end.data["step"]) == ("max_time", 31)
    steps = [e.data for e in events if e.kind == "step"]
    # A row shows the plan its step ran on. Planned after step 11, once the evaluation after step
    # 10 has been measured, the horizon is exact: the step the deadline stops the run at.
    assert {row["horizon"] for row in steps if row["step"] > 11} == {31}
    assert steps[-1]["lr"] - floor < 0.01 * (peak - floor)  # the last step ran at ~min_lr
    rates = [row["lr"] for row in steps]
    assert all(a >= b for a, b in zip(rates, rates[1:], strict=False)), "no jump back up"
    # Without the plan the cosine to max_steps would still be at its peak.
    assert learning_rate(30, 100000, 0, peak, floor) > 0.99 * peak


def test_a_step_limit_below_the_deadline_is_the_horizon(tmp_path: Path) -> None:
    sets = [*DEADLINE, "train.max_steps=20"]
    _, events = _clocked_train(tmp_path, sets, FakeClock())
    config = load_config("tiny", sets=[*SETS, *sets])
    steps = [e.data for e in events if e.kind == "step"]
    assert [row["horizon"] for row in steps] == [20] * 20
    peak, floor = config.train.learning_rate, config.train.min_lr
    plain = [learning_rate(step, 20, 0, peak, floor) for step in range(20)]
    # Bitwise: a horizon that does not move keeps the plan, so a pipeline's budget that the step
    # limit beats (quickstart on a fast machine) trains exactly as without one.
    assert [row["lr"] for row in steps] == plain


def test_a_pipeline_budget_becomes_the_runs_max_time(tmp_path: Path) -> None:
    # The quickstart's budget, 10.3 s of the real clock for this one phase, read as the loop
    # starts (after the run's setup): the rest becomes the run's max_time, on DEADLINE's clock.
    with budget.active(budget.PipelineBudget(10.3, time.perf_counter(), ["pretrain"])):
        _, events = _clocked_train(tmp_path, DEADLINE[:-1], FakeClock())
    recorded = read_run_config(tmp_path).pretrain.max_time  # --resume continues the same plan
    assert recorded is not None
    limit = parse_duration(recorded)
    assert 5.0 < limit <= 10.3
    notes = [e.data["message"] for e in events if e.kind == "note"]
    assert any("time budget" in note for note in notes), notes
    # Step n ends at 0.25 n s plus a second for each evaluation before it (after 10, 20, ...).
    stop = next(n for n in range(1, 100) if 0.25 * n + (n - 1) // 10 >= limit)
    end = [e for e in events if e.kind == "stage_end"][-1]
    assert (end.data["stop_reason"], end.data["step"]) == ("max_time", stop)
    config = load_config("tiny", sets=[*SETS, *DEADLINE])
    peak, floor = config.train.learning_rate, config.train.min_lr
    last = [e.data for e in events if e.kind == "step"][-1]
    assert last["lr"] - floor < 0.05 * (peak - floor)  # planned for the budget: annealed
    # A smaller max_time of the run's own is kept (step 16 ends at 5 s).
    own = [*DEADLINE[:-1], "pretrain.max_time=5s"]
    with budget.active(budget.PipelineBudget(10.3, time.perf_counter(), ["pretrain"])):
        _, events = _clocked_train(tmp_path / "own", own, FakeClock())
    assert [e.data["step"] for e in events if e.kind == "stage_end"] == [16]
    assert not [e for e in events if e.kind == "note" and "budget" in e.data["message"]]


def test_the_budget_gives_each_loop_its_share_of_what_is_left() -> None:
    weights, outside = budget.BUDGET_WEIGHTS, budget.OUTSIDE_SECONDS
    trained = [phase for phase in budget.PHASES if phase in weights]
    clock = FakeClock(100.0)
    pipeline = budget.PipelineBudget(150.0, 100.0, list(budget.PHASES), clock=clock)
    assert budget.phase_time_limit("pretrain", None, 0.0) == (None, None)  # not inside `active`
    with budget.active(pipeline):
        # This machine took twice the measured time for pretraining's tokenizer and encoding:
        # the later phases' fixed work is reserved at twice the measured time too. The budget
        # is far below every loop's need: each gets its weight's share.
        pipeline.begin_stage()
        clock.now += 2 * budget.BEFORE_LOOP_SECONDS["pretrain"]
        limit, note = budget.phase_time_limit("pretrain", None, 0.0)
        assert pipeline.speed_factor() == pytest.approx(2.0)
        reserve = 2 * sum(outside[phase] for phase in budget.PHASES[1:])
        left = 150.0 - 2 * budget.BEFORE_LOOP_SECONDS["pretrain"] - reserve
        given = left * weights["pretrain"] / sum(weights.values())
        assert limit == f"{given:.1f}s" and note is not None
        # Pretraining's step limit came at half its time: SFT gets its share of all the rest.
        clock.now += given / 2
        pipeline.begin_stage()
        clock.now += 2 * budget.BEFORE_LOOP_SECONDS["sft"]
        sft = pipeline.loop_seconds("sft")
        later = budget.PHASES[2:]
        left = 250.0 - clock.now - 2 * sum(outside[phase] for phase in later)
        assert sft == pytest.approx(left * weights["sft"] / sum(weights[p] for p in trained[1:]))
        # A resumed run adds its earlier training time; past the budget a loop gets one iteration.
        clock.now = 1000.0
        assert budget.phase_time_limit("dpo", None, 12.0)[0] == "12.0s"
        assert budget.phase_time_limit("rlhf", None, 0.0)[0] == "0.1s"
    assert set(pipeline.record()["loop_seconds"]) == {"pretrain", "sft", "dpo", "rlhf"}
    assert pipeline.record()["before_loop_seconds"] == pytest.approx(
        {
            "pretrain": 2 * budget.BEFORE_LOOP_SECONDS["pretrain"],
            "sft": 2 * budget.BEFORE_LOOP_SECONDS["sft"],
        },
        abs=0.01,
    )


def test_a_loop_never_gets_more_than_its_run_needs_the_rest_goes_to_the_others() -> None:
    loops = [phase for phase in budget.PHASES if phase in budget.BUDGET_WEIGHTS]
    needs = {phase: budget.LOOP_SECONDS[phase] for phase in loops}
    # Nearly enough time: the loops whose weight's share covers their run are whole, and the
    # others share what remains by weight.
    short = 0.5
    shares = budget.split(sum(needs.values()) - short, loops, needs)
    assert sum(shares.values()) == pytest.approx(sum(needs.values()) - short)
    cut = [phase for phase in loops if shares[phase] < needs[phase] - 1e-9]
    assert cut and "sft" not in cut and all(shares[p] <= needs[p] + 1e-9 for p in loops)
    for phase in cut:
        assert shares[phase] / budget.BUDGET_WEIGHTS[phase] == pytest.approx(
            shares[cut[0]] / budget.BUDGET_WEIGHTS[cut[0]]
        )
    # Tight: no loop reaches its need, each gets its weight's share.
    shares = budget.split(60.0, loops, needs)
    weight = sum(budget.BUDGET_WEIGHTS.values())
    assert shares == pytest.approx({p: 60.0 * budget.BUDGET_WEIGHTS[p] / weight for p in loops})
    assert sum(shares.values()) == pytest.approx(60.0)
    # More than enough: every loop its need; the pipeline gives the surplus to the running loop.
    clock = FakeClock(0.0)
    pipeline = budget.PipelineBudget(10_000.0, 0.0, list(budget.PHASES), clock=clock)
    rest = sum(needs[p] for p in loops[1:]) + sum(
        budget.OUTSIDE_SECONDS[p] for p in budget.PHASES[1:]
    )
    assert pipeline.loop_seconds("pretrain") == pytest.approx(10_000.0 - rest)


def test_a_resumed_time_limited_run_repeats_the_uninterrupted_one_bitwise(tmp_path: Path) -> None:
    sets = [*DEADLINE, "train.warmup_steps=20"]  # the shortened warmup is state too
    whole, events = _clocked_train(tmp_path / "whole", sets, FakeClock())
    _, first = _clocked_train(tmp_path / "cut", sets, FakeClock(), interrupt_at_step=14)
    # The second session's clock reads something else entirely: only elapsed time counts.
    resumed, second = _clocked_train(tmp_path / "cut", sets, FakeClock(512.0), resume=True)

    def rates(evs: list[Event]) -> list[tuple[int, float, int]]:
        return [(e.data["step"], e.data["lr"], e.data["horizon"]) for e in evs if e.kind == "step"]

    assert rates(first)[-1][0] == 13
    assert rates(first) + rates(second) == rates(events)
    for (name, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_logged_tokens_per_second_and_eta_are_the_wall_clocks(tmp_path: Path) -> None:
    sets = [
        "train.micro_batch_size=4",
        "train.global_batch_size=4",
        "train.max_steps=30",
        "train.eval_every=10",
        "train.log_every=5",
    ]
    _, events = _clocked_train(tmp_path, sets, FakeClock())
    rows = [e.data for e in events if e.kind == "step"]
    tokens_per_step = 4 * 16
    previous = 0.0
    for row in rows:
        # Every row's window is 5 steps; the one after an evaluation holds its second too.
        assert row["tokens_per_sec"] == round(5 * tokens_per_step / (row["time"] - previous), 1)
        previous = row["time"]
    # Once a step and an evaluation have been measured, the ETA is the time the rest really took.
    end = rows[-1]["time"]
    for row in rows:
        if row["step"] > 10:
            assert row["eta_sec"] == round(end - row["time"], 1), row["step"]
    summary = [e for e in events if e.kind == "stage_end"][-1].data
    assert summary["tokens_per_sec"] == round(30 * tokens_per_step / end, 1)


def test_a_plan_from_the_start_is_the_plain_cosine_and_a_replan_continues_it() -> None:
    plan = SchedulePlan(10, 0.0, 100)
    plain = [learning_rate(s, 100, 10, 1.0, 0.1) for s in range(101)]
    assert [planned_learning_rate(s, plan, 10, 1.0, 0.1) for s in range(101)] == plain
    shorter = plan.replanned(40, 70)
    assert shorter.progress_at(40) == plan.progress_at(40)  # the rate does not jump
    assert shorter.progress_at(70) == shorter.progress_at(90) == 1.0
    assert plan.replanned(5, 50).start == 10  # planned during warmup: the line starts after it


def test_pace_counts_the_evaluations_and_saves_before_the_deadline() -> None:
    pace = Pace(1)
    pace.add_step(1, 5.0)  # the first step (initialisation) is left out
    for step in range(2, 6):
        pace.add_step(step, 0.5)
    pace.eval_seconds, pace.save_seconds = 2.0, 1.0
    assert pace.step_seconds() == 0.5
    # After step 5: steps 6..15 take 5 s, with the evaluation after step 10 (every 10) in
    # between; the one after step 15, the last, is not counted. No save (every 20) falls inside.
    assert pace.seconds_for(5, 10, 10, 20) == 7.0
    assert pace.steps_within(5, 7.0, 10, 20, limit=1000) == 10
    assert pace.steps_within(5, 6.9, 10, 20, limit=1000) == 10  # step 15 is the one past it
    assert pace.steps_within(5, 6.5, 10, 20, limit=1000) == 9
    assert pace.steps_within(5, 7.0, 10, 20, limit=4) == 4
    rl = Pace(2)  # an RL iteration of two optimizer steps: timed whole
    for step, seconds in [(1, 9.0), (2, 9.0), (3, 0.25), (4, 0.75)]:
        rl.add_step(step, seconds)
    assert rl.step_seconds() == 0.5


def test_a_long_warmup_is_shortened_against_the_deadlines_first_plan(tmp_path: Path) -> None:
    sets = [*DEADLINE, "train.warmup_steps=20"]
    _, events = _clocked_train(tmp_path, sets, FakeClock())
    peak = load_config("tiny", sets=[*SETS, *sets]).train.learning_rate
    notes = [e.data["message"] for e in events if e.kind == "note"]
    # First planned after step 2 (step 1 is not timed): 38 more steps of 0.25 s fit the 9.5 s
    # left, no evaluation measured yet, so the horizon is 40 and the warmup a tenth of it.
    assert "warmup shortened from 20 to 4 steps (a tenth of the 40 steps planned" in " ".join(notes)
    rates = [e.data["lr"] for e in events if e.kind == "step"]
    assert rates[:4] == pytest.approx([peak / 20, 2 * peak / 20, 3 * peak / 4, peak])
    end = [e for e in events if e.kind == "stage_end"][-1].data
    assert (end["stop_reason"], end["step"]) == ("max_time", 31)


@pytest.mark.parametrize("scale", [0.01, 100.0, float("nan")])
def test_gradient_clipping_is_torchs_bitwise_whether_or_not_it_clips(scale: float) -> None:
    """`optim.clip_gradients` skips torch's multiplication by 1.0 under the bound; the gradients and
    the returned norm must stay exactly torch's, over the bound and with a NaN gradient too."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (5,), (3, 4, 2)]
    values = [torch.randn(shape, generator=generator) * scale for shape in shapes]
    mine = [torch.nn.Parameter(torch.zeros(shape)) for shape in shapes]
    theirs = [torch.nn.Parameter(torch.zeros(shape)) for shape in shapes]
    for a, b, value in zip(mine, theirs, values, strict=True):
        a.grad, b.grad = value.clone(), value.clone()
    norm = optim.clip_gradients(mine, 1.0)
    want = float(torch.nn.utils.clip_grad_norm_(theirs, 1.0))
    assert norm == want or (math.isnan(norm) and math.isnan(want))
    for a, b in zip(mine, theirs, strict=True):
        assert _same_bits(a.grad, b.grad)
    clipped = scale != 0.01
    assert clipped == any(not torch.equal(a.grad, v) for a, v in zip(mine, values, strict=True))


def _same_bits(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    assert a is not None and b is not None
    return torch.equal(a.view(torch.int32), b.view(torch.int32))
