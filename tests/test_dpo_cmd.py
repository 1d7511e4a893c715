"""`minigpt dpo` end to end: preference metrics in the contract, LoRA continuation, exact resume."""

from __future__ import annotations

import shutil
from pathlib import Path

from safetensors.torch import load_file

from minigpt_cli.engine.model.lora import has_lora
from minigpt_cli.engine.runs.load import load_run
from tests.conftest import DPO_SETS, run_cli, set_args
from tests.test_sft_cmd import FP32, rows

PREFERENCE_KEYS = {"chosen_reward", "rejected_reward", "margin", "pref_accuracy"}


def _dpo(parent: Path, out: Path, *extra: str) -> None:
    result = run_cli("dpo", "--from", parent, "--out", out, *FP32, *set_args(DPO_SETS), *extra)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dpo_logs_preference_metrics_and_prefers_the_chosen_replies(
    tiny_sft_run: Path, tiny_dpo_run: Path
) -> None:
    run_dir = tiny_dpo_run  # 20 steps, --beta 0.5
    train = rows(run_dir, "train")
    assert train[0].keys() >= PREFERENCE_KEYS
    assert train[-1]["margin"] > train[0]["margin"]
    evals = rows(run_dir, "eval")
    assert evals[-1].keys() >= PREFERENCE_KEYS and "exact_match/addition" in evals[-1]
    assert evals[-1]["pref_accuracy"] > 0.5  # chance on held-out pairs is 0.5 (ties count wrong)
    assert "beta = 0.5" in (run_dir / "config.toml").read_text()
    assert load_run(run_dir).state["parent"] == str(tiny_sft_run)


def test_pairs_that_fill_the_whole_context_train(tiny_sft_run: Path, tmp_path: Path) -> None:
    # Replies cut to the context: a sequence of context + 1 ids is read as `context` of them,
    # which the memory plan must accept (it once counted the extra target id and refused).
    import json

    long_reply = " ".join(["apple", "pear", "plum"] * 60)
    records = [
        {"prompt": f"List fruit {i}.", "chosen": long_reply, "rejected": "No."} for i in range(6)
    ]
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    run_dir = tmp_path / "dpo-long"
    _dpo(tiny_sft_run, run_dir, "--data", str(data), "--max-steps", "2")
    assert rows(run_dir, "train")[-1]["step"] == 2


def test_a_bad_pair_line_exits_2_naming_file_and_line(tiny_sft_run: Path, tmp_path: Path) -> None:
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        '{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": 1}\n'
    )
    result = run_cli("dpo", "--from", tiny_sft_run, "--data", data, "--out", tmp_path / "r")
    assert result.returncode == 2
    assert f"{data}:2:" in result.stderr and "Traceback" not in result.stderr


def test_dpo_on_a_lora_run_trains_the_same_adapter_and_resumes_exactly(
    tiny_lora_sft_run: Path, tmp_path: Path
) -> None:
    lora_sft = tiny_lora_sft_run  # a finished LoRA SFT run (shared: only read here)
    steps = ["--max-steps", "10", "--set", "train.save_every=5", "--set", "train.keep_last=3"]
    straight = tmp_path / "straight"
    _dpo(lora_sft, straight, *steps)
    assert (straight / "adapter.safetensors").exists()
    assert not (straight / "model.safetensors").exists()
    before = load_file(str(lora_sft / "adapter.safetensors"))
    after = load_file(str(straight / "adapter.safetensors"))
    assert before.keys() == after.keys()  # the same adapter, trained further
    assert any(not before[k].equal(after[k]) for k in before)
    assert has_lora(load_run(straight).model)

    died = tmp_path / "died"
    shutil.copytree(straight, died)
    for name in ("adapter.safetensors", "optimizer.safetensors", "trainer_state.json"):
        (died / name).unlink()
    shutil.rmtree(died / "checkpoints" / "step-00000010")
    result = run_cli("dpo", "--out", died, "--resume")
    assert result.returncode == 0, result.stdout + result.stderr
    resumed = load_file(str(died / "adapter.safetensors"))
    for name in after:
        assert after[name].equal(resumed[name]), name
    assert [r["loss"] for r in rows(straight, "train")] == [r["loss"] for r in rows(died, "train")]
