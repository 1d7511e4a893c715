"""Several processes training one model under torchrun: who this process is, the process group,
the one writer, and the few collectives the Trainer needs.

torchrun (`torch.distributed.run`) starts one process per rank and tells each who it is through
its environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). The gradients are
exchanged by PyTorch's own `DistributedDataParallel` (the Trainer wraps the model); this module
only reads that environment, opens and closes the process group (gloo on the CPU, nccl on CUDA)
with a collective timeout, so a rank that hangs stops the others after that long instead of
never, and answers the questions the rest of the engine asks: how many ranks, which one writes
(rank 0: checkpoints, metrics, plots, progress), and a few collectives on Python values.

Outside torchrun (or with WORLD_SIZE 1) the world is one process and every helper here is a
no-op that returns its input, so one-process runs take exactly the code paths they always took.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from minigpt_cli.engine.hardware import share as machine_share
from minigpt_cli.engine.resources.governor import Adjustment
from minigpt_cli.errors import EXIT_MACHINE, EXIT_USER, MACHINE_ERRNOS, UserError

ENV_NAMES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
TIMEOUT_ENV = "MINIGPT_COLLECTIVE_TIMEOUT"
# Longer than anything one rank does while the others wait for it (rank 0 trains the tokenizer
# and encodes the corpus before the others read them); a rank that died is noticed at once
# anyway, by its closed connections and by torchrun, so only a hung rank waits this long.
DEFAULT_TIMEOUT_S = 1800
# The verbs whose stages train under DistributedDataParallel; the others refuse a world size > 1.
DISTRIBUTED_STAGES = ("pretrain", "sft", "dpo", "reward", "rlhf")

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: global rank and world size, and the same on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str = ""  # "gloo" or "nccl" once the process group is open

    @property
    def is_writer(self) -> bool:
        """Rank 0 alone writes the run directory and shows progress."""
        return self.rank == 0


SINGLE = Ranks()
_active: Ranks = SINGLE  # the open process group's ranks; SINGLE when none is open


def from_environment(environ: Mapping[str, str] | None = None) -> Ranks:
    """What torchrun told this process (SINGLE outside torchrun).

    A partial environment (WORLD_SIZE without MASTER_PORT, say: a hand-made launch) is refused in
    one line naming what is missing, rather than left to hang in the rendezvous.
    """
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env and "RANK" not in env:
        return SINGLE
    missing = [name for name in ENV_NAMES if not env.get(name)]
    if missing:
        raise UserError(
            f"torchrun's environment is incomplete ({', '.join(missing)} not set): start "
            "several processes with torchrun or `minigpt <verb> --nproc N`"
        )
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local_rank = int(env["LOCAL_RANK"])
        local_world = int(env.get("LOCAL_WORLD_SIZE") or 1)
        int(env["MASTER_PORT"])
    except ValueError:
        shown = {name: env.get(name) for name in ENV_NAMES}
        raise UserError(
            f"torchrun's environment is not numbers where it should be: {shown}"
        ) from None
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"torchrun's environment says rank {rank} of world size {world}")
    return Ranks(rank, world, local_rank, local_world)


def ranks() -> Ranks:
    """This process's ranks while a process group is open; SINGLE otherwise."""
    return _active


def world_size() -> int:
    return _active.world_size


def is_writer() -> bool:
    """Whether this process writes the run directory (rank 0, or the only process)."""
    return _active.is_writer


def collective_timeout() -> timedelta:
    """How long a collective waits for a rank that does not come: MINIGPT_COLLECTIVE_TIMEOUT
    seconds, else `DEFAULT_TIMEOUT_S`."""
    text = os.environ.get(TIMEOUT_ENV)
    try:
        seconds = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        raise UserError(f"{TIMEOUT_ENV}={text!r}: expected seconds") from None
    return timedelta(seconds=max(seconds, 1.0))


def refuse_unsupported(stage: str, max_time: str | None, world: int) -> None:
    """Refuse, in one line, what does not run under several processes yet, rather than silently
    training `world` independent copies (the quickstart's pipeline). `max_time` runs: rank 0's
    clock ends and plans them for every rank (`step_agreement.py`)."""
    if world <= 1:
        return
    if stage not in DISTRIBUTED_STAGES:
        raise UserError(
            f"{stage} does not run under several processes yet (only "
            f"{', '.join(DISTRIBUTED_STAGES)} do): run it as one process, without torchrun "
            "or --nproc"
        )


def check_prompt_share(rollout_batch_size: int, world: int) -> None:
    """Refuse an RLHF iteration with fewer prompts than ranks (a rank would roll out nothing).
    A setting alone decides it, so the CLI asks before the ranks meet, as for the batch split."""
    if rollout_batch_size < world:
        raise UserError(
            f"{world} processes share each iteration's prompts: set "
            f"rlhf.rollout_batch_size (now {rollout_batch_size}) to at least that"
        )


def check_split(global_batch: int, micro_batch: int, world: int, section: str) -> None:
    """Refuse a global batch whose micro-batches the ranks cannot share equally.

    Every rank takes the same number of each step's micro-batches, so the micro-batches a step
    holds (global / micro) must be a multiple of the world size; the message says which batch
    sizes work.
    """
    if world <= 1:
        return
    count = global_batch // micro_batch
    if count % world == 0:
        return
    smaller = shareable_micro_batch(micro_batch, global_batch, world)
    or_smaller = (
        f", or {section}.micro_batch_size to {smaller}"
        if global_batch % (smaller * world) == 0
        else ""
    )
    raise UserError(
        f"{world} processes cannot share a global batch of {global_batch} sequences in "
        f"micro-batches of {micro_batch} ({count} a step, not a multiple of {world}): set "
        f"{section}.global_batch_size to a multiple of {micro_batch * world} "
        f"(micro-batch {micro_batch} x {world} processes){or_smaller}"
    )


def shareable_micro_batch(micro_batch: int, global_batch: int, world: int) -> int:
    """The largest micro-batch at most `micro_batch` that divides the global batch into a
    multiple of `world` micro-batches (the governor's back-off, kept shareable); 1 at least."""
    for size in range(max(micro_batch, 1), 0, -1):
        if global_batch % size == 0 and (global_batch // size) % world == 0:
            return size
    return 1


def device_for_rank(device: torch.device) -> torch.device:
    """Under several processes on CUDA, each rank trains on its own GPU: cuda:LOCAL_RANK."""
    if device.type == "cuda" and _active.world_size > 1:
        return torch.device("cuda", _active.local_rank)
    return device


@contextlib.contextmanager
def process_group(device_type: str) -> Iterator[Ranks]:
    """Open the process group for the ranks torchrun started (nothing outside torchrun), close it
    on the way out whatever happened. The backend follows the device: nccl on CUDA, else gloo."""
    global _active
    launch = from_environment()
    if launch.world_size <= 1 or _active.world_size > 1:  # one process, or already open
        yield _active
        return
    backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(launch.local_rank)
    try:
        dist.init_process_group(
            backend,
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=collective_timeout(),
        )
    except (RuntimeError, ValueError) as error:  # DistNetworkError/DistStoreError are both
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"rank {launch.rank} could not join the other processes at {where} ({first}): "
            "check --master-addr/--master-port (a port in use?) and that every rank started"
        ) from None
    _active = Ranks(
        launch.rank, launch.world_size, launch.local_rank, launch.local_world_size, backend
    )
    # --max-memory and --max-cpu describe this machine: its ranks (and the launcher) share them.
    machine_share.set_share(
        machine_share.MachineShare(
            launch.local_world_size, launch.world_size, machine_share.launcher_rss_bytes()
        )
    )
    try:
        yield _active
    finally:
        _active = SINGLE
        machine_share.set_share(machine_share.WHOLE_MACHINE)
        with contextlib.suppress(Exception):  # a peer that died leaves nothing to close cleanly
            dist.destroy_process_group()


def lost_contact(error: BaseException) -> str | None:
    """What a collective's failure says, in a few words, when `error` is one: a peer died (its
    connection closed) or did not come within the timeout. None for any other error, which
    stays a bug with its traceback."""
    text = str(error).strip()
    is_dist = isinstance(error, dist.DistError)
    is_gloo = isinstance(error, RuntimeError) and ("gloo" in text or "Connection" in text)
    if not (is_dist or is_gloo):
        return None
    first = text.splitlines()[0] if text else type(error).__name__
    if first.startswith("[") and "] " in first:  # "[.../pair.cc:537] Read error ...": the source
        first = first.split("] ", 1)[1]
    return first.split(". ", 1)[0].rstrip(".")


def _tensor(values: list[float] | list[int], dtype: torch.dtype) -> torch.Tensor:
    device = torch.device("cuda", _active.local_rank) if _active.backend == "nccl" else None
    return torch.tensor(values, dtype=dtype, device=device)


def sum_floats(values: list[float]) -> list[float]:
    """Element-wise sums over every rank (float64, so a sum of losses loses nothing)."""
    if _active.world_size <= 1 or not values:
        return list(values)
    tensor = _tensor(values, torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return [float(v) for v in tensor.tolist()]


def min_ints(values: list[int]) -> list[int]:
    """Element-wise minimums over every rank (a decision all ranks must share, e.g. the
    micro-batch: the smallest any rank can afford)."""
    if _active.world_size <= 1 or not values:
        return list(values)
    tensor = _tensor(values, torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return [int(v) for v in tensor.tolist()]


def gather_objects(value: Any) -> list[Any]:
    """Every rank's `value` (picklable), in rank order, on every rank."""
    if _active.world_size <= 1:
        return [value]
    gathered: list[Any] = [None] * _active.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def first_rank(work: Callable[[], T], others: Callable[[], T] | None = None) -> T:
    """Run `work` on rank 0 before any other rank goes on: what writes a file the others then
    read (the tokenizer, the encoded shards, the run directory's lock and clean-up).

    The others wait for rank 0's outcome. When `work` succeeded they run `others` (default:
    `work` again, which finds what rank 0 wrote); when it failed, rank 0 raises its error (its
    one line) and the others leave quietly with the same exit status (SystemExit), so the job
    stops at once with one message instead of waiting out the timeout.
    """
    if _active.world_size <= 1:
        return work()
    failure: BaseException | None = None
    result: Any = None
    if _active.is_writer:
        try:
            result = work()
        except BaseException as error:  # noqa: BLE001 - re-raised below, after telling the others
            failure = error
    outcome: list[Any] = [None if failure is None else _exit_code(failure)]
    dist.broadcast_object_list(outcome, src=0)
    if failure is not None:
        raise failure
    if outcome[0] is not None:
        raise SystemExit(outcome[0])
    if _active.is_writer:
        return result
    return (others or work)()


def _exit_code(error: BaseException) -> int:
    if isinstance(error, SystemExit):
        return error.code if isinstance(error.code, int) else 1
    if isinstance(error, KeyboardInterrupt):
        return 130
    if isinstance(error, OSError):  # as the CLI maps it (minigpt_cli.cli.app)
        return EXIT_MACHINE if error.errno in MACHINE_ERRNOS else EXIT_USER
    return int(getattr(error, "exit_code", 1))


# ---------------------------------------------------------------------- what the Trainer asks


class NoMetrics:
    """What the ranks other than rank 0 log into: nothing (rank 0 writes the job's rows)."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


@contextlib.contextmanager
def second_interrupt_ignored(active: bool) -> Iterator[None]:
    """While the Ctrl-C checkpoint is written under torchrun, whose launcher passes the same
    Ctrl-C on to every rank a moment after the terminal did, a second one must not cut it short."""
    if not active or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def wrap_model(model: torch.nn.Module, device: torch.device) -> DistributedDataParallel:
    """`model` under DistributedDataParallel, which also makes every rank start from rank 0's
    weights. Buffers (rotary tables) are computed, never trained: no broadcast before each
    forward (newer torch names the switch `forward_sync_buffers`, older `broadcast_buffers`)."""
    ddp = DistributedDataParallel
    no_sync = (
        "forward_sync_buffers"
        if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters
        else "broadcast_buffers"
    )
    device_ids = [device.index] if device.type == "cuda" else None
    options: dict[str, Any] = {"device_ids": device_ids, no_sync: False}
    return ddp(model, **options)


def rank_random_state(state: dict[str, Any], here: Ranks) -> tuple[dict[str, Any], str | None]:
    """The random state this rank resumes with, and a note when the world size changed: its own
    when the checkpoint holds one per rank of this world size, else rank 0's."""
    saved_world = int(state.get("world_size", 1))
    per_rank = state.get("rng_ranks")
    if isinstance(per_rank, list) and len(per_rank) == here.world_size:
        rng = per_rank[here.rank]
    else:
        rng = state["rng"]
    if saved_world == here.world_size:
        return rng, None
    return rng, (
        f"resumed at step {int(state['step'])} with {here.world_size} process(es); it was saved "
        f"by {saved_world}: the same data position and schedule, every rank starting from rank "
        "0's random state (not bitwise the run it would have been)"
    )


def shared_adjustment(
    own: Adjustment | None,
    micro_batch: int,
    checkpointing: bool,
    global_batch: int,
    world: int,
) -> Adjustment | None:
    """Every rank must train the same micro-batch: the smallest any rank's governor asks for
    (still shareable by the ranks), with checkpointing if any rank needs it."""
    wanted = own.micro_batch_size if own is not None else micro_batch
    needs = own.activation_checkpointing if own is not None else checkpointing
    smallest, no_checkpointing = min_ints([wanted, 0 if needs else 1])
    size = shareable_micro_batch(smallest, global_batch, world)
    turn_on = not no_checkpointing and not checkpointing
    if size == micro_batch and not turn_on:
        return None
    message = own.message if own is not None else "another process is short of memory"
    return Adjustment(size, turn_on or checkpointing, message)


def sum_step_figures(loss: float, metrics: dict[str, float]) -> tuple[float, dict[str, float]]:
    """The figures of the whole global batch from each rank's share (summed). A stage's metrics
    may differ in keys between ranks (SFT's text_loss: only where text was drawn)."""
    total_loss, summed = 0.0, dict[str, float]()
    for rank_loss, rank_metrics in gather_objects((loss, metrics)):
        total_loss += rank_loss
        for key, value in rank_metrics.items():
            summed[key] = summed.get(key, 0.0) + value
    return total_loss, summed


# ------------------------------------------------------- what the preference and RL stages ask


def share(count: int) -> range:
    """This rank's contiguous share of `count` items (pairs' chunks, an iteration's prompts): the
    ranks' shares in rank order are the items in order, so what `gather_lists` puts back together
    is what one process would have held. The whole range in one process."""
    world, rank = _active.world_size, _active.rank
    return range(rank * count // world, (rank + 1) * count // world)


def gather_lists(items: list[T]) -> list[T]:
    """Every rank's `items` (picklable), concatenated in rank order, on every rank."""
    if _active.world_size <= 1:
        return list(items)
    return [item for part in gather_objects(items) for item in part]


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of `tensor` (its other dimensions the same on every rank), concatenated
    in rank order, on every rank, on `tensor`'s device. The tensors a stage gathers are small
    (scores, per-token log-probabilities of a rollout), so they travel as pickled CPU tensors,
    whatever the shares' sizes."""
    if _active.world_size <= 1:
        return tensor
    return torch.cat(gather_objects(tensor.detach().cpu())).to(tensor.device)


def weighted_mean(value: float, weight: float) -> float:
    """The mean over every rank of a mean each computed over its own `weight` items (an
    entropy over this rank's tokens): what one process computes over all the items."""
    if _active.world_size <= 1:
        return value
    total, weights = sum_floats([value * weight, weight])
    return total / weights if weights else 0.0


def barrier() -> None:
    """Wait for every rank: what rank 0 has just written (a finished reward model) is then there
    for the others to read."""
    if _active.world_size > 1:
        dist.barrier()


def forward_through(
    model: torch.nn.Module, function: Callable[..., T], *args: Any, **kwargs: Any
) -> T:
    """`function(module, *args, **kwargs)`, run as the forward of `model` when it is the Trainer's
    DistributedDataParallel wrapper, else simply `function(model, ...)`.

    A stage that reads the network through its own methods (DPO's reply log-probabilities, RL's
    response log-probabilities and values) must still go through DDP's forward: that is where DDP
    prepares to average the gradients the backward produces, which calling the methods on
    `ddp.module` would skip. A torch.compile wrapper around DDP is stepped over (these stages run
    eagerly under several processes).
    """
    inner = getattr(model, "_orig_mod", model)
    if not isinstance(inner, DistributedDataParallel):
        return function(model, *args, **kwargs)
    module = inner.module
    # The instance attribute shadows the class's forward for this one call (Module.__call__
    # looks `forward` up on the instance), so DDP's pre- and post-forward run around `function`.
    module.forward = functools.partial(function, module)
    try:
        return cast(T, inner(*args, **kwargs))
    finally:
        del module.forward
