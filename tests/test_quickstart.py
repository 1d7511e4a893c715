"""`minigpt quickstart`: every stage in one folder, continued rather than redone when re-run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minigpt_cli.cli import common
from minigpt_cli.cli.quickstart_cmd import (
    TRAINING_STAGES,
    _budget_seconds,
    _command_start,
    _cut_by_budget,
    _phases_to_run,
    stage_dirs,
    stage_status,
)
from minigpt_cli.config.loader import read_run_config
from minigpt_cli.config.schema import parse_duration
from minigpt_cli.engine.evaluate.report import EvalReport, RunReport, best_chat_run
from minigpt_cli.engine.runs.checkpoint import read_metrics, read_state
from minigpt_cli.engine.training import budget
from tests.conftest import TINY_SETS, run_cli, set_args

pytestmark = pytest.mark.slow

# Every stage seconds long: the tiny test model, short budgets, a small evaluation.
QUICK_SETS = [
    *TINY_SETS,
    "pretrain.max_steps=20",
    "sft.max_steps=20",
    "sft.exact_match_per_family=2",
    "dpo.max_steps=10",
    "dpo.eval_every=5",
    "dpo.exact_match_per_family=2",
    "reward.max_steps=10",
    "reward.eval_every=5",
    "rlhf.max_steps=2",
    "rlhf.rollout_batch_size=4",
    "rlhf.num_generations=2",
    "rlhf.global_batch_size=4",
    "rlhf.micro_batch_size=4",
    "rlhf.max_new_tokens=6",
    "rlhf.eval_prompts=4",
    "rlhf.samples_every=0",
    "eval.per_family=2",
    "eval.max_new_tokens=8",
    "eval.text_documents=8",
    "eval.samples=1",
]
QUICK_ARGS = ["--seed", "3", "--device", "cpu", *set_args(QUICK_SETS)]


@pytest.fixture(scope="module")
def finished_quickstart(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("quickstart") / "qs"
    # A time budget these few steps never reach: every stage plans for it and finishes first.
    result = run_cli("quickstart", "--out", out, *QUICK_ARGS, "--max-time", "10m", timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    return out, result.stdout


def test_every_stage_runs_from_its_predecessor(finished_quickstart: tuple[Path, str]) -> None:
    out, _ = finished_quickstart
    parents = {"sft": "pretrain", "dpo": "sft", "rlhf": "dpo"}
    for stage in TRAINING_STAGES:
        state = read_state(out / stage)
        assert state["finished"] is True, stage
        if stage in parents:
            assert Path(state["parent"]).resolve() == (out / parents[stage]).resolve()
    # The reward model is a run of its own inside the RLHF run, evaluated on held-out pairs.
    reward_evals = [row for row in read_metrics(out / "rlhf" / "reward") if row["kind"] == "eval"]
    assert reward_evals and "pref_accuracy" in reward_evals[-1]
    # The built-in prompts have exact answers: RLHF optimises the reward model and the rule
    # together, with GRPO (what kept every family near DPO over three seeds; README).
    rlhf_config = read_run_config(out / "rlhf").rlhf
    assert (rlhf_config.reward, rlhf_config.algorithm) == ("both", "grpo")


def test_eval_report_compares_every_stage(finished_quickstart: tuple[Path, str]) -> None:
    out, stdout = finished_quickstart
    report = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    paths = [Path(run["path"]).resolve() for run in report["runs"]]
    assert paths == [(out / stage).resolve() for stage in TRAINING_STAGES]
    for run in report["runs"]:
        assert run["metrics"]["bpb"] > 0
    # The run to chat with is the one the rule picks from the measured table, whichever stage.
    best = best_chat_run(_report_from_json(report))
    assert best is not None and f"minigpt chat {best.path}" in stdout
    times = json.loads((out / "quickstart.json").read_text(encoding="utf-8"))
    assert set(times["seconds"]) == {*TRAINING_STAGES, "eval"}
    assert sum(times["seconds"].values()) <= times["total_seconds"]
    # The budget reached every run as its max_time (each config.toml keeps it, for --resume),
    # and these few steps all finished before theirs.
    assert (times["budget"]["seconds"], times["cut_by_budget"]) == (600.0, {})
    assert set(times["budget"]["loop_seconds"]) == {*TRAINING_STAGES, "reward"}
    # Each stage's first loop was timed from the stage's start: this machine's speed.
    assert set(times["budget"]["before_loop_seconds"]) == {"pretrain", "sft", "dpo", "reward"}
    limits = {}
    for name, folder in {**stage_dirs(out), "reward": out / "rlhf" / "reward"}.items():
        recorded = read_run_config(folder).stage_train(name).max_time
        assert recorded is not None, name
        limits[name] = parse_duration(recorded)
    # Each max_time is the loop's seconds plus the run's own seconds before its loop (counted
    # against it too), both rounded to 0.1 s.
    for name, seconds in times["budget"]["loop_seconds"].items():
        assert seconds - 0.1 <= limits[name] <= seconds + 5, name
    # Pretraining got its measured share; its few steps left the rest to the loops after it.
    # (Between two later loops the order depends on how long the stages between them took:
    # each covered loop gets what is left less the later loops' measured needs.)
    later = [limits[name] for name in ("sft", "dpo", "reward", "rlhf")]
    assert 0 < limits["pretrain"] < min(later) and max(later) < 600


def test_the_budget_flag_and_the_phases_still_to_run(
    finished_quickstart: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Run as `minigpt`, the clock starts with the process (counted back at most 10 s); called in
    # process, with the call.
    monkeypatch.setattr(common, "COMMAND_STARTED", [(1000.0, time.time())])
    assert 990.0 <= _command_start() < 1000.0
    monkeypatch.setattr(common, "COMMAND_STARTED", [])
    assert abs(_command_start() - time.perf_counter()) < 1.0
    assert _budget_seconds(None, "none") is None
    assert _budget_seconds("90s", "none") == 90.0
    assert _budget_seconds(None, "5m") == 300.0  # --set quickstart.max_time=5m
    assert _budget_seconds("none", "5m") is None
    assert _phases_to_run(stage_dirs(tmp_path)) == list(budget.PHASES)
    assert _phases_to_run(stage_dirs(finished_quickstart[0])) == ["eval"]
    # The stages the budget stopped, read from their trainer states (reward is rlhf's sub-run).
    dirs = stage_dirs(tmp_path / "cut")
    states = {
        dirs["pretrain"]: {"step": 471, "total_steps": 1200, "stop_reason": "max_time"},
        dirs["sft"]: {"step": 1200, "total_steps": 1200, "stop_reason": "max_steps"},
        dirs["rlhf"] / "reward": {"step": 51, "total_steps": 150, "stop_reason": "max_time"},
    }
    for folder, state in states.items():
        folder.mkdir(parents=True)
        (folder / "trainer_state.json").write_text(json.dumps(state), encoding="utf-8")
    assert _cut_by_budget(dirs, ["pretrain", "sft", "reward", "eval"]) == {
        "pretrain": (471, 1200),
        "reward": (51, 150),
    }
    result = run_cli("quickstart", "--out", tmp_path / "qs", "--max-time", "soon")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --max-time: 'soon' is not a duration (use seconds, or e.g. 90s, 10m, 2h)"
    ]
    assert not (tmp_path / "qs").exists()


def test_rerun_skips_finished_stages(finished_quickstart: tuple[Path, str]) -> None:
    out, _ = finished_quickstart
    before = _weight_times(out)
    result = run_cli("quickstart", "--out", out, *QUICK_ARGS, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    for stage in (*TRAINING_STAGES, "reward"):
        assert f"{stage}: finished earlier" in result.stdout
    times = json.loads((out / "quickstart.json").read_text(encoding="utf-8"))
    assert set(times["seconds"]) == {"eval"}, "a skipped stage was timed as if it ran"
    assert times["budget"] is None  # none unless asked for ([quickstart] max_time = "none")
    assert _weight_times(out) == before


def _weight_times(out: Path) -> dict[str, int]:
    return {s: (out / s / "model.safetensors").stat().st_mtime_ns for s in TRAINING_STAGES}


def test_stage_status_reads_the_run_directory(
    finished_quickstart: tuple[Path, str], tmp_path: Path
) -> None:
    out, _ = finished_quickstart
    assert stage_status(out / "sft") == "finished"
    assert stage_status(tmp_path / "missing") == "start"
    (tmp_path / "empty").mkdir()
    assert stage_status(tmp_path / "empty") == "start"


def test_a_stage_stopped_before_its_first_checkpoint_is_redone(
    finished_quickstart: tuple[Path, str], tmp_path: Path
) -> None:
    out = tmp_path / "qs"
    shutil.copytree(finished_quickstart[0], out)
    # DPO as a kill (or a full disk) leaves it before its first save: config and metrics written,
    # no snapshot. Nothing to resume; without a restart the pipeline could never go on.
    for leftover in out.joinpath("dpo").iterdir():
        if leftover.name not in ("config.toml", "metrics.jsonl", "tokenizer.model"):
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    assert stage_status(out / "dpo") == "start"
    result = run_cli("quickstart", "--out", out, *QUICK_ARGS, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert stage_status(out / "dpo") == "finished"
    assert "rlhf: finished earlier" in result.stdout


def test_ctrl_c_mid_stage_resumes_that_stage(tmp_path: Path) -> None:
    out = tmp_path / "qs"
    # A longer SFT so the interrupt lands inside it, after its first checkpoint.
    args = [*QUICK_ARGS, "--set", "sft.max_steps=400", "--set", "sft.save_every=5"]
    env = {**os.environ, "MINIGPT_CACHE_DIR": str(tmp_path / "cache")}
    process = subprocess.Popen(
        [sys.executable, "-m", "minigpt_cli", "quickstart", "--out", str(out), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        # Ctrl-C as at a terminal, even when pytest runs as a background job (SIGINT ignored,
        # which a child inherits).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 300
    while not (out / "sft" / "trainer_state.json").exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "SFT never wrote a checkpoint"
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stdout + stderr
    assert f"minigpt quickstart --out {out}" in stderr
    assert stage_status(out / "pretrain") == "finished"
    assert stage_status(out / "sft") == "resume"
    stopped_at = read_state(out / "sft")["step"]

    # Continue with a short SFT budget: pretraining is skipped, SFT resumes where it stopped.
    again = [*QUICK_ARGS, "--set", f"sft.max_steps={stopped_at + 5}", "--set", "sft.save_every=5"]
    result = run_cli("quickstart", "--out", out, *again, env=env, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "pretrain: finished earlier" in result.stdout
    assert "sft: resuming" in result.stdout
    steps = [row["step"] for row in read_metrics(out / "sft") if row["kind"] == "train"]
    assert steps == sorted(set(steps)), "resumed SFT repeated or skipped logged steps"
    assert read_state(out / "sft")["step"] == stopped_at + 5


def test_eval_scores_every_stage_with_the_reward_model(
    finished_quickstart: tuple[Path, str], tmp_path: Path
) -> None:
    import torch

    from minigpt_cli.engine.data.chat_template import render_response
    from minigpt_cli.engine.data.tokenizer import Tokenizer
    from minigpt_cli.engine.evaluate.answers import load_reward_judge, reward_metrics
    from minigpt_cli.engine.inference.scoring import score_texts
    from minigpt_cli.engine.metrics.text import Answer
    from minigpt_cli.errors import UserError

    out, _ = finished_quickstart
    report = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    assert all("reward" in run["metrics"] for run in report["runs"])
    assert "reward" in report["data"]

    judge = load_reward_judge(out / "rlhf" / "reward", out / "pretrain", torch.device("cpu"))
    tokenizer = Tokenizer.load(out / "pretrain")
    asked = ({"role": "user", "content": "What is the capital of France?"},)
    answers = [
        Answer("facts", "q", "Paris", "Paris", True, asked),
        Answer("facts", "q", "Paris", "Rome", False, asked),
        Answer("addition", "q", "3", "4", False, asked),
    ]
    sequences = [
        render_response(list(a.prompt_messages), a.prediction, tokenizer)[0] for a in answers
    ]
    scores = score_texts(judge.model, sequences, pad_id=tokenizer.pad_id).tolist()
    metrics = reward_metrics(judge, tokenizer, answers)
    assert metrics["reward"] == pytest.approx(sum(scores) / 3, abs=1e-4)
    assert metrics["reward/facts"] == pytest.approx((scores[0] + scores[1]) / 2, abs=1e-4)
    assert metrics["reward/addition"] == pytest.approx(scores[2], abs=1e-4)

    other = tmp_path / "other-run"
    other.mkdir()
    (other / "tokenizer.model").write_bytes(b"another tokenizer")
    with pytest.raises(UserError, match="another tokenizer"):
        load_reward_judge(out / "rlhf" / "reward", other, torch.device("cpu"))


def _report_from_json(data: dict) -> EvalReport:
    return EvalReport([RunReport(**run) for run in data["runs"]], data["data"], data["options"])


def _run(
    name: str, exact_match: float | None, reward: float | None, chat: bool = True
) -> RunReport:
    metrics = {} if exact_match is None else {"exact_match": exact_match}
    if reward is not None:
        metrics["reward"] = reward
    return RunReport(name, f"runs/{name}", name, None, chat, metrics)


def test_best_chat_run_follows_the_measurements_not_the_position() -> None:
    runs = [
        _run("pretrain", 0.0, -2.0, chat=False),
        _run("sft", 0.75, -0.2),
        _run("dpo", 0.76, -0.3),
        _run("rlhf", 0.72, 0.5),  # the highest reward, but it answers worse: not chosen
    ]
    assert best_chat_run(EvalReport(runs, {}, {})).name == "dpo"
    runs[3] = _run("rlhf", 0.76, -0.1)  # ties dpo on exact match: the reward model decides
    assert best_chat_run(EvalReport(runs, {}, {})).name == "rlhf"
    runs[3] = _run("rlhf", 0.76, -0.3)  # equal in both: the later stage
    assert best_chat_run(EvalReport(runs, {}, {})).name == "rlhf"
    assert best_chat_run(EvalReport([runs[0]], {}, {})) is None  # no chat run to name
