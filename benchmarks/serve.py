"""Time to first token and tokens/s of `minigpt serve`, for 1 and 8 concurrent streaming clients.

Each run is served by the real command (`python -m minigpt_cli serve RUN --port 0`, a process of
its own, its default thread choice). Clients are threads of this process, each with one kept-alive
connection, each sending `--requests` streamed `/v1/completions` requests one after another
(`ignore_eos`, so every answer is exactly `--max-tokens` tokens; temperature 0.8, a seed per
request). For each request it records the wall clock from sending to the first text (time to
first token, TTFT) and from the first text to `[DONE]`; per round it reports the median TTFT, the
median per-stream decoding rate ((tokens - 1) / time after the first token) and the aggregate rate
(all tokens / the round's wall time). The server decodes one request at a time, so with 8 clients
the aggregate is what one client gets, and TTFT includes the wait in the queue. As the peer,
`minigpt generate -v --ignore-eos` reports its own tokens/s for the same run and budget (decoding
without HTTP).

Rounds are interleaved (every run and client count once per round, then again), and each figure is
the median of the rounds with their range. The machine is shared: other work moves these numbers.

    python benchmarks/serve.py                         # 3-step tiny and small runs trained first
    python benchmarks/serve.py --run tiny=runs/pretrain-tiny --rounds 5

Needs the serve extra and httpx (`pip install -e ".[serve,test]"`). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Once upon a time"


def cli(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "minigpt_cli", *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        **kwargs,  # type: ignore[arg-type]
    )


def train(preset: str, folder: Path) -> Path:
    """A 3-step pretraining run of `preset` (speed does not depend on what the weights learned)."""
    run = folder / f"pretrain-{preset}"
    if not (run / "model.safetensors").exists():
        done = cli(
            "pretrain", "--preset", preset, "--out", str(run), "--max-steps", "3",
            "--device", "cpu", "--set", "log.plot=false", "--overwrite",
        )  # fmt: skip
        if done.returncode != 0:
            sys.exit(f"training {preset} failed:\n{done.stderr}")
    return run


class Server:
    """`minigpt serve RUN --port 0` in its own process; `url` is the API base it printed."""

    def __init__(self, run: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "minigpt_cli", "serve", str(run), "--port", "0",
             "--device", "cpu", "--name", "bench"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if "OpenAI API base URL" not in line:
            sys.exit(f"serve did not start: {line}{self.process.stderr.read()}")  # type: ignore[union-attr]
        self.url = line.split("OpenAI API base URL ", 1)[1].split()[0]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def one_request(
    client: httpx.Client, url: str, seed: int, max_tokens: int
) -> tuple[float, float, int]:
    """(seconds to the first text, seconds from it to the end, tokens) of one streamed request."""
    body = {
        "model": "bench",
        "prompt": f"{PROMPT} {seed}",
        "max_tokens": max_tokens,
        "temperature": 0.8,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    start = time.perf_counter()
    first = None
    tokens = 0
    with client.stream("POST", url + "/completions", json=body, timeout=600) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter()
    end = time.perf_counter()
    assert first is not None and tokens == max_tokens, (tokens, max_tokens)
    return first - start, end - first, tokens


def measure(url: str, clients: int, requests: int, max_tokens: int, round_index: int) -> dict:
    """One round: `clients` threads, each sending `requests` requests back to back."""
    results: list[tuple[float, float, int]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(index: int) -> None:
        # One connection per client, kept alive, as an SDK client keeps it (creating an httpx
        # client costs ~60 ms here, loading the certificate store: not the server's time).
        with httpx.Client() as connection:
            barrier.wait()
            for k in range(requests):
                seed = 1000 * round_index + 100 * index + k
                outcome = one_request(connection, url, seed, max_tokens)
                with lock:
                    results.append(outcome)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    return {
        "ttft": statistics.median(r[0] for r in results),
        "stream": statistics.median((r[2] - 1) / r[1] for r in results),
        "aggregate": sum(r[2] for r in results) / wall,
    }


def generate_rate(run: Path, max_tokens: int) -> float:
    """Tokens/s `minigpt generate -v --ignore-eos` reports for the same budget (no HTTP)."""
    done = cli(
        "generate", str(run), "-p", PROMPT, "-n", str(max_tokens), "--ignore-eos", "-v",
        "--device", "cpu", "--seed", "1",
    )  # fmt: skip
    line = done.stderr.strip().splitlines()[-1]
    return float(line.split("(", 1)[1].split(" tokens/s", 1)[0])


def spread(values: list[float], fmt: str) -> str:
    middle, low, high = (
        format(v, fmt) for v in (statistics.median(values), min(values), max(values))
    )
    return f"{middle} ({low}–{high})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", default=[], metavar="NAME=DIR")
    parser.add_argument("--presets", default="tiny,small", help="trained when no --run is given")
    parser.add_argument("--work", type=Path, default=None, help="where the runs are trained")
    parser.add_argument("--clients", default="1,8")
    parser.add_argument("--requests", type=int, default=3, help="per client per round")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    runs: dict[str, Path] = {}
    if args.run:
        for item in args.run:
            name, _, folder = item.partition("=")
            runs[name] = Path(folder)
    else:
        work = args.work or Path(tempfile.mkdtemp(prefix="minigpt-serve-bench-"))
        for preset in args.presets.split(","):
            runs[preset] = train(preset, work)
    counts = [int(c) for c in args.clients.split(",")]

    servers = {name: Server(run) for name, run in runs.items()}
    table: dict[tuple[str, int], list[dict]] = {}
    peers: dict[str, list[float]] = {name: [] for name in runs}
    try:
        with httpx.Client() as connection:  # warm-up: the first request pays one-off costs
            for server in servers.values():
                one_request(connection, server.url, 0, 4)
        for round_index in range(args.rounds):
            for name, server in servers.items():
                for clients in counts:
                    row = measure(server.url, clients, args.requests, args.max_tokens, round_index)
                    table.setdefault((name, clients), []).append(row)
                    print(f"round {round_index + 1} {name} x{clients}: {row}", file=sys.stderr)
                peers[name].append(generate_rate(runs[name], args.max_tokens))
    finally:
        for server in servers.values():
            server.stop()

    load = os.getloadavg()[0]
    print(
        f"\n{args.max_tokens} tokens per request, {args.requests} requests per client per round, "
        f"median (range) of {args.rounds} rounds; load average at the end {load:.1f} "
        f"on {os.cpu_count()} cores\n"
    )
    print(
        "| run | clients | TTFT ms | tokens/s per stream | tokens/s all clients "
        "| `generate -v` tokens/s |"
    )
    print("|---|---|---|---|---|---|")
    for (name, clients), rows in table.items():
        ttft = [1000 * r["ttft"] for r in rows]
        print(
            f"| {name} | {clients} | {spread(ttft, '.0f')} | "
            f"{spread([r['stream'] for r in rows], '.1f')} | "
            f"{spread([r['aggregate'] for r in rows], '.1f')} | {spread(peers[name], '.1f')} |"
        )


if __name__ == "__main__":
    main()
