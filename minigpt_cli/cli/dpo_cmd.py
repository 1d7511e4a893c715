"""`minigpt dpo`: direct preference optimisation of a run on chosen/rejected pairs."""

from __future__ import annotations

from typing import Annotated

import typer

from minigpt_cli.cli import common, finetune

BetaOpt = Annotated[
    float | None,
    typer.Option("--beta", help="How far the policy may move from the reference (default 0.1)."),
]
LabelSmoothingOpt = Annotated[
    float | None,
    typer.Option(
        "--label-smoothing", help="Assumed share of pairs labelled the wrong way (default 0)."
    ),
]


def dpo(
    from_run: finetune.FromOpt = None,
    preset: common.PresetOpt = None,
    config_file: common.ConfigOpt = None,
    data: common.DataOpt = None,
    val_data: common.ValDataOpt = None,
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
    beta: BetaOpt = None,
    label_smoothing: LabelSmoothingOpt = None,
    lora: finetune.LoraOpt = False,
    lora_r: finetune.LoraROpt = None,
    lora_alpha: finetune.LoraAlphaOpt = None,
    lora_dropout: finetune.LoraDropoutOpt = None,
    lora_targets: finetune.LoraTargetsOpt = None,
    merge: finetune.MergeOpt = False,
    sets: common.SetOpt = None,
) -> None:
    """Preference-tune a run with DPO: prefer the chosen reply over the rejected one.

    Data: {"prompt","chosen","rejected"} JSONL (a "Human: ... Assistant:" prompt is split into
    turns); with no --data, the built-in pairs. The reference is the starting model, frozen.
    """
    from minigpt_cli.engine.stages.dpo import run_dpo

    arguments = dict(locals())  # the flag values, for common.training_flags

    finetune.run_finetune(
        "dpo",
        run_dpo,
        from_run=from_run,
        preset=preset,
        config_file=config_file,
        data=data,
        val_data=val_data,
        out=out,
        flags=common.training_flags(arguments, "beta", "label_smoothing"),
        lora=lora,
        lora_options={
            "r": lora_r,
            "alpha": lora_alpha,
            "dropout": lora_dropout,
            "targets": lora_targets,
        },
        merge=merge,
        resume=resume,
        overwrite=overwrite,
        sets=sets,
    )


def register(app: typer.Typer) -> None:
    """Add `dpo` to the CLI."""
    app.command("dpo")(dpo)
