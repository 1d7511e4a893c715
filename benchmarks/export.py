"""What `minigpt export` costs (hf, and gguf per dtype): wall clock and peak memory, at the presets'
shapes.

For each shape (`tiny`, `small`) this builds a finished run directory without training: the
preset's config, a tokenizer of the preset's vocabulary trained on the built-in pretraining text,
randomly initialised weights (what an export does does not depend on what the weights say), and a
trainer state marked finished. Then, in rounds, back to back, each in a fresh process:

- `imports`: the export's imports and nothing else: the interpreter, torch, safetensors, gguf;
- `load`: the same imports, then `load_run` of the run, nothing written: the memory any use of the
  run needs (generate and chat open it the same way);
- `export`: `minigpt export RUN --format hf --out DIR --overwrite` and, per dtype, `minigpt export
  RUN --format gguf --dtype D --out FILE.gguf --overwrite`, as a user types them (file sizes are
  reported too).

Wall clock is the whole process (Python and torch start-up included: what a user waits for);
peak memory is the process's `ru_maxrss` from the kernel. Linux keeps a process's high-water mark
across fork and exec, so the runs are built in a child too (`--build`) and this parent never
imports torch: its own small peak cannot hide a child's. Shown in copies of the weights' bytes:
what opening the run takes over the imports, and what the export takes over the imports (the
issue's bound for the export's own work: one copy beyond the model). Median and range of
`--repeats` rounds.

    python benchmarks/export.py                     # tiny and small, hf and gguf, 3 rounds
    python benchmarks/export.py --shapes small --repeats 5 --formats gguf:f16 gguf:q8_0
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

IMPORTS = (
    "import sys\n"
    "from minigpt_cli.engine.export.run import export_run\n"
    "from minigpt_cli.engine.runs.load import load_run\n"
    "try:\n    import gguf  # the GGUF writer's own imports\nexcept ImportError:\n    pass\n"
)
LOAD_ONLY = IMPORTS + "load_run(sys.argv[1])\n"


def build_run(preset: str, folder: Path) -> tuple[int, int]:
    """A finished run at `preset`'s shape with random weights; returns (parameters, bytes)."""
    import torch

    from minigpt_cli.config.loader import dump_config, load_config
    from minigpt_cli.datasets import builtin
    from minigpt_cli.engine.data.tokenizer import Tokenizer
    from minigpt_cli.engine.data.tokenizer_training import train_tokenizer
    from minigpt_cli.engine.model.gpt import GPT
    from minigpt_cli.engine.runs.files import MODEL_FILE, STATE_FILE, save_tensors

    config = load_config(preset=preset)
    folder.mkdir(parents=True)
    (folder / "config.toml").write_text(dump_config(config))
    texts = [record["text"] for record in builtin.pretrain_records(6000)]
    train_tokenizer(texts, config.tokenizer.vocab_size, folder, num_threads=1)
    tokenizer = Tokenizer.load(folder)
    torch.manual_seed(0)
    model = GPT(config.model, tokenizer.vocab_size)
    weights = model.export_state_dict()
    save_tensors(folder / MODEL_FILE, weights, {"format": "minigpt"})
    state = {"step": 1, "stage": "pretrain", "finished": True, "chat": False, "parent": None}
    (folder / STATE_FILE).write_text(json.dumps(state))
    size = sum(t.numel() * t.element_size() for t in weights.values())
    return model.num_parameters(), size


def measure(command: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS bytes of one fresh process running `command`."""
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{' '.join(command)} failed (status {status})")
    return seconds, usage.ru_maxrss * 1024


def summary(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    median = statistics.median(values) / scale
    return (
        f"{median:.{digits}f} ({min(values) / scale:.{digits}f}-{max(values) / scale:.{digits}f})"
    )


def export_command(run: Path, target: str, scratch: Path) -> tuple[list[str], Path]:
    """The `minigpt export` command line of `target` ("hf" or "gguf:DTYPE") and its output."""
    fmt, _, dtype = target.partition(":")
    if fmt == "hf":
        out = scratch / "hf"
        extra: list[str] = []
    else:
        out = scratch / f"model-{dtype}.gguf"
        extra = ["--dtype", dtype]
    command = [sys.executable, "-m", "minigpt_cli", "export", str(run), "--format", fmt]
    return [*command, *extra, "--out", str(out), "--overwrite"], out


def output_bytes(out: Path) -> int:
    if out.is_dir():
        return sum(path.stat().st_size for path in out.iterdir())
    return out.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["tiny", "small"])
    parser.add_argument("--formats", nargs="+", default=["hf", "gguf:f32", "gguf:f16", "gguf:q8_0"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--build", nargs=2, metavar=("SHAPE", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        print(json.dumps(build_run(args.build[0], Path(args.build[1]))))
        return
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for shape in args.shapes:
            run = Path(scratch) / shape / "run"
            built = subprocess.run(
                [sys.executable, __file__, "--build", shape, str(run)],
                check=True,
                capture_output=True,
                text=True,
            )
            parameters, size = json.loads(built.stdout.strip().splitlines()[-1])
            load_only = [sys.executable, "-c", LOAD_ONLY, str(run)]
            imports = [sys.executable, "-c", IMPORTS]
            commands = {
                target: export_command(run, target, Path(scratch) / shape)
                for target in args.formats
            }
            bases: list[tuple[float, int]] = []
            loads: list[tuple[float, int]] = []
            exports: dict[str, list[tuple[float, int]]] = {target: [] for target in args.formats}
            for _ in range(args.repeats):  # interleaved: each round measures every command once
                bases.append(measure(imports))
                loads.append(measure(load_only))
                for target, (command, _) in commands.items():
                    exports[target].append(measure(command))
            opened = [(o[1] - b[1]) / size for o, b in zip(loads, bases, strict=True)]
            for target, measured in exports.items():
                copies = [(e[1] - b[1]) / size for e, b in zip(measured, bases, strict=True)]
                written = output_bytes(commands[target][1])
                rows.append(
                    f"| {shape} ({parameters / 1e6:.2f}M) | {target} | {size / 2**20:.1f} "
                    f"| {written / 2**20:.1f} "
                    f"| {summary([e[0] for e in measured])} "
                    f"| {summary([float(e[1]) for e in measured], 2**20, 0)} "
                    f"| {summary([float(b[1]) for b in bases], 2**20, 0)} "
                    f"| {summary(opened, digits=1)} | {summary(copies, digits=1)} |"
                )
    print(
        "| shape | format | weights MiB | written MiB | export wall s | export peak RSS MiB "
        "| imports alone MiB | opening the run, copies | export, copies |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
