"""Checkpoints and run directories: atomic, inspectable, never unpickled.

A checkpoint is a folder of safetensors files plus `trainer_state.json`. Each save writes a complete
snapshot under `checkpoints/step-NNNNNNNN/` (built in a temporary folder, then renamed), and only
then points the run's top-level files at it (hard links, each swapped in atomically, the state file
last). Every tensor file records its step in the safetensors metadata, so a crash between two swaps
is detected on resume and the newest complete snapshot is used instead.

The names of a run's files and the safetensors I/O live in `runs.files`; opening a run for use
(weights, tokenizer, the parent chain of a LoRA run) in `runs.load`. This module imports torch only
inside the functions that handle tensors, so the CLI can check a run's state before loading it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import time
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from minigpt_cli.engine.core.io import (
    append_line,
    atomic_write_text,
    before_write,
    fsync_dir,
    make_dir,
    open_for_append,
)
from minigpt_cli.engine.runs.files import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    LOCK_FILE,
    METRICS_FILE,
    MODEL_FILE,
    STATE_FILE,
    read_metadata,
    save_tensors,
)
from minigpt_cli.errors import MACHINE_ERRNOS, UserError

if TYPE_CHECKING:
    import torch

_SNAPSHOT_PREFIX = "step-"


# ----------------------------------------------------------------------------- optimizer state


def optimizer_tensors(
    optimizer: torch.optim.Optimizer, names: dict[int, str]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Flatten optimizer state into named tensors (keyed by parameter name, not position)."""
    import torch  # lazy: the rest of this module serves run-state checks that need no torch

    tensors: dict[str, torch.Tensor] = {}
    state = optimizer.state_dict()
    groups = []
    for group in state["param_groups"]:
        groups.append(
            {
                **{k: v for k, v in group.items() if k != "params"},
                "params": [names[index] for index in group["params"]],
            }
        )
    for index, param_state in state["state"].items():
        for key, value in param_state.items():
            tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"{names[index]}::{key}"] = tensor
    return tensors, {"param_groups": json.dumps(groups)}


def restore_optimizer(
    optimizer: torch.optim.Optimizer,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    names: dict[int, str],
) -> None:
    """Inverse of `optimizer_tensors`; refuses a state saved for different parameters."""
    index_of = {name: index for index, name in names.items()}
    saved_groups = json.loads(metadata.get("param_groups", "[]"))
    current = optimizer.state_dict()
    if [g["params"] for g in saved_groups] != [
        [names[i] for i in g["params"]] for g in current["param_groups"]
    ]:
        raise UserError(
            "optimizer.safetensors was saved for different trainable parameters than this run has"
        )
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        name, _, field = key.rpartition("::")
        if name not in index_of:
            raise UserError(f"optimizer.safetensors: state for unknown parameter {name!r}")
        state.setdefault(index_of[name], {})[field] = tensor
    groups = []
    for saved, live in zip(saved_groups, current["param_groups"], strict=True):
        restored = {k: v for k, v in saved.items() if k != "params"}
        if "betas" in restored:
            restored["betas"] = tuple(restored["betas"])
        groups.append({**restored, "params": live["params"]})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ----------------------------------------------------------------------------- snapshots


def _snapshot_step(path: Path) -> int | None:
    name = path.name
    if not name.startswith(_SNAPSHOT_PREFIX) or not name[len(_SNAPSHOT_PREFIX) :].isdigit():
        return None
    return int(name[len(_SNAPSHOT_PREFIX) :])


def snapshots(run_dir: Path) -> list[Path]:
    """Complete snapshot folders, oldest first."""
    folder = run_dir / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and _snapshot_step(p) is not None]
    return sorted(found, key=lambda p: _snapshot_step(p) or 0)


def _link_into_place(source: Path, target: Path) -> None:
    """Make `target` the same file as `source`, atomically (a hard link, else a copy)."""
    with contextlib.suppress(FileNotFoundError):
        if os.path.samefile(source, target):
            return  # already published (renaming a link onto its twin would leave the link)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.link")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    try:
        before_write(target)
        try:
            os.link(source, temporary)
        except OSError as error:
            if error.errno in MACHINE_ERRNOS:
                raise
            shutil.copyfile(source, temporary)  # a filesystem without hard links
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise


def save_checkpoint(
    run_dir: Path,
    step: int,
    tensor_files: dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]],
    trainer_state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write snapshot `step` with the given safetensors files and state, then publish it.

    `tensor_files` maps a file name (model.safetensors, optimizer.safetensors, adapter...) to its
    tensors and metadata; each file's metadata gets `step` so resume can check consistency.
    """
    folder = run_dir / CHECKPOINTS_DIR
    if not run_dir.is_dir():  # removed under the running job: do not rebuild half a run
        raise FileNotFoundError(errno.ENOENT, "the run folder was removed", str(run_dir))
    make_dir(folder)
    final = folder / f"{_SNAPSHOT_PREFIX}{step:08d}"
    building = folder / f".{final.name}.tmp"
    shutil.rmtree(building, ignore_errors=True)
    try:
        before_write(building)
        building.mkdir()
        for file_name, (tensors, metadata) in tensor_files.items():
            save_tensors(building / file_name, tensors, {**metadata, "step": str(step)})
        state = {**trainer_state, "step": step, "files": sorted(tensor_files)}
        atomic_write_text(building / STATE_FILE, json.dumps(state, indent=2, sort_keys=True) + "\n")
        if final.exists():
            shutil.rmtree(final)
        before_write(final)
        os.replace(building, final)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)  # a failed save leaves no half snapshot
        raise
    fsync_dir(folder)
    _publish(final, run_dir, sorted(tensor_files))
    _prune(run_dir, keep_last)
    return final


def _prune(run_dir: Path, keep_last: int) -> None:
    """Drop all but the newest `keep_last` snapshots."""
    for old in snapshots(run_dir)[: -max(keep_last, 1)]:
        shutil.rmtree(old, ignore_errors=True)


def _publish(snapshot: Path, run_dir: Path, file_names: list[str]) -> None:
    """Point the run's top-level files at `snapshot` (tensor files first, the state last)."""
    for file_name in [*file_names, STATE_FILE]:
        _link_into_place(snapshot / file_name, run_dir / file_name)
    fsync_dir(run_dir)


def republish(run_dir: Path, keep_last: int | None = None) -> Path | None:
    """Finish a publication a crash cut short: when the run's top-level files disagree (some from
    the newest snapshot, some from the one before), point them all at the newest complete snapshot.
    Returns the resume point. Without this, a run that had saved its last step would resume to
    "nothing to do" with mixed top-level files. With `keep_last`, also the pruning that save would
    have done next (without it, a kill in the last save kept one snapshot too many for good)."""
    point = find_resume_point(run_dir)
    if point is not None and point != run_dir:
        _publish(point, run_dir, list(read_state(point).get("files", [])))
    if point is not None and keep_last is not None:
        _prune(run_dir, keep_last)
    return point


def remove_temporaries(run_dir: Path) -> list[Path]:
    """Delete what a killed writer left half-made in `run_dir` (temporary files, snapshot folders
    being built, links being swapped), and in the runs inside it (RLHF's reward/, written under
    the same lock); returns what was removed. Call it holding the run lock."""
    removed = []
    sub_runs = [child for child in _subfolders(run_dir) if holds_run(child)]
    for sub_run in sub_runs:
        removed += remove_temporaries(sub_run)
    for folder in (run_dir, run_dir / CHECKPOINTS_DIR):
        if not folder.is_dir():
            continue
        for child in folder.iterdir():
            name = child.name
            if not name.startswith(".") or not name.endswith((".tmp", ".link")):
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    child.unlink()
            removed.append(child)
    return removed


def _subfolders(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return [c for c in folder.iterdir() if c.is_dir() and c.name != CHECKPOINTS_DIR]


def read_state(directory: Path) -> dict[str, Any]:
    """`trainer_state.json` of a run or snapshot folder."""
    path = directory / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise UserError(f"{directory}: not a run directory (no {STATE_FILE})") from error
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: unreadable trainer state ({error})") from error
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise UserError(f"{path}: not a minigpt trainer state (no integer 'step')")
    return state


def _is_consistent(directory: Path) -> bool:
    try:
        state = read_state(directory)
        return all(
            read_metadata(directory / name).get("step") == str(state["step"])
            for name in state.get("files", [])
        )
    except UserError:
        return False


def find_resume_point(run_dir: Path) -> Path | None:
    """Where to resume: the run itself if its files agree, else the newest good snapshot."""
    if _is_consistent(run_dir):
        return run_dir
    for snapshot in reversed(snapshots(run_dir)):
        if _is_consistent(snapshot):
            return snapshot
    return None


# ----------------------------------------------------------------------------- run directories


def holds_run(run_dir: Path) -> bool:
    """Whether `run_dir` already contains a run (anything a training verb writes)."""
    markers = (CONFIG_FILE, STATE_FILE, MODEL_FILE, METRICS_FILE, CHECKPOINTS_DIR)
    return any((run_dir / marker).exists() for marker in markers)


def clear_run(run_dir: Path, keep: Collection[str] = ()) -> None:
    """Empty a run directory for --overwrite (everything but the lock we hold and `keep`)."""
    for child in run_dir.iterdir():
        if child.name == LOCK_FILE or child.name in keep:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


class RunLock:
    """One writer per run directory: a lock file naming the holder, taken over when it died."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self.held = False

    def acquire(self) -> None:
        make_dir(self.path.parent)
        payload = json.dumps(
            {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
        )
        for _ in range(3):
            try:
                before_write(self.path)
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder = json.loads(self.path.read_text(encoding="utf-8"))
                    pid, host = int(holder["pid"]), str(holder["host"])
                except (OSError, ValueError, KeyError, TypeError):
                    pid, host = -1, socket.gethostname()  # unreadable lock: treat as stale
                alive = pid > 0 and psutil.pid_exists(pid) and pid != os.getpid()
                if host != socket.gethostname() or alive:
                    raise UserError(
                        f"{self.path.parent}: in use by process {pid} on {host} "
                        f"(lock {self.path}); wait for it to finish or stop it"
                    ) from None
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()  # stale lock from a dead process: take it over
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(payload)
            self.held = True
            return
        raise UserError(f"{self.path}: could not take the run lock")

    def release(self) -> None:
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class MetricsLog:
    """metrics.jsonl: one JSON object per line, flushed as written; trimmed on resume."""

    def __init__(self, path: Path, keep_through_step: int | None = None) -> None:
        self.path = path
        if keep_through_step is not None and path.exists():
            kept = []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if isinstance(record, dict) and int(record.get("step", 0)) <= keep_through_step:
                    kept.append(line)
            atomic_write_text(path, "".join(f"{line}\n" for line in kept))
        self._handle = open_for_append(path)

    def write(self, record: dict[str, Any]) -> None:
        append_line(self._handle, json.dumps(record, ensure_ascii=False))

    def close(self) -> None:
        # After a failed write (a full disk) the flush inside close fails again: the lines that
        # made it are on disk, a cut one is skipped on resume.
        with contextlib.suppress(OSError):
            self._handle.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """All complete records of a run's metrics.jsonl."""
    path = run_dir / METRICS_FILE
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return records
