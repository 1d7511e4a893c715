"""The Trainer's mechanisms, in-process on random tokens: schedule, accumulation, stopping rules."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from minigpt_cli.config.loader import load_config
from minigpt_cli.engine.core.events import Event
from minigpt_cli.engine.core.seeding import seed_everything
from minigpt_cli.engine.hardware.device import resolve_precision
from minigpt_cli.engine.model.gpt import GPT
from minigpt_cli.engine.stages.pretrain import PretrainStage, TokenRange
from minigpt_cli.engine.training import optim, step_timing
from minigpt_cli.engine.training.optim import learning_rate
from minigpt_cli.engine.training.trainer import RunSpec, Trainer

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
