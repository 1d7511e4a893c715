"""What the decoding verbs (generate, chat) share: sampling flags, loading a run to decode with,
and turning flags plus the run's `[generate]` section into `SamplingSettings`.

Written once so both verbs take the same flags with the same meaning, and answer the same question
identically for the same seed (a test holds them to that).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from minigpt_cli.cli import common
from minigpt_cli.errors import UserError

if TYPE_CHECKING:
    import torch

    from minigpt_cli.config.schema import GenerateConfig, ResourcesConfig
    from minigpt_cli.engine.inference.generation import SamplingSettings
    from minigpt_cli.engine.runs.load import LoadedRun

TemperatureOpt = Annotated[
    float | None,
    typer.Option("--temperature", "-t", min=0.0, help="Sampling temperature; 0 is greedy."),
]
TopKOpt = Annotated[
    int | None,
    typer.Option("--top-k", min=0, help="Sample among the k most likely tokens; 0 = off."),
]
TopPOpt = Annotated[
    float | None,
    typer.Option("--top-p", help="Nucleus sampling: smallest set with this much probability."),
]
RepetitionPenaltyOpt = Annotated[
    float | None,
    typer.Option(
        "--repetition-penalty", help="Above 1 discourages tokens already in the text (CTRL)."
    ),
]
GreedyOpt = Annotated[bool, typer.Option("--greedy", help="Always take the most likely token.")]
DeviceOpt = Annotated[
    str, typer.Option("--device", help="auto | cpu | cuda | mps (auto: CUDA, MPS, then CPU).")
]
QuantizeOpt = Annotated[
    str | None,
    typer.Option(
        "--quantize",
        metavar="int8",
        help="Decode with int8 weights (per output channel): a quarter of the bytes a token reads.",
    ),
]
# The training verbs' own options, so every verb spells and documents the CPU caps identically.
MaxCpuOpt = common.MaxCpuOpt
ThreadsOpt = common.ThreadsOpt


def resources_with_flags(
    resources: ResourcesConfig, max_cpu: float | None, threads: int | None
) -> ResourcesConfig:
    """A run's `[resources]` with `--max-cpu` / `--threads` laid over it (None: not given).

    Checked here, before any work, with the schema's own rule for the cap (0 < percent <= 100);
    Typer already holds `--threads` to at least 1.
    """
    if max_cpu is not None and not 0 < max_cpu <= 100:
        raise UserError(
            f"--max-cpu {max_cpu:g}: must be above 0 and at most 100 (percent of all logical cores)"
        )
    given = {
        key: value
        for key, value in (("max_cpu", max_cpu), ("threads", threads))
        if value is not None
    }
    return resources.model_copy(update=given) if given else resources


def apply_decoding_caps(resources: ResourcesConfig, num_parameters: int) -> str:
    """Apply the CPU caps to a decoding process as the training verbs apply them (niceness,
    threads, the duty cycle of a fractional cap: `governor.apply_resources`), with one difference:
    without `--threads` the count is the one token-by-token decoding runs fastest at
    (`generation.decode_threads`: one thread for a small model, else the idle cores), within the
    cap. Returns the thread note."""
    from minigpt_cli.engine.hardware.monitor import allowed_threads
    from minigpt_cli.engine.inference.generation import decode_threads
    from minigpt_cli.engine.resources.governor import apply_resources

    if resources.threads is not None:
        return apply_resources(resources, resources.threads, "--threads")
    count = decode_threads(num_parameters, allowed_threads(resources.max_cpu))
    return apply_resources(resources, count, "the fastest for decoding a model this size")


def load_for_decoding(
    run: Path,
    device: str,
    *,
    max_cpu: float | None = None,
    threads: int | None = None,
    quantize: str | None = None,
) -> tuple[LoadedRun, torch.device]:
    """The run on the chosen device; on a CPU under the run's `[resources]` caps with the flags
    over them, decoding on the thread count it runs fastest at (`apply_decoding_caps`); with
    `quantize`, its projections in int8 (`engine.model.quantize`)."""
    from minigpt_cli.engine.hardware.device import resolve_device
    from minigpt_cli.engine.model.quantize import check_quantization, quantize_model
    from minigpt_cli.engine.runs.load import load_run

    check_quantization(quantize)
    target = resolve_device(device)
    loaded = load_run(run, str(target))
    resources = resources_with_flags(loaded.config.resources, max_cpu, threads)
    if target.type == "cpu":
        apply_decoding_caps(resources, loaded.model.num_parameters())
    if quantize is not None:
        quantize_model(loaded.model, quantize)
    return loaded, target


def sampling_settings(
    defaults: GenerateConfig,
    *,
    top_k: int | None,
    greedy: bool,
    stop_ids: tuple[int, ...],
    **flags: Any,
) -> SamplingSettings:
    """The run's `[generate]` defaults with every flag that was given laid over them (None = not
    given); `--top-k 0` switches top-k off."""
    from minigpt_cli.engine.inference.generation import SamplingSettings

    settings = SamplingSettings.from_config(
        defaults, **flags, top_k=top_k or None, greedy=greedy, stop_ids=stop_ids
    )
    if top_k == 0:
        settings = dataclasses.replace(settings, top_k=None)
    return settings
