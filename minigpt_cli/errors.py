"""The one kind of error a user can cause.

Everything a user can get wrong (config, data, paths, checkpoints, flags) raises `UserError`; the
CLI turns it into one line on stderr and exit status 2, with a traceback only under `--debug`.
Engine code raises it too, so the same checks hold when minigpt is used as a library.
"""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """A problem the user can fix; `str()` is the one line shown to them."""

    exit_code = 2


def location(path: str | Path, line: int | None = None, column: int | None = None) -> str:
    """Format `path:line:column` the way every error message names a place in a file."""
    text = str(path)
    if line is not None:
        text += f":{line}"
        if column is not None:
            text += f":{column}"
    return text
