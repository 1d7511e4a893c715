"""`minigpt export`'s entry point: every check before any work, then one format's writer.

The order is what keeps a refusal cheap and clean: the format and the output path are checked
first (no torch work), then the run (finished, weights present and matching its config), and
only then are its weights read, tensor by tensor, and written under a temporary name
(`output.staged_folder` for a folder, `output.staged_files` for a file with its companions). A new
format is a writer taking an `ExportSource` and a staging folder, registered in `FORMATS`
with the dtypes it writes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from minigpt_cli.engine.core.io import atomic_write_text
from minigpt_cli.engine.export import gguf_file, hf, ollama
from minigpt_cli.engine.export.output import check_output, staged_files, staged_folder
from minigpt_cli.engine.export.source import ExportSource, open_source
from minigpt_cli.errors import UserError

Writer = Callable[[ExportSource, Path, Path, str], tuple[list[Path], list[str]]]
"""(the run, a staging folder, the final --out, the dtype) -> (the files written in the folder,
notes for the user on what the format could not keep)."""


def _write_hf(
    source: ExportSource, staging: Path, out: Path, dtype: str
) -> tuple[list[Path], list[str]]:
    return hf.write_hf(source, staging), []


def _write_gguf(
    source: ExportSource, staging: Path, out: Path, dtype: str
) -> tuple[list[Path], list[str]]:
    weights = staging / out.name
    plan = gguf_file.write_gguf(source, weights, dtype)
    modelfile = staging / ollama.modelfile_path(out).name
    atomic_write_text(modelfile, ollama.modelfile(source, out.name))
    return [weights, modelfile], gguf_file.precision_notes(plan, dtype)


def _gguf_targets(out: Path) -> list[Path]:
    return [out, ollama.modelfile_path(out)]


def _gguf_ready() -> None:
    gguf_file.require_gguf()


@dataclass(frozen=True)
class Format:
    """One `--format`: its writer, the `--dtype` values it takes, and what `--out` names."""

    writer: Writer
    dtypes: tuple[str, ...]
    default_dtype: str
    targets: Callable[[Path], list[Path]] | None = None
    """The files `--out` becomes, side by side (GGUF and its Modelfile); None: `--out` is a
    folder, written whole."""
    suffix: str | None = None
    """What `--out` must end with (a file format's extension)."""
    ready: Callable[[], None] = lambda: None
    """Raises a one-line `UserError` when an optional package the writer needs is missing."""
    dtype_note: str = ""
    """Why a --dtype is refused, after the list of those taken."""


FORMATS: dict[str, Format] = {
    "hf": Format(
        _write_hf,
        ("f32",),
        "f32",
        dtype_note=" (the run's own float32 weights; --format gguf takes f32, f16, q8_0)",
    ),
    "gguf": Format(
        _write_gguf,
        gguf_file.DTYPES,
        gguf_file.DEFAULT_DTYPE,
        targets=_gguf_targets,
        suffix=".gguf",
        ready=_gguf_ready,
    ),
}
"""Format name (`--format`) -> how it is written."""


@dataclass
class ExportReport:
    """What an export wrote, for the CLI's summary."""

    out: Path
    format: str
    dtype: str = "f32"
    files: list[tuple[str, int]] = field(default_factory=list)
    """Each file's name and size in bytes, in the order written."""
    notes: list[str] = field(default_factory=list)
    """What the format could not keep as asked (a weight q8_0 cannot hold, stored f16)."""
    parameters: int = 0
    merged_lora: bool = False
    chat: bool = False
    seconds: float = 0.0


def check_format(fmt: str, dtype: str | None = None) -> tuple[Format, str]:
    """The format `fmt` and the dtype it writes (`dtype`, or the format's default), or a
    one-line refusal naming what there is."""
    spec = FORMATS.get(fmt)
    if spec is None:
        raise UserError(f"--format {fmt}: unknown format; choose one of: {', '.join(FORMATS)}")
    chosen = spec.default_dtype if dtype is None else dtype
    if chosen not in spec.dtypes:
        raise UserError(
            f"--dtype {chosen}: --format {fmt} writes {', '.join(spec.dtypes)}{spec.dtype_note}"
        )
    spec.ready()
    return spec, chosen


def export_run(
    run_dir: Path, fmt: str, out: Path, *, overwrite: bool = False, dtype: str | None = None
) -> ExportReport:
    """Write `run_dir` as `fmt` at `out`: whole, or (on any error) not at all."""
    start = time.perf_counter()
    spec, chosen = check_format(fmt, dtype)
    if spec.suffix is not None and out.suffix != spec.suffix:
        raise UserError(
            f"{out}: --format {fmt} writes one file; give --out a name ending in {spec.suffix}"
        )
    targets = spec.targets(out) if spec.targets is not None else [out]
    for target in targets:
        check_output(target, run_dir, overwrite=overwrite, is_file=spec.targets is not None)
    source = open_source(run_dir)  # checks the run before loading it
    if spec.targets is None:
        with staged_folder(out) as staging:
            written, notes = spec.writer(source, staging, out, chosen)
            files = [(path.name, path.stat().st_size) for path in written]
    else:
        with staged_files(targets) as staging:
            written, notes = spec.writer(source, staging, out, chosen)
            files = [(path.name, path.stat().st_size) for path in written]
    return ExportReport(
        out=out,
        format=fmt,
        dtype=chosen,
        files=files,
        notes=notes,
        parameters=source.weights.parameters,
        merged_lora=source.merged_lora,
        chat=source.chat,
        seconds=time.perf_counter() - start,
    )
