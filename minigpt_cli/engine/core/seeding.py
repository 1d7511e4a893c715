"""One seed names one run: the random generators a run may draw from, seeded in one place.

Python's `random`, numpy's global generator and torch's (every device) are seeded together, and
saved and restored together (`rng_state`, `restore_rng`: the Trainer's checkpoints), so a run
starts all three from its seed and a resumed run continues all three exactly.
"""

from __future__ import annotations

import base64
import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed every generator a run draws from, so a seed names one run."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every generator's state as JSON-able data, for a checkpoint's trainer_state."""
    state: dict[str, Any] = {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": _numpy_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [
            base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()
        ]
    return state


def _numpy_state() -> list[Any]:
    # The global generator is MT19937, whose legacy state is this tuple (the stubs also allow the
    # dict other bit generators give).
    state = np.random.get_state()
    assert isinstance(state, tuple)
    name, keys, pos, has_gauss, cached = state
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def restore_rng(state: dict[str, Any]) -> None:
    """Put back what `rng_state` saved, so a resumed run draws what the uninterrupted one did."""
    raw = np.frombuffer(base64.b64decode(state["torch"]), dtype=np.uint8).copy()
    torch.set_rng_state(torch.from_numpy(raw))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(
            [
                torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())
                for s in state["cuda"]
            ]
        )


def tensor_to_json(tensor: torch.Tensor) -> dict[str, Any]:
    """A tensor as JSON (dtype, shape, base64 bytes): what a stage keeps in trainer_state.json
    beside the RNG states (RLHF's rollout buffer), restored bit for bit by `tensor_from_json`."""
    array = tensor.detach().cpu().contiguous().numpy()
    return {
        "dtype": str(array.dtype),
        "shape": list(array.shape),
        "data": base64.b64encode(array.tobytes()).decode(),
    }


def tensor_from_json(payload: dict[str, Any]) -> torch.Tensor:
    raw = base64.b64decode(payload["data"])
    array = np.frombuffer(raw, dtype=np.dtype(payload["dtype"])).reshape(payload["shape"])
    return torch.from_numpy(array.copy())
