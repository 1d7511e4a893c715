"""Where an export is written: checked first, built under a temporary name, renamed into place.

A failure at any point (a bad run found late, a full disk, Ctrl-C) leaves the destination as it
was and no temporary folder behind; another program never sees half an export. With --overwrite
the old destination is moved aside, the new one renamed in, and only then is the old one removed.
A destination that holds a minigpt run, or the run being exported, is never overwritten.

Two shapes: a folder (`staged_folder`, the Hugging Face export) is built whole and renamed; a
set of files beside each other (`staged_files`: a GGUF file and its Ollama Modelfile) is built in
a temporary folder beside them and each file renamed into place, the ones already renamed put
back if a later rename fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from minigpt_cli.engine.core.io import fsync_dir, make_dir
from minigpt_cli.engine.runs.files import CHECKPOINTS_DIR, CONFIG_FILE, METRICS_FILE, STATE_FILE
from minigpt_cli.errors import UserError

# What only a minigpt run holds (`model.safetensors` is in every Hugging Face export too).
_RUN_MARKERS = (STATE_FILE, CONFIG_FILE, METRICS_FILE, CHECKPOINTS_DIR)


def _holds_run(folder: Path) -> bool:
    return folder.is_dir() and any((folder / marker).exists() for marker in _RUN_MARKERS)


def check_output(out: Path, run_dir: Path, *, overwrite: bool, is_file: bool = False) -> None:
    """Refuse, before any work, a destination the export may not write (one line, exit 2).
    `is_file`: the export writes a file at `out` (GGUF), never in place of a folder."""
    target, run = out.resolve(), run_dir.resolve()
    if target == run or run.is_relative_to(target):
        raise UserError(
            f"{out}: the export would replace the run it is made from; choose another --out"
        )
    if target.is_relative_to(run):
        raise UserError(f"{out}: inside the run directory {run_dir}; choose a path outside it")
    if not (out.exists() or out.is_symlink()):
        return
    if is_file and out.is_dir():
        raise UserError(f"{out}: is a folder; this format writes a file, so name one in --out")
    if not overwrite:
        raise UserError(f"{out}: already exists; choose another --out, or pass --overwrite")
    if _holds_run(out):
        raise UserError(f"{out}: holds a minigpt run, which --overwrite never replaces")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """A new empty folder beside `out` to write the export into; renamed to `out` when the block
    ends normally (replacing what `check_output` allowed to be replaced), removed otherwise."""
    parent = make_dir(out.parent)
    staging = parent / f".{out.name}.partial-{os.getpid()}"
    _remove(staging)
    staging.mkdir()
    try:
        yield staging
        old = parent / f".{out.name}.old-{os.getpid()}"
        replaced = out.exists() or out.is_symlink()
        if replaced:
            os.replace(out, old)
        try:
            os.replace(staging, out)
        except BaseException:
            if replaced:
                os.replace(old, out)
            raise
        fsync_dir(parent)
        if replaced:
            _remove(old)
    finally:
        _remove(staging)


@contextlib.contextmanager
def staged_files(targets: list[Path]) -> Iterator[Path]:
    """A new empty folder beside `targets` (files in one folder) to write them into, each under
    its target's name; when the block ends normally each is renamed onto its target (replacing
    what `check_output` allowed), and if one rename fails the targets renamed so far get their
    old files back. On any failure nothing new is left, and the staging folder never is."""
    parent = make_dir(targets[0].parent)
    first = targets[0].name
    staging = parent / f".{first}.partial-{os.getpid()}"
    _remove(staging)
    staging.mkdir()
    moved: list[tuple[Path, Path | None]] = []  # (target, its old file set aside, if any)
    try:
        yield staging
        for target in targets:
            old: Path | None = None
            if target.exists() or target.is_symlink():
                old = parent / f".{target.name}.old-{os.getpid()}"
                os.replace(target, old)
            moved.append((target, old))
            os.replace(staging / target.name, target)
        fsync_dir(parent)
    except BaseException:
        for target, old in reversed(moved):
            _remove(target)
            if old is not None:
                os.replace(old, target)
        moved.clear()
        raise
    finally:
        for _, old in moved:
            if old is not None:
                _remove(old)
        _remove(staging)
