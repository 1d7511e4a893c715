"""Training throughput: tokens/s, MFU and peak RSS per preset shape x precision.

Each configuration runs in its own process (so peak RSS is that configuration's alone): a full
training step (forward, backward, fused AdamW) at micro-batch 8 and the preset's context length,
timed over several steps after warm-up. When `transformers` is installed, Hugging Face's
`LlamaForCausalLM` of the same shape is measured in the same run as a reference.

    python benchmarks/train_throughput.py                      # tiny and small, fp32 and bf16
    python benchmarks/train_throughput.py --presets tiny --precisions fp32 --steps 5
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measure(
    preset: str, precision: str, impl: str, steps: int, micro_batch: int, threads: int
) -> dict:
    import torch

    from minigpt_cli.config.loader import load_config
    from minigpt_cli.config.params import flops_per_token
    from minigpt_cli.engine.hardware.speed_cache import peak_flops

    torch.set_num_threads(threads)
    config = load_config(preset)
    vocab = config.tokenizer.vocab_size
    seq = config.model.context_length
    torch.manual_seed(0)
    if impl == "minigpt":
        from minigpt_cli.engine.model.gpt import GPT

        model = GPT(config.model, vocab)

        def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return model(x, targets=y)[1]
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        hf = LlamaConfig(
            vocab_size=vocab,
            hidden_size=config.model.n_embd,
            intermediate_size=config.model.ffn_dim,
            num_hidden_layers=config.model.n_layer,
            num_attention_heads=config.model.n_head,
            num_key_value_heads=config.model.kv_heads,
            max_position_embeddings=seq,
            tie_word_embeddings=True,
        )
        model = LlamaForCausalLM(hf)

        def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return model(input_ids=x, labels=x).loss

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16)
        if precision == "bf16"
        else torch.autocast("cpu", enabled=False)
    )
    x = torch.randint(0, vocab, (micro_batch, seq))
    y = torch.randint(0, vocab, (micro_batch, seq))
    timings = []
    for index in range(steps + 2):
        start = time.perf_counter()
        with autocast:
            loss = loss_of(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if index >= 2:
            timings.append(time.perf_counter() - start)
    timings.sort()
    step_time = timings[len(timings) // 2]
    rate = micro_batch * seq / step_time
    peak = peak_flops("cpu", precision)
    mfu = flops_per_token(config.model, vocab, seq) * rate / peak if peak else float("nan")
    return {
        "preset": preset,
        "precision": precision,
        "impl": impl,
        "tokens_per_sec": rate,
        "mfu": mfu,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--one", nargs=3, metavar=("PRESET", "PRECISION", "IMPL"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.one:
        result = measure(*args.one, args.steps, args.micro_batch, args.threads)
        print(json.dumps(result))
        return
    impls = ["minigpt"]
    try:
        import transformers  # noqa: F401

        impls.append("hf-llama")
    except ImportError:
        print("(transformers not installed: no Hugging Face reference)\n")
    print(
        f"micro-batch {args.micro_batch}, sequence = each preset's context, "
        f"{args.threads} threads, "
        f"median of {args.steps} steps\n"
    )
    print("| preset | precision | implementation | tokens/s | MFU | peak RSS |")
    print("|---|---|---|---|---|---|")
    for preset in args.presets:
        for precision in args.precisions:
            for impl in impls:
                output = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--one",
                        preset,
                        precision,
                        impl,
                        "--steps",
                        str(args.steps),
                        "--micro-batch",
                        str(args.micro_batch),
                        "--threads",
                        str(args.threads),
                    ],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
                row = json.loads(output.strip().splitlines()[-1])
                print(
                    f"| {preset} | {precision} | {impl} | {row['tokens_per_sec']:,.0f} | "
                    f"{100 * row['mfu']:.1f}% | {row['peak_rss_mb']:,.0f} MB |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
