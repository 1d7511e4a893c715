"""LoRA: exact at step 0, only adapters train, merge agrees, adapter files and LoRA runs load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from minigpt_cli.config.loader import load_config, read_run_config
from minigpt_cli.config.params import count_parameters
from minigpt_cli.config.schema import Config, LoraConfig, ModelConfig
from minigpt_cli.engine.model.gpt import GPT
from minigpt_cli.engine.model.lora import (
    LoRALinear,
    adapter_metadata,
    adapter_state_dict,
    apply_lora,
    count_lora_parameters,
    has_lora,
    load_adapter_state_dict,
    lora_settings,
    merge_lora,
    settings_from_metadata,
)
from minigpt_cli.engine.runs.files import (
    ADAPTER_FILE,
    CONFIG_FILE,
    MODEL_FILE,
    STATE_FILE,
    TOKENIZER_FILE,
    load_tensors,
    read_metadata,
    save_tensors,
)
from minigpt_cli.engine.runs.load import load_run
from minigpt_cli.errors import UserError

VOCAB = 61
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


# One thread for tiny tensors (`conftest.one_thread` says why).
pytestmark = pytest.mark.usefixtures("one_thread")


def small_cfg(**changes) -> ModelConfig:
    values = dict(n_layer=2, n_head=4, n_embd=32, context_length=32)
    values.update(changes)
    return ModelConfig(**values)


def make_model(seed: int = 0, vocab: int = VOCAB, **changes) -> GPT:
    torch.manual_seed(seed)
    return GPT(small_cfg(**changes), vocab)


def batch(seed: int, vocab: int = VOCAB, rows: int = 4, length: int = 16) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))


def randomise_adapters(model: nn.Module, seed: int, std: float = 0.05) -> None:
    """Give B non-zero values, as training would, so the adapter changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in adapter_state_dict(model).items():
            if name.endswith("lora_B.weight"):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * std)


def base_tensors(model: GPT) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.export_state_dict().items()}


# ------------------------------------------------------------------------------ config


def test_targets_default_to_attention_and_shorthands_expand() -> None:
    assert LoraConfig().targets == ATTENTION
    assert (LoraConfig().r, LoraConfig().alpha, LoraConfig().dropout) == (8, 16.0, 0.0)
    assert LoraConfig(targets=["mlp"]).targets == MLP
    assert LoraConfig(targets=["all"]).targets == ATTENTION + MLP
    # De-duplicated and put in layer order, however written.
    assert LoraConfig(targets=["down_proj", "q_proj", "attention"]).targets == [
        *ATTENTION,
        "down_proj",
    ]
    assert LoraConfig(targets="v_proj, mlp").targets == ["v_proj", *MLP]


def test_unknown_target_lists_the_allowed_names() -> None:
    with pytest.raises(ValidationError) as error:
        LoraConfig(targets=["q_proj", "qkv"])
    message = str(error.value)
    assert "'qkv'" in message
    for name in [*ATTENTION, *MLP, "attention", "mlp", "all"]:
        assert name in message
    with pytest.raises(ValidationError, match="at least one"):
        LoraConfig(targets=[])


@pytest.mark.parametrize(
    ("field", "value"), [("r", 0), ("alpha", 0.0), ("dropout", 1.0), ("dropout", -0.1), ("rank", 4)]
)
def test_out_of_range_settings_are_refused(field: str, value: object) -> None:
    with pytest.raises(ValidationError):
        LoraConfig(**{field: value})


def test_lora_section_in_config_and_set_override() -> None:
    assert Config().lora == LoraConfig()
    cfg = load_config("tiny", sets=["lora.targets=mlp", "lora.r=4"])
    assert (cfg.lora.r, cfg.lora.targets) == (4, MLP)
    with pytest.raises(UserError, match="unknown LoRA target 'nope'"):
        load_config("tiny", sets=['lora.targets=["nope"]'])


# ------------------------------------------------------------------------------ the adapted model


@pytest.mark.parametrize("targets", [["attention"], ["all"], ["v_proj", "down_proj"]])
def test_step_zero_output_equals_the_base_exactly(targets: list[str]) -> None:
    model = make_model().eval()
    ids = batch(1)
    with torch.no_grad():
        before = model(ids)
    apply_lora(model, LoraConfig(targets=targets))
    assert has_lora(model)
    with torch.no_grad():
        after = model(ids)
    assert torch.equal(before, after)
    # A carries signal from the start (so B gets a gradient); B is exactly zero.
    adapters = adapter_state_dict(model)
    assert all(t.abs().sum() > 0 for n, t in adapters.items() if n.endswith("lora_A.weight"))
    assert all(t.count_nonzero() == 0 for n, t in adapters.items() if n.endswith("lora_B.weight"))


def test_adapter_names_are_peft_style_and_base_export_is_unchanged() -> None:
    model = make_model()
    plain_names = set(model.export_state_dict())
    apply_lora(model, LoraConfig(r=4))
    adapters = adapter_state_dict(model)
    expected = {
        f"model.layers.{layer}.self_attn.{proj}.lora_{part}.weight"
        for layer in range(2)
        for proj in ATTENTION
        for part in "AB"
    }
    assert set(adapters) == expected
    q_in = model.config.n_embd
    assert adapters["model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, q_in)
    assert adapters["model.layers.0.self_attn.q_proj.lora_B.weight"].shape == (32, 4)
    # The base weight keeps its own name; exporting still gives exactly the plain model's tensors.
    assert set(model.export_state_dict()) == plain_names
    assert "model.layers.0.self_attn.q_proj.weight" in dict(model.named_parameters())


def test_only_adapters_train_and_the_loss_falls() -> None:
    model = make_model()
    frozen = base_tensors(model)
    trainable = apply_lora(model, LoraConfig(r=4, alpha=8.0, targets=["all"]))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert {n.rsplit(".", 2)[-2] for n, _ in named} == {"lora_A", "lora_B"}
    assert trainable == sum(p.numel() for _, p in named)
    assert not model.model.embed_tokens.weight.requires_grad
    assert not model.model.norm.weight.requires_grad
    start = {n: p.detach().clone() for n, p in named}

    optimizer = torch.optim.AdamW([p for _, p in named], lr=1e-2)
    ids = batch(3, length=17)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    losses = []
    model.train()
    for _ in range(8):
        _, loss = model(inputs, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    for name, tensor in model.export_state_dict().items():
        assert torch.equal(tensor, frozen[name]), f"{name} changed"
    assert all(not torch.equal(p, start[n]) for n, p in named), "every adapter tensor trains"


def test_merged_logits_match_unmerged_and_export_a_plain_model() -> None:
    model = make_model().eval()
    apply_lora(model, LoraConfig(targets=["all"], alpha=32.0))
    randomise_adapters(model, seed=5)
    ids = batch(4)
    with torch.no_grad():
        unmerged = model(ids)
    plain = make_model().eval()
    with torch.no_grad():
        assert not torch.allclose(plain(ids), unmerged, atol=1e-3), "the adapter must matter"
    merge_lora(model)
    assert not has_lora(model)
    assert lora_settings(model) is None
    projections = [m for n, m in model.named_modules() if n.endswith("_proj")]
    assert projections and all(type(m) is nn.Linear for m in projections)
    with torch.no_grad():
        merged = model(ids)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    # The merged weights are an ordinary model file: a fresh GPT loads them and agrees.
    fresh = make_model(seed=9).eval()
    fresh.load_exported_state_dict(model.export_state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(ids), merged)


def test_merge_adds_scaled_b_times_a_to_the_weight() -> None:
    model = make_model()
    weight = model.model.layers[1].mlp.down_proj.weight.detach().clone()
    apply_lora(model, LoraConfig(r=2, alpha=3.0, targets=["down_proj"]))
    randomise_adapters(model, seed=6)
    module = model.model.layers[1].mlp.down_proj
    assert isinstance(module, LoRALinear)
    expected = weight + 1.5 * module.lora_B.weight.detach() @ module.lora_A.weight.detach()
    merge_lora(model)
    torch.testing.assert_close(model.model.layers[1].mlp.down_proj.weight, expected)


@pytest.mark.parametrize("kv_heads", [None, 1])
@pytest.mark.parametrize("targets", [["attention"], ["mlp"], ["all"]])
def test_trainable_count_is_computed_from_the_shape(kv_heads: int | None, targets) -> None:
    settings = LoraConfig(r=3, targets=targets)
    model = make_model(n_kv_head=kv_heads)
    trainable = apply_lora(model, settings)
    assert trainable == count_lora_parameters(model.config, settings)
    assert trainable == sum(t.numel() for t in adapter_state_dict(model).values())


def test_adapter_is_a_few_percent_of_the_tiny_preset() -> None:
    cfg = load_config("tiny")
    total = count_parameters(cfg.model, cfg.tokenizer.vocab_size)
    attention = count_lora_parameters(cfg.model, LoraConfig(r=8))
    # 4 layers x 4 projections x r (128 in + 128 out).
    assert attention == 4 * 4 * 8 * (128 + 128) == 32_768
    assert 0.01 < attention / total < 0.03
    everything = count_lora_parameters(cfg.model, LoraConfig(r=8, targets=["all"]))
    assert everything / total < 0.06


def test_apply_twice_is_refused() -> None:
    model = make_model()
    apply_lora(model, LoraConfig())
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, LoraConfig())


def test_lora_settings_reads_back_what_was_applied() -> None:
    settings = LoraConfig(r=5, alpha=7.5, dropout=0.1, targets=["k_proj", "up_proj"])
    model = make_model()
    apply_lora(model, settings)
    assert lora_settings(model) == settings


def test_dropout_acts_in_training_only() -> None:
    with_dropout = make_model()
    apply_lora(with_dropout, LoraConfig(dropout=0.5, targets=["all"]))
    randomise_adapters(with_dropout, seed=7, std=0.5)
    without = make_model()
    apply_lora(without, LoraConfig(dropout=0.0, targets=["all"]))
    load_adapter_state_dict(without, adapter_state_dict(with_dropout))
    ids = batch(8)
    with torch.no_grad():
        with_dropout.train()
        torch.manual_seed(0)
        first = with_dropout(ids)
        second = with_dropout(ids)
        with_dropout.eval()
        evaluated = with_dropout(ids)
        reference = without.eval()(ids)
    assert not torch.equal(first, second), "dropout masks differ between calls"
    assert not torch.allclose(first, evaluated, atol=1e-4)
    assert torch.equal(evaluated, reference)


# ------------------------------------------------------------------------------ adapter files


def test_adapter_round_trips_through_a_file(tmp_path: Path) -> None:
    settings = LoraConfig(r=4, alpha=12.0, dropout=0.05, targets=["q_proj", "v_proj", "mlp"])
    model = make_model().eval()
    apply_lora(model, settings)
    randomise_adapters(model, seed=11)
    path = tmp_path / ADAPTER_FILE
    save_tensors(path, adapter_state_dict(model), adapter_metadata(settings))

    metadata = read_metadata(path)
    assert metadata["format"] == "minigpt-lora"
    restored_settings = settings_from_metadata(metadata, path)
    assert restored_settings == settings
    restored = make_model().eval()
    apply_lora(restored, restored_settings)
    load_adapter_state_dict(restored, load_tensors(path), path)
    ids = batch(12)
    with torch.no_grad():
        assert torch.equal(restored(ids), model(ids))


def test_adapter_that_does_not_fit_names_the_file(tmp_path: Path) -> None:
    model = make_model()
    apply_lora(model, LoraConfig(r=4))
    tensors = adapter_state_dict(model)
    path = tmp_path / ADAPTER_FILE

    missing = dict(tensors)
    missing.pop("model.layers.1.self_attn.o_proj.lora_B.weight")
    with pytest.raises(UserError, match=rf"{ADAPTER_FILE}: .*missing .*o_proj\.lora_B"):
        load_adapter_state_dict(model, missing, path)

    extra = {**tensors, "model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(4, 32)}
    with pytest.raises(UserError, match=rf"{ADAPTER_FILE}: .*unexpected .*up_proj"):
        load_adapter_state_dict(model, extra, path)

    wrong_rank = make_model()
    apply_lora(wrong_rank, LoraConfig(r=2))
    with pytest.raises(UserError, match=r"has shape \(2, 32\), the model needs \(4, 32\)"):
        load_adapter_state_dict(model, adapter_state_dict(wrong_rank), path)


def test_metadata_without_lora_settings_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    with pytest.raises(UserError, match=r"model\.safetensors: not a minigpt LoRA adapter .*r, "):
        settings_from_metadata({"format": "minigpt", "step": "10"}, path)
    bad = {**adapter_metadata(LoraConfig()), "targets": "q_proj,bogus"}
    with pytest.raises(UserError, match="bad LoRA metadata .*'bogus'"):
        settings_from_metadata(bad, path)


# ------------------------------------------------------------------------------ LoRA runs


def make_lora_run(
    source: Path, run_dir: Path, parent: str, model: GPT, settings: LoraConfig
) -> Path:
    """A run directory as the trainer leaves a LoRA run: config, tokenizer, state, adapter."""
    run_dir.mkdir(parents=True)
    for name in (CONFIG_FILE, TOKENIZER_FILE):
        shutil.copyfile(source / name, run_dir / name)
    state = {"step": 3, "stage": "sft", "parent": parent, "files": [ADAPTER_FILE]}
    (run_dir / STATE_FILE).write_text(json.dumps(state), encoding="utf-8")
    save_tensors(run_dir / ADAPTER_FILE, adapter_state_dict(model), adapter_metadata(settings))
    return run_dir


def adapted_copy(parent: Path, settings: LoraConfig, seed: int) -> GPT:
    model = load_run(parent).model
    apply_lora(model, settings)
    randomise_adapters(model, seed=seed)
    return model.eval()


def copy_run(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for name in (CONFIG_FILE, TOKENIZER_FILE, STATE_FILE, MODEL_FILE):
        shutil.copyfile(source / name, target / name)
    return target


def test_lora_run_loads_as_parent_plus_adapter(tiny_pretrain_run: Path, tmp_path: Path) -> None:
    settings = LoraConfig(r=4, targets=["all"])
    expected = adapted_copy(tiny_pretrain_run, settings, seed=21)
    child = make_lora_run(
        tiny_pretrain_run, tmp_path / "child", str(tiny_pretrain_run), expected, settings
    )
    assert not (child / MODEL_FILE).exists()

    loaded = load_run(child)
    assert has_lora(loaded.model) and not loaded.model.training
    assert lora_settings(loaded.model) == settings
    assert loaded.config == read_run_config(tiny_pretrain_run)
    assert loaded.state["parent"] == str(tiny_pretrain_run)
    vocab = loaded.tokenizer.vocab_size
    ids = batch(13, vocab=vocab, rows=2, length=24)
    with torch.no_grad():
        got = loaded.model(ids)
        assert torch.equal(got, expected(ids))
        plain = load_run(tiny_pretrain_run).model(ids)
    assert not torch.allclose(got, plain, atol=1e-3), "the adapter is applied"
    # Loaded as a LoRA model it trains the adapter only, ready for a child stage to continue.
    trainable = sum(p.numel() for p in loaded.model.parameters() if p.requires_grad)
    assert trainable == count_lora_parameters(loaded.model.config, settings)


def test_relative_parent_is_found_from_another_directory(
    tiny_pretrain_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "project"
    parent = copy_run(tiny_pretrain_run, project / "runs" / "pretrain-tiny")
    settings = LoraConfig(r=2)
    expected = adapted_copy(parent, settings, seed=22)
    child = make_lora_run(
        parent, project / "runs" / "sft-tiny", "runs/pretrain-tiny", expected, settings
    )
    ids = batch(14, vocab=expected.vocab_size, rows=1, length=12)
    with torch.no_grad():
        reference = expected(ids)
    # From where the path was written, and from elsewhere (then it is found above the run).
    for cwd in (project, tmp_path):
        monkeypatch.chdir(cwd)
        with torch.no_grad():
            assert torch.equal(load_run(child).model(ids), reference)
    monkeypatch.chdir(project / "runs")
    with torch.no_grad():
        assert torch.equal(load_run("sft-tiny").model(ids), reference)


def test_a_chain_of_lora_runs_loads(tiny_pretrain_run: Path, tmp_path: Path) -> None:
    settings = LoraConfig(r=4)
    first = adapted_copy(tiny_pretrain_run, settings, seed=31)
    child = make_lora_run(
        tiny_pretrain_run, tmp_path / "sft", str(tiny_pretrain_run), first, settings
    )
    # A grandchild (dpo --from the LoRA run) continued the same adapter: base + its adapter.
    second = adapted_copy(tiny_pretrain_run, settings, seed=32)
    grandchild = make_lora_run(child, tmp_path / "dpo", str(child), second, settings)
    ids = batch(15, vocab=first.vocab_size, rows=2, length=16)
    with torch.no_grad():
        got = load_run(grandchild).model(ids)
        assert torch.equal(got, second(ids))
        assert not torch.allclose(got, first(ids), atol=1e-3)

    # An adapter of another shape cannot continue the parent's adapter.
    other = LoraConfig(r=2)
    mismatch = make_lora_run(
        child, tmp_path / "bad", str(child), adapted_copy(tiny_pretrain_run, other, 33), other
    )
    with pytest.raises(UserError, match=r"bad/adapter\.safetensors: adapter \(r=2.*parent run's"):
        load_run(mismatch)


def test_merged_lora_run_loads_its_model_and_a_new_adapter_stacks(
    tiny_pretrain_run: Path, tmp_path: Path
) -> None:
    settings = LoraConfig(r=4, targets=["mlp"])
    model = adapted_copy(tiny_pretrain_run, settings, seed=41)
    merged_run = make_lora_run(tiny_pretrain_run, tmp_path / "merged", "gone", model, settings)
    ids = batch(16, vocab=model.vocab_size, rows=2, length=16)
    with torch.no_grad():
        unmerged = model(ids)
    merge_lora(model)
    save_tensors(merged_run / MODEL_FILE, model.export_state_dict(), {})
    loaded = load_run(merged_run)  # its parent is missing, but the merged file is enough
    assert not has_lora(loaded.model)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids), unmerged, atol=1e-5, rtol=1e-5)

    stacked = LoraConfig(r=2)
    on_top = load_run(merged_run).model
    apply_lora(on_top, stacked)
    randomise_adapters(on_top, seed=42)
    child = make_lora_run(merged_run, tmp_path / "child", str(merged_run), on_top.eval(), stacked)
    with torch.no_grad():
        assert torch.equal(load_run(child).model(ids), on_top(ids))


def test_missing_parent_says_which_run_is_needed(tiny_pretrain_run: Path, tmp_path: Path) -> None:
    settings = LoraConfig(r=2)
    model = make_model()
    apply_lora(model, settings)
    gone = str(tmp_path / "runs" / "pretrain-gone")
    child = make_lora_run(tiny_pretrain_run, tmp_path / "child", gone, model, settings)
    with pytest.raises(UserError, match=rf"child: .*needs its parent run {gone}"):
        load_run(child)

    state = json.loads((child / STATE_FILE).read_text())
    state["parent"] = None
    (child / STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(UserError, match=r"no base weights to apply the adapter to"):
        load_run(child)


def test_a_parent_loop_is_refused(tiny_pretrain_run: Path, tmp_path: Path) -> None:
    settings = LoraConfig(r=2)
    model = make_model()
    apply_lora(model, settings)
    a = make_lora_run(tiny_pretrain_run, tmp_path / "a", str(tmp_path / "b"), model, settings)
    make_lora_run(tiny_pretrain_run, tmp_path / "b", str(a), model, settings)
    with pytest.raises(UserError, match="loops back"):
        load_run(a)
