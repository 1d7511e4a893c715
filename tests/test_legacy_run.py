"""Run directories written by an older minigpt (commit 0935fab) still load, generate, evaluate and
resume.

`tests/data/legacy-0935fab/` holds a 6-step pretraining run and a 4-step LoRA SFT child of it,
exactly as that commit wrote them (its README has the commands). Everything here goes through the
command line only, never through engine imports, so the tests hold whatever the engine's modules
are called. The expected numbers are what commit 0935fab itself produced from these files (fp32,
CPU, one thread); a tolerance allows for another CPU's float reductions, and is far below what a
wrongly loaded weight, optimizer moment or data position changes.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import run_cli

LEGACY = Path(__file__).resolve().parent / "data" / "legacy-0935fab"
COMMIT = "legacy-0935fab"

PROMPT = "The capital of France is"
# `generate pretrain -p PROMPT --greedy -n 12 --no-echo` at 0935fab.
EXPECTED_GREEDY = " is is is is is is is is is is is is"
# The built-in corpus these runs were trained on changed after 0935fab (sums are now worked digit
# by digit), so the held-out text they are measured on and the batches a resumed run continues
# with are today's: the numbers below are what the current corpus gives with these runs' saved
# weights, optimizer moments and data positions (0935fab itself measured 290.963 / 292.264 and
# 5.568398 / 5.526235 / 5.595860 on its corpus).
# `eval pretrain sft-lora --per-family 2`: held-out perplexity of each run.
EXPECTED_PPL = {"pretrain": 272.43, "sft-lora": 272.044}
# `pretrain --resume --max-steps 9`: the train loss of the three new steps. Resuming with fresh
# AdamW moments, or from the first batch of the data again, gives other losses (checked at 0935fab:
# 5.5354 and 5.6090 for steps 8 and 9; 5.4065 at step 7).
EXPECTED_RESUMED_LOSS = {7: 5.559337, 8: 5.611345, 9: 5.587172}


@pytest.fixture
def legacy(tmp_path: Path) -> Path:
    """A private copy of the legacy runs (training writes into them), beside each other as
    written."""
    root = tmp_path / COMMIT
    shutil.copytree(LEGACY, root, ignore=shutil.ignore_patterns("README.md"))
    return root


def ok(result) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def rows(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [row for row in map(json.loads, lines) if row.get("kind") == kind]


def state(run_dir: Path) -> dict:
    return json.loads((run_dir / "trainer_state.json").read_text(encoding="utf-8"))


def test_legacy_data_is_as_written() -> None:
    """The committed runs are complete and the child names its parent by a relative path."""
    for name in ("config.toml", "tokenizer.model", "tokenizer.json", "trainer_state.json"):
        assert (LEGACY / "pretrain" / name).is_file()
        assert (LEGACY / "sft-lora" / name).is_file()
    assert (LEGACY / "pretrain" / "model.safetensors").is_file()
    assert (LEGACY / "sft-lora" / "adapter.safetensors").is_file()
    assert not (LEGACY / "sft-lora" / "model.safetensors").exists()  # unmerged: needs its parent
    assert state(LEGACY / "pretrain")["step"] == 6
    assert state(LEGACY / "sft-lora")["step"] == 4
    assert state(LEGACY / "sft-lora")["parent"] == "pretrain"


def test_legacy_pretrain_generates_deterministically(legacy: Path) -> None:
    args = ("generate", legacy / "pretrain", "-p", PROMPT, "--greedy", "-n", "12", "--no-echo")
    first = ok(run_cli(*args, "--device", "cpu", cwd=legacy.parent))
    second = ok(run_cli(*args, "--device", "cpu", cwd=legacy.parent))
    assert first.strip()
    assert first == second
    assert first.rstrip("\n") == EXPECTED_GREEDY


def test_legacy_runs_evaluate(legacy: Path) -> None:
    """`eval --json` of both runs: finite perplexities as 0935fab measured them; the LoRA child
    loads as parent + adapter (its perplexity differs from the parent's) and finds its parent."""
    out = ok(
        run_cli(
            "eval",
            f"{COMMIT}/pretrain",
            f"{COMMIT}/sft-lora",
            "--json",
            "--per-family",
            "2",
            "--samples",
            "0",
            "--device",
            "cpu",
            cwd=legacy.parent,
        )
    )
    report = json.loads(out)
    runs = {run["name"]: run for run in report["runs"]}
    assert set(runs) == set(EXPECTED_PPL)
    for name, expected in EXPECTED_PPL.items():
        metrics = runs[name]["metrics"]
        assert math.isfinite(metrics["ppl"]) and math.isfinite(metrics["bpb"])
        assert metrics["ppl"] == pytest.approx(expected, rel=1e-4)
        assert 0.0 <= metrics["exact_match"] <= 1.0
    assert runs["pretrain"]["metrics"]["ppl"] != runs["sft-lora"]["metrics"]["ppl"]
    assert runs["pretrain"]["stage"] == "pretrain" and runs["pretrain"]["chat"] is False
    assert runs["sft-lora"]["stage"] == "sft" and runs["sft-lora"]["chat"] is True
    assert runs["sft-lora"]["parent"] == "pretrain"
    # Preference is scored against the parent run, which therefore was found.
    assert runs["sft-lora"]["pref_score"] == "parent_reward"
    assert runs["pretrain"]["pref_score"] == "mean_logprob"


def test_legacy_pretrain_resumes(legacy: Path) -> None:
    run_dir = legacy / "pretrain"
    before = rows(run_dir, "train")
    old_last = max(row["step"] for row in before)
    assert old_last == state(run_dir)["step"] == 6
    result = run_cli("pretrain", "--out", "pretrain", "--resume", "--max-steps", "9", cwd=legacy)
    ok(result)
    assert "resuming to step 9" in result.stdout + result.stderr
    after = state(run_dir)
    assert after["step"] == 9 and after["finished"] is True
    assert after["tokens"] == 9 * 128  # 4 sequences x 32 tokens a step, counted from the saved 768
    train = rows(run_dir, "train")
    assert train[: len(before)] == before  # the old rows are kept as they were
    new = train[len(before) :]
    assert [row["step"] for row in new] == [7, 8, 9]  # continued, not restarted
    for row in new:
        assert row["loss"] == pytest.approx(EXPECTED_RESUMED_LOSS[row["step"]], abs=1e-3)
    assert rows(run_dir, "eval")[-1]["step"] == 9
    assert (run_dir / "checkpoints" / "step-00000009").is_dir()


def test_legacy_lora_child_generates(legacy: Path) -> None:
    """The adapter-only child loads through its parent, found next to it (the working directory
    is elsewhere), in the chat template and as plain text."""
    child = legacy / "sft-lora"
    raw = ("generate", child, "-p", PROMPT, "--greedy", "-n", "12", "--raw", "--no-echo")
    assert ok(run_cli(*raw, "--device", "cpu", cwd=legacy.parent)).strip()
    chat = run_cli(
        "generate",
        child,
        "-p",
        "What is 2+3?",
        "--greedy",
        "-n",
        "6",
        "-v",
        "--device",
        "cpu",
        cwd=legacy.parent,
    )
    ok(chat)
    produced = re.search(r"(\d+) tokens in", chat.stderr)
    assert produced and int(produced.group(1)) > 0, chat.stderr


def test_legacy_lora_child_without_parent_is_refused(tmp_path: Path) -> None:
    """The parent lookup is really used: the child alone cannot load."""
    shutil.copytree(LEGACY / "sft-lora", tmp_path / "sft-lora")
    result = run_cli("generate", "sft-lora", "-p", "hi", "-n", "2", cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "parent run pretrain" in result.stderr


def test_legacy_lora_child_resumes_with_its_own_settings(legacy: Path) -> None:
    """`sft --resume` without --from finds the recorded parent (relative to the working
    directory, as the run was made) and reads the saved config as that version meant it (no text
    mix: `SAVED_RUN_DEFAULTS`). A checkpoint of that version records only how many examples it
    trained on, and today's built-in records at its context of 32 tokens number the same (116,
    though sums are worked out since), so it cannot tell the data changed and continues; newer
    checkpoints also record the examples' fingerprint and refuse
    (`test_sft_cmd.py::test_resume_on_changed_examples_is_refused`)."""
    run_dir = legacy / "sft-lora"
    assert "fingerprint" not in state(run_dir)["data_state"]
    result = run_cli("sft", "--out", "sft-lora", "--resume", "--max-steps", "6", cwd=legacy)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "text mix" not in result.stdout + result.stderr  # the run's own setting: none
    assert "116 examples" in result.stdout + result.stderr
    assert state(run_dir)["step"] == 6
    assert [row["step"] for row in rows(run_dir, "train")][-2:] == [5, 6]
