"""Training throughput beside Hugging Face, interleaved and repeated (issue 15 item 1).

Per preset shape it measures, each in a fresh process (so peak RSS is that measurement's alone):

- **peer**: `transformers.LlamaForCausalLM` built at exactly the preset's shape (width, layers,
  heads, KV heads, SwiGLU width, context, vocabulary, rotary base, tied embeddings), trained by the
  plain loop a user would write (forward with labels, backward, gradient clipping, fused AdamW).
  It first gets each precision this machine offers (fp32, fp32 "medium" matmuls, bf16 autocast;
  bf16 is skipped where `minigpt doctor`'s measurement says its matmuls are slower than fp32) and
  keeps its best for the rounds.
- **minigpt step**: the same loop through minigpt's own training pieces (`GPT`'s fused loss,
  `optim.build_optimizer` / `backward` / `apply_update`) at the precision `--precision auto`
  picks, in a process with the allocator setting every minigpt verb makes
  (`governor.keep_freed_pages`; `--peer-pages` gives the peer's process the same) and MKL's
  strict reproducibility mode the training verbs set (`MKL_CBWR`, unless already set).
- **minigpt run** (unless `--no-wall`): what a user waits for: `minigpt pretrain --preset P` for two
  lengths on the built-in data, timed from outside (process start to exit); the extra tokens over
  the extra seconds is a step's real cost, data, logging, the governor, evaluations and saves
  included. Beside it the rate the longer run logged.

Rounds interleave peer and minigpt (`--repeats`, 3 by default) so a machine whose load changes
moves both; the ratio is taken within each round and reported as the median with its range. MFU is
against the matmul peak `minigpt doctor` measured on this machine, not a datasheet.

`--split` instead says where each side's step goes: every ATen call of a few steps timed (a
`TorchDispatchMode`) and summed as matmuls, attention and the rest, with the calls a step. The
timed total differs from the untimed step printed beside it by the timer's own cost (in it) and the
Python between calls (not in it); code compiled by `torch.compile` (the bf16 norms of wide models)
runs eagerly under the timer.

    python benchmarks/train_throughput.py                          # tiny and small, 3 rounds
    python benchmarks/train_throughput.py --presets tiny --repeats 5 --no-wall
    python benchmarks/train_throughput.py --presets tiny --split   # matmuls / attention / rest
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from logged_rate import _cli  # noqa: E402  (runs the CLI of a checkout, timed from outside)

from minigpt_cli.cli.app import MKL_REPRODUCIBLE  # noqa: E402

PEER_PRECISIONS = ("fp32", "fp32_medium", "bf16")

MATMUL_OPS = frozenset({"mm", "addmm", "addmm_", "bmm", "baddbmm", "addbmm"})
"""ATen operators counted as matmuls by `--split` (after autograd, PyTorch's CPU ops)."""


def time_calls(step: Callable[[], object], steps: int) -> dict[str, float]:
    """Milliseconds a step spends in matmuls, attention and every other ATen call, and the calls a
    step: each call timed by a dispatch mode over `steps` steps (the step already warm).

    A dispatch mode sees the calls autograd makes in the backward too, so this is the whole step
    as PyTorch runs it, which is how two implementations built differently are compared call for
    call; each call's time includes the mode's own overhead.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    seconds = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    calls = 0

    class CallTimer(TorchDispatchMode):
        def __torch_dispatch__(
            self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
        ) -> Any:
            nonlocal calls
            start = time.perf_counter()
            result = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if name in MATMUL_OPS:
                kind = "matmul"
            elif "attention" in name:
                kind = "attention"
            else:
                kind = "other"
            seconds[kind] += time.perf_counter() - start
            calls += 1
            return result

    with CallTimer():
        for _ in range(steps):
            step()
    split = {f"{kind}_ms": 1000 * total / steps for kind, total in seconds.items()}
    split["calls"] = calls / steps
    return split


def measure(
    preset: str,
    impl: str,
    precision: str,
    steps: int,
    micro_batch: int,
    peer_pages: bool = False,
    split: bool = False,
) -> dict:
    """One process's measurement: the median step of `steps` after two warm-up steps.

    `peer_pages`: the peer's process gets minigpt's allocator setting too
    (`governor.keep_freed_pages`), to see how much of the ratio that setting is. `split`: then
    `steps` more steps with every call timed (`time_calls`)."""
    import torch

    from minigpt_cli.config.loader import load_config
    from minigpt_cli.config.params import flops_per_token
    from minigpt_cli.engine.hardware.device import (
        apply_matmul_precision,
        autocast_context,
        resolve_precision,
    )
    from minigpt_cli.engine.hardware.speed_cache import peak_flops

    config = load_config(preset)
    vocab = config.tokenizer.vocab_size
    seq = config.model.context_length
    torch.manual_seed(0)
    x = torch.randint(0, vocab, (micro_batch, seq))
    y = torch.randint(0, vocab, (micro_batch, seq))
    if impl == "minigpt":
        from minigpt_cli.engine.model.gpt import GPT
        from minigpt_cli.engine.resources.governor import keep_freed_pages
        from minigpt_cli.engine.training.optim import apply_update, backward, build_optimizer

        keep_freed_pages()  # what every minigpt verb sets (`governor.apply_resources`)
        decision = resolve_precision("auto", "cpu")
        apply_matmul_precision(decision)
        precision = decision.peak_key
        model = GPT(config.model, vocab)
        optimizer, _ = build_optimizer(model, config.train, torch.device("cpu"))

        def step() -> None:
            with autocast_context(decision, "cpu"):
                loss = model(x, targets=y, reduction="sum")[1] / y.numel()
            backward(loss, None)
            apply_update(optimizer, config.train.grad_clip, None)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        if peer_pages:
            from minigpt_cli.engine.resources.governor import keep_freed_pages

            keep_freed_pages()
        if precision == "fp32_medium":
            torch.set_float32_matmul_precision("medium")
        shape = config.model
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=vocab,
                hidden_size=shape.n_embd,
                intermediate_size=shape.ffn_dim,
                num_hidden_layers=shape.n_layer,
                num_attention_heads=shape.n_head,
                num_key_value_heads=shape.kv_heads,
                max_position_embeddings=seq,
                rope_theta=shape.rope_theta,
                rms_norm_eps=shape.norm_eps,
                tie_word_embeddings=shape.tie_embeddings,
            )
        )
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
        autocast = (
            torch.autocast("cpu", dtype=torch.bfloat16)
            if precision == "bf16"
            else torch.autocast("cpu", enabled=False)
        )

        def step() -> None:
            with autocast:
                loss = model(input_ids=x, labels=y).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    timings = []
    for index in range(steps + 2):
        start = time.perf_counter()
        step()
        if index >= 2:
            timings.append(time.perf_counter() - start)
    rate = micro_batch * seq / statistics.median(timings)
    peak = peak_flops("cpu", precision)
    return {
        "step_ms": 1000 * statistics.median(timings),
        **({"split": time_calls(step, steps)} if split else {}),
        "tokens_per_sec": rate,
        "precision": precision,
        "mfu": flops_per_token(config.model, vocab, seq) * rate / peak,
        "peak_gflops": peak / 1e9,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _one(preset: str, impl: str, precision: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--one", preset, impl, precision]
    command += ["--steps", str(args.steps), "--micro-batch", str(args.micro_batch)]
    command += ["--threads", str(args.threads)] + (["--peer-pages"] if args.peer_pages else [])
    command += ["--split"] if args.split else []
    env = dict(os.environ)
    if impl == "minigpt":  # MKL's mode as minigpt's training verbs set it (`cli/app.py`)
        env.setdefault(*MKL_REPRODUCIBLE)
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(output.strip().splitlines()[-1])


def wall_rate(preset: str, lengths: tuple[int, int], folder: Path, threads: int) -> dict:
    """Tokens/s of `minigpt pretrain` by the wall clock between two run lengths, and as logged."""
    walls, tokens, rows = [], [], []
    for count in lengths:
        run_dir = folder / f"{preset}-{count}"
        args = ["pretrain", "--preset", preset, "--max-steps", str(count), "--out", str(run_dir)]
        args += ["--threads", str(threads), "--overwrite", "--set", "log.progress=plain"]
        # About ten logged rows in the longer run, whatever its length, for the logged rate.
        args += ["--set", f"train.log_every={max(1, lengths[1] // 10)}"]
        if (folder / f"{preset}-tokenizer").exists():
            args += ["--tokenizer", str(folder / f"{preset}-tokenizer")]
        walls.append(_cli(REPO, *args))
        if not (folder / f"{preset}-tokenizer").exists():
            (folder / f"{preset}-tokenizer").mkdir()
            for name in ("tokenizer.model", "tokenizer.json"):
                shutil.copy(run_dir / name, folder / f"{preset}-tokenizer" / name)
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        rows = [row for row in map(json.loads, lines) if row["kind"] == "train"]
        tokens.append(rows[-1]["tokens"])
    logged_rows = rows[1:]  # the first row's window holds the warm-up step
    logged = statistics.median(row["tokens_per_sec"] for row in logged_rows)
    return {"wall": (tokens[1] - tokens[0]) / (walls[1] - walls[0]), "logged": logged}


def spread(values: list[float], digits: int = 2, suffix: str = "x") -> str:
    return (
        f"{statistics.median(values):.{digits}f}{suffix} "
        f"({min(values):.{digits}f}..{max(values):.{digits}f})"
    )


def bf16_pays() -> bool:
    """Whether bf16 matmuls beat fp32 here (doctor's cached measurement): else the peer skips
    bf16, whose steps would take minutes on a CPU without bf16 hardware."""
    from minigpt_cli.engine.hardware.speed_cache import peak_flops

    try:
        return peak_flops("cpu", "bf16") > peak_flops("cpu", "fp32")
    except RuntimeError:
        return False


def print_split(preset: str, peer: dict, mine: dict) -> None:
    """The `--split` table for one preset, and the step minigpt would need for 1.5x and 1.4x."""
    print(
        "| side | step, untimed | all calls, timed | matmuls | attention | other calls "
        "| calls a step |"
    )
    print("|---|---|---|---|---|---|---|")
    for side, result in (("HF", peer), (f"minigpt ({mine['precision']})", mine)):
        split = result["split"]
        timed = split["matmul_ms"] + split["attention_ms"] + split["other_ms"]
        print(
            f"| {side} | {result['step_ms']:.1f} ms | {timed:.1f} ms | {split['matmul_ms']:.1f} ms "
            f"| {split['attention_ms']:.1f} ms | {split['other_ms']:.1f} ms "
            f"| {split['calls']:,.0f} |"
        )
    fixed = mine["split"]["matmul_ms"] + mine["split"]["attention_ms"]
    print(
        f"\n{preset}: 1.5x / 1.4x the peer's untimed step is {peer['step_ms'] / 1.5:.1f} / "
        f"{peer['step_ms'] / 1.4:.1f} ms; minigpt's matmuls and attention take {fixed:.1f} ms of "
        f"its timed calls\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per measurement")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-wall", action="store_true", help="skip the `minigpt pretrain` runs")
    parser.add_argument(
        "--wall-steps",
        nargs=2,
        type=int,
        metavar=("SHORT", "LONG"),
        help="run lengths for the wall clock (default: 20 120 for tiny, 2 6 otherwise)",
    )
    parser.add_argument(
        "--peer-pages",
        action="store_true",
        help="give the peer minigpt's allocator setting too (governor.keep_freed_pages)",
    )
    parser.add_argument(
        "--split",
        action="store_true",
        help="instead of the rounds: where each side's step goes (every ATen call timed)",
    )
    parser.add_argument("--one", nargs=3, metavar=("PRESET", "IMPL", "PRECISION"))
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.one:
        print(
            json.dumps(
                measure(*args.one, args.steps, args.micro_batch, args.peer_pages, args.split)
            )
        )
        return
    print(
        f"micro-batch {args.micro_batch} x each preset's context, {args.threads} threads, median "
        f"of {args.steps} steps per measurement, {args.repeats} interleaved rounds\n"
    )
    precisions = [p for p in PEER_PRECISIONS if p != "bf16" or bf16_pays()]
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            trials = {p: _one(preset, "hf", p, args) for p in precisions}
            best = max(trials, key=lambda p: trials[p]["tokens_per_sec"])
            tried = ", ".join(f"{p} {t['tokens_per_sec']:,.0f}" for p, t in trials.items())
            print(f"## {preset}: peer precision {best} (tried: {tried} tokens/s)\n")
            if args.split:
                peer, mine = _one(preset, "hf", best, args), _one(preset, "minigpt", "auto", args)
                print_split(preset, peer, mine)
                continue
            print(
                "| round | HF tokens/s | minigpt step | ratio | minigpt run, wall clock | "
                "logged | ratio (wall) | MFU HF / minigpt | peak RSS HF / minigpt |"
            )
            print("|---|---|---|---|---|---|---|---|---|")
            lengths = tuple(args.wall_steps or ((20, 120) if preset == "tiny" else (2, 6)))
            step_ratios, wall_ratios = [], []
            for index in range(args.repeats):
                peer = _one(preset, "hf", best, args)
                mine = _one(preset, "minigpt", "auto", args)
                run = None if args.no_wall else wall_rate(preset, lengths, Path(tmp), args.threads)
                step_ratios.append(mine["tokens_per_sec"] / peer["tokens_per_sec"])
                cells = [
                    str(index + 1),
                    f"{peer['tokens_per_sec']:,.0f}",
                    f"{mine['tokens_per_sec']:,.0f} ({mine['precision']})",
                    f"{step_ratios[-1]:.2f}x",
                ]
                if run is None:
                    cells += ["-", "-", "-"]
                else:
                    wall_ratios.append(run["wall"] / peer["tokens_per_sec"])
                    cells += [f"{run['wall']:,.0f}", f"{run['logged']:,.0f}"]
                    cells += [f"{wall_ratios[-1]:.2f}x"]
                cells += [
                    f"{100 * peer['mfu']:.0f} % / {100 * mine['mfu']:.0f} %",
                    f"{peer['peak_rss_mb']:,.0f} / {mine['peak_rss_mb']:,.0f} MB",
                ]
                print("| " + " | ".join(cells) + " |", flush=True)
            print(
                f"\n{preset}: minigpt / HF, median (range) over {args.repeats} rounds: "
                f"training step {spread(step_ratios)}"
                + (
                    f"; `minigpt pretrain` by the wall clock {spread(wall_ratios)}"
                    if wall_ratios
                    else ""
                )
                + f"; matmul peak {mine['peak_gflops']:.0f} GFLOP/s ({mine['precision']})\n"
            )


if __name__ == "__main__":
    main()
