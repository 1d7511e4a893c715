"""Low-rank adapters (LoRA): fine-tune a few percent of the weights, keep the parent's frozen.

A LoRA run stores only what it trained, `adapter.safetensors`, and is loaded as the parent run's
weights plus that adapter (`runs.load.load_run` does this transparently); `merge_lora` folds the
adapter into the weights when a standalone `model.safetensors` is wanted. This module is the maths
and the adapter's tensors and metadata only: it imports torch, the config schema and nothing from
the run directory (file names and loading are `runs.files` and `runs.load`), so it can be read and
tested alone.

Why this shape:
- Names follow Hugging Face PEFT: a wrapped projection keeps its base `weight` under the original
  name and gains `lora_A.weight` (r x in) and `lora_B.weight` (out x r), so the adapter file's
  names are PEFT's minus its `base_model.model.` prefix and `model.export_state_dict()` still gives
  the plain base tensors. Export to PEFT is a rename.
- Initialisation is PEFT's: A Kaiming-uniform, B zero. B = 0 makes the update exactly zero, so
  before the first step the adapted model computes bit for bit what its parent does.
- The update is scaled by alpha / r, so changing the rank does not change the effective learning
  rate much; dropout (optional) acts on the adapter's input only, as in PEFT.
- A run that starts from an unmerged LoRA run continues that run's adapter rather than stacking a
  second one (`apply_lora` refuses an adapted model): the adapter file of every run in a chain then
  applies to the same base weights, and loading a chain is "base + the newest adapter".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from minigpt_cli.config.schema import LoraConfig, ModelConfig
from minigpt_cli.errors import UserError

if TYPE_CHECKING:
    from minigpt_cli.engine.model.gpt import GPT

ADAPTER_FORMAT = "minigpt-lora"
"""`format` value in the adapter file's metadata: tells an adapter from a model file."""

# Which submodule of a decoder layer owns each projection.
_OWNER = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}


class LoRALinear(nn.Linear):
    """A frozen `nn.Linear` plus a trainable low-rank update: y = x W^T + (alpha/r) B A x.

    It subclasses `nn.Linear` and holds the very same `weight` Parameter as the layer it wraps, so
    the base weights are shared (no copy) and keep their state-dict name. Being a subclass but not
    exactly `nn.Linear` also steers the model off its fused q/k/v (gate/up) matmul, which reads the
    base weights directly and would skip the update.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> None:
        # The meta device skips allocating (and initialising) a weight that is replaced at once.
        super().__init__(
            base.in_features, base.out_features, bias=base.bias is not None, device="meta"
        )
        self.weight = base.weight
        self.bias = base.bias
        self.r = r
        self.alpha = float(alpha)
        self.dropout_p = float(dropout)
        self.scaling = self.alpha / r
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(base.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, **factory)
        self.reset_lora_parameters()
        self.train(base.training)

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """PEFT's initialisation: the update starts at exactly zero but A already carries signal,
        so B gets a useful gradient from the first step."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.linear(x, self.weight, self.bias)
        update = self.lora_B(self.lora_A(self.lora_dropout(x)))
        return base + update * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """The dense update (alpha/r) B A, computed in fp32, in the base weight's dtype."""
        return lora_delta(self.lora_A.weight, self.lora_B.weight, self.scaling, self.weight.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha}, dropout={self.dropout_p}"


def lora_delta(
    lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, dtype: torch.dtype
) -> torch.Tensor:
    """The dense update (alpha/r) B A of one projection, computed in fp32, returned in `dtype`:
    what `merge_lora` adds to a loaded model's weight, and an export to each weight it reads."""
    delta = lora_b.float() @ lora_a.float()
    return (delta * scaling).to(dtype)


def _lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def has_lora(model: nn.Module) -> bool:
    """Whether `model` carries (unmerged) LoRA adapters."""
    return any(isinstance(module, LoRALinear) for module in model.modules())


def lora_settings(model: nn.Module) -> LoraConfig | None:
    """The settings the model's adapters were built with (None without adapters).

    A stage that continues a loaded LoRA run's adapter saves these, not its own `[lora]` section,
    so the adapter file always describes the adapter it holds.
    """
    modules = _lora_modules(model)
    if not modules:
        return None
    first = modules[0][1]
    targets = {name.rpartition(".")[2] for name, _ in modules}
    return LoraConfig(
        r=first.r, alpha=first.alpha, dropout=first.dropout_p, targets=sorted(targets)
    )


def mark_only_lora_trainable(model: nn.Module) -> int:
    """Freeze every parameter but the adapters'; returns how many parameters stay trainable.

    The embeddings (and the tied output head), the norms and every base weight are frozen, so the
    optimizer only ever sees the adapters and their moments are all the state a checkpoint needs.
    """
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    trainable = 0
    for _, module in _lora_modules(model):
        for weight in (module.lora_A.weight, module.lora_B.weight):
            weight.requires_grad_(True)
            trainable += weight.numel()
    return trainable


def apply_lora(model: GPT, settings: LoraConfig) -> int:
    """Wrap the target projections of every layer in `LoRALinear`, freeze everything else.

    Returns the trainable parameter count (what the memory estimator's `trainable_params` wants).
    A model that already has adapters is refused: train those further, or `merge_lora` first to
    start a new adapter on top of the merged weights.
    """
    if has_lora(model):
        raise ValueError(
            "the model already has LoRA adapters: continue training them, or merge_lora() "
            "before adding new ones"
        )
    for layer in model.model.layers:
        for name in settings.targets:
            owner = getattr(layer, _OWNER[name])
            base = getattr(owner, name)
            setattr(owner, name, LoRALinear(base, settings.r, settings.alpha, settings.dropout))
    return mark_only_lora_trainable(model)


def _projection_shapes(model_cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of each projection LoRA can target."""
    d, ffn = model_cfg.n_embd, model_cfg.ffn_dim
    q_width = model_cfg.n_head * model_cfg.head_dim
    kv_width = model_cfg.kv_heads * model_cfg.head_dim
    return {
        "q_proj": (d, q_width),
        "k_proj": (d, kv_width),
        "v_proj": (d, kv_width),
        "o_proj": (q_width, d),
        "gate_proj": (d, ffn),
        "up_proj": (d, ffn),
        "down_proj": (ffn, d),
    }


def count_lora_parameters(model_cfg: ModelConfig, settings: LoraConfig) -> int:
    """Adapter parameters for a model shape, without building it: r * (in + out) per projection.

    Equals what `apply_lora` returns, so a plan (the memory estimate) can be made before the model
    exists.
    """
    shapes = _projection_shapes(model_cfg)
    per_layer = sum(settings.r * sum(shapes[name]) for name in settings.targets)
    return model_cfg.n_layer * per_layer


def adapter_shapes(model_cfg: ModelConfig, settings: LoraConfig) -> dict[str, tuple[int, int]]:
    """Every tensor `adapter_state_dict` holds for this shape and these settings, with its shape,
    without building the model (an export merges an adapter tensor by tensor)."""
    projections = _projection_shapes(model_cfg)
    shapes: dict[str, tuple[int, int]] = {}
    for index in range(model_cfg.n_layer):
        for name in settings.targets:
            stem = f"model.layers.{index}.{_OWNER[name]}.{name}"
            features_in, features_out = projections[name]
            shapes[f"{stem}.lora_A.weight"] = (settings.r, features_in)
            shapes[f"{stem}.lora_B.weight"] = (features_out, settings.r)
    return shapes


def check_adapter_shapes(
    found: Mapping[str, tuple[int, ...]],
    expected: Mapping[str, tuple[int, ...]],
    source: str | Path = "adapter",
) -> None:
    """Refuse (one line) adapter tensors whose names or shapes are not exactly `expected`'s:
    a partial adapter would silently leave some projections at B = 0, i.e. untuned."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        more = len(missing or unexpected) - 3
        if more > 0:
            detail += f" and {more} more"
        raise UserError(f"{source}: adapter does not match the model ({detail})")
    for name, shape in found.items():
        if tuple(shape) != tuple(expected[name]):
            raise UserError(
                f"{source}: adapter does not match the model ({name} has shape "
                f"{tuple(shape)}, the model needs {tuple(expected[name])})"
            )


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only, PEFT-named: `model.layers.0.self_attn.q_proj.lora_A.weight`."""
    tensors: dict[str, torch.Tensor] = {}
    for name, module in _lora_modules(model):
        tensors[f"{name}.lora_A.weight"] = module.lora_A.weight.detach()
        tensors[f"{name}.lora_B.weight"] = module.lora_B.weight.detach()
    return tensors


def adapter_metadata(settings: LoraConfig) -> dict[str, str]:
    """What an adapter file must carry to be rebuilt: safetensors metadata is str -> str."""
    return {
        "format": ADAPTER_FORMAT,
        "r": str(settings.r),
        "alpha": repr(float(settings.alpha)),
        "dropout": repr(float(settings.dropout)),
        "targets": ",".join(settings.targets),
    }


def settings_from_metadata(
    metadata: Mapping[str, str], source: str | Path = "adapter"
) -> LoraConfig:
    """Inverse of `adapter_metadata` (other keys, such as a checkpoint's `step`, are ignored)."""
    missing = [key for key in ("r", "alpha", "dropout", "targets") if key not in metadata]
    if missing:
        raise UserError(
            f"{source}: not a minigpt LoRA adapter (its metadata lacks {', '.join(missing)})"
        )
    try:
        return LoraConfig(
            r=int(metadata["r"]),
            alpha=float(metadata["alpha"]),
            dropout=float(metadata["dropout"]),
            targets=metadata["targets"],
        )
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        raise UserError(f"{source}: bad LoRA metadata ({field}: {first['msg']})") from error
    except ValueError as error:
        raise UserError(f"{source}: bad LoRA metadata ({error})") from error


def load_adapter_state_dict(
    model: nn.Module, tensors: Mapping[str, torch.Tensor], source: str | Path = "adapter"
) -> None:
    """Copy adapter tensors into an adapted model; names and shapes must match exactly.

    Strict because a partial load would silently leave some projections at B = 0, i.e. untuned.
    """
    if not has_lora(model):
        raise ValueError("the model has no LoRA adapters: apply_lora() before loading an adapter")
    expected = adapter_state_dict(model)
    check_adapter_shapes(
        {name: tuple(tensor.shape) for name, tensor in tensors.items()},
        {name: tuple(tensor.shape) for name, tensor in expected.items()},
        source,
    )
    with torch.no_grad():
        for name, tensor in tensors.items():
            expected[name].copy_(tensor)


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (W += alpha/r B A) and unwrap to plain nn.Linear.

    Afterwards `model.export_state_dict()` is an ordinary model file and the fused projections are
    used again. Parameters keep their `requires_grad` (the base stays frozen); call
    `model.requires_grad_(True)` to train the merged model in full.
    """
    for name, module in _lora_modules(model):
        module.weight.add_(module.delta_weight())
        plain = nn.Linear(
            module.in_features, module.out_features, bias=module.bias is not None, device="meta"
        )
        plain.weight = module.weight
        plain.bias = module.bias
        plain.train(module.training)
        owner_name, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(owner_name), attribute, plain)
