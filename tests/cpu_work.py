"""Work for child processes the governor runs (stdlib only, so a spawned child starts fast)."""

from __future__ import annotations

import time


def burn_cpu(seconds: float) -> str:
    """Busy-loop for `seconds` of this process's CPU time (run in a child by the test below)."""
    start = time.process_time()
    while time.process_time() - start < seconds:
        pass
    return "done"


def fail_loudly() -> None:
    raise ValueError("Vocabulary size too high (9000). Please set it to a value <= 800.")
