"""A run as a Hugging Face transformers folder: `AutoModelForCausalLM` and `AutoTokenizer` load it.

The network already is a `LlamaForCausalLM` with its tensor names and rotary convention
(`model/gpt.py`), so the weights are written as they are: the same names, the same dtype, and
with tied embeddings no `lm_head.weight` (transformers ties it back from `tie_word_embeddings`).
The files, in transformers' names:

- `config.json`: the shape (hidden size, SwiGLU width, layers, heads, key/value heads, head size,
  rope theta, norm epsilon, context as `max_position_embeddings`, vocabulary, tying) and the
  special ids;
- `model.safetensors`: the weights, with the `format: pt` metadata transformers requires;
- `generation_config.json`: the run's `[generate]` sampling defaults, and both ids minigpt stops
  at (end of text, end of turn) as `eos_token_id`, so `generate` stops where `minigpt generate`
  does;
- `tokenizer.json`, `tokenizer_config.json` (with the chat template), `special_tokens_map.json`
  (`hf_tokenizer`), and `tokenizer.model`, the sentencepiece model itself, for tools that read it.

Memory: no model is built (`source.ExportWeights`); `model.safetensors` is written one tensor at a
time (`runs.files.stream_tensors`), each read from the run's file, LoRA-merged if need be,
written and dropped, so the export holds about one copy of the weights at most (the pages of the
run's file it has read), where `load_run` plus safetensors' `save_file` held three.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from minigpt_cli.config.schema import GenerateConfig, ModelConfig
from minigpt_cli.engine.core.io import atomic_write_bytes, atomic_write_text
from minigpt_cli.engine.data.tokenizer import MODEL_FILE as SENTENCEPIECE_FILE
from minigpt_cli.engine.data.tokenizer import Tokenizer
from minigpt_cli.engine.export import hf_tokenizer
from minigpt_cli.engine.export.source import ExportSource
from minigpt_cli.engine.runs.files import stream_tensors

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def hf_config(model: ModelConfig, tokenizer: Tokenizer, dtype: torch.dtype) -> dict[str, Any]:
    """`config.json` of a `LlamaForCausalLM` with this shape: every field minigpt's network fixes
    spelt out, so no transformers default decides anything (both the rope spellings transformers
    4 and 5 read)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": tokenizer.vocab_size,
        "hidden_size": model.n_embd,
        "intermediate_size": model.ffn_dim,
        "num_hidden_layers": model.n_layer,
        "num_attention_heads": model.n_head,
        "num_key_value_heads": model.kv_heads,
        "head_dim": model.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": model.context_length,
        "rms_norm_eps": model.norm_eps,
        "rope_theta": model.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": model.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": model.tie_embeddings,
        "initializer_range": model.init_std,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
        "torch_dtype": _DTYPE_NAMES.get(dtype, "float32"),
        "use_cache": True,
    }


def generation_config(defaults: GenerateConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    """`generation_config.json`: the run's sampling defaults (as `minigpt generate` uses them)
    and the ids it stops at. Beam search settings stay minigpt's: transformers' differ."""
    settings: dict[str, Any] = {
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": [tokenizer.eos_id, tokenizer.eot_id],
        "pad_token_id": tokenizer.pad_id,
        "max_new_tokens": defaults.max_new_tokens,
        "do_sample": defaults.temperature > 0,
        "repetition_penalty": defaults.repetition_penalty,
    }
    if defaults.temperature > 0:
        settings["temperature"] = defaults.temperature
        settings["top_k"] = defaults.top_k or 0
        settings["top_p"] = defaults.top_p if defaults.top_p is not None else 1.0
    return settings


def _write_json(path: Path, value: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def _write_weights(path: Path, source: ExportSource) -> None:
    """The weights as safetensors with transformers' metadata, streamed and fsynced (see the
    module docstring for the memory this takes)."""
    weights = source.weights
    stream_tensors(path, weights.shapes, weights.tensor, {"format": "pt"})


def write_hf(source: ExportSource, folder: Path) -> list[Path]:
    """Write the transformers folder's files into `folder` (an empty staging folder); returns
    them in the order written."""
    tokenizer = source.tokenizer
    dtype = torch.float32  # what `ExportWeights` reads every weight as
    context = source.config.model.context_length
    written: list[tuple[Path, dict[str, Any] | bytes | None]] = [
        (folder / CONFIG_FILE, hf_config(source.config.model, tokenizer, dtype)),
        (folder / GENERATION_CONFIG_FILE, generation_config(source.config.generate, tokenizer)),
        (folder / TOKENIZER_FILE, hf_tokenizer.tokenizer_json(tokenizer)),
        (folder / TOKENIZER_CONFIG_FILE, hf_tokenizer.tokenizer_config(tokenizer, context)),
        (folder / SPECIAL_TOKENS_FILE, hf_tokenizer.special_tokens_map()),
        (folder / SENTENCEPIECE_FILE, tokenizer.model_bytes),
        (folder / WEIGHTS_FILE, None),
    ]
    for path, content in written:
        if content is None:
            _write_weights(path, source)
        elif isinstance(content, bytes):
            atomic_write_bytes(path, content)
        else:
            _write_json(path, content)
    return [path for path, _ in written]
