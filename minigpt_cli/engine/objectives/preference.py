"""The mathematics of preference training (DPO and the reward model) as small functions on tensors.

Shared by every user of preference pairs, so DPO, the reward model and `minigpt eval` score and
compare replies the same way:

- `sequence_logps`: log p(reply | prompt) summed over the reply's tokens, the one place a language
  model is read (its `hidden_states` and `lm_head`, so only scored positions reach the head).
- `dpo_loss` / `preference_metrics`: the sigmoid DPO loss (with TRL's conservative label
  smoothing) and the implicit rewards beta * (log p_policy - log p_reference).
- `bradley_terry_loss` / `reward_metrics`: the reward model's -log sigmoid(score_chosen -
  score_rejected) and its held-out figures under the reward model's names.

Like `objectives.rl`, nothing here knows about batches, stages or the Trainer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from minigpt_cli.engine.model.gpt import SCORED_ROWS_MULTIPLE, kept_rows, language_model

# Logits materialised at once when scoring replies (4M floats = 16 MB), as in the model's fused
# loss: large enough for efficient matmuls, small enough that a long batch never holds
# (tokens x vocabulary) logits.
_LOGIT_CHUNK_ELEMENTS = 4 * 2**20


def _token_logps(
    head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    logits = head(hidden).float()
    picked = logits.gather(1, targets.unsqueeze(1)).squeeze(1)
    return picked - torch.logsumexp(logits, dim=-1)


def sequence_logps(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of log p(ids[t] | ids[:t]) over the positions t where `mask` is True, per row (fp32).

    `ids` and `mask` are (B, L): the model reads `ids[:, :-1]`, and `mask[:, 0]` is ignored (the
    first id has no context). Prompt and padding positions (mask False) contribute nothing.

    Only the scored positions (on the CPU a few unscored ones too, up to a multiple of 32 rows) go
    through the output head, chunk by chunk, and while gradients are on each chunk's logits are
    recomputed in backward rather than kept, so the (tokens x vocabulary) logits of a batch are
    never held at once.
    """
    network = language_model(model)
    inputs, targets, scored = ids[:, :-1], ids[:, 1:], mask[:, 1:].bool()
    hidden = network.hidden_states(inputs)
    flat_scored = scored.flatten()
    # On the CPU the scored rows come first, topped up with unscored ones to a multiple of 32
    # (`kept_rows`): each new row count is a new set of bf16 matmul shapes that oneDNN compiles
    # and keeps, and replies of every length gave DPO hundreds (its peak RSS twice fp32's). The
    # scatter below takes the first log-prob per scored position, so the extra ones are dropped.
    rows = kept_rows(flat_scored)
    if rows is None:
        rows = flat_scored.nonzero().squeeze(1)
    picked_hidden = hidden.flatten(0, 1).index_select(0, rows)
    picked_targets = targets.flatten().index_select(0, rows)
    head = network.lm_head
    rows_per_chunk = _LOGIT_CHUNK_ELEMENTS // int(network.vocab_size)
    chunk = max(SCORED_ROWS_MULTIPLE, rows_per_chunk // SCORED_ROWS_MULTIPLE * SCORED_ROWS_MULTIPLE)
    pieces = []
    for start in range(0, picked_hidden.shape[0], chunk):
        chunk_hidden = picked_hidden[start : start + chunk]
        chunk_targets = picked_targets[start : start + chunk]
        if torch.is_grad_enabled() and chunk_hidden.requires_grad:
            pieces.append(
                checkpoint(_token_logps, head, chunk_hidden, chunk_targets, use_reentrant=False)
            )
        else:
            pieces.append(_token_logps(head, chunk_hidden, chunk_targets))
    token_logps = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)
    per_position = torch.zeros(scored.shape, dtype=torch.float32, device=ids.device)
    per_position = per_position.masked_scatter(scored, token_logps)
    return per_position.sum(dim=1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair losses, chosen rewards, rejected rewards), each (B,), from sequence log-probs.

    The sigmoid DPO loss on h = (pi_c - ref_c) - (pi_r - ref_r):
    -(1 - ls) * log sigmoid(beta * h) - ls * log sigmoid(-beta * h), where ls is the share of pairs
    assumed to be labelled the wrong way round (cDPO, as TRL computes it; ls = 0 is plain DPO).
    Rewards are the implicit ones, beta * (policy - reference), detached: they are for reporting.
    """
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    logits = beta * (chosen_ratio - rejected_ratio)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(
        -logits
    )
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def preference_metrics(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor
) -> dict[str, float]:
    """Means of the implicit rewards, their margin, and how often the chosen reply wins.

    A tie counts as wrong (strictly greater wins), so a policy that has not moved from its
    reference scores 0, not 0.5.
    """
    chosen = chosen_rewards.detach().float()
    rejected = rejected_rewards.detach().float()
    return {
        "chosen_reward": float(chosen.mean()),
        "rejected_reward": float(rejected.mean()),
        "margin": float((chosen - rejected).mean()),
        "pref_accuracy": float((chosen > rejected).float().mean()),
    }


# ----------------------------------------------------------------------------------------------


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """(B,) per-pair losses -log sigmoid(chosen - rejected): the Bradley-Terry likelihood of the
    human choice when P(chosen preferred) = sigmoid(score difference) (InstructGPT, TRL)."""
    return -F.logsigmoid(chosen_scores.float() - rejected_scores.float())


def reward_metrics(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> dict[str, float]:
    """`pref_accuracy` (chosen strictly above rejected; a tie is wrong), mean `margin`,
    `chosen_score` and `rejected_score`: DPO's figures (`preference_metrics`) under the
    reward model's names."""
    metrics = preference_metrics(chosen_scores, rejected_scores)
    return {
        "pref_accuracy": metrics["pref_accuracy"],
        "margin": metrics["margin"],
        "chosen_score": metrics["chosen_reward"],
        "rejected_score": metrics["rejected_reward"],
    }
