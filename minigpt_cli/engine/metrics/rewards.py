"""RLHF's reward: each sampled response judged by the reward model, the exact-answer rule, or both.

The reward model's score comes from `inference.scoring.score_texts`, the rule's from
`exact_match.rule_scores` (1 for an answer that matches after `normalise_answer`, the share of its
steps right for a worked answer: `exact_match.step_credit`); with both, each term is standardised
by its own running moments before they are added, so neither scale dominates.
Those moments are part of an RLHF run's checkpoint (`RlStage.extra_state`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from minigpt_cli.engine.inference.scoring import score_texts
from minigpt_cli.engine.metrics.exact_match import rule_scores
from minigpt_cli.engine.model.heads import RewardModel
from minigpt_cli.engine.objectives import rl

RewardFunction = Callable[[list[dict], list[list[int]], list[str]], dict[str, torch.Tensor]]
"""(records, full sequences as ids, response texts) -> named (N,) score tensors."""


@dataclass
class RewardSource:
    """How responses are judged: `kind` is model, rule or both (each term standardised)."""

    kind: str
    reward_model: RewardModel | None = None
    pad_id: int = 0
    moments: dict[str, rl.RunningMoments] = field(default_factory=dict)

    def terms(
        self, records: Sequence[dict], sequences: Sequence[list[int]], responses: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        """The raw scores per term, each (N,)."""
        terms: dict[str, torch.Tensor] = {}
        if self.kind in ("model", "both"):
            assert self.reward_model is not None
            # A long answer keeps its end (the response) within the model's context.
            context = self.reward_model.config.context_length
            clipped = [list(sequence[-context:]) for sequence in sequences]
            terms["model"] = score_texts(self.reward_model, clipped, pad_id=self.pad_id)
        if self.kind in ("rule", "both"):
            terms["rule"] = rule_scores(records, responses)
        return terms

    def combine(self, terms: dict[str, torch.Tensor], update: bool = True) -> torch.Tensor:
        """One raw reward per response: the term itself, or the sum of standardised terms."""
        if len(terms) == 1:
            return next(iter(terms.values()))
        total = torch.zeros_like(next(iter(terms.values())))
        for name, values in terms.items():
            moments = self.moments.setdefault(name, rl.RunningMoments())
            total += rl.normalise_and_clip(values, moments, None, update=update)
        return total
