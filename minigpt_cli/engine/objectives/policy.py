"""The policy side of RLHF's losses: log-probabilities, values and entropy at a batch's response
tokens, and the frozen reference policy the KL penalty measures against.

PPO and GRPO compare the policy with itself before the update and with its starting weights;
these read those numbers from the models (`objectives.rl` then does the arithmetic on them).
Tensors follow `objectives.rl`: (B, R) over response tokens only, right-padded; the model reads the
whole right-padded sequence (prompt + response) and the response positions are gathered from it.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import nn

from minigpt_cli.engine.model.gpt import GPT, kept_rows
from minigpt_cli.engine.model.heads import PolicyWithValue, policy_of
from minigpt_cli.engine.model.lora import LoRALinear, has_lora
from minigpt_cli.engine.objectives import rl


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run a LoRA model as its base (adapter scale 0): the reference policy for free."""
    modules = [m for m in model.modules() if isinstance(m, LoRALinear)]
    scales = [m.scaling for m in modules]
    for module in modules:
        module.scaling = 0.0
    try:
        yield
    finally:
        for module, scale in zip(modules, scales, strict=True):
            module.scaling = scale


class Reference:
    """The frozen starting policy the KL penalty measures against, in its cheapest form.

    A LoRA policy's reference is the same network with its adapters switched off (no copy at all);
    a fully trained policy gets a frozen copy of its starting weights.
    """

    def __init__(self, policy: GPT) -> None:
        self.shared = has_lora(policy)
        self.policy = policy
        self.copy: GPT | None = None
        if not self.shared:
            self.copy = copy.deepcopy(policy).eval().requires_grad_(False)

    @property
    def extra_parameters(self) -> int:
        """Parameters held beyond the policy's (for the memory estimate)."""
        return 0 if self.copy is None else sum(p.numel() for p in self.copy.parameters())

    @torch.no_grad()
    def logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.copy is not None:
            return response_outputs(self.copy, batch)[0]
        was_training = self.policy.training
        self.policy.eval()
        try:
            with adapters_disabled(self.policy):
                return response_outputs(self.policy, batch)[0]
        finally:
            self.policy.train(was_training)


def response_outputs(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    with_values: bool = False,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(logps, values, entropy) of the response tokens of a batch, each (B, R).

    `batch["ids"]` (B, L) holds prompt + response + padding, `batch["positions"]` (B, R) the
    index in `ids` of each response token and `batch["mask"]` which of them are real. On the CPU
    only the real response tokens (and a few padding ones, `gpt.kept_rows`: a multiple of 32
    rows, so that bf16 matmuls meet few shapes and oneDNN keeps few) go through the output head
    and its softmax: responses are short beside the longest one they are padded to (in the tiny
    quickstart's GRPO rollouts 12-21 % of the (B, R) positions are real), and over all of them
    the 5,000-word head and its softmax took half of tiny's forward and backward. Log-probs are 0
    at padding; `entropy` is the mean over the real tokens.
    """
    policy = policy_of(model)
    ids, positions, mask = batch["ids"], batch["positions"], batch["mask"]
    hidden = policy.hidden_states(ids[:, :-1])
    # The token at position p is predicted from the hidden state at p - 1.
    index = (positions - 1).clamp(min=0)
    selected = hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    flat_hidden, flat_tokens = selected.flatten(0, 1), ids.gather(1, positions).flatten()
    flat_mask = mask.flatten()
    rows = kept_rows(flat_mask)
    if rows is not None:
        flat_hidden, flat_tokens, flat_mask = flat_hidden[rows], flat_tokens[rows], flat_mask[rows]
    logits = policy.lm_head(flat_hidden).float()
    token_logps = torch.where(flat_mask, rl.logps_from_logits(logits, flat_tokens), 0.0)
    if rows is None:
        logps = token_logps.view(mask.shape)
    else:
        logps = token_logps.new_zeros(mask.numel()).index_copy(0, rows, token_logps)
        logps = logps.view(mask.shape)
    values = None
    if with_values and isinstance(model, PolicyWithValue):
        values = model.value_head(selected).squeeze(-1).float()
    entropy = None
    if with_entropy:
        with torch.no_grad():  # a figure for the log, never a loss term
            entropy = rl.entropy_from_logits(logits.detach(), flat_mask)
    return logps, values, entropy
