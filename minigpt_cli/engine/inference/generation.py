"""Turning a trained model into text: sampling and greedy decoding over a KV cache.

One decoding loop serves `minigpt generate` now and `chat`/`eval`/RL rollouts later, so the pieces
are separate and testable: `SamplingSettings` (what the user asked for), `choose_next` (the logits
processors: repetition penalty, temperature, top-k, top-p, then a draw from a seeded generator),
`sample` (prefill the prompt once, then one token per step through the cache), and `TextStream`
(incremental detokenisation that never prints half a character or the beginning of a stop string
it will later take back). Beam search is `inference.beam`; `inference.decode.generate_batch` is
the one entry that picks between the two.

Choices a user may want to know about:
- Prompts longer than the context keep their last `context_length` tokens.
- Generation does not stop at the context length: when the cache is full the window slides. The
  cache is rebuilt from the last three quarters of the context in one prefill (rotary positions are
  relative, so the model sees an ordinary, shorter context) and decoding continues. This is
  nanoGPT's crop-to-the-last-block behaviour, paid for once every quarter context, not every token.
- Stop ids end a sequence and are not part of the result. A stop string ends it too: the result's
  text is everything before the string (`decode(result)` equals the text before the stop string;
  the last few tokens may be re-encoded to cut a token that straddles the string).
- The same seed gives the same tokens (a private `torch.Generator`; the global RNG is untouched).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from minigpt_cli.engine.hardware.monitor import idle_cores
from minigpt_cli.engine.model.layers import reuse_stacked_weights
from minigpt_cli.engine.model.stepper import DecodeStep
from minigpt_cli.engine.resources.governor import throttle_point
from minigpt_cli.errors import UserError

if TYPE_CHECKING:
    from minigpt_cli.config.schema import GenerateConfig
    from minigpt_cli.engine.model.gpt import GPT
    from minigpt_cli.engine.model.layers import KVCache

# When the cache is full, keep this fraction of the context and continue (see the module doc).
_SLIDE_KEEP = 0.75

# Below this many parameters a decoding step is a few dozen tiny kernels: a second thread only adds
# synchronisation, and on a busy machine OpenMP's waiting makes it many times slower. Measured on
# an idle 2-core machine (greedy, 100 tokens, tokens/s at 2 threads against 1): 0.14M parameters
# 0.94x, 0.34M 1.00x, 0.73M 1.10x, the tiny preset (1.49M) 1.20x.
_SINGLE_THREAD_DECODE_PARAMS = 500_000

# How long `decode_threads` watches the machine's load: part of the wait before the first token.
_IDLE_SAMPLE_SECONDS = 0.1


class TextCodec(Protocol):
    """What generation needs from a tokenizer: `encode` and `decode` (minigpt's Tokenizer).
    `continuation=True` (text that continues earlier text) is asked for only when plain `encode`
    does not decode back in place: a tokenizer without a dummy prefix may ignore it."""

    def encode(self, text: str, *, continuation: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass
class SamplingSettings:
    """How to pick tokens; defaults are the `[generate]` section's.

    `temperature == 0` or `greedy` means argmax. `top_k=None` and `top_p=None` (or 1.0) switch those
    filters off. `num_beams > 1` selects beam search (deterministic; sampling options are unused
    there). `seed=None` draws a fresh seed.
    """

    max_new_tokens: int = 128
    temperature: float = 0.8
    top_k: int | None = 50
    top_p: float | None = 0.95
    repetition_penalty: float = 1.0
    greedy: bool = False
    num_beams: int = 1
    length_penalty: float = 1.0
    stop_ids: Sequence[int] = field(default_factory=tuple)
    stop_strings: Sequence[str] = field(default_factory=tuple)
    seed: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not math.isfinite(self.temperature):
            problems.append(f"temperature must be 0 or more, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            problems.append(f"top_k must be at least 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            problems.append(f"repetition_penalty must be positive, got {self.repetition_penalty}")
        if self.num_beams < 1:
            problems.append(f"num_beams must be at least 1, got {self.num_beams}")
        if any(not text for text in self.stop_strings):
            problems.append("a stop string must not be empty")
        if problems:
            raise UserError("; ".join(problems))
        self.stop_ids = tuple(int(i) for i in self.stop_ids)
        self.stop_strings = tuple(self.stop_strings)

    @classmethod
    def from_config(cls, config: GenerateConfig, **overrides: Any) -> SamplingSettings:
        """Settings from a run's `[generate]` section, with explicit (non-None) overrides on top."""
        values: dict[str, Any] = config.model_dump()
        values.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**values)

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0


# --------------------------------------------------------------------------------------------
# choosing the next token


def apply_repetition_penalty(
    logits: torch.Tensor, seen: torch.Tensor, penalty: float
) -> torch.Tensor:
    """CTRL's penalty: seen tokens' logits divided by `penalty` if positive, multiplied if not."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def choose_next(
    logits: torch.Tensor,
    settings: SamplingSettings,
    generator: torch.Generator | None = None,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V), processed in HF's order.

    Repetition penalty, then greedy argmax, or temperature, top-k, top-p and a draw. Top-p works on
    the top-k survivors only (already sorted by `topk`), so a full-vocabulary sort happens only when
    top-k is off.
    """
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, settings.repetition_penalty)
    if settings.is_greedy:
        return logits.argmax(dim=-1)
    logits = logits / settings.temperature
    vocab = logits.shape[-1]
    # top-p of 1.0 keeps every token: no nucleus to cut
    top_p = settings.top_p if settings.top_p is not None and settings.top_p < 1.0 else None
    candidates: torch.Tensor | None = None
    if settings.top_k is not None and settings.top_k < vocab:
        logits, candidates = torch.topk(logits, settings.top_k, dim=-1)
    elif top_p is not None:
        logits, candidates = torch.sort(logits, dim=-1, descending=True)
    if top_p is not None:
        probs = torch.softmax(logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        # The nucleus is the shortest prefix whose mass reaches top_p; the best token always stays.
        outside = mass_before >= top_p
        outside[..., 0] = False
        logits = logits.masked_fill(outside, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    # A draw from `probs` by inverting its cumulative sum: one uniform number a row, the first
    # token whose running total passes it (a token of probability 0 never does). The same
    # distribution as torch.multinomial, without its per-call validity checks; an exponential
    # race over the whole vocabulary (argmax p / Exp(1)) drew a random number per token, 12.3 ms
    # against 0.3 ms for RL's 128 rows of 5,000 words, 109 against 12 us for one row.
    cumulative = probs.cumsum(dim=-1)
    uniform = torch.rand(
        (*probs.shape[:-1], 1), generator=generator, dtype=probs.dtype, device=probs.device
    )
    draw = torch.searchsorted(cumulative, uniform * cumulative[..., -1:], right=True)
    draw = draw.clamp_(max=probs.shape[-1] - 1)
    if candidates is not None:
        draw = candidates.gather(-1, draw)
    return draw.squeeze(-1)


# --------------------------------------------------------------------------------------------
# text


class TextStream:
    """Incremental detokenisation with stop strings: text deltas that are never taken back.

    `push(id)` returns the new printable text. Text is held back while it ends in an incomplete
    UTF-8 sequence (sentencepiece byte-fallback pieces decode to U+FFFD until the character is
    complete) or while its end could be the start of a stop string. Once a stop string appears,
    `stopped` is set and nothing from the stop string on is ever returned. `finish()` returns
    whatever was held back when generation ended for another reason.

    Decoding uses the previous emission's tokens as context (as Hugging Face TGI does), so the cost
    per token is constant and tokenizers that drop a leading space at the start of `decode` still
    stream spaces correctly. Pass the prompt's last ids as `context_ids` for the same reason.
    """

    _CONTEXT_TOKENS = 4

    def __init__(
        self,
        tokenizer: TextCodec,
        stop_strings: Sequence[str] = (),
        context_ids: Sequence[int] = (),
    ) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = tuple(stop_strings)
        self._longest_stop = max((len(s) for s in self.stop_strings), default=0)
        self._ids = list(context_ids)[-self._CONTEXT_TOKENS :]
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._context_len = len(self._ids)
        self.text = ""  # decoded text of the generated tokens so far (stable part)
        self.emitted = 0  # characters of `text` already returned
        self.stopped = False
        self.stop_at: int | None = None  # index in `text` where the stop string starts
        # (tokens consumed, length of `text`) after each stable decode: lets a caller map a cut in
        # the text back to the tokens that produced it.
        self.boundaries: list[tuple[int, int]] = [(0, 0)]

    @property
    def generated_ids(self) -> list[int]:
        return self._ids[self._context_len :]

    def _decode_delta(self) -> str:
        prefix = self.tokenizer.decode(self._ids[self._prefix_offset : self._read_offset])
        full = self.tokenizer.decode(self._ids[self._prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return full[len(prefix) :]
        return ""

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text that is now safe to show (maybe "")."""
        if self.stopped:
            return ""
        self._ids.append(int(token_id))
        delta = self._decode_delta()
        if not delta:
            return ""
        search_from = max(0, len(self.text) - self._longest_stop + 1)
        self.text += delta
        self.boundaries.append((len(self._ids) - self._context_len, len(self.text)))
        found = [
            index
            for index in (self.text.find(stop, search_from) for stop in self.stop_strings)
            if index >= 0
        ]
        if found:
            self.stopped = True
            self.stop_at = min(found)
            return self._emit_to(self.stop_at)
        return self._emit_to(len(self.text) - self._held_back())

    def _held_back(self) -> int:
        """Length of the longest end of `text` that is a proper prefix of some stop string."""
        longest = 0
        for stop in self.stop_strings:
            for size in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def _emit_to(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        out = self.text[self.emitted : end]
        self.emitted = end
        return out

    def finish(self) -> str:
        """Text held back at the end (a stop-string prefix that never completed)."""
        if self.stopped:
            return ""
        return self._emit_to(len(self.text))

    def visible_text(self) -> str:
        """All text a reader should see: up to the stop string, or everything."""
        return self.text[: self.stop_at] if self.stop_at is not None else self.text

    def ids_before_stop(self) -> list[int]:
        """Token ids whose decoded text is exactly `visible_text()`.

        Whole tokens are kept up to the last stable point before the stop string; the remaining
        few characters (a token that straddles the stop string) are re-encoded.
        """
        generated = self.generated_ids
        if self.stop_at is None:
            return generated
        tokens, length = max(
            (b for b in self.boundaries if b[1] <= self.stop_at), key=lambda b: b[1]
        )
        rest = self.text[length : self.stop_at]
        return generated[:tokens] + (self._encode_in_place(tokens, rest) if rest else [])

    def _encode_in_place(self, tokens: int, rest: str) -> list[int]:
        """Ids of `rest`, which follows the first `tokens` generated ids: as a text of its own
        when that decodes back in place (always, for a tokenizer without a dummy prefix; with
        one, where the reply starts after a special token), else as a continuation (after other
        text, where a dummy prefix would add a space)."""
        before = self._ids[: self._context_len + tokens]
        shown = self.tokenizer.decode(before)
        ids = list(self.tokenizer.encode(rest))
        if self.tokenizer.decode(before + ids)[len(shown) :] == rest:
            return ids
        continued = list(self.tokenizer.encode(rest, continuation=True))
        if self.tokenizer.decode(before + continued)[len(shown) :] == rest:
            return continued
        return ids


# --------------------------------------------------------------------------------------------
# sampling / greedy


def decode_threads(num_parameters: int, max_threads: int) -> int:
    """CPU threads for token-by-token decoding of a model this size, at most `max_threads`.

    Models under half a million parameters decode fastest on one thread. Larger ones (the tiny
    preset too) gain from more threads, but only on cores that are free: with every core busy, a
    thread that waits for a descheduled sibling at each of the hundreds of kernels per token can
    make decoding 5-70x slower (measured on a shared 2-core machine). So the count is the cores
    other programs leave idle right now (sampled for a tenth of a second, as the training verbs
    do), within the cap. Not the load average: it trails by a minute, so a decode started after a
    training run ended took one thread of two on an idle machine (`small` int8: 293 against 418
    tokens/s).
    """
    if num_parameters < _SINGLE_THREAD_DECODE_PARAMS or max_threads <= 1:
        return 1
    idle = int(idle_cores(_IDLE_SAMPLE_SECONDS) + 0.5)
    return max(1, min(max_threads, idle))


def model_device(model: GPT) -> torch.device:
    return model.model.embed_tokens.weight.device  # the head may be int8 (`quantize`)


def make_generator(device: torch.device, seed: int | None) -> torch.Generator:
    """The draws' generator: seeded for a reproducible decode, from the OS when `seed` is None."""
    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(63) if seed is None else seed)
    return generator


def fit_prompt(model: GPT, prompt_ids: Sequence[int]) -> list[int]:
    ids = [int(i) for i in prompt_ids]
    if not ids:
        raise ValueError("the prompt must contain at least one token (e.g. the end-of-text id)")
    vocab = model.vocab_size
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary (size {vocab})")
    return ids[-model.config.context_length :]


def slide_window(model: GPT, cache: KVCache, history: torch.Tensor) -> torch.Tensor:
    """Rebuild a full cache from the last part of `history` (B, T); logits of its last position."""
    keep = max(1, int(model.config.context_length * _SLIDE_KEEP))
    cache.reset()
    return model(history[:, -keep:], kv_cache=cache, last_only=True)[:, -1]


@torch.inference_mode()
@reuse_stacked_weights()
def sample(
    model: GPT,
    prompt_ids: Sequence[int],
    settings: SamplingSettings,
    num_samples: int = 1,
    *,
    tokenizer: TextCodec | None = None,
    on_token: Callable[[int, int], None] | None = None,
) -> list[list[int]]:
    """`num_samples` sampled (or greedy) continuations of one prompt, through one batched KV cache.

    What `decode.generate_batch` runs when `settings.num_beams` is 1 (this function does not look
    at it): the same returns and the same `on_token(sample_index, token_id)` calls.
    """
    if settings.stop_strings and tokenizer is None:
        raise ValueError("stop strings need a tokenizer to decode the text")

    was_training = model.training
    model.eval()
    try:
        return _sample_loop(model, prompt_ids, settings, num_samples, tokenizer, on_token)
    finally:
        model.train(was_training)


def _sample_loop(
    model: GPT,
    prompt_ids: Sequence[int],
    settings: SamplingSettings,
    rows: int,
    tokenizer: TextCodec | None,
    on_token: Callable[[int, int], None] | None,
) -> list[list[int]]:
    device = model_device(model)
    prompt = fit_prompt(model, prompt_ids)
    generator = None if settings.is_greedy else make_generator(device, settings.seed)
    stop_ids = set(settings.stop_ids)
    streams = (
        [TextStream(tokenizer, settings.stop_strings, prompt) for _ in range(rows)]
        if settings.stop_strings and tokenizer is not None
        else None
    )

    # history holds every token (prompt + generated) so a full cache can slide.
    history = torch.empty(
        rows, len(prompt) + settings.max_new_tokens, dtype=torch.long, device=device
    )
    history[:, : len(prompt)] = torch.tensor(prompt, dtype=torch.long, device=device)
    length = len(prompt)
    seen = None
    if settings.repetition_penalty != 1.0:
        seen = torch.zeros(rows, model.vocab_size, dtype=torch.bool, device=device)
        seen[:, history[0, :length]] = True

    cache = model.new_kv_cache(rows)
    logits = model(history[:, :length], kv_cache=cache, last_only=True)[:, -1]
    step = DecodeStep.for_model(model)
    outputs: list[list[int]] = [[] for _ in range(rows)]
    active = [True] * rows
    for _ in range(settings.max_new_tokens):
        throttle_point()
        next_ids = choose_next(logits, settings, generator, seen)
        history[:, length] = next_ids
        length += 1
        if seen is not None:
            seen.scatter_(1, next_ids.unsqueeze(1), True)
        for row, token in enumerate(next_ids.tolist()):
            if not active[row]:
                continue
            if token in stop_ids:
                active[row] = False
                continue
            outputs[row].append(token)
            if on_token is not None:
                on_token(row, token)
            if streams is not None:
                streams[row].push(token)
                if streams[row].stopped:
                    active[row] = False
        if not any(active) or length == history.shape[1]:
            break
        if cache.length == cache.max_len:
            logits = slide_window(model, cache, history[:, :length])
        else:
            logits = step(next_ids, cache)
    if streams is not None:
        outputs = [stream.ids_before_stop() for stream in streams]
    return outputs
