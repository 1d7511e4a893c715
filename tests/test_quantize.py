"""Int8 decoding (`--quantize int8`): per-row symmetric weights, both GEMM paths, the decode step,
and the flag on generate, chat and eval."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from minigpt_cli.config.schema import ModelConfig
from minigpt_cli.engine.inference.decode import generate
from minigpt_cli.engine.inference.generation import SamplingSettings
from minigpt_cli.engine.model.gpt import GPT
from minigpt_cli.engine.model.quantize import (
    Int8Linear,
    _fbgemm_available,
    quantize_model,
    quantize_rows,
)
from minigpt_cli.engine.model.stepper import DecodeStep

needs_fbgemm = pytest.mark.skipif(
    not _fbgemm_available(torch.device("cpu")), reason="no fbgemm int8 GEMM in this build"
)


# One thread for tiny tensors (`conftest.one_thread` says why).
pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(seed: int = 0, **changes) -> GPT:
    values = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, context_length=32)
    values.update(changes)
    torch.manual_seed(seed)
    return GPT(ModelConfig(**values), 50).eval()


def test_rows_are_symmetric_int8_within_half_a_step() -> None:
    weight = torch.randn(16, 40) * torch.logspace(-3, 1, 16)[:, None]  # rows of very different size
    q, scale = quantize_rows(weight)
    assert q.dtype == torch.int8 and scale.shape == (16,)
    assert q.abs().max() == 127 and int(q.min()) >= -127  # each row uses its own full range
    error = (q.float() * scale[:, None] - weight).abs()
    assert bool((error <= scale[:, None] / 2 + 1e-7).all())


@pytest.mark.parametrize("kernel", ["dequantize", pytest.param("dynamic", marks=needs_fbgemm)])
def test_an_int8_linear_is_close_to_fp32(kernel: str) -> None:
    torch.manual_seed(1)
    linear = nn.Linear(64, 48, bias=False)
    layer = Int8Linear.from_linear(linear, kernel)
    assert layer.kernel == kernel
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        want, got = linear(x), layer(x)
    assert got.shape == want.shape
    # Weight rounding alone is well under 1 % of the output's range; the dynamic path also
    # rounds the activations to 7 bits.
    limit = 0.01 if kernel == "dequantize" else 0.03
    assert float((got - want).abs().max()) < limit * float(want.abs().max())
    q, scale = quantize_rows(linear.weight)
    torch.testing.assert_close(layer.dequantized(torch.float32), q.float() * scale[:, None])


@pytest.mark.parametrize("kernel", ["dequantize", pytest.param("dynamic", marks=needs_fbgemm)])
def test_a_quantized_model_gives_logits_close_to_fp32_and_decodes(kernel: str) -> None:
    model = make_model(seed=2)
    ids = torch.randint(0, 50, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = model(ids)
        count = quantize_model(model, "int8", kernel)
        got = model(ids)
        _, loss = model(ids[:, :-1], ids[:, 1:])
    # Every projection and the head: 2 layers x (q, k, v, o, gate, up, down) + 1. The dynamic
    # kernel's own choice keeps matrices this small in fp32, so here it is asked for explicitly.
    assert count == 15
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == 15
    assert float((got - want).abs().max()) < 0.05 * float(want.abs().max())
    assert torch.isfinite(loss)
    step = DecodeStep.for_model(model)
    assert isinstance(step, DecodeStep)  # stacked int8 q/k/v and gate/up in the fast path
    with torch.inference_mode():
        fast, slow = model.new_kv_cache(1), model.new_kv_cache(1)
        model(ids[:1, :4], kv_cache=fast), model(ids[:1, :4], kv_cache=slow)
        torch.testing.assert_close(
            step(ids[0, 4:5], fast), model(ids[:1, 4:5], kv_cache=slow)[:, -1], atol=1e-4, rtol=1e-4
        )
    settings = SamplingSettings(max_new_tokens=40, greedy=True)
    assert len(generate(model, [1, 2, 3], settings)) == 40  # past the 32-token context


def test_the_default_kernel_keeps_small_matrices_and_lora_in_fp32() -> None:
    from minigpt_cli.config.schema import LoraConfig
    from minigpt_cli.engine.model.lora import apply_lora

    model = make_model()
    apply_lora(model, LoraConfig(r=2, targets=["q_proj"]))
    count = quantize_model(model, "int8", "dequantize")
    assert count == 13  # q_proj of both layers stays inside its LoRA wrapper, in fp32
    if _fbgemm_available(torch.device("cpu")):
        assert quantize_model(make_model(), "int8") == 0  # every matrix here is under the bar
    with pytest.raises(ValueError, match="unknown quantization"):
        quantize_model(make_model(), "int4")


def test_the_flag_on_generate_chat_and_eval(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from minigpt_cli.cli.app import app

    for verb in ("generate", "chat", "eval"):
        bad = subprocess.run(
            [sys.executable, "-m", "minigpt_cli", verb, str(tmp_path), "--quantize", "int4"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert bad.returncode == 2, (verb, bad.stderr)
        assert bad.stderr.strip().splitlines() == ["error: --quantize int4: expected one of int8"]
        text = CliRunner().invoke(app, [verb, "--help"], env={"COLUMNS": "200"}).stdout
        assert "--quantize" in text


def test_stacked_int8_projections_are_built_once_per_model() -> None:
    # Packing costs more than a token: a second decoding call must reuse the first call's stacks.
    model = make_model()
    quantize_model(model, "int8", "dequantize")
    attention = model.model.layers[0].self_attn
    group = (attention.q_proj, attention.k_proj, attention.v_proj)
    first = Int8Linear.stacked_projection(group)
    assert first is not None and Int8Linear.stacked_projection(group) is first
    x = torch.randn(1, 1, 64)
    with torch.no_grad():
        separate = torch.cat([layer(x) for layer in group], dim=-1)
    torch.testing.assert_close(first(x), separate)
    assert not any("_stacks" in name for name, _ in model.named_modules())
