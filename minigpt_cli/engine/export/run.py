"""`minigpt export`'s entry point: every check before any work, then one format's writer.

The order is what keeps a refusal cheap and clean: the format and the output path are checked
first (no torch work), then the run (finished, weights present), and only then is the run loaded
and written under a temporary name (`output.staged_folder`). A new format is a writer taking an
`ExportSource` and a staging folder, registered in `FORMATS`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from minigpt_cli.engine.export import hf
from minigpt_cli.engine.export.output import check_output, staged_folder
from minigpt_cli.engine.export.source import ExportSource, open_source
from minigpt_cli.errors import UserError

Writer = Callable[[ExportSource, Path], list[Path]]

FORMATS: dict[str, Writer] = {"hf": hf.write_hf}
"""Format name (`--format`) -> the writer that fills a staging folder."""


@dataclass
class ExportReport:
    """What an export wrote, for the CLI's summary."""

    out: Path
    format: str
    files: list[tuple[str, int]] = field(default_factory=list)
    """Each file's name and size in bytes, in the order written."""
    parameters: int = 0
    merged_lora: bool = False
    chat: bool = False
    seconds: float = 0.0


def check_format(fmt: str) -> Writer:
    """The writer of `fmt`, or a one-line refusal naming the formats there are."""
    writer = FORMATS.get(fmt)
    if writer is None:
        raise UserError(f"--format {fmt}: unknown format; choose one of: {', '.join(FORMATS)}")
    return writer


def export_run(run_dir: Path, fmt: str, out: Path, *, overwrite: bool = False) -> ExportReport:
    """Write `run_dir` as `fmt` at `out`: whole, or (on any error) not at all."""
    start = time.perf_counter()
    writer = check_format(fmt)
    check_output(out, run_dir, overwrite=overwrite)
    source = open_source(run_dir)  # checks the run before loading it
    with staged_folder(out) as staging:
        written = writer(source, staging)
        files = [(path.name, path.stat().st_size) for path in written]
    return ExportReport(
        out=out,
        format=fmt,
        files=files,
        parameters=source.model.num_parameters(),
        merged_lora=source.merged_lora,
        chat=source.chat,
        seconds=time.perf_counter() - start,
    )
