"""A `minigpt serve` server in a thread of the test process, for tests/test_serve*.py.

The real application and engine on a free localhost port, serving the shared tiny runs (the
pretrained one as "base", its SFT child as "chat"). `RecordingEngine` notes how each job ended and
holds one seed's streamed job at a gate after its first text, so a test can disconnect (or press
the page's stop button) while a generation is surely still running, however fast the model is.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from minigpt_cli.engine.serve.completion import Cancelled, Choice, Engine, Job, ServedModel

KEY = "test-key"
GATED_SEED = 4242  # a streamed request with this seed pauses after its first text


class RecordingEngine(Engine):
    """The real engine, noting how each job ended; one seed's job waits at a gate mid-stream."""

    def __init__(self, models: list[ServedModel]) -> None:
        super().__init__(models)
        self.outcomes: list[tuple[int | None, str]] = []
        self.flags: dict[int | None, threading.Event | None] = {}
        self.gate = threading.Event()

    def run(
        self,
        job: Job,
        on_delta: Any = None,
        cancelled: threading.Event | None = None,
    ) -> list[Choice]:
        gated = job.settings.seed == GATED_SEED and on_delta is not None
        self.flags[job.settings.seed] = cancelled

        def delta(index: int, text: str) -> None:
            on_delta(index, text)
            if gated:
                self.gate.wait(timeout=30)

        try:
            choices = super().run(job, delta if on_delta is not None else None, cancelled)
        except Cancelled:
            self.outcomes.append((job.settings.seed, "cancelled"))
            raise
        self.outcomes.append((job.settings.seed, "finished"))
        return choices

    def outcome(self, seed: int, timeout: float = 20) -> str | None:
        """How the job with `seed` ended, waiting for it up to `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [outcome for s, outcome in self.outcomes if s == seed]
            if found:
                return found[-1]
            time.sleep(0.05)
        return None


@contextlib.contextmanager
def serving(
    pretrain_run: Path, sft_run: Path, key: str | None = KEY
) -> Iterator[tuple[str, RecordingEngine]]:
    """(base URL, engine) of a server running until the block ends."""
    import uvicorn

    from minigpt_cli.cli.serve_cmd import bind
    from minigpt_cli.engine.runs.load import load_run
    from minigpt_cli.engine.serve.app import create_app

    engine = RecordingEngine(
        [ServedModel("base", load_run(pretrain_run)), ServedModel("chat", load_run(sft_run))]
    )
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(
        uvicorn.Config(create_app(engine, key), log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", engine
    finally:
        engine.gate.set()
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
