"""Sampled continuations of many prompts, several each, decoded as one batch: RL's rollouts.

An RL iteration samples 16 prompts (PPO: one response each; GRPO: a group of 8 each). Decoded a
prompt at a time, the model runs 16 small batches one after another and the per-step overhead is
paid 16 times; here every response of every prompt rides in one batch (`greedy.greedy_complete`'s
ragged-prompt layout: every row starts at position 0, the shared prefill covers the shortest
prompt, a row whose prompt is longer is fed its own prompt tokens until it is used up).

Each prompt's rows draw from their own generator, seeded by the caller, exactly as a separate
`generation.sample` call of that prompt draws: one `choose_next` over the group's rows per step
once the group is past its prompt. So the draws are the ones a prompt-at-a-time rollout makes for
the same seeds; the logits themselves differ only by float summation order (a prompt's tail is
fed a token a step instead of in one prefill).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from minigpt_cli.engine.inference.generation import (
    SamplingSettings,
    choose_next,
    make_generator,
    model_device,
)
from minigpt_cli.engine.model.gpt import GPT
from minigpt_cli.engine.model.layers import reuse_stacked_weights
from minigpt_cli.engine.model.stepper import DecodeStep
from minigpt_cli.engine.resources.governor import throttle_point


@torch.inference_mode()
@reuse_stacked_weights()
def sample_groups(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    settings: SamplingSettings,
    samples_per_prompt: int,
    seeds: Sequence[int],
) -> list[list[list[int]]]:
    """`samples_per_prompt` continuations of each prompt: result[p][s] is sample s of prompt p.

    Stop ids end a row and are not returned; `settings.seed`, stop strings, repetition penalty
    and beams are not used (rollouts need none of them): `seeds[p]` seeds prompt p's draws.
    Every prompt must fit the context with `max_new_tokens` after it (the caller cuts prompts).
    """
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts need as many seeds, got {len(seeds)}")
    if not prompts:
        return []
    group = int(samples_per_prompt)
    lengths = [len(prompt) for prompt in prompts]
    if min(lengths) < 1:
        raise ValueError("every prompt needs at least one token")
    budget = int(settings.max_new_tokens)
    total = max(lengths) + budget
    if total > model.config.context_length:
        raise ValueError(
            f"a {max(lengths)}-token prompt and {budget} new tokens exceed the "
            f"{model.config.context_length}-token context"
        )
    device = model_device(model)
    rows = len(prompts) * group
    history = torch.zeros(rows, total, dtype=torch.long, device=device)
    for index, prompt in enumerate(prompts):
        ids = torch.tensor([int(t) for t in prompt], dtype=torch.long, device=device)
        history[index * group : (index + 1) * group, : len(prompt)] = ids
    generators = [make_generator(device, int(seed)) for seed in seeds]
    stops = {int(s) for s in settings.stop_ids}
    was_training = model.training
    model.eval()
    try:
        cache = model.new_kv_cache(rows, max_len=total)
        position = min(lengths)
        logits = model(history[:, :position], kv_cache=cache, last_only=True)[:, -1]
        step = DecodeStep.for_model(model)
        outputs: list[list[int]] = [[] for _ in range(rows)]
        active = [True] * rows
        while True:
            throttle_point()
            next_ids = history[:, position].clone()  # a row still in its prompt: its own token
            for index, length in enumerate(lengths):
                span = slice(index * group, (index + 1) * group)
                if position < length or not any(active[span]):
                    continue
                chosen = choose_next(logits[span], settings, generators[index])
                next_ids[span] = chosen
                for row, token in enumerate(chosen.tolist(), start=index * group):
                    if not active[row]:
                        continue
                    if token in stops:
                        active[row] = False
                        continue
                    outputs[row].append(token)
                    if len(outputs[row]) >= budget:
                        active[row] = False
            if not any(active) or position + 1 >= total:
                break
            history[:, position] = next_ids
            logits = step(next_ids, cache)
            position += 1
    finally:
        model.train(was_training)
    return [outputs[index * group : (index + 1) * group] for index in range(len(prompts))]
