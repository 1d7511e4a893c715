"""What the decoding verbs (generate, chat) share: sampling flags, loading a run to decode with,
and turning flags plus the run's `[generate]` section into `SamplingSettings`.

Written once so both verbs take the same flags with the same meaning, and answer the same question
identically for the same seed (a test holds them to that).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    import torch

    from minigpt_cli.config.schema import GenerateConfig
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


def load_for_decoding(run: Path, device: str) -> tuple[LoadedRun, torch.device]:
    """The run on the chosen device; on a CPU with the thread count decoding runs fastest at
    (small models decode faster on fewer threads), within the run's `[resources]` cap."""
    import torch

    from minigpt_cli.engine.hardware.device import resolve_device
    from minigpt_cli.engine.inference.generation import decode_threads
    from minigpt_cli.engine.runs.load import load_run

    target = resolve_device(device)
    loaded = load_run(run, str(target))
    resources = loaded.config.resources
    if target.type == "cpu":
        cap = max(1, round((os.cpu_count() or 1) * resources.max_cpu / 100))
        torch.set_num_threads(
            resources.threads or decode_threads(loaded.model.num_parameters(), cap)
        )
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
