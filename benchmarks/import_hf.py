"""What `minigpt import HF_DIR --out RUN` costs: wall clock and peak memory, at the presets' shapes.

For each shape (`tiny`, `small`) and weight dtype (`fp32`, `bf16`) this builds a Hugging Face
folder without training: a `LlamaForCausalLM` at the preset's shape with random weights, saved by
transformers' `save_pretrained`, and a minigpt tokenizer of the preset's vocabulary (trained on the
built-in pretraining text) as its `tokenizer.model`. Then, in rounds, back to back, each in a fresh
process:

- `imports`: the import's own imports and nothing else (the interpreter, torch, safetensors);
- `import`: `minigpt import HF_DIR --out RUN --overwrite`, as a user types it;
- `transformers`: `AutoModelForCausalLM.from_pretrained(HF_DIR)`, what opening the same folder
  takes with the library that wrote it (its imports included).

Wall clock is the whole process (Python and torch start-up included: what a user waits for);
peak memory is the process's `ru_maxrss` from the kernel, built in a child (`--build`) so this
parent never imports torch (Linux keeps the high-water mark across fork and exec). "copies" is
the import's peak over the imports alone, in units of the run's fp32 weights. Median and range of
`--repeats` rounds.

    python benchmarks/import_hf.py                      # tiny and small, fp32 and bf16, 3 rounds
    python benchmarks/import_hf.py --shapes small --dtypes bf16 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from export import measure, summary  # noqa: E402  (one way to time a fresh process)

IMPORTS = "from minigpt_cli.engine.export.hf_import import import_hf\n"
TRANSFORMERS = (
    "import sys\n"
    "from transformers import AutoModelForCausalLM\n"
    "AutoModelForCausalLM.from_pretrained(sys.argv[1], local_files_only=True)\n"
)


def build_checkpoint(preset: str, dtype: str, folder: Path, tokenizers: Path) -> tuple[int, int]:
    """A Hugging Face Llama folder at `preset`'s shape; returns (parameters, fp32 bytes)."""
    import torch
    import transformers

    from minigpt_cli.config.loader import load_config
    from minigpt_cli.datasets import builtin
    from minigpt_cli.engine.data.tokenizer_training import train_tokenizer

    config = load_config(preset=preset)
    model_cfg, vocab = config.model, config.tokenizer.vocab_size
    trained = tokenizers / preset
    if not (trained / "tokenizer.model").is_file():
        texts = [record["text"] for record in builtin.pretrain_records(6000)]
        train_tokenizer(texts, vocab, trained, num_threads=1)
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=model_cfg.n_embd,
        intermediate_size=model_cfg.ffn_dim,
        num_hidden_layers=model_cfg.n_layer,
        num_attention_heads=model_cfg.n_head,
        num_key_value_heads=model_cfg.kv_heads,
        max_position_embeddings=model_cfg.context_length,
        rope_theta=model_cfg.rope_theta,
        rms_norm_eps=model_cfg.norm_eps,
        tie_word_embeddings=model_cfg.tie_embeddings,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = transformers.LlamaForCausalLM(hf_config)
    model.to(torch.bfloat16 if dtype == "bf16" else torch.float32).save_pretrained(folder)
    shutil.copy(trained / "tokenizer.model", folder / "tokenizer.model")
    parameters = model.num_parameters()
    return parameters, 4 * parameters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["tiny", "small"])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--build", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        shape, dtype, folder, tokenizers = args.build
        print(json.dumps(build_checkpoint(shape, dtype, Path(folder), Path(tokenizers))))
        return
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for shape in args.shapes:
            for dtype in args.dtypes:
                hf_dir = Path(scratch) / f"{shape}-{dtype}" / "hf"
                run = Path(scratch) / f"{shape}-{dtype}" / "run"
                built = subprocess.run(
                    [sys.executable, __file__, "--build", shape, dtype, str(hf_dir), scratch],
                    check=True,
                    capture_output=True,
                    text=True,
                    env={**os.environ, "PYTHONPATH": str(REPO)},
                )
                parameters, size = json.loads(built.stdout.strip().splitlines()[-1])
                imports = [sys.executable, "-c", IMPORTS]
                command = [sys.executable, "-m", "minigpt_cli", "import", str(hf_dir)]
                command += ["--out", str(run), "--overwrite"]
                peer = [sys.executable, "-c", TRANSFORMERS, str(hf_dir)]
                bases: list[tuple[float, int]] = []
                imported: list[tuple[float, int]] = []
                theirs: list[tuple[float, int]] = []
                for _ in range(args.repeats):
                    bases.append(measure(imports))
                    imported.append(measure(command))
                    theirs.append(measure(peer))
                copies = [(i[1] - b[1]) / size for i, b in zip(imported, bases, strict=True)]
                rows.append(
                    f"| {shape} ({parameters / 1e6:.2f}M), {dtype} | {size / 2**20:.1f} "
                    f"| {summary([i[0] for i in imported])} "
                    f"| {summary([float(i[1]) for i in imported], 2**20, 0)} "
                    f"| {summary([float(b[1]) for b in bases], 2**20, 0)} "
                    f"| {summary(copies, digits=1)} "
                    f"| {summary([t[0] for t in theirs])} "
                    f"| {summary([float(t[1]) for t in theirs], 2**20, 0)} |"
                )
    print(
        "| checkpoint | fp32 weights MiB | import wall s | import peak RSS MiB "
        "| imports alone MiB | import, copies | transformers from_pretrained wall s "
        "| its peak RSS MiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
