"""Beam search over the KV cache: the most likely continuation rather than a sampled one.

Deterministic, for `--num-beams N` (`decode.generate_batch` picks it when `num_beams > 1`). It
shares the prompt fitting and the sliding window of the cache with sampling (`generation`), and
`num_beams=1` is greedy decoding there, as in Hugging Face.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from minigpt_cli.engine.inference.generation import (
    SamplingSettings,
    fit_prompt,
    model_device,
    sample,
    slide_window,
)
from minigpt_cli.engine.model.layers import reuse_stacked_weights
from minigpt_cli.engine.model.stepper import DecodeStep
from minigpt_cli.errors import UserError

if TYPE_CHECKING:
    from minigpt_cli.engine.model.gpt import GPT


def _length_normalised(score: float, length: int, length_penalty: float) -> float:
    return score / (length**length_penalty)


@torch.inference_mode()
@reuse_stacked_weights()
def beam_search(
    model: GPT,
    prompt_ids: Sequence[int],
    num_beams: int,
    max_new_tokens: int,
    length_penalty: float = 1.0,
    eos_ids: Sequence[int] = (),
) -> list[int]:
    """The highest-scoring continuation found by beam search (eos not included).

    A hypothesis scores `sum(log p) / length ** length_penalty` as in Hugging Face, where `length`
    counts the new tokens including the eos that ended it (so an immediate eos is length 1, never a
    division by zero). Each step considers the 2·num_beams best extensions: those ending in an
    eos become finished hypotheses (the best `num_beams` are kept), the best `num_beams` others
    continue.
    The search stops when no running beam can still beat the worst kept hypothesis (an exact bound:
    log-probabilities only lower a sum) or after `max_new_tokens`. `num_beams=1` is greedy decoding,
    as in HF.
    """
    if num_beams < 1:
        raise UserError(f"num_beams must be at least 1, got {num_beams}")
    if num_beams == 1:
        greedy = SamplingSettings(
            max_new_tokens=max_new_tokens,
            greedy=True,
            top_k=None,
            top_p=None,
            stop_ids=tuple(eos_ids),
        )
        return sample(model, prompt_ids, greedy)[0]
    was_training = model.training
    model.eval()
    try:
        return _beam_loop(model, prompt_ids, num_beams, max_new_tokens, length_penalty, eos_ids)
    finally:
        model.train(was_training)


def _beam_loop(
    model: GPT,
    prompt_ids: Sequence[int],
    beams: int,
    max_new_tokens: int,
    length_penalty: float,
    eos_ids: Sequence[int],
) -> list[int]:
    device = model_device(model)
    prompt = fit_prompt(model, prompt_ids)
    eos = set(int(i) for i in eos_ids)
    vocab = model.vocab_size
    history = torch.empty(beams, len(prompt) + max_new_tokens, dtype=torch.long, device=device)
    history[:, : len(prompt)] = torch.tensor(prompt, dtype=torch.long, device=device)
    length = len(prompt)
    cache = model.new_kv_cache(beams)
    logits = model(history[:, :length], kv_cache=cache, last_only=True)[:, -1]
    decode_step = DecodeStep.for_model(model)
    # Only beam 0 is real at the start (the others are copies of it with score -inf).
    scores = torch.full((beams,), float("-inf"), device=device)
    scores[0] = 0.0
    finished: list[tuple[float, int, list[int]]] = []  # min-heap of (score, tiebreak, tokens)
    counter = 0

    def add_finished(score: float, tokens: list[int]) -> None:
        nonlocal counter
        counter += 1
        item = (score, -counter, tokens)
        if len(finished) < beams:
            heapq.heappush(finished, item)
        elif score > finished[0][0]:
            heapq.heapreplace(finished, item)

    for step in range(max_new_tokens):
        new_len = step + 1
        logprobs = F.log_softmax(logits.float(), dim=-1)
        candidates = (scores.unsqueeze(1) + logprobs).view(-1)
        top_scores, top_index = candidates.topk(min(2 * beams, candidates.numel()))
        survivors: list[tuple[float, int, int]] = []
        for score, index in zip(top_scores.tolist(), top_index.tolist(), strict=True):
            if score == float("-inf"):
                break
            beam, token = divmod(index, vocab)
            if token in eos:
                tokens = history[beam, len(prompt) : length].tolist()
                add_finished(_length_normalised(score, new_len, length_penalty), tokens)
            elif len(survivors) < beams:
                survivors.append((score, beam, token))
        if not survivors:
            break
        if step == max_new_tokens - 1:
            for score, beam, token in survivors:
                tokens = [*history[beam, len(prompt) : length].tolist(), token]
                add_finished(_length_normalised(score, new_len, length_penalty), tokens)
            break
        if len(finished) == beams:
            best_running = survivors[0][0]
            # A running beam's sum can only fall; its length ends between new_len + 1 and the
            # maximum, and the normalised score of a fixed negative sum is monotone in length.
            bound = max(
                _length_normalised(best_running, new_len + 1, length_penalty),
                _length_normalised(best_running, max_new_tokens, length_penalty),
            )
            if bound <= finished[0][0]:
                break
        while len(survivors) < beams:  # fewer real candidates than beams (tiny vocabularies)
            survivors.append((float("-inf"), survivors[0][1], survivors[0][2]))
        rows = torch.tensor([beam for _, beam, _ in survivors], device=device)
        next_ids = torch.tensor([token for _, _, token in survivors], device=device)
        scores = torch.tensor([score for score, _, _ in survivors], device=device)
        history[:, :length] = history[rows, :length]
        history[:, length] = next_ids
        length += 1
        cache.reorder(rows)
        if cache.length == cache.max_len:
            logits = slide_window(model, cache, history[:, :length])
        else:
            logits = decode_step(next_ids, cache)
    if not finished:
        return []
    best = max(finished, key=lambda item: (item[0], item[1]))
    return best[2]
