"""Opening a run for use: its weights, tokenizer and config, and the chain of parents it needs.

The one place that turns a run directory into a model: `load_run` for generate/chat/eval and as
the parent of a new stage, `language_model_files`/`load_language_model_files` for what the Trainer
saves and resumes, and `find_parent`/`parent_run`/`ancestors` for every walk up the parent chain
(a LoRA run's base weights, eval's references and built-in held-out text); `load_reward_model`
opens an RLHF run's reward model. It sits above both
`runs.checkpoint` (state, snapshots) and `model.lora` (the adapter maths), so neither of those
needs the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from minigpt_cli.config.loader import read_run_config
from minigpt_cli.config.schema import Config, LoraConfig
from minigpt_cli.engine.data.tokenizer import Tokenizer
from minigpt_cli.engine.model.gpt import GPT
from minigpt_cli.engine.model.heads import SCORE_WEIGHT, RewardModel
from minigpt_cli.engine.model.lora import (
    adapter_metadata,
    adapter_state_dict,
    apply_lora,
    has_lora,
    load_adapter_state_dict,
    lora_settings,
    settings_from_metadata,
)
from minigpt_cli.engine.runs.checkpoint import read_state
from minigpt_cli.engine.runs.files import (
    ADAPTER_FILE,
    MODEL_FILE,
    STATE_FILE,
    load_tensors,
    read_metadata,
)
from minigpt_cli.errors import UserError


@dataclass
class LoadedRun:
    """A trained run, ready for generate/chat/eval or as the parent of a new stage."""

    run_dir: Path
    model: GPT
    tokenizer: Tokenizer
    config: Config
    state: dict[str, Any]


def check_weight_shapes(
    path: Path, found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]
) -> None:
    """Refuse, in one line, a weights file whose names or shapes do not match the run's
    config.toml: the one rule for every reader of a run's weights (loading, exporting)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise UserError(f"{path}: weights do not match the run's config.toml ({detail})")
    for name, shape in found.items():
        if shape != expected[name]:
            raise UserError(
                f"{path}: weights do not match the run's config.toml ({name} has shape "
                f"{shape}, the config makes {expected[name]})"
            )


def load_model_weights(model: GPT | RewardModel, path: Path) -> None:
    """Load weights into `model`, refusing files whose names or shapes do not match its config."""
    tensors = load_tensors(path)
    check_weight_shapes(
        path,
        {name: tuple(tensor.shape) for name, tensor in tensors.items()},
        {name: tuple(tensor.shape) for name, tensor in model.export_state_dict().items()},
    )
    model.load_exported_state_dict(tensors)


def find_parent(run_dir: Path, written: str) -> Path | None:
    """The parent run a run names in its state, as the trainer wrote it (None: not found).

    A relative path was written relative to the working directory of the training command; when
    the current one differs, the same path is looked for next to the run and above it, so a
    project folder can be used from anywhere (or moved whole).
    """
    path = Path(written)
    candidates = [path]
    if not path.is_absolute():
        here = run_dir.resolve()
        candidates += [ancestor / path for ancestor in (here, *here.parents)]
    for candidate in candidates:
        if (candidate / STATE_FILE).is_file() or (candidate / MODEL_FILE).is_file():
            return candidate
    return None


def parent_run(run_dir: Path, state: dict[str, Any]) -> Path | None:
    """The parent run `state` (the run's trainer state) records, found by `find_parent` (None when
    there is none, or it is gone)."""
    written = state.get("parent")
    if not isinstance(written, str) or not written:
        return None
    return find_parent(run_dir, written)


def ancestors(run_dir: Path) -> list[Path]:
    """The runs `run_dir` descends from, its parent first, as far as they can be found."""
    found: list[Path] = []
    current, seen = run_dir, {run_dir.resolve()}
    while True:
        try:
            parent = parent_run(current, read_state(current))
        except UserError:  # an unreadable state ends the chain here
            return found
        if parent is None or parent.resolve() in seen:
            return found
        seen.add(parent.resolve())
        found.append(parent)
        current = parent


def adapter_parent(folder: Path, state: dict[str, Any], chain: tuple[Path, ...]) -> Path:
    """The run a LoRA run's adapter applies to (its parent, which holds the base weights or is
    itself such a run), or a one-line refusal: no parent recorded, the parent gone, or a chain
    that loops (`chain`: the resolved runs already walked)."""
    written = state.get("parent")
    if not isinstance(written, str) or not written:
        raise UserError(
            f"{folder}: has {ADAPTER_FILE} but neither {MODEL_FILE} nor a parent run in "
            f"{STATE_FILE}, so there are no base weights to apply the adapter to"
        )
    parent_dir = find_parent(folder, written)
    if parent_dir is None:
        raise UserError(
            f"{folder}: this LoRA run holds only an adapter; it needs its parent run {written} "
            "(the weights the adapter was trained on), which is not there"
        )
    if parent_dir.resolve() in chain:
        raise UserError(f"{folder}: its chain of parent runs loops back to {parent_dir}")
    return parent_dir


def check_same_adapter(adapter_path: Path, settings: LoraConfig, current: LoraConfig) -> None:
    """Refuse an adapter whose shape differs from the parent run's it continues (`current`)."""
    if (current.r, current.alpha, current.targets) != (
        settings.r,
        settings.alpha,
        settings.targets,
    ):
        raise UserError(
            f"{adapter_path}: adapter (r={settings.r}, alpha={settings.alpha}, targets="
            f"{','.join(settings.targets)}) differs from the parent run's adapter "
            f"(r={current.r}, alpha={current.alpha}, targets={','.join(current.targets)})"
        )


def _load_adapter_run(folder: Path, state: dict[str, Any], chain: tuple[Path, ...]) -> GPT:
    """Parent weights (loaded recursively) plus this run's adapter, on the CPU.

    When the parent is itself an unmerged LoRA run, this run continued the parent's adapter, so
    its adapter replaces the parent's on the same base weights; a merged parent is a plain model
    and gets a new adapter.
    """
    adapter_path = folder / ADAPTER_FILE
    parent_dir = adapter_parent(folder, state, chain)
    model = _load_run(parent_dir, "cpu", (*chain, parent_dir.resolve())).model
    settings = settings_from_metadata(read_metadata(adapter_path), adapter_path)
    current = lora_settings(model)
    if current is None:
        apply_lora(model, settings)
    else:
        check_same_adapter(adapter_path, settings, current)
    load_adapter_state_dict(model, load_tensors(adapter_path), adapter_path)
    return model


def _load_run(folder: Path, device: str, chain: tuple[Path, ...]) -> LoadedRun:
    if not folder.is_dir():
        raise UserError(f"{folder}: no such run directory")
    config = read_run_config(folder)
    tokenizer = Tokenizer.load(folder)
    state = read_state(folder)
    if (folder / MODEL_FILE).exists():
        model = GPT(config.model, tokenizer.vocab_size)
        load_model_weights(model, folder / MODEL_FILE)
    elif (folder / ADAPTER_FILE).exists():
        model = _load_adapter_run(folder, state, chain)
    else:
        raise UserError(f"{folder}: no {MODEL_FILE} (the run has not saved weights yet)")
    model.to(device).eval()
    return LoadedRun(folder, model, tokenizer, config, state)


def load_run(run_dir: str | Path, device: str = "cpu") -> LoadedRun:
    """Open a run directory: config, tokenizer, state and the latest weights, in eval mode.

    A LoRA run without a merged `model.safetensors` loads as its parent run (found through
    `parent` in its trainer state, recursively along a chain) plus its `adapter.safetensors`; the
    model then carries unmerged adapters (`model.lora.has_lora`), base frozen, adapters trainable.
    """
    folder = Path(run_dir)
    return _load_run(folder, device, (folder.resolve(),))


# ----------------------------------------------------------------------------- a model's own files


def language_model_files(
    model: GPT | RewardModel,
) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]]:
    """The files that hold what a language model trained: only its adapter when it has one (the
    parent holds the rest), else the whole `model.safetensors` (a reward model's, always)."""
    settings = lora_settings(model)
    if settings is not None:
        return {ADAPTER_FILE: (adapter_state_dict(model), adapter_metadata(settings))}
    return {MODEL_FILE: (model.export_state_dict(), {"format": "minigpt"})}


def load_language_model_files(model: GPT | RewardModel, folder: Path) -> None:
    """Restore what `language_model_files` wrote into `folder` (a resume)."""
    if has_lora(model):
        adapter = folder / ADAPTER_FILE
        load_adapter_state_dict(model, load_tensors(adapter), adapter)
    else:
        load_model_weights(model, folder / MODEL_FILE)


@dataclass
class RewardRun:
    """A trained reward model with what came with it (as `LoadedRun` for a GPT)."""

    run_dir: Path
    model: RewardModel
    tokenizer: Tokenizer
    config: Config
    state: dict[str, Any]


def load_reward_model(run_dir: str | Path, device: str = "cpu") -> RewardRun:
    """Open a reward run directory: config, tokenizer, state, weights (backbone + score), eval mode.

    Read as `load_run` reads a run (config.toml via `read_run_config`, safetensors only,
    names and shapes checked against the config), but the weights must include `score.weight`:
    a language model's run directory is refused with a message saying what is expected.
    """
    folder = Path(run_dir)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such reward-model directory")
    config = read_run_config(folder)
    tokenizer = Tokenizer.load(folder)
    state = read_state(folder)
    path = folder / MODEL_FILE
    if not path.is_file():
        raise UserError(f"{folder}: no {MODEL_FILE} (the reward model has not saved weights yet)")
    read_metadata(path)  # a pickle or truncated file gets its one-line error here
    with safe_open(str(path), framework="pt") as handle:
        names = set(handle.keys())
    if SCORE_WEIGHT not in names:
        raise UserError(
            f"{path}: not a reward model (no {SCORE_WEIGHT}); pass the reward/ directory of an "
            "rlhf run, not a language model's run"
        )
    model = RewardModel(GPT(config.model, tokenizer.vocab_size))
    load_model_weights(model, path)
    model.to(device).eval()
    return RewardRun(folder, model, tokenizer, config, state)
