"""Flags every training verb shares (a contract: README "Flags"), and turning them into a Config.

Defined once here so `pretrain`, and later `sft`, `dpo` and `rlhf`, spell and document each flag
identically. Only typer and the config package are imported at module level.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from minigpt_cli.errors import UserError

if TYPE_CHECKING:
    from minigpt_cli.config.schema import Config

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        metavar="FILE",
        help="TOML config file (over the preset, under flags and --set).",
    ),
]
PresetOpt = Annotated[
    str | None,
    typer.Option("--preset", help="tiny | small | medium | large (default: tiny)."),
]
DataOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--data",
        metavar="PATH",
        help="Training data: file or folder; repeat for several. Default: built-in.",
    ),
]
ValDataOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--val-data", metavar="PATH", help="Validation data (default: the last data.val_fraction)."
    ),
]
OutOpt = Annotated[
    Path | None,
    typer.Option("--out", metavar="DIR", help="Run directory (default: runs/<stage>-<preset>)."),
]
MaxStepsOpt = Annotated[int | None, typer.Option("--max-steps", help="Optimizer steps to train.")]
MaxTokensOpt = Annotated[
    int | None, typer.Option("--max-tokens", help="Stop after this many tokens.")
]
EpochsOpt = Annotated[float | None, typer.Option("--epochs", help="Passes over the training data.")]
MaxTimeOpt = Annotated[
    str | None, typer.Option("--max-time", help="Stop after this long: seconds, or 90s, 10m, 2h.")
]
MaxMemoryOpt = Annotated[
    str | None,
    typer.Option(
        "--max-memory",
        help="Memory cap: percent of RAM (70) or absolute (1.5GB, 6GiB, 512MB). Default 70.",
    ),
]
MaxCpuOpt = Annotated[
    float | None, typer.Option("--max-cpu", help="CPU cap, percent of all logical cores.")
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option("--threads", min=1, help="Torch threads (overrides what --max-cpu would choose)."),
]
NiceOpt = Annotated[
    int | None,
    typer.Option(
        "--nice", min=0, max=19, help="Lower the scheduling priority (0 normal, 19 lowest)."
    ),
]
ResumeOpt = Annotated[
    bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")
]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Delete the run in --out and start over.")
]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Random seed.")]
PrecisionOpt = Annotated[
    str | None, typer.Option("--precision", help="auto | fp32 | bf16 | fp16 (default: auto).")
]
DeviceOpt = Annotated[
    str | None, typer.Option("--device", help="auto | cpu | cuda | mps (default: auto).")
]
CompileOpt = Annotated[
    bool | None,
    typer.Option("--compile/--no-compile", help="Use torch.compile (falls back cleanly)."),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="KEY=VALUE",
        help="Override any config key: --set train.learning_rate=1e-3 (repeatable).",
    ),
]


# The shared flags a training verb passes on as config overrides (parameter name -> config key).
TRAINING_FLAGS = {
    "max_steps": "max_steps",
    "max_tokens": "max_tokens",
    "epochs": "epochs",
    "max_time": "max_time",
    "seed": "seed",
    "precision": "precision",
    "device": "device",
    "compile_model": "compile",
    "max_memory": "max_memory",
    "max_cpu": "max_cpu",
    "threads": "threads",
    "nice": "nice",
}


def training_flags(arguments: dict[str, Any], *stage_keys: str) -> dict[str, Any]:
    """The flag values a verb received (its `locals()`), keyed as `stage_overrides` wants: the
    shared training flags plus the verb's own `stage_keys` (e.g. "beta")."""
    picked = {key: arguments[name] for name, key in TRAINING_FLAGS.items() if name in arguments}
    picked.update({key: arguments[key] for key in stage_keys})
    return picked


def stage_overrides(stage: str, **flags: Any) -> dict[str, Any]:
    """Map flag values onto dotted config keys: training flags set the verb's own stage section."""
    resources = {"max_memory", "max_cpu", "threads", "nice"}
    overrides: dict[str, Any] = {}
    for name, value in flags.items():
        if value is None:
            continue
        section = "resources" if name in resources else stage
        overrides[f"{section}.{name}"] = value
    return overrides


def resolve_config(
    stage: str,
    *,
    preset: str | None,
    config_file: Path | None,
    overrides: dict[str, Any],
    sets: list[str] | None,
    run_dir: Path | None,
    resume: bool,
) -> Config:
    """The run's config: on --resume the saved config.toml is the base, else the preset."""
    from minigpt_cli.config.loader import load_config

    if resume and run_dir is not None and (run_dir / "config.toml").is_file():
        if config_file is not None:
            raise UserError(
                "--resume continues the run with its saved config.toml; drop --config "
                "(use flags or --set to change a value, e.g. a larger --max-steps)"
            )
        return load_config(None, run_dir / "config.toml", overrides, sets or [])
    return load_config(preset or "tiny", config_file, overrides, sets or [])


def default_run_dir(stage: str, preset: str | None) -> Path:
    return Path("runs") / f"{stage}-{preset or 'tiny'}"
