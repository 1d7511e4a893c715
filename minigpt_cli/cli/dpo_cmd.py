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


@common.training_verb(first=("from_run",), launchable=True)
def dpo(
    flags: common.TrainingFlags,
    from_run: finetune.FromOpt = None,
    beta: BetaOpt = None,
    label_smoothing: LabelSmoothingOpt = None,
    lora: finetune.LoraOpt = False,
    lora_r: finetune.LoraROpt = None,
    lora_alpha: finetune.LoraAlphaOpt = None,
    lora_dropout: finetune.LoraDropoutOpt = None,
    lora_targets: finetune.LoraTargetsOpt = None,
    merge: finetune.MergeOpt = False,
) -> None:
    """Preference-tune a run with DPO: prefer the chosen reply over the rejected one.

    Data: {"prompt","chosen","rejected"} JSONL (a "Human: ... Assistant:" prompt is split into
    turns); with no --data, the built-in pairs. The reference is the starting model, frozen.
    """
    from minigpt_cli.engine.stages.dpo import run_dpo

    finetune.run_finetune(
        "dpo",
        run_dpo,
        flags,
        from_run=from_run,
        own={"beta": beta, "label_smoothing": label_smoothing},
        lora=lora,
        lora_options=finetune.lora_options(lora_r, lora_alpha, lora_dropout, lora_targets),
        merge=merge,
    )


def register(app: typer.Typer) -> None:
    """Add `dpo` to the CLI."""
    app.command("dpo")(dpo)
