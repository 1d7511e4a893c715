"""Acting on the memory plan before a run allocates anything large: the micro-batch that fits the
cap, activation checkpointing when needed, exit status 2 when nothing fits.

`estimate.plan_micro_batch` decides (and `doctor` recommends from the same decision); every
training stage calls `fit_memory` here to act on it, with the bytes this process really holds.
"""

from __future__ import annotations

from typing import Any

from minigpt_cli.config.schema import Config, ResourcesConfig, parse_memory
from minigpt_cli.engine.core.events import EventCallback, emit
from minigpt_cli.engine.hardware import share
from minigpt_cli.engine.hardware.monitor import physical_memory_bytes, tree_rss_bytes
from minigpt_cli.engine.resources.estimate import (
    FRAMEWORK_BYTES,
    PIPELINE_BYTES,
    MemoryEstimate,
    plan_micro_batch,
)
from minigpt_cli.engine.resources.governor import release_memory
from minigpt_cli.errors import UserError


def fit_memory(
    config: Config,
    vocab_size: int,
    precision: str,
    data_bytes: int,
    on_event: EventCallback | None,
    *,
    stage: str = "pretrain",
    measure_baseline: bool = False,
    **estimate_kwargs: Any,
) -> tuple[int, list[str]]:
    """Estimate peak memory before anything large is allocated and fit the micro-batch to the cap.

    Returns the micro-batch to train with and the governor messages to log. The decision itself is
    `estimate.plan_micro_batch`, shared with `doctor` so its recommendation and this run agree; here
    it is acted on: the estimate is shown beside the cap, activation checkpointing is switched on
    in the config when the plan needs it, and when nothing fits the run stops with exit status 2.
    `measure_baseline`: a training run plans with what this process really holds already (never
    less than the estimator's constant), since imports and libraries differ between machines.
    """
    cap = memory_cap_bytes(config.resources)
    if measure_baseline and "framework_bytes" not in estimate_kwargs:
        estimate_kwargs["framework_bytes"] = measured_framework_bytes()
    mine = share.current()
    if mine.world_size > 1:  # DistributedDataParallel's buckets: one more copy of the gradients
        estimate_kwargs.setdefault("ddp_buckets", True)
    plan = plan_micro_batch(
        config, vocab_size, precision, data_bytes, cap, stage=stage, **estimate_kwargs
    )
    emit(on_event, "note", stage, message=memory_line(plan.configured_estimate, cap, mine))
    if not plan.fits:
        raise UserError(plan.refusal)
    if plan.activation_checkpointing and not config.model.activation_checkpointing:
        config.model.activation_checkpointing = True
    for message in plan.messages:
        emit(on_event, "governor", stage, message=message)
    return plan.micro_batch_size, plan.messages


def memory_cap_bytes(resources: ResourcesConfig) -> int:
    """This process's memory cap: `--max-memory` (the machine's), or under torchrun this rank's
    share of it (`hardware/share.py`)."""
    return share.current().memory_bytes(parse_memory(resources.max_memory, physical_memory_bytes()))


def memory_line(estimate: MemoryEstimate, cap_bytes: int, mine: share.MachineShare) -> str:
    """The estimate beside the cap; under torchrun for each rank and for the whole machine."""
    mb = 2**20
    if mine.local_processes <= 1 and not mine.launcher_bytes:
        return f"memory: {estimate.describe()}; cap {cap_bytes / mb:,.0f} MB"
    processes = mine.local_processes
    total = processes * estimate.total + mine.launcher_bytes
    machine_cap = processes * cap_bytes + mine.launcher_bytes
    return (
        f"memory, each of {processes} processes: {estimate.describe()}; cap {cap_bytes / mb:,.0f} "
        f"MB each. This machine: {processes} x {estimate.total / mb:,.0f} MB + the launcher's "
        f"{mine.launcher_bytes / mb:,.0f} MB = {total / mb:,.0f} MB; cap {machine_cap / mb:,.0f} MB"
    )


def measured_framework_bytes() -> int:
    """The process tree's resident memory now (after handing freed heap back), at least the
    estimator's constant for a process that prepared its data: the baseline a plan adds to."""
    release_memory()
    return max(FRAMEWORK_BYTES + PIPELINE_BYTES, tree_rss_bytes())


def refuse_what_cannot_fit(config: Config, precision: str) -> None:
    """Exit 2 before tokenizer training when not even the smallest setting could fit the cap."""
    cap = memory_cap_bytes(config.resources)
    plan = plan_micro_batch(config, config.tokenizer.vocab_size, precision, 0, cap)
    if not plan.fits:
        raise UserError(plan.refusal)
