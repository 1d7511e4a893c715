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
    outputs: list[list[int]] = [[] for _ in range(rows)]
    active = [True] * rows
    in_batch = list(range(len(prompts)))  # the prompts whose rows the batch holds, in order
    was_training = model.training
    model.eval()
    try:
        cache = model.new_kv_cache(rows, max_len=total)
        position = min(lengths)
        logits = model(history[:, :position], kv_cache=cache, last_only=True)[:, -1]
        step = DecodeStep.for_model(model)
        while True:
            throttle_point()
            batch_rows = _rows_of(in_batch, group, device)
            next_ids = history[batch_rows, position]  # a row still in its prompt: its own token
            for slot, index in enumerate(in_batch):
                span = slice(index * group, (index + 1) * group)
                if position < lengths[index] or not any(active[span]):
                    continue
                chosen = choose_next(
                    logits[slot * group : (slot + 1) * group], settings, generators[index]
                )
                next_ids[slot * group : (slot + 1) * group] = chosen
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
            history[batch_rows, position] = next_ids
            logits = step(next_ids, cache)
            position += 1
            # A prompt whose responses have all stopped leaves the batch once a quarter of the
            # batch is such rows (each compaction copies the cache, so not for every one).
            going = [
                index for index in in_batch if any(active[index * group : (index + 1) * group])
            ]
            if len(in_batch) - len(going) >= max(1, len(in_batch) // 4):
                slots = _rows_of([in_batch.index(index) for index in going], group, device)
                cache.keep_rows(slots)
                logits = logits.index_select(0, slots)
                in_batch = going
    finally:
        model.train(was_training)
    return [outputs[index * group : (index + 1) * group] for index in range(len(prompts))]


def _rows_of(groups: Sequence[int], group: int, device: torch.device) -> torch.Tensor:
    """The row numbers of groups `groups` (each `group` consecutive rows), in order."""
    starts = torch.tensor(list(groups), dtype=torch.long, device=device) * group
    return (starts[:, None] + torch.arange(group, device=device)).reshape(-1)


def pack_responses(
    prompts: Sequence[Sequence[int]], responses: Sequence[tuple[int, list[int]]], pad_id: int
) -> dict[str, torch.Tensor]:
    """An RL rollout as the tensors its losses read: each (prompt number, response ids) as one
    right-padded sequence (`ids`), the positions of its response tokens in it (`positions`,
    padded with the last one) and which of those are real (`mask`), and the prompt numbers
    (`record`)."""
    rows, positions, masks = [], [], []
    width = max(len(prompts[i]) + len(r) for i, r in responses)
    longest = max(len(r) for _, r in responses)
    for index, response in responses:
        prompt = prompts[index]
        rows.append([*prompt, *response] + [pad_id] * (width - len(prompt) - len(response)))
        span = list(range(len(prompt), len(prompt) + len(response)))
        pad = [span[-1]] * (longest - len(span))
        positions.append(span + pad)
        masks.append([True] * len(span) + [False] * len(pad))
    return {
        "ids": torch.tensor(rows, dtype=torch.long),
        "positions": torch.tensor(positions, dtype=torch.long),
        "mask": torch.tensor(masks, dtype=torch.bool),
        "record": torch.tensor([i for i, _ in responses], dtype=torch.long),
    }
