"""Shared fixtures: the expensive artefacts (a tiny pretrained run) are built once per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.fixture(autouse=True)
def _isolated_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keep doctor's measurement cache out of the user's home during tests (shared per session)."""
    cache = tmp_path_factory.getbasetemp() / "minigpt-cache"
    cache.mkdir(exist_ok=True)
    monkeypatch.setenv("MINIGPT_CACHE_DIR", str(cache))


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


@pytest.fixture(scope="session")
def tiny_sft_run(tmp_path_factory: pytest.TempPathFactory, tiny_pretrain_run: Path) -> Path:
    """A finished 30-step full SFT run of `tiny_pretrain_run` on the built-in data, built once."""
    run_dir = tmp_path_factory.mktemp("tiny-sft") / "run"
    result = run_cli(
        "sft",
        "--from",
        tiny_pretrain_run,
        "--out",
        run_dir,
        "--max-steps",
        "30",
        "--precision",
        "fp32",
        "--device",
        "cpu",
        *set_args(FINETUNE_SETS),
        env={"MINIGPT_CACHE_DIR": str(tmp_path_factory.getbasetemp() / "minigpt-cache")},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return run_dir


@pytest.fixture(scope="session")
def tiny_lora_sft_run(tmp_path_factory: pytest.TempPathFactory, tiny_pretrain_run: Path) -> Path:
    """A finished 10-step LoRA SFT run of `tiny_pretrain_run`, snapshots kept at steps 5 and 10:
    a LoRA parent to continue from, and a straight run to compare a resumed copy against."""
    run_dir = tmp_path_factory.mktemp("tiny-lora-sft") / "run"
    result = run_cli(
        "sft",
        "--from",
        tiny_pretrain_run,
        "--out",
        run_dir,
        "--lora",
        "--max-steps",
        "10",
        "--precision",
        "fp32",
        "--device",
        "cpu",
        *set_args([*FINETUNE_SETS, "sft.save_every=5", "train.keep_last=3"]),
        env={"MINIGPT_CACHE_DIR": str(tmp_path_factory.getbasetemp() / "minigpt-cache")},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return run_dir
