"""The Stage base of every stage over preference pairs (DPO, the reward model): its position.

Both stages draw pairs in a `PairOrder` (a per-epoch permutation, a pure function of (seed,
epoch)) and report and restore their place through it, so that part of the Stage protocol is
written once here.
"""

from __future__ import annotations

from typing import Any

from minigpt_cli.engine.data.pairs import PairOrder, PreferencePair
from minigpt_cli.engine.training.stage import StageBase


class PairStage(StageBase):
    """What every stage over preference pairs shares: its position is a `PairOrder`."""

    order: PairOrder
    train_pairs: list[PreferencePair]

    def epochs_done(self) -> float:
        return self.order.epochs_done()

    def sequences_per_epoch(self) -> int:
        """Pairs in one pass (the Trainer's batch sizes count pairs for this stage)."""
        return len(self.train_pairs)

    def data_state(self) -> dict[str, Any]:
        return self.order.state()

    def load_data_state(self, state: dict[str, Any]) -> None:
        self.order.load_state(state)
