"""Flags every training verb shares (a contract: README "Flags"), and turning them into a Config.

Defined once here so `pretrain`, `sft`, `dpo` and `rlhf` spell and document each flag identically:
each verb declares only its own flags, and `training_verb` adds the shared ones to its signature.
Only typer and the config package are imported at module level.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from minigpt_cli.errors import UserError, describe_os_error

if TYPE_CHECKING:
    from minigpt_cli.config.schema import Config
    from minigpt_cli.engine.core.io import WritableFolder

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


COMMAND_STARTED: list[tuple[float, float]] = []
"""(`time.perf_counter()`, `time.time()`) when the console script's `main` began (empty when a
verb is called in process, e.g. by a test): `quickstart`'s clock and time budget count what the
user waits for, the interpreter's start and torch's import included."""

# The flags every training verb takes, in --help order around the verb's own (name -> type).
# Each verb declares only its own flags; `training_verb` adds these to its signature for Typer.
SHARED_HEAD = {
    "preset": PresetOpt,
    "config_file": ConfigOpt,
    "data": DataOpt,
    "val_data": ValDataOpt,
    "out": OutOpt,
}
SHARED_TAIL = {
    "max_steps": MaxStepsOpt,
    "max_tokens": MaxTokensOpt,
    "epochs": EpochsOpt,
    "max_time": MaxTimeOpt,
    "max_memory": MaxMemoryOpt,
    "max_cpu": MaxCpuOpt,
    "threads": ThreadsOpt,
    "nice": NiceOpt,
    "resume": ResumeOpt,
    "overwrite": OverwriteOpt,
    "seed": SeedOpt,
    "precision": PrecisionOpt,
    "device": DeviceOpt,
    "compile_model": CompileOpt,
    "sets": SetOpt,
}
_SWITCHES = {"resume", "overwrite"}  # default False; every other shared flag defaults to None
# The shared flags that become config overrides of the verb's stage (parameter -> config key).
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


@dataclass(frozen=True)
class TrainingFlags:
    """What a training verb was given of the shared flags (None: not given)."""

    preset: str | None
    config_file: Path | None
    data: list[Path] | None
    val_data: list[Path] | None
    out: Path | None
    resume: bool
    overwrite: bool
    sets: list[str] | None
    knobs: dict[str, Any]  # the TRAINING_FLAGS values, by parameter name

    def overrides(self, stage: str, **own: Any) -> dict[str, Any]:
        """Dotted config overrides: the shared knobs plus the verb's own flags (`own`, by the
        config key of `stage`'s section)."""
        values = {TRAINING_FLAGS[name]: value for name, value in self.knobs.items()}
        return stage_overrides(stage, **values, **own)


def training_verb(
    omit: tuple[str, ...] = (),
    replace: dict[str, Any] | None = None,
    first: tuple[str, ...] = (),
    launchable: bool = False,
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Give a training verb the shared flags: its signature, as Typer reads it, becomes the shared
    head, the verb's own parameters, then the shared tail; the verb receives the shared values as
    its first argument, a `TrainingFlags`. `omit` drops shared flags the verb does not take;
    `replace` gives one its own option (e.g. rlhf's --max-steps counts iterations); the verb's
    parameters named in `first` lead its --help (a fine-tuning verb's --from). A `launchable`
    verb also takes the torchrun flags (`launch.LAUNCH_OPTIONS`: --nproc and the machines') and,
    when they ask for it, runs again under torchrun before the verb's body does anything."""
    from minigpt_cli.cli import launch

    replaced = replace or {}
    launch_flags: dict[str, Any] = launch.LAUNCH_OPTIONS if launchable else {}

    def shared(names: dict[str, Any]) -> list[inspect.Parameter]:
        return [
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=False if name in _SWITCHES else None,
                annotation=replaced.get(name, annotation),
            )
            for name, annotation in names.items()
            if name not in omit
        ]

    def decorate(verb: Callable[..., None]) -> Callable[..., None]:
        own = list(inspect.signature(verb, eval_str=True).parameters.values())[1:]
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
        lead = [p for p in own if p.name in first]
        rest = [p for p in own if p.name not in first]
        parameters = lead + shared(SHARED_HEAD) + rest + shared(launch_flags | SHARED_TAIL)
        shared_names = (set(SHARED_HEAD) | set(SHARED_TAIL)) - set(omit)

        signature = inspect.Signature(parameters)

        @functools.wraps(verb)
        def command(**given: Any) -> None:
            # Typer passes every flag; a caller in Python (quickstart) may pass only some.
            bound = signature.bind(**given)
            bound.apply_defaults()
            given = dict(bound.arguments)
            launch.relaunch_from_flags({name: given.pop(name) for name in launch_flags})
            values = {name: given.pop(name) for name in shared_names}
            flags = TrainingFlags(
                **{name: values.pop(name, None) for name in (*SHARED_HEAD, "sets")},
                resume=bool(values.pop("resume")),
                overwrite=bool(values.pop("overwrite")),
                knobs=values,
            )
            verb(flags, **given)

        # Typer reads `__signature__`; functions have no such declared attribute for mypy.
        command.__signature__ = signature  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in parameters}
        return command

    return decorate


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
    from minigpt_cli.config.loader import RUN_CONFIG_FILE, load_config, saved_run_defaults

    if resume and run_dir is not None and (run_dir / RUN_CONFIG_FILE).is_file():
        if config_file is not None:
            raise UserError(
                "--resume continues the run with its saved config.toml; drop --config "
                "(use flags or --set to change a value, e.g. a larger --max-steps)"
            )
        saved = run_dir / RUN_CONFIG_FILE
        given = {key: value for key, value in overrides.items() if value is not None}
        return load_config(None, saved, {**saved_run_defaults(saved), **given}, sets or [])
    return load_config(preset or "tiny", config_file, overrides, sets or [])


def check_output(folder: Path) -> WritableFolder:
    """Refuse with one line (exit 2) before any work when nothing can be written in `folder`
    (a path under a file, no permission, a read-only filesystem); the folder is not created."""
    from minigpt_cli.engine.core.io import check_writable

    try:
        return check_writable(folder)
    except OSError as error:
        raise UserError(f"cannot write the output: {describe_os_error(error)}") from error


def default_run_dir(stage: str, preset: str | None) -> Path:
    return Path("runs") / f"{stage}-{preset or 'tiny'}"
