"""`minigpt generate RUN`: continue a prompt with a trained run, streaming text as it is produced.

Defaults come from the run's own `[generate]` section (so a run can ship its preferred sampling
settings); every flag overrides one of them. The prompt is conditioned as the start of a document
(the end-of-text id that separates training documents comes first), generation ends at an
end-of-text or end-of-turn token (never, with `--ignore-eos`: exactly `--max-new-tokens` tokens, so
decoding can be timed from outside), and the text is printed as it is produced.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from minigpt_cli.cli import decoding
from minigpt_cli.errors import UserError

SAMPLE_SEPARATOR = "-" * 15  # between --num-samples outputs, as nanoGPT's sample.py prints


def generate(
    run: Annotated[
        Path, typer.Argument(help="Run directory to generate with (e.g. runs/pretrain-tiny).")
    ],
    prompt: Annotated[
        str | None,
        typer.Option(
            "--prompt",
            "-p",
            help="Text to continue. Without it the prompt is read from stdin when stdin is not a "
            "terminal; otherwise generation starts a new document.",
        ),
    ] = None,
    max_new_tokens: Annotated[
        int | None,
        typer.Option("--max-new-tokens", "-n", min=1, help="Tokens to generate at most."),
    ] = None,
    temperature: decoding.TemperatureOpt = None,
    top_k: decoding.TopKOpt = None,
    top_p: decoding.TopPOpt = None,
    repetition_penalty: decoding.RepetitionPenaltyOpt = None,
    greedy: decoding.GreedyOpt = False,
    num_beams: Annotated[
        int | None,
        typer.Option("--num-beams", min=1, help="Beam search with N beams (deterministic)."),
    ] = None,
    length_penalty: Annotated[
        float | None,
        typer.Option(
            "--length-penalty",
            help="Beam search: score = log-prob / length^this; above 0 favours longer text.",
        ),
    ] = None,
    ignore_eos: Annotated[
        bool,
        typer.Option(
            "--ignore-eos",
            help="Never stop at the end-of-text or end-of-turn token: generate exactly "
            "--max-new-tokens tokens (for timing; --stop strings still apply).",
        ),
    ] = False,
    stop: Annotated[
        list[str] | None,
        typer.Option("--stop", help="Stop when this text appears (repeatable); it is not printed."),
    ] = None,
    seed: Annotated[
        int | None, typer.Option("--seed", help="Random seed: the same seed gives the same text.")
    ] = None,
    num_samples: Annotated[
        int,
        typer.Option(
            "--num-samples", min=1, help="Independent samples, generated together as one batch."
        ),
    ] = 1,
    raw: Annotated[
        bool,
        typer.Option(
            "--raw",
            help="Plain text continuation, no chat template, even for a chat-tuned run (base "
            "runs are always raw).",
        ),
    ] = False,
    echo: Annotated[
        bool, typer.Option("--echo/--no-echo", help="Print the prompt before the continuation.")
    ] = True,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Report speed (tokens/s) on stderr.")
    ] = False,
    device: decoding.DeviceOpt = "auto",
    max_cpu: decoding.MaxCpuOpt = None,
    threads: decoding.ThreadsOpt = None,
    quantize: decoding.QuantizeOpt = None,
) -> None:
    """Generate text with a trained run, streamed to stdout as it is produced.

    Sampling defaults come from the run's [generate] config section. Example:
    minigpt generate runs/pretrain-tiny --prompt "Once upon a time" --top-p 0.9 --seed 1
    """
    import torch

    from minigpt_cli.engine.data.chat_template import user_prompt
    from minigpt_cli.engine.inference.decode import generate_batch
    from minigpt_cli.engine.inference.generation import TextStream

    text = _read_prompt(prompt)
    loaded, target = decoding.load_for_decoding(
        run, device, max_cpu=max_cpu, threads=threads, quantize=quantize
    )
    model, tokenizer, config = loaded.model, loaded.tokenizer, loaded.config
    ends = () if ignore_eos else (tokenizer.eos_id, tokenizer.eot_id)
    stop_ids = tuple(i for i in ends if i is not None and i >= 0)
    settings = decoding.sampling_settings(
        config.generate,
        top_k=top_k,
        greedy=greedy or num_beams == 1,  # one beam is greedy: deterministic, as --help says
        stop_ids=stop_ids,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        num_beams=num_beams,
        length_penalty=length_penalty,
        seed=seed,
        stop_strings=tuple(stop or ()),
    )

    if loaded.state.get("chat") and not raw:
        # A chat-tuned run answers the prompt as a user turn, in the one chat template.
        prompt_ids = user_prompt(text, tokenizer)
    else:
        prompt_ids = [tokenizer.eos_id, *tokenizer.encode(text)]
    context = model.config.context_length
    if len(prompt_ids) > context:
        sys.stderr.write(
            f"note: the prompt is {len(prompt_ids)} tokens; the model sees its last {context} "
            "(its context length)\n"
        )

    out = sys.stdout
    stream = TextStream(tokenizer, settings.stop_strings, prompt_ids)
    first_token_at: list[float] = []

    def show(_row: int, token: int) -> None:
        if not first_token_at:
            first_token_at.append(time.perf_counter())
        delta = stream.push(token)
        if delta:
            out.write(delta)
            out.flush()

    try:
        if echo and num_samples == 1:
            out.write(text)
            out.flush()
        start = time.perf_counter()
        results = generate_batch(
            model,
            prompt_ids,
            settings,
            num_samples,
            tokenizer=tokenizer,
            on_token=show if num_samples == 1 else None,
        )
        elapsed = time.perf_counter() - start
        if num_samples == 1:
            out.write(stream.finish() + "\n")
        else:
            for index, tokens in enumerate(results):
                if index:
                    out.write(SAMPLE_SEPARATOR + "\n")
                sample = TextStream(tokenizer, (), prompt_ids)
                body = "".join(sample.push(t) for t in tokens) + sample.finish()
                out.write((text if echo else "") + body + "\n")
        out.flush()
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, as command-line tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise typer.Exit(0) from None

    if verbose:
        produced = sum(len(tokens) for tokens in results)
        rate = produced / elapsed if elapsed > 0 else float("inf")
        first = (
            f", first token after {1000 * (first_token_at[0] - start):.0f} ms"
            if first_token_at
            else ""
        )
        dtype = str(model.model.embed_tokens.weight.dtype).removeprefix("torch.")
        if quantize is not None:
            dtype += f", {quantize} weights"
        sys.stderr.write(
            f"{produced} tokens in {elapsed:.2f} s ({rate:.1f} tokens/s{first}); prompt "
            f"{min(len(prompt_ids), context)} tokens; {num_samples} sample(s); "
            f"{target.type} {dtype}, {torch.get_num_threads()} threads\n"
        )


def _read_prompt(prompt: str | None) -> str:
    """The prompt flag, else piped stdin, else empty (start a new document)."""
    if prompt is not None:
        return prompt
    stdin = sys.stdin
    if stdin is None or stdin.closed:
        return ""
    try:
        interactive = stdin.isatty()
    except ValueError:
        return ""
    if interactive:
        return ""
    try:
        return stdin.read()
    except UnicodeDecodeError as error:
        raise UserError(f"<stdin>: the prompt is not valid UTF-8 ({error.reason})") from error


def register(app: typer.Typer) -> None:
    """Add `minigpt generate`."""
    app.command("generate")(generate)
