"""Shared fixtures: the expensive artefacts (a tiny pretrained run) are built once per session.

Under pytest-xdist (the default `-n 2`, pyproject's addopts) a session is a worker: each worker
builds the session fixtures it needs once. A test marked `exclusive` runs while no other worker
runs a test, so that what it measures of this machine (CPU time under a cap) is its own.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

try:
    import fcntl
except ImportError:  # not POSIX: no locks between workers (run with -n 0 for exclusive tests)
    fcntl = None  # type: ignore[assignment]

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# A model small enough to train in seconds on two cores, yet a real run of every mechanism.
TINY_SETS = [
    "model.n_embd=64",
    "model.n_layer=2",
    "model.n_head=2",
    "model.context_length=64",
    "tokenizer.vocab_size=600",
    "data.builtin_size=400",
    "train.micro_batch_size=4",
    "train.global_batch_size=8",
    "train.warmup_steps=2",
    "train.eval_every=10",
    "train.save_every=10",
    "train.log_every=5",
    "train.eval_batches=2",
    "log.plot=false",
]


def set_args(sets: list[str]) -> list[str]:
    return [arg for item in sets for arg in ("--set", item)]


def run_cli(
    *args: str | Path,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 300,
    input_text: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `python -m minigpt_cli ARGS` as a user runs `minigpt` (own process, own exit code)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "minigpt_cli", *map(str, args)],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input_text,
    )


@contextlib.contextmanager
def _turn_on_this_machine(item: pytest.Item) -> Iterator[None]:
    """Between xdist workers: an `exclusive` test waits for the others' current tests to end and
    holds them off until it ends; every other test shares the machine. Without xdist, nothing."""
    if fcntl is None or "PYTEST_XDIST_WORKER" not in os.environ:
        yield
        return
    exclusive = item.get_closest_marker("exclusive") is not None
    # The workers' base temporary folders share a parent: the run's own, removed like the rest.
    root = item.config._tmp_path_factory.getbasetemp().parent
    with open(root / "machine.gate", "a") as gate, open(root / "machine.share", "a") as share:
        # The gate queues everyone behind an exclusive test that is waiting for its turn, so a
        # stream of shared holders cannot starve it. Closing the files releases both locks.
        fcntl.flock(gate, fcntl.LOCK_EX)
        fcntl.flock(share, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        if not exclusive:
            fcntl.flock(gate, fcntl.LOCK_UN)
        yield


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[object]:
    # Around setup too: a session fixture built for this test is load on the machine as well.
    with _turn_on_this_machine(item):
        return (yield)


@pytest.fixture(autouse=True)
def _isolated_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keep doctor's measurement cache out of the user's home during tests (shared per session)."""
    cache = tmp_path_factory.getbasetemp() / "minigpt-cache"
    cache.mkdir(exist_ok=True)
    monkeypatch.setenv("MINIGPT_CACHE_DIR", str(cache))


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module of tiny-tensor tests: they gain nothing from a second
    thread, on a busy 2-core machine OpenMP's spin-waiting makes them many times slower, and
    results stay bit-reproducible. Used as `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_pretrain_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 30-step pretraining run on the built-in corpus (fp32, CPU), built once."""
    base = tmp_path_factory.mktemp("tiny-pretrain")
    cache = tmp_path_factory.getbasetemp() / "minigpt-cache"
    cache.mkdir(exist_ok=True)
    run_dir = base / "run"
    result = run_cli(
        "pretrain",
        "--out",
        run_dir,
        "--max-steps",
        "30",
        "--precision",
        "fp32",
        "--device",
        "cpu",
        *set_args(TINY_SETS),
        env={"MINIGPT_CACHE_DIR": str(cache)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return run_dir


# Fine-tuning stages inherit the shape from their parent; these keep them seconds long.
FINETUNE_SETS = [
    "data.builtin_size=400",
    "train.micro_batch_size=4",
    "train.global_batch_size=8",
    "train.warmup_steps=2",
    "train.eval_every=10",
    "train.save_every=10",
    "train.log_every=5",
    "train.eval_batches=2",
    "sft.exact_match_per_family=4",
    # The preset's [sft] section beats [train] for SFT runs: set the same budget there too.
    "sft.micro_batch_size=4",
    "sft.global_batch_size=8",
    "sft.warmup_steps=2",
    "sft.eval_every=10",
    "sft.save_every=10",
    "sft.log_every=5",
    "log.plot=false",
]

# DPO on top of FINETUNE_SETS: a rate at which 20 steps move the margins, 2 exact-match prompts.
DPO_SETS = [*FINETUNE_SETS, "dpo.exact_match_per_family=2", "dpo.learning_rate=1e-3"]
# The shared DPO run's: a train row every step (tests/test_distributed_rl.py compares each).
DPO_RUN_SETS = [*DPO_SETS, "train.log_every=1"]
DPO_RUN_FLAGS = ["--max-steps", "20", "--beta", "0.5"]

# RLHF on top of FINETUNE_SETS: 8 rollouts of 8 new tokens an iteration, one optimizer step each.
RLHF_SETS = [
    *FINETUNE_SETS,
    "rlhf.rollout_batch_size=8",
    "rlhf.global_batch_size=8",
    "rlhf.micro_batch_size=8",
    "rlhf.max_new_tokens=8",
    "rlhf.eval_prompts=8",
    "rlhf.samples_every=0",
]


def finished_run(
    tmp_path_factory: pytest.TempPathFactory,
    verb: str,
    parent: Path,
    name: str,
    *flags: str,
    sets: list[str],
) -> Path:
    """A tiny fp32 `verb` run (sft, dpo, rlhf) of `parent` on the built-in data, trained to the
    end in a CLI process."""
    run_dir = tmp_path_factory.mktemp(name) / "run"
    result = run_cli(
        verb,
        "--from",
        parent,
        "--out",
        run_dir,
        *flags,
        "--precision",
        "fp32",
        "--device",
        "cpu",
        *set_args(sets),
        env={"MINIGPT_CACHE_DIR": str(tmp_path_factory.getbasetemp() / "minigpt-cache")},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return run_dir


@pytest.fixture(scope="session")
def tiny_sft_run(tmp_path_factory: pytest.TempPathFactory, tiny_pretrain_run: Path) -> Path:
    """A finished 30-step full SFT run of `tiny_pretrain_run` on the built-in data, built once."""
    return finished_run(
        tmp_path_factory,
        "sft",
        tiny_pretrain_run,
        "tiny-sft",
        "--max-steps",
        "30",
        sets=FINETUNE_SETS,
    )


@pytest.fixture(scope="session")
def tiny_lora_sft_run(tmp_path_factory: pytest.TempPathFactory, tiny_pretrain_run: Path) -> Path:
    """A finished 10-step LoRA SFT run of `tiny_pretrain_run`, snapshots kept at steps 5 and 10:
    a LoRA parent to continue from, and a straight run to compare a resumed copy against."""
    sets = [*FINETUNE_SETS, "sft.save_every=5", "train.keep_last=3"]
    return finished_run(
        tmp_path_factory,
        "sft",
        tiny_pretrain_run,
        "tiny-lora-sft",
        "--lora",
        "--max-steps",
        "10",
        sets=sets,
    )


@pytest.fixture(scope="session")
def tiny_dpo_run(tmp_path_factory: pytest.TempPathFactory, tiny_sft_run: Path) -> Path:
    """A finished 20-step DPO run of `tiny_sft_run` (beta 0.5, a snapshot every 10 steps), built
    once: what DPO logs, and the one-process reference of the two-process DPO run."""
    return finished_run(
        tmp_path_factory, "dpo", tiny_sft_run, "tiny-dpo", *DPO_RUN_FLAGS, sets=DPO_RUN_SETS
    )


# The smallest RLHF run with every file RLHF writes: two PPO iterations after a 2-step reward
# model, every step of both saved.
TINY_PPO_SETS = [
    *RLHF_SETS,
    "rlhf.ppo_epochs=1",
    "rlhf.save_every=1",
    "reward.max_steps=2",
    "reward.save_every=1",
    "reward.eval_every=2",
]
TINY_PPO_FLAGS = ["--max-steps", "2"]


@pytest.fixture(scope="session")
def tiny_ppo_run(tmp_path_factory: pytest.TempPathFactory, tiny_sft_run: Path) -> Path:
    """A finished `rlhf` run of `tiny_sft_run` (TINY_PPO_SETS): RLHF's files (reward/, value
    head, RL state) at the smallest cost, and the unkilled reference of a killed copy."""
    return finished_run(
        tmp_path_factory, "rlhf", tiny_sft_run, "tiny-ppo", *TINY_PPO_FLAGS, sets=TINY_PPO_SETS
    )
