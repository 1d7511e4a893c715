"""What each `--dtype` of `minigpt export --format gguf` keeps, measured with llama.cpp itself.

For each run given, and each dtype (f32, f16, q8_0): the file's size, then llama.cpp
(llama-cpp-python, from `tests/llama_cpp_build.py`'s cache) against minigpt's own fp32 forward
pass on the same prompts (20 held-out built-in prompts, English and Chinese: documents' first 48
characters for a run that continues text, instruction turns in the chat template for a chat run):

- the largest |logit difference| over every position of every prompt, with llama.cpp's key/value
  cache in f32 (the file alone) and in its default f16 (what `llama-cli` computes);
- how many prompts' greedy continuations (`--new` tokens, llama.cpp's defaults, f16 cache) equal
  `minigpt generate --greedy`'s, token for token.

    python tests/llama_cpp_build.py               # once: llama-cpp-python (minutes)
    python benchmarks/export_gguf.py runs/pretrain-tiny runs/sft-tiny

Deterministic (greedy, one thread), so one round: the figures do not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DTYPES = ("f32", "f16", "q8_0")
GGML_F32 = 0


def prompts(loaded: Any, count: int) -> list[list[int]]:
    """Token ids of `count` held-out prompts as `minigpt generate` builds them for this run."""
    from minigpt_cli.datasets import builtin
    from minigpt_cli.engine.data.chat_template import prompt_ids
    from minigpt_cli.engine.data.records import normalise_record

    tokenizer = loaded.tokenizer
    if loaded.state.get("chat"):
        records = [normalise_record(r, "sft") for r in builtin.sft_records("val", count, seed=1)]
        return [prompt_ids(record["messages"][:-1], tokenizer) for record in records]
    documents = builtin.pretrain_records(count, seed=12345)
    return [[tokenizer.eos_id, *tokenizer.encode(d["text"][:48])] for d in documents]


def measure(run: Path, count: int, new: int, folder: Path) -> list[str]:
    import numpy as np
    import torch

    from minigpt_cli.engine.export.run import export_run
    from minigpt_cli.engine.inference.decode import generate_batch
    from minigpt_cli.engine.inference.generation import SamplingSettings
    from minigpt_cli.engine.runs.load import load_run
    from tests import llama_cpp_build

    llama_cpp, reason = llama_cpp_build.load()
    if llama_cpp is None:
        raise SystemExit(reason)
    torch.set_num_threads(1)
    loaded = load_run(run)
    tokenizer = loaded.tokenizer
    stops = (tokenizer.eos_id, tokenizer.eot_id)
    settings = SamplingSettings.from_config(
        loaded.config.generate, greedy=True, stop_ids=stops, max_new_tokens=new
    )
    context = loaded.config.model.context_length
    cases = prompts(loaded, count)
    with torch.no_grad():
        expected = [loaded.model(torch.tensor([ids]))[0].numpy() for ids in cases]
        greedy = [
            [int(t) for t in generate_batch(loaded.model, ids, settings, 1, tokenizer=tokenizer)[0]]
            for ids in cases
        ]
    spread = float(np.median([logits.std(axis=-1).mean() for logits in expected]))
    rows = []
    for dtype in DTYPES:
        path = folder / f"{run.name}-{dtype}.gguf"
        export_run(run, "gguf", path, dtype=dtype, overwrite=True)
        worst = {}
        for cache, kwargs in (("f32", {"type_k": GGML_F32, "type_v": GGML_F32}), ("f16", {})):
            llm = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=context,
                n_batch=context,
                n_threads=1,
                n_threads_batch=1,
                logits_all=True,
                verbose=False,
                **kwargs,
            )
            differences = []
            for ids, logits in zip(cases, expected, strict=True):
                llm.reset()
                llm.eval(ids)
                got = np.array(llm.scores[: len(ids)], dtype=np.float32)
                differences.append(float(np.abs(got - logits).max()))
            worst[cache] = max(differences)
        same = 0
        for ids, ours in zip(cases, greedy, strict=True):
            theirs: list[int] = []
            for token in llm.generate(ids, temp=0.0, repeat_penalty=1.0):
                if token in stops or len(theirs) == new:
                    break
                theirs.append(int(token))
            same += theirs == ours
        rows.append(
            f"| {run.name} | {dtype} | {path.stat().st_size / 2**20:.2f} | {spread:.2f} "
            f"| {worst['f32']:.2g} | {worst['f16']:.2g} | {same} of {len(cases)} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--new", type=int, default=32, help="greedy tokens compared per prompt")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for run in args.runs:
            rows += measure(run, args.prompts, args.new, Path(scratch))
    print(
        "| run | dtype | file MiB | logits' std | max logit diff, f32 cache "
        "| max logit diff, f16 cache (llama.cpp default) | greedy equal (f16 cache) |"
    )
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
