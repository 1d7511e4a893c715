"""Greedy answers to many prompts at once: the batched decoder exact match and `minigpt eval` use.

Separate from `generation`'s sampler because it needs no sampling settings, beams or streaming,
only the argmax continuation of several prompts of different lengths in one batch, and its result
must equal decoding each prompt alone (held-out exact match is compared across runs).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from minigpt_cli.engine.model.gpt import GPT
from minigpt_cli.engine.model.layers import reuse_stacked_weights
from minigpt_cli.engine.model.stepper import DecodeStep


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
@reuse_stacked_weights()
def greedy_complete(
    model: GPT, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: Sequence[int]
) -> list[list[int]]:
    """Greedy continuations of several prompts of different lengths, decoded as one batch.

    No padding and no attention mask are needed: every row starts at position 0, the shared
    prefill covers the shortest prompt, and a row whose prompt is longer is fed its own next
    prompt token (instead of the argmax) until its prompt is used up. Each row therefore sees
    exactly its own tokens, and the result equals decoding it alone (up to float summation order).
    Stop ids end a row and are not returned. Prompts are cut to their last `context -
    max_new_tokens` tokens when prompt plus answer would not fit the context.
    """
    if not prompts:
        return []
    context = int(model.config.context_length)
    budget = max(1, min(int(max_new_tokens), context - 1))
    keep = context - budget
    rows = [[int(t) for t in prompt][-keep:] for prompt in prompts]
    if any(not row for row in rows):
        raise ValueError("every prompt needs at least one token")
    lengths = [len(row) for row in rows]
    total = max(lengths) + budget
    device = _model_device(model)
    history = torch.zeros(len(rows), total, dtype=torch.long, device=device)
    for index, row in enumerate(rows):
        history[index, : len(row)] = torch.tensor(row, dtype=torch.long)
    in_prompt_until = torch.tensor(lengths, device=device)
    stops = {int(s) for s in stop_ids}
    was_training = model.training
    model.eval()
    try:
        cache = model.new_kv_cache(len(rows), max_len=total)
        position = min(lengths)
        logits = model(history[:, :position], kv_cache=cache, last_only=True)[:, -1]
        step = DecodeStep.for_model(model)
        outputs: list[list[int]] = [[] for _ in rows]
        active = [True] * len(rows)
        while True:
            chosen = logits.argmax(dim=-1)
            from_prompt = position < in_prompt_until
            next_ids = torch.where(from_prompt, history[:, position], chosen)
            for index, token in enumerate(next_ids.tolist()):
                if position < lengths[index] or not active[index]:
                    continue
                if token in stops:
                    active[index] = False
                    continue
                outputs[index].append(token)
                if len(outputs[index]) >= budget:
                    active[index] = False
            if not any(active) or position + 1 >= total:
                break
            history[:, position] = next_ids
            logits = step(next_ids, cache)
            position += 1
    finally:
        model.train(was_training)
    return outputs
