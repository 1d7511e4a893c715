"""Crash consistency, the suite's short version of `benchmarks/crash_consistency.py`.

Real training processes are killed with SIGKILL (at a named write of a snapshot's publication, or
at an instant while training), resumed with `--resume` as a user would, and the run directory is
compared byte for byte with an unkilled run of the same command: every safetensors file, every
trainer_state.json apart from its wall-clock fields, and no temporary left behind. The unkilled
runs are the shared fixtures where one matches (pretrain, SFT, PPO). One kill a stage, each covering
a case of its own (the benchmark draws 20 kills a stage, DPO and LoRA included): the last
publication torn (pretrain), an instant while training (SFT), the reward model's publication
torn before the RLHF run has a checkpoint of its own (RLHF, PPO).

A kill "at the K-th write of PATH" goes through the benchmark's tracer, which arms
MINIGPT_FAULT=kill@1 at that write so the seam itself kills there: the same instant as kill@N
with N that write's index, named by its file so that a new write elsewhere does not move it.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks.crash_consistency import TRACER, compare_runs, leftover_temporaries
from minigpt_cli.cli.finetune import resumed_parent
from minigpt_cli.cli.quickstart_cmd import stage_status
from minigpt_cli.engine.core.io import FAULT_ENV
from minigpt_cli.engine.runs import checkpoint as ckpt
from minigpt_cli.engine.runs.files import MODEL_FILE, STATE_FILE, load_tensors
from minigpt_cli.errors import UserError
from tests.conftest import (
    FINETUNE_SETS,
    TINY_PPO_FLAGS,
    TINY_PPO_SETS,
    TINY_SETS,
    run_cli,
    set_args,
)

FP32 = ["--precision", "fp32", "--device", "cpu"]


def _threads(reference: Path) -> list[str]:
    """The reference's thread count: the same float reductions, so bitwise comparable."""
    return ["--threads", str(json.loads((reference / STATE_FILE).read_text())["threads"])]


def _killed_at(args: list[str | Path], tmp_path: Path, path: Path, nth: int = 1) -> list[str]:
    """Run `minigpt ARGS` killed at the `nth` write of `path`; returns what it wrote, in order."""
    trace = tmp_path / f"trace-{time.monotonic_ns()}"
    env = {**os.environ, "CRASH_TRACE": str(trace), "CRASH_KILL_AT": f"{path}#{nth}"}
    result = subprocess.run(
        [sys.executable, "-c", TRACER, *map(str, args)], env=env, capture_output=True, text=True
    )
    written = [line.split("\t", 1)[1] for line in trace.read_text().splitlines()]
    assert result.returncode == -signal.SIGKILL, result.stdout + result.stderr
    assert written[-1] == str(path), "killed elsewhere than planned"
    return written


def _resume(verb: str, run_dir: Path) -> str:
    result = run_cli(verb, "--out", run_dir, "--resume")
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def _assert_same_run(reference: Path, run_dir: Path) -> None:
    assert compare_runs(reference, run_dir) == []
    assert leftover_temporaries(run_dir) == []


def test_pretrain_killed_in_its_last_publication_is_made_whole_and_the_same_bytes(
    tiny_pretrain_run: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    command = ["pretrain", "--out", run_dir, "--max-steps", "30", *FP32, *set_args(TINY_SETS)]
    # The final (step-30) save killed before its state file's swap: the snapshot is complete and
    # the weights swapped in, the top-level state still says step 20, not finished.
    state = run_dir / STATE_FILE
    _killed_at([*command, *_threads(tiny_pretrain_run)], tmp_path, state, nth=3)
    assert json.loads(state.read_text())["step"] == 20
    output = _resume("pretrain", run_dir)
    assert "already finished at step 30" in output
    _assert_same_run(tiny_pretrain_run, run_dir)


def test_sft_killed_at_an_instant_while_training_resumes_to_the_same_bytes(
    tiny_sft_run: Path, tiny_pretrain_run: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    command = ["sft", "--from", tiny_pretrain_run, "--out", run_dir, "--max-steps", "30", *FP32]
    command += [*set_args(FINETUNE_SETS), *_threads(tiny_sft_run)]
    process = subprocess.Popen(
        [sys.executable, "-m", "minigpt_cli", *map(str, command)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "checkpoints" / "step-00000010").exists():
            assert process.poll() is None and time.monotonic() < deadline, "no first checkpoint"
            time.sleep(0.005)
        # Somewhere in the 20 steps after the first save (an eval with generation among them);
        # should the run end first, resume has nothing to do and the bytes must still agree.
        time.sleep(random.Random(13).uniform(0.0, 0.4))
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    _resume("sft", run_dir)
    _assert_same_run(tiny_sft_run, run_dir)


def test_rlhf_killed_while_its_reward_model_trains_resumes_to_the_same_bytes(
    tiny_sft_run: Path, tiny_ppo_run: Path, tmp_path: Path
) -> None:
    # The shared PPO fixture is the unkilled run: a 2-step reward model saved every step, then
    # two PPO iterations.
    run_dir = tmp_path / "run"
    command = ["rlhf", "--from", tiny_sft_run, "--out", run_dir, *TINY_PPO_FLAGS, *FP32]
    command += set_args(TINY_PPO_SETS)
    # 1. The reward model's step-1 save torn: the RLHF run itself has no checkpoint yet, and
    # --resume continues the reward model from its snapshot (the run's config and sources come
    # from the reward run, which records them), trains its step 2, then the policy.
    _killed_at(
        [*command, *_threads(tiny_ppo_run)],
        tmp_path,
        run_dir / "reward" / "optimizer.safetensors",
    )
    assert not (run_dir / STATE_FILE).exists()
    _resume("rlhf", run_dir)
    _assert_same_run(tiny_ppo_run, run_dir)
    resumed = [r for r in ckpt.read_metrics(run_dir / "reward") if r.get("event") == "resume"]
    assert len(resumed) == 1  # the reward model continued from its snapshot, not from scratch


# ----------------------------------------------------------------------------- the fixes, unit


def _weights(step: int) -> dict:
    return {MODEL_FILE: ({"w": torch.full((2, 2), float(step))}, {"format": "minigpt"})}


def test_a_kill_in_the_last_publication_is_finished_and_pruned_on_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for step in (10, 20):
        ckpt.save_checkpoint(tmp_path, step, _weights(step), {"finished": False}, keep_last=2)
    # The final save fails (as a kill would stop it) at its sixth write, the state file's swap:
    # folder, weights, state, rename, the weights' swap, then the state's. Pruning never ran.
    monkeypatch.setenv(FAULT_ENV, "ENOSPC@6")
    with pytest.raises(OSError) as failed:
        ckpt.save_checkpoint(tmp_path, 30, _weights(30), {"finished": True}, keep_last=2)
    assert failed.value.errno == errno.ENOSPC
    monkeypatch.delenv(FAULT_ENV)
    assert ckpt.read_state(tmp_path)["step"] == 20  # torn: step-30 weights, step-20 state
    assert float(load_tensors(tmp_path / MODEL_FILE)["w"][0, 0]) == 30.0
    # quickstart must not skip it as finished: its verb's --resume finishes the publication
    assert stage_status(tmp_path) == "resume"

    point = ckpt.republish(tmp_path, keep_last=2)
    assert point == tmp_path / "checkpoints" / "step-00000030"
    assert ckpt.find_resume_point(tmp_path) == tmp_path
    assert ckpt.read_state(tmp_path)["finished"] is True
    # The pruning the cut save never reached (the benchmark found the third snapshot kept).
    assert [p.name for p in ckpt.snapshots(tmp_path)] == ["step-00000020", "step-00000030"]
    assert leftover_temporaries(tmp_path) == []
    assert stage_status(tmp_path) == "finished"


def test_temporaries_a_kill_left_in_the_reward_sub_run_are_removed(tmp_path: Path) -> None:
    reward = tmp_path / "reward"
    reward.mkdir()
    ckpt.save_checkpoint(reward, 10, _weights(10), {}, keep_last=2)
    left = [reward / ".model.safetensors.123.link", reward / ".tokenizer.model.x1y2.tmp"]
    left.append(reward / "checkpoints" / ".step-00000020.tmp")
    left[-1].mkdir()
    for path in left[:2]:
        path.write_text("half made")
    (tmp_path / "config.toml").write_text("")  # the RLHF run's own, before its first save
    removed = ckpt.remove_temporaries(tmp_path)
    assert sorted(removed) == sorted(left)
    assert leftover_temporaries(tmp_path) == []
    assert ckpt.find_resume_point(reward) == reward


def test_quickstart_resumes_an_rlhf_stage_whose_reward_model_alone_has_a_checkpoint(
    tmp_path: Path,
) -> None:
    reward = tmp_path / "rlhf" / "reward"
    reward.mkdir(parents=True)
    sources = {"from_run": "runs/dpo", "data": [], "preset": "tiny"}
    ckpt.save_checkpoint(reward, 10, _weights(10), {"sources": {"rlhf": sources}}, keep_last=2)
    assert stage_status(tmp_path / "rlhf", "rlhf", "reward") == "resume"
    assert stage_status(tmp_path / "rlhf") == "start"  # without the sub-run: nothing of its own
    # A reward run that did not record its RLHF run's sources (older minigpt) cannot say how
    # the policy was started: start over, as before.
    ckpt.save_checkpoint(reward, 20, _weights(20), {"sources": {}}, keep_last=2)
    assert stage_status(tmp_path / "rlhf", "rlhf", "reward") == "start"


def test_finetune_resume_with_nothing_saved_says_so(tmp_path: Path) -> None:
    # Not "rlhf needs --from RUN": on --resume the parent comes from a checkpoint, and there is
    # none (nor one of a reward model). sft and dpo find their parent the same way.
    run_dir = tmp_path / "run"
    (run_dir / "reward").mkdir(parents=True)
    with pytest.raises(UserError, match="nothing to resume .* --overwrite instead of --resume"):
        resumed_parent(run_dir, "rlhf", resume=True, sub_run="reward")
    with pytest.raises(UserError, match="nothing to resume"):
        resumed_parent(run_dir, "sft", resume=True)
