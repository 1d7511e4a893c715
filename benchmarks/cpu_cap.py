"""Does `--max-cpu` hold? CPU time of a real `minigpt pretrain`, sampled from outside for a minute.

For each cap this starts `minigpt pretrain --preset tiny --max-cpu CAP` on the built-in data, waits
until the first training step is logged (so tokenizer training and encoding are not in the window),
then reads the process's user+system CPU time from outside (psutil) at the start and end of a
one-minute window and reports it as percent of all logical cores, beside the cap. The issue's
target is within 10 % of the cap. Run it on an otherwise idle machine: other programs can only make
the figure lower than the cap (the governor bounds use from above).

    python benchmarks/cpu_cap.py                      # caps 25, 50, 75 (about four minutes)
    python benchmarks/cpu_cap.py --caps 30 --window 20
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

TARGET_ERROR = 0.10


def measure(cap_pct: float, window: float, workdir: Path) -> float:
    """Percent of all cores the run used over `window` seconds of training."""
    run_dir = workdir / f"cap-{cap_pct:g}"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "minigpt_cli",
            "pretrain",
            "--preset",
            "tiny",
            "--out",
            str(run_dir),
            "--max-cpu",
            f"{cap_pct:g}",
            "--max-steps",
            "100000",
            "--max-time",
            f"{window + 120:.0f}s",
            "--set",
            "log.plot=false",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.exists() and '"kind": "train"' in metrics.read_text()):
            if process.poll() is not None:
                _, errors = process.communicate()
                raise SystemExit(f"pretrain failed: {errors}")
            time.sleep(0.5)
        watched = psutil.Process(process.pid)
        start_cpu, start_wall = watched.cpu_times(), time.monotonic()
        time.sleep(window)
        end_cpu, end_wall = watched.cpu_times(), time.monotonic()
    finally:
        process.kill()
        process.communicate()
    used = (end_cpu.user + end_cpu.system) - (start_cpu.user + start_cpu.system)
    return 100 * used / (end_wall - start_wall) / (psutil.cpu_count(logical=True) or 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--caps", type=float, nargs="+", default=[25.0, 50.0, 75.0])
    parser.add_argument("--window", type=float, default=60.0, help="seconds measured per cap")
    args = parser.parse_args()
    cores = psutil.cpu_count(logical=True) or 1
    print(f"{cores} logical cores; window {args.window:g} s of training per cap")
    print(f"{'cap %':>6} {'cores':>6} {'measured %':>11} {'error':>7}")
    worst = 0.0
    with tempfile.TemporaryDirectory() as folder:
        for cap in args.caps:
            measured = measure(cap, args.window, Path(folder))
            error = (measured - cap) / cap
            worst = max(worst, abs(error))
            print(f"{cap:>6g} {cores * cap / 100:>6.2f} {measured:>11.1f} {error:>+7.1%}")
    verdict = "within" if worst <= TARGET_ERROR else "OUTSIDE"
    print(f"worst error {worst:.1%}: {verdict} the {TARGET_ERROR:.0%} target")


if __name__ == "__main__":
    main()
