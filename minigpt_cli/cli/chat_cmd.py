"""`minigpt chat RUN`: a multi-turn conversation with a trained run in the terminal.

The history, its trimming to the context window and `/set` parsing live in
`engine/inference/chat.py` (tested without a terminal); this module is the REPL around them: the
banner, reading lines, commands, streaming answers and Ctrl-C.

Three ways in, one code path: an interactive terminal (prompts, readline editing, banner), piped
stdin (each non-empty line is a message or a command and only the answers reach stdout, so a
script can drive it), and one-shot `-p` (answer, exit 0). Sampling defaults come from the run's
`[generate]` section, as for `generate`, so both verbs answer a question identically.

Ctrl-C during an answer must stop the answer, not the program. `generate_batch` has no stop flag,
so for the duration of an answer a SIGINT handler only raises a flag, and the per-token callback
turns the flag into a private exception that unwinds the generation loop; the previous handler is
restored afterwards, so Ctrl-C at the prompt interrupts `input()` as usual (and clears the line).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TextIO

import typer

from minigpt_cli.cli import decoding
from minigpt_cli.errors import UserError

if TYPE_CHECKING:
    from minigpt_cli.engine.inference.chat import Conversation
    from minigpt_cli.engine.inference.generation import SamplingSettings
    from minigpt_cli.engine.runs.load import LoadedRun

STOP_MARKER = "[stopped]"
USER_PROMPT = "you> "
MORE_PROMPT = "...> "

HELP_TEXT = """\
Commands:
  /help               this help
  /reset              forget the conversation (the system prompt stays)
  /system TEXT        set the system prompt (a plain run: the text the conversation starts
                      with); /system alone shows it, /system off removes it
  /set NAME VALUE     change a sampling setting: temperature, top_k, top_p, repetition_penalty,
                      max_new_tokens, seed, greedy (on/off); top_k/top_p/seed take off;
                      /set alone shows the current settings
  /stats              speed of the last answer, context used / context length, turns kept
  /exit, /quit        leave (Ctrl-D too)
Input: a line ending in \\ continues on the next line; lines between \"\"\" and \"\"\" are one
  message; //text sends "/text" as a message.
Ctrl-C stops the answer being written: the partial answer is KEPT in the conversation and marked
  [stopped]. At the prompt, Ctrl-C clears the line.
When the conversation outgrows the context window, the oldest exchanges are forgotten first (the
  system prompt stays), keeping max_new_tokens (at most half the context) free for the answer."""


class _StopAnswer(Exception):
    """Raised from the per-token callback to unwind `generate_batch` after Ctrl-C."""


@dataclass
class _AnswerStats:
    tokens: int
    seconds: float
    stopped: bool


class _Session:
    """One chat: the model, the conversation, the settings, and where text goes."""

    def __init__(
        self,
        loaded: LoadedRun,
        conversation: Conversation,
        settings: SamplingSettings,
        *,
        interactive: bool,
        out: TextIO,
        info: TextIO,
    ) -> None:
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.conversation = conversation
        self.settings = settings
        self.interactive = interactive
        self.out = out  # answers, /help and /stats
        self.info = info  # notes and acknowledgements: stderr when piped, so stdout is answers only
        self.last: _AnswerStats | None = None

    # ------------------------------------------------------------------------------ answers

    def answer(self, text: str) -> None:
        """Stream the model's answer to `text` and keep the exchange (UserError: nothing sent)."""
        from minigpt_cli.engine.inference.decode import generate_batch
        from minigpt_cli.engine.inference.generation import TextStream

        plan = self.conversation.prompt_for(text, self.settings.max_new_tokens)
        for note in plan.notes():
            self.say(note)
        stream = TextStream(self.tokenizer, (), plan.ids)
        stop_requested = threading.Event()
        produced = 0

        def show(_row: int, token: int) -> None:
            nonlocal produced
            if stop_requested.is_set():
                raise _StopAnswer
            produced += 1
            delta = stream.push(token)
            if delta:
                self.out.write(delta)
                self.out.flush()

        stopped = False
        start = time.perf_counter()
        with _sigint_sets(stop_requested):
            try:
                generate_batch(
                    self.model, plan.ids, self.settings, tokenizer=self.tokenizer, on_token=show
                )
            except _StopAnswer:
                stopped = True
        elapsed = time.perf_counter() - start
        tail = stream.finish()
        self.out.write(tail)
        self.out.write(f" {STOP_MARKER}\n" if stopped else "\n")
        self.out.flush()
        self.conversation.record(plan, stream.text)
        self.last = _AnswerStats(produced, elapsed, stopped)

    # ------------------------------------------------------------------------------ commands

    def say(self, line: str) -> None:
        self.info.write(line + "\n")
        self.info.flush()

    def command(self, line: str) -> bool:
        """Run one /command; False means leave. Problems become a message, never a crash."""
        from minigpt_cli.engine.inference.chat import updated_settings

        name, _, argument = line[1:].partition(" ")
        name = name.lower()
        argument = argument.strip()
        if name in ("exit", "quit"):
            return False
        if name == "help":
            self.out.write(HELP_TEXT + "\n")
        elif name == "reset":
            self.conversation.reset()
            self.say("(conversation cleared)")
        elif name == "system":
            self._system(argument)
        elif name == "set":
            if not argument:
                self.out.write(_describe_settings(self.settings) + "\n")
            else:
                try:
                    self.settings = updated_settings(self.settings, argument)
                except UserError as error:
                    self.say(f"error: {error}")
                else:
                    self.say(f"({_describe_settings(self.settings)})")
        elif name == "stats":
            self.out.write(self._stats() + "\n")
        else:
            self.say(f"unknown command /{name}: type /help for the commands, //text to send /text")
        self.out.flush()
        return True

    def _system(self, argument: str) -> None:
        if not argument:
            current = self.conversation.system
            self.say(f"system prompt: {current!r}" if current else "(no system prompt)")
        elif argument.lower() == "off":
            self.conversation.system = None
            self.say("(system prompt removed)")
        else:
            self.conversation.system = argument
            self.say("(system prompt set)")

    def _stats(self) -> str:
        from minigpt_cli.engine.inference.chat import answer_room

        if self.last is None:
            speed = "last answer: none yet"
        else:
            rate = self.last.tokens / self.last.seconds if self.last.seconds > 0 else 0.0
            ending = ", stopped with Ctrl-C" if self.last.stopped else ""
            speed = (
                f"last answer: {self.last.tokens} tokens in {self.last.seconds:.2f} s "
                f"({rate:.1f} tokens/s{ending})"
            )
        conversation = self.conversation
        context = conversation.context_length
        room = answer_room(context, self.settings.max_new_tokens)
        forgotten = f" ({conversation.forgotten} older forgotten)" if conversation.forgotten else ""
        return (
            f"{speed}\n"
            f"context: {conversation.tokens_used()} / {context} tokens used "
            f"({room} kept free for each answer)\n"
            f"turns kept: {len(conversation.exchanges)}{forgotten}"
        )

    # ------------------------------------------------------------------------------ the loop

    def repl(self, read_line: Callable[[str], str]) -> None:
        """Read messages and commands until /exit or end of input (Ctrl-D)."""
        from minigpt_cli.engine.inference.chat import read_message

        prompt, more = (USER_PROMPT, MORE_PROMPT) if self.interactive else ("", "")
        while True:
            try:
                text = read_message(read_line, prompt, more)
            except EOFError:
                if self.interactive:
                    self.out.write("\n")
                return
            except KeyboardInterrupt:
                # Ctrl-C at the prompt: drop the line being typed, ask again.
                self.out.write("\n")
                continue
            if not text.strip():
                continue
            if text.startswith("/") and not text.startswith("//"):
                if not self.command(text.strip()):
                    return
                continue
            if text.startswith("//"):
                text = text[1:]
            try:
                self.answer(text)
            except UserError as error:
                self.say(f"error: {error}")
            except KeyboardInterrupt:
                # Ctrl-C in the instant before or after generation, outside the flag's handler.
                self.out.write(f" {STOP_MARKER}\n")


class _sigint_sets:  # noqa: N801 - used as a context manager, reads like one
    """While active, Ctrl-C sets `flag` instead of raising KeyboardInterrupt."""

    def __init__(self, flag: threading.Event) -> None:
        self.flag = flag
        self.previous: Any = None
        self.active = threading.current_thread() is threading.main_thread()

    def __enter__(self) -> None:
        if self.active:
            self.previous = signal.signal(signal.SIGINT, lambda _sig, _frame: self.flag.set())

    def __exit__(self, *exc: object) -> None:
        if self.active:
            signal.signal(signal.SIGINT, self.previous)


def _describe_settings(settings: SamplingSettings) -> str:
    from minigpt_cli.engine.inference.chat import SETTING_NAMES

    def show(value: object) -> str:
        if value is None:
            return "off"
        if isinstance(value, bool):
            return "on" if value else "off"
        return str(value)

    return ", ".join(f"{name} {show(getattr(settings, name))}" for name in SETTING_NAMES)


def _stdin_is_terminal() -> bool:
    stdin = sys.stdin
    if stdin is None or stdin.closed:
        return False
    try:
        return stdin.isatty()
    except ValueError:
        return False


def _read_piped_line(_prompt: str) -> str:
    """Next line of piped stdin without its newline; EOFError at the end."""
    try:
        line = sys.stdin.readline()
    except UnicodeDecodeError as error:
        raise UserError(f"<stdin>: the input is not valid UTF-8 ({error.reason})") from error
    if not line:
        raise EOFError
    return line.rstrip("\r\n")


def _banner(
    run: Path, loaded: LoadedRun, device: str, settings: SamplingSettings, chat: bool
) -> str:
    parameters = loaded.model.num_parameters()
    context = loaded.model.config.context_length
    mode = (
        "chat-tuned: messages go through the chat template"
        if chat
        else "plain (not chat-tuned): the conversation is one plain text, each input on a new "
        "line, which the model continues"
    )
    return (
        f"minigpt chat: {run.resolve().name} ({parameters:,} parameters, {mode})\n"
        f"context {context} tokens, device {device}; {_describe_settings(settings)}\n"
        "Type a message and press Enter. /help for commands, /exit or Ctrl-D to leave, "
        "Ctrl-C stops an answer.\n"
    )


def chat(
    run: Annotated[Path, typer.Argument(help="Run directory to chat with (e.g. runs/sft-tiny).")],
    prompt: Annotated[
        str | None,
        typer.Option(
            "--prompt", "-p", help="Ask one question, print the answer and exit (no REPL)."
        ),
    ] = None,
    system: Annotated[
        str | None,
        typer.Option(
            "--system",
            help="System prompt (a chat-tuned run) or text the conversation starts with (plain).",
        ),
    ] = None,
    temperature: decoding.TemperatureOpt = None,
    top_k: decoding.TopKOpt = None,
    top_p: decoding.TopPOpt = None,
    repetition_penalty: decoding.RepetitionPenaltyOpt = None,
    max_new_tokens: Annotated[
        int | None,
        typer.Option("--max-new-tokens", "-n", min=1, help="Tokens per answer at most."),
    ] = None,
    greedy: decoding.GreedyOpt = False,
    seed: Annotated[
        int | None,
        typer.Option("--seed", help="Random seed: the same seed and messages give the same chat."),
    ] = None,
    device: decoding.DeviceOpt = "auto",
    max_cpu: decoding.MaxCpuOpt = None,
    threads: decoding.ThreadsOpt = None,
    quantize: decoding.QuantizeOpt = None,
) -> None:
    """Chat with a trained run: streaming answers, multi-turn history, /help for commands.

    A chat-tuned run (sft, dpo, rlhf) answers in the chat template; a pretrained run continues
    the text. Piped stdin is read as one message (or /command) per line, answers only on stdout:
    printf 'hi\\n/reset\\nwho are you?\\n' | minigpt chat runs/sft-tiny
    """
    if not run.is_dir():
        raise UserError(f"{run}: no such run directory")

    from minigpt_cli.engine.data.chat_template import stop_token_ids
    from minigpt_cli.engine.inference.chat import Conversation

    loaded, target = decoding.load_for_decoding(
        run, device, max_cpu=max_cpu, threads=threads, quantize=quantize
    )
    model, tokenizer, config = loaded.model, loaded.tokenizer, loaded.config
    settings = decoding.sampling_settings(
        config.generate,
        top_k=top_k,
        greedy=greedy,
        stop_ids=stop_token_ids(tokenizer),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
    )

    is_chat = bool(loaded.state.get("chat"))
    conversation = Conversation(
        tokenizer, chat=is_chat, context_length=model.config.context_length, system=system
    )
    interactive = prompt is None and _stdin_is_terminal()
    session = _Session(
        loaded,
        conversation,
        settings,
        interactive=interactive,
        out=sys.stdout,
        info=sys.stdout if interactive else sys.stderr,
    )
    try:
        if prompt is not None:
            session.answer(prompt)  # a UserError here is the command's error: exit 2
            return
        if interactive:
            with contextlib.suppress(ImportError):
                import readline  # noqa: F401  (line editing and history for input())
            sys.stdout.write(_banner(run, loaded, target.type, settings, is_chat))
            sys.stdout.flush()
            session.repl(input)
        else:
            session.repl(_read_piped_line)
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, as command-line tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise typer.Exit(0) from None


def register(app: typer.Typer) -> None:
    """Add `minigpt chat`."""
    app.command("chat")(chat)
