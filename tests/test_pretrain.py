"""`minigpt pretrain` end to end: it learns, writes the run-directory contract, resumes exactly."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import SHARED_DATA, TINY_SETS, run_cli, set_args

CONTRACT_KEYS = {"stage", "kind", "step", "tokens", "time"}
TRAIN_KEYS = {
    "loss",
    "lr",
    "grad_norm",
    "tokens_per_sec",
    "mfu",
    "rss_mb",
    "rss_cap_mb",
    "cpu_pct",
    "cpu_cap_pct",
    "micro_batch_size",
    "eta_sec",
}
FP32 = ["--precision", "fp32", "--device", "cpu"]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_directory_contract(tiny_pretrain_run: Path) -> None:
    for name in (
        "config.toml",
        "tokenizer.model",
        "model.safetensors",
        "optimizer.safetensors",
        "trainer_state.json",
        "metrics.jsonl",
    ):
        assert (tiny_pretrain_run / name).is_file(), name
    state = json.loads((tiny_pretrain_run / "trainer_state.json").read_text())
    assert state["step"] == 30 and state["finished"] is True and state["chat"] is False
    assert state["micro_batch_size"] == 4
    snapshots = sorted(p.name for p in (tiny_pretrain_run / "checkpoints").iterdir())
    assert snapshots == ["step-00000020", "step-00000030"]  # keep_last = 2
    weights = load_file(str(tiny_pretrain_run / "model.safetensors"))
    assert "model.embed_tokens.weight" in weights and "model.norm.weight" in weights


def test_metrics_follow_the_contract_and_loss_falls(tiny_pretrain_run: Path) -> None:
    rows = metrics(tiny_pretrain_run)
    assert all(row.keys() >= CONTRACT_KEYS for row in rows)
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in train] == [5, 10, 15, 20, 25, 30]
    assert all(r.keys() >= TRAIN_KEYS for r in train)
    assert train[-1]["loss"] < train[0]["loss"] - 0.5
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert 0 < evals[-1]["val_bpb"] < 8
    tokens = [r["tokens"] for r in train]
    assert tokens == sorted(tokens) and tokens[-1] == 30 * 8 * 64
    # The folder says what the steps ran in, before the first of them (`--precision fp32`).
    (precision,) = [r for r in rows if r.get("event") == "precision"]
    assert precision["step"] == 0 and precision["message"].startswith("fp32")


def test_existing_run_is_refused_without_resume_or_overwrite(tiny_pretrain_run: Path) -> None:
    result = run_cli("pretrain", "--out", tiny_pretrain_run, *set_args(TINY_SETS))
    assert result.returncode == 2
    assert "already holds a run" in result.stderr and "--resume" in result.stderr
    assert "Traceback" not in result.stderr


def test_resuming_a_finished_run_with_nothing_left_exits_zero(tiny_pretrain_run: Path) -> None:
    result = run_cli("pretrain", "--out", tiny_pretrain_run, "--resume")
    assert result.returncode == 0, result.stderr
    assert "already finished at step 30" in result.stdout


def test_bad_data_line_exits_2_naming_file_and_line(tmp_path: Path) -> None:
    data = tmp_path / "corpus.jsonl"
    data.write_text('{"text": "fine"}\n{"text": 3}\n', encoding="utf-8")
    result = run_cli("pretrain", "--data", data, "--out", tmp_path / "run", *set_args(TINY_SETS))
    assert result.returncode == 2
    assert f"{data}:2:" in result.stderr
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_config_that_does_not_match_the_weights_is_a_clean_error(
    tiny_pretrain_run: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.toml", "tokenizer.model", "trainer_state.json"):
        (broken / name).write_bytes((tiny_pretrain_run / name).read_bytes())
    config = (broken / "config.toml").read_text().replace("n_layer = 2", "n_layer = 3")
    (broken / "config.toml").write_text(config)
    (broken / "model.safetensors").write_bytes(
        (tiny_pretrain_run / "model.safetensors").read_bytes()
    )
    result = run_cli("generate", broken, "--prompt", "hi", "--max-new-tokens", "2")
    assert result.returncode == 2
    assert "do not match" in result.stderr and "Traceback" not in result.stderr


def test_from_run_continues_from_the_parent_weights(
    tiny_pretrain_run: Path, tmp_path: Path
) -> None:
    child = tmp_path / "child"
    result = run_cli(
        "pretrain",
        "--from",
        tiny_pretrain_run,
        "--out",
        child,
        "--max-steps",
        "5",
        *FP32,
        *set_args(TINY_SETS),
    )
    assert result.returncode == 0, result.stderr
    parent_rows = [r for r in metrics(tiny_pretrain_run) if r["kind"] == "train"]
    child_rows = [r for r in metrics(child) if r["kind"] == "train"]
    # A fresh model starts near ln(vocab) = 6.4; the child starts where the parent ended.
    assert child_rows[0]["loss"] < parent_rows[0]["loss"] - 0.5
    state = json.loads((child / "trainer_state.json").read_text())
    assert state["parent"] == str(tiny_pretrain_run)
    assert (child / "tokenizer.model").read_bytes() == (
        tiny_pretrain_run / "tokenizer.model"
    ).read_bytes()


def _wait_for_step(run_dir: Path, step: int, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    state = run_dir / "trainer_state.json"
    while time.monotonic() < deadline:
        if state.exists():
            try:
                if json.loads(state.read_text())["step"] >= step:
                    return
            except (json.JSONDecodeError, KeyError):
                pass
        if process.poll() is not None:
            raise AssertionError(process.stdout.read() if process.stdout else "process ended")
        time.sleep(0.005)
    raise AssertionError(f"no checkpoint at step {step} within {timeout}s")


def _popen_pretrain(*args: str | Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "minigpt_cli", "pretrain", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # Ctrl-C as at a terminal, even when pytest runs as a background job (SIGINT ignored,
        # which a child inherits).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def test_ctrl_c_saves_a_checkpoint_and_prints_the_resume_command(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    process = _popen_pretrain("--out", run_dir, "--max-steps", 5000, *FP32, *set_args(TINY_SETS))
    try:
        _wait_for_step(run_dir, 10, process, timeout=240)
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, output
    assert f"minigpt pretrain --out {run_dir} --resume" in output
    state = json.loads((run_dir / "trainer_state.json").read_text())
    assert state["step"] >= 10 and state["finished"] is False
    result = run_cli("pretrain", "--out", run_dir, "--resume", "--max-steps", state["step"] + 2)
    assert result.returncode == 0, result.stderr
    assert json.loads((run_dir / "trainer_state.json").read_text())["step"] == state["step"] + 2


def test_larger_max_steps_extends_a_finished_run(tiny_pretrain_run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(tiny_pretrain_run), str(copy)], check=True)
    result = run_cli("pretrain", "--out", copy, "--resume", "--max-steps", "34")
    assert result.returncode == 0, result.stderr
    state = json.loads((copy / "trainer_state.json").read_text())
    assert state["step"] == 34 and state["finished"] is True
    rows = metrics(copy)
    assert rows[-1]["step"] == 34


def test_chinese_text_trains(tmp_path: Path) -> None:
    source = SHARED_DATA / "zh_classical_poetry.jsonl"
    if not source.exists():
        pytest.skip("shared data not present")
    data = tmp_path / "zh.jsonl"
    data.write_text("".join(source.read_text(encoding="utf-8").splitlines(True)[:600]), "utf-8")
    run_dir = tmp_path / "zh-run"
    result = run_cli(
        "pretrain",
        "--data",
        data,
        "--out",
        run_dir,
        "--max-steps",
        "12",
        *FP32,
        *set_args(TINY_SETS),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "zh" in result.stdout  # characters-per-token reported for Chinese
    rows = metrics(run_dir)
    train = [r for r in rows if r["kind"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"]
    final = [r for r in rows if r["kind"] == "eval"][-1]
    assert 0 < final["val_bpb"] < 8


def _estimate_mb(micro_batch: int, data_bytes: int) -> float:
    from minigpt_cli.config.loader import load_config
    from minigpt_cli.engine.resources.estimate import estimate_training_memory

    config = load_config("tiny", sets=GOVERNOR_SETS)
    estimate = estimate_training_memory(
        config.model,
        600,
        micro_batch_size=micro_batch,
        precision="fp32",
        global_batch_size=8,
        data_bytes=data_bytes,
        eval_sequences=8,
    )
    return estimate.total / 2**20


GOVERNOR_SETS = [
    *TINY_SETS,
    "model.n_embd=128",
    "model.context_length=512",
    "train.micro_batch_size=8",
    "train.global_batch_size=8",
]


def test_memory_cap_lowers_the_micro_batch_and_keeps_the_global_batch(tmp_path: Path) -> None:
    # A cap between the estimates for micro-batch 8 and 4 (the token buffer is < 1 MB either way),
    # nearer 8's, so 4's real peak stays clear of the in-training back-off line.
    low, high = _estimate_mb(4, 1_000_000), _estimate_mb(8, 0)
    assert high > 1.15 * low
    cap_mb = low + 0.75 * (high - low)
    run_dir = tmp_path / "capped"
    result = run_cli(
        "pretrain",
        "--out",
        run_dir,
        "--max-steps",
        "3",
        "--max-memory",
        f"{cap_mb:.1f}MiB",
        *FP32,
        *set_args(GOVERNOR_SETS),
    )
    assert result.returncode == 0, result.stderr
    assert "training with micro-batch 4 x 2 accumulation" in result.stdout
    # The plan chose 4 before the first step; the in-training governor may lower it further on a
    # machine whose process weighs more than estimated (test_governor measures that from outside).
    state = json.loads((run_dir / "trainer_state.json").read_text())
    assert state["micro_batch_size"] in (1, 2, 4)
    rows = metrics(run_dir)
    assert any(r.get("event") == "governor" for r in rows)
    train = [r for r in rows if r["kind"] == "train"]
    assert train[0]["micro_batch_size"] == 4 or any(
        "micro-batch 4 ->" in r.get("message", "") for r in rows
    )
    assert train[-1]["tokens"] == 3 * 8 * 512  # the global batch did not change


def test_a_cap_nothing_fits_under_exits_2_before_training(tmp_path: Path) -> None:
    run_dir = tmp_path / "tiny-cap"
    result = run_cli(
        "pretrain", "--out", run_dir, "--max-memory", "64MB", *FP32, *set_args(GOVERNOR_SETS)
    )
    assert result.returncode == 2
    assert "does not fit in memory" in result.stderr and "--max-memory" in result.stderr
    assert not (run_dir / "model.safetensors").exists()


def test_threads_and_nice_flags_apply_and_resume_keeps_the_thread_count(
    tiny_pretrain_run: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "threads"
    # Nice 1, not more: a niced run beside the other test worker waits for a core most of the
    # time (nice 5 made this the suite's slowest test).
    result = run_cli(
        "pretrain",
        "--out",
        run_dir,
        "--max-steps",
        "2",
        "--threads",
        "1",
        "--nice",
        "1",
        "--tokenizer",
        tiny_pretrain_run,
        *FP32,
        *set_args(TINY_SETS),
    )
    assert result.returncode == 0, result.stderr
    assert "1 threads (set explicitly)" in result.stdout
    assert json.loads((run_dir / "trainer_state.json").read_text())["threads"] == 1
    config = (run_dir / "config.toml").read_text()
    assert "threads = 1" in config and "nice = 1" in config
    resumed = run_cli("pretrain", "--out", run_dir, "--resume", "--max-steps", "3")
    assert resumed.returncode == 0, resumed.stderr
    assert "1 threads" in resumed.stdout
