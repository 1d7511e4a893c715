"""`minigpt import HF_DIR --out RUN`: a local Hugging Face Llama checkpoint as a minigpt run.

The work is `engine.export.hf_import.import_hf`; this module parses flags and prints what was
made and the commands a user runs next. Every refusal is the engine's one line (exit 2).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer


def import_checkpoint(
    hf_dir: Annotated[
        Path,
        typer.Argument(
            metavar="HF_DIR",
            help="Local Hugging Face folder of a LlamaForCausalLM: config.json, safetensors "
            "weights, tokenizer.model or tokenizer.json.",
        ),
    ],
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="Run directory to write (refused if it exists)."),
    ],
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Replace an existing run at --out (never other files)."),
    ] = False,
) -> None:
    """Import a local Hugging Face Llama checkpoint as a finished run.

    Shapes (GQA, tied or untied embeddings, rope theta, SwiGLU width, norm epsilon) come from
    its config.json; anything minigpt cannot represent is refused in one line naming the key.
    Pickled .bin/.pt weights are refused, never unpickled. Example:
    minigpt import ./TinyModel --out runs/imported && minigpt sft --from runs/imported
    """
    from minigpt_cli.engine.export.hf_import import import_hf

    report = import_hf(hf_dir, out, overwrite=overwrite)
    notes = [f"{report.parameters:,} parameters", f"vocabulary {report.vocab_size:,}"]
    if report.renamed:
        notes.append("renamed " + ", ".join(f"{a} -> {b}" for a, b in report.renamed.items()))
    if report.added:
        notes.append(f"added {', '.join(report.added)} (new embedding rows, trained by sft)")
    if report.reserved:
        notes.append(f"{report.reserved} reserved pieces for unused embedding rows")
    sys.stdout.write(
        f"imported {hf_dir} to {out} ({'; '.join(notes)}; weights {'/'.join(report.dtypes)} "
        f"-> fp32, tokenizer from {report.tokenizer_source}"
        f"{', with its dummy prefix' if report.dummy_prefix else ''}) in {report.seconds:.1f} s\n"
    )
    sys.stdout.write(
        f"next: minigpt sft --from {out}\n      minigpt generate {out} --prompt TEXT\n"
    )


def register(app: typer.Typer) -> None:
    """Add `minigpt import`."""
    app.command("import")(import_checkpoint)
