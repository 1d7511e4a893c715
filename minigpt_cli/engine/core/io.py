"""Every file minigpt writes goes through here: atomic replacement, and one seam for failures.

Atomic writes: write to a temporary name in the same directory, fsync it, rename over the target,
fsync the directory so the rename itself survives a power cut. A crash at any instant leaves
either the old file or the new one, never half; a failed write removes its temporary file.

The seam: every write site (these functions, the metrics log, the shard writer, snapshot
publication, the run lock) calls `before_write(path)` first. Normally it does nothing. With the
environment variable MINIGPT_FAULT set to `ERRNO@N` (`ENOSPC@7`, `EACCES@1`, `EROFS@3`,
`EMFILE@5`, `ENOENT@9`...), the process's Nth write and every later one fail with that error, as
a disk that fills stays full; `kill@N` SIGKILLs the process at its Nth write (a power cut at that
instant). The tests and `benchmarks/crash_consistency.py` use it to fail every write site for
real, through the same error paths a full disk takes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

FAULT_ENV = "MINIGPT_FAULT"

_UMASK = os.umask(0o022)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK  # what open() would give; mkstemp alone gives 0o600


class _FaultCounter:
    """Writes counted since the MINIGPT_FAULT value last changed (so tests in one process can
    set a new fault and count from 1 again)."""

    spec: str | None = None
    count = 0


def before_write(path: str | Path) -> None:
    """The seam every write passes: raises the injected fault, if any, for `path`."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    if spec != _FaultCounter.spec:
        _FaultCounter.spec, _FaultCounter.count = spec, 0
    _FaultCounter.count += 1
    name, _, at = spec.partition("@")
    try:
        first = int(at)
    except ValueError:
        raise ValueError(f"{FAULT_ENV}={spec!r}: expected ERRNO@N or kill@N") from None
    if _FaultCounter.count < first:
        return
    if name == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    code = getattr(errno, name, None)
    if not isinstance(code, int):
        raise ValueError(f"{FAULT_ENV}={spec!r}: {name} is not an errno name")
    raise OSError(code, os.strerror(code), str(path))


def fsync_dir(directory: Path) -> None:
    """Make a rename inside `directory` durable (best effort where directories cannot be opened)."""
    with contextlib.suppress(OSError):  # some filesystems refuse to open a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def make_dir(path: str | Path) -> Path:
    """`mkdir -p path` through the seam (a no-op, and no counted write, when it exists)."""
    folder = Path(path)
    if not folder.is_dir():
        before_write(folder)
        folder.mkdir(parents=True, exist_ok=True)
    return folder


def atomic_write_bytes(path: str | Path, *parts: bytes | memoryview) -> None:
    """Replace `path` with `parts` written one after the other, atomically (creating its folder);
    nothing is left on failure. Parts rather than one buffer: a caller need not join its pieces
    into one more copy of a large file."""
    target = Path(path)
    make_dir(target.parent)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            before_write(target)
            os.fchmod(handle.fileno(), _FILE_MODE)
            for part in parts:
                handle.write(part)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    fsync_dir(target.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace `path` with UTF-8 `text` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def open_for_append(path: str | Path) -> IO[str]:
    """A UTF-8 text handle appending to `path` (the metrics log), opened through the seam."""
    before_write(path)
    return Path(path).open("a", encoding="utf-8")


def append_line(handle: IO[str], line: str) -> None:
    """Append one line and flush it, through the seam (a full disk fails here, not later)."""
    before_write(handle.name)
    handle.write(line + "\n")
    handle.flush()


@dataclass(frozen=True)
class WritableFolder:
    """What `check_writable` learned about a folder: that it takes files, and whether its
    filesystem takes hard links (a run's top-level files are links into its newest snapshot, or
    copies where links fail: the disk plan counts those)."""

    path: Path
    hard_links: bool


def check_writable(folder: str | Path) -> WritableFolder:
    """Prove a file can be written where `folder` is or will be, without creating it.

    Writes and removes a probe file in `folder`, or in its nearest existing ancestor when it does
    not exist yet; the probe is also linked to a second name (removed with it) to learn whether
    the filesystem takes hard links. One write through the seam. Raises the OSError the system
    gives (a path under a file, permission denied, a read-only filesystem), so a verb can refuse
    before it starts work rather than fail at its first save.
    """
    target = Path(folder)
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(target))
    before_write(target)
    fd, probe = tempfile.mkstemp(prefix=".minigpt-write-check.", suffix=".tmp", dir=existing)
    os.close(fd)
    link = f"{probe[: -len('.tmp')]}.link"  # names `remove_temporaries` clears after a kill
    try:
        os.link(probe, link)
    except OSError:
        hard_links = False
    else:
        hard_links = True
        os.unlink(link)
    finally:
        os.unlink(probe)
    return WritableFolder(target, hard_links)
