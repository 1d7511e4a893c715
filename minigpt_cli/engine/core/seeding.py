"""One seed names one run: the random generators a run may draw from, seeded in one place.

Python's `random`, numpy's global generator and torch's (every device) are seeded together: the
Trainer saves and restores all three for an exact resume, so a run starts all three from its seed.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed every generator a run draws from, so a seed names one run."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
