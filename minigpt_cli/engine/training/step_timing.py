"""How long a real training step takes on this machine: measured, then cached per machine.

`doctor` recommends a preset by the time its default run would take, so it times the parts of a
step as the Trainer runs them (a micro-batch's forward + backward, the optimizer update, a
validation forward) on random ids: the same model, optimizer, autocast, scaler and matmul
precision, and the same `optim.backward` / `optim.apply_update`, so a change to the update is
timed as soon as it is made. Results go into the speed cache (`speed_cache`, section
`training_speed`) keyed by everything the speed depends on.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import torch

from minigpt_cli.config.schema import ModelConfig, TrainConfig
from minigpt_cli.engine.hardware import facts, speed_cache
from minigpt_cli.engine.hardware.device import PrecisionDecision, autocast_context
from minigpt_cli.engine.hardware.matmul import float32_matmul_precision, synchronize
from minigpt_cli.engine.model.gpt import GPT
from minigpt_cli.engine.training import optim

MIN_TIMING_SECONDS = 0.2
"""Each timed part (a micro-batch's forward + backward, the optimizer update, a validation
forward) is repeated until its repeats add up to this (at most MAX_TIMING_REPEATS times), then
the median counts: one repeat on a CPU for anything but tiny, several on a GPU."""
MAX_TIMING_REPEATS = 5
# Where measured training-step timings live in the cache file, beside the matmul entries.
SPEED_CACHE_SECTION = "training_speed"


@dataclass(frozen=True)
class StepTiming:
    """Measured seconds of the parts of a training step, wall clock and process CPU time.

    CPU time is kept beside wall time because a fractional `--max-cpu` cap is held by sleeping
    until CPU time / wall time is under the cap (`governor.CpuThrottle`): the wall time a capped
    run takes follows from both.
    """

    micro_step: float
    micro_step_cpu: float
    optimizer: float
    optimizer_cpu: float
    eval_forward: float
    eval_forward_cpu: float
    source: str = "measured"

    def to_dict(self) -> dict[str, float]:
        return {name: value for name, value in asdict(self).items() if name != "source"}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str) -> StepTiming | None:
        """The cached timing, or None when any figure is missing or not a positive number."""
        figures: dict[str, float] = {}
        for name in cls.__dataclass_fields__:
            if name == "source":
                continue
            value = data.get(name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
                return None  # `not > 0` refuses NaN too
            figures[name] = float(value)
        return cls(**figures, source=source)


def _timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of `fn()`, the device's queue drained on both sides."""
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def _median_times(samples: list[tuple[float, float]]) -> tuple[float, float]:
    return (
        statistics.median(wall for wall, _ in samples),
        statistics.median(cpu for _, cpu in samples),
    )


def measure_training_step(
    model_cfg: ModelConfig,
    vocab_size: int,
    train: TrainConfig,
    micro_batch_size: int,
    eval_batch: int,
    *,
    device: str | torch.device,
    precision: PrecisionDecision,
) -> StepTiming:
    """Time a real training step of `GPT(model_cfg, vocab_size)` as the Trainer runs it.

    The same model, AdamW (`optim.build_optimizer`), autocast, gradient scaler, matmul precision,
    backward pass and update (`optim.backward`, `optim.apply_update`) as a run on this device;
    random token ids (speed does not depend on them). One whole warm-up step first (lazy
    initialisation, kernel selection, AdamW's state), then cycles of one micro-batch's forward +
    backward and one optimizer update, and last a validation forward of `eval_batch` sequences
    without gradients; the median of each part counts. Runs with torch's current thread count;
    the global RNG and the fp32 matmul precision are left as they were.
    """
    device = torch.device(device)
    micro, update, evaluation = _step_samples(
        model_cfg, vocab_size, train, micro_batch_size, eval_batch, device, precision
    )
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the model is gone: the next preset gets its memory back
    return StepTiming(*_median_times(micro), *_median_times(update), *_median_times(evaluation))


def _repeat_timed(fn: Callable[[], object], device: torch.device) -> list[tuple[float, float]]:
    """`_timed(fn)` until the repeats add up to MIN_TIMING_SECONDS (at most MAX_TIMING_REPEATS)."""
    samples = [_timed(fn, device)]
    while len(samples) < MAX_TIMING_REPEATS and sum(w for w, _ in samples) < MIN_TIMING_SECONDS:
        samples.append(_timed(fn, device))
    return samples


def _step_samples(
    model_cfg: ModelConfig,
    vocab_size: int,
    train: TrainConfig,
    micro_batch_size: int,
    eval_batch: int,
    device: torch.device,
    precision: PrecisionDecision,
) -> tuple[list[tuple[float, float]], list[tuple[float, float]], list[tuple[float, float]]]:
    """(wall, CPU) samples of a micro-step, an optimizer update and a validation forward."""
    fork = [device.index or 0] if device.type == "cuda" else []
    seq = model_cfg.context_length
    with (
        torch.random.fork_rng(devices=fork),
        float32_matmul_precision(precision.fp32_matmul_precision),
    ):
        torch.manual_seed(0)
        model = GPT(model_cfg, vocab_size).to(device).train()
        optimizer, _ = optim.build_optimizer(model, train, device)
        scaler = torch.amp.GradScaler(device.type) if precision.use_grad_scaler else None
        ids = torch.randint(0, vocab_size, (max(micro_batch_size, eval_batch), seq + 1))
        ids = ids.to(device)
        inputs, targets = ids[:micro_batch_size, :-1], ids[:micro_batch_size, 1:]
        eval_inputs, eval_targets = ids[:eval_batch, :-1], ids[:eval_batch, 1:]

        def micro_step() -> None:
            with autocast_context(precision, device):
                _, loss = model(inputs, targets=targets, reduction="sum")
            optim.backward(loss / targets.numel(), scaler)

        def update() -> None:
            optim.apply_update(optimizer, train.grad_clip, scaler)

        def eval_forward() -> None:
            with torch.no_grad(), autocast_context(precision, device):
                model(eval_inputs, targets=eval_targets, reduction="sum")

        micro_step()  # the warm-up step
        update()
        micro_samples: list[tuple[float, float]] = []
        update_samples: list[tuple[float, float]] = []
        # Alternate so every update has a micro-batch's gradients to apply, as in training.
        while len(micro_samples) < MAX_TIMING_REPEATS and (
            not micro_samples or sum(w for w, _ in micro_samples) < MIN_TIMING_SECONDS
        ):
            micro_samples.append(_timed(micro_step, device))
            update_samples.append(_timed(update, device))
        model.eval()
        if device.type != "cpu":
            eval_forward()  # a GPU picks kernels per shape on first use
        return micro_samples, update_samples, _repeat_timed(eval_forward, device)


def _speed_key(
    model_cfg: ModelConfig,
    vocab_size: int,
    micro_batch_size: int,
    eval_batch: int,
    device: torch.device,
    precision: PrecisionDecision,
) -> str:
    """What a step's speed depends on: the machine (device, threads, torch: the fingerprint), the
    precision, the model's shape, and the batch shapes timed."""
    return speed_cache.fingerprint_key(
        {
            **facts.machine_fingerprint(device),
            "precision": precision.dtype_name,
            "matmul_precision": precision.fp32_matmul_precision,
            "model": json.dumps(model_cfg.model_dump(), sort_keys=True),
            "vocab": vocab_size,
            "micro_batch": micro_batch_size,
            "eval_batch": eval_batch,
        }
    )


def training_step_timing(
    model_cfg: ModelConfig,
    vocab_size: int,
    train: TrainConfig,
    micro_batch_size: int,
    eval_batch: int,
    *,
    device: str | torch.device,
    precision: PrecisionDecision,
) -> StepTiming:
    """`measure_training_step`, read from doctor's cache when this exact case was timed before.

    A new measurement is written to the cache (`training_speed` beside the matmul entries); an
    unwritable cache only costs measuring again next time.
    """
    device = torch.device(device)
    key = _speed_key(model_cfg, vocab_size, micro_batch_size, eval_batch, device, precision)
    cache = speed_cache.read_cache()
    section = cache.get(SPEED_CACHE_SECTION)
    cached = section.get(key) if isinstance(section, dict) else None
    if isinstance(cached, dict):
        timing = StepTiming.from_dict(cached, source="cached")
        if timing is not None:
            return timing
    timing = measure_training_step(
        model_cfg,
        vocab_size,
        train,
        micro_batch_size,
        eval_batch,
        device=device,
        precision=precision,
    )
    cache = speed_cache.read_cache()
    if not isinstance(cache.get(SPEED_CACHE_SECTION), dict):
        cache[SPEED_CACHE_SECTION] = {}
    cache[SPEED_CACHE_SECTION][key] = {
        **timing.to_dict(),
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    speed_cache.write_cache(cache)
    return timing
