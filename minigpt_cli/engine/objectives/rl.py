"""The mathematics of RLHF (PPO and GRPO) as small pure functions on tensors.

Nothing here knows about models, batches or the Trainer: the RLHF stage gathers log-probabilities,
values and rewards of its rollouts and calls these, so each formula can be checked by hand in a
test. The conventions are InstructGPT's (Ouyang et al. 2022) as implemented by TRL's PPO and GRPO
trainers, which is what someone who knows either expects:

- Tensors of a batch of responses are (B, T), right-padded; `mask` is True on the response's real
  tokens (generated tokens, the end-of-turn included), False on padding. Prompt tokens are not in
  these tensors: an RL step acts only on what the policy generated.
- The sequence-level reward (a reward model's score, a rule's verdict) arrives on the response's
  LAST real token; every response token also pays `-kl_coef * KL` to the frozen reference
  (`kl_penalised_rewards`). The KL estimate per token is k1 = logp - ref_logp (unbiased, what PPO
  penalises) or k3 = exp(ref - logp) - (ref - logp) - 1 (always >= 0, lower variance, what GRPO
  adds to its loss); see http://joschu.net/blog/kl-approx.html.
- PPO: GAE advantages (`gae`), whitened over the batch (`masked_whiten`), the clipped surrogate
  (`ppo_policy_loss`) and the clipped value loss (`ppo_value_loss`), both averaged over all
  response tokens of the batch (TRL's `masked_mean`).
- GRPO (Shao et al. 2024): no value model; one advantage per sequence, its reward standardised
  within its group of G samples of the same prompt (`grpo_advantages`); the loss is the clipped
  surrogate plus k3 KL to the reference, averaged over each sequence's tokens and then over the
  sequences (`grpo_loss`).

Losses are means. The Trainer divides a stage's summed loss by the step's `loss_normaliser`, so a
stage returns `mean * count` (tokens for PPO, sequences for GRPO) and names the same count as its
normaliser: gradient accumulation then gives exactly the update of one large batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F

KlEstimator = Literal["k1", "k3"]

# Added to a variance before the square root (TRL's value): whitening a batch of equal numbers
# gives zeros, not a division by zero.
WHITEN_EPS = 1e-8

# Added to a group's standard deviation in GRPO (TRL's value): keeps a nearly tied group's
# advantages finite. A group whose rewards are exactly equal gets zero advantages regardless.
GRPO_STD_EPS = 1e-4


# ----------------------------------------------------------------------------------------------
# Masked statistics
# ----------------------------------------------------------------------------------------------


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is True (over everything, or along `dim`).

    An empty mask gives 0 rather than NaN: a batch (or a row) without tokens contributes nothing.
    """
    weights = mask.to(values.dtype)
    if dim is None:
        return (values * weights).sum() / weights.sum().clamp(min=1)
    return (values * weights).sum(dim) / weights.sum(dim).clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `values` where `mask` is True; unbiased (n - 1) by default, as TRL whitens."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        count = mask.sum()
        variance = variance * count / (count - 1).clamp(min=1)
    return variance


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True
) -> torch.Tensor:
    """(values - mean) / std over the masked positions only; padding positions come back 0.

    PPO whitens advantages over the whole batch so the policy step's size does not depend on the
    reward's scale. `shift_mean=False` only rescales (TRL's option for rewards, where the sign
    matters). The statistics never see padding, so how much padding a batch has changes nothing.
    """
    mean = masked_mean(values, mask)
    variance = masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(variance + WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


# ----------------------------------------------------------------------------------------------
# KL to the reference and the per-token rewards
# ----------------------------------------------------------------------------------------------


def per_token_kl(
    policy_logps: torch.Tensor, reference_logps: torch.Tensor, estimator: KlEstimator = "k1"
) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probs.

    k1 = logp - ref_logp: unbiased, can be negative on a single token; the per-token penalty
    InstructGPT and TRL's PPO put into the rewards.
    k3 = exp(r) - r - 1 with r = ref_logp - logp: unbiased and never negative, with lower
    variance; what GRPO adds to its loss. Both are exactly 0 when the two log-probs agree.
    """
    if estimator == "k1":
        return policy_logps - reference_logps
    if estimator == "k3":
        log_ratio = reference_logps - policy_logps
        return torch.exp(log_ratio) - log_ratio - 1.0
    raise ValueError(f"KL estimator must be 'k1' or 'k3', got {estimator!r}")


def response_kl(
    policy_logps: torch.Tensor, reference_logps: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """(B,) KL of each response to the reference: k1 summed over its tokens, detached.

    TRL's measure, what the PPO penalty adds up to over an episode and what `target_kl` is in,
    so a longer answer counts for more.
    """
    kl_tokens = per_token_kl(policy_logps.detach(), reference_logps)
    return (kl_tokens * mask.to(kl_tokens.dtype)).sum(dim=1)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of each row's last True position; rows must have at least one."""
    if not bool(mask.any(dim=1).all()):
        raise ValueError("every response needs at least one token (a row of the mask is empty)")
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, -1).argmax(dim=1)


def kl_penalised_rewards(
    scores: torch.Tensor,
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: KlEstimator = "k1",
) -> torch.Tensor:
    """(B, T) per-token rewards: -kl_coef * KL on every response token, plus the sequence's score
    (B,) on its last real token; 0 on padding.

    The penalty keeps the policy near the reference (the model the reward model was trained on the
    outputs of); putting it on every token gives the value function a dense signal while the
    score, which judges the whole response, arrives once at its end (InstructGPT, TRL). The
    result is a training target: it is detached.
    """
    kl = per_token_kl(policy_logps.detach(), reference_logps.detach(), estimator)
    rewards = -kl_coef * kl * mask.to(kl.dtype)
    last = last_token_index(mask)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores.detach().to(rewards.dtype)
    return rewards


# ----------------------------------------------------------------------------------------------
# PPO
# ----------------------------------------------------------------------------------------------


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over right-padded responses.

    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1}, where the
    value after a response's last real token is 0 (the episode ends there). Returns
    (advantages, returns = advantages + values), both 0 on padding. Values and rewards at padding
    positions are ignored, whatever they hold. Not whitened: see `masked_whiten`.
    """
    weights = mask.to(values.dtype)
    rewards = rewards.to(values.dtype) * weights
    values = values * weights
    steps = rewards.shape[1]
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(steps)):
        next_value = values[:, t + 1] if t + 1 < steps else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        # Padding after the last token has zero reward and value, so `running` is still 0 when
        # the loop reaches the last real token: nothing leaks in from beyond the episode.
        running = (delta + gamma * lam * running) * weights[:, t]
        advantages[:, t] = running
    returns = (advantages + values) * weights
    return advantages, returns


def _clipped_surrogate(
    logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, clip_eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO loss max(-A r, -A clip(r, 1 - eps, 1 + eps)) and where the clip binds.

    The max is the pessimistic choice: once the ratio has moved past the clip range in the
    direction the advantage rewards, the clipped term is the larger loss and carries no gradient,
    so one batch cannot push the policy far. On the other side the unclipped term is kept.
    """
    if clip_eps <= 0:
        raise ValueError(f"clip_eps must be positive, got {clip_eps}")
    ratio = torch.exp(logps - old_logps)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    return torch.max(unclipped, clipped), clipped > unclipped


def ppo_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, clip_frac, approx_kl): PPO's clipped surrogate averaged over all response tokens.

    `logps` are the current policy's per-token log-probs (with gradient), `old_logps` those at
    rollout time, `advantages` (B, T) per token. `clip_frac` is the share of tokens where the
    clip binds (their gradient is zero); `approx_kl` = 0.5 * mean((logp - old_logp)^2), TRL's
    measure of how far the epochs over this batch have moved the policy. Both are detached.
    """
    per_token, clipped = _clipped_surrogate(logps, old_logps, advantages, clip_eps)
    loss = masked_mean(per_token, mask)
    clip_frac = masked_mean(clipped.to(per_token.dtype), mask).detach()
    approx_kl = 0.5 * masked_mean((logps - old_logps).detach() ** 2, mask)
    return loss, clip_frac, approx_kl


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
) -> torch.Tensor:
    """0.5 * mean over response tokens of max((V - R)^2, (V_clipped - R)^2).

    V_clipped = old_V + clip(V - old_V, -eps, eps): like the policy, the value function may not
    move far from its rollout-time estimate in one batch, and the larger (pessimistic) error is
    the one trained on (PPO2 / TRL).
    """
    if clip_eps <= 0:
        raise ValueError(f"clip_eps must be positive, got {clip_eps}")
    clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    errors = torch.max((values - returns) ** 2, (clipped - returns) ** 2)
    return 0.5 * masked_mean(errors, mask)


class FixedKLController:
    """A constant KL coefficient (`--kl-coef` without a target)."""

    def __init__(self, kl_coef: float) -> None:
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Nothing to adapt; returns the coefficient."""
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """The KL coefficient steered towards a target KL (Ziegler et al. 2019, as in TRL).

    After each batch: e = clip(KL / target - 1, -0.2, 0.2), coef *= 1 + e * n_steps / horizon.
    Too much KL raises the penalty, too little lowers it; the clip and the horizon (in samples)
    keep each change small, so one noisy batch cannot swing it.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        if init_kl_coef <= 0:
            raise ValueError(f"init_kl_coef must be positive, got {init_kl_coef}")
        if target <= 0:
            raise ValueError(f"the KL target must be positive, got {target}")
        if horizon <= 0:
            raise ValueError(f"the horizon must be positive, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Adapt to the KL measured over `n_steps` samples; returns the new coefficient."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class CeilingKLController(AdaptiveKLController):
    """The KL coefficient raised when the KL crosses a ceiling, and relaxed back (never below
    where it started) when it is under: the target is a limit the KL is held under, not a
    level it is steered to.

    After each batch: e = clip(KL / target - 1, -0.2, 1), coef = max(start, coef * (1 + e *
    n_steps / horizon)). Ziegler's controller (the parent class) is a setpoint: a run starts at
    KL 0, under any target, so it first lowers the coefficient and the KL then overshoots; and
    its symmetric clip lets a right-skewed KL estimate sit above the target half the time.
    Here the start coefficient is a floor, and a KL twice the target raises the coefficient up
    to five times faster than one under it lowers it, so the KL spends little time over the
    target (measured: tests/test_rlhf.py, README "RLHF: the KL control").
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        super().__init__(init_kl_coef, target, horizon)
        self.floor = self.value

    def update(self, current_kl: float, n_steps: int) -> float:
        """Adapt to the KL measured over `n_steps` samples; returns the new coefficient."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 1.0)
        self.value = max(self.floor, self.value * (1.0 + error * n_steps / self.horizon))
        return self.value


# ----------------------------------------------------------------------------------------------
# GRPO
# ----------------------------------------------------------------------------------------------


def grpo_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """(G * P,) advantages: each reward standardised within its group of `group_size` samples.

    Rewards are laid out prompt by prompt, the G samples of one prompt next to each other (TRL).
    A = (r - group mean) / (group std + 1e-4), the std unbiased as `torch.std`; `scale=False`
    only centres (Dr. GRPO's variant). A group whose rewards are all equal teaches nothing about
    which sample is better: its advantages are exactly 0, not rounding noise over a tiny std.
    """
    if group_size < 2:
        raise ValueError(f"GRPO needs at least 2 samples per prompt, got {group_size}")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards must be a flat tensor of groups of {group_size}, got shape "
            f"{tuple(rewards.shape)}"
        )
    groups = rewards.view(-1, group_size).to(torch.promote_types(rewards.dtype, torch.float32))
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (groups.std(dim=1, keepdim=True) + GRPO_STD_EPS)
    tied = (groups == groups[:, :1]).all(dim=1, keepdim=True)
    return torch.where(tied, torch.zeros_like(centred), centred).view(-1)


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, clip_frac, kl): the GRPO objective of a batch of sequences.

    Per token: the clipped surrogate with the sequence's advantage (B,) broadcast over its tokens,
    plus kl_coef * k3 KL to the reference. Averaged over each sequence's tokens, then over the
    sequences (the GRPO paper, TRL's original loss), so a long answer does not outweigh a short
    one. `clip_frac` (share of clipped tokens) and `kl` (mean k3 KL, per sequence then batch) are
    detached, for the log.
    """
    per_token, clipped = _clipped_surrogate(logps, old_logps, advantages.unsqueeze(1), clip_eps)
    kl = per_token_kl(logps, ref_logps, "k3")
    if kl_coef:
        per_token = per_token + kl_coef * kl
    loss = masked_mean(per_token, mask, dim=1).mean()
    clip_frac = masked_mean(clipped.to(per_token.dtype), mask).detach()
    kl_mean = masked_mean(kl.detach(), mask, dim=1).mean()
    return loss, clip_frac, kl_mean


# ----------------------------------------------------------------------------------------------
# What the log shows
# ----------------------------------------------------------------------------------------------


def logps_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(tokens) under `logits` (..., V), shaped like `tokens`, in fp32 whatever the logits'
    dtype. Through `log_softmax` (one fused pass, and a fused backward): on the CPU, 900 rows of
    5,000, 1.3-1.8x the speed of the picked logit minus `logsumexp` (1.6-2.2x with the backward),
    equal to it within fp32 rounding."""
    picked = logits.float().log_softmax(dim=-1).gather(-1, tokens.unsqueeze(-1))
    return picked.squeeze(-1)


def entropy_from_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the next-token distributions at the masked positions.

    H = logsumexp(l) - sum(softmax(l) * l), in fp32. Falling entropy shows the policy narrowing;
    a collapse to near 0 usually comes with repetitive, reward-hacking samples.
    """
    logits = logits.float()
    entropy = torch.logsumexp(logits, dim=-1) - (F.softmax(logits, dim=-1) * logits).sum(dim=-1)
    return masked_mean(entropy, mask)


def distinct_n(token_lists: Sequence[Sequence[int]], n: int) -> float:
    """Distinct n-grams over all n-grams of the samples (Li et al. 2016), corpus level, in [0, 1].

    Repetition (a common way to game a learned reward) drives it down. No n-grams at all: 0.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    seen: set[tuple[int, ...]] = set()
    total = 0
    for tokens in token_lists:
        sequence = tuple(tokens)
        for start in range(len(sequence) - n + 1):
            seen.add(sequence[start : start + n])
            total += 1
    return len(seen) / total if total else 0.0


# ----------------------------------------------------------------------------------------------
# Reward normalisation
# ----------------------------------------------------------------------------------------------


class RunningMoments:
    """Running count, mean and variance of every number seen (Welford, merged batch by batch).

    Used to standardise rewards across iterations (TRL's `use_score_scaling`); the state is three
    plain numbers (`state_dict`), so a run checkpoints it in its JSON state and resumes exactly.
    Batches are merged with Chan et al.'s parallel formula in float64, which stays accurate over
    a long run where summing squares would not.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0  # sum of squared deviations from the mean

    def update(self, values: torch.Tensor | Sequence[float]) -> None:
        """Fold a batch of numbers into the running statistics."""
        batch = torch.as_tensor(values, dtype=torch.float64).detach().flatten().cpu()
        size = batch.numel()
        if size == 0:
            return
        batch_mean = float(batch.mean())
        batch_m2 = float(((batch - batch_mean) ** 2).sum())
        total = self.count + size
        delta = batch_mean - self.mean
        self.mean += delta * size / total
        self.m2 += batch_m2 + delta * delta * self.count * size / total
        self.count = total

    @property
    def var(self) -> float:
        """Sample variance (n - 1 denominator); 0 before two numbers have been seen."""
        return self.m2 / (self.count - 1) if self.count > 1 else 0.0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state["count"])
        self.mean = float(state["mean"])
        self.m2 = float(state["m2"])


def normalise_and_clip(
    scores: torch.Tensor,
    moments: RunningMoments,
    clip: float | None,
    *,
    update: bool = True,
) -> torch.Tensor:
    """Scores standardised with the running statistics, then clipped to [-clip, clip].

    By default the batch is folded into `moments` first (TRL's score scaling), so the first batch
    is standardised by itself. Before there is any spread (one number, or all equal) the scores are
    only centred. A learned reward's scale is arbitrary; fixing it keeps the KL coefficient and
    the value loss meaningful, and clipping stops one outlier from dominating an update.
    `clip=None` does not clip.
    """
    if update:
        moments.update(scores)
    std = moments.std
    normalised = (scores - moments.mean) / (std if std > 0 else 1.0)
    if clip is not None:
        if clip <= 0:
            raise ValueError(f"clip must be positive, got {clip}")
        normalised = normalised.clamp(-clip, clip)
    return normalised
