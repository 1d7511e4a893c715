"""Crash consistency, the suite's short version of `benchmarks/crash_consistency.py`.

Real training processes are killed with SIGKILL (at a named write of a snapshot's publication, or
at an instant while training), resumed with `--resume` as a user would, and the run directory is
compared byte for byte with an unkilled run of the same command: every safetensors file, every
trainer_state.json apart from its wall-clock fields, and no temporary left behind. The unkilled
runs are the shared fixtures where one matches (pretrain).

A kill "at the K-th write of PATH" goes through the benchmark's tracer, which arms
MINIGPT_FAULT=kill@1 at that write so the seam itself kills there: the same instant as kill@N
with N that write's index, named by its file so that a new write elsewhere does not move it.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks.crash_consistency import TRACER, compare_runs, leftover_temporaries
from minigpt_cli.cli.quickstart_cmd import stage_status
from minigpt_cli.engine.core.io import FAULT_ENV
from minigpt_cli.engine.runs import checkpoint as ckpt
from minigpt_cli.engine.runs.files import MODEL_FILE, STATE_FILE, load_tensors
from tests.conftest import TINY_SETS, run_cli, set_args

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
