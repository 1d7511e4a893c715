"""Device and precision resolution: the rules, fed with injected measurements and hardware."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy
import pytest
import torch

from minigpt_cli.engine.core.seeding import seed_everything
from minigpt_cli.engine.hardware import device as device_mod
from minigpt_cli.engine.hardware import facts, matmul, speed_cache
from minigpt_cli.engine.hardware.device import (
    PrecisionDecision,
    apply_matmul_precision,
    autocast_context,
    resolve_device,
    resolve_precision,
)
from minigpt_cli.errors import UserError

NO_FEATURES = dict.fromkeys(facts.CPU_FEATURES, False)
AVX512_BF16 = {**NO_FEATURES, "avx2": True, "avx512f": True, "avx512_bf16": True}
AMX = {**AVX512_BF16, "amx_bf16": True, "amx_tile": True}


def measured(bf16: float, medium: float = 1.0, medium_error: float = 2e-7) -> dict[str, Any]:
    """Measurements as the doctor stores them, with the given speedups over plain fp32."""
    return {
        "device": "cpu",
        "gflops": {"fp32": 200.0, "fp32_medium": 200.0 * medium, "bf16": 200.0 * bf16},
        "speedup": {"fp32": 1.0, "fp32_medium": medium, "bf16": bf16},
        "rel_error": {"fp32": 2e-7, "fp32_medium": medium_error, "bf16": 3e-3},
        "errors": {},
    }


@pytest.fixture
def no_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device_mod, "_mps_available", lambda: False)


@pytest.fixture
def no_measuring(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything tries to time a matmul."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("measure_device was called")

    monkeypatch.setattr(matmul, "measure_device", refuse)


# ----------------------------------------------------------------------------------------------
# devices


def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device_mod, "_mps_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(device_mod, "_mps_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device(" CPU ") == torch.device("cpu")


@pytest.mark.usefixtures("no_accelerator")
def test_missing_cuda_is_a_user_error_naming_what_is_available() -> None:
    with pytest.raises(UserError) as error:
        resolve_device("cuda")
    message = str(error.value)
    assert "CUDA is not available" in message and "available: cpu" in message
    assert "\n" not in message


@pytest.mark.usefixtures("no_accelerator")
def test_missing_mps_is_a_user_error() -> None:
    with pytest.raises(UserError, match=r"MPS is not available.*available: cpu"):
        resolve_device("mps")


def test_cuda_on_this_machine_matches_what_torch_sees() -> None:
    if torch.cuda.is_available():
        assert resolve_device("cuda").type == "cuda"
    else:
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device("cuda")


@pytest.mark.parametrize("name", ["tpu", "gpu", "mps:0", ""])
def test_unknown_device_is_a_user_error(name: str) -> None:
    with pytest.raises(UserError, match="choose one of auto, cpu, cuda, mps"):
        resolve_device(name)


def test_cuda_index_out_of_range(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(UserError, match="cuda:0 to cuda:1"):
        resolve_device("cuda:2")


# ----------------------------------------------------------------------------------------------
# precision on the CPU


@pytest.mark.usefixtures("no_measuring")
def test_cpu_auto_picks_bf16_when_measured_faster() -> None:
    decision = resolve_precision(
        "auto", "cpu", measurements=measured(4.5), cpu_features=AVX512_BF16
    )
    assert decision.dtype_name == "bf16" and decision.autocast_dtype == torch.bfloat16
    assert not decision.use_grad_scaler
    assert "4.5x" in decision.reason and "AVX512-BF16" in decision.reason
    assert decision.peak_key == "bf16"


@pytest.mark.usefixtures("no_measuring")
def test_cpu_bf16_threshold_is_1_3x() -> None:
    at = resolve_precision("auto", "cpu", measurements=measured(1.3), cpu_features=AVX512_BF16)
    below = resolve_precision("auto", "cpu", measurements=measured(1.29), cpu_features=AVX512_BF16)
    assert at.dtype_name == "bf16"
    assert below.dtype_name == "fp32" and below.autocast_dtype is None
    # Flags alone do not decide: hardware that measures slow stays fp32.
    assert "1.3x" in below.reason


@pytest.mark.usefixtures("no_measuring")
def test_cpu_without_bf16_uses_fp32_medium_when_faster_and_exact() -> None:
    decision = resolve_precision(
        "auto", "cpu", measurements=measured(0.01, medium=2.2), cpu_features=NO_FEATURES
    )
    assert decision.dtype_name == "fp32" and decision.autocast_dtype is None
    assert decision.fp32_matmul_precision == "medium"
    assert "no AVX512-BF16 or AMX" in decision.reason and "2.2x" in decision.reason
    assert decision.peak_key == "fp32_medium"


@pytest.mark.usefixtures("no_measuring")
@pytest.mark.parametrize(
    ("measurements", "features", "why"),
    [
        (measured(0.01, medium=2.2), AMX, "AMX"),  # "medium" may compute in bf16 on AMX
        (measured(0.01, medium=2.2, medium_error=3e-3), NO_FEATURES, "accuracy"),
        (measured(0.01, medium=1.1), NO_FEATURES, None),  # not faster enough to bother
    ],
)
def test_cpu_keeps_highest_fp32_precision(
    measurements: dict[str, Any], features: dict[str, bool], why: str | None
) -> None:
    decision = resolve_precision("auto", "cpu", measurements=measurements, cpu_features=features)
    assert decision.dtype_name == "fp32"
    assert decision.fp32_matmul_precision == "highest"
    assert decision.peak_key == "fp32"
    if why:
        assert why in decision.reason


@pytest.mark.usefixtures("no_measuring")
def test_peak_ratio_is_used_when_no_interleaved_speedup() -> None:
    only_peaks = measured(4.0)
    only_peaks["speedup"] = {}
    decision = resolve_precision("auto", "cpu", measurements=only_peaks, cpu_features=AMX)
    assert decision.dtype_name == "bf16" and "4.0x" in decision.reason


@pytest.mark.usefixtures("no_measuring")
def test_explicit_fp32_stays_fp32_even_where_bf16_is_fast() -> None:
    decision = resolve_precision(
        "fp32", "cpu", measurements=measured(4.5, medium=2.2), cpu_features=AVX512_BF16
    )
    assert decision.dtype_name == "fp32" and decision.autocast_dtype is None
    assert decision.fp32_matmul_precision == "medium"  # measured fp32-exact here
    assert decision.reason.startswith("fp32 as requested")


@pytest.mark.usefixtures("no_measuring")
def test_explicit_bf16_without_hardware_warns_in_reason() -> None:
    decision = resolve_precision("bf16", "cpu", measurements=measured(0.01), cpu_features={})
    assert decision.dtype_name == "bf16" and decision.autocast_dtype == torch.bfloat16
    assert "slow" in decision.reason and "0.01x" in decision.reason
    fine = resolve_precision("bf16", "cpu", measurements=measured(2.0), cpu_features=AMX)
    assert "slow" not in fine.reason and "AMX" in fine.reason


@pytest.mark.parametrize("where", ["cpu", "mps"])
def test_fp16_off_cuda_is_refused(where: str) -> None:
    with pytest.raises(UserError, match="fp16.*CUDA"):
        resolve_precision("fp16", where, measurements=measured(1.0), cpu_features=NO_FEATURES)


def test_unknown_precision_is_a_user_error() -> None:
    with pytest.raises(UserError, match="choose one of auto, fp32, bf16, fp16"):
        resolve_precision("fp8", "cpu")


def test_cpu_auto_reads_the_doctor_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_measuring: None
) -> None:
    monkeypatch.setenv(speed_cache.CACHE_ENV, str(tmp_path))
    entry = {**measured(3.0), "fingerprint": facts.machine_fingerprint("cpu")}
    assert speed_cache.store_measurements(entry)
    decision = resolve_precision("auto", "cpu", cpu_features=AVX512_BF16)
    assert decision.dtype_name == "bf16" and "3.0x" in decision.reason
    stored = json.loads((tmp_path / speed_cache.CACHE_FILE).read_text())
    assert len(stored["entries"]) == 1


def test_cpu_auto_measures_when_the_cache_is_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(speed_cache.CACHE_ENV, str(tmp_path))
    calls: list[tuple[str, ...]] = []

    def fake(device: Any, seconds_budget: float = 1.0, keys: Any = None) -> dict[str, Any]:
        calls.append(tuple(keys))
        return {**measured(0.02, medium=1.0), "fingerprint": facts.machine_fingerprint(device)}

    monkeypatch.setattr(matmul, "measure_device", fake)
    decision = resolve_precision("auto", "cpu", cpu_features=NO_FEATURES)
    assert calls == [("fp32", "fp32_medium", "bf16")]
    assert decision.dtype_name == "fp32" and decision.fp32_matmul_precision == "highest"
    resolve_precision("auto", "cpu", cpu_features=NO_FEATURES)
    assert len(calls) == 1  # the second decision came from the cache


# ----------------------------------------------------------------------------------------------
# precision on GPUs


@pytest.mark.parametrize(
    ("capability", "dtype_name", "scaler"),
    [
        ((9, 0), "bf16", False),
        ((8, 0), "bf16", False),
        ((7, 5), "fp16", True),
        ((6, 1), "fp16", True),
    ],
)
def test_cuda_auto_follows_compute_capability(
    capability: tuple[int, int], dtype_name: str, scaler: bool
) -> None:
    decision = resolve_precision("auto", "cuda", cuda_capability=capability)
    assert decision.dtype_name == dtype_name and decision.use_grad_scaler is scaler
    assert decision.autocast_dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    assert f"sm{capability[0]}{capability[1]}" in decision.reason


def test_cuda_explicit_choices() -> None:
    old = (7, 5)
    assert resolve_precision("fp16", "cuda", cuda_capability=(9, 0)).use_grad_scaler
    fp32 = resolve_precision("fp32", "cuda", cuda_capability=old)
    assert fp32.autocast_dtype is None and not fp32.use_grad_scaler
    bf16_old = resolve_precision("bf16", "cuda", cuda_capability=old)
    assert bf16_old.dtype_name == "bf16" and "no native bf16" in bf16_old.reason


def test_mps_is_fp32_unless_asked() -> None:
    auto = resolve_precision("auto", "mps")
    assert auto.dtype_name == "fp32" and auto.autocast_dtype is None
    assert resolve_precision("bf16", "mps").autocast_dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------
# applying a decision


def test_autocast_context_casts_matmuls_only_under_bf16() -> None:
    layer = torch.nn.Linear(8, 8)
    x = torch.randn(2, 8)
    bf16 = PrecisionDecision("bf16", torch.bfloat16, False, "highest", "test")
    fp32 = PrecisionDecision("fp32", None, False, "highest", "test")
    with autocast_context(bf16, torch.device("cpu")):
        assert layer(x).dtype == torch.bfloat16
    with autocast_context(fp32, "cpu"):
        assert layer(x).dtype == torch.float32
    assert layer.weight.dtype == torch.float32  # master weights stay fp32


def test_apply_matmul_precision_returns_the_previous_setting() -> None:
    original = torch.get_float32_matmul_precision()
    medium = PrecisionDecision("fp32", None, False, "medium", "test")
    try:
        previous = apply_matmul_precision(medium)
        assert previous == original
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(original)


def test_decision_to_dict_is_json_ready() -> None:
    decision = resolve_precision("auto", "cuda", cuda_capability=(7, 5))
    data = json.loads(json.dumps(decision.to_dict()))
    assert data["autocast_dtype"] == "float16" and data["use_grad_scaler"] is True


def test_seed_everything_makes_python_numpy_and_torch_repeat() -> None:
    def draw() -> tuple[float, float, list[float]]:
        return random.random(), float(numpy.random.rand()), torch.rand(3).tolist()

    seed_everything(123)
    first = draw()
    seed_everything(123)
    assert draw() == first
    seed_everything(124)
    assert draw() != first
