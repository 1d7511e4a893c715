"""What sft, dpo and rlhf share: starting from a parent run, LoRA flags, the verb body.

Each verb lists its own flags (Typer reads them from the signature) and hands them here, so the
parent handling, resume, LoRA options and run-directory contract are written once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from minigpt_cli.cli import common
from minigpt_cli.errors import UserError

if TYPE_CHECKING:
    from minigpt_cli.engine.training.finetune import FinetuneInputs

FromOpt = Annotated[
    Path | None,
    typer.Option(
        "--from", help="The run to start from (its shape, tokenizer and weights). Required."
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


def lora_options(
    r: int | None, alpha: float | None, dropout: float | None, targets: str | None
) -> dict[str, Any]:
    """The --lora-* flags as `[lora]` config keys (None: not given)."""
    return {"r": r, "alpha": alpha, "dropout": dropout, "targets": targets}


def parent_preset(from_run: Path) -> str | None:
    """The preset the parent run was started with (the default for its children)."""
    from minigpt_cli.engine.runs import checkpoint as ckpt

    try:
        return ckpt.read_state(from_run).get("sources", {}).get("preset")
    except UserError:
        return None


def resumed_parent(
    run_dir: Path, stage: str, resume: bool, sub_run: str | None = None
) -> Path | None:
    """On --resume without --from: the parent the run recorded (it cannot change mid-run).

    A run with nothing to resume gets that answer here, not a request for --from.
    """
    from minigpt_cli.cli import training

    if not resume:
        return None
    point = training.find_resume(run_dir, stage, sub_run)
    if point is None:
        raise training.nothing_to_resume(run_dir)
    return Path(point.parent) if point.parent else None


def check_parent(from_run: Path | None, stage: str) -> Path:
    """The --from run, which must exist and hold a trained model."""
    if from_run is None:
        raise UserError(
            f"{stage} needs --from RUN, the run to start from (e.g. runs/pretrain-tiny)"
        )
    from minigpt_cli.config.loader import RUN_CONFIG_FILE

    if not (from_run / RUN_CONFIG_FILE).is_file():
        raise UserError(
            f"{from_run}: not a run directory (no {RUN_CONFIG_FILE}); pass a finished run"
        )
    return from_run


def run_finetune(
    stage: str,
    engine: Callable[..., dict[str, Any]],
    flags: common.TrainingFlags,
    *,
    from_run: Path | None,
    own: dict[str, Any],
    lora: bool,
    lora_options: dict[str, Any],
    merge: bool,
    run_name: str | None = None,
    extra_inputs: dict[str, Any] | None = None,
    inputs_type: type[FinetuneInputs] | None = None,
    sub_run: str | None = None,
) -> None:
    """The body of `sft`/`dpo`/`rlhf`: resolve parent and config, validate data, train.

    `flags` are the shared flags and `own` the verb's own stage flags (None = not given);
    `engine(config, spec, inputs, on_event)` trains. `run_name` names the default run directory
    (`runs/<name>-<preset>`, default the stage); `extra_inputs` are further fields of
    `inputs_type` (a `FinetuneInputs` with the verb's own inputs, e.g. rlhf's `RlhfInputs`;
    default `FinetuneInputs`). `sub_run` names the folder of a first phase that checkpoints on
    its own (rlhf: the reward model), which a --resume may continue (`training.find_resume`).
    """
    from minigpt_cli.cli import training
    from minigpt_cli.config.loader import read_run_config
    from minigpt_cli.engine.data.files import expand_paths, validate
    from minigpt_cli.engine.training.finetune import FinetuneInputs
    from minigpt_cli.engine.training.run_spec import RunSpec

    name, resume = run_name or stage, flags.resume
    if merge and not lora and not resume:
        raise UserError("--merge folds a LoRA adapter into the weights: use it with --lora")
    resumed_dir = flags.out or common.default_run_dir(name, flags.preset)
    parent = check_parent(from_run or resumed_parent(resumed_dir, stage, resume, sub_run), stage)
    preset = flags.preset or parent_preset(parent)
    run_dir = flags.out or common.default_run_dir(name, preset)
    overrides = flags.overrides(stage, **own)
    overrides.update({f"lora.{k}": v for k, v in lora_options.items() if v is not None})
    run = training.prepare(
        stage,
        run_dir=run_dir,
        preset=preset,
        config_file=flags.config_file,
        overrides=overrides,
        sets=flags.sets,
        resume=resume,
        overwrite=flags.overwrite,
        sub_run=sub_run,
    )
    config, sources = run.config, run.saved_sources
    extra = dict(extra_inputs or {})
    for key, value in extra.items():  # on --resume, what the run was started with
        saved = sources.get(key)
        if not value and saved:
            extra[key] = [Path(p) for p in saved] if isinstance(saved, list) else Path(saved)
    if not resume:
        parent_config = read_run_config(parent)
        config.model = parent_config.model
        config.tokenizer = parent_config.tokenizer
    inputs = (inputs_type or FinetuneInputs)(
        from_run=parent,
        data=list(flags.data or [Path(p) for p in sources.get("data", [])]),
        val_data=list(flags.val_data or [Path(p) for p in sources.get("val_data", [])]),
        lora=lora or bool(sources.get("lora")),
        merge=merge or bool(sources.get("merge")),
        **extra,
    )
    for paths in (inputs.data, inputs.val_data):
        if paths:
            validate(expand_paths(paths), stage)
    spec = RunSpec(
        run_dir=run_dir,
        resume=run.resumes_own_checkpoint,
        parent=str(parent),
        chat=True,
        sources={
            "data": [str(p) for p in inputs.data],
            "val_data": [str(p) for p in inputs.val_data],
            "from_run": str(parent),
            "preset": preset or "tiny",
            "lora": inputs.lora,
            "merge": inputs.merge,
            **{
                key: [str(p) for p in value] if isinstance(value, list) else str(value)
                for key, value in extra.items()
                if value
            },
        },
    )
    training.execute(
        run, spec, lambda cfg, run_spec, on_event: engine(cfg, run_spec, inputs, on_event)
    )
