"""What an export reads: a finished run, opened from safetensors only, LoRA adapters merged.

Checked before any output exists (`check_exportable`), so a run that is still training, was
interrupted, or never saved weights is refused in one line; `open_source` then loads it as every
decoding verb does (`runs.load.load_run`, adapter chain included) and folds a LoRA run's adapter
into its weights, since no other program knows minigpt's adapter file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from minigpt_cli.config.schema import Config
from minigpt_cli.engine.data.tokenizer import Tokenizer
from minigpt_cli.engine.model.gpt import GPT
from minigpt_cli.engine.model.lora import has_lora, merge_lora
from minigpt_cli.engine.runs.checkpoint import read_state
from minigpt_cli.engine.runs.files import ADAPTER_FILE, MODEL_FILE, REWARD_DIR
from minigpt_cli.engine.runs.load import load_run
from minigpt_cli.errors import UserError

# The verb whose --resume finishes a stage's run (a reward model is trained inside `rlhf`).
_VERB = {"reward": "rlhf"}


@dataclass
class ExportSource:
    """A run ready to be written in another format: plain weights on the CPU, in eval mode."""

    run_dir: Path
    model: GPT
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


def open_source(run_dir: Path) -> ExportSource:
    """Load a checked run (`check_exportable`) and merge its LoRA adapter, if any."""
    check_exportable(run_dir)
    loaded = load_run(run_dir, "cpu")
    merged = has_lora(loaded.model)
    if merged:
        merge_lora(loaded.model)
    return ExportSource(
        run_dir=run_dir,
        model=loaded.model,
        tokenizer=loaded.tokenizer,
        config=loaded.config,
        chat=bool(loaded.state.get("chat")),
        merged_lora=merged,
    )
