"""RLHF end to end: reward rises under PPO and GRPO, the KL leash holds, runs resume exactly,
and the reward model trained here beats chance on held-out pairs."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from minigpt_cli.config.loader import load_config
from minigpt_cli.engine.core.seeding import seed_everything
from minigpt_cli.engine.data.stage_records import builtin_records
from minigpt_cli.engine.hardware.device import resolve_precision
from minigpt_cli.engine.metrics.exact_match import rule_scores
from minigpt_cli.engine.metrics.rewards import RewardSource
from minigpt_cli.engine.model.heads import PolicyWithValue
from minigpt_cli.engine.objectives.policy import Reference
from minigpt_cli.engine.runs.load import load_run
from minigpt_cli.engine.stages.rlhf import RlStage, rl_settings
from minigpt_cli.engine.training.run_spec import RunSpec
from minigpt_cli.engine.training.trainer import Trainer
from tests.conftest import RLHF_SETS, run_cli, set_args
from tests.test_sft_cmd import FP32, rows


class DigitShare(RewardSource):
    """A reward a barely trained model already earns sometimes: the share of digits it writes."""

    def terms(self, records, sequences, responses):  # type: ignore[no-untyped-def]
        share = [sum(c.isdigit() for c in text) / max(len(text), 1) for text in responses]
        return {"digits": torch.tensor(share)}


def _train(
    run: Path,
    tmp_path: Path,
    algo: str,
    iterations: int,
    learning_rate: float = 2e-3,
    **settings_changes: Any,
) -> list[dict]:
    """`iterations` of PPO or GRPO on the DigitShare reward, in process; the [rlhf] defaults
    except for small shapes, the learning rate (high by default: the reward moves in a few
    iterations) and `settings_changes`."""
    torch.set_num_threads(1)
    loaded = load_run(run)
    config = load_config("tiny", sets=["log.plot=false", "train.log_every=1"])
    config.model = loaded.config.model
    config.rlhf.max_steps = iterations
    config.rlhf.learning_rate = config.rlhf.min_lr = learning_rate
    config.rlhf.eval_every = config.rlhf.save_every = 1000
    config.rlhf.global_batch_size = config.rlhf.micro_batch_size = 8
    shapes: dict[str, Any] = {
        "algo": algo,
        "rollout_batch_size": 8 if algo == "ppo" else 4,
        "num_generations": 4,
        "ppo_epochs": 2,
        "max_new_tokens": 8,
        "samples_every": 0,
        "eval_prompts": 4,
    }
    settings = replace(rl_settings(config), **{**shapes, **settings_changes})
    records = builtin_records("rlhf", "train", 64, 0)
    seed_everything(0)
    policy = loaded.model.train().requires_grad_(True)
    model = PolicyWithValue(policy) if algo == "ppo" else policy
    stage = RlStage(
        records,
        records[:4],
        tokenizer=loaded.tokenizer,
        reward=DigitShare("rule"),
        reference=Reference(policy),
        settings=settings,
        seed=0,
        global_batch_size=8,
        seq_len=policy.config.context_length,
    )
    events: list = []
    Trainer(
        config,
        stage,
        model,
        RunSpec(run_dir=tmp_path / algo),
        device=torch.device("cpu"),
        precision=resolve_precision("fp32", torch.device("cpu"), measurements={}),
        on_event=events.append,
        vocab_size=policy.vocab_size,
        micro_batch_size=8,
    ).fit()
    return [e.data for e in events if e.kind == "step"]


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_reinforcement_raises_the_reward_and_the_kl_leash_holds(
    tiny_pretrain_run: Path, tmp_path: Path, algo: str
) -> None:
    steps = _train(tiny_pretrain_run, tmp_path, algo, iterations=12, kl_coef=0.05, target_kl=0)
    assert len(steps) == 12  # one train row per iteration
    rewards = [s["reward_mean"] for s in steps]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > 2 * first + 0.02, rewards
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as the reference
    assert all(abs(s["kl"]) < s["response_len"] for s in steps)  # under 1 nat per token
    assert {"entropy", "clip_frac", "response_len"} <= steps[-1].keys()
    assert ("value_loss" in steps[-1]) == (algo == "ppo")


class AutocastSeen(DigitShare):
    """DigitShare that notes whether each scoring ran under CPU autocast."""

    seen: list[bool]

    def terms(self, records, sequences, responses):  # type: ignore[no-untyped-def]
        self.seen.append(torch.is_autocast_enabled("cpu"))
        return super().terms(records, sequences, responses)


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_a_rollout_scores_in_the_precision_the_losses_train_in(
    tiny_pretrain_run: Path, algo: str
) -> None:
    """The reward, the reference's log-probs and PPO's old log-probs come from the same
    arithmetic as the loss's forward (here bf16 autocast), not from fp32 beside a bf16 loss."""
    torch.set_num_threads(1)
    loaded = load_run(tiny_pretrain_run)
    shapes = {"rollout_batch_size": 4, "num_generations": 4, "ppo_epochs": 1, "max_new_tokens": 8}
    settings = replace(rl_settings(load_config("tiny")), algo=algo, samples_every=0, **shapes)
    records = builtin_records("rlhf", "train", 16, 0)
    policy = loaded.model
    reward = AutocastSeen("rule")
    reward.seen = []

    def bf16() -> Any:
        return torch.autocast("cpu", dtype=torch.bfloat16)

    stage = RlStage(
        records,
        records[:4],
        tokenizer=loaded.tokenizer,
        reward=reward,
        reference=Reference(policy),
        settings=settings,
        seed=0,
        global_batch_size=4 if algo == "ppo" else 16,
        seq_len=policy.config.context_length,
        autocast=bf16,
    )
    stage.rollout(PolicyWithValue(policy) if algo == "ppo" else policy)
    buffer = stage.buffer
    assert buffer is not None and reward.seen == [True]
    with bf16():
        in_bf16 = stage.reference.logps(buffer)
    in_fp32 = stage.reference.logps(buffer)
    assert torch.equal(buffer["ref_logps"], in_bf16)
    assert not torch.equal(buffer["ref_logps"], in_fp32)  # the two precisions do differ here
    if algo == "ppo":  # the policy is still its reference: the same numbers, a KL of exactly 0
        assert torch.equal(buffer["old_logps"], buffer["ref_logps"])


def test_the_default_kl_control_keeps_the_kl_under_its_target(
    tiny_sft_run: Path, tmp_path: Path
) -> None:
    """Issue 14: PPO's default KL control (the [rlhf] defaults: the ceiling controller, its
    target, horizon and starting coefficient, at PPO's default learning rate and rollout size)
    keeps the KL under its target on a reward it can chase (the share of digits), raising the
    coefficient when the KL crosses it and never lowering it below its start; with the penalty
    off the same run's KL is over ten times the target.

    Compared: the mean KL per response over the last 10 of 40 iterations (one iteration's KL is
    an estimate from 16 responses and scatters: single iterations go over the target, which is
    what raises the coefficient). Measured when the defaults were set: about 0.06 against the
    target 0.1 (the coefficient up to about 1.5), 0.09 with the coefficient fixed at 1.0, 2.7
    with no penalty."""
    config = load_config("tiny")
    defaults = config.rlhf
    assert defaults.target_kl and defaults.algorithm == "ppo"  # PPO's default: adaptive
    common: dict[str, Any] = {
        "learning_rate": config.stage_train("rlhf").learning_rate,  # PPO's own default
        "rollout_batch_size": defaults.rollout_batch_size,
    }

    def tail_kl(steps: list[dict]) -> float:
        return sum(s["kl"] for s in steps[-10:]) / 10

    controlled = _train(tiny_sft_run, tmp_path / "default", "ppo", 40, **common)
    free = _train(tiny_sft_run, tmp_path / "off", "ppo", 40, kl_coef=0.0, **common)
    assert tail_kl(controlled) < defaults.target_kl, [round(s["kl"], 3) for s in controlled]
    start = controlled[0]["kl_coef"]
    assert max(s["kl_coef"] for s in controlled) > 1.2 * start  # raised when the KL crossed it
    assert min(s["kl_coef"] for s in controlled) == start  # and never lowered below the start
    assert tail_kl(free) > 10 * defaults.target_kl, [round(s["kl"], 3) for s in free]


def test_rule_reward_scores_normalised_exact_answers() -> None:
    records = [{"answer": "Paris"}, {"answer": "155"}, {"answer": "红色"}]
    assert rule_scores(records, ["  paris ", "154", "红色"]).tolist() == [1.0, 0.0, 1.0]


def test_rule_reward_marks_each_step_of_a_worked_answer() -> None:
    worked = {"answer": "7+8=15, 4+5+1=10, so 105"}
    zh = {"answer": "7+8=15，4+5+1=10，所以是105"}
    responses = [
        "7+8=15, 4+5+1=10, so 105",  # right
        "7+8=15, 4+5+1=11, so 115",  # one step wrong, and the total with it: 1 of 3 steps
        "7+8=15, 4+5+1=10, so 104",  # the total copied wrong: 2 of 3
        "105",  # the bare total: no step in place
        "7+8=15, 4+5+1=10, so 105, so 105",  # a step too many: 3 of 4
    ]
    scores = rule_scores([worked] * len(responses), responses).tolist()
    assert scores == pytest.approx([1.0, 1 / 3, 2 / 3, 0.0, 3 / 4])
    assert rule_scores([zh], ["7+8=15，4+5+1=11，所以是115"]).tolist() == pytest.approx([1 / 3])
    # A one-step answer stays all or nothing, however close.
    assert rule_scores([{"answer": "quack"}], ["quack, quack"]).tolist() == [0.0]


def _rlhf(parent: Path, out: Path, *extra: str) -> None:
    sets = [
        *RLHF_SETS,
        "reward.max_steps=40",
        "reward.eval_every=20",
    ]
    result = run_cli("rlhf", "--from", parent, "--out", out, *FP32, *set_args(sets), *extra)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ppo_run_contract_and_exact_resume_after_a_kill(tiny_sft_run: Path, tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    extra = ["--algo", "ppo", "--reward", "rule", "--max-steps", "4", "--set", "rlhf.save_every=2"]
    extra += ["--set", "train.keep_last=3"]
    _rlhf(tiny_sft_run, straight, *extra)
    train = rows(straight, "train")
    assert [r["step"] for r in train] == [2, 4, 6, 8]  # 2 optimizer steps per iteration
    assert {"reward_mean", "kl", "entropy", "value_loss", "clip_frac", "response_len"} <= train[
        0
    ].keys()
    assert rows(straight, "eval")[0]["step"] == 0  # the baseline before any update
    final = rows(straight, "eval")[-1]
    assert {"reward_mean", "response_len", "distinct_2", "exact_match/addition"} <= final.keys()
    assert (straight / "value_head.safetensors").exists()
    assert load_run(straight).state["chat"] is True  # generate/chat load it as a language model

    died = tmp_path / "died"
    shutil.copytree(straight, died)
    for name in ("model.safetensors", "optimizer.safetensors", "value_head.safetensors"):
        (died / name).unlink()
    (died / "trainer_state.json").unlink()
    shutil.rmtree(died / "checkpoints" / "step-00000008")
    result = run_cli("rlhf", "--out", died, "--resume")
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("model.safetensors", "value_head.safetensors"):
        first, second = load_file(str(straight / name)), load_file(str(died / name))
        for key in first:
            assert first[key].equal(second[key]), (name, key)
    assert [r["reward_mean"] for r in rows(died, "train")] == [r["reward_mean"] for r in train]


def test_the_reward_model_beats_chance_on_held_out_pairs(
    tiny_sft_run: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "grpo"
    # 32 held-out pairs (8 would make one pair 12 points of accuracy).
    _rlhf(
        tiny_sft_run,
        run_dir,
        *("--algo", "grpo", "--max-steps", "1", "--rollout-batch-size", "2"),
        *("--set", "reward.eval_batches=8"),
    )
    reward_evals = rows(run_dir / "reward", "eval")
    assert reward_evals[-1]["pref_accuracy"] > 0.6  # chance is 0.5; ties count as wrong
    state = json.loads((run_dir / "trainer_state.json").read_text())
    assert state["sources"]["reward_model"] == str(run_dir / "reward")
    evals = rows(run_dir, "eval")
    assert evals[0]["step"] == 0 and all(math.isfinite(r["reward_mean"]) for r in evals)


def test_unknown_algorithm_is_a_one_line_error(tiny_sft_run: Path, tmp_path: Path) -> None:
    result = run_cli("rlhf", "--from", tiny_sft_run, "--algo", "a2c", "--out", tmp_path / "x")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --algo must be one of ppo, grpo, got 'a2c'"
