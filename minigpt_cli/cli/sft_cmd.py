"""`minigpt sft`: supervised fine-tuning of a run on conversations (built-in data by default)."""

from __future__ import annotations

from pathlib import Path
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

TextOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--text",
        help='Pretraining text to mix into the batches (.txt or {"text"} JSONL, repeatable; '
        "share: sft.text_mix). Default: the chain's own pretraining text.",
    ),
]


@common.training_verb(first=("from_run",), launchable=True)
def sft(
    flags: common.TrainingFlags,
    from_run: finetune.FromOpt = None,
    train_on_prompt: TrainOnPromptOpt = None,
    lora: finetune.LoraOpt = False,
    lora_r: finetune.LoraROpt = None,
    lora_alpha: finetune.LoraAlphaOpt = None,
    lora_dropout: finetune.LoraDropoutOpt = None,
    lora_targets: finetune.LoraTargetsOpt = None,
    merge: finetune.MergeOpt = False,
    text: TextOpt = None,
) -> None:
    """Fine-tune a run on conversations: loss on the assistant's replies, exact match per task.

    Data: {"instruction","input","output"} (+ "history"), {"prompt","completion"} or
    {"messages":[...]} JSONL; with no --data, the built-in bilingual instructions.
    """
    from minigpt_cli.engine.data.files import expand_paths, validate
    from minigpt_cli.engine.stages.sft import SftInputs, run_sft

    if text:
        validate(expand_paths(text), "pretrain")

    finetune.run_finetune(
        "sft",
        run_sft,
        flags,
        from_run=from_run,
        own={"train_on_prompt": train_on_prompt},
        lora=lora,
        lora_options=finetune.lora_options(lora_r, lora_alpha, lora_dropout, lora_targets),
        merge=merge,
        extra_inputs={"text": list(text or [])},
        inputs_type=SftInputs,
    )


def register(app: typer.Typer) -> None:
    """Add `sft` to the CLI."""
    app.command("sft")(sft)
