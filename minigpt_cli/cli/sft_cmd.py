"""`minigpt sft`: supervised fine-tuning of a run on conversations (built-in data by default)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from minigpt_cli.cli import common
from minigpt_cli.errors import UserError

FromOpt = Annotated[
    Path | None,
    typer.Option(
        "--from", help="The run to fine-tune (its shape, tokenizer and weights). Required."
    ),
]
TrainOnPromptOpt = Annotated[
    bool | None,
    typer.Option(
        "--train-on-prompt/--no-train-on-prompt",
        help="Also learn the system and user turns (default: assistant tokens only).",
    ),
]
LoraOpt = Annotated[
    bool, typer.Option("--lora", help="Train low-rank adapters only; the parent stays frozen.")
]
LoraROpt = Annotated[int | None, typer.Option("--lora-r", min=1, help="Adapter rank (default 8).")]
LoraAlphaOpt = Annotated[
    float | None, typer.Option("--lora-alpha", help="Adapter scale numerator (default 16).")
]
LoraDropoutOpt = Annotated[
    float | None, typer.Option("--lora-dropout", help="Dropout on the adapter input (default 0).")
]
LoraTargetsOpt = Annotated[
    str | None,
    typer.Option(
        "--lora-targets",
        help="Projections to adapt: attention, mlp, all, or names like q_proj,v_proj "
        "(default: attention).",
    ),
]
MergeOpt = Annotated[
    bool, typer.Option("--merge", help="LoRA: also write the merged model.safetensors at the end.")
]


def parent_preset(from_run: Path) -> str | None:
    """The preset the parent run was started with (the default for its children)."""
    from minigpt_cli.engine import checkpoint as ckpt

    try:
        return ckpt.read_state(from_run).get("sources", {}).get("preset")
    except UserError:
        return None


def resumed_parent(out: Path | None, stage: str, preset: str | None, resume: bool) -> Path | None:
    """On --resume without --from: the parent the run recorded (it cannot change mid-run)."""
    from minigpt_cli.engine import checkpoint as ckpt

    run_dir = out or common.default_run_dir(stage, preset)
    point = ckpt.find_resume_point(run_dir) if resume and run_dir.is_dir() else None
    if point is None:
        return None
    parent = ckpt.read_state(point).get("parent")
    return Path(parent) if parent else None


def check_parent(from_run: Path | None, stage: str) -> Path:
    """The --from run, which must exist and hold a trained model."""
    if from_run is None:
        raise UserError(
            f"{stage} needs --from RUN, the run to start from (e.g. runs/pretrain-tiny)"
        )
    if not (from_run / "config.toml").is_file():
        raise UserError(f"{from_run}: not a run directory (no config.toml); pass a finished run")
    return from_run


def sft(
    from_run: FromOpt = None,
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
    lora: LoraOpt = False,
    lora_r: LoraROpt = None,
    lora_alpha: LoraAlphaOpt = None,
    lora_dropout: LoraDropoutOpt = None,
    lora_targets: LoraTargetsOpt = None,
    merge: MergeOpt = False,
    sets: common.SetOpt = None,
) -> None:
    """Fine-tune a run on conversations: loss on the assistant's replies, exact match per task.

    Data: {"instruction","input","output"} (+ "history"), {"prompt","completion"} or
    {"messages":[...]} JSONL; with no --data, the built-in bilingual instructions.
    """
    from minigpt_cli.cli import training
    from minigpt_cli.config.loader import read_run_config
    from minigpt_cli.engine.data import expand_paths, validate
    from minigpt_cli.engine.sft import SftInputs, run_sft
    from minigpt_cli.engine.trainer import RunSpec

    if merge and not lora and not resume:
        raise UserError("--merge folds a LoRA adapter into the weights: use it with --lora")
    parent = check_parent(from_run or resumed_parent(out, "sft", preset, resume), "sft")
    preset = preset or parent_preset(parent)
    run_dir = out or common.default_run_dir("sft", preset)
    overrides = common.stage_overrides(
        "sft",
        max_steps=max_steps,
        max_tokens=max_tokens,
        epochs=epochs,
        max_time=max_time,
        seed=seed,
        precision=precision,
        device=device,
        compile=compile_model,
        train_on_prompt=train_on_prompt,
        max_memory=max_memory,
        max_cpu=max_cpu,
        threads=threads,
        nice=nice,
    )
    for key, value in {
        "r": lora_r,
        "alpha": lora_alpha,
        "dropout": lora_dropout,
        "targets": lora_targets,
    }.items():
        if value is not None:
            overrides[f"lora.{key}"] = value
    run = training.prepare(
        "sft",
        run_dir=run_dir,
        preset=preset,
        config_file=config_file,
        overrides=overrides,
        sets=sets,
        resume=resume,
        overwrite=overwrite,
    )
    config, sources = run.config, run.saved_sources
    if not resume:
        parent_config = read_run_config(parent)
        config.model = parent_config.model
        config.tokenizer = parent_config.tokenizer
    inputs = SftInputs(
        from_run=parent,
        data=list(data or [Path(p) for p in sources.get("data", [])]),
        val_data=list(val_data or [Path(p) for p in sources.get("val_data", [])]),
        lora=lora or bool(sources.get("lora")),
        merge=merge or bool(sources.get("merge")),
    )
    for paths in (inputs.data, inputs.val_data):
        if paths:
            validate(expand_paths(paths), "sft")
    spec = RunSpec(
        run_dir=run_dir,
        resume=resume,
        parent=str(parent),
        chat=True,
        sources={
            "data": [str(p) for p in inputs.data],
            "val_data": [str(p) for p in inputs.val_data],
            "from_run": str(parent),
            "preset": preset or "tiny",
            "lora": inputs.lora,
            "merge": inputs.merge,
        },
    )
    training.execute(
        run, spec, lambda cfg, run_spec, on_event: run_sft(cfg, run_spec, inputs, on_event)
    )


def register(app: typer.Typer) -> None:
    """Add `sft` to the CLI."""
    app.command("sft")(sft)
