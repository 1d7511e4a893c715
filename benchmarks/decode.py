"""Decoding speed against Hugging Face `generate`, batch 1, greedy, exactly 128 new tokens.

For each preset shape (`tiny`, `small`; random weights: speed does not depend on what the weights
say) it times, interleaved and repeated:

- minigpt fp32: `generate_batch` (what `minigpt generate --greedy --ignore-eos` runs: prefill, then
  the KV-cached decode step), on the thread count `generate` picks by default
  (`generation.decode_threads` under a 100 % cap), or `--threads`;
- minigpt int8: the same after `quantize_model(model, "int8")` (`generate --quantize int8`);
- HF: `LlamaForCausalLM` built at exactly the preset's shape (heads, KV heads, SwiGLU width,
  vocabulary, tied embeddings, rope theta), `generate(do_sample=False, min_new_tokens=128,
  max_new_tokens=128)`, on torch's default thread count (every core), or `--threads`.

Every figure is wall-clock tokens/s over the whole call (prefill included), median and range of
`--repeats` rounds; within a round the contenders run back to back, so a slow minute of a shared
machine hits all of them. The machine's copy bandwidth (a 256 MiB tensor copy, bytes read plus
written per second, best of 5) divided by the bytes of weights one token reads gives the
memory-bandwidth limit each figure is shown against.

    python benchmarks/decode.py                        # tiny and small, 3 rounds
    python benchmarks/decode.py --shapes small --repeats 5 --threads 1

Needs `transformers` for the HF rows (`pip install -e ".[bench]"`); without it they are skipped.
Prints a markdown table. Numbers depend on the machine and on whatever else runs on it.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from minigpt_cli.config.loader import load_config  # noqa: E402
from minigpt_cli.config.params import count_parameters, format_count  # noqa: E402
from minigpt_cli.engine.hardware.monitor import allowed_threads  # noqa: E402
from minigpt_cli.engine.inference.decode import generate_batch  # noqa: E402
from minigpt_cli.engine.inference.generation import SamplingSettings, decode_threads  # noqa: E402
from minigpt_cli.engine.model.gpt import GPT  # noqa: E402
from minigpt_cli.engine.model.quantize import quantize_model  # noqa: E402

PROMPT_TOKENS = 16
DEFAULT_THREADS = torch.get_num_threads()  # torch's own default, before anything changes it


def copy_bandwidth(threads: int, megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes per second a large tensor copy moves (read + write), best of `repeats`."""
    torch.set_num_threads(threads)
    source = torch.ones(megabytes * 2**20 // 4)
    target = torch.empty_like(source)
    target.copy_(source)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - start)
    return 2 * source.numel() * 4 / best


def bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights one decoding step reads: every parameter and int8 buffer once, less the
    embedding table when the head does not share it (a lookup reads one row)."""
    gpt = model
    assert isinstance(gpt, GPT)
    tensors = {id(t): t for t in (*gpt.parameters(), *gpt.buffers())}
    for skipped in (gpt.rope_cos, gpt.rope_sin):
        tensors.pop(id(skipped), None)
    embedding = gpt.model.embed_tokens.weight
    head = getattr(gpt.lm_head, "weight", None)
    if head is not embedding:
        tensors.pop(id(embedding), None)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def hf_peer(name: str) -> tuple[nn.Module, Callable[[torch.Tensor, int], int]] | None:
    """HF `LlamaForCausalLM` at exactly the preset's shape, and a greedy exact-length generate."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    config = load_config(name)
    shape = config.model
    hf = LlamaConfig(
        vocab_size=config.tokenizer.vocab_size,
        hidden_size=shape.n_embd,
        intermediate_size=shape.ffn_dim,
        num_hidden_layers=shape.n_layer,
        num_attention_heads=shape.n_head,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.context_length,
        rope_theta=shape.rope_theta,
        rms_norm_eps=shape.norm_eps,
        tie_word_embeddings=shape.tie_embeddings,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(hf).eval()

    def run(ids: torch.Tensor, new_tokens: int) -> int:
        out = model.generate(
            ids,
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,  # end-of-text suppressed: exactly new_tokens
            pad_token_id=0,
        )
        return int(out.shape[1] - ids.shape[1])

    return model, run


def minigpt_runner(model: GPT) -> Callable[[torch.Tensor, int], int]:
    def run(ids: torch.Tensor, new_tokens: int) -> int:
        settings = SamplingSettings(max_new_tokens=new_tokens, greedy=True, stop_ids=())
        return len(generate_batch(model, ids[0].tolist(), settings)[0])

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="tiny,small", help="comma list of tiny,small")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (median)")
    parser.add_argument(
        "--threads", type=int, default=None, help="one thread count for all (default: each its own)"
    )
    args = parser.parse_args(argv)
    import logging

    logging.getLogger("transformers").setLevel(logging.ERROR)

    bandwidth = {n: copy_bandwidth(n) for n in sorted({1, DEFAULT_THREADS})}
    print(
        f"Batch-1 greedy decode, {args.new_tokens} new tokens after a {PROMPT_TOKENS}-token "
        f"prompt, median (range) of {args.repeats} interleaved rounds; torch {torch.__version__}, "
        f"{os.cpu_count()} cores, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"load average {os.getloadavg()[0]:.1f} at the start. Copy bandwidth (256 MiB, read + "
        "write): "
        + ", ".join(f"{n} thread(s) {rate / 1e9:.1f} GB/s" for n, rate in bandwidth.items())
        + "\n"
    )
    print(
        "| shape | params | decoder | threads | tokens/s | vs HF | MB read a token "
        "| bandwidth limit tokens/s | share of limit |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.shapes.split(","):
        config = load_config(name)
        torch.manual_seed(0)
        base = GPT(config.model, config.tokenizer.vocab_size).eval()
        quantized = copy.deepcopy(base)
        quantize_model(quantized, "int8")
        ids = torch.randint(0, config.tokenizer.vocab_size, (1, PROMPT_TOKENS))
        ours = args.threads or decode_threads(base.num_parameters(), allowed_threads(100))
        contenders: dict[str, tuple[nn.Module, Callable[[torch.Tensor, int], int], int]] = {
            "minigpt fp32": (base, minigpt_runner(base), ours),
            "minigpt int8": (quantized, minigpt_runner(quantized), ours),
        }
        peer = hf_peer(name)
        if peer is not None:
            contenders["HF generate fp32"] = (peer[0], peer[1], args.threads or DEFAULT_THREADS)
        rates: dict[str, list[float]] = {label: [] for label in contenders}
        for _, run, threads in contenders.values():  # warm-up: allocator, kernels, packing
            torch.set_num_threads(threads)
            run(ids, 8)
        for _ in range(args.repeats):
            for label, (_, run, threads) in contenders.items():
                torch.set_num_threads(threads)
                start = time.perf_counter()
                produced = run(ids, args.new_tokens)
                elapsed = time.perf_counter() - start
                assert produced == args.new_tokens, (label, produced)
                rates[label].append(produced / elapsed)
        params = format_count(count_parameters(config.model, config.tokenizer.vocab_size))
        hf_median = statistics.median(rates["HF generate fp32"]) if peer is not None else None
        for label, (model, _, threads) in contenders.items():
            values = rates[label]
            median = statistics.median(values)
            read = bytes_per_token(model) if label.startswith("minigpt") else bytes_per_token(base)
            limit = bandwidth.get(threads, copy_bandwidth(threads)) / read
            ratio = f"{median / hf_median:.2f}x" if hf_median else "-"
            print(
                f"| {name} | {params} | {label} | {threads} | {median:,.0f} "
                f"({min(values):,.0f}-{max(values):,.0f}) | {ratio} | {read / 1e6:.1f} "
                f"| {limit:,.0f} | {median / limit:.0%} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
