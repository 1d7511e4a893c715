"""Training under torchrun: two processes (gloo, CPU, one thread each) train what one process
trains, rank 0 alone writes, a resume at the same world size is bitwise, bad launches exit 2.

The one-process references are the shared tiny fixtures (30 steps, a row every 5 steps): the
two-process runs use their config, their tokenizer and their thread-free fp32 path, so a row of
one is the row of the other. In-process unit tests cover the pieces with no process to start.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from benchmarks.crash_consistency import compare_runs, leftover_temporaries
from minigpt_cli.cli.launch import job_outcome, without_nproc
from minigpt_cli.engine.training import distributed
from minigpt_cli.errors import UserError
from tests.conftest import FINETUNE_SETS, TINY_SETS, run_cli, set_args

FP32 = ["--precision", "fp32", "--device", "cpu"]
TWO = ["--nproc", "2", "--threads", "1"]  # 2 ranks on the 2-core machine, one thread each


def _rows(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def _assert_same_training(reference: Path, trial: Path) -> None:
    """Every logged loss within 1e-5 relative, every weight within 1e-5, the same steps."""
    want, got = _rows(reference, "train"), _rows(trial, "train")
    assert [r["step"] for r in want] == [r["step"] for r in got]
    assert [r["tokens"] for r in want] == [r["tokens"] for r in got]  # tokens: all ranks'
    for a, b in zip(want, got, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), a["step"]
        assert b["world_size"] == 2
    evals = zip(_rows(reference, "eval"), _rows(trial, "eval"), strict=True)
    for a, b in evals:
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)
    before, after = (
        load_file(str(reference / "model.safetensors")),
        load_file(str(trial / "model.safetensors")),
    )
    assert before.keys() == after.keys()
    for name in before:
        assert (before[name] - after[name]).abs().max() <= 1e-5, name


def _launch(*args: str | Path) -> subprocess.CompletedProcess[str]:
    result = run_cli(*args, env={"OMP_NUM_THREADS": "1"}, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def two_process_pretrain(tiny_pretrain_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pretraining fixture's run again, under `--nproc 2` (its tokenizer reused)."""
    run_dir = tmp_path_factory.mktemp("ddp-pretrain") / "run"
    _launch(
        "pretrain",
        "--out",
        run_dir,
        "--tokenizer",
        tiny_pretrain_run,
        "--max-steps",
        "30",
        *FP32,
        *TWO,
        *set_args(TINY_SETS),
    )
    return run_dir


def test_pretraining_in_two_processes_trains_what_one_process_trains(
    tiny_pretrain_run: Path, two_process_pretrain: Path
) -> None:
    _assert_same_training(tiny_pretrain_run, two_process_pretrain)
    state = json.loads((two_process_pretrain / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and len(state["rng_ranks"]) == 2  # every rank's RNG
    assert leftover_temporaries(two_process_pretrain) == []  # one writer, no lock left


def test_sft_in_two_processes_trains_what_one_process_trains(
    tiny_pretrain_run: Path, tiny_sft_run: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    result = _launch(
        "sft",
        "--from",
        tiny_pretrain_run,
        "--out",
        run_dir,
        "--max-steps",
        "30",
        *FP32,
        *TWO,
        *set_args(FINETUNE_SETS),
    )
    assert result.stdout.count("checkpoint saved at step 30") == 1  # rank 0 alone reports
    _assert_same_training(tiny_sft_run, run_dir)


def test_a_two_process_run_killed_after_a_save_resumes_to_the_same_bytes(
    tiny_pretrain_run: Path, two_process_pretrain: Path, tmp_path: Path
) -> None:
    # What a SIGKILL of every rank right after the step-20 save leaves: the step-20 snapshot is
    # the newest complete one (the step-30 files never written).
    died = tmp_path / "died"
    shutil.copytree(two_process_pretrain, died)
    for name in ("model.safetensors", "optimizer.safetensors", "trainer_state.json"):
        (died / name).unlink()
    shutil.rmtree(died / "checkpoints" / "step-00000030")
    # --tokenizer again: a resumed run records the inputs it was given (its `sources`).
    _launch("pretrain", "--out", died, "--resume", "--tokenizer", tiny_pretrain_run, *TWO)
    resumed = [r for r in _rows(died, "event") if r["event"] == "resume"]
    assert [r["step"] for r in resumed] == [20]
    assert compare_runs(two_process_pretrain, died) == []  # weights, optimizer, state, RNGs


def test_nproc_0_exits_2_in_one_line() -> None:
    result = run_cli("pretrain", "--nproc", "0")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --nproc 0: give the number of processes to train in, 1 or more"
    ]


def _rank_env(rank: int, **extra: str) -> dict[str, str]:
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "1",  # never reached: the refusals come before the rendezvous
        **extra,
    }


def test_a_batch_two_ranks_cannot_share_exits_2_with_one_line_on_rank_0_only(
    tmp_path: Path,
) -> None:
    """Each rank as torchrun starts it: both refuse before the rendezvous, rank 0 says why."""
    args = ["pretrain", "--out", tmp_path / "run", *FP32, *set_args(TINY_SETS)]
    args += ["--set", "train.global_batch_size=12"]  # 3 micro-batches of 4 for 2 ranks
    ranks = [
        subprocess.Popen(
            [sys.executable, "-m", "minigpt_cli", *map(str, args)],
            env={**os.environ, **_rank_env(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    (out0, err0), (out1, err1) = (rank.communicate(timeout=120) for rank in ranks)
    assert [rank.returncode for rank in ranks] == [2, 2]
    assert err0.strip().splitlines() == [
        "error: 2 processes cannot share a global batch of 12 sequences in micro-batches of 4 "
        "(3 a step, not a multiple of 2): set pretrain.global_batch_size to a multiple of 8 "
        "(micro-batch 4 x 2 processes), or pretrain.micro_batch_size to 3"
    ]
    assert (out1 + err1).strip() == ""
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- in process


def test_torchrun_environment_is_read_and_a_partial_one_refused() -> None:
    assert distributed.from_environment({}) == distributed.SINGLE
    ranks = distributed.from_environment(_rank_env(1))
    assert (ranks.rank, ranks.world_size, ranks.is_writer) == (1, 2, False)
    with pytest.raises(UserError, match="MASTER_PORT not set"):
        distributed.from_environment({**_rank_env(0), "MASTER_PORT": ""})


def test_the_governors_back_off_stays_shareable_by_the_ranks() -> None:
    assert distributed.shareable_micro_batch(4, 8, 2) == 4
    assert distributed.shareable_micro_batch(4, 12, 2) == 3  # 12 = 4 x 3: 3 micro-batches
    assert distributed.shareable_micro_batch(5, 12, 2) == 3
    assert distributed.shareable_micro_batch(1, 6, 4) == 1


def test_nproc_is_taken_out_of_what_each_rank_runs_and_the_job_status_is_rank_0s() -> None:
    argv = ["pretrain", "--nproc", "2", "--max-steps", "3", "--nproc=4"]
    assert without_nproc(argv) == ["pretrain", "--max-steps", "3"]

    class Failure:
        def __init__(self, exitcode: int) -> None:
            self.exitcode = exitcode

        def signal_name(self) -> str:
            return signal.Signals(-self.exitcode).name

    assert job_outcome({0: Failure(2), 1: Failure(2)}) == (2, None)
    code, line = job_outcome({0: Failure(-signal.SIGTERM), 1: Failure(-signal.SIGKILL)})
    assert code == 128 + signal.SIGKILL and line is not None and "rank 1" in line


def test_a_collective_that_lost_a_rank_is_told_in_a_few_words_and_other_errors_are_not() -> None:
    gloo = RuntimeError(
        "[/__w/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
        "[127.0.0.1]:35995: Connection reset by peer. This is typically caused by a remote worker"
    )
    assert (
        distributed.lost_contact(gloo) == "Read error [127.0.0.1]:35995: Connection reset by peer"
    )
    assert distributed.lost_contact(RuntimeError("shape mismatch")) is None
    assert distributed.lost_contact(ValueError("Connection")) is None
