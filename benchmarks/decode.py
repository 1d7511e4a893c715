"""Decoding speed: tokens per second of `minigpt_cli.engine.inference.generation` with its KV cache.

Measures batch 1 and batch 8 (one prompt, several samples through one batched cache), 128 new
tokens, for the `tiny` and `small` preset shapes, with fp32 and with bf16 weights. Weights are
random: decoding speed does not depend on what the weights say, and no stop id ends a sample
early, so every row really generates every token. A no-cache reference (the whole sequence
re-run for every token, what a model without a cache must do) is measured at batch 1 too, to show
what the cache buys.

    python benchmarks/decode.py            # the full table (a few minutes on 2 cores)
    python benchmarks/decode.py --quick    # 32 new tokens, no no-cache reference

Prints a markdown table. Numbers depend on the machine and on whatever else is running on it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from minigpt_cli.config.loader import load_config  # noqa: E402
from minigpt_cli.config.params import count_parameters, format_count  # noqa: E402
from minigpt_cli.engine.inference.decode import generate_batch  # noqa: E402
from minigpt_cli.engine.inference.generation import SamplingSettings  # noqa: E402
from minigpt_cli.engine.model.gpt import GPT  # noqa: E402

SHAPES = {
    # name: (model config, vocabulary size), read from the presets themselves
    name: (load_config(name).model, load_config(name).tokenizer.vocab_size)
    for name in ("tiny", "small")
}
PROMPT_TOKENS = 16


def _settings(new_tokens: int) -> SamplingSettings:
    # The [generate] defaults (temperature 0.8, top-k 50, top-p 0.95): sampling cost included.
    return SamplingSettings(max_new_tokens=new_tokens, seed=0)


def _time_cached(model: GPT, prompt: list[int], batch: int, new_tokens: int, repeats: int) -> float:
    """Best-of-`repeats` tokens/s over the whole generate call (prefill included)."""
    settings = _settings(new_tokens)
    generate_batch(model, prompt, _settings(4), batch)  # warm-up: allocator, kernels
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        outputs = generate_batch(model, prompt, settings, batch)
        elapsed = time.perf_counter() - start
        produced = sum(len(row) for row in outputs)
        rates.append(produced / elapsed)
    return max(rates)


@torch.inference_mode()
def _time_uncached(model: GPT, prompt: list[int], new_tokens: int) -> float:
    """Tokens/s re-running the full sequence for every new token (greedy, batch 1)."""
    ids = torch.tensor([prompt], dtype=torch.long)
    start = time.perf_counter()
    for _ in range(new_tokens):
        logits = model(ids[:, -model.config.context_length :], last_only=True)[:, -1]
        ids = torch.cat((ids, logits.argmax(-1, keepdim=True)), dim=1)
    return new_tokens / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="32 new tokens, no no-cache row")
    parser.add_argument("--shapes", default="tiny,small", help="comma list of tiny,small")
    parser.add_argument("--batches", default="1,8", help="comma list of batch sizes")
    parser.add_argument("--dtypes", default="fp32,bf16", help="weight dtypes: fp32,bf16")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 128 (32 quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default all)")
    parser.add_argument("--repeats", type=int, default=None, help="best of N (default 3, quick 1)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    new_tokens = args.new_tokens or (32 if args.quick else 128)
    repeats = args.repeats or (1 if args.quick else 3)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}

    print(
        f"Decode speed, {new_tokens} new tokens after a {PROMPT_TOKENS}-token prompt, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}\n"
    )
    print("| shape | params | weights | batch | tokens/s | ms per step |")
    print("|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        model_cfg, vocab = SHAPES[shape]
        torch.manual_seed(0)
        base = GPT(model_cfg, vocab).eval()
        prompt = torch.randint(0, vocab, (PROMPT_TOKENS,)).tolist()
        params = format_count(count_parameters(model_cfg, vocab))
        for dtype_name in args.dtypes.split(","):
            model = base.to(dtypes[dtype_name])
            for batch in (int(b) for b in args.batches.split(",")):
                rate = _time_cached(model, prompt, batch, new_tokens, repeats)
                step_ms = 1000 * batch / rate
                print(
                    f"| {shape} | {params} | {dtype_name} | {batch} | {rate:,.0f} | "
                    f"{step_ms:.2f} |",
                    flush=True,
                )
            if not args.quick and dtype_name == "fp32":
                rates = [_time_uncached(model, prompt, new_tokens) for _ in range(repeats)]
                rate = statistics.median(rates)
                print(
                    f"| {shape} (no cache) | {params} | {dtype_name} | 1 | {rate:,.0f} | "
                    f"{1000 / rate:.2f} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
