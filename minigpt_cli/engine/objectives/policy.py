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

from minigpt_cli.engine.model.gpt import GPT
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
    index in `ids` of each response token. Only the response positions go through the output head.
    """
    policy = policy_of(model)
    ids, positions = batch["ids"], batch["positions"]
    hidden = policy.hidden_states(ids[:, :-1])
    # The token at position p is predicted from the hidden state at p - 1.
    index = (positions - 1).clamp(min=0)
    selected = hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    logits = policy.lm_head(selected).float()
    tokens = ids.gather(1, positions)
    logps = rl.logps_from_logits(logits, tokens)
    values = None
    if with_values and isinstance(model, PolicyWithValue):
        values = model.value_head(selected).squeeze(-1).float()
    entropy = None
    if with_entropy:
        with torch.no_grad():  # a figure for the log, never a loss term
            entropy = rl.entropy_from_logits(logits.detach(), batch["mask"])
    return logps, values, entropy
