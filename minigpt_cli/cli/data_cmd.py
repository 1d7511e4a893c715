"""`minigpt data`: look at the built-in data (or your own files) and export it as JSONL.

`show` prints a few records the way a stage will see them (after normalisation), so a user can
check a file before training on it; `export` writes the built-in data out in the same JSONL formats
`--data` accepts, as a starting point for their own. Heavy imports stay inside the verbs.
"""

from __future__ import annotations

import enum
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from minigpt_cli.errors import UserError

PREVIEW_CHARS = 300  # how much of each pretraining document `show` prints


class Kind(enum.StrEnum):
    """The stage a piece of data is for."""

    pretrain = "pretrain"
    sft = "sft"
    dpo = "dpo"
    rlhf = "rlhf"


class Split(enum.StrEnum):
    """Training records, or the held-out ones used for evaluation."""

    train = "train"
    val = "val"


data_app = typer.Typer(
    name="data",
    help="Show or export the built-in bilingual data (or show your own data files).",
    no_args_is_help=True,
    rich_markup_mode=None,
)

KindOption = Annotated[
    Kind, typer.Option("--kind", "-k", help="Which stage's data: pretrain, sft, dpo or rlhf.")
]
SplitOption = Annotated[
    Split,
    typer.Option("--split", help="train, or val (held out; pretraining text has no val split)."),
]
SeedOption = Annotated[int, typer.Option("--seed", help="Seed of the built-in generator.", min=0)]


def _preview(text: str) -> str:
    return text if len(text) <= PREVIEW_CHARS else text[:PREVIEW_CHARS].rstrip() + " …"


def _pretrain_samples(paths: list[Path], n: int) -> list[dict[str, Any]]:
    """The first `n` documents of a corpus, streamed: only their first characters are kept."""
    from minigpt_cli.engine.data import iter_text_chunks

    docs: list[dict[str, Any]] = []
    head: list[str] = []
    kept = 0
    length = 0
    for chunk, last in iter_text_chunks(paths):
        if kept < PREVIEW_CHARS + 1:
            head.append(chunk[: PREVIEW_CHARS + 1 - kept])
            kept += len(head[-1])
        length += len(chunk)
        if last:
            docs.append({"text": "".join(head), "chars": length, "task": None})
            head, kept, length = [], 0, 0
            if len(docs) >= n:
                break
    return docs


def _load(
    kind: Kind, split: Split, n: int, seed: int, paths: list[Path] | None
) -> tuple[list[dict[str, Any]], str]:
    """Records to show and a one-line description of where they came from."""
    from minigpt_cli.datasets import builtin
    from minigpt_cli.engine.data import normalize_record, read_records

    if paths:
        if kind is Kind.pretrain:
            docs = _pretrain_samples(paths, n)
            return docs, f"first {len(docs)} pretraining documents of {_names(paths)}"
        found = read_records(paths, kind.value)
        shown = found[:n]
        return shown, f"{len(shown)} of {len(found)} {kind.value} records in {_names(paths)}"
    try:
        total = builtin.default_size(kind.value, split.value)
        raw = builtin.records(kind.value, split.value, min(n, total), seed)
    except ValueError as error:
        raise UserError(str(error)) from None
    if kind is Kind.pretrain:
        shown = [{**r, "chars": len(r["text"])} for r in raw]
    else:
        shown = [normalize_record(r, kind.value) for r in raw]
    topics = builtin.PRETRAIN_TOPICS if kind is Kind.pretrain else builtin.TASK_FAMILIES
    where = (
        f"{len(shown)} of {total} built-in {kind.value} {split.value} records "
        f"(seed {seed}; tasks: {', '.join(topics)})"
    )
    return shown, where


def _names(paths: list[Path]) -> str:
    return ", ".join(str(p) for p in paths)


def _record_lines(kind: Kind, record: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, text) lines that describe one record."""
    if kind is Kind.pretrain:
        return [("text", _preview(record["text"]))]
    if kind is Kind.sft:
        return [(m["role"], m["content"]) for m in record["messages"]]
    lines = [(m["role"], m["content"]) for m in record["prompt_messages"]]
    if kind is Kind.dpo:
        return lines + [("chosen", record["chosen"]), ("rejected", record["rejected"])]
    answer = record["answer"]
    return lines + [("answer", "(none: no rule reward)" if answer is None else answer)]


def _title(kind: Kind, index: int, record: dict[str, Any]) -> str:
    parts = [f"#{index}"]
    if record.get("task"):
        parts.append(record["task"])
    if kind is Kind.pretrain:
        parts.append(f"{record['chars']} chars")
    return " · ".join(parts)


def _print_plain(kind: Kind, records: list[dict[str, Any]], where: str) -> None:
    typer.echo(where)
    for index, record in enumerate(records, start=1):
        typer.echo("")
        typer.echo(f"[{_title(kind, index, record)}]")
        for label, text in _record_lines(kind, record):
            body = text.replace("\n", "\n    ")
            typer.echo(f"  {label}: {body}")


def _print_rich(kind: Kind, records: list[dict[str, Any]], where: str) -> None:
    from rich.console import Console
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    styles = {
        "user": "bold cyan",
        "assistant": "bold green",
        "system": "bold magenta",
        "chosen": "bold green",
        "rejected": "bold red",
        "answer": "bold yellow",
        "text": "dim",
    }
    console = Console()
    console.print(Text(where, style="bold"))
    for index, record in enumerate(records, start=1):
        grid = Table.grid(padding=(0, 1))
        grid.add_column(no_wrap=True)
        grid.add_column()
        for label, text in _record_lines(kind, record):
            grid.add_row(Text(label, style=styles.get(label, "bold")), Text(text))
        console.print(Panel(grid, title=_title(kind, index, record), title_align="left"))


@data_app.command("show")
def show(
    kind: KindOption = Kind.sft,
    n: Annotated[int, typer.Option("-n", "--num", help="How many records to show.", min=1)] = 5,
    split: SplitOption = Split.train,
    seed: SeedOption = 0,
    data: Annotated[
        list[Path] | None,
        typer.Option(
            "--data",
            help="Show these files or folders instead of the built-in data (repeatable).",
        ),
    ] = None,
) -> None:
    """Print sample records as a stage will see them (pretraining text: the first 300 chars)."""
    records, where = _load(kind, split, n, seed, data)
    if sys.stdout.isatty():
        _print_rich(kind, records, where)
    else:
        _print_plain(kind, records, where)


@data_app.command("export")
def export(
    kind: KindOption,
    out: Annotated[Path, typer.Option("--out", "-o", help="JSONL file to write.")],
    split: SplitOption = Split.train,
    n: Annotated[
        int | None,
        typer.Option("-n", "--num", help="How many records (default: the built-in size).", min=1),
    ] = None,
    seed: SeedOption = 0,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace --out if it already exists.")
    ] = False,
) -> None:
    """Write the built-in data as JSONL, in the format `--data` reads back."""
    import json

    from minigpt_cli.datasets import builtin
    from minigpt_cli.engine.io import atomic_write_text

    if out.is_dir():
        raise UserError(f"{out}: is a folder; give a file name such as {out / 'data.jsonl'}")
    if out.exists() and not overwrite:
        raise UserError(f"{out}: already exists (add --overwrite to replace it)")
    try:
        records = builtin.records(kind.value, split.value, n, seed)
    except ValueError as error:
        raise UserError(str(error)) from None
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write_text(out, text)
    typer.echo(
        f"wrote {len(records)} built-in {kind.value} {split.value} records (seed {seed}) to {out}"
        f" ({len(text.encode('utf-8')) / 1e6:.2f} MB)"
    )


def register(app: typer.Typer) -> None:
    """Add the `data` group (show, export) to the top-level app."""
    app.add_typer(data_app, name="data")
