"""Wall time and validation bits per byte of `minigpt pretrain --preset P` on the built-in corpus.

Runs the real command (tokenizer training and encoding included) in a temporary folder, then
reports the time, the final validation bits per byte, and two baselines computed on the same
validation tokens with the run's own tokenizer: the unigram entropy (a model that ignores context)
and the uniform bound log2(vocab). A model that learned anything beats the unigram figure.

    python benchmarks/pretrain_builtin.py                 # tiny preset, default budget
    python benchmarks/pretrain_builtin.py --preset small --extra --max-steps 50
    python benchmarks/pretrain_builtin.py --run /tmp/p/quickstart/pretrain  # a finished run
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minigpt_cli.config.loader import load_config  # noqa: E402
from minigpt_cli.datasets import BUILTIN_DATA_SEED  # noqa: E402
from minigpt_cli.engine.data.tokenizer import Tokenizer  # noqa: E402
from minigpt_cli.engine.metrics.text import token_byte_lengths  # noqa: E402
from minigpt_cli.engine.stages.pretrain import _encode_texts  # noqa: E402


def unigram_bits_per_byte(run_dir: Path) -> tuple[float, float]:
    """Unigram cross-entropy (fit on the train split) and log2(V), in bits per validation byte."""
    from minigpt_cli.datasets.builtin import pretrain_records

    config = load_config(None, run_dir / "config.toml")
    tokenizer = Tokenizer.load(run_dir)
    texts = [r["text"] for r in pretrain_records(config.data.builtin_size, seed=BUILTIN_DATA_SEED)]
    tokens = _encode_texts(tokenizer, texts)
    split = int(len(tokens) * (1 - config.data.val_fraction))
    train, val = tokens[:split], tokens[split + 1 :]
    counts = np.bincount(train, minlength=tokenizer.vocab_size).astype(np.float64) + 0.5
    probs = counts / counts.sum()
    nats = -np.log(probs[val]).sum()
    val_bytes = token_byte_lengths(tokenizer)[val].sum()
    bits_unigram = nats / math.log(2) / val_bytes
    bits_uniform = len(val) * math.log2(tokenizer.vocab_size) / val_bytes
    return float(bits_unigram), float(bits_uniform)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument(
        "--run",
        type=Path,
        default=None,
        help="report on this finished built-in pretraining run instead of training one (its wall "
        "time is then the run's own training time, without tokenizer and encoding)",
    )
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more CLI flags")
    args = parser.parse_args()
    shown = " ".join(["minigpt pretrain --preset", args.preset, *args.extra])
    if args.run is not None:
        state = json.loads((args.run / "trainer_state.json").read_text())
        report(args.run, shown, float(state["elapsed"]))
        return
    with tempfile.TemporaryDirectory() as folder:
        run_dir = Path(folder) / "run"
        command = [
            sys.executable,
            "-m",
            "minigpt_cli",
            "pretrain",
            "--preset",
            args.preset,
            "--out",
            str(run_dir),
            *args.extra,
        ]
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        report(run_dir, shown, time.perf_counter() - start)


def report(run_dir: Path, shown: str, wall: float) -> None:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if r["kind"] == "eval"][-1]
    train = [r for r in rows if r["kind"] == "train"]
    unigram, uniform = unigram_bits_per_byte(run_dir)
    rate = sum(r["tokens_per_sec"] for r in train) / len(train)
    print("| command | wall time | steps | tokens | tok/s | val bpb | unigram bpb | log2(V) bpb |")
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| `{shown}` | {wall:.0f} s | {final['step']} | {final['tokens']:,} | {rate:,.0f} "
        f"| {final['val_bpb']:.3f} | {unigram:.3f} | {uniform:.3f} |"
    )


if __name__ == "__main__":
    main()
