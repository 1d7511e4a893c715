"""The `minigpt` command: one Typer app, one error path.

Start-up must stay fast (`minigpt --help` well under half a second), so this module and every verb
module import only typer and the standard library at top level; torch, sentencepiece, numpy and rich
are imported inside the verb functions that need them.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from minigpt_cli import __version__
from minigpt_cli.errors import UserError

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


def _register_verbs() -> None:
    # Each verb module exposes `register(app)`; importing them is cheap (no torch at top level).
    from minigpt_cli.cli import (
        chat_cmd,
        config_cmd,
        data_cmd,
        doctor_cmd,
        dpo_cmd,
        eval_cmd,
        generate_cmd,
        pretrain_cmd,
        quickstart_cmd,
        rlhf_cmd,
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
    )
    for module in verbs:
        module.register(app)


_register_verbs()


def _debug_requested() -> bool:
    return os.environ.get(_DEBUG_ENV) == "1" or "--debug" in sys.argv[1:]


def main() -> None:
    """Entry point of the console script: every user error becomes one line and exit status 2."""
    try:
        app(prog_name="minigpt")
    except UserError as error:
        if _debug_requested():
            raise
        sys.stderr.write(f"error: {error}\n")
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        if _debug_requested():
            raise
        sys.stderr.write("interrupted\n")
        sys.exit(130)
