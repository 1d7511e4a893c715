"""Throughput of pretraining in one process, two processes and two "machines" under torchrun.

Three ways to run the same pretraining on this machine, one thread per process:

- `1 process`: `minigpt pretrain ... --threads 1`;
- `2 processes`: the same with `--nproc 2` (torchrun --standalone, gloo);
- `2 nodes`: two commands, `--nproc 1 --nnodes 2 --node-rank 0|1 --master-addr 127.0.0.1
  --master-port P`, as two machines would run them (torchrun's static rendezvous over TCP).

For each preset (tiny and small by default) and each way, `--repeats` interleaved runs (every way
once, then again), each measured as the wall clock of the whole command (start-up, data, training,
evaluations, saves) and the run's own tokens/s (its train rows after the first, whose window holds
the warm-up step: tokens over the run's clock). Scaling efficiency: the two-process tokens/s over
twice the one-process figure (1.0: two processes train twice as fast). The global batch is the
same in every way, so all three train the same model (test_distributed.py checks that).

    python benchmarks/ddp.py --repeats 3
    python benchmarks/ddp.py --presets tiny --steps 200 --repeats 2

A tokenizer and the encoded built-in corpus are made once per preset beforehand and reused, so
the runs differ only in how they train. Prints a markdown table (median and range per cell) and
the load average before and after (a shared machine's figures move with what else runs on it).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WAYS = ("1 process", "2 processes", "2 nodes")
# Per preset: steps and what makes its step shareable by two ranks (tiny trains one micro-batch
# a step: halved, so each rank takes one).
PRESETS = {
    "tiny": (200, ["--set", "train.micro_batch_size=4"]),
    "small": (12, []),
}


def _command(preset: str, steps: int, prepared: Path, run_dir: Path) -> list[str]:
    extra = PRESETS[preset][1]
    return [
        *("pretrain", "--preset", preset, "--tokenizer", str(prepared)),
        *("--max-steps", str(steps), "--threads", "1", "--precision", "fp32"),
        *("--device", "cpu", "--out", str(run_dir), "--overwrite"),
        *("--set", "log.plot=false", "--set", "log.progress=plain"),
        *("--set", "train.eval_every=100000", "--set", "train.save_every=100000"),
        *("--set", f"train.log_every={max(1, steps // 8)}"),
        *extra,
    ]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _start(args: list[str]) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "minigpt_cli", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def run_way(way: str, command: list[str]) -> float:
    """Run `command` the `way` says; returns the wall seconds of the whole job."""
    start = time.perf_counter()
    if way == "1 process":
        jobs = [_start(command)]
    elif way == "2 processes":
        jobs = [_start([*command, "--nproc", "2"])]
    else:
        port = str(_free_port())
        node = ["--nproc", "1", "--nnodes", "2", "--master-addr", "127.0.0.1"]
        node += ["--master-port", port]
        jobs = [_start([*command, *node, "--node-rank", str(rank)]) for rank in (0, 1)]
    for job in jobs:
        _, err = job.communicate()
        if job.returncode != 0:
            raise RuntimeError(f"{way} failed ({job.returncode}): {err.decode()[-2000:]}")
    return time.perf_counter() - start


def run_rate(run_dir: Path) -> float:
    """The run's tokens/s over its train rows after the first, on its own clock."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    rows = [row for row in map(json.loads, lines) if row["kind"] == "train"]
    first, last = rows[0], rows[-1]
    return (last["tokens"] - first["tokens"]) / (last["time"] - first["time"])


def prepare(preset: str, base: Path) -> Path:
    """A finished 1-step run of `preset`: its tokenizer (and encoded corpus) for every run."""
    prepared = base / f"prepared-{preset}"
    args = ["pretrain", "--preset", preset, "--max-steps", "1", "--out", str(prepared)]
    job = _start([*args, "--overwrite", "--set", "log.plot=false"])
    _, err = job.communicate()
    if job.returncode != 0:
        raise RuntimeError(f"preparing {preset} failed: {err.decode()[-2000:]}")
    return prepared


def _cell(values: list[float], digits: int) -> str:
    median = statistics.median(values)
    if len(values) == 1:
        return f"{median:,.{digits}f}"
    return f"{median:,.{digits}f} ({min(values):,.{digits}f}-{max(values):,.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--steps", type=int, help="steps per run (default: per preset)")
    parser.add_argument("--repeats", type=int, default=3)
    options = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        rows = []
        for preset in options.presets:
            steps = options.steps or PRESETS[preset][0]
            prepared = prepare(preset, base)
            walls: dict[str, list[float]] = {way: [] for way in WAYS}
            rates: dict[str, list[float]] = {way: [] for way in WAYS}
            for repeat in range(options.repeats):
                for way in WAYS:  # interleaved: a change in the machine's load hits every way
                    run_dir = base / f"{preset}-{way.replace(' ', '-')}"
                    walls[way].append(run_way(way, _command(preset, steps, prepared, run_dir)))
                    rates[way].append(run_rate(run_dir))
                    print(
                        f"{preset} {way} #{repeat + 1}: {walls[way][-1]:.1f} s, "
                        f"{rates[way][-1]:,.0f} tokens/s",
                        flush=True,
                    )
            one = statistics.median(rates["1 process"])
            for way in WAYS:
                processes = 1 if way == "1 process" else 2
                efficiency = [rate / (processes * one) for rate in rates[way]]
                rows.append(
                    f"| {preset} ({steps} steps) | {way} | {_cell(walls[way], 1)} s | "
                    f"{_cell(rates[way], 0)} | {_cell(efficiency, 2)} |"
                )
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print("\n| preset | how | wall clock | tokens/s (run's own) | scaling efficiency |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
