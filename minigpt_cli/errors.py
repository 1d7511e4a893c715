"""The two kinds of failure a user is shown as one line: their mistake, or the machine's refusal.

Everything a user can get wrong (config, data, paths, checkpoints, flags) raises `UserError`; the
CLI turns it into one line on stderr and exit status 2, with a traceback only under `--debug`.
Engine code raises it too, so the same checks hold when minigpt is used as a library.

Operating-system failures (`OSError`: a full disk, a read-only filesystem, a path under a file, too
many open files) are described by `describe_os_error`, which names the path and the cause in words.
One that stops work already under way (a training run) becomes `RunFailed`, exit status 3, whose
line also says what was kept and the command that continues.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

EXIT_USER = 2
"""Exit status for what the user can fix before starting: input, flags, paths, free space."""

EXIT_MACHINE = 3
"""Exit status for a machine failure during work (disk filled, file vanished, too many open
files): the line says what was kept and how to continue."""


class UserError(Exception):
    """A problem the user can fix; `str()` is the one line shown to them."""

    exit_code = EXIT_USER


class RunFailed(Exception):
    """The machine refused something while a run was under way; `str()` is the one line shown
    (what happened, what was kept, the command that continues)."""

    exit_code = EXIT_MACHINE


def location(path: str | Path, line: int | None = None, column: int | None = None) -> str:
    """Format `path:line:column` the way every error message names a place in a file."""
    text = str(path)
    if line is not None:
        text += f":{line}"
        if column is not None:
            text += f":{column}"
    return text


# What each error number means to someone who did not write the program, and what to do.
_CAUSES: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on the device", "free some space"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or raise the quota"),
    errno.EACCES: ("permission denied", "choose a folder you can write to, or fix its permissions"),
    errno.EPERM: ("operation not permitted", "choose a folder you can write to"),
    errno.EROFS: ("read-only filesystem", "choose a folder on a writable disk"),
    errno.ENOENT: ("no such file or folder", "check the path (was it moved or deleted?)"),
    errno.EISDIR: ("is a folder, not a file", "give the path of a file"),
    errno.EMFILE: ("too many open files", "raise the limit (`ulimit -n 4096`) or close programs"),
    errno.ENFILE: ("too many open files on the system", "close programs, then try again"),
    errno.EIO: ("input/output error (the disk or its connection failed)", "check the disk"),
    errno.ENAMETOOLONG: ("file name too long", "choose a shorter path"),
    errno.EFBIG: ("file too large for this filesystem or limit", "choose another disk"),
}

MACHINE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EMFILE, errno.ENFILE, errno.EFBIG}
)
"""Failures of the machine rather than of the path given: exit 3 even outside a training run."""


def _file_in_the_way(path: Path) -> Path | None:
    """The first existing ancestor of `path` that is a file (what makes `a.txt/run` fail)."""
    for parent in [*reversed(path.parents), path]:
        if parent.exists() and not parent.is_dir():
            return parent
        if not parent.exists():
            return None
    return None


def describe_os_error(error: OSError) -> str:
    """`path: cause; advice` in words, for any OSError (the path is the one the system named)."""
    path = error.filename
    where = f"{path}: " if path is not None else ""
    code = error.errno
    if code == errno.ENOTDIR and path is not None:
        blocker = _file_in_the_way(Path(os.fsdecode(path)))
        what = f"{blocker} is a file, not a folder" if blocker else "a part of the path is a file"
        return f"{where}{what}; choose another path"
    if code in _CAUSES:
        cause, advice = _CAUSES[code]
        return f"{where}{cause}; {advice}"
    return f"{where}{error.strerror or error}"


def advice_for(error: OSError) -> str:
    """What to do about `error` before continuing (the second half of `describe_os_error`)."""
    return _CAUSES.get(error.errno or 0, ("", "fix the cause"))[1]


def cause_of(error: OSError) -> str:
    """The cause of `error` in words, without path or advice."""
    if error.errno == errno.ENOTDIR:
        return "a part of the path is a file, not a folder"
    return _CAUSES.get(error.errno or 0, (error.strerror or str(error), ""))[0]
