"""How much of this machine one process may use: all of it, or under torchrun its share, since
`--max-memory` and `--max-cpu` describe the whole machine and every rank on it reads the same.

torchrun tells each rank how many ranks run on its machine (LOCAL_WORLD_SIZE); the process group
(`training/distributed.py:process_group`) records it here with the world size and the memory the
launcher itself holds (torchrun's agent, the ranks' parent, imports torch too). Each rank's memory
cap is then (machine cap - launcher) / local ranks, its CPU cap the machine's divided by the local
ranks, and the memory plan counts DistributedDataParallel's gradient buckets when the world is
larger than one. Outside torchrun the share is the whole machine and nothing changes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class MachineShare:
    """This process's part of the machine: 1 of `local_processes`, in a job of `world_size`."""

    local_processes: int = 1
    world_size: int = 1
    launcher_bytes: int = 0

    def memory_bytes(self, machine_cap: int) -> int:
        """This process's memory cap from the machine's: what the launcher leaves, shared."""
        if self.local_processes <= 1 and not self.launcher_bytes:
            return machine_cap
        return max(0, machine_cap - self.launcher_bytes) // self.local_processes

    def cpu_percent(self, machine_percent: float) -> float:
        """This process's CPU cap, in percent of the machine's cores."""
        return machine_percent / self.local_processes


WHOLE_MACHINE = MachineShare()
_share = WHOLE_MACHINE


def current() -> MachineShare:
    """The share set by the open process group (the whole machine when none is open)."""
    return _share


def set_share(share: MachineShare) -> None:
    """Record this process's share (the process group, on opening and closing)."""
    global _share
    _share = share


def launcher_rss_bytes() -> int:
    """Resident memory of this process's parent when that is torchrun's agent (it sets
    TORCHELASTIC_RUN_ID for its workers); 0 for ranks started some other way, or unreadable."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return 0
    try:
        return int(psutil.Process(os.getppid()).memory_info().rss)
    except (psutil.Error, OSError):
        return 0
