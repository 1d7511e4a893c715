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


def pretrain(
    preset: common.PresetOpt = None,
    config_file: common.ConfigOpt = None,
    data: common.DataOpt = None,
    val_data: common.ValDataOpt = None,
    tokenizer: TokenizerOpt = None,
    from_run: FromOpt = None,
    out: common.OutOpt = None,
    max_steps: common.MaxStepsOpt = None,
    max_tokens: common.MaxTokensOpt = None,
    epochs: common.EpochsOpt = None,
    max_time: common.MaxTimeOpt = None,
    max_memory: common.MaxMemoryOpt = None,
    max_cpu: common.MaxCpuOpt = None,
    threads: common.ThreadsOpt = None,
    nice: common.NiceOpt = None,
    resume: common.ResumeOpt = False,
    overwrite: common.OverwriteOpt = False,
    seed: common.SeedOpt = None,
    precision: common.PrecisionOpt = None,
    device: common.DeviceOpt = None,
    compile_model: common.CompileOpt = None,
    sets: common.SetOpt = None,
) -> None:
    """Pretrain a GPT on text: tokenizer, encoding, training, checkpoints, validation bits/byte.

    With no arguments it trains the tiny preset on the built-in English+Chinese corpus.
    """
    from minigpt_cli.cli import training
    from minigpt_cli.config.loader import read_run_config
    from minigpt_cli.engine.data.files import expand_paths, validate
    from minigpt_cli.engine.data.shards import is_shard_folder
    from minigpt_cli.engine.stages.pretrain import PretrainInputs, run_pretrain
    from minigpt_cli.engine.training.trainer import RunSpec

    run_dir = out or common.default_run_dir("pretrain", preset)
    overrides = common.stage_overrides("pretrain", **common.training_flags(locals()))
    run = training.prepare(
        "pretrain",
        run_dir=run_dir,
        preset=preset,
        config_file=config_file,
        overrides=overrides,
        sets=sets,
        resume=resume,
        overwrite=overwrite,
    )
    config, sources = run.config, run.saved_sources
    inputs = PretrainInputs(
        data=list(data or [Path(p) for p in sources.get("data", [])]),
        val_data=list(val_data or [Path(p) for p in sources.get("val_data", [])]),
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
            "preset": preset or sources.get("preset") or "tiny",
        },
    )
    training.execute(
        run, spec, lambda cfg, run_spec, on_event: run_pretrain(cfg, run_spec, inputs, on_event)
    )


def register(app: typer.Typer) -> None:
    """Add `pretrain` to the CLI."""
    app.command("pretrain")(pretrain)
