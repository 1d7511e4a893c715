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
import sys
from typing import Annotated, NoReturn

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
        for name in ("torch.distributed.run", "torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    options = torchrun.get_args_parser().parse_args(
        ["--standalone", "--nproc-per-node", str(nproc), "--module", "minigpt_cli", *args]
    )
    try:
        torchrun.run(options)
    except ChildFailedError as failed:
        raise typer.Exit(_job_status(failed)) from None
    except SignalException:  # Ctrl-C: the ranks saved their checkpoint and said how to resume
        raise typer.Exit(130) from None
    raise typer.Exit(0)


def _job_status(failed: object) -> int:
    failures = getattr(failed, "failures", {}) or {}
    if not failures:
        return 1
    first = failures.get(0) or failures[min(failures)]
    code = int(getattr(first, "exitcode", 1))
    return 128 - code if code < 0 else code  # killed by signal N: 128 + N, as a shell says
