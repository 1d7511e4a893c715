"""`minigpt rlhf`: a reward model trained here, then PPO or GRPO against it (or a rule)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from minigpt_cli.cli import common, finetune
from minigpt_cli.errors import UserError

ALGOS = ("ppo", "grpo")
REWARDS = ("model", "rule", "both")


AlgoOpt = Annotated[
    str | None,
    typer.Option("--algo", help="ppo or grpo (default: grpo with --reward rule|both, else ppo)."),
]
RewardOpt = Annotated[
    str | None,
    typer.Option(
        "--reward",
        help="model (a reward model trained here, default), rule (exact answers) or both.",
    ),
]
RewardModelOpt = Annotated[
    Path | None,
    typer.Option(
        "--reward-model", metavar="DIR", help="Reuse this reward run instead of training."
    ),
]
PreferenceDataOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--preference-data",
        metavar="PATH",
        help="Pairs {prompt, chosen, rejected} for the reward model (default: built-in).",
    ),
]
KlCoefOpt = Annotated[
    float | None,
    typer.Option(
        "--kl-coef",
        help="KL penalty weight; PPO: where the adaptive one starts (default 1.0; "
        "GRPO 0.05). 0: no penalty.",
    ),
]
TargetKlOpt = Annotated[
    float | None,
    typer.Option(
        "--target-kl",
        help="PPO: hold the KL per response under this, nats (default 0.1); 0: --kl-coef fixed.",
    ),
]
GammaOpt = Annotated[float | None, typer.Option("--gamma", help="GAE discount (default 1).")]
LamOpt = Annotated[float | None, typer.Option("--lam", help="GAE lambda (default 0.95).")]
ClipOpt = Annotated[float | None, typer.Option("--clip-eps", help="Ratio clip (default 0.2).")]
PpoEpochsOpt = Annotated[
    int | None,
    typer.Option("--ppo-epochs", min=1, help="Passes over each rollout (default: PPO 2, GRPO 1)."),
]
RolloutOpt = Annotated[
    int | None,
    typer.Option("--rollout-batch-size", min=1, help="Prompts per iteration (default 16)."),
]
NewTokensOpt = Annotated[
    int | None,
    typer.Option("--max-new-tokens", min=1, help="Longest sampled response (default 32)."),
]
TemperatureOpt = Annotated[
    float | None, typer.Option("--temperature", help="Rollout temperature (default 1).")
]
GenerationsOpt = Annotated[
    int | None,
    typer.Option("--num-generations", help="GRPO: responses per prompt, at least 2 (default 8)."),
]


@common.training_verb(
    omit=("max_tokens", "epochs", "compile_model"),
    first=("from_run", "algo", "reward", "reward_model", "preference_data"),
    replace={
        "max_steps": Annotated[
            int | None, typer.Option("--max-steps", help="PPO/GRPO iterations (default 30).")
        ]
    },
    launchable=True,
)
def rlhf(
    flags: common.TrainingFlags,
    from_run: finetune.FromOpt = None,
    algo: AlgoOpt = None,
    reward: RewardOpt = None,
    reward_model: RewardModelOpt = None,
    preference_data: PreferenceDataOpt = None,
    kl_coef: KlCoefOpt = None,
    target_kl: TargetKlOpt = None,
    gamma: GammaOpt = None,
    lam: LamOpt = None,
    clip_eps: ClipOpt = None,
    ppo_epochs: PpoEpochsOpt = None,
    rollout_batch_size: RolloutOpt = None,
    max_new_tokens: NewTokensOpt = None,
    temperature: TemperatureOpt = None,
    num_generations: GenerationsOpt = None,
    lora: finetune.LoraOpt = False,
    merge: finetune.MergeOpt = False,
) -> None:
    """Reinforcement learning from feedback: PPO (or GRPO) against a reward, with a KL leash.

    With --reward model (default) a reward model is first trained here on preference pairs
    (Bradley-Terry) into the run's reward/ folder; rule scores exact answers of prompts that have
    one. Prompts: {"prompt", "answer"?} JSONL; with no --data, the built-in prompts.
    """
    from minigpt_cli.config.schema import default_algorithm
    from minigpt_cli.engine.runs.files import REWARD_DIR
    from minigpt_cli.engine.stages.rlhf import RlhfInputs, run_rlhf

    own = {
        "algo": algo,
        "reward": reward,
        "kl_coef": kl_coef,
        "target_kl": target_kl,
        "gamma": gamma,
        "lam": lam,
        "clip_eps": clip_eps,
        "ppo_epochs": ppo_epochs,
        "rollout_batch_size": rollout_batch_size,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "num_generations": num_generations,
    }
    if algo is not None and algo not in ALGOS:
        raise UserError(f"--algo must be one of {', '.join(ALGOS)}, got {algo!r}")
    if reward is not None and reward not in REWARDS:
        raise UserError(f"--reward must be one of {', '.join(REWARDS)}, got {reward!r}")
    chosen_algo = algo or _saved_algo(flags.out, flags.resume) or default_algorithm(reward)
    finetune.run_finetune(
        "rlhf",
        run_rlhf,
        flags,
        from_run=from_run,
        own=own,
        lora=lora,
        lora_options={},
        merge=merge,
        run_name=f"rlhf-{chosen_algo}",
        extra_inputs={
            "preference_data": list(preference_data or []),
            "reward_model": reward_model,
        },
        inputs_type=RlhfInputs,
        # Killed before the policy's first checkpoint, --resume continues the reward model's.
        sub_run=REWARD_DIR,
    )


def _saved_algo(out: Path | None, resume: bool) -> str | None:
    """On --resume --out DIR without --algo: the algorithm the run's config names."""
    from minigpt_cli.config.loader import RUN_CONFIG_FILE, read_run_config

    if not (resume and out is not None and (out / RUN_CONFIG_FILE).is_file()):
        return None
    return read_run_config(out).rlhf.algorithm


def register(app: typer.Typer) -> None:
    """Add `rlhf` to the CLI."""
    app.command("rlhf")(rlhf)
