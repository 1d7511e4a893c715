"""`--nproc N`: the same training verb in N processes on this machine, started by torchrun's own
launcher (`torch.distributed.run`), each rank training under DistributedDataParallel.

It is `python -m torch.distributed.run --standalone --nproc-per-node N -m minigpt_cli <the same
arguments without --nproc>`, run in this process so that a failure of the job ends in the ranks'
own one-line message and exit status rather than the launcher's report. Several machines: the same
command on each with `--nnodes M --node-rank R --master-addr A [--master-port P]`, which become
torchrun's own flags (its static rendezvous, hosted by node 0 at A:P) instead of --standalone.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from minigpt_cli.errors import UserError

NprocOpt = Annotated[
    int | None,
    typer.Option(
        "--nproc",
        help="Train in N processes on this machine (torchrun, DistributedDataParallel); the "
        "global batch is shared between them.",
    ),
]


NnodesOpt = Annotated[
    int | None,
    typer.Option(
        "--nnodes",
        help="With --nproc: train on this many machines, each running the same command with its "
        "own --node-rank (torchrun --nnodes).",
    ),
]
NodeRankOpt = Annotated[
    int | None,
    typer.Option(
        "--node-rank", help="With --nnodes: this machine's place, 0 to nnodes-1 (0 hosts the job)."
    ),
]
MasterAddrOpt = Annotated[
    str | None,
    typer.Option("--master-addr", help="With --nnodes: the address of the --node-rank 0 machine."),
]
MasterPortOpt = Annotated[
    int | None,
    typer.Option(
        "--master-port",
        help="With --nnodes: a free port on the --node-rank 0 machine (default 29500).",
    ),
]
DEFAULT_PORT = 29500
RENDEZVOUS_TIMEOUT_ENV = "MINIGPT_RENDEZVOUS_TIMEOUT"
DEFAULT_RENDEZVOUS_TIMEOUT = 600
LAUNCH_FLAGS = ("--nproc", "--nnodes", "--node-rank", "--master-addr", "--master-port")


@dataclass(frozen=True)
class Nodes:
    """Where the job's machines meet: torchrun's --nnodes, --node-rank, --master-addr and
    --master-port as given (None: not given; all None is one machine, --standalone)."""

    nnodes: int | None = None
    node_rank: int | None = None
    master_addr: str | None = None
    master_port: int | None = None

    @property
    def given(self) -> bool:
        return any(value is not None for value in vars(self).values())

    @property
    def where(self) -> str:
        """The rendezvous: node 0's address and port."""
        return f"{self.master_addr or '127.0.0.1'}:{self.master_port or DEFAULT_PORT}"

    def torchrun_flags(self) -> list[str]:
        """torchrun's flags for these machines: --standalone when none was given."""
        if not self.given:
            return ["--standalone"]
        return [
            *("--nnodes", str(self.nnodes or 1), "--node-rank", str(self.node_rank or 0)),
            *("--master-addr", self.master_addr or "127.0.0.1"),
            *("--master-port", str(self.master_port or DEFAULT_PORT)),
            *("--rdzv-conf", f"timeout={rendezvous_timeout()}"),
        ]


def rendezvous_timeout() -> int:
    """Seconds a machine waits for the others to join (MINIGPT_RENDEZVOUS_TIMEOUT, default
    torchrun's 600): the machines of a job need not start at the same moment."""
    text = os.environ.get(RENDEZVOUS_TIMEOUT_ENV, "")
    try:
        return max(1, int(text)) if text else DEFAULT_RENDEZVOUS_TIMEOUT
    except ValueError:
        raise UserError(f"{RENDEZVOUS_TIMEOUT_ENV}={text!r}: expected whole seconds") from None


def without_nproc(argv: list[str]) -> list[str]:
    """The command's arguments with `--nproc N` and the machines' flags (`--nnodes N`,
    `--node-rank=R`, ...) taken out: what each rank runs."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in LAUNCH_FLAGS:
            skip = True
        elif not arg.startswith(tuple(f"{flag}=" for flag in LAUNCH_FLAGS)):
            kept.append(arg)
    return kept


def check_nodes(nodes: Nodes) -> None:
    """Refuse machines' flags that cannot make a job, in one line, before torchrun starts."""
    nnodes = 1 if nodes.nnodes is None else nodes.nnodes
    if nnodes < 1:
        raise UserError(f"--nnodes {nnodes}: give the number of machines, 1 or more")
    if nodes.node_rank is not None and not 0 <= nodes.node_rank < nnodes:
        raise UserError(
            f"--node-rank {nodes.node_rank}: with --nnodes {nnodes} it is 0 to {nnodes - 1}"
        )
    if nnodes > 1 and (nodes.master_addr is None or nodes.node_rank is None):
        raise UserError(
            f"--nnodes {nnodes} needs --node-rank (this machine's place) and --master-addr (the "
            "address of the --node-rank 0 machine), the same on every machine but the rank"
        )
    port = nodes.master_port
    if port is not None and not 1 <= port <= 65535:
        raise UserError(f"--master-port {port}: a port is 1 to 65535")
    if (nodes.node_rank or 0) == 0 and nodes.given:
        _check_port_free(nodes.master_addr or "127.0.0.1", port or DEFAULT_PORT)


def _check_port_free(address: str, port: int) -> None:
    """Node 0 hosts the rendezvous at address:port: a port something else holds is said now,
    in one line, before torch loads (one taken a moment later fails the rendezvous: one line
    too, from `relaunch`)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
        except OSError as error:
            if error.errno != errno.EADDRINUSE:
                raise
            raise UserError(
                f"--master-port {port} is in use on this machine ({address}:{port} hosts the "
                "job's rendezvous): choose another port, the same on every machine"
            ) from None


# The launch flags every verb that trains under torchrun takes (`common.training_verb(
# launchable=True)` adds them to its signature and runs `relaunch_from_flags` before the verb).
LAUNCH_OPTIONS: dict[str, Any] = {
    "nproc": NprocOpt,
    "nnodes": NnodesOpt,
    "node_rank": NodeRankOpt,
    "master_addr": MasterAddrOpt,
    "master_port": MasterPortOpt,
}


def relaunch_from_flags(values: Mapping[str, Any]) -> None:
    """`relaunch_if_asked` with the `LAUNCH_OPTIONS` values a verb was given."""
    nodes = Nodes(
        values.get("nnodes"),
        values.get("node_rank"),
        values.get("master_addr"),
        values.get("master_port"),
    )
    relaunch_if_asked(values.get("nproc"), nodes)


def relaunch_if_asked(nproc: int | None, nodes: Nodes) -> None:
    """What a training verb does first with its launch flags: nothing without --nproc (the
    machines' flags alone are refused), else run the job and exit with its status."""
    if nproc is not None:
        relaunch(nproc, nodes=nodes)
    if nodes.given:
        raise UserError(
            "--nnodes, --node-rank, --master-addr and --master-port go with --nproc N (the "
            "processes on this machine)"
        )


def check_nproc(nproc: int) -> None:
    """Refuse what cannot start: no processes, or a launch from inside a launched rank."""
    if nproc < 1:
        raise UserError(f"--nproc {nproc}: give the number of processes to train in, 1 or more")
    if "WORLD_SIZE" in os.environ:
        raise UserError(
            "--nproc starts torchrun, and this process already runs under it: drop --nproc"
        )


def relaunch(nproc: int, argv: list[str] | None = None, nodes: Nodes | None = None) -> NoReturn:
    """Run this command again in `nproc` processes under torchrun (on each of `nodes`' machines);
    exit with the job's status (rank 0's when it failed, else the first failure's; 0 when every
    rank finished)."""
    check_nproc(nproc)
    nodes = nodes or Nodes()
    check_nodes(nodes)
    args = without_nproc(list(sys.argv[1:] if argv is None else argv))
    quiet = "--debug" not in args and os.environ.get("MINIGPT_DEBUG") != "1"
    # The launcher's C++ side (the rendezvous store) logs every failed try to stderr as it goes;
    # its one failure becomes one line below. Read when torch loads: the ranks keep their own.
    set_level = quiet and "TORCH_CPP_LOG_LEVEL" not in os.environ
    if set_level:
        os.environ["TORCH_CPP_LOG_LEVEL"] = "FATAL"
    # lazy: torch is never imported by `minigpt --help`; torchrun's launcher is part of torch.
    import torch.distributed.run as torchrun
    from torch.distributed import DistError
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError

    if set_level:
        del os.environ["TORCH_CPP_LOG_LEVEL"]
    if quiet:
        # The ranks say what went wrong in one line; the launcher's own log would repeat it as
        # a report of "failed workers" with tracebacks.
        # torch's elastic loggers each set their own level, so each is quieted by name.
        names = [*logging.root.manager.loggerDict, "torch.distributed.run"]
        for name in names:
            if name.startswith(("torch.distributed.run", "torch.distributed.elastic")):
                logging.getLogger(name).setLevel(logging.CRITICAL)
    options = torchrun.get_args_parser().parse_args(
        [*nodes.torchrun_flags(), "--nproc-per-node", str(nproc), "--module", "minigpt_cli", *args]
    )
    if nodes.given and (nodes.nnodes or 1) > 1:
        typer.echo(
            f"node {nodes.node_rank} of {nodes.nnodes}: joining the job at {nodes.where} (node 0 "
            f"hosts it; waiting up to {rendezvous_timeout()} s for every machine)"
        )
    try:
        torchrun.run(options)
    except (DistError, RendezvousError) as error:  # the machines never met
        text = str(error).strip()
        first = text.splitlines()[0].rstrip(".") if text else type(error).__name__
        raise UserError(
            f"node {nodes.node_rank or 0} could not join the job at {nodes.where} ({first}): "
            "check --master-addr and --master-port, and that the --node-rank 0 machine runs "
            "and is reachable"
        ) from None
    except ChildFailedError as failed:
        # On several machines each runs its own command: "the same command" is the hint there.
        code, line = job_outcome(failed.failures, "" if nodes.given else resume_hint(args, nproc))
        if line:
            typer.echo(line, err=True)
        raise typer.Exit(code) from None
    except SignalException:  # Ctrl-C: the ranks saved their checkpoint and said how to resume
        raise typer.Exit(130) from None
    raise typer.Exit(0)


def resume_hint(args: list[str], nproc: int) -> str:
    """How to continue a job whose rank was killed: the newest checkpoint of its `--out` folder
    and the command that resumes it (the same world size resumes bitwise)."""
    verb = args[0] if args else "<verb>"
    out = next(
        (value for flag, value in zip(args, args[1:], strict=False) if flag == "--out"),
        next((arg.split("=", 1)[1] for arg in args if arg.startswith("--out=")), None),
    )
    if out is None:
        return "continue from the last checkpoint with the same command and --resume"
    from minigpt_cli.engine.runs import checkpoint as ckpt

    try:
        point = ckpt.find_resume_point(Path(out)) if Path(out).is_dir() else None
        step = ckpt.read_state(point)["step"] if point is not None else None
    except (OSError, UserError):
        step = None
    if step is None:
        return "no checkpoint had been saved yet: start again with the same command and --overwrite"
    command = f"minigpt {verb} --out {out} --resume --nproc {nproc}"
    return f"kept the checkpoint at step {step}; continue with: {command}"


def job_outcome(failures: Mapping[int, Any], hint: str = "") -> tuple[int, str | None]:
    """The exit status of a failed job, and a line to print when no rank said why.

    A rank that exited with a status has printed its own line: the status is rank 0's (else the
    lowest such rank's). When every failed rank was killed by a signal, the one killed by
    something other than the launcher's own SIGTERM (sent to the survivors) is the cause: its
    signal gives the status (128 + N, as a shell reports it) and the line.
    """
    said = {rank: failure for rank, failure in failures.items() if failure.exitcode > 0}
    if said:
        return int((said.get(0) or said[min(said)]).exitcode), None
    if not failures:
        return 1, None
    killed = {
        rank: failure for rank, failure in failures.items() if failure.exitcode != -signal.SIGTERM
    } or dict(failures)
    rank = min(killed)
    failure = killed[rank]
    if failure.exitcode >= 0:
        return 1, None
    return 128 - int(failure.exitcode), (
        f"error: rank {rank} was killed by {failure.signal_name()} and the job stopped; "
        f"{hint or 'continue from the last checkpoint with the same command and --resume'}"
    )
