"""`--nproc N`: the same training verb in N processes on this machine, started by torchrun's own
launcher (`torch.distributed.run`), each rank training under DistributedDataParallel.

It is `python -m torch.distributed.run --standalone --nproc-per-node N -m minigpt_cli <the same
arguments without --nproc>`, run in this process so that a failure of the job ends in the ranks'
own one-line message and exit status rather than the launcher's report. Several machines: run
torchrun itself (README "Several processes: torchrun").
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Mapping
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


def without_nproc(argv: list[str]) -> list[str]:
    """The command's arguments with `--nproc N` (or `--nproc=N`) taken out: what each rank runs."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            kept.append(arg)
    return kept


def check_nproc(nproc: int) -> None:
    """Refuse what cannot start: no processes, or a launch from inside a launched rank."""
    if nproc < 1:
        raise UserError(f"--nproc {nproc}: give the number of processes to train in, 1 or more")
    if "WORLD_SIZE" in os.environ:
        raise UserError(
            "--nproc starts torchrun, and this process already runs under it: drop --nproc"
        )


def relaunch(nproc: int, argv: list[str] | None = None) -> NoReturn:
    """Run this command again in `nproc` processes under torchrun; exit with the job's status
    (rank 0's when it failed, else the first failure's; 0 when every rank finished)."""
    check_nproc(nproc)
    args = without_nproc(list(sys.argv[1:] if argv is None else argv))
    # lazy: torch is never imported by `minigpt --help`; torchrun's launcher is part of torch.
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if "--debug" not in args and os.environ.get("MINIGPT_DEBUG") != "1":
        # The ranks say what went wrong in one line; the launcher's own log would repeat it as
        # a report of "failed workers" with tracebacks.
        # torch's elastic loggers each set their own level, so each is quieted by name.
        names = [*logging.root.manager.loggerDict, "torch.distributed.run"]
        for name in names:
            if name.startswith(("torch.distributed.run", "torch.distributed.elastic")):
                logging.getLogger(name).setLevel(logging.CRITICAL)
    options = torchrun.get_args_parser().parse_args(
        ["--standalone", "--nproc-per-node", str(nproc), "--module", "minigpt_cli", *args]
    )
    try:
        torchrun.run(options)
    except ChildFailedError as failed:
        code, line = job_outcome(failed.failures)
        if line:
            typer.echo(line, err=True)
        raise typer.Exit(code) from None
    except SignalException:  # Ctrl-C: the ranks saved their checkpoint and said how to resume
        raise typer.Exit(130) from None
    raise typer.Exit(0)


def job_outcome(failures: Mapping[int, Any]) -> tuple[int, str | None]:
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
        f"error: rank {rank} was killed by {failure.signal_name()} and the job stopped; continue "
        "from the last checkpoint with the same command and --resume"
    )
