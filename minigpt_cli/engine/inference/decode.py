"""Decoding a prompt, the one entry: sampling or greedy (`generation`), or beam search (`beam`), as
the `SamplingSettings` say.

`generate_batch` is what `minigpt generate`, `chat` and RLHF's rollouts call, `generate` its
one-sequence form. They sit above both decoders because each needs the other: the entry chooses
beam search for `num_beams > 1`, and beam search with one beam is greedy sampling.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from minigpt_cli.engine.inference.beam import beam_search
from minigpt_cli.engine.inference.generation import SamplingSettings, TextCodec, TextStream, sample
from minigpt_cli.errors import UserError

if TYPE_CHECKING:
    from minigpt_cli.engine.model.gpt import GPT


def generate_batch(
    model: GPT,
    prompt_ids: Sequence[int],
    settings: SamplingSettings,
    num_samples: int = 1,
    *,
    tokenizer: TextCodec | None = None,
    on_token: Callable[[int, int], None] | None = None,
) -> list[list[int]]:
    """`num_samples` continuations of one prompt, decoded together through one batched KV cache.

    Returns the new tokens of each sample (stop ids and stop strings cut off, see the module doc of
    `generation`). `on_token(sample_index, token_id)` is called for every token as it is drawn
    (before stop-string trimming, which `TextStream` handles for display). Rows that have stopped
    keep riding along in the batch (their draws are ignored) until every row stops or
    `max_new_tokens` is reached.
    """
    if num_samples < 1:
        raise UserError(f"num_samples must be at least 1, got {num_samples}")
    if settings.num_beams > 1:
        if num_samples > 1:
            raise UserError(
                "beam search is deterministic: --num-samples above 1 needs sampling, "
                "not --num-beams"
            )
        eos = settings.stop_ids
        result = beam_search(
            model,
            prompt_ids,
            settings.num_beams,
            settings.max_new_tokens,
            settings.length_penalty,
            eos,
        )
        if settings.stop_strings:
            if tokenizer is None:
                raise ValueError("stop strings need a tokenizer to decode the text")
            stream = TextStream(tokenizer, settings.stop_strings, prompt_ids)
            for token in result:
                stream.push(token)
                if stream.stopped:
                    break
            result = stream.ids_before_stop()
        if on_token is not None:
            for token in result:
                on_token(0, token)
        return [result]
    return sample(model, prompt_ids, settings, num_samples, tokenizer=tokenizer, on_token=on_token)


def generate(
    model: GPT,
    prompt_ids: Sequence[int],
    settings: SamplingSettings,
    *,
    tokenizer: TextCodec | None = None,
    on_token: Callable[[int], None] | None = None,
) -> list[int]:
    """New tokens continuing `prompt_ids` (sampling, greedy or beam search per `settings`).

    `on_token(id)` is called as each token is produced (after the search, for beam search), so a
    caller can stream text through a `TextStream`. `tokenizer` is needed for stop strings.
    """
    callback = None if on_token is None else (lambda _row, token: on_token(token))
    return generate_batch(model, prompt_ids, settings, 1, tokenizer=tokenizer, on_token=callback)[0]
