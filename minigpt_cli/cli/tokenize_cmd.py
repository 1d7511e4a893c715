"""`minigpt tokenize`: train a sentencepiece BPE tokenizer on your text, encode text into shards.

`train` prints what a user needs to judge a tokenizer: its size, how long it took, and how many
characters a token covers on text held out from training, per language (English text runs about
3 to 4, Chinese about 1 to 1.5). `encode` turns a corpus into the token shards `pretrain --data`
reads, and skips the work when the shards already match the inputs and tokenizer.

Only typer and the standard library are imported here; rich, numpy and sentencepiece load inside
the verbs so `minigpt --help` stays fast. Progress goes to stderr, results to stdout.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from minigpt_cli.cli import common
from minigpt_cli.errors import UserError

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID
    from rich.status import Status

    from minigpt_cli.engine.core.events import Event

tokenize_app = typer.Typer(
    name="tokenize",
    help="Train a sentencepiece BPE tokenizer on your text, or encode text into token shards.",
    no_args_is_help=True,
    rich_markup_mode=None,
)

InputOpt = Annotated[
    list[Path],
    typer.Option(
        "--input",
        "-i",
        help='Text to read: a .txt file, a JSONL file of {"text": ...} lines, or a folder of '
        "them. Repeat for several.",
    ),
]

_FLAGS = {
    "vocab_size": "--vocab-size",
    "character_coverage": "--character-coverage",
    "max_training_chars": "--max-training-chars",
}


def _check_settings(vocab_size: int, character_coverage: float, max_training_chars: int) -> None:
    """The same limits the [tokenizer] config section enforces, named by their flags."""
    from pydantic import ValidationError

    from minigpt_cli.config.schema import TokenizerConfig

    try:
        TokenizerConfig(
            vocab_size=vocab_size,
            character_coverage=character_coverage,
            max_training_chars=max_training_chars,
        )
    except ValidationError as error:
        first = error.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else ""
        flag = _FLAGS.get(field, field)
        raise UserError(f"{flag} {first.get('input')!r}: {first['msg']}") from None


def _stderr_is_terminal() -> bool:
    return sys.stderr.isatty()


class _TrainDisplay:
    """Shows tokenizer training: a rich status line on a terminal, phase lines otherwise."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(stderr=True, highlight=False)
        self.live = _stderr_is_terminal()
        self.status: Status | None = None
        self.phase: str | None = None

    def __enter__(self) -> _TrainDisplay:
        if self.live:
            self.status = self.console.status("starting", spinner="dots")
            self.status.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None

    def __call__(self, event: Event) -> None:
        data = event.data
        if event.kind == "note":
            self.console.print(f"note: {data['message']}", markup=False)
            return
        if event.kind != "progress":
            return
        message = str(data.get("message", ""))
        if self.status is not None:
            if data.get("phase") == "reading" and data.get("total") and data.get("unit") == "B":
                message += f" ({100 * data['done'] / data['total']:.0f}% read)"
            self.status.update(message)
        elif data.get("phase") != self.phase:
            self.console.print(f"tokenize: {message}", markup=False)
        self.phase = data.get("phase")


class _EncodeDisplay:
    """Shows encoding: a rich progress bar (bytes, rate, time left) or a line every 25%."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(stderr=True, highlight=False)
        self.live = _stderr_is_terminal()
        self.progress: Progress | None = None
        self.task: TaskID | None = None
        self.next_quarter = 0.25

    def __enter__(self) -> _EncodeDisplay:
        if self.live:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self.progress = Progress(
                TextColumn("encoding"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def __call__(self, event: Event) -> None:
        if event.kind != "progress" or event.data.get("task") != "encode":
            return
        done, total = int(event.data["done"]), event.data.get("total") or 0
        if self.progress is not None:
            if self.task is None:
                self.task = self.progress.add_task("encode", total=total)
            self.progress.update(self.task, completed=done, total=total)
            return
        if total and done / total >= self.next_quarter:
            while self.next_quarter <= done / total:
                self.next_quarter += 0.25
            self.console.print(
                f"tokenize: encoded {100 * done / total:.0f}% ({_size(done)} of {_size(total)})",
                markup=False,
            )


def _count(number: int, noun: str) -> str:
    return f"{number:,} {noun}" + ("" if number == 1 else "s")


def _size(count: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"  # unreachable: the loop returns at GB


@tokenize_app.command("train")
def train(
    inputs: InputOpt,
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="Folder to write tokenizer.model and tokenizer.json."),
    ],
    vocab_size: Annotated[
        int, typer.Option("--vocab-size", help="Tokens in the vocabulary, specials included.")
    ] = 5000,
    character_coverage: Annotated[
        float,
        typer.Option(
            "--character-coverage",
            help="Share of the text whose characters get their own piece (0.98 to 1); rarer "
            "characters are spelled as UTF-8 bytes.",
        ),
    ] = 0.9995,
    max_training_chars: Annotated[
        int,
        typer.Option("--max-training-chars", help="Characters sampled from the input to train on."),
    ] = 20_000_000,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed for sampling a large input.", min=0)
    ] = 0,
) -> None:
    """Train a BPE tokenizer (byte fallback, split digits, exact round trip) on your text.

    Prints the vocabulary size, the time taken and the characters per token on a held-out slice
    of the text for each language found.
    """
    from minigpt_cli.engine.data.files import expand_paths, validate
    from minigpt_cli.engine.data.tokenizer_training import train_tokenizer

    _check_settings(vocab_size, character_coverage, max_training_chars)
    files = expand_paths(inputs, kind="pretrain")
    validate(files, "pretrain")
    common.check_output(out)
    with _TrainDisplay() as display:
        report = train_tokenizer(
            files,
            vocab_size,
            out,
            character_coverage=character_coverage,
            max_training_chars=max_training_chars,
            seed=seed,
            on_event=display,
        )
    ratios = ", ".join(f"{lang} {value:.2f}" for lang, value in report.chars_per_token.items())
    where = (
        f"held-out slice of {report.held_out_chars:,} characters"
        if report.held_out
        else "training text; too little text to hold a slice out"
    )
    typer.echo(f"vocabulary size: {report.vocab_size:,}")
    typer.echo(f"time: {report.seconds:.1f} s")
    typer.echo(
        f"training text: {report.training_chars:,} characters from {_count(len(files), 'file')}"
    )
    typer.echo(f"characters per token ({where}): {ratios or 'no letters found'}")
    typer.echo(f"saved: {report.model_path} (sha256 {report.sha256[:12]})")


@tokenize_app.command("encode")
def encode(
    tokenizer_dir: Annotated[
        Path,
        typer.Option(
            "--tokenizer",
            "-t",
            help="Tokenizer folder (from `tokenize train`), its tokenizer.model, or a run.",
        ),
    ],
    inputs: InputOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the token shards.")],
) -> None:
    """Encode text into token shards for `pretrain --data` (reused when nothing changed).

    Writes shard-00000.bin, ... (uint16 ids, uint32 for vocabularies over 65,536) and meta.json
    with token counts, the tokenizer's hash and the inputs' hashes.
    """
    from minigpt_cli.engine.data.files import expand_paths, validate
    from minigpt_cli.engine.data.shards import encode_to_shards, reusable_shards
    from minigpt_cli.engine.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(tokenizer_dir)
    files = expand_paths(inputs, kind="pretrain")
    common.check_output(out)
    started = time.monotonic()
    meta = reusable_shards(tokenizer, files, out)
    if meta is not None:
        meta = {**meta, "reused": True}
    else:
        validate(files, "pretrain")
        with _EncodeDisplay() as display:
            meta = encode_to_shards(tokenizer, files, out, on_event=display)
    seconds = time.monotonic() - started
    per_token = meta.get("bytes_per_token")
    typer.echo(
        f"tokens: {meta['total_tokens']:,} ({meta['dtype']}) in "
        f"{_count(len(meta['shards']), 'shard')}; {_count(meta['documents'], 'document')}"
        + (f"; {per_token:.2f} bytes of text per token" if per_token else "")
    )
    if meta["reused"]:
        typer.echo("reused: yes (inputs and tokenizer unchanged, nothing encoded)")
    else:
        typer.echo(f"reused: no (encoded {_size(meta['text_bytes'])} of text in {seconds:.1f} s)")
    typer.echo(f"saved: {out}")


def register(app: typer.Typer) -> None:
    """Add the `tokenize` group (train, encode) to the CLI."""
    app.add_typer(tokenize_app, name="tokenize")
