"""`minigpt export RUN --format hf|gguf --out PATH`: a finished run as files another program loads.

The work is `engine.export.run.export_run`; this module parses flags and prints what was written
and the line a user runs next. The format is a plain string checked by the engine, so an unknown
one gets the same one-line refusal (exit 2) as every other bad input.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from minigpt_cli.engine.export.run import ExportReport

# What a user runs next with each format's output.
NEXT_STEP = {
    "hf": 'python -c "from transformers import AutoModelForCausalLM, AutoTokenizer; '
    "model = AutoModelForCausalLM.from_pretrained('{out}'); "
    "tokenizer = AutoTokenizer.from_pretrained('{out}')\"",
}


def next_step(report: ExportReport) -> str:
    """The command a user runs next with what `report` wrote: for GGUF, llama.cpp's chat for a
    chat run (its template is in the file) or its text completion otherwise, and Ollama."""
    out = report.out
    if report.format != "gguf":
        return NEXT_STEP[report.format].format(out=out)
    llama = (
        f'llama-cli -m {out} -p "What is 3 + 4?"'
        if report.chat
        else f'llama-completion -m {out} -p "Once upon a time"'
    )
    modelfile = out.parent / report.files[-1][0]
    return f"{llama}  |  ollama create {out.stem} -f {modelfile} && ollama run {out.stem}"


def export(
    run: Annotated[
        Path,
        typer.Argument(
            metavar="RUN", help="Finished run directory to export (e.g. runs/sft-tiny)."
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Folder (hf) or FILE.gguf (gguf) to write; refused if it exists, unless "
            "--overwrite.",
        ),
    ],
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            "-f",
            help="hf: a Hugging Face transformers folder (LlamaForCausalLM, tokenizer, chat "
            "template) that AutoModelForCausalLM and AutoTokenizer load offline. gguf: one "
            "file for llama.cpp and Ollama (tokenizer and chat template inside; --out "
            "FILE.gguf), with an Ollama FILE.Modelfile beside it.",
        ),
    ] = "hf",
    dtype: Annotated[
        str | None,
        typer.Option(
            "--dtype",
            help="gguf: f16 (default, llama.cpp's usual float), f32 (the weights bit for bit) or "
            "q8_0 (8-bit blocks, about a quarter of f32). hf writes f32 only.",
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", help="Replace an existing --out (never a folder that holds a run)."
        ),
    ] = False,
) -> None:
    """Export a finished run for other programs: weights, tokenizer and chat template.

    LoRA runs are exported merged. Written under a temporary name and renamed when complete, so
    --out is whole or absent. Examples: minigpt export runs/sft-tiny --format hf --out hf-tiny;
    minigpt export runs/sft-tiny --format gguf --dtype q8_0 --out sft-tiny.gguf
    """
    from minigpt_cli.engine.core.units import format_bytes
    from minigpt_cli.engine.export.run import export_run

    report = export_run(run, fmt, out, overwrite=overwrite, dtype=dtype)
    total = sum(size for _, size in report.files)
    notes = [f"{report.parameters:,} parameters"]
    if report.format != "hf":
        notes.append(report.dtype)
    if report.merged_lora:
        notes.append("LoRA adapter merged")
    if report.chat:
        notes.append("chat template")
    sys.stdout.write(
        f"exported {run} as {report.format} to {out} ({', '.join(notes)}; "
        f"{len(report.files)} files, {format_bytes(total)}) in {report.seconds:.1f} s\n"
    )
    for name, size in report.files:
        sys.stdout.write(f"  {name:<24} {format_bytes(size):>10}\n")
    for note in report.notes:
        sys.stdout.write(f"note: {note}\n")
    sys.stdout.write(f"next: {next_step(report)}\n")


def register(app: typer.Typer) -> None:
    """Add `minigpt export`."""
    app.command("export")(export)
