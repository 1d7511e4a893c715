"""`minigpt sft` end to end: the run contract, held-out exact match, LoRA runs, exact resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from minigpt_cli.engine.runs.load import load_run
from tests.conftest import FINETUNE_SETS, run_cli, set_args

FP32 = ["--precision", "fp32", "--device", "cpu"]


def rows(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_sft_run_records_its_parent_and_chat_and_learns(
    tiny_sft_run: Path, tiny_pretrain_run: Path
) -> None:
    state = json.loads((tiny_sft_run / "trainer_state.json").read_text())
    assert state["chat"] is True and state["finished"] is True
    assert state["parent"] == str(tiny_pretrain_run)
    assert (tiny_sft_run / "tokenizer.model").read_bytes() == (
        tiny_pretrain_run / "tokenizer.model"
    ).read_bytes()
    config = (tiny_sft_run / "config.toml").read_text()
    assert "[sft]" in config
    # The shape is the parent's, whatever the preset says.
    assert load_run(tiny_sft_run).config.model == load_run(tiny_pretrain_run).config.model
    train = rows(tiny_sft_run, "train")
    assert train[-1]["loss"] < train[0]["loss"]
    final = rows(tiny_sft_run, "eval")[-1]
    families = {k for k in final if k.startswith("exact_match/")}
    assert families == {
        "exact_match/addition",
        "exact_match/facts",
        "exact_match/string_ops",
        "exact_match/translation",
    }
    assert all(0.0 <= final[k] <= 1.0 for k in families)
    first_eval = rows(tiny_sft_run, "eval")[0]
    assert final["val_loss"] < first_eval["val_loss"] or final["step"] == first_eval["step"]


def test_sft_needs_a_parent_run(tmp_path: Path) -> None:
    result = run_cli("sft", "--out", tmp_path / "x")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: sft needs --from RUN, the run to start from (e.g. runs/pretrain-tiny)"
    )
    result = run_cli("sft", "--from", tmp_path / "missing", "--out", tmp_path / "x")
    assert result.returncode == 2 and "not a run directory" in result.stderr


def test_a_bad_sft_line_exits_2_naming_file_and_line(
    tiny_pretrain_run: Path, tmp_path: Path
) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    result = run_cli("sft", "--from", tiny_pretrain_run, "--data", data, "--out", tmp_path / "r")
    assert result.returncode == 2
    assert f"{data}:2:" in result.stderr and "Traceback" not in result.stderr


def _sft(parent: Path, out: Path, *extra: str) -> None:
    result = run_cli("sft", "--from", parent, "--out", out, *FP32, *set_args(FINETUNE_SETS), *extra)
    assert result.returncode == 0, result.stdout + result.stderr


def test_lora_trains_only_a_small_adapter_and_merging_changes_nothing(
    tiny_pretrain_run: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "lora"
    _sft(tiny_pretrain_run, run_dir, "--lora", "--lora-r", "4", "--merge", "--max-steps", "6")
    adapter = load_file(str(run_dir / "adapter.safetensors"))
    merged_weights = load_file(str(run_dir / "model.safetensors"))
    adapter_size = sum(t.numel() for t in adapter.values())
    model_size = sum(t.numel() for t in merged_weights.values())
    assert 0 < adapter_size < 0.1 * model_size
    assert all(t.shape[0] == 4 or t.shape[1] == 4 for t in adapter.values())
    # The parent's weights did not move: the adapter is all this run trained.
    parent = load_file(str(tiny_pretrain_run / "model.safetensors"))
    assert any(not parent[k].equal(merged_weights[k]) for k in parent)  # merged differs...
    merged = load_run(run_dir).model
    (run_dir / "model.safetensors").unlink()  # ...and without it the run is parent + adapter
    unmerged = load_run(run_dir).model
    tokens = torch.randint(0, merged.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens), unmerged(tokens), rtol=1e-4, atol=1e-5)
    result = run_cli("generate", run_dir, "--prompt", "1+1=", "--greedy", "-n", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("1+1=")


def test_lora_resume_from_a_checkpoint_is_bitwise_identical(
    tiny_lora_sft_run: Path, tmp_path: Path
) -> None:
    # The straight run: `sft --lora --max-steps 10 --set sft.save_every=5 --set train.keep_last=3`
    # (the shared fixture, only read here).
    straight = tiny_lora_sft_run
    assert json.loads((straight / "trainer_state.json").read_text())["step"] == 10
    # A run that "died" after its step-5 checkpoint: only that snapshot survives.
    died = tmp_path / "died"
    shutil.copytree(straight, died)
    for name in ("adapter.safetensors", "optimizer.safetensors", "trainer_state.json"):
        (died / name).unlink()
    shutil.rmtree(died / "checkpoints" / "step-00000010")
    result = run_cli("sft", "--out", died, "--resume")
    assert result.returncode == 0, result.stdout + result.stderr
    first = load_file(str(straight / "adapter.safetensors"))
    second = load_file(str(died / "adapter.safetensors"))
    assert first.keys() == second.keys()
    for name in first:
        assert first[name].equal(second[name]), name
    assert [r["loss"] for r in rows(straight, "train")] == [r["loss"] for r in rows(died, "train")]


def test_resume_on_changed_examples_is_refused(tiny_lora_sft_run: Path, tmp_path: Path) -> None:
    """The checkpoint records the examples' fingerprint beside their count: a resume whose
    examples differ (same count) is refused in one line, and nothing is trained."""
    died = tmp_path / "died"
    shutil.copytree(tiny_lora_sft_run, died)
    for name in ("adapter.safetensors", "optimizer.safetensors", "trainer_state.json"):
        (died / name).unlink()
    shutil.rmtree(died / "checkpoints" / "step-00000010")
    saved = died / "checkpoints" / "step-00000005" / "trainer_state.json"
    snapshot = json.loads(saved.read_text())
    assert len(snapshot["data_state"]["fingerprint"]) == 16
    snapshot["data_state"]["fingerprint"] = "0" * 16  # as if the records had changed
    saved.write_text(json.dumps(snapshot))
    result = run_cli("sft", "--out", died, "--resume")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "the SFT training data changed since the checkpoint" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    published = died / "trainer_state.json"  # the snapshot made whole, if anything: no training
    assert not published.exists() or json.loads(published.read_text())["step"] == 5


def test_with_val_data_every_training_record_trains(
    tiny_pretrain_run: Path, tmp_path: Path
) -> None:
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("".join(f'{{"prompt": "q{i}", "completion": "a{i}"}}\n' for i in range(40)))
    val.write_text('{"prompt": "q", "completion": "a"}\n{"prompt": "r", "completion": "b"}\n')
    result = run_cli(
        "sft",
        "--from",
        tiny_pretrain_run,
        "--data",
        train,
        "--val-data",
        val,
        "--out",
        tmp_path / "run",
        "--max-steps",
        "1",
        *FP32,
        *set_args(FINETUNE_SETS),
    )
    assert result.returncode == 0, result.stderr
    assert "sft: training: 40 examples" in result.stdout
    assert "sft: validation: 2 examples" in result.stdout
