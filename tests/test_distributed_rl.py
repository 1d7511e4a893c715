"""DPO, the reward model and RLHF under torchrun: two processes (gloo, CPU, one thread each)
train what one process trains on the tiny fixtures, and a resume at the same world size is
bitwise.

DPO and the reward model split each step's pairs like pretraining: their losses and weights must
match the one-process run within 1e-5. RLHF splits each iteration's prompts; the rollout is then
gathered whole on every rank, so every statistic (reward, KL, advantages, the KL controller) is
the whole rollout's. The responses are the same tokens (each prompt draws from its own seed,
whichever rank decodes it), but a rank's forward passes run over fewer rows than one process's,
so their sums may round differently (up to about 1e-6 relative in fp32): the statistics are
compared within `RL_TOLERANCE`, and the token counts exactly.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from benchmarks.crash_consistency import compare_runs, leftover_temporaries
from minigpt_cli.config.loader import load_config
from minigpt_cli.engine.data.stage_records import builtin_records
from minigpt_cli.engine.model.heads import PolicyWithValue
from minigpt_cli.engine.objectives.policy import Reference
from minigpt_cli.engine.runs.load import load_run
from minigpt_cli.engine.stages.rlhf import RlStage, rl_settings
from minigpt_cli.engine.training import distributed
from minigpt_cli.errors import UserError
from tests.conftest import DPO_RUN_FLAGS, DPO_RUN_SETS, RLHF_SETS, run_cli, set_args
from tests.test_distributed import (
    FP32,
    TWO,
    _assert_same_training,
    _both_ranks,
    _launch,
    _rows,
)
from tests.test_dpo import builtin_pairs, make_stage, tiny_model
from tests.test_rlhf import DigitShare

# Rounding of sums over differently sized batches, carried through a few updates: measured up to
# 1.3e-6 relative (benchmarks/ddp_rl_agreement.py), so 1e-4 leaves a wide margin and still fails
# on a real difference (a statistic over one rank's share, a gradient not averaged: the responses
# themselves differ by the second iteration).
RL_TOLERANCE = 1e-4
# The KL is a difference of two log-probability sums (tens of nats per response) that nearly
# cancel, so its rounding is absolute, not relative to what is left: 1e-6 nats (measured 6e-8 on
# a KL of 2e-3 at PPO's default rate).
KL_ROUNDING = 1e-6
RL_STATS = ("loss", "reward_mean", "kl", "kl_coef", "entropy", "response_len", "clip_frac")
RL_STATS += ("value_loss", "approx_kl")

# Micro-batches of 4 responses, two a step (one per rank), a train row every iteration, a rate
# at which the weights move enough in 3 iterations that a gradient not averaged would show.
RL_SETS = [*RLHF_SETS, "rlhf.micro_batch_size=4", "rlhf.log_every=1", "rlhf.eval_every=3"]
RL_SETS += ["rlhf.learning_rate=1e-3"]
# PPO against a reward model trained here for 10 steps: 8 prompts, 2 passes, 3 iterations.
PPO = ["--algo", "ppo", "--reward", "model", "--max-steps", "3"]
REWARD_SETS = ["reward.max_steps=10", "reward.log_every=1", "reward.eval_every=5"]
# GRPO against that reward model: 2 prompts x 8 responses an iteration (one group per rank), 2
# optimizer steps of 8 responses, 3 iterations (a --set beats a flag: the prompts are set).
GRPO = ["--algo", "grpo", "--reward", "model", "--max-steps", "3"]
GRPO_SETS = [*RL_SETS, "rlhf.rollout_batch_size=2", "rlhf.save_every=2"]


def _same_rl_statistics(reference: Path, trial: Path) -> None:
    want, got = _rows(reference, "train"), _rows(trial, "train")
    assert [r["step"] for r in want] == [r["step"] for r in got] and len(want) == 3
    assert [r["tokens"] for r in want] == [r["tokens"] for r in got]  # the same responses
    for a, b in zip(want, got, strict=True):
        assert b["world_size"] == 2
        for key in RL_STATS:
            if key in a:
                floor = KL_ROUNDING if key == "kl" else 1e-12
                assert b[key] == pytest.approx(a[key], rel=RL_TOLERANCE, abs=floor), (key, a)
    for a, b in zip(_rows(reference, "eval"), _rows(trial, "eval"), strict=True):
        assert b["reward_mean"] == pytest.approx(a["reward_mean"], rel=RL_TOLERANCE)
    for name in ("model.safetensors", "value_head.safetensors"):
        if (reference / name).exists():
            before, after = load_file(str(reference / name)), load_file(str(trial / name))
            for key in before:
                assert (before[key] - after[key]).abs().max() <= 1e-5, (name, key)


# ------------------------------------------------------------------------------------ DPO


@pytest.fixture(scope="module")
def two_process_dpo(tmp_path_factory: pytest.TempPathFactory, tiny_sft_run: Path) -> Path:
    """The shared DPO fixture's run (20 steps, a snapshot every 10) again, under `--nproc 2`."""
    run_dir = tmp_path_factory.mktemp("dpo-2") / "run"
    args = ["--from", tiny_sft_run, "--out", run_dir, *DPO_RUN_FLAGS, *FP32, *TWO]
    result = _launch("dpo", *args, *set_args(DPO_RUN_SETS))
    assert result.stdout.count("checkpoint saved at step 20") == 1  # rank 0 alone reports
    return run_dir


def test_dpo_in_two_processes_trains_what_one_process_trains(
    tiny_dpo_run: Path, two_process_dpo: Path
) -> None:
    one_process_dpo = tiny_dpo_run
    _assert_same_training(one_process_dpo, two_process_dpo)
    state = json.loads((two_process_dpo / "trainer_state.json").read_text())
    # The reference log-probabilities each rank scored half of, gathered: one process's numbers.
    one = json.loads((one_process_dpo / "trainer_state.json").read_text())
    assert state["extra"]["reference_mean"] == one["extra"]["reference_mean"]
    assert state["world_size"] == 2 and len(state["rng_ranks"]) == 2
    assert leftover_temporaries(two_process_dpo) == []


def test_a_two_process_dpo_run_killed_after_a_save_resumes_to_the_same_bytes(
    two_process_dpo: Path, tmp_path: Path
) -> None:
    died = tmp_path / "died"
    shutil.copytree(two_process_dpo, died)
    for name in ("model.safetensors", "optimizer.safetensors", "trainer_state.json"):
        (died / name).unlink()
    shutil.rmtree(died / "checkpoints" / "step-00000020")
    _launch("dpo", "--out", died, "--resume", *TWO)
    assert [r["step"] for r in _rows(died, "event") if r["event"] == "resume"] == [10]
    assert compare_runs(two_process_dpo, died) == []


# ------------------------------------------------------------------------------------ RLHF


def _rlhf(parent: Path, out: Path, *flags: str) -> None:
    _launch("rlhf", "--from", parent, "--out", out, *FP32, "--threads", "1", *flags)


@pytest.fixture(scope="module")
def ppo_runs(tmp_path_factory: pytest.TempPathFactory, tiny_sft_run: Path) -> tuple[Path, Path]:
    """The same PPO run, its reward model trained first, in one process and in two."""
    base = tmp_path_factory.mktemp("ppo")
    flags = [*PPO, *set_args([*RL_SETS, *REWARD_SETS])]
    _rlhf(tiny_sft_run, base / "one", *flags)
    _rlhf(tiny_sft_run, base / "two", *flags, "--nproc", "2")
    return base / "one", base / "two"


@pytest.fixture(scope="module")
def grpo_runs(tiny_sft_run: Path, ppo_runs: tuple[Path, Path]) -> tuple[Path, Path]:
    """The same GRPO run, against the PPO runs' reward model, in one process and in two."""
    base = ppo_runs[0].parent
    flags = [*GRPO, "--reward-model", str(ppo_runs[0] / "reward"), *set_args(GRPO_SETS)]
    _rlhf(tiny_sft_run, base / "grpo-one", *flags)
    _rlhf(tiny_sft_run, base / "grpo-two", *flags, "--nproc", "2")
    return base / "grpo-one", base / "grpo-two"


def test_ppo_and_its_reward_model_in_two_processes_match_one_process(
    ppo_runs: tuple[Path, Path],
) -> None:
    one, two = ppo_runs
    # The reward model trains like any pair stage: within 1e-5 of one process.
    _assert_same_training(one / "reward", two / "reward")
    _same_rl_statistics(one, two)
    rows = _rows(two, "train")
    assert rows[-1]["kl"] != 0 and len({r["reward_mean"] for r in rows}) == 3  # not degenerate


def test_grpo_in_two_processes_matches_the_one_process_statistics(
    grpo_runs: tuple[Path, Path],
) -> None:
    _same_rl_statistics(*grpo_runs)
    assert _rows(grpo_runs[1], "train")[-1]["loss"] != 0  # the groups' rewards differ


def test_a_two_process_grpo_run_killed_after_a_save_resumes_to_the_same_bytes(
    grpo_runs: tuple[Path, Path], tmp_path: Path
) -> None:
    _, straight = grpo_runs
    died = tmp_path / "died"
    shutil.copytree(straight, died)
    for name in ("model.safetensors", "optimizer.safetensors", "trainer_state.json"):
        (died / name).unlink()
    shutil.rmtree(died / "checkpoints" / "step-00000006")  # iteration 3 of 2 steps each
    _launch("rlhf", "--out", died, "--resume", *TWO)
    assert [r["step"] for r in _rows(died, "event") if r["event"] == "resume"] == [4]
    assert compare_runs(straight, died) == []


def test_what_the_ranks_cannot_share_exits_2_in_one_line_before_training(
    tiny_sft_run: Path, tmp_path: Path
) -> None:
    """The reward model's batch is refused by the ranks (under the launcher) before it trains;
    the iteration's prompts, a setting alone, by each rank before the ranks meet."""
    out = tmp_path / "reward-batch"
    args = ["rlhf", "--from", tiny_sft_run, "--out", out, *FP32, *TWO]
    result = run_cli(
        *args,
        *set_args([*RL_SETS, "reward.global_batch_size=12"]),
        env={"OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: 2 processes cannot share a global batch of 12 sequences in micro-batches of 4 "
        "(3 a step, not a multiple of 2): set reward.global_batch_size to a multiple of 8 "
        "(micro-batch 4 x 2 processes), or reward.micro_batch_size to 3"
    ]
    assert not (out / "reward" / "metrics.jsonl").exists()

    # Each rank as torchrun starts it, with a port no rank ever reaches: both refuse before the
    # rendezvous (a rank that waited for the other would hang until the timeout), rank 0 says why.
    out = tmp_path / "prompts"
    args = ["rlhf", "--from", tiny_sft_run, "--out", out, *FP32, "--threads", "1"]
    args += set_args([*RL_SETS, "rlhf.rollout_batch_size=1"])
    (_, err0), (out1, err1) = _both_ranks(args, {"OMP_NUM_THREADS": "1"})
    assert err0.strip().splitlines() == [
        "error: 2 processes share each iteration's prompts: set rlhf.rollout_batch_size (now 1) "
        "to at least that"
    ]
    assert (out1 + err1).strip() == ""
    assert not out.exists()


# ------------------------------------------------------------------------------ in process


def test_only_quickstart_refuses_a_world_size_above_one() -> None:
    for verb in ("pretrain", "sft", "dpo", "reward", "rlhf"):
        distributed.refuse_unsupported(verb, None, 2)
        distributed.refuse_unsupported(verb, "10m", 2)  # rank 0's clock decides for every rank
    with pytest.raises(UserError, match="quickstart does not run under several processes"):
        distributed.refuse_unsupported("quickstart", None, 2)


def test_shares_cover_every_item_once_in_rank_order(monkeypatch: pytest.MonkeyPatch) -> None:
    def shares(count: int, world: int) -> list[range]:
        found = []
        for rank in range(world):
            monkeypatch.setattr(distributed, "_active", distributed.Ranks(rank, world))
            found.append(distributed.share(count))
        return found

    assert shares(5, 2) == [range(0, 2), range(2, 5)]
    assert [i for part in shares(7, 3) for i in part] == list(range(7))
    monkeypatch.setattr(distributed, "_active", distributed.SINGLE)
    assert distributed.share(4) == range(4)
    assert distributed.gather_lists([1, 2]) == [1, 2]
    assert distributed.weighted_mean(0.5, 3.0) == 0.5


@pytest.mark.usefixtures("one_thread")
def test_each_rank_scores_only_its_share_of_the_dpo_reference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rank r of 2 scores its half of the chunks; what the gather assembles is one process's."""
    pairs = builtin_pairs(10)  # chunks of 4 pairs: training 4 + 4 + 2, held-out 4
    whole = make_stage(pairs, pairs[:4])
    whole.cache_reference(tiny_model(), batch_pairs=4)
    shares: dict[int, list] = {}
    scored: dict[int, list[int]] = {}
    for rank in (0, 1):
        stage = make_stage(pairs, pairs[:4])
        scored[rank] = []

        def counting(
            model: torch.nn.Module,
            chunk: list,
            context: Any,
            rank: int = rank,
            score: Any = stage._score,
        ) -> Any:
            scored[rank].append(len(chunk))
            return score(model, chunk, context)

        def gather(items: list, rank: int = rank) -> list:
            shares[rank] = items  # rank 0 runs first: rank 1 receives its share
            return [*shares.get(0, []), *items] if rank == 1 else items

        monkeypatch.setattr(stage, "_score", counting)
        monkeypatch.setattr(distributed, "_active", distributed.Ranks(rank, 2))
        monkeypatch.setattr(distributed, "gather_lists", gather)
        stage.cache_reference(tiny_model(), batch_pairs=4)
    assert scored == {0: [4, 4], 1: [2, 4]}  # each chunk once in the job
    assert torch.equal(stage.reference_train, whole.reference_train)
    assert torch.equal(stage.reference_val, whole.reference_val)


def _rl_stage(run: Path, algo: str) -> tuple[RlStage, torch.nn.Module]:
    """4 prompts an iteration (GRPO: 4 responses each) against the digit-share reward."""
    loaded = load_run(run)
    config = load_config("tiny")
    shapes = {"algo": algo, "rollout_batch_size": 4, "num_generations": 4, "max_new_tokens": 8}
    settings = replace(rl_settings(config), **shapes)
    records = builtin_records("rlhf", "train", 64, 0)
    policy = loaded.model.eval()
    stage = RlStage(
        records,
        records[:4],
        tokenizer=loaded.tokenizer,
        reward=DigitShare("rule"),
        reference=Reference(policy),
        settings=settings,
        seed=0,
        global_batch_size=4,
        seq_len=policy.config.context_length,
    )
    return stage, PolicyWithValue(policy) if algo == "ppo" else policy


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_each_rank_rolls_out_only_its_prompts_and_all_hold_the_whole_rollout(
    tiny_pretrain_run: Path, monkeypatch: pytest.MonkeyPatch, algo: str
) -> None:
    """Rank 1 of 2, with rank 0's shares delivered by a fake gather, samples and scores only its
    2 prompts and ends with one process's buffer and statistics."""
    whole, model = _rl_stage(tiny_pretrain_run, algo)
    whole.rollout(model)
    sampled: dict[int, list[range]] = {}
    delivered: list[Any] = []  # rank 0's shares, in the order its rollout gathered them
    for rank in (0, 1):
        stage, model = _rl_stage(tiny_pretrain_run, algo)
        sample = stage._sample
        sampled[rank] = []

        def counting(model: Any, indices: list, numbers: range, rank: int = rank) -> Any:
            sampled[rank].append(numbers)
            return sample(model, indices, numbers)  # noqa: B023 - called within this iteration

        def gather(items: Any, rank: int = rank) -> Any:
            if rank == 0:
                delivered.append(items)
                return items
            first = delivered.pop(0)
            return torch.cat([first, items]) if isinstance(items, torch.Tensor) else first + items

        def mean(value: float, weight: float, rank: int = rank) -> float:
            if rank == 0:
                delivered.append((value, weight))
                return value
            other, other_weight = delivered.pop(0)
            return (other * other_weight + value * weight) / (other_weight + weight)

        monkeypatch.setattr(stage, "_sample", counting)
        monkeypatch.setattr(distributed, "_active", distributed.Ranks(rank, 2))
        monkeypatch.setattr(distributed, "gather_lists", gather)
        monkeypatch.setattr(distributed, "gather_rows", gather)
        monkeypatch.setattr(distributed, "weighted_mean", mean)
        stage.rollout(model)
    assert sampled == {0: [range(0, 2)], 1: [range(2, 4)]} and delivered == []
    assert whole.buffer is not None and stage.buffer is not None
    assert whole.buffer.keys() == stage.buffer.keys()
    for key, value in whole.buffer.items():
        torch.testing.assert_close(stage.buffer[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert stage.rollout_stats == pytest.approx(whole.rollout_stats, rel=1e-5, abs=1e-7)
    assert torch.equal(stage.buffer_order, whole.buffer_order)
