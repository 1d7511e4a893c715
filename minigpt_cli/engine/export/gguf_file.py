"""A run as one GGUF file that llama.cpp runs as it is: weights, shape, tokenizer, chat template.

Written with the `gguf` package (llama.cpp's own reference writer) as architecture "llama", the
layout `convert_hf_to_gguf.py` gives a Hugging Face `LlamaForCausalLM`, so llama.cpp, Ollama and
everything built on them load it without a converter patch:

- the shape under `llama.*` (context, width, blocks, SwiGLU width, heads, key/value heads, head
  size as the rotary dimension and key/value length, rope theta, RMS norm epsilon, vocabulary);
- the tensors under llama.cpp's names (`token_embd`, `blk.N.attn_q`...), and no `output` when the
  embeddings are tied (llama.cpp then reuses `token_embd`). The query and key projections are
  permuted: minigpt rotates the two halves of a head (Hugging Face's `rotate_half`), llama.cpp's
  "llama" rope rotates adjacent pairs, and this row order makes the two compute the same thing
  (`permute_rotary`; the converter does the same);
- the tokenizer as a sentencepiece ("llama") vocabulary: every piece, its score (llama.cpp merges
  by score, as sentencepiece does), its type (normal, unknown, control, byte), the special ids,
  no whitespace squeezing, and a space prefix exactly when the run's tokenizer has sentencepiece's
  dummy prefix (an imported Llama 2 tokenizer; none for a tokenizer minigpt trained): llama.cpp
  then puts it where minigpt does, before the text at the start and after each special token;
- how a prompt starts, matching `minigpt generate`: llama.cpp adds the BOS id to every prompt
  (`add_bos_token`), and that id is what minigpt puts first. A chat run's prompt is the chat
  template, which starts with `<|begin_of_text|>`: that is the BOS, and the Jinja template of the
  Hugging Face export is stored as `tokenizer.chat_template` (llama.cpp drops the BOS the template
  renders before adding its own, so it is there once). A run that is not chat-tuned continues
  documents, each of which follows an `<|end_of_text|>` in pretraining, so its BOS is that id (as
  GPT-2's is) and the file holds no chat template: llama.cpp then completes text instead of
  opening a conversation the model never learned. Generation ends at `<|end_of_turn|>` (the EOT
  id) and `<|end_of_text|>` (EOS), as minigpt's does;
- the run's sampling defaults under `general.sampling.*`, which llama.cpp uses when the user
  gives none (and min-p off: minigpt's sampler has none).

--dtype: `f32` keeps the weights bit for bit; `f16` (the default, what llama.cpp's converter
makes of a float32 model) halves the file; `q8_0` stores each 2-D weight whose rows are a multiple
of 32 long as 8-bit blocks of 32 with one f16 scale (`gguf.quants`), about a quarter of f32. Norms
stay f32 in every dtype, as llama.cpp requires; a weight q8_0 cannot hold stays f16 (the converter's
rule), and the report names it.

Memory: no model is built (`source.ExportWeights`); the tensors' headers are written first (from
the shapes alone), then each tensor is read from the run's file, converted and written in turn,
so the export holds one weight and its conversion at a time (and the pages of the run's file it
has read): at most about one copy of the weights.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from minigpt_cli.engine.core.io import before_write
from minigpt_cli.engine.export.hf_tokenizer import CHAT_TEMPLATE
from minigpt_cli.engine.export.source import ExportSource
from minigpt_cli.errors import UserError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from minigpt_cli.config.schema import GenerateConfig
    from minigpt_cli.engine.data.tokenizer import Tokenizer

ARCHITECTURE = "llama"
DTYPES = ("f32", "f16", "q8_0")
DEFAULT_DTYPE = "f16"
INSTALL_HINT = "pip install 'minigpt-cli[export]' (or: pip install gguf)"

# Hugging Face name (after `model.layers.N.`) -> llama.cpp's, per block.
_BLOCK_TENSORS = {
    "input_layernorm.weight": "attn_norm",
    "self_attn.q_proj.weight": "attn_q",
    "self_attn.k_proj.weight": "attn_k",
    "self_attn.v_proj.weight": "attn_v",
    "self_attn.o_proj.weight": "attn_output",
    "post_attention_layernorm.weight": "ffn_norm",
    "mlp.gate_proj.weight": "ffn_gate",
    "mlp.up_proj.weight": "ffn_up",
    "mlp.down_proj.weight": "ffn_down",
}
_TOP_TENSORS = {
    "model.embed_tokens.weight": "token_embd",
    "model.norm.weight": "output_norm",
    "lm_head.weight": "output",
}


def require_gguf() -> ModuleType:
    """The `gguf` package, or a one-line refusal saying how to install it (checked before any
    work: the package is an optional extra)."""
    try:
        import gguf
    except ImportError:
        raise UserError(f"--format gguf needs the gguf package: {INSTALL_HINT}") from None
    return gguf


def gguf_name(hf_name: str) -> str:
    """llama.cpp's name of a tensor minigpt (and transformers) calls `hf_name`."""
    if hf_name in _TOP_TENSORS:
        return f"{_TOP_TENSORS[hf_name]}.weight"
    prefix, _, rest = hf_name.partition(".layers.")
    block, _, suffix = rest.partition(".")
    if prefix != "model" or not block.isdigit() or suffix not in _BLOCK_TENSORS:
        raise ValueError(f"{hf_name}: no llama.cpp name for this tensor")
    return f"blk.{int(block)}.{_BLOCK_TENSORS[suffix]}.weight"


def permute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """A query or key projection's rows reordered from half-split rotary pairs (dimension i
    rotates with i + head_dim/2) to adjacent pairs (2i with 2i+1) within each of `heads` heads:
    what llama.cpp's "llama" rope expects (the converter's `LlamaModel.permute`)."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
        .transpose(1, 2)
        .reshape(weight.shape)
    )


@dataclass(frozen=True)
class TensorPlan:
    """One tensor as written: its names, shape (torch's order) and GGUF storage type."""

    hf_name: str
    name: str
    shape: tuple[int, ...]
    qtype: str
    """"F32", "F16" or "Q8_0" (a `gguf.GGMLQuantizationType` member's name)."""


def storage_type(name: str, shape: tuple[int, ...], dtype: str) -> str:
    """The GGUF type a tensor is stored as under --dtype `dtype`: norms (1-D) always F32; q8_0
    for weights whose rows are whole blocks of 32, F16 for the rest (the converter's rule)."""
    if len(shape) <= 1 or name.endswith("_norm.weight") or dtype == "f32":
        return "F32"
    if dtype == "q8_0" and shape[-1] % 32 == 0:
        return "Q8_0"
    return "F16"


def tensor_plan(
    state: Mapping[str, torch.Tensor | tuple[int, ...]], dtype: str
) -> list[TensorPlan]:
    """Every weight of `state` (an `export_state_dict`, or its shapes) in the order written: the
    embedding, each block's in llama.cpp's order, the final norm, the untied head if any."""

    def order(hf_name: str) -> tuple[int, int, str]:
        name = gguf_name(hf_name)
        if name.startswith("blk."):
            _, block, kind, _ = name.split(".")
            return (1, int(block), f"{list(_BLOCK_TENSORS.values()).index(kind):02d}")
        return (0 if name.startswith("token_embd") else 2, 0, name)

    plan = []
    for hf_name in sorted(state, key=order):
        name = gguf_name(hf_name)
        value = state[hf_name]
        shape = tuple(int(n) for n in (value if isinstance(value, tuple) else value.shape))
        plan.append(TensorPlan(hf_name, name, shape, storage_type(name, shape, dtype)))
    return plan


def precision_notes(plan: list[TensorPlan], dtype: str) -> list[str]:
    """One line naming the weights stored at more precision than `dtype` asked for (q8_0 needs
    rows that are whole blocks of 32); nothing when every weight is as asked (norms aside)."""
    if dtype != "q8_0":
        return []
    kept = [entry.name for entry in plan if entry.qtype == "F16"]
    if not kept:
        return []
    return [
        f"{len(kept)} weights kept as f16 (rows not a multiple of 32, which q8_0 needs): "
        + ", ".join(kept)
    ]


def _token_types(tokenizer: Tokenizer, gguf: ModuleType) -> list[int]:
    kinds = gguf.TokenType
    types = []
    for token_id in range(tokenizer.vocab_size):
        if token_id == tokenizer.unk_id:
            types.append(int(kinds.UNKNOWN))
        elif tokenizer.is_control(token_id):
            types.append(int(kinds.CONTROL))
        elif tokenizer.is_byte(token_id):
            types.append(int(kinds.BYTE))
        else:
            types.append(int(kinds.NORMAL))
    return types


def prompt_start_id(tokenizer: Tokenizer, chat: bool) -> int:
    """The id every prompt starts with, which the file declares as BOS (see the module docstring):
    `<|begin_of_text|>` for a chat run, `<|end_of_text|>` (the document separator) otherwise."""
    return tokenizer.bos_id if chat else tokenizer.eos_id


def _add_tokenizer(writer: Any, gguf: ModuleType, tokenizer: Tokenizer, chat: bool) -> None:
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    size = tokenizer.vocab_size
    writer.add_token_list([tokenizer.piece(i) for i in range(size)])
    writer.add_token_scores([tokenizer.score(i) for i in range(size)])
    writer.add_token_types(_token_types(tokenizer, gguf))
    writer.add_bos_token_id(prompt_start_id(tokenizer, chat))
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_eot_token_id(tokenizer.eot_id)
    writer.add_unk_token_id(tokenizer.unk_id)
    writer.add_pad_token_id(tokenizer.pad_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(tokenizer.dummy_prefix)
    writer.add_remove_extra_whitespaces(False)
    if chat:
        writer.add_chat_template(CHAT_TEMPLATE)


def sampling_defaults(defaults: GenerateConfig) -> dict[str, float | int]:
    """The run's `[generate]` sampling settings in llama.cpp's (and Ollama's) terms: top-k 0 and
    top-p 1 where minigpt's are off, min-p 0 (minigpt has none; llama.cpp's default is 0.05)."""
    return {
        "temperature": defaults.temperature,
        "top_k": defaults.top_k or 0,
        "top_p": defaults.top_p if defaults.top_p is not None else 1.0,
        "min_p": 0.0,
        "repeat_penalty": defaults.repetition_penalty,
    }


def _add_metadata(writer: Any, gguf: ModuleType, source: ExportSource, dtype: str) -> None:
    model = source.config.model
    file_types = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }
    writer.add_type("model")
    writer.add_name(source.run_dir.resolve().name)
    writer.add_description(
        f"minigpt run {source.run_dir.resolve().name}"
        + (" (chat)" if source.chat else "")
        + (", LoRA adapter merged" if source.merged_lora else "")
    )
    writer.add_file_type(int(file_types[dtype]))
    if dtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(model.context_length)
    writer.add_embedding_length(model.n_embd)
    writer.add_block_count(model.n_layer)
    writer.add_feed_forward_length(model.ffn_dim)
    writer.add_head_count(model.n_head)
    writer.add_head_count_kv(model.kv_heads)
    writer.add_rope_freq_base(model.rope_theta)
    writer.add_layer_norm_rms_eps(model.norm_eps)
    writer.add_rope_dimension_count(model.head_dim)
    writer.add_key_length(model.head_dim)
    writer.add_value_length(model.head_dim)
    writer.add_vocab_size(source.tokenizer.vocab_size)
    sampling = sampling_defaults(source.config.generate)
    writer.add_sampling_temp(sampling["temperature"])
    writer.add_sampling_top_k(sampling["top_k"])
    writer.add_sampling_top_p(sampling["top_p"])
    writer.add_sampling_min_p(sampling["min_p"])
    writer.add_sampling_penalty_repeat(sampling["repeat_penalty"])


def _converted(
    gguf: ModuleType, tensor: torch.Tensor, entry: TensorPlan, source: ExportSource
) -> np.ndarray:
    """One tensor as the bytes the file stores (a fresh array only where the type changes)."""
    import torch

    model = source.config.model
    weight = tensor.detach().to(torch.float32).contiguous()
    if entry.name.endswith(".attn_q.weight"):
        weight = permute_rotary(weight, model.n_head)
    elif entry.name.endswith(".attn_k.weight"):
        weight = permute_rotary(weight, model.kv_heads)
    qtype = gguf.GGMLQuantizationType[entry.qtype]
    return gguf.quants.quantize(weight.numpy(), qtype)


def _stored_bytes(gguf: ModuleType, entry: TensorPlan) -> int:
    qtype = gguf.GGMLQuantizationType[entry.qtype]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    count = 1
    for n in entry.shape:
        count *= n
    return count // block * size


def _fsync(path: Path) -> None:
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


def write_gguf(source: ExportSource, path: Path, dtype: str) -> list[TensorPlan]:
    """Write the GGUF file at `path` (a staging name); returns the tensors as stored."""
    gguf = require_gguf()
    import numpy as np

    plan = tensor_plan(source.weights.shapes, dtype)
    before_write(path)
    writer = gguf.GGUFWriter(path, ARCHITECTURE)
    try:
        _add_metadata(writer, gguf, source, dtype)
        _add_tokenizer(writer, gguf, source.tokenizer, source.chat)
        for entry in plan:
            writer.add_tensor_info(
                entry.name,
                entry.shape,
                np.dtype(np.float32),
                _stored_bytes(gguf, entry),
                raw_dtype=gguf.GGMLQuantizationType[entry.qtype],
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for entry in plan:
            before_write(path)
            tensor = source.weights.tensor(entry.hf_name)
            writer.write_tensor_data(_converted(gguf, tensor, entry, source))
            del tensor
    finally:
        writer.close()
    _fsync(path)
    return plan
