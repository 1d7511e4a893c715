"""What a run directory holds: every file name in it, and the safetensors I/O its tensor files use.

One owner for the run-directory layout, so a new artefact is named once and every module that
writes or reads it (training, loading, eval, the CLI) refers to the same constant. Tensor files are
read only through `load_tensors`/`read_metadata`, which parse the safetensors header first: a
pickle (torch.save) or a truncated file gets a one-line error instead of being unpickled or
half-read. Imports nothing heavy at module level, so a run's state can be inspected (resume
checks, quickstart's plan) without loading torch.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from minigpt_cli.config.loader import RUN_CONFIG_FILE
from minigpt_cli.engine.core.io import atomic_write_bytes, before_write
from minigpt_cli.engine.data.tokenizer import MODEL_FILE as TOKENIZER_FILE
from minigpt_cli.errors import UserError

if TYPE_CHECKING:
    import torch

CONFIG_FILE = RUN_CONFIG_FILE
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
LOCK_FILE = ".lock"
ADAPTER_FILE = "adapter.safetensors"
"""The adapter weights in a LoRA run directory (and in each of its checkpoints/step-N/)."""
VALUE_HEAD_FILE = "value_head.safetensors"
"""PPO's value head, beside the policy's files in an rlhf run (and its snapshots)."""
REWARD_DIR = "reward"
"""rlhf runs: the reward model's own run directory."""

_MAX_HEADER = 100 * 2**20


# ----------------------------------------------------------------------------- safetensors I/O


def _read_header(path: Path) -> dict[str, Any]:
    """Parse a safetensors header ourselves: a pickle or a truncated file gets a clear message."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            opening = handle.read(1)
            handle.seek(8)
            # A safetensors file is an 8-byte header length and a JSON object; its first byte can
            # be 0x80 (a header of 128 + 256k bytes), so recognise it before looking for pickles.
            looks_like_safetensors = (
                len(prefix) == 8
                and opening == b"{"
                and 0 < struct.unpack("<Q", prefix)[0] <= size - 8
            )
            if not looks_like_safetensors and (prefix[:1] == b"\x80" or prefix[:2] == b"PK"):
                raise UserError(
                    f"{path}: this is a pickle/zip (torch.save) file, not safetensors; minigpt "
                    "never unpickles files because loading them can run arbitrary code"
                )
            if len(prefix) < 8:
                raise UserError(f"{path}: not a safetensors file (only {size} bytes)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > _MAX_HEADER or 8 + header_len > size:
                raise UserError(f"{path}: not a safetensors file, or truncated (bad header)")
            header = json.loads(handle.read(header_len))
    except OSError as error:
        raise UserError(f"{path}: cannot read ({error.strerror})") from error
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: not a safetensors file (header is not JSON)") from error
    if not isinstance(header, dict):
        raise UserError(f"{path}: not a safetensors file (header is not an object)")
    data_end = max(
        (int(info["data_offsets"][1]) for key, info in header.items() if key != "__metadata__"),
        default=0,
    )
    if 8 + header_len + data_end > size:
        raise UserError(
            f"{path}: truncated ({size} bytes, the header promises {8 + header_len + data_end}); "
            "the run's older snapshots under checkpoints/ may still be complete"
        )
    return header


def read_metadata(path: str | Path) -> dict[str, str]:
    """The `__metadata__` of a safetensors file (validated as safetensors first)."""
    return dict(_read_header(Path(path)).get("__metadata__") or {})


def load_tensors(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file, with one-line errors for missing, pickled or truncated files."""
    # lazy: safetensors.torch imports torch; the header checks above it must work without torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = Path(path)
    if not file.is_file():
        raise UserError(f"{file}: no such file")
    _read_header(file)
    try:
        return load_file(str(file), device=device)
    except (SafetensorError, OSError, ValueError) as error:
        raise UserError(f"{file}: cannot load safetensors file ({error})") from error


def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with a canonical header: metadata keys sorted, tensors in data
    order, no spaces. The safetensors writer keeps metadata in a Rust HashMap, whose order changes
    from process to process: the same weights would otherwise be different bytes."""
    return b"".join(_canonical_parts(data))


def _canonical_parts(data: bytes) -> tuple[bytes, memoryview]:
    """`canonical_safetensors` as (new header, the tensor bytes as a view of `data`): written one
    after the other, a snapshot's largest file is never copied whole (slicing and concatenating
    bytes made two more copies of it: 585 MB over a 195 MB optimizer file at `small`)."""
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    metadata = header.pop("__metadata__", None)
    tensors = sorted(header.items(), key=lambda item: (item[1]["data_offsets"], item[0]))
    ordered: dict[str, Any] = {}
    if metadata:
        ordered["__metadata__"] = dict(sorted(metadata.items()))
    ordered.update(tensors)
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the format pads the header to 8 bytes with spaces
    return struct.pack("<Q", len(text)) + text, memoryview(data)[8 + header_len :]


def save_tensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> None:
    """Write a safetensors file atomically, in canonical bytes (contiguous CPU copies; metadata
    values are strings): the same tensors and metadata always give the same file."""
    from safetensors.torch import save  # lazy: imports torch (see the module docstring)

    cpu = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
    data = save(cpu, metadata={k: str(v) for k, v in metadata.items()})
    atomic_write_bytes(path, *_canonical_parts(data))


def stream_tensors(
    path: str | Path,
    shapes: Mapping[str, Sequence[int]],
    read: Callable[[str], torch.Tensor],
    metadata: dict[str, str],
) -> None:
    """Write float32 tensors as the canonical safetensors bytes `save_tensors` gives them, one
    tensor at a time: the header from `shapes` first, then each tensor as `read(name)` returns it,
    written and dropped before the next is read. `save_tensors` holds the tensors plus two
    serialised copies of them (safetensors' per-tensor bytes and the file); this holds one
    tensor, so an import or export writing weights never needs a second copy of them. Written in
    place and fsynced (callers write into a staging folder renamed whole)."""
    import torch  # lazy: this module imports no torch at load time (see its docstring)

    names = sorted(shapes)  # safetensors' data order for tensors of one dtype
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for name in names:
        count = 1
        for size in shapes[name]:
            count *= int(size)
        header[name] = {
            "dtype": "F32",
            "shape": [int(size) for size in shapes[name]],
            "data_offsets": [offset, offset + count * 4],
        }
        offset += count * 4
    if not metadata:
        del header["__metadata__"]
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    before_write(Path(path))
    with Path(path).open("wb") as handle:
        handle.write(struct.pack("<Q", len(text)) + text)
        for name in names:
            tensor = read(name)
            if tensor.dtype != torch.float32:
                raise TypeError(f"{name}: expected float32, got {tensor.dtype}")
            if tuple(tensor.shape) != tuple(header[name]["shape"]):
                raise ValueError(f"{name}: shape {tuple(tensor.shape)}, declared {shapes[name]}")
            tensor = tensor.detach().contiguous()
            if tensor.numel():
                handle.write(tensor.numpy().data.cast("B"))
            del tensor
        handle.flush()
        os.fsync(handle.fileno())
