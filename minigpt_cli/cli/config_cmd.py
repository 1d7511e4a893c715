"""`minigpt config`: show the resolved configuration, validate a file, list the presets.

These verbs are how a user finds out what a run will actually use before spending an hour on it:
`show` prints exactly the TOML a run would write to its `config.toml` (and reads back unchanged),
`validate` checks a hand-written file with the same messages a training verb would give.
The loader (and pydantic behind it) is imported inside the verbs so `minigpt --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from minigpt_cli.config import PRESETS

if TYPE_CHECKING:
    from minigpt_cli.config.schema import Config

config_app = typer.Typer(
    name="config",
    help="Show the resolved configuration, check a config file, list the presets.",
    no_args_is_help=True,
    rich_markup_mode=None,
)


def _complete_preset(incomplete: str) -> list[str]:
    return [name for name in PRESETS if name.startswith(incomplete)]


PresetOption = Annotated[
    str,
    typer.Option(
        "--preset",
        "-p",
        help=f"Preset to start from: {', '.join(PRESETS)}.",
        autocompletion=_complete_preset,
    ),
]
ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="TOML file laid over the preset (any section, any key).",
    ),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        metavar="SECTION.KEY=VALUE",
        help="Override one key, e.g. --set train.learning_rate=1e-3 (repeatable; wins over all).",
    ),
]


def _format_count(count: int | None) -> str:
    if count is None:
        return "?"
    if count >= 1_000_000_000:
        return f"{count / 1e9:.2f}B"
    if count >= 1_000_000:
        return f"{count / 1e6:.1f}M"
    return f"{count / 1e3:.0f}K"


def _parameters(cfg: Config) -> int | None:
    """The model's parameter count from its shape, or None while params.py is unavailable."""
    try:
        from minigpt_cli.config.params import count_parameters
    except ImportError:
        return None
    return int(count_parameters(cfg.model, cfg.tokenizer.vocab_size))


def _summary(cfg: Config) -> str:
    """One line a person can check a config by: shape, size, and the training budget."""
    model, train = cfg.model, cfg.stage_train("pretrain")
    count = _parameters(cfg)
    size = f", {_format_count(count)} parameters" if count is not None else ""
    heads = f"{model.n_head} heads"
    if model.kv_heads != model.n_head:
        heads += f" ({model.kv_heads} kv)"
    budget = f"{train.max_steps} steps" if train.max_steps is not None else "no step limit"
    return (
        f"model: {model.n_layer} layers, d_model {model.n_embd}, {heads}, "
        f"vocab {cfg.tokenizer.vocab_size}, context {model.context_length}{size}; "
        f"train: lr {train.learning_rate:g}, batch {train.global_batch_size}"
        f" (micro {train.micro_batch_size}), {budget}, precision {train.precision}"
    )


@config_app.command("show")
def show(
    preset: PresetOption = "tiny",
    config: ConfigOption = None,
    sets: SetOption = None,
) -> None:
    """Print the fully resolved configuration as TOML (feed it back with --config)."""
    from minigpt_cli.config.loader import dump_config, load_config

    cfg = load_config(preset=preset, config_file=config, sets=sets or ())
    typer.echo(dump_config(cfg), nl=False)


@config_app.command("validate")
def validate(
    file: Annotated[Path, typer.Argument(help="The TOML file to check.", show_default=False)],
    preset: PresetOption = "tiny",
) -> None:
    """Check a config file (laid over --preset) and print a one-line summary, or the problems."""
    from minigpt_cli.config.loader import load_config

    cfg = load_config(preset=preset, config_file=file)
    typer.echo(f"{file}: ok")
    typer.echo(_summary(cfg))


@config_app.command("presets")
def presets() -> None:
    """List the built-in presets with their shape and parameter count."""
    from minigpt_cli.config.loader import preset_summary

    header = ("preset", "layers", "d_model", "heads", "vocab", "context", "parameters")
    rows: list[tuple[str, ...]] = [header]
    for name in PRESETS:
        info: dict[str, Any] = preset_summary(name)
        count = info["parameters"]
        exact = f"{count:,} ({_format_count(count)})" if count is not None else "?"
        rows.append(
            (
                name,
                str(info["n_layer"]),
                str(info["n_embd"]),
                str(info["n_head"]),
                str(info["vocab_size"]),
                str(info["context_length"]),
                exact,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        cells = [row[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        typer.echo("  ".join(cells).rstrip())


def register(app: typer.Typer) -> None:
    """Add the `config` group (show, validate, presets) to the top-level app."""
    app.add_typer(config_app, name="config")
