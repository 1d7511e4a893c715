"""`minigpt sft`: supervised fine-tuning of a run on conversations (built-in data by default)."""

from __future__ import annotations

from typing import Annotated

import typer

from minigpt_cli.cli import common, finetune

TrainOnPromptOpt = Annotated[
    bool | None,
    typer.Option(
        "--train-on-prompt/--no-train-on-prompt",
        help="Also learn the system and user turns (default: assistant tokens only).",
    ),
]


def sft(
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
    train_on_prompt: TrainOnPromptOpt = None,
    lora: finetune.LoraOpt = False,
    lora_r: finetune.LoraROpt = None,
    lora_alpha: finetune.LoraAlphaOpt = None,
    lora_dropout: finetune.LoraDropoutOpt = None,
    lora_targets: finetune.LoraTargetsOpt = None,
    merge: finetune.MergeOpt = False,
    sets: common.SetOpt = None,
) -> None:
    """Fine-tune a run on conversations: loss on the assistant's replies, exact match per task.

    Data: {"instruction","input","output"} (+ "history"), {"prompt","completion"} or
    {"messages":[...]} JSONL; with no --data, the built-in bilingual instructions.
    """
    from minigpt_cli.engine.stages.sft import run_sft

    arguments = dict(locals())  # the flag values, for common.training_flags

    finetune.run_finetune(
        "sft",
        run_sft,
        from_run=from_run,
        preset=preset,
        config_file=config_file,
        data=data,
        val_data=val_data,
        out=out,
        flags=common.training_flags(arguments, "train_on_prompt"),
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
    """Add `sft` to the CLI."""
    app.command("sft")(sft)
