"""The `minigpt` command: one Typer app, one error path.

Start-up must stay fast (`minigpt --help` well under half a second), so this module and every verb
module import only typer and the standard library at top level; torch, sentencepiece, numpy and rich
are imported inside the verb functions that need them.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Annotated

import typer

from minigpt_cli import __version__
from minigpt_cli.cli import common
from minigpt_cli.errors import (
    EXIT_MACHINE,
    EXIT_USER,
    MACHINE_ERRNOS,
    RunFailed,
    UserError,
    describe_os_error,
)

# Intel MKL (PyTorch's fp32 matmuls on x86 CPUs) may split a product's sums across its threads
# differently from one run to the next: the same 6-step fp32 training of `tiny` with 2 threads
# ended on other weights in 6 of 53 runs, so no run was bitwise repeatable and a resumed one could
# differ from the uninterrupted one. Its strict conditional numerical reproducibility mode fixes
# the split (30 of 30 runs identical) at no measured cost to training steps, but it slows MKL's
# one-row products (a decode step's): small's fp32 decode 130 -> 90 tokens/s. So the verbs that
# train and promise exact resume ask for it and the decoding verbs do not. MKL reads it once, when
# it starts (a later change is refused), so it is set before the verb imports torch; a value the
# user set is kept. Non-MKL builds ignore it.
MKL_REPRODUCIBLE = ("MKL_CBWR", "AUTO,STRICT")
_TRAINING_VERBS = frozenset({"quickstart", "pretrain", "sft", "dpo", "rlhf"})

app = typer.Typer(
    name="minigpt",
    help="Train a small GPT from scratch on this machine: tokenizer, pretraining, SFT, DPO, RLHF, "
    "evaluation and chat. Start with `minigpt quickstart`.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_DEBUG_ENV = "MINIGPT_DEBUG"


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"minigpt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the full traceback when something fails.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version_callback, is_eager=True, help="Print the version."
        ),
    ] = False,
) -> None:
    """Train a small GPT from scratch on this machine."""
    if debug:
        os.environ[_DEBUG_ENV] = "1"
    if ctx.invoked_subcommand in _TRAINING_VERBS:
        os.environ.setdefault(*MKL_REPRODUCIBLE)


def _register_verbs() -> None:
    # Each verb module exposes `register(app)`; importing them is cheap (no torch at top level).
    from minigpt_cli.cli import (
        chat_cmd,
        config_cmd,
        data_cmd,
        doctor_cmd,
        dpo_cmd,
        eval_cmd,
        export_cmd,
        generate_cmd,
        import_cmd,
        pretrain_cmd,
        quickstart_cmd,
        rlhf_cmd,
        serve_cmd,
        sft_cmd,
        tokenize_cmd,
    )

    verbs = (
        doctor_cmd,
        quickstart_cmd,
        config_cmd,
        data_cmd,
        tokenize_cmd,
        pretrain_cmd,
        sft_cmd,
        dpo_cmd,
        rlhf_cmd,
        generate_cmd,
        eval_cmd,
        chat_cmd,
        serve_cmd,
        export_cmd,
        import_cmd,
    )
    for module in verbs:
        module.register(app)


_register_verbs()


def _debug_requested() -> bool:
    return os.environ.get(_DEBUG_ENV) == "1" or "--debug" in sys.argv[1:]


def main() -> None:
    """Entry point of the console script: every failure a user can meet becomes one line.

    Exit status 2: the user's input (config, data, flags, paths) needs fixing; 3: the machine
    failed during the work (the line says what was kept and how to continue); 130: interrupted.
    Any other exception is a bug in minigpt and keeps its traceback.
    """
    common.COMMAND_STARTED.append((time.perf_counter(), time.time()))
    try:
        app(prog_name="minigpt")
    except (UserError, RunFailed, OSError, KeyboardInterrupt) as error:
        if _debug_requested():
            raise
        message, code = _one_line(error)
        rank = _torchrun_rank()
        if "TORCHELASTIC_RUN_ID" in os.environ:
            # torchrun stops the other ranks with SIGTERM when one fails: this rank's line and
            # status stand (a SIGTERM now would have the launcher report a second cause).
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if rank:
            # Under torchrun every rank meets the same input and rank 0 says what is wrong; the
            # others leave with the same status and say only what is theirs alone.
            if isinstance(error, UserError | KeyboardInterrupt):
                sys.exit(code)
            message = f"rank {rank}: {message}"
        sys.stderr.write(f"{message}\n")
        sys.exit(code)


def _torchrun_rank() -> int:
    """This process's rank under torchrun (0 for rank 0 and for one process outside it)."""
    try:
        return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
    except ValueError:
        return 0


def _one_line(error: BaseException) -> tuple[str, int]:
    if isinstance(error, UserError | RunFailed):
        return f"error: {error}", error.exit_code
    if isinstance(error, OSError):
        # Outside a training run: a path problem is the user's to fix (2); a full disk, too many
        # open files or an I/O error is the machine's (3). Nothing half-written is left behind.
        code = EXIT_MACHINE if error.errno in MACHINE_ERRNOS else EXIT_USER
        return f"error: {describe_os_error(error)}", code
    return "interrupted", 130
