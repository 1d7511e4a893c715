"""What an export reads: a finished run's weights, tensor by tensor, from safetensors only.

Checked before any output exists (`check_exportable`), so a run that is still training, was
interrupted, or never saved weights is refused in one line. `open_source` then opens the run
without building its network: the config and tokenizer, and `ExportWeights`, which checks every
tensor's name and shape against the config from the file's header (the checks `load_run` makes)
and reads each weight only when a writer asks for it. A LoRA run's base weights are read from the
run of its chain that holds a `model.safetensors` (as `runs.load.load_run` finds them) and its
own adapter (small) is folded into each targeted weight as it is read, since no other program
knows minigpt's adapter file.

Why not `load_run` and `merge_lora`: a loaded model is one copy of the weights, loading it
briefly another (the file's tensors beside the freshly initialised model), and a writer that
then serialises it a third; read tensor by tensor, an export holds the one weight being written
(and the pages of the mapped file it has read), so it needs at most one copy of the weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from minigpt_cli.config.loader import read_run_config
from minigpt_cli.config.schema import Config, ModelConfig
from minigpt_cli.engine.data.tokenizer import Tokenizer
from minigpt_cli.engine.export.hf_checkpoint import expected_shapes
from minigpt_cli.engine.model.lora import (
    adapter_shapes,
    check_adapter_shapes,
    lora_delta,
    settings_from_metadata,
)
from minigpt_cli.engine.runs.checkpoint import read_state
from minigpt_cli.engine.runs.files import (
    ADAPTER_FILE,
    MODEL_FILE,
    REWARD_DIR,
    load_tensors,
    read_metadata,
)
from minigpt_cli.engine.runs.load import adapter_parent, check_same_adapter, check_weight_shapes
from minigpt_cli.errors import UserError

# The verb whose --resume finishes a stage's run (a reward model is trained inside `rlhf`).
_VERB = {"reward": "rlhf"}


@dataclass
class ExportWeights:
    """A run's weights as an export writes them: names and shapes known up front (checked against
    the config), each tensor read from the file when asked for, in float32 (the dtype every
    minigpt model computes in), with the LoRA update folded in where the run has an adapter."""

    path: Path
    """The `model.safetensors` holding the base weights."""
    shapes: dict[str, tuple[int, ...]]
    """Every weight, under `GPT.export_state_dict()`'s names (no `lm_head.weight` when tied)."""
    adapter: dict[str, torch.Tensor] = field(default_factory=dict)
    """The run's LoRA tensors (`...q_proj.lora_A.weight`...); empty for a plain run."""
    scaling: float = 1.0
    """The adapter's alpha / r."""

    @property
    def parameters(self) -> int:
        """Parameters of the network (a tied embedding counted once)."""
        total = 0
        for shape in self.shapes.values():
            count = 1
            for size in shape:
                count *= size
            total += count
        return total

    def tensor(self, name: str) -> torch.Tensor:
        """The weight `name` as the merged model holds it: a new tensor each call (the writer
        drops it before asking for the next); never written through to the mapped file."""
        with safe_open(str(self.path), framework="pt") as handle:
            weight = handle.get_tensor(name).to(torch.float32)
        stem = name.removesuffix(".weight")
        lora_a = self.adapter.get(f"{stem}.lora_A.weight")
        if lora_a is not None:
            lora_b = self.adapter[f"{stem}.lora_B.weight"]
            weight = weight + lora_delta(lora_a, lora_b, self.scaling, weight.dtype)
        return weight


@dataclass
class ExportSource:
    """A run ready to be written in another format: its weights (read on demand), tokenizer and
    config."""

    run_dir: Path
    weights: ExportWeights
    tokenizer: Tokenizer
    config: Config
    chat: bool
    """The run was fine-tuned on the chat template (it answers turns, not documents)."""
    merged_lora: bool
    """Its LoRA adapter was folded into the weights for the export."""


def check_exportable(run_dir: Path) -> None:
    """Refuse, in one line, a folder that is not a finished language-model run with weights."""
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    state = read_state(run_dir)
    stage = str(state.get("stage") or "")
    if stage == "reward":
        raise UserError(
            f"{run_dir}: a reward model, not a language model; export the rlhf run that holds "
            f"this {REWARD_DIR}/ folder"
        )
    if not state.get("finished"):
        verb = _VERB.get(stage, stage or "<verb>")
        total = state.get("total_steps")
        at = f"step {state['step']}" + (f" of {total}" if total else "")
        raise UserError(
            f"{run_dir}: the run has not finished (it stopped at {at}); finish it with "
            f"`minigpt {verb} --out {run_dir} --resume`, then export"
        )
    if not (run_dir / MODEL_FILE).is_file() and not (run_dir / ADAPTER_FILE).is_file():
        raise UserError(f"{run_dir}: no {MODEL_FILE} (the run has no weights to export)")


def _check_model_file(path: Path, model: ModelConfig, rows: int) -> dict[str, tuple[int, ...]]:
    """The weights' shapes from `path`'s header, or the one-line refusal `load_run` gives a file
    whose names or shapes do not match the run's config.toml."""
    read_metadata(path)  # a pickle renamed .safetensors, or a truncated file: one line
    with safe_open(str(path), framework="pt") as handle:
        found = {
            name: tuple(int(n) for n in handle.get_slice(name).get_shape())
            for name in handle.keys()  # noqa: SIM118 (safe_open is not a mapping)
        }
    expected = {name: tuple(shape) for name, shape in expected_shapes(model, rows).items()}
    check_weight_shapes(path, found, expected)
    return {name: found[name] for name in expected}


def open_weights(run_dir: Path) -> tuple[ExportWeights, bool]:
    """The run's weights, checked as `load_run` checks them, and whether a LoRA adapter is folded
    in. A LoRA run's chain is walked up to the run holding `model.safetensors` (each adapter on
    the way checked against the base's shape and its parent's adapter); only the run's own
    adapter is kept, since each run of a chain continues its parent's adapter."""
    folder, adapters = run_dir, []
    chain: tuple[Path, ...] = (run_dir.resolve(),)
    while not (folder / MODEL_FILE).exists():
        if not (folder / ADAPTER_FILE).exists():
            raise UserError(f"{folder}: no {MODEL_FILE} (the run has not saved weights yet)")
        adapters.append(folder / ADAPTER_FILE)
        folder = adapter_parent(folder, read_state(folder), chain)
        chain = (*chain, folder.resolve())
    base = read_run_config(folder).model
    rows = Tokenizer.load(folder).vocab_size
    weights = ExportWeights(folder / MODEL_FILE, _check_model_file(folder / MODEL_FILE, base, rows))
    if not adapters:
        return weights, False
    settings = None
    for path in reversed(adapters):  # from the base's adapter down to the run's own, as loaded
        found = settings_from_metadata(read_metadata(path), path)
        if settings is None:
            settings = found
        else:
            check_same_adapter(path, found, settings)
        tensors = load_tensors(path)
        check_adapter_shapes(
            {name: tuple(tensor.shape) for name, tensor in tensors.items()},
            adapter_shapes(base, settings),
            path,
        )
    weights.adapter = tensors  # the last one read: the run's own adapter
    assert settings is not None
    weights.scaling = float(settings.alpha) / settings.r
    return weights, True


def open_source(run_dir: Path) -> ExportSource:
    """Open a checked run (`check_exportable`) for export, without loading its weights."""
    check_exportable(run_dir)
    config = read_run_config(run_dir)
    tokenizer = Tokenizer.load(run_dir)
    state = read_state(run_dir)
    weights, merged = open_weights(run_dir)
    return ExportSource(
        run_dir=run_dir,
        weights=weights,
        tokenizer=tokenizer,
        config=config,
        chat=bool(state.get("chat")),
        merged_lora=merged,
    )
