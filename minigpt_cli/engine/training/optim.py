"""The optimizer side of training, in one place: AdamW, the schedule, the run's length, the update.

The Trainer runs every stage's steps through `backward` and `apply_update`, and doctor's timed
training step (`step_timing`) calls the same two functions, so what `doctor --budget` times is the
update a run really makes: a change to clipping or loss scaling here changes both at once.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from minigpt_cli.config.schema import TrainConfig
from minigpt_cli.errors import UserError


def plan_steps(
    train: TrainConfig, tokens_per_step: int, sequences_per_step: int, sequences_per_epoch: int
) -> int:
    """Optimizer steps the schedule spans: the tightest of max_steps, max_tokens and epochs.

    `sequences_per_epoch` is the training examples in one pass over the data (the stage's
    `sequences_per_epoch()`), which turns `epochs` into steps.
    """
    limits = []
    if train.max_steps is not None:
        limits.append(train.max_steps)
    if train.max_tokens is not None:
        limits.append(max(1, math.ceil(train.max_tokens / max(tokens_per_step, 1))))
    if train.epochs is not None:
        limits.append(max(1, math.ceil(train.epochs * sequences_per_epoch / sequences_per_step)))
    if not limits:
        raise UserError(
            "no training length: set one of max_steps, max_tokens or epochs "
            "(--max-steps, --max-tokens, --epochs)"
        )
    return min(limits)


def learning_rate(
    step: int, total_steps: int, warmup_steps: int, peak: float, floor: float
) -> float:
    """Linear warmup to `peak`, then cosine decay to `floor` at `total_steps`.

    A floor above the peak (min_lr left at a preset's value after lowering learning_rate) is
    clamped to the peak rather than refused, so lowering one number never breaks a config.
    """
    floor = min(floor, peak)
    if warmup_steps and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - floor)


def build_optimizer(
    model: torch.nn.Module, train: TrainConfig, device: torch.device
) -> tuple[torch.optim.Optimizer, dict[int, str]]:
    """AdamW with weight decay on matrices only; fused where this device supports it."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for _, p in named if p.dim() >= 2]
    no_decay = [p for _, p in named if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    kwargs: dict[str, Any] = {
        "lr": train.learning_rate,
        "betas": (train.beta1, train.beta2),
        "eps": train.adam_eps,
    }
    try:
        optimizer = torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        optimizer = torch.optim.AdamW(groups, foreach=True, **kwargs)
    ordered = decay + no_decay
    name_of = {id(p): n for n, p in named}
    return optimizer, {index: name_of[id(p)] for index, p in enumerate(ordered)}


def backward(loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> None:
    """Add one micro-batch's gradients: `loss` already divided by the whole step's normaliser, so
    accumulated micro-batches sum to the gradient of one big batch. fp16 scales it first (the
    scaler keeps small gradients from underflowing)."""
    (scaler.scale(loss) if scaler is not None else loss).backward()


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """`torch.nn.utils.clip_grad_norm_`, bitwise, without its pass over the gradients when the
    norm is under the bound: torch multiplies every gradient by the clamped coefficient, 1.0 then,
    so as not to synchronise a GPU; the norm is read on the host at every step here anyway (it is
    logged). On `small` that multiplication was 5 ms of a 550 ms bf16 step (profile)."""
    utils = torch.nn.utils
    if not hasattr(utils, "get_total_norm"):  # torch < 2.6: the one-call form
        return float(utils.clip_grad_norm_(params, max_norm))
    grads = [p.grad for p in params if p.grad is not None]
    total = utils.get_total_norm(grads)
    # torch's own coefficient before its clamp; NaN (a NaN gradient) scales as torch would
    if not float(max_norm / (total + 1e-6)) >= 1.0:
        utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total)


def apply_update(
    optimizer: torch.optim.Optimizer, grad_clip: float, scaler: torch.amp.GradScaler | None
) -> float:
    """One optimizer update from the accumulated gradients; returns the gradient norm.

    Unscales first (fp16), so clipping at `grad_clip` (off when 0) and the norm are in true units;
    a scaler skips a step whose gradients overflowed. Gradients are cleared for the next step.
    """
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if grad_clip > 0:
        grad_norm = clip_gradients(params, grad_clip)
    else:
        grad_norm = float(
            torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in params if p.grad is not None])
            )
        )
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm
