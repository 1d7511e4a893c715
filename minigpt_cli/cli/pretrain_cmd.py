"""`minigpt pretrain`: train a tokenizer and a model from raw text (built-in text by default)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from minigpt_cli.cli import common

TokenizerOpt = Annotated[
    Path | None,
    typer.Option("--tokenizer", help="Use this tokenizer (folder or run) instead of training one."),
]
FromOpt = Annotated[
    Path | None,
    typer.Option("--from", help="Continue pretraining this run (its shape, tokenizer, weights)."),
]


@common.training_verb(launchable=True)
def pretrain(
    flags: common.TrainingFlags,
    tokenizer: TokenizerOpt = None,
    from_run: FromOpt = None,
) -> None:
    """Pretrain a GPT on text: tokenizer, encoding, training, checkpoints, validation bits/byte.

    With no arguments it trains the tiny preset on the built-in English+Chinese corpus.
    """
    from minigpt_cli.cli import training
    from minigpt_cli.config.loader import read_run_config
    from minigpt_cli.engine.data.files import expand_paths, validate
    from minigpt_cli.engine.data.shards import is_shard_folder
    from minigpt_cli.engine.stages.pretrain import PretrainInputs, run_pretrain
    from minigpt_cli.engine.training.run_spec import RunSpec

    preset, resume = flags.preset, flags.resume
    run_dir = flags.out or common.default_run_dir("pretrain", preset)
    run = training.prepare(
        "pretrain",
        run_dir=run_dir,
        preset=preset,
        config_file=flags.config_file,
        overrides=flags.overrides("pretrain"),
        sets=flags.sets,
        resume=resume,
        overwrite=flags.overwrite,
    )
    config, sources = run.config, run.saved_sources
    inputs = PretrainInputs(
        data=list(flags.data or [Path(p) for p in sources.get("data", [])]),
        val_data=list(flags.val_data or [Path(p) for p in sources.get("val_data", [])]),
        tokenizer=tokenizer,
        from_run=from_run or (Path(sources["from_run"]) if sources.get("from_run") else None),
    )
    if inputs.from_run is not None and not resume:
        parent = read_run_config(inputs.from_run)
        config.model = parent.model
        config.tokenizer = parent.tokenizer
    for paths in (inputs.data, inputs.val_data):
        if paths and not (len(paths) == 1 and is_shard_folder(paths[0])):
            validate(expand_paths(paths), "pretrain")
    spec = RunSpec(
        run_dir=run_dir,
        resume=resume,
        parent=str(inputs.from_run) if inputs.from_run else None,
        sources={
            "data": [str(p) for p in inputs.data],
            "val_data": [str(p) for p in inputs.val_data],
            "from_run": str(inputs.from_run) if inputs.from_run else None,
            "tokenizer": str(inputs.tokenizer) if inputs.tokenizer else None,
            "preset": preset or sources.get("preset") or "tiny",
        },
    )
    training.execute(
        run, spec, lambda cfg, run_spec, on_event: run_pretrain(cfg, run_spec, inputs, on_event)
    )


def register(app: typer.Typer) -> None:
    """Add `pretrain` to the CLI."""
    app.command("pretrain")(pretrain)
