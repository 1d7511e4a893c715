"""A local Hugging Face Llama folder read for `minigpt import`: every check before any tensor.

What is read, and what is refused (each in one line naming the key, the tensor or the file):

- `config.json`: a `LlamaForCausalLM` (`architectures`, `model_type`); its shape becomes minigpt's
  `[model]` section (`model_config`). Refused: biases (`attention_bias`, `mlp_bias`), an activation
  other than SiLU (`hidden_act`), rope scaling of any kind (`rope_scaling`, `rope_parameters`),
  quantised weights (`quantization_config`), and shapes minigpt's schema does not allow.
- the weights: `model.safetensors`, or the shards a `model.safetensors.index.json` names. Only the
  safetensors headers are read here: every tensor's name, shape and dtype is checked against the
  network the config makes (built on the meta device, so nothing is allocated). Pickled weights
  (`pytorch_model.bin`, `.pt`, ...) are refused by their name and never opened.
- the tokenizer (`hf_tokenizer_import`): a sentencepiece `tokenizer.model`, else a
  `tokenizer.json` that is a sentencepiece BPE written out; made into a minigpt tokenizer.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from safetensors import safe_open

from minigpt_cli.config.schema import ModelConfig
from minigpt_cli.engine.export import hf_tokenizer_import
from minigpt_cli.engine.runs.files import read_metadata
from minigpt_cli.errors import UserError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
"""Weight files that are pickles (torch.save): refused by name, never opened."""
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
# Buffers some checkpoints carry that the network recomputes (rotary frequencies).
_RECOMPUTED = ("rotary_emb.inv_freq",)

# minigpt's [model] keys and the config.json keys they come from (for messages).
_HF_KEY = {
    "n_layer": "num_hidden_layers",
    "n_head": "num_attention_heads",
    "n_kv_head": "num_key_value_heads",
    "n_embd": "hidden_size",
    "head_size": "head_dim",
    "intermediate_size": "intermediate_size",
    "context_length": "max_position_embeddings",
    "rope_theta": "rope_theta",
    "norm_eps": "rms_norm_eps",
    "init_std": "initializer_range",
}


@dataclass
class Checkpoint:
    """A checked Hugging Face folder: what `hf_import` needs to write a run, nothing loaded yet."""

    folder: Path
    config: dict[str, Any]
    config_sha256: str
    model: ModelConfig
    rows: int
    """Embedding rows of the checkpoint (its `vocab_size`)."""
    weight_files: dict[str, Path]
    """Tensor name -> the safetensors file holding it."""
    dtypes: list[str]
    tokenizer: hf_tokenizer_import.ImportedTokenizer
    ignored: list[str] = field(default_factory=list)
    """Tensors in the files that the network recomputes (not imported)."""


def _refuse(where: Path, what: str) -> UserError:
    return UserError(f"{where}: {what}")


def read_config(folder: Path) -> tuple[dict[str, Any], str]:
    """`config.json` as a dict, and the SHA-256 of its bytes (recorded in the run)."""
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder (give a local Hugging Face model folder)")
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise _refuse(folder, f"no {CONFIG_FILE} (not a Hugging Face model folder)")
    data = path.read_bytes()
    try:
        config = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _refuse(path, f"not JSON ({error})") from None
    if not isinstance(config, dict):
        raise _refuse(path, "not a JSON object")
    return config, hashlib.sha256(data).hexdigest()


def _int(config: dict[str, Any], key: str, path: Path, default: int | None = None) -> int:
    value = config.get(key, default)
    if value is None:
        raise _refuse(path, f"no {key} (minigpt needs it to build the network)")
    if isinstance(value, bool) or not isinstance(value, int):
        raise _refuse(path, f"{key} = {value!r} is not an integer")
    return value


def _number(config: dict[str, Any], key: str, path: Path, default: float) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _refuse(path, f"{key} = {value!r} is not a number")
    return float(value)


def _check_architecture(config: dict[str, Any], path: Path) -> None:
    architectures = config.get("architectures")
    model_type = config.get("model_type")
    if architectures is not None and architectures != ["LlamaForCausalLM"]:
        raise _refuse(
            path,
            f"architectures = {architectures!r}: minigpt imports LlamaForCausalLM only",
        )
    if model_type != "llama":
        raise _refuse(path, f"model_type = {model_type!r}: minigpt imports llama only")


def _rope_theta(config: dict[str, Any], path: Path) -> float:
    """Rope theta from either spelling (transformers 4: `rope_theta`, 5: `rope_parameters`),
    refusing any rope scaling: minigpt's rotary embedding is the plain one."""
    scaling = config.get("rope_scaling")
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else None
        if kind != "default":
            shown = json.dumps(scaling)
            raise _refuse(path, f"rope_scaling = {shown}: minigpt has plain rotary embeddings only")
    parameters = config.get("rope_parameters")
    theta = config.get("rope_theta", 10_000.0)
    if parameters is not None:
        if not isinstance(parameters, dict):
            raise _refuse(path, f"rope_parameters = {parameters!r} is not an object")
        kind = parameters.get("rope_type", "default")
        if kind != "default":
            raise _refuse(
                path,
                f"rope_parameters.rope_type = {kind!r}: minigpt has plain rotary embeddings only",
            )
        partial = parameters.get("partial_rotary_factor", 1.0)
        if partial != 1.0:
            key = "rope_parameters.partial_rotary_factor"
            raise _refuse(path, f"{key} = {partial!r}: minigpt rotates whole heads")
        theta = parameters.get("rope_theta", theta)
    return _number({"rope_theta": theta}, "rope_theta", path, 10_000.0)


def model_config(config: dict[str, Any], path: Path) -> ModelConfig:
    """minigpt's `[model]` section for a Llama `config.json`, or a one-line refusal naming the
    key minigpt cannot represent. Defaults are transformers' `LlamaConfig` defaults."""
    _check_architecture(config, path)
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise _refuse(path, f"{key} = true: minigpt's Llama has no biases")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise _refuse(path, f"hidden_act = {act!r}: minigpt's MLP is SwiGLU (silu) only")
    if config.get("quantization_config") is not None:
        raise _refuse(path, "quantization_config: quantised weights are not imported")
    hidden = _int(config, "hidden_size", path)
    heads = _int(config, "num_attention_heads", path)
    kv_heads = _int(config, "num_key_value_heads", path, heads)
    if heads < 1 or kv_heads < 1 or heads % kv_heads:
        raise _refuse(
            path,
            f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})",
        )
    head_dim = config.get("head_dim")
    if head_dim is not None:
        head_dim = _int(config, "head_dim", path)
    if head_dim is None and hidden % heads:
        raise _refuse(path, f"hidden_size ({hidden}) is not a multiple of num_attention_heads")
    width = head_dim or hidden // heads
    if width % 2:
        raise _refuse(path, f"head_dim = {width} is odd (rotary embeddings rotate pairs)")
    values: dict[str, Any] = {
        "n_layer": _int(config, "num_hidden_layers", path),
        "n_head": heads,
        "n_kv_head": kv_heads if kv_heads != heads else None,
        "n_embd": hidden,
        "head_size": head_dim if head_dim is not None and head_dim * heads != hidden else None,
        "intermediate_size": _int(config, "intermediate_size", path),
        "context_length": _int(config, "max_position_embeddings", path, 2048),
        "rope_theta": _rope_theta(config, path),
        "norm_eps": _number(config, "rms_norm_eps", path, 1e-6),
        "init_std": _number(config, "initializer_range", path, 0.02),
        "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
        "dropout": 0.0,
    }
    try:
        return ModelConfig(**values)
    except ValidationError as error:
        first = error.errors()[0]
        key = _HF_KEY.get(str(first["loc"][0]) if first["loc"] else "", "config")
        message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
        given = config.get(key)
        raise _refuse(path, f"{key} = {given!r}: {message}") from None


# ---------------------------------------------------------------------------------- weights


def weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from `model.safetensors` or the shard index. Pickled
    weights are refused by name (never opened, let alone unpickled)."""
    single, index = folder / WEIGHTS_FILE, folder / WEIGHTS_INDEX
    if index.is_file():
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
            mapping = data["weight_map"]
            if not isinstance(mapping, dict):
                raise TypeError
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
            raise _refuse(index, "not a safetensors index (no weight_map object)") from None
        files: dict[str, Path] = {}
        for name, file in mapping.items():
            shard = folder / str(file)
            if Path(str(file)).name != str(file) or not shard.is_file():
                raise _refuse(index, f"weight_map names {file}, which is not in the folder")
            files[str(name)] = shard
        return files
    if single.is_file():
        return {}  # read from the file's header by `check_weights`
    pickled = sorted(p.name for p in folder.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    if pickled:
        raise _refuse(
            folder / pickled[0],
            "pickled PyTorch weights, which minigpt never unpickles (loading a pickle can run "
            "code); the weights must be safetensors: save them with "
            "`model.save_pretrained(DIR, safe_serialization=True)`",
        )
    raise _refuse(folder, f"no {WEIGHTS_FILE} or {WEIGHTS_INDEX} (the weights, as safetensors)")


def _headers(folder: Path, files: dict[str, Path]) -> dict[str, tuple[Path, list[int], str]]:
    """Every tensor's file, shape and dtype, from the safetensors headers alone."""
    paths = sorted(set(files.values())) if files else [folder / WEIGHTS_FILE]
    found: dict[str, tuple[Path, list[int], str]] = {}
    for path in paths:
        read_metadata(path)  # a pickle renamed .safetensors, or a truncated file: one line
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if files and files.get(name) != path:
                    continue  # the index places this name in another shard
                tensor = handle.get_slice(name)
                found[name] = (path, list(tensor.get_shape()), str(tensor.get_dtype()))
    missing_from_shards = sorted(set(files) - set(found))
    if missing_from_shards:
        name = missing_from_shards[0]
        raise _refuse(files[name], f"the index places {name} here, but the file lacks it")
    return found


def expected_shapes(model: ModelConfig, rows: int) -> dict[str, list[int]]:
    """Every weight `GPT(model, rows).export_state_dict()` holds, by transformers' name, with its
    shape (a test holds the two equal). Written out rather than built on torch's meta device,
    which costs 75 MB of the process's memory to start; tied models have no `lm_head.weight`."""
    d, ffn = model.n_embd, model.ffn_dim
    q_width, kv_width = model.n_head * model.head_dim, model.kv_heads * model.head_dim
    shapes: dict[str, list[int]] = {"model.embed_tokens.weight": [rows, d]}
    for index in range(model.n_layer):
        layer = f"model.layers.{index}"
        shapes.update(
            {
                f"{layer}.input_layernorm.weight": [d],
                f"{layer}.self_attn.q_proj.weight": [q_width, d],
                f"{layer}.self_attn.k_proj.weight": [kv_width, d],
                f"{layer}.self_attn.v_proj.weight": [kv_width, d],
                f"{layer}.self_attn.o_proj.weight": [d, q_width],
                f"{layer}.post_attention_layernorm.weight": [d],
                f"{layer}.mlp.gate_proj.weight": [ffn, d],
                f"{layer}.mlp.up_proj.weight": [ffn, d],
                f"{layer}.mlp.down_proj.weight": [d, ffn],
            }
        )
    shapes["model.norm.weight"] = [d]
    if not model.tie_embeddings:
        shapes["lm_head.weight"] = [rows, d]
    return shapes


def check_weights(
    folder: Path, files: dict[str, Path], model: ModelConfig, rows: int
) -> tuple[dict[str, Path], list[str], list[str]]:
    """(name -> file of each weight to import, their dtypes, the names left out as recomputed),
    or a one-line refusal naming the first missing, unexpected, misshapen or non-float tensor."""
    found = _headers(folder, files)
    expected = expected_shapes(model, rows)
    ignored = sorted(name for name in found if name.endswith(_RECOMPUTED))
    for name in sorted(expected):
        if name not in found:
            where = files.get(name) or folder / (WEIGHTS_INDEX if files else WEIGHTS_FILE)
            raise _refuse(where, f"missing tensor {name} (config.json makes the network need it)")
    dtypes: set[str] = set()
    for name, (path, shape, dtype) in sorted(found.items()):
        if name in ignored:
            continue
        if name == "lm_head.weight" and model.tie_embeddings:
            shape_wanted = expected["model.embed_tokens.weight"]
        elif name not in expected:
            raise _refuse(path, f"unexpected tensor {name}: minigpt's Llama has no such weight")
        else:
            shape_wanted = expected[name]
        if shape != shape_wanted:
            raise _refuse(
                path,
                f"tensor {name} has shape {tuple(shape)}, config.json makes {tuple(shape_wanted)}",
            )
        if dtype not in FLOAT_DTYPES:
            raise _refuse(path, f"tensor {name} is {dtype}; minigpt imports float weights only")
        dtypes.add(dtype)
    names = {name: path for name, (path, _, _) in found.items() if name not in ignored}
    return names, sorted(dtypes), ignored


def read_checkpoint(folder: Path) -> Checkpoint:
    """Check a Hugging Face folder completely (config, tokenizer, weight headers) without loading
    a tensor: anything minigpt cannot represent is refused here, before a file is written."""
    config, digest = read_config(folder)
    path = folder / CONFIG_FILE
    model = model_config(config, path)
    rows = _int(config, "vocab_size", path)
    files = weight_files(folder)
    tokenizer = hf_tokenizer_import.load(folder, config, rows)
    names, dtypes, ignored = check_weights(folder, files, model, rows)
    return Checkpoint(
        folder=folder,
        config=config,
        config_sha256=digest,
        model=model,
        rows=rows,
        weight_files=names,
        dtypes=dtypes,
        tokenizer=tokenizer,
        ignored=ignored,
    )
