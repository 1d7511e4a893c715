"""`minigpt data`: look at the built-in data (or your own files) and export it as JSONL.

`show` prints a few records the way a stage will see them (after normalisation), so a user can
check a file before training on it; `export` writes the built-in data out in the same JSONL formats
`--data` accepts, as a starting point for their own; `inspect` renders SFT/DPO examples in the chat
template with a run's tokenizer and marks which tokens are trained, so a person sees exactly what
is learned. Heavy imports stay inside the verbs.
"""

from __future__ import annotations

import enum
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from minigpt_cli.cli import common
from minigpt_cli.errors import UserError

if TYPE_CHECKING:
    from minigpt_cli.engine.data.tokenizer import Tokenizer

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
    from minigpt_cli.engine.data.files import iter_text_chunks

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
    from minigpt_cli.engine.data.files import read_records
    from minigpt_cli.engine.data.records import normalise_record

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
        shown = [normalise_record(r, kind.value) for r in raw]
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
    from minigpt_cli.engine.core.io import atomic_write_text

    if out.is_dir():
        raise UserError(f"{out}: is a folder; give a file name such as {out / 'data.jsonl'}")
    if out.exists() and not overwrite:
        raise UserError(f"{out}: already exists (add --overwrite to replace it)")
    common.check_output(out.parent)
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


class InspectKind(enum.StrEnum):
    """Data whose training tokens `inspect` can show."""

    sft = "sft"
    dpo = "dpo"


TRAINED_OPEN, TRAINED_CLOSE = "[[", "]]"  # plain-text marks around trained tokens


def default_inspect_run(runs_dir: Path = Path("runs")) -> Path:
    """The most recently modified run under `runs_dir` that holds a tokenizer.model."""
    from minigpt_cli.engine.data.tokenizer import MODEL_FILE

    candidates = (
        [p for p in runs_dir.iterdir() if (p / MODEL_FILE).is_file()] if runs_dir.is_dir() else []
    )
    if not candidates:
        raise UserError(
            f"no run with a tokenizer.model under {runs_dir}/: pass --run RUN (a run directory "
            "or a tokenizer folder), or pretrain first (`minigpt pretrain`)"
        )
    return max(candidates, key=lambda p: (p.stat().st_mtime, p.name))


def _context_length(run: Path) -> int | None:
    """The run's model.context_length (where truncation happens), None for a bare tokenizer."""
    from minigpt_cli.config.loader import RUN_CONFIG_FILE, read_run_config

    if not (run / RUN_CONFIG_FILE).is_file():
        return None
    return read_run_config(run).model.context_length


def _inspected(
    kind: InspectKind,
    record: dict[str, Any],
    tokenizer: Tokenizer,
    max_len: int | None,
    on_prompt: bool,
) -> list[tuple[str, str, list[tuple[str, bool, bool]], Any]]:
    """(label, counts, spans, rendering) to show: the conversation for sft; for dpo the shared
    prompt, then the chosen and the rejected reply (counts are of prompt + reply)."""
    from minigpt_cli.engine.data.chat_template import mask_spans
    from minigpt_cli.engine.data.examples import render_example

    if kind is InspectKind.sft:
        rendered = render_example(record["messages"], tokenizer, max_len, on_prompt)
        spans = mask_spans(rendered.ids, rendered.mask, tokenizer)
        return [("", _counts(rendered), spans, rendered)]
    prompt = record["prompt_messages"]
    out: list[tuple[str, str, list[tuple[str, bool, bool]], Any]] = []
    for label in ("chosen", "rejected"):
        reply = {"role": "assistant", "content": record[label]}
        rendered = render_example([*prompt, reply], tokenizer, max_len, on_prompt)
        # The reply starts after the last <|assistant|> (text never yields one); truncation may
        # have cut the prompt, so it is found in the rendering rather than computed.
        markers = [i for i, t in enumerate(rendered.ids) if t == tokenizer.assistant_id]
        start = markers[-1] + 1 if markers else len(rendered.ids)
        if not out:
            head = mask_spans(rendered.ids[:start], rendered.mask[:start], tokenizer)
            out.append(("prompt", "", head, None))
        tail = mask_spans(rendered.ids[start:], rendered.mask[start:], tokenizer)
        out.append((label, _counts(rendered), tail, rendered))
    return out


def _counts(rendered: Any) -> str:
    trained = sum(rendered.mask[1:])
    text = f"{len(rendered.ids)} tokens, {trained} trained"
    if rendered.dropped_turns:
        text += (
            f", truncated to fit the context ({rendered.dropped_turns} earlier exchanges dropped)"
        )
    elif rendered.truncated:
        text += ", truncated to fit the context (the end is cut off)"
    if not trained:
        text += "; nothing left to learn, so training skips it"
    return text


def _plain_spans(spans: list[tuple[str, bool, bool]]) -> str:
    parts = []
    for index, (text, trained, _) in enumerate(spans):
        before = spans[index - 1][1] if index else False
        after = spans[index + 1][1] if index + 1 < len(spans) else False
        if trained and not before:
            parts.append(TRAINED_OPEN)
        parts.append(text)
        if trained and not after:
            parts.append(TRAINED_CLOSE)
    return "".join(parts)


def _rich_spans(spans: list[tuple[str, bool, bool]]) -> Any:
    from rich.text import Text

    out = Text()
    for text, trained, special in spans:
        style = "bold green" if trained else "dim"
        if special:
            style += " italic"
        out.append(text, style=style)
    return out


@data_app.command("inspect")
def inspect(
    kind: Annotated[
        InspectKind, typer.Option("--kind", "-k", help="sft or dpo: which stage's examples.")
    ] = InspectKind.sft,
    n: Annotated[int, typer.Option("-n", "--num", help="How many examples to show.", min=1)] = 3,
    data: Annotated[
        list[Path] | None,
        typer.Option("--data", help="Inspect these files or folders (default: built-in data)."),
    ] = None,
    run: Annotated[
        Path | None,
        typer.Option(
            "--run",
            help="Run (or tokenizer folder) whose tokenizer to use; default: the newest in runs/.",
        ),
    ] = None,
    split: SplitOption = Split.train,
    seed: SeedOption = 0,
    train_on_prompt: Annotated[
        bool, typer.Option("--train-on-prompt", help="Show what --train-on-prompt would train.")
    ] = False,
) -> None:
    """Show examples in the chat template: which tokens are trained, which masked, and counts.

    Trained tokens (the assistant's answers and their end-of-turn token) are highlighted; on a
    non-terminal they are wrapped in [[ ]]. Conversations longer than the run's context are shown
    truncated exactly as training truncates them.
    """
    from minigpt_cli.engine.data.tokenizer import Tokenizer

    run_dir = run if run is not None else default_inspect_run()
    tokenizer = Tokenizer.load(run_dir)
    max_len = _context_length(run_dir) if run_dir.is_dir() else None
    records, where = _load(Kind(kind.value), split, n, seed, data)
    shown = []
    total_tokens = total_trained = truncated = 0
    for record in records:
        pieces = _inspected(kind, record, tokenizer, max_len, train_on_prompt)
        for _, _, _, rendered in pieces:
            if rendered is not None:
                total_tokens += len(rendered.ids)
                total_trained += sum(rendered.mask[1:])
                truncated += rendered.truncated
        shown.append((record.get("task"), [piece[:3] for piece in pieces]))
    limit = f"context {max_len}" if max_len else "no context limit"
    header = f"tokenizer: {run_dir} (vocab {tokenizer.vocab_size:,}; {limit})"
    share = total_trained / max(total_tokens, 1)
    what = ("example" if kind is InspectKind.sft else "pair") + ("" if len(shown) == 1 else "s")
    footer = (
        f"total: {len(shown)} {what}, {total_tokens:,} tokens, {total_trained:,} trained "
        f"({share:.0%})" + (f", {truncated} truncated" if truncated else "")
    )
    if sys.stdout.isatty():
        _inspect_rich(where, header, footer, shown)
    else:
        _inspect_plain(where, header, footer, shown)


def _inspect_plain(where: str, header: str, footer: str, shown: list) -> None:
    typer.echo(where)
    typer.echo(f"{header}; trained tokens are shown {TRAINED_OPEN}like this{TRAINED_CLOSE}")
    for index, (task, pieces) in enumerate(shown, start=1):
        typer.echo("")
        title = f"#{index}" + (f" · {task}" if task else "")
        if len(pieces) == 1:
            typer.echo(f"[{title} · {pieces[0][1]}]")
            typer.echo(_plain_spans(pieces[0][2]))
            continue
        typer.echo(f"[{title}]")
        for label, counts, spans in pieces:
            typer.echo(f"{label} ({counts}):" if counts else f"{label}:")
            typer.echo(_plain_spans(spans))
    typer.echo("")
    typer.echo(footer)


def _inspect_rich(where: str, header: str, footer: str, shown: list) -> None:
    from rich.console import Console, Group
    from rich.panel import Panel
    from rich.text import Text

    console = Console(highlight=False)
    console.print(Text(where, style="bold"))
    legend = Text(header + "; ")
    legend.append("trained", style="bold green")
    legend.append(" / ")
    legend.append("masked", style="dim")
    console.print(legend)
    for index, (task, pieces) in enumerate(shown, start=1):
        title = f"#{index}" + (f" · {task}" if task else "")
        if len(pieces) == 1:
            title += f" · {pieces[0][1]}"
            body: Any = _rich_spans(pieces[0][2])
        else:
            parts = []
            styles = {"prompt": "bold", "chosen": "bold green", "rejected": "bold red"}
            for label, counts, spans in pieces:
                heading = f"{label} ({counts})" if counts else label
                parts += [Text(heading, style=styles[label]), _rich_spans(spans)]
            body = Group(*parts)
        console.print(Panel(body, title=title, title_align="left"))
    console.print(Text(footer, style="bold"))


def register(app: typer.Typer) -> None:
    """Add the `data` group (show, export, inspect) to the top-level app."""
    app.add_typer(data_app, name="data")
