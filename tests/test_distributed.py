"""Training under torchrun: two processes (gloo, CPU, one thread each) train what one process
trains, rank 0 alone writes, a resume at the same world size is bitwise, bad launches exit 2.

The one-process references are the shared tiny fixtures (30 steps, a row every 5 steps): the
two-process runs use their config, their tokenizer and their thread-free fp32 path, so a row of
one is the row of the other. In-process unit tests cover the pieces with no process to start.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from safetensors.torch import load_file

from benchmarks.crash_consistency import compare_runs, leftover_temporaries
from minigpt_cli.cli.launch import Nodes, check_nodes, job_outcome, without_nproc
from minigpt_cli.config.loader import load_config
from minigpt_cli.engine.hardware import monitor, share
from minigpt_cli.engine.resources.estimate import estimate_for_config
from minigpt_cli.engine.resources.governor import CpuThrottle
from minigpt_cli.engine.training import distributed
from minigpt_cli.errors import UserError
from tests.conftest import FINETUNE_SETS, TINY_SETS, run_cli, set_args

FP32 = ["--precision", "fp32", "--device", "cpu"]
TWO = ["--nproc", "2", "--threads", "1"]  # 2 ranks on the 2-core machine, one thread each
# The killed runs: slowed by the CPU cap's duty cycle (sleeps between micro-batches; the numbers
# are the same) so that the kill lands mid-run, well before step 30.
SLOW = ["--max-cpu", "10"]
FAST = ["--max-cpu", "100"]  # their resume (the saved config holds the slow cap)


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


# ------------------------------------------------------------------------- kills and Ctrl-C


def _start_job(run_dir: Path, *args: str | Path) -> subprocess.Popen[str]:
    """The two-process pretraining run of `two_process_pretrain` (into `run_dir`), started as a
    user starts it and left running: Ctrl-C reaches it as at a terminal even when the suite runs
    as a background job (SIGINT ignored, which a child inherits)."""
    command = ["pretrain", "--out", run_dir, "--max-steps", "30", *FP32, *TWO, *args]
    return subprocess.Popen(
        [sys.executable, "-m", "minigpt_cli", *map(str, [*command, *set_args(TINY_SETS)])],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _ranks_of(job: subprocess.Popen[str], count: int = 2) -> list[psutil.Process]:
    """The job's rank processes (the launcher's children running minigpt_cli), by rank."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and job.poll() is None:
        found = []
        for child in psutil.Process(job.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                environ = child.environ()
                if "minigpt_cli" in child.cmdline() and "RANK" in environ:
                    found.append((int(environ["RANK"]), child))
        if len(found) == count:
            return [process for _, process in sorted(found, key=lambda pair: pair[0])]
        time.sleep(0.05)
    raise AssertionError(f"the job's {count} ranks did not start: {job.communicate()}")


def _wait_for_save(run_dir: Path, job: subprocess.Popen[str], step: int = 10) -> None:
    """Until rank 0 has logged its checkpoint at `step` (the test does not choose where the
    ranks are then: one may be mid-step, the other in the all-reduce, or saving)."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert job.poll() is None, job.communicate()
        with contextlib.suppress(OSError, KeyError):
            events = _rows(run_dir, "event")
            if any(r["step"] >= step and r["event"] == "checkpoint" for r in events):
                return
        time.sleep(0.01)
    raise AssertionError(f"no checkpoint at step {step}")


def _finished_job(job: subprocess.Popen[str]) -> tuple[str, str]:
    try:
        return job.communicate(timeout=180)  # a rank left hanging would show here
    finally:
        if job.poll() is None:
            for process in [*psutil.Process(job.pid).children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    process.kill()
            job.kill()


def _resume_and_compare(run_dir: Path, reference: Path, tokenizer: Path) -> None:
    # --tokenizer again: a resumed run records the inputs it was given (its `sources`).
    _launch("pretrain", "--out", run_dir, "--resume", "--tokenizer", tokenizer, *TWO, *FAST)
    assert compare_runs(reference, run_dir) == []  # weights, optimizer, state, every rank's RNG
    assert leftover_temporaries(run_dir) == []


def test_every_rank_killed_mid_run_resumes_to_the_bytes_of_the_uninterrupted_run(
    tiny_pretrain_run: Path, two_process_pretrain: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    job = _start_job(run_dir, "--tokenizer", tiny_pretrain_run, *SLOW)
    ranks = _ranks_of(job)
    _wait_for_save(run_dir, job)
    time.sleep(random.uniform(0, 0.3))  # not a moment the test picks
    for process in (psutil.Process(job.pid), *ranks):  # SIGKILL: no handler runs anywhere
        process.kill()
    _finished_job(job)
    assert job.returncode == -signal.SIGKILL
    saved = json.loads((run_dir / "trainer_state.json").read_text())["step"]
    assert 10 <= saved < 30  # killed mid-run, after a save
    _resume_and_compare(run_dir, two_process_pretrain, tiny_pretrain_run)


def _cut_to_step_20(run: Path, into: Path) -> Path:
    """What a kill right after the step-20 save leaves of a finished 30-step run."""
    shutil.copytree(run, into)
    for name in ("model.safetensors", "optimizer.safetensors", "trainer_state.json"):
        (into / name).unlink()
    shutil.rmtree(into / "checkpoints" / "step-00000030")
    return into


def test_a_resume_with_another_world_size_continues_from_the_same_step_with_a_note(
    tiny_pretrain_run: Path, two_process_pretrain: Path, tmp_path: Path
) -> None:
    # 2 -> 1 and 1 -> 2: the same step, data position and schedule, rank 0's random state; not
    # bitwise, but with dropout 0 the same curve within float tolerance.
    cases = (
        (two_process_pretrain, [], 1, 2),
        (tiny_pretrain_run, TWO, 2, 1),
    )
    for index, (reference, launch, world, saved) in enumerate(cases):
        run_dir = _cut_to_step_20(reference, tmp_path / f"run{index}")
        _launch("pretrain", "--out", run_dir, "--resume", "--tokenizer", tiny_pretrain_run, *launch)
        events = _rows(run_dir, "event")
        assert [r["step"] for r in events if r["event"] == "resume"] == [20]
        notes = [r["message"] for r in events if r["event"] == "note"]
        assert any(
            f"resumed at step 20 with {world} process(es); it was saved by {saved}" in note
            for note in notes
        ), notes
        state = json.loads((run_dir / "trainer_state.json").read_text())
        assert state["step"] == 30 and state.get("world_size", 1) == world
        want = {r["step"]: r["loss"] for r in _rows(reference, "train")}
        got = {r["step"]: r["loss"] for r in _rows(run_dir, "train") if r["step"] > 20}
        assert got and all(got[step] == pytest.approx(want[step], rel=1e-4) for step in got)


def test_a_rank_killed_stops_the_job_in_one_line_and_the_last_checkpoint_is_intact(
    tiny_pretrain_run: Path, two_process_pretrain: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    job = _start_job(run_dir, "--tokenizer", tiny_pretrain_run, *SLOW)
    ranks = _ranks_of(job)
    _wait_for_save(run_dir, job, step=20)  # a snapshot the uninterrupted run keeps too
    ranks[1].kill()
    out, err = _finished_job(job)
    assert job.returncode not in (0, None), out + err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    # torchrun stops rank 0 (SIGTERM) as soon as it sees rank 1 gone; had rank 0 met the closed
    # connection first, it would have said "lost contact with another process" with the same end.
    assert re.fullmatch(
        r"error: (rank 1 was killed by SIGKILL and the job stopped|lost contact with another "
        r"process of the job \(.*\): one died or hung); kept the checkpoint at step 20; "
        rf"continue with: minigpt pretrain --out {re.escape(str(run_dir))} --resume --nproc 2",
        lines[0],
    ), lines
    # The last checkpoint intact: bitwise the uninterrupted run's at the same step.
    snapshot = Path("checkpoints") / "step-00000020"
    assert compare_runs(two_process_pretrain / snapshot, run_dir / snapshot) == []


def test_ctrl_c_stops_every_rank_at_one_step_and_saves_every_ranks_random_state(
    tiny_pretrain_run: Path, two_process_pretrain: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    job = _start_job(run_dir, "--tokenizer", tiny_pretrain_run, *SLOW)
    _ranks_of(job)
    _wait_for_save(run_dir, job)
    job.send_signal(signal.SIGINT)  # the launcher passes it on to every rank
    out, err = _finished_job(job)
    assert job.returncode == 130, out + err
    state = json.loads((run_dir / "trainer_state.json").read_text())
    assert 10 <= state["step"] < 30 and len(state["rng_ranks"]) == 2
    assert f"checkpoint saved at step {state['step']}" in err
    assert f"minigpt pretrain --out {run_dir} --resume --nproc 2" in err
    _resume_and_compare(run_dir, two_process_pretrain, tiny_pretrain_run)


def test_max_time_stops_every_rank_at_the_step_rank_0s_clock_decides(
    tiny_pretrain_run: Path, tmp_path: Path
) -> None:
    """A rank that stopped at another step would leave the other waiting in a collective (here
    for 60 s, then the job fails): the run ends at the deadline, planned and saved by rank 0."""
    run_dir = tmp_path / "run"
    result = run_cli(
        *("pretrain", "--out", run_dir, "--tokenizer", tiny_pretrain_run, "--max-time", "4s"),
        *("--max-steps", "100000", *FP32, *TWO, *set_args(TINY_SETS)),
        env={"OMP_NUM_THREADS": "1", "MINIGPT_COLLECTIVE_TIMEOUT": "60"},
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    state = json.loads((run_dir / "trainer_state.json").read_text())
    assert (state["stop_reason"], state["finished"], state["world_size"]) == ("max_time", True, 2)
    assert state["schedule"]["plan"]["horizon"] > 0  # rank 0's deadline plan, saved
    assert state["elapsed"] >= 4


def _agree_as_rank(rank: int, init_file: str, results: Any) -> None:
    """One rank of `test_the_ranks_agree_on_...`: its own clock, flag and (rank 0) plan."""
    import torch.distributed as dist

    from minigpt_cli.engine.training.pace import Schedule
    from minigpt_cli.engine.training.step_agreement import StepAgreement

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    here = distributed.Ranks(rank, 2, rank, 2, "gloo")
    distributed._active = here  # what process_group sets
    agreement = StepAgreement(here)
    agreement.interrupt_requested = rank == 1  # the Ctrl-C reached rank 1 only
    elapsed, interrupted = agreement.step_end(10.0 + rank)  # the clocks differ
    schedule = Schedule(
        peak=1e-3,
        floor=1e-4,
        warmup=2,
        total_steps=10_000,
        unit=1,
        eval_every=100,
        save_every=100,
        deadline=True,
    )
    for step in range(1, 6):  # each rank measured its own pace
        schedule.pace.add_step(step, 0.5 + rank)
    if rank == 0:
        schedule.replan(5, 20.0)
    agreement.share_schedule(schedule)
    results.put((rank, elapsed, interrupted, schedule.state(), schedule.learning_rate(7)))
    dist.destroy_process_group()


def test_the_ranks_agree_on_rank_0s_clock_any_ranks_ctrl_c_and_rank_0s_deadline_plan(
    tmp_path: Path,
) -> None:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    ranks = [
        context.Process(target=_agree_as_rank, args=(rank, str(tmp_path / "init"), results))
        for rank in (0, 1)
    ]
    for process in ranks:
        process.start()
    got = dict((item[0], item[1:]) for item in (results.get(timeout=120) for _ in ranks))
    for process in ranks:
        process.join(timeout=60)
    assert got[0] == got[1]  # the same elapsed, stop decision, plan, pace and learning rate
    elapsed, interrupted, state, _ = got[1]
    assert (elapsed, interrupted) == (10.0, True)
    assert state["plan"]["horizon"] < 10_000  # replanned by rank 0 for its deadline


# ------------------------------------------------------------------------- caps per machine

# Windows of 512 tokens, micro-batches of 64: each rank's estimate is about 1,060 MB at micro-batch
# 64 and 746 MB at 32, a gap wide enough for what the same run measures on different machines (a
# rank at micro-batch 16 of 256-token windows peaked at 445 MB on one 2-core machine, ~550 on
# another). A machine cap between the two estimates, beside the launcher (~233 MB), forces 32.
CAPPED_SETS = [
    "model.context_length=512",
    "train.micro_batch_size=64",
    "train.global_batch_size=128",
    "train.eval_every=100",
    "train.save_every=100",
]


def test_a_machines_caps_are_shared_by_its_ranks_and_the_estimate_counts_ddps_buckets() -> None:
    mine = share.MachineShare(local_processes=2, world_size=2, launcher_bytes=300 * 2**20)
    assert mine.memory_bytes(1300 * 2**20) == 500 * 2**20  # (machine - launcher) / ranks
    assert mine.cpu_percent(100) == 50
    cores = psutil.cpu_count(logical=True) or 1
    previous = share.current()
    share.set_share(mine)
    try:
        assert monitor.allowed_threads(100) == max(1, math.ceil(cores / 2))
        whole_share = CpuThrottle.from_percent(100)
        assert whole_share.cap_cores == cores / 2 and not whole_share.active
        assert CpuThrottle.from_percent(50).active  # a quarter of the cores each: duty-cycled
    finally:
        share.set_share(previous)
    config = load_config("tiny")
    alone, split = (
        estimate_for_config(config, ddp_buckets=buckets, framework_bytes=0)
        for buckets in (False, True)
    )
    assert split.buckets == split.gradients > 0 and alone.buckets == 0
    assert split.total == alone.total + split.gradients
    assert f"DDP buckets {split.buckets / 2**20:,.0f}" in split.describe()


def _peak_tree_rss(job: subprocess.Popen[str]) -> tuple[int, list[int]]:
    """The job's peak resident memory, all its processes together, polled from outside until it
    ends (a spike shorter than a poll can be missed: the governor's own reading cannot), and each
    process's own peak in MB (launcher first): what a failure on another machine needs to say."""
    root, peak, each = psutil.Process(job.pid), 0, {}
    while job.poll() is None:
        total = 0
        with contextlib.suppress(psutil.Error):
            for process in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    rss = process.memory_info().rss
                    total += rss
                    each[process.pid] = max(each.get(process.pid, 0), rss)
        peak = max(peak, total)
        time.sleep(0.02)
    return peak, [round(rss / 2**20) for rss in each.values()]


def test_two_ranks_share_the_machines_memory_cap_and_the_job_stays_under_it(
    tiny_pretrain_run: Path, tmp_path: Path
) -> None:
    # The whole machine: 2 ranks and the launcher. Under the estimate for micro-batch 64 (2 x
    # 1,060 MB + the launcher's ~233 = 2,353 MB), over the peak measured at 32 (1,711-1,714 here).
    cap_mb = 2150
    command = ["pretrain", "--out", tmp_path / "run", "--tokenizer", tiny_pretrain_run]
    command += ["--max-steps", "3", "--max-memory", f"{cap_mb}MiB", *FP32, *TWO]
    command += set_args([*TINY_SETS, *CAPPED_SETS])
    job = subprocess.Popen(
        [sys.executable, "-m", "minigpt_cli", *map(str, command)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    peak, each_mb = _peak_tree_rss(job)
    out, err = _finished_job(job)
    assert job.returncode == 0, out + err
    governor = re.findall(r"mem (\d+)/(\d+) MB", out)  # each step line: the rank's own reading
    assert peak < cap_mb * 2**20, (f"{peak / 2**20:.0f} MB: {each_mb} MB each", governor, out)
    assert "memory, each of 2 processes: estimated peak" in out  # per rank, and the total:
    assert re.search(r"This machine: 2 x [\d,]+ MB \+ the launcher's [\d,]+ MB = ", out), out
    assert "DDP buckets" in out
    assert "training with micro-batch 32 x 4 accumulation" in out, out  # the governor's choice
    assert "micro-batch 32 x 4 accumulation, shared by 2 processes" in out, out


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


def _both_ranks(args: list[str | Path], env: dict[str, str]) -> list[tuple[str, str]]:
    """Start rank 0 and rank 1 as torchrun would (with `env` over their variables; an empty
    value removes one); both must exit 2. Returns each one's (stdout, stderr)."""
    ranks = []
    for rank in (0, 1):
        environ = {**os.environ, **_rank_env(rank), **env}
        ranks.append(
            subprocess.Popen(
                [sys.executable, "-m", "minigpt_cli", *map(str, args)],
                env={name: value for name, value in environ.items() if value},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = [rank.communicate(timeout=120) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [2, 2], outputs
    return outputs


def test_a_missing_rendezvous_variable_exits_2_with_one_line_on_rank_0_only(
    tmp_path: Path,
) -> None:
    args: list[str | Path] = ["pretrain", "--out", tmp_path / "run", *FP32, *set_args(TINY_SETS)]
    (out0, err0), (out1, err1) = _both_ranks(args, {"MASTER_ADDR": ""})
    assert err0.strip().splitlines() == [
        "error: torchrun's environment is incomplete (MASTER_ADDR not set): start several "
        "processes with torchrun or `minigpt <verb> --nproc N`"
    ]
    assert (out0 + out1 + err1).strip() == ""
    assert not (tmp_path / "run").exists()


def test_a_batch_two_ranks_cannot_share_exits_2_with_one_line_on_rank_0_only(
    tmp_path: Path,
) -> None:
    """Each rank as torchrun starts it: both refuse before the rendezvous, rank 0 says why."""
    args: list[str | Path] = ["pretrain", "--out", tmp_path / "run", *FP32, *set_args(TINY_SETS)]
    args += ["--set", "train.global_batch_size=12"]  # 3 micro-batches of 4 for 2 ranks
    (out0, err0), (out1, err1) = _both_ranks(args, {})
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


def test_the_machines_flags_become_torchruns_and_are_taken_out_of_what_each_rank_runs() -> None:
    argv = ["sft", "--nnodes", "2", "--node-rank=1", "--master-addr", "10.0.0.1", "--x"]
    assert without_nproc([*argv, "--master-port=29501", "--nproc", "4"]) == ["sft", "--x"]
    assert Nodes().torchrun_flags() == ["--standalone"]
    assert Nodes(2, 1, "10.0.0.1").torchrun_flags() == [
        *("--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1"),
        *("--master-port", "29500", "--rdzv-conf", "timeout=600"),
    ]
    refusals = {
        Nodes(0): "--nnodes 0: give the number of machines",
        Nodes(2, 2, "10.0.0.1"): "--node-rank 2: with --nnodes 2 it is 0 to 1",
        Nodes(2, 1): "--nnodes 2 needs --node-rank (this machine's place) and --master-addr",
        Nodes(2, 1, "h", 70000): "--master-port 70000: a port is 1 to 65535",
    }
    for nodes, message in refusals.items():
        with pytest.raises(UserError, match=re.escape(message)):
            check_nodes(nodes)


def test_a_master_port_in_use_and_machines_flags_without_nproc_exit_2_in_one_line() -> None:
    with socket.socket() as holder:
        holder.bind(("", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run_cli("pretrain", "--nproc", "2", "--master-port", str(port))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: --master-port {port} is in use on this machine (127.0.0.1:{port} hosts the "
        "job's rendezvous): choose another port, the same on every machine"
    ]
    result = run_cli("pretrain", "--nnodes", "2")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --nnodes, --node-rank, --master-addr and --master-port go with --nproc N (the "
        "processes on this machine)"
    ]


def test_a_machine_that_cannot_reach_node_0_exits_2_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = run_cli(
        *("pretrain", "--out", tmp_path / "run", "--nproc", "1", "--nnodes", "2"),
        *("--node-rank", "1", "--master-addr", "127.0.0.1", "--master-port", str(port)),
        env={"MINIGPT_RENDEZVOUS_TIMEOUT": "2"},
        timeout=120,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout.strip() == (
        f"node 1 of 2: joining the job at 127.0.0.1:{port} (node 0 hosts it; waiting up to 2 s "
        "for every machine)"
    )
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: node 1 could not join the job at 127.0.0.1:{port} (")
    assert line.endswith(
        "check --master-addr and --master-port, and that the --node-rank 0 machine runs and is "
        "reachable"
    )


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
