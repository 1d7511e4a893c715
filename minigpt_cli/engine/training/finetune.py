"""What every fine-tuning run (SFT, DPO, RLHF) starts from and ends with, around its own stage.

A fine-tuning verb builds its data and its `Stage`; the rest is the same for all of them and is
written here once: the device and precision (`resolve_hardware`, pretraining's too), the starting
policy from the parent run with or without LoRA (`start_finetune`), the records split into
training and validation (`train_and_val_records`), and training to the end with the one Trainer,
merging the adapter on --merge (`finish_finetune`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minigpt_cli.config.schema import Config, LoraConfig, TrainConfig
from minigpt_cli.engine.core.events import EventCallback, emit
from minigpt_cli.engine.core.seeding import seed_everything
from minigpt_cli.engine.data.stage_records import stage_records
from minigpt_cli.engine.data.tokenizer import Tokenizer
from minigpt_cli.engine.hardware.device import (
    PrecisionDecision,
    apply_matmul_precision,
    resolve_device,
    resolve_precision,
)
from minigpt_cli.engine.model import lora as lora_lib
from minigpt_cli.engine.model.gpt import GPT
from minigpt_cli.engine.model.heads import PolicyWithValue, policy_of
from minigpt_cli.engine.runs.files import MODEL_FILE, save_tensors
from minigpt_cli.engine.runs.load import load_run
from minigpt_cli.engine.training import distributed
from minigpt_cli.engine.training.run_spec import RunSpec
from minigpt_cli.engine.training.stage import Stage
from minigpt_cli.engine.training.trainer import Trainer


@dataclass
class FinetuneInputs:
    """What a fine-tuning verb starts from: the parent run, data files (none = built-in), LoRA."""

    from_run: Path
    data: list[Path]
    val_data: list[Path]
    lora: bool = False
    merge: bool = False


def resolve_hardware(train: TrainConfig) -> tuple[torch.device, PrecisionDecision]:
    """The device and precision a stage trains with (its `device` and `precision` settings), with
    the matmul precision applied: what every training run decides before anything else."""
    device = distributed.device_for_rank(resolve_device(train.device))
    precision = resolve_precision(train.precision, device)
    apply_matmul_precision(precision)
    return device, precision


def train_and_val_records(kind: str, inputs: FinetuneInputs, config: Config) -> tuple[list, list]:
    """A fine-tuning run's (train, val) records of `kind`: with `--val-data`, every `--data`
    record trains and the val files validate; else a fixed share of `--data` (or the built-in
    held-out split) validates."""
    size, fraction = config.data.builtin_size, config.data.val_fraction
    data = inputs.data or None
    if inputs.val_data:
        train = stage_records(kind, data, "all" if data else "train", size, fraction)
        return train, stage_records(kind, inputs.val_data, "all", size, fraction)
    return stage_records(kind, data, "train", size, fraction), stage_records(
        kind, data, "val", size, fraction
    )


def prepare_model(
    from_run: Path,
    lora: bool,
    settings: LoraConfig,
    seed: int,
    on_event: EventCallback | None,
    stage: str,
) -> tuple[GPT, Tokenizer]:
    """The starting policy: the parent's weights, with adapters when asked (or inherited).

    A LoRA parent keeps training its own adapter (README: a child of a LoRA run trains the same
    adapter further); a full parent gets fresh adapters with `--lora`, or trains every weight.
    Rebuilt the same way on --resume, before the Trainer restores the checkpoint over it.
    """
    loaded = load_run(from_run)
    model = loaded.model
    seed_everything(seed)  # adapter initialisation draws from the seeded generator
    if lora_lib.has_lora(model):
        trainable = lora_lib.mark_only_lora_trainable(model)
        emit(
            on_event,
            "note",
            stage,
            message=f"continuing the parent's LoRA adapter ({trainable:,} trainable parameters)",
        )
    elif lora:
        trainable = lora_lib.apply_lora(model, settings)
        total = sum(p.numel() for p in model.parameters())
        emit(
            on_event,
            "note",
            stage,
            message=f"LoRA r={settings.r} alpha={settings.alpha:g} on "
            f"{', '.join(settings.targets)}: {trainable:,} trainable parameters "
            f"({100 * trainable / total:.1f}% of {total:,})",
        )
    else:
        model.requires_grad_(True)
    model.train()
    return model, loaded.tokenizer


def trainable_parameters(model: torch.nn.Module) -> int:
    """Parameters the optimizer updates (LoRA: the adapters only), for the memory estimate."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def finish_lora_run(model: GPT, run_dir: Path, merge: bool) -> str | None:
    """After training: with `--merge`, also write the merged weights as `model.safetensors`."""
    if not (merge and lora_lib.has_lora(model)):
        return None
    merged = copy.deepcopy(model)
    lora_lib.merge_lora(merged)
    save_tensors(run_dir / MODEL_FILE, merged.export_state_dict(), {"format": "minigpt"})
    return f"merged the adapter into {run_dir / MODEL_FILE}"


@dataclass
class FinetuneSetup:
    """What every fine-tuning run starts from: its hyperparameters, device and starting policy."""

    train: TrainConfig  # of the stage
    device: torch.device
    precision: PrecisionDecision
    model: GPT | PolicyWithValue  # the policy; PPO (run_rlhf) puts it in a PolicyWithValue
    tokenizer: Tokenizer


def start_finetune(
    config: Config,
    spec: RunSpec,
    inputs: FinetuneInputs,
    stage: str,
    on_event: EventCallback | None,
) -> FinetuneSetup:
    """Device, precision and the starting policy on it, its tokenizer copied into the run."""
    train = config.stage_train(stage)
    device, precision = resolve_hardware(train)
    model, tokenizer = prepare_model(
        inputs.from_run, inputs.lora, config.lora, train.seed, on_event, stage
    )
    settings = lora_lib.lora_settings(model)  # None: no adapters
    if settings is not None:
        config.lora = settings
        if spec.resume and distributed.is_writer():
            # A merged file from an earlier finish would shadow the newer adapter.
            (spec.run_dir / MODEL_FILE).unlink(missing_ok=True)
    if distributed.is_writer():  # under torchrun, rank 0 alone writes the run directory
        tokenizer.save(spec.run_dir)
    model.to(device)
    return FinetuneSetup(train, device, precision, model, tokenizer)


def finish_finetune(
    config: Config,
    spec: RunSpec,
    inputs: FinetuneInputs,
    setup: FinetuneSetup,
    stage: Stage,
    micro_batch: int,
    on_event: EventCallback | None,
) -> dict[str, Any]:
    """Train `stage` to the end with the one Trainer; with --merge, write the merged weights.

    `stage` evaluates in batches of at most `micro_batch` (its `eval_batch`, set by the caller),
    which is what the memory plan assumed for validation.
    """
    trainer = Trainer(
        config,
        stage,
        setup.model,
        spec,
        device=setup.device,
        precision=setup.precision,
        on_event=on_event,
        vocab_size=setup.tokenizer.vocab_size,
        micro_batch_size=micro_batch,
    )
    summary = trainer.fit()
    if not distributed.is_writer():
        return summary
    note = finish_lora_run(policy_of(setup.model), spec.run_dir, inputs.merge)
    if note:
        emit(on_event, "note", stage.name, message=note)
    return summary
