"""The disk plan: every training verb refuses a disk without room before it writes anything.

The estimate is checked against real runs (the shared fixtures and one tiny PPO run with its
reward model): one snapshot's estimate is at or above the real snapshot folders, within 3 % for a
full model and within 20 % for a LoRA adapter (whose snapshot is mostly trainer_state.json, bounded
at 36 kB against 32 kB measured); the whole plan covers what a finished run holds. The refusal is
checked for real on a 2 MB tmpfs where the machine allows a mount namespace, and in-process with
`shutil.disk_usage` faked everywhere.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from minigpt_cli.cli import training
from minigpt_cli.cli.training import TrainingRun
from minigpt_cli.config.loader import read_run_config
from minigpt_cli.engine.data.shards import encode_to_shards
from minigpt_cli.engine.data.tokenizer import Tokenizer
from minigpt_cli.engine.resources.disk import (
    BLOCK_BYTES,
    DiskFacts,
    DiskPlan,
    on_disk,
    plan_disk,
    snapshot_counts,
)
from minigpt_cli.engine.runs import checkpoint as ckpt
from minigpt_cli.engine.runs.space import plan_run_disk
from minigpt_cli.engine.training.run_spec import RunSpec
from minigpt_cli.errors import UserError
from tests.conftest import REPO, TINY_SETS, set_args


def folder_on_disk(folder: Path) -> int:
    """What a folder takes, as the plan counts it: files in whole blocks (hard links once), and a
    block per folder."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for path in [folder, *folder.rglob("*")]:
        stat = path.lstat()
        if (stat.st_dev, stat.st_ino) in seen:
            continue
        seen.add((stat.st_dev, stat.st_ino))
        total += BLOCK_BYTES if path.is_dir() else on_disk(stat.st_size)
    return total


def fresh_plan(run: Path, where: Path, **changes: object) -> DiskPlan:
    """The plan the run's own command would have made in an empty folder `where`."""
    state = ckpt.read_state(run)
    sources = {key: value for key, value in state["sources"].items() if key != "reward_model"}
    sources.update(changes)
    return plan_run_disk(state["stage"], read_run_config(run), where, sources, resume=False)


@pytest.mark.parametrize(
    ("fixture", "within"),
    [
        ("tiny_pretrain_run", 1.03),
        ("tiny_sft_run", 1.03),
        ("tiny_lora_sft_run", 1.20),
        ("tiny_ppo_run", 1.03),
    ],
)
def test_one_snapshot_estimate_bounds_the_real_snapshots_closely(
    fixture: str, within: float, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    run = request.getfixturevalue(fixture)
    plan = fresh_plan(run, tmp_path / "fresh")
    folders = ckpt.snapshots(run)
    assert folders
    for folder in folders:
        actual = folder_on_disk(folder)
        assert actual <= plan.snapshot.total <= within * actual, (folder, plan.snapshot)
    # The whole plan covers what the finished run holds (its top-level files are hard links).
    assert folder_on_disk(run) <= plan.moments["the end"] <= plan.need
    if fixture == "tiny_ppo_run":
        assert plan.reward is not None and plan.when == "training"
        for folder in ckpt.snapshots(run / "reward"):
            actual = folder_on_disk(folder)
            assert actual <= plan.reward.snapshot.total <= within * actual


def test_a_fresh_run_holds_keep_last_plus_one_snapshots_at_its_peak() -> None:
    assert snapshot_counts(0, None, 2) == (3, 2)  # a new one is complete before the oldest goes
    assert snapshot_counts(0, 1, 2) == (1, 1)  # a run that saves once
    assert snapshot_counts(2, 1, 2) == (3, 2)  # a resume with its snapshots there: one more
    assert snapshot_counts(4, 3, 2) == (5, 2)  # keep_last lowered on resume: pruned after a save
    assert snapshot_counts(2, 0, 2) == (2, 2)  # nothing left to train


def test_without_hard_links_the_top_level_copies_are_counted(tiny_pretrain_run: Path) -> None:
    config = read_run_config(tiny_pretrain_run)
    linked = plan_disk(config, "pretrain", DiskFacts(vocab_size=600))
    copied = plan_disk(config, "pretrain", DiskFacts(vocab_size=600, hard_links=False))
    extra = copied.need - linked.need
    assert extra == linked.snapshot.total + linked.snapshot.largest
    assert "top-level copies (no hard links here)" in copied.describe()


def test_a_resumed_run_with_its_snapshots_needs_only_what_is_to_come(
    tiny_pretrain_run: Path, tmp_path: Path
) -> None:
    resumed = tmp_path / "resumed"
    shutil.copytree(tiny_pretrain_run, resumed)  # two snapshots (keep_last 2), step 30

    def plan(run_dir: Path, steps: int, resume: bool) -> DiskPlan:
        run = training.prepare(
            "pretrain",
            run_dir=resumed,
            preset=None,
            config_file=None,
            overrides={"pretrain.max_steps": steps},
            sets=None,
            resume=True,
            overwrite=False,
        )
        return plan_run_disk("pretrain", run.config, run_dir, run.saved_sources, resume=resume)

    fresh = plan(tmp_path / "fresh", 40, resume=False)
    more = plan(resumed, 40, resume=True)
    assert fresh.new_snapshots == 3 and more.new_snapshots == 1  # saves at 10..40, one to come
    assert more.terms["tokenizer"] == 0  # the run's own tokenizer is reused
    assert more.snapshot.total <= more.need < fresh.need - 2 * fresh.snapshot.total
    finished = plan(resumed, 30, resume=True)
    assert finished.new_snapshots == 0 and finished.terms["snapshots"] == 0
    assert finished.need == on_disk((resumed / "metrics.jsonl").stat().st_size)  # trimmed again


def test_shards_are_bounded_by_the_input_bytes_and_reused_ones_count_as_present(
    tiny_pretrain_run: Path, tmp_path: Path
) -> None:
    # English, Chinese, digits, and characters no 600-piece vocabulary holds (byte fallback:
    # one token per byte, the bound's worst case).
    text = "The capital of France is Paris. 小猫在睡觉。 12345\n" * 2000
    text += "".join(chr(0x1F600 + i % 64) + chr(0x4E00 + (i * 7919) % 20000) for i in range(20000))
    data = tmp_path / "corpus.txt"
    data.write_text(text, encoding="utf-8")
    run_dir = tmp_path / "run"
    sources = {"data": [str(data)], "val_data": [], "tokenizer": str(tiny_pretrain_run)}
    bound = fresh_plan(tiny_pretrain_run, run_dir, **sources).terms["shards"]
    encoded = encode_to_shards(
        Tokenizer.load(tiny_pretrain_run), [data], run_dir / "shards" / "train"
    )
    actual = folder_on_disk(run_dir / "shards" / "train") - BLOCK_BYTES
    assert encoded["total_tokens"] <= len(text.encode("utf-8")) + 1  # a token covers a byte
    assert actual <= bound <= 1.6 * actual
    # The same tokenizer and unchanged input: the encode reuses the shards, nothing new to write.
    assert fresh_plan(tiny_pretrain_run, run_dir, **sources).terms["shards"] == 0
    os.utime(data, ns=(0, 0))  # changed (as far as a plan can tell): encoded again, in place
    shard_files = sum(p.stat().st_size for p in (run_dir / "shards" / "train").glob("shard-*"))
    again = fresh_plan(tiny_pretrain_run, run_dir, **sources).terms["shards"]
    assert again == bound - shard_files  # the old shards are removed before the new ones


def _tiny_pretrain(run_dir: Path) -> list[str]:
    return [
        "pretrain",
        "--out",
        str(run_dir),
        "--max-steps",
        "30",
        "--precision",
        "fp32",
        "--device",
        "cpu",
        *set_args(TINY_SETS),
    ]


def _mount_namespace(mountpoint: Path) -> list[str] | None:
    """A command prefix that runs in a private mount namespace where `mountpoint` can hold a
    tmpfs: `unshare -m` as root, `unshare -Urm` (a user namespace) otherwise; None if neither."""
    if shutil.which("unshare") is None:
        return None
    prefixes = ([["unshare", "-m"]] if os.geteuid() == 0 else []) + [["unshare", "-Urm"]]
    for prefix in prefixes:
        probe = subprocess.run(
            [*prefix, "sh", "-c", f"mount -t tmpfs -o size=2m tmpfs '{mountpoint}'"],
            capture_output=True,
            timeout=30,
        )
        if probe.returncode == 0:
            return prefix
    return None


def test_a_run_on_a_small_disk_is_refused_before_anything_is_trained(tmp_path: Path) -> None:
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    prefix = _mount_namespace(mountpoint)
    if prefix is None:
        pytest.skip("no mount namespace here (unshare -m / -Urm refused): cannot mount a tmpfs")
    run_dir = mountpoint / "run"
    listing = tmp_path / "listing"
    command = " ".join(f"'{arg}'" for arg in [sys.executable, "-m", "minigpt_cli"])
    command += " " + " ".join(f"'{arg}'" for arg in _tiny_pretrain(run_dir))
    script = (
        f"mount -t tmpfs -o size=2m tmpfs '{mountpoint}' && cd '{REPO}' && {command}; "
        f"rc=$?; ls -A '{run_dir}' > '{listing}'; exit $rc"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [*prefix, "sh", "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 2, result.stdout + result.stderr
    line = result.stderr.strip()
    assert line.startswith(f"error: {run_dir}: needs 5.5 MB free (3 snapshots x 1.8 MB"), line
    assert "the disk has 2.1 MB free" in line and "train.keep_last is 2" in line
    assert listing.read_text().split() == []  # no tokenizer, no config: nothing was trained


def _prepared(tmp_path: Path) -> tuple[TrainingRun, RunSpec]:

    run_dir = tmp_path / "run"
    run = training.prepare(
        "pretrain",
        run_dir=run_dir,
        preset="tiny",
        config_file=None,
        overrides={"pretrain.max_steps": 30},
        sets=TINY_SETS,
        resume=False,
        overwrite=False,
    )
    spec = RunSpec(run_dir=run_dir, sources={"data": [], "val_data": [], "preset": "tiny"})
    return run, spec


def _fake_disk(monkeypatch: pytest.MonkeyPatch, free: int) -> None:
    usage = types.SimpleNamespace(total=free * 2, used=free, free=free)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage)


def test_the_refusal_names_the_numbers_and_the_engine_never_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run, spec = _prepared(tmp_path)
    _fake_disk(monkeypatch, 1_000_000)
    called = []
    with pytest.raises(UserError) as refused:
        training.execute(run, spec, lambda *args: called.append(args) or {})
    assert refused.value.exit_code == 2 and called == []
    assert str(refused.value) == (
        f"{run.run_dir}: needs 5.5 MB free (3 snapshots x 1.8 MB, tokenizer 61 kB, config 29 kB, "
        "metrics 25 kB), the disk has 1.0 MB free; free some space, keep fewer snapshots "
        "(train.keep_last is 2), or choose another --out"
    )
    assert sorted(p.name for p in run.run_dir.iterdir()) == []  # the lock is gone too


def test_a_run_that_fits_shows_its_need_beside_the_free_space(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from minigpt_cli.engine.resources import governor

    run, spec = _prepared(tmp_path)
    _fake_disk(monkeypatch, 10 * 10**9)
    monkeypatch.setattr(governor, "apply_resources", lambda *args: "threads as they were")
    called = []
    training.execute(run, spec, lambda *args: called.append(args) or {})
    assert len(called) == 1
    assert (
        "pretrain: disk: needs at most 5.5 MB (3 snapshots x 1.8 MB, tokenizer 61 kB, config "
        "29 kB, metrics 25 kB); 10.0 GB free"
    ) in capsys.readouterr().out
