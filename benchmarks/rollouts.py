"""RL rollouts: every prompt's responses in one batch against a prompt at a time, same draws.

`RlStage._sample` decodes an iteration's prompts together (`inference/rollouts.sample_groups`);
the peer is what it did before, one `generate_batch` call per prompt with that prompt's seed.
Both run in this process on the same model and prompts, interleaved, for `--iterations`
iterations of the `[rlhf]` defaults (PPO: 16 prompts of 1 response; GRPO: 16 groups of 8), and
the script checks that both drew the same tokens (the batched decode must not change what RL
trains on) before it prints the wall-clock seconds of each and the median ratio.

    python benchmarks/rollouts.py --from runs/quickstart-tiny/sft --algo grpo --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minigpt_cli.config.loader import load_config  # noqa: E402
from minigpt_cli.engine.data import chat_template  # noqa: E402
from minigpt_cli.engine.data.stage_records import builtin_records  # noqa: E402
from minigpt_cli.engine.inference.decode import generate_batch  # noqa: E402
from minigpt_cli.engine.inference.generation import SamplingSettings  # noqa: E402
from minigpt_cli.engine.metrics.rewards import RewardSource  # noqa: E402
from minigpt_cli.engine.objectives.policy import Reference  # noqa: E402
from minigpt_cli.engine.runs.load import load_run  # noqa: E402
from minigpt_cli.engine.stages.rlhf import RlStage, rl_settings  # noqa: E402


def prompt_at_a_time(stage: RlStage, policy: torch.nn.Module, indices: list[int]) -> list:
    """The rollout as it was: one `generate_batch` call per prompt, seeded as `_sample` seeds."""
    settings = stage.settings
    responses = []
    for number, index in enumerate(indices):
        seed = np.random.default_rng([stage.seed, stage.iteration, number]).integers(2**31)
        sampling = SamplingSettings(
            max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            top_k=None,
            top_p=None,
            stop_ids=chat_template.stop_token_ids(stage.tokenizer),
            seed=int(seed),
        )
        for tokens in generate_batch(
            policy, stage.prompts[index], sampling, stage.samples_per_prompt
        ):
            if len(tokens) < settings.max_new_tokens:
                tokens = [*tokens, stage.tokenizer.eot_id]
            responses.append((index, tokens or [stage.tokenizer.eot_id]))
    return responses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="run", required=True, help="a chat run (e.g. an SFT run)")
    parser.add_argument("--algo", choices=["ppo", "grpo"], default="grpo")
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_run(args.run)
    config = load_config("tiny")
    config.model = loaded.config.model
    config.rlhf.algo = args.algo
    settings = rl_settings(config)
    records = builtin_records("rlhf", "train", 512, 0)
    policy = loaded.model.eval()
    responses = settings.rollout_batch_size * (
        settings.num_generations if args.algo == "grpo" else 1
    )
    stage = RlStage(
        records,
        records[:4],
        tokenizer=loaded.tokenizer,
        reward=RewardSource("rule"),
        reference=Reference(policy),
        settings=settings,
        seed=0,
        global_batch_size=responses,
        seq_len=policy.config.context_length,
    )
    seconds: dict[str, list[float]] = {"prompt at a time": [], "one batch": []}
    tokens = 0
    for iteration in range(args.iterations):
        stage.iteration = iteration
        indices = stage._next_prompts()
        start = time.perf_counter()
        alone = prompt_at_a_time(stage, policy, indices)
        seconds["prompt at a time"].append(time.perf_counter() - start)
        start = time.perf_counter()
        batched = stage._sample(policy, indices, range(len(indices)))
        seconds["one batch"].append(time.perf_counter() - start)
        if batched != alone:
            raise SystemExit(f"iteration {iteration}: the batched rollout drew other tokens")
        tokens += sum(len(ids) for _, ids in batched)
    print(
        f"{args.algo}, {responses} responses an iteration, {args.threads} thread(s), "
        f"{args.iterations} iterations, {tokens} response tokens, the same tokens both ways"
    )
    for name, values in seconds.items():
        print(
            f"  {name:17s} median {statistics.median(values):.2f} s "
            f"({min(values):.2f}-{max(values):.2f}) an iteration"
        )
    ratio = statistics.median(seconds["prompt at a time"]) / statistics.median(seconds["one batch"])
    print(f"  one batch is {ratio:.2f}x as fast (medians)")


if __name__ == "__main__":
    main()
