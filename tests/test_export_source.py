"""What an export reads: the run's weights tensor by tensor, never a built network (so it holds at
most one copy of them), and exactly the weights `load_run` (plus `merge_lora`) gives."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from minigpt_cli.engine.export.run import export_run
from minigpt_cli.engine.export.source import open_source
from minigpt_cli.engine.model import gpt
from minigpt_cli.engine.model.lora import has_lora, merge_lora
from minigpt_cli.engine.runs.files import (
    ADAPTER_FILE,
    MODEL_FILE,
    STATE_FILE,
    load_tensors,
    read_metadata,
    save_tensors,
)
from minigpt_cli.engine.runs.load import load_run
from minigpt_cli.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any construction of the network fails the test: the export must not build one."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the export built a GPT (a second copy of the weights)")

    monkeypatch.setattr(gpt.GPT, "__init__", refuse)


def _loaded_weights(run: Path) -> dict[str, torch.Tensor]:
    """The weights as every decoding verb opens the run, adapter merged: the reference."""
    model = load_run(run).model
    if has_lora(model):
        merge_lora(model)
    return model.export_state_dict()


@pytest.mark.parametrize("which", ["pretrain", "lora"])
def test_the_hf_export_builds_no_network_and_writes_the_loaded_weights(
    which: str,
    tiny_pretrain_run: Path,
    tiny_lora_sft_run: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run = tiny_pretrain_run if which == "pretrain" else tiny_lora_sft_run
    with monkeypatch.context() as patched:
        _no_network(patched)
        report = export_run(run, "hf", tmp_path / "hf")
    assert report.merged_lora == (which == "lora")
    expected = _loaded_weights(run)
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="pt") as handle:
        assert sorted(handle.keys()) == sorted(expected)
        for name, tensor in expected.items():
            assert torch.equal(handle.get_tensor(name), tensor), name
    assert report.parameters == sum(tensor.numel() for tensor in expected.values())


@pytest.mark.parametrize("dtype", ["f32", "q8_0"])
def test_the_gguf_export_builds_no_network(
    dtype: str,
    tiny_lora_sft_run: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("gguf")
    with monkeypatch.context() as patched:
        _no_network(patched)
        report = export_run(tiny_lora_sft_run, "gguf", tmp_path / "m.gguf", dtype=dtype)
    assert report.merged_lora and (tmp_path / "m.gguf").is_file()


def test_the_read_weights_are_new_tensors_each_time(tiny_lora_sft_run: Path) -> None:
    """A writer may drop (or change) what it was given: the next read is unaffected."""
    weights = open_source(tiny_lora_sft_run).weights
    name = "model.layers.0.self_attn.q_proj.weight"
    first = weights.tensor(name)
    expected = first.clone()
    first.zero_()
    assert torch.equal(weights.tensor(name), expected)


def test_weights_that_disagree_with_the_config_are_refused_in_one_line(
    tiny_pretrain_run: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_pretrain_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    with safe_open(str(run / MODEL_FILE), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    tensors["model.norm.weight"] = torch.ones(3)
    save_tensors(run / MODEL_FILE, tensors, {"format": "minigpt"})
    with pytest.raises(UserError, match="do not match the run's config.toml .model.norm.weight"):
        export_run(run, "hf", tmp_path / "hf")
    del tensors["model.norm.weight"]
    save_tensors(run / MODEL_FILE, tensors, {"format": "minigpt"})
    with pytest.raises(UserError, match=r"missing \['model.norm.weight'\]"):
        export_run(run, "hf", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def _child_of(lora_run: Path, folder: Path, alpha: str | None = None) -> Path:
    """A LoRA run continuing `lora_run`'s adapter (its parent is an adapter-only run too): a
    chain base -> adapter -> adapter, built by hand with a changed adapter (B doubled)."""
    shutil.copytree(lora_run, folder, ignore=shutil.ignore_patterns("checkpoints"))
    state = json.loads((folder / STATE_FILE).read_text())
    state["parent"] = str(lora_run.resolve())
    (folder / STATE_FILE).write_text(json.dumps(state))
    metadata = read_metadata(folder / ADAPTER_FILE)
    if alpha is not None:
        metadata["alpha"] = alpha
    tensors = load_tensors(folder / ADAPTER_FILE)
    doubled = {k: v * 2 if ".lora_B." in k else v for k, v in tensors.items()}
    save_tensors(folder / ADAPTER_FILE, doubled, metadata)
    return folder


def test_a_chain_of_lora_runs_exports_the_base_plus_the_newest_adapter(
    tiny_lora_sft_run: Path, tmp_path: Path
) -> None:
    """`load_run`'s rule: each run of a chain continues its parent's adapter, so the weights are
    the base run's plus the run's own adapter, never the sum of the adapters."""
    child = _child_of(tiny_lora_sft_run, tmp_path / "child")
    report = export_run(child, "hf", tmp_path / "hf")
    assert report.merged_lora
    expected = _loaded_weights(child)
    assert not torch.equal(
        expected["model.layers.0.self_attn.q_proj.weight"],
        _loaded_weights(tiny_lora_sft_run)["model.layers.0.self_attn.q_proj.weight"],
    )
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="pt") as handle:
        for name, tensor in expected.items():
            assert torch.equal(handle.get_tensor(name), tensor), name


def test_a_chain_whose_adapters_differ_is_refused_as_load_run_refuses_it(
    tiny_lora_sft_run: Path, tmp_path: Path
) -> None:
    child = _child_of(tiny_lora_sft_run, tmp_path / "child", alpha="3.0")
    with pytest.raises(UserError) as loading:
        load_run(child)
    with pytest.raises(UserError) as exporting:
        export_run(child, "hf", tmp_path / "hf")
    assert str(exporting.value) == str(loading.value)
    assert "differs from the parent run's adapter" in str(exporting.value)
    assert not (tmp_path / "hf").exists()
