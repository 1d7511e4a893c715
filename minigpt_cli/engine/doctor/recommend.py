"""Which preset to train here: the largest whose default run fits the caps and the time budget.

`recommend_preset` answers it for given `--max-memory` / `--max-cpu` caps and a time budget, preset
by preset: the governor's own memory plan (`estimate.plan_micro_batch`, so `doctor --max-memory 50`
and `pretrain --max-memory 50` pick the same micro-batch), pretraining's own run layout
(`stages.pretrain.run_shape`) and the measured speed of a real training step
(`training.step_timing`, cached like the matmuls).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import Any

import torch

from minigpt_cli.config import PRESETS
from minigpt_cli.config.loader import load_config
from minigpt_cli.config.params import count_parameters
from minigpt_cli.config.schema import Config, parse_memory
from minigpt_cli.datasets import BUILTIN_DATA_SEED
from minigpt_cli.datasets.builtin import pretrain_records
from minigpt_cli.engine.core.events import EventCallback, emit
from minigpt_cli.engine.core.units import format_duration
from minigpt_cli.engine.hardware.device import PrecisionDecision
from minigpt_cli.engine.hardware.matmul import error_text
from minigpt_cli.engine.hardware.monitor import physical_memory_bytes
from minigpt_cli.engine.resources.estimate import plan_micro_batch
from minigpt_cli.engine.resources.governor import CpuThrottle, capped_threads
from minigpt_cli.engine.stages.pretrain import run_shape, training_split
from minigpt_cli.engine.training.step_timing import training_step_timing

# The time a recommended preset's default pretraining run may take (`doctor --budget`).
DEFAULT_BUDGET_SECONDS = 30 * 60.0

BUILTIN_BYTES_PER_TOKEN = 3.58
"""UTF-8 bytes per token of the built-in pretraining corpus, end-of-text tokens included: the
lower end of what `pretrain` measures on it (3.62 with the tiny preset's 5,000-token tokenizer
since sums are worked digit by digit, one token a digit; before that 3.90, and 3.95 with small's
10,000 and medium's 16,000: the synthetic corpus saturates a larger vocabulary).
Counting the tokens exactly means training the tokenizer; the estimate only sizes the token
buffer (4 bytes per token, a few MB beside hundreds for the model), so a ratio a little low,
counting a few more tokens than there are, keeps the memory estimate on the safe side.
`tests/test_doctor.py` trains the tiny tokenizer and checks the ratio still holds."""


NOT_COUNTED = (
    "start-up and data preparation (built-in text, tokenizer training, encoding: seconds)",
    "checkpoint saves (disk speed)",
)
"""What the time estimate leaves out: the figures that are not measured here. Every other part of
a run is timed: the optimizer steps and the validation passes."""


@functools.lru_cache(maxsize=4)
def builtin_corpus_bytes(builtin_size: int) -> int:
    """UTF-8 bytes of the built-in pretraining corpus `pretrain` generates at this size."""
    records = pretrain_records(builtin_size, seed=BUILTIN_DATA_SEED)
    return sum(len(record["text"].encode("utf-8")) for record in records)


def builtin_token_estimate(config: Config) -> int:
    """Tokens `pretrain` will make of the built-in corpus with this config (slightly above)."""
    return math.ceil(builtin_corpus_bytes(config.data.builtin_size) / BUILTIN_BYTES_PER_TOKEN)


def builtin_data_bytes(config: Config) -> int:
    """The `data_bytes` `pretrain` passes to the memory plan on built-in data: 4 bytes a token
    (int32 ids), training and validation together."""
    return 4 * builtin_token_estimate(config)


def _memory_text(value: str | float) -> str:
    return f"{value:g}" if isinstance(value, int | float) else str(value)


def recommend_preset(
    max_memory: str | float | None = None,
    max_cpu: float | None = None,
    budget_seconds: float = DEFAULT_BUDGET_SECONDS,
    *,
    device: str | torch.device,
    precision: PrecisionDecision,
    presets: Iterable[str] | None = None,
    on_event: EventCallback | None = None,
) -> dict[str, Any]:
    """The largest preset whose default `pretrain` run fits the caps and finishes in the budget.

    For each preset, smallest first: the memory plan `pretrain` would make under `max_memory`
    (`estimate.plan_micro_batch`, the same function, on the built-in corpus), then the measured
    speed of a training step at the planned micro-batch with the threads `max_cpu` gives (cached),
    and the run's time: its optimizer steps and validation passes at that speed, the CPU cap's
    duty cycle included. Once a preset does not fit or would not finish in time, larger ones are
    not timed (they only need more memory and time); their memory is still shown. Returns a
    JSON-ready dict: the caps, one row per preset, `preset`/`command` of the recommendation (None
    when nothing qualifies) and `advice`, one line on what to change or what was chosen.
    """
    device = torch.device(device)
    overrides: dict[str, Any] = {}
    if max_memory is not None:
        overrides["resources.max_memory"] = max_memory
    if max_cpu is not None:
        overrides["resources.max_cpu"] = max_cpu
    configs = [(name, load_config(name, None, overrides)) for name in (presets or PRESETS)]
    configs.sort(key=lambda item: count_parameters(item[1].model, item[1].tokenizer.vocab_size))
    resources = configs[0][1].resources
    cap = parse_memory(resources.max_memory, physical_memory_bytes())
    throttle = CpuThrottle.from_percent(resources.max_cpu)
    rows: list[dict[str, Any]] = []
    stopped: str | None = None
    with capped_threads(resources.max_cpu) as (threads, thread_reason):
        for name, config in configs:
            vocab = config.tokenizer.vocab_size
            train = config.stage_train("pretrain")
            plan = plan_micro_batch(
                config, vocab, precision.dtype_name, builtin_data_bytes(config), cap
            )
            tokens = builtin_token_estimate(config)
            split = training_split(config, tokens)
            shape = run_shape(config, split, tokens - split, plan.micro_batch_size)
            row: dict[str, Any] = {
                "preset": name,
                "parameters": count_parameters(config.model, vocab),
                "fits": plan.fits,
                "micro_batch_size": plan.micro_batch_size if plan.fits else None,
                "configured_micro_batch_size": plan.configured_micro_batch_size,
                "activation_checkpointing": plan.activation_checkpointing if plan.fits else None,
                "peak_bytes": plan.estimate.total,
                "cap_bytes": cap,
                "steps": shape.steps,
                "tokens": shape.tokens,
                "tokens_per_sec": None,
                "seconds": None,
                "within_budget": None,
                "speed_source": None,
                "note": "",
            }
            rows.append(row)
            if not plan.fits:
                row["note"] = "does not fit, even at micro-batch 1 with activation checkpointing"
                stopped = stopped or f"{name} does not fit"
                continue
            if stopped:
                row["note"] = f"not timed: {stopped}"
                continue
            model_cfg = config.model.model_copy(
                update={"activation_checkpointing": plan.activation_checkpointing}
            )
            emit(
                on_event,
                "note",
                "doctor",
                message=f"timing a {name} training step (micro-batch {plan.micro_batch_size}, "
                f"{threads} threads, {precision.dtype_name} on {device})",
            )
            try:
                timing = training_step_timing(
                    model_cfg,
                    vocab,
                    train,
                    plan.micro_batch_size,
                    shape.eval_batch,
                    device=device,
                    precision=precision,
                )
            except (RuntimeError, MemoryError) as error:  # a GPU out of memory, a missing kernel
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                row["note"] = f"a training step failed: {error_text(error)}"
                stopped = f"{name} could not be timed"
                continue
            accumulation = train.global_batch_size // plan.micro_batch_size
            step = accumulation * throttle.throttled_seconds(
                timing.micro_step, timing.micro_step_cpu
            ) + throttle.throttled_seconds(timing.optimizer, timing.optimizer_cpu)
            forward = throttle.throttled_seconds(timing.eval_forward, timing.eval_forward_cpu)
            validation = shape.evaluations * shape.eval_forwards * forward
            seconds = shape.steps * step + validation
            row.update(
                tokens_per_sec=round(
                    train.global_batch_size * config.model.context_length / step, 1
                ),
                seconds=round(seconds, 1),
                within_budget=seconds <= budget_seconds,
                speed_source=timing.source,
            )
            if not row["within_budget"]:
                stopped = f"{name} is over the budget, larger presets take longer"
    chosen = next((row for row in reversed(rows) if row["fits"] and row["within_budget"]), None)
    flags = f"--max-memory {_memory_text(resources.max_memory)}"
    if max_cpu is not None:
        flags += f" --max-cpu {max_cpu:g}"
    command = f"minigpt pretrain --preset {chosen['preset']} {flags}" if chosen else None
    return {
        "max_memory": _memory_text(resources.max_memory),
        "cap_bytes": cap,
        "max_cpu": resources.max_cpu,
        "threads": threads,
        "thread_reason": thread_reason,
        "budget_seconds": budget_seconds,
        "device": str(device),
        "precision": precision.dtype_name,
        "presets": rows,
        "preset": chosen["preset"] if chosen else None,
        "command": command,
        "advice": _advice(rows, chosen, budget_seconds, resources.max_cpu),
        "not_counted": list(NOT_COUNTED),
    }


def _advice(
    rows: list[dict[str, Any]],
    chosen: dict[str, Any] | None,
    budget_seconds: float,
    max_cpu: float,
) -> str:
    """One line: why the recommendation is what it is, or what to change when there is none."""
    budget = format_duration(budget_seconds)
    if chosen is not None:
        index = rows.index(chosen)
        if index + 1 < len(rows):
            larger = rows[index + 1]
            if not larger["fits"]:
                why = "does not fit under the memory cap"
            elif larger["seconds"] is not None:
                needs = format_duration(larger["seconds"])
                why = f"would take about {needs}, over the {budget} budget"
            else:
                why = f"was not timed ({larger['note']})"
            return (
                f"{chosen['preset']} is the largest preset that fits and finishes within "
                f"{budget}; {larger['preset']} {why}"
            )
        return f"{chosen['preset']} is the largest preset; it fits and finishes within {budget}"
    smallest = rows[0]
    if not smallest["fits"]:
        need = math.ceil(smallest["peak_bytes"] / 2**20)
        return (
            f"nothing fits: even {smallest['preset']} at micro-batch 1 with activation "
            f"checkpointing needs about {need:,} MB, over the "
            f"{smallest['cap_bytes'] / 2**20:,.0f} MB cap; raise it, e.g. --max-memory {need}MiB"
        )
    needed = format_duration(smallest["seconds"])
    more_cpu = "" if max_cpu >= 100 else ", raise --max-cpu"
    minutes = math.ceil(smallest["seconds"] / 60)
    return (
        f"nothing finishes within {budget}: {smallest['preset']} needs about {needed} here; "
        f"raise --budget (e.g. --budget {minutes}m){more_cpu}, or train fewer steps "
        f"(minigpt pretrain --preset {smallest['preset']} --max-steps N)"
    )
