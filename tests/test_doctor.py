"""doctor: facts, matmul measurement and its cache, checks, the recommendation, and the verb."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from minigpt_cli.cli.app import app
from minigpt_cli.config.loader import load_config
from minigpt_cli.engine.core import units
from minigpt_cli.engine.doctor import checks, recommend
from minigpt_cli.engine.hardware import facts as hardware_facts
from minigpt_cli.engine.hardware import matmul, speed_cache
from minigpt_cli.engine.hardware.device import resolve_precision
from minigpt_cli.engine.resources import governor
from minigpt_cli.engine.resources.estimate import estimate_for_config, plan_micro_batch
from minigpt_cli.engine.training import step_timing
from tests.conftest import run_cli

REPORT_KEYS = {"minigpt_version", "facts", "measurements", "checks", "precision", "exit_status"}
FACT_KEYS = {"minigpt", "os", "python", "torch", "cpu", "memory", "disk", "accelerators"}


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty, private matmul cache for the test."""
    directory = tmp_path / "cache"
    monkeypatch.setenv(speed_cache.CACHE_ENV, str(directory))
    return directory


@pytest.fixture(scope="module")
def facts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return hardware_facts.collect_facts(tmp_path_factory.mktemp("runs"))


class FakeMeasure:
    """Stands in for `measure_device`: fixed figures, and a record of what was asked for."""

    def __init__(self, gflops: dict[str, float] | None = None) -> None:
        self.gflops = gflops or {"fp32": 100.0, "fp32_medium": 200.0, "bf16": 400.0}
        self.calls: list[tuple[str, ...]] = []

    def __call__(self, device: Any, seconds_budget: float = 1.0, keys: Any = None) -> dict:
        device = torch.device(device)
        wanted = tuple(keys) if keys is not None else matmul.MATMUL_KEYS[device.type]
        self.calls.append(wanted)
        return {
            "device": device.type,
            "device_name": hardware_facts.device_name(device),
            "fingerprint": hardware_facts.machine_fingerprint(device),
            "measured_at": "2025-01-01T00:00:00+00:00",
            "seconds": 0.0,
            "gflops": {key: self.gflops[key] for key in wanted},
            "speedup": {},
            "sizes": {key: 1024 for key in wanted},
            "rel_error": {key: 1e-7 for key in wanted},
            "errors": {},
        }


# Seconds of one micro-batch's forward + backward per preset (by n_layer), for fake timings: tiny
# and small finish within 30 minutes, medium does not.
FAKE_MICRO_STEP = {4: 0.01, 6: 0.02, 10: 10.0, 12: 20.0}


class FakeTiming:
    """Stands in for `measure_training_step`: fixed timings per preset, and a record of calls."""

    def __init__(self, micro_step: dict[int, float] | None = None, cpu_factor: float = 1.0) -> None:
        self.micro_step = micro_step or FAKE_MICRO_STEP
        self.cpu_factor = cpu_factor
        self.calls: list[tuple[int, int, bool]] = []

    def __call__(
        self,
        model_cfg: Any,
        vocab: int,
        train: Any,
        micro: int,
        eval_batch: int,
        *,
        device: Any,
        precision: Any,
    ) -> step_timing.StepTiming:
        self.calls.append((model_cfg.n_layer, micro, model_cfg.activation_checkpointing))
        wall = self.micro_step[model_cfg.n_layer]
        factor = self.cpu_factor
        return step_timing.StepTiming(
            wall, wall * factor, 0.001, 0.001 * factor, 0.004, 0.004 * factor
        )


@pytest.fixture
def fake_timing(monkeypatch: pytest.MonkeyPatch, cache_dir: Path) -> FakeTiming:
    """Fake step timings, cached in the test's own empty cache so no other test reads them."""
    fake = FakeTiming()
    monkeypatch.setattr(step_timing, "measure_training_step", fake)
    return fake


FP32_MEASURE = {"fp32": 100.0, "fp32_medium": 100.0, "bf16": 10.0}  # `auto` picks plain fp32


# ----------------------------------------------------------------------------------------------
# facts


X86_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse avx avx2 avx512f avx512_bf16 amx_bf16 amx_tile

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse avx avx2
"""

ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 48.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 bf16 i8mm
CPU implementer\t: 0x41
"""


def test_parse_cpuinfo_reads_model_and_first_processor_flags() -> None:
    model, flags = hardware_facts.parse_cpuinfo(X86_CPUINFO)
    assert model == "Intel(R) Xeon(R) Platinum 8480+"
    assert {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"} <= flags
    features = {name: name in flags for name in hardware_facts.CPU_FEATURES}
    assert hardware_facts.bf16_hardware(features) == "AMX"
    assert hardware_facts.bf16_hardware({"avx512_bf16": True}) == "AVX512-BF16"
    assert hardware_facts.bf16_hardware({"avx2": True, "avx512f": True}) is None


def test_parse_cpuinfo_maps_arm_bf16_without_confusing_x86_flags() -> None:
    model, flags = hardware_facts.parse_cpuinfo(ARM_CPUINFO)
    assert model is None
    assert "arm_bf16" in flags and "bf16" not in flags
    assert hardware_facts.bf16_hardware({"arm_bf16": True}) == "ARM BF16"


def test_collect_facts_describes_this_machine(tmp_path: Path) -> None:
    runs = tmp_path / "not" / "yet" / "runs"
    facts = hardware_facts.collect_facts(runs)
    assert facts.keys() >= FACT_KEYS
    json.dumps(facts)  # JSON-ready for bug reports
    assert facts["disk"]["runs_dir"] == str(runs)
    assert Path(facts["disk"]["checked_path"]) == tmp_path  # nearest existing parent
    assert facts["disk"]["free_bytes"] > 0 and facts["disk"]["writable"]
    assert facts["torch"]["version"] == torch.__version__
    assert facts["torch"]["config"] == torch.__config__.show()
    cpu = facts["cpu"]
    assert cpu["logical_cores"] >= 1 and cpu["torch_threads"] == torch.get_num_threads()
    assert cpu["capability"] == torch.backends.cpu.get_cpu_capability()
    assert set(cpu["features"]) == set(hardware_facts.CPU_FEATURES)
    assert 0 < facts["memory"]["available_bytes"] <= facts["memory"]["total_bytes"]
    assert facts["accelerators"]["cuda"]["available"] == torch.cuda.is_available()
    assert len(facts["accelerators"]["cuda"]["devices"]) == (
        torch.cuda.device_count() if torch.cuda.is_available() else 0
    )


def test_collect_facts_reads_cpu_flags_on_linux() -> None:
    if not Path("/proc/cpuinfo").exists():
        pytest.skip("no /proc/cpuinfo")
    model, flags = hardware_facts.parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    info = hardware_facts.cpu_info()
    assert info["flags_source"] == "/proc/cpuinfo"
    assert info["features"]["avx2"] == ("avx2" in flags)
    assert info["features"]["avx512_bf16"] == ("avx512_bf16" in flags)
    if model:
        assert info["model"] == model


# ----------------------------------------------------------------------------------------------
# measurement


def test_measure_matmul_is_positive_bounded_and_restores_precision() -> None:
    torch.set_float32_matmul_precision("highest")
    torch.manual_seed(0)
    rng_state = torch.get_rng_state()
    fp32 = matmul.measure_matmul("cpu", torch.float32, 0.15, fp32_precision="medium")
    assert fp32 > 0
    assert torch.get_float32_matmul_precision() == "highest"
    # peak_flops may measure mid-training: the global RNG must not move.
    assert torch.equal(torch.get_rng_state(), rng_state)
    # Without bf16 hardware one 1024² bf16 product can take seconds; the size ladder must keep
    # the measurement near its budget anyway.
    began = time.perf_counter()
    bf16 = matmul.measure_matmul("cpu", "bf16", 0.15)
    assert bf16 > 0
    assert time.perf_counter() - began < 2.0


def test_measure_device_compares_precisions_like_with_like() -> None:
    result = matmul.measure_device("cpu", 0.45)
    assert set(result["gflops"]) == {"fp32", "fp32_medium", "bf16"}
    assert all(value > 0 for value in result["gflops"].values())
    # fp32 variants are timed at the same side, so their ratio is fair.
    assert result["sizes"]["fp32_medium"] == result["sizes"]["fp32"]
    assert result["sizes"]["bf16"] <= result["sizes"]["fp32"]
    assert result["speedup"]["fp32"] == 1.0 and result["speedup"]["bf16"] > 0
    # The accuracy probe separates fp32 arithmetic from bf16 arithmetic.
    assert result["rel_error"]["fp32"] < matmul.FP32_LEVEL_ERROR < result["rel_error"]["bf16"]
    assert result["fingerprint"] == hardware_facts.machine_fingerprint("cpu")
    assert result["seconds"] < 3.0


def test_matmul_rel_error_detects_reduced_precision() -> None:
    assert matmul.matmul_rel_error("cpu", torch.float32) < 1e-5
    assert matmul.matmul_rel_error("cpu", torch.bfloat16) > 1e-3


def test_unknown_measurement_key_is_rejected() -> None:
    with pytest.raises(ValueError, match="fp8"):
        matmul.measure_device("cpu", 0.1, keys=("fp8",))
    with pytest.raises(ValueError):
        matmul.precision_key("cpu", "bf16_medium")


# ----------------------------------------------------------------------------------------------
# cache and peak_flops


def test_peak_flops_measures_once_then_reads_the_cache(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeMeasure()
    monkeypatch.setattr(matmul, "measure_device", fake)
    assert speed_cache.peak_flops("cpu", "bf16") == 400e9
    assert fake.calls == [("bf16",)]
    cache_file = cache_dir / speed_cache.CACHE_FILE
    stamp = cache_file.stat().st_mtime_ns
    assert speed_cache.peak_flops("cpu", "bf16") == 400e9
    assert fake.calls == [("bf16",)]  # read from the cache, nothing measured
    assert cache_file.stat().st_mtime_ns == stamp
    # A precision not cached yet is measured alone and merged into the same entry.
    assert speed_cache.peak_flops("cpu", "fp32") == 100e9
    assert fake.calls == [("bf16",), ("fp32",)]
    entries = json.loads(cache_file.read_text())["entries"]
    assert len(entries) == 1
    (entry,) = entries.values()
    assert entry["gflops"] == {"bf16": 400.0, "fp32": 100.0}


def test_peak_flops_real_measurement_is_positive_and_cached(cache_dir: Path) -> None:
    first = speed_cache.peak_flops("cpu", "fp32")
    assert first > 0
    cache_file = cache_dir / speed_cache.CACHE_FILE
    before = cache_file.read_bytes()
    assert speed_cache.peak_flops("cpu", "fp32") == first
    assert cache_file.read_bytes() == before


def test_fp32_peak_follows_the_matmul_precision_in_force(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(matmul, "measure_device", FakeMeasure())
    with matmul.float32_matmul_precision("medium"):
        assert matmul.precision_key("cpu", "fp32") == "fp32_medium"
        assert speed_cache.peak_flops("cpu", "fp32") == 200e9
    with matmul.float32_matmul_precision("highest"):
        assert speed_cache.peak_flops("cpu", "fp32") == 100e9
    decision = resolve_precision("bf16", "cpu", measurements={}, cpu_features={})
    assert matmul.precision_key("cpu", decision) == "bf16"


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[]",
        json.dumps({"version": 1, "entries": []}),
        json.dumps({"version": 99, "entries": {}}),
    ],
)
def test_corrupt_cache_is_ignored_and_rewritten(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch, content: str
) -> None:
    cache_dir.mkdir(parents=True)
    (cache_dir / speed_cache.CACHE_FILE).write_text(content)
    fake = FakeMeasure()
    monkeypatch.setattr(matmul, "measure_device", fake)
    assert speed_cache.peak_flops("cpu", "fp32") == 100e9
    assert len(fake.calls) == 1
    data = json.loads((cache_dir / speed_cache.CACHE_FILE).read_text())
    assert data["version"] == speed_cache.CACHE_VERSION
    key = speed_cache.fingerprint_key(hardware_facts.machine_fingerprint("cpu"))
    assert data["entries"][key]["gflops"]["fp32"] == 100.0


def test_invalid_cache_entry_is_remeasured(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = speed_cache.fingerprint_key(hardware_facts.machine_fingerprint("cpu"))
    cache_dir.mkdir(parents=True)
    fake = FakeMeasure()
    monkeypatch.setattr(matmul, "measure_device", fake)
    for entry in ({"gflops": {"fp32": -5}}, {"gflops": {"fp32": 5}, "speedup": {"bf16": "x"}}):
        bad = {"version": 1, "entries": {key: entry}}
        (cache_dir / speed_cache.CACHE_FILE).write_text(json.dumps(bad))
        assert speed_cache.peak_flops("cpu", "fp32") == 100e9
    assert len(fake.calls) == 2


def test_another_machine_or_torch_gets_its_own_entry(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeMeasure()
    monkeypatch.setattr(matmul, "measure_device", fake)
    speed_cache.peak_flops("cpu", "fp32")
    real = hardware_facts.machine_fingerprint

    def other_torch(device: Any) -> dict[str, Any]:
        return {**real(device), "torch": "9.9.9"}

    monkeypatch.setattr(hardware_facts, "machine_fingerprint", other_torch)
    speed_cache.peak_flops("cpu", "fp32")
    assert len(fake.calls) == 2
    assert len(json.loads((cache_dir / speed_cache.CACHE_FILE).read_text())["entries"]) == 2


def test_unwritable_cache_does_not_stop_peak_flops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv(speed_cache.CACHE_ENV, str(blocker / "cache"))
    fake = FakeMeasure()
    monkeypatch.setattr(matmul, "measure_device", fake)
    assert speed_cache.peak_flops("cpu", "bf16") == 400e9
    assert speed_cache.store_measurements(fake("cpu", keys=("fp32",))) is False


def test_cache_location_defaults_to_user_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(speed_cache.CACHE_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert speed_cache.cache_path() == Path.home() / ".cache" / "minigpt" / "matmul.json"
    monkeypatch.setenv(speed_cache.CACHE_ENV, "/somewhere/else")
    assert speed_cache.cache_path() == Path("/somewhere/else/matmul.json")


# ----------------------------------------------------------------------------------------------
# checks


GOOD_MEASUREMENTS = {
    "device": "cpu",
    "gflops": {"fp32": 200.0, "fp32_medium": 450.0, "bf16": 900.0},
    "speedup": {"fp32": 1.0, "fp32_medium": 2.2, "bf16": 4.5},
    "rel_error": {"fp32": 2e-7, "fp32_medium": 2e-7, "bf16": 3e-3},
    "errors": {},
}


def _facts(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A deep copy of `base` with dotted-path changes, e.g. `cpu__torch_threads=8`."""
    facts = copy.deepcopy(base)
    facts["cpu"]["load_average"] = 0.1
    facts["cpu"]["torch_threads"] = facts["cpu"]["physical_cores"] or facts["cpu"]["usable_cores"]
    facts["memory"]["available_bytes"] = 8e9
    facts["disk"]["free_bytes"] = 50e9
    for path, value in changes.items():
        node = facts
        *parents, leaf = path.split("__")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return facts


def _by_name(verdicts: list[checks.Check]) -> dict[str, checks.Check]:
    return {check.name: check for check in verdicts}


def test_healthy_cpu_only_machine_passes(facts: dict[str, Any]) -> None:
    healthy = _facts(
        facts,
        accelerators={
            "cuda": {"built": False, "available": False, "devices": [], "driver": False},
            "mps": {"built": False, "available": False},
        },
        cpu__features={**dict.fromkeys(hardware_facts.CPU_FEATURES, False), "avx512_bf16": True},
    )
    verdicts = checks.run_checks(healthy, GOOD_MEASUREMENTS)
    by_name = _by_name(verdicts)
    assert {c.status for c in verdicts} == {"pass"}, verdicts
    assert "CPU only" in by_name["accelerator"].message
    assert "4.5x" in by_name["bf16"].message and "AVX512-BF16" in by_name["bf16"].message
    assert checks.exit_status(verdicts) == 0


@pytest.mark.parametrize(
    ("changes", "name", "status", "text"),
    [
        ({"python__version": "3.10.12"}, "python", "fail", "3.11"),
        ({"torch__version": "2.3.1+cpu"}, "torch", "fail", "torch>=2.4"),
        ({"torch__version": "2.4.0a0+git123"}, "torch", "pass", "2.4.0"),
        ({"memory__available_bytes": 1.2e9}, "memory", "warn", "1.2 GB"),
        ({"disk__free_bytes": 0.5e9}, "disk", "warn", "500.0 MB"),
        ({"disk__writable": False}, "disk", "fail", "cannot write"),
        ({"disk__not_a_directory": True}, "disk", "fail", "not a directory"),
        ({"cpu__load_average": 5.0}, "load", "warn", "busy"),
        ({"cpu__torch_threads": 64}, "threads", "warn", "oversubscribed"),
    ],
)
def test_checks_flag_problems(
    facts: dict[str, Any], changes: dict[str, Any], name: str, status: str, text: str
) -> None:
    verdicts = checks.run_checks(_facts(facts, **changes), GOOD_MEASUREMENTS)
    check = _by_name(verdicts)[name]
    assert check.status == status, check
    assert text in check.message
    assert checks.exit_status(verdicts) == (1 if status == "fail" else 0)


def test_fewer_threads_than_cores_warns(facts: dict[str, Any]) -> None:
    many = _facts(facts, cpu__physical_cores=8, cpu__logical_cores=16, cpu__usable_cores=16)
    many["cpu"]["torch_threads"] = 2
    many["cpu"]["thread_env"] = {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": None}
    check = _by_name(checks.run_checks(many, GOOD_MEASUREMENTS))["threads"]
    assert check.status == "warn" and "OMP_NUM_THREADS=2" in check.message
    many["cpu"]["torch_threads"] = 8
    assert _by_name(checks.run_checks(many, GOOD_MEASUREMENTS))["threads"].status == "pass"


def test_slow_bf16_warns_and_says_what_it_means(facts: dict[str, Any]) -> None:
    slow = dict(GOOD_MEASUREMENTS, speedup={"fp32": 1.0, "fp32_medium": 1.0, "bf16": 0.01})
    no_bf16 = _facts(facts, cpu__features=dict.fromkeys(hardware_facts.CPU_FEATURES, False))
    check = _by_name(checks.run_checks(no_bf16, slow))["bf16"]
    assert check.status == "warn"
    assert "0.01x" in check.message and "fp32" in check.message


def test_wrong_matmul_results_fail(facts: dict[str, Any]) -> None:
    broken = dict(GOOD_MEASUREMENTS, rel_error={"fp32": 0.3})
    check = _by_name(checks.run_checks(_facts(facts), broken))["matmul"]
    assert check.status == "fail" and "broken" in check.message


def test_accelerator_never_fails(facts: dict[str, Any]) -> None:
    gpu = {
        "index": 0,
        "name": "Tesla T4",
        "total_memory_bytes": 16e9,
        "free_memory_bytes": 15e9,
        "compute_capability": "7.5",
        "bf16": False,
        "multiprocessors": 40,
    }
    cases = [
        ({"built": False, "available": False, "devices": [], "driver": False}, "pass", "CPU"),
        ({"built": False, "available": False, "devices": [], "driver": True}, "warn", "CPU-only"),
        ({"built": True, "available": False, "devices": [], "driver": False}, "pass", "CPU"),
        ({"built": True, "available": True, "devices": [gpu], "driver": True}, "pass", "T4"),
    ]
    for cuda, status, text in cases:
        accelerators = {"cuda": cuda, "mps": {"built": False, "available": False}}
        check = _by_name(checks.run_checks(_facts(facts, accelerators=accelerators)))["accelerator"]
        assert check.status == status and text in check.message, check
    mps = {"cuda": cases[0][0], "mps": {"built": True, "available": True}}
    assert (
        "MPS" in _by_name(checks.run_checks(_facts(facts, accelerators=mps)))["accelerator"].message
    )
    # On an old GPU the bf16 line explains the fp16 fallback.
    old_gpu = _facts(facts, accelerators={"cuda": cases[3][0], "mps": mps["mps"]})
    bf16 = _by_name(checks.run_checks(old_gpu, {**GOOD_MEASUREMENTS, "device": "cuda"}))["bf16"]
    assert bf16.status == "warn" and "fp16" in bf16.message


def test_version_tuple() -> None:
    assert checks.version_tuple("2.13.0+cpu") == (2, 13, 0)
    assert checks.version_tuple("2.5.0a0+gitabc") == (2, 5, 0)
    assert checks.version_tuple("3.11.7") == (3, 11, 7)


# ----------------------------------------------------------------------------------------------
# the CLI


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, speed_cache.CACHE_ENV: str(cache), "COLUMNS": "200"}


def test_doctor_json_parses_and_caches_the_measurement(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    # A one-second budget: tiny is timed for real (over budget), nothing larger is.
    command = ["doctor", "--json", "--runs-dir", str(tmp_path), "--budget", "1s"]
    result = subprocess.run(
        [sys.executable, "-m", "minigpt_cli", *command],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(cache),
    )
    assert result.returncode == 0, result.stderr  # no accelerator here is never a failure
    report = json.loads(result.stdout)
    assert report.keys() >= REPORT_KEYS
    assert report["facts"].keys() >= FACT_KEYS
    gflops = report["measurements"]["gflops"]
    assert gflops["fp32"] > 0 and gflops["bf16"] > 0
    assert {c["status"] for c in report["checks"]} <= {"pass", "warn"}
    names = {c["name"] for c in report["checks"]}
    assert {"python", "torch", "memory", "disk", "accelerator", "bf16", "threads"} <= names
    precision = report["precision"]
    assert precision["dtype_name"] in {"fp32", "bf16", "fp16"} and precision["reason"]
    cached = json.loads((cache / speed_cache.CACHE_FILE).read_text())
    assert [entry["gflops"] for entry in cached["entries"].values()] == [gflops]
    recommendation = report["recommendation"]
    assert recommendation["preset"] is None and recommendation["command"] is None
    assert recommendation["advice"].startswith("nothing finishes within 1s: tiny needs about")
    tiny, *larger = recommendation["presets"]
    assert tiny["speed_source"] == "measured" and tiny["tokens_per_sec"] > 0
    assert tiny["within_budget"] is False and tiny["seconds"] > 1
    assert all(row["tokens_per_sec"] is None for row in larger)
    assert len(cached[step_timing.SPEED_CACHE_SECTION]) == 1  # tiny's step, for the next doctor


def test_doctor_plain_output_is_readable(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch, fake_timing: FakeTiming
) -> None:
    monkeypatch.setattr(matmul, "measure_device", FakeMeasure())
    result = CliRunner().invoke(app, ["doctor", "--runs-dir", str(tmp_path), "--max-memory", "1TB"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("minigpt doctor")
    assert any(line.startswith("✓ python") for line in lines)
    assert any(line.startswith(("✓ accelerator", "! accelerator")) for line in lines)
    matmul_row = next(line for line in lines if line.startswith("Matmul (cpu)"))
    assert "fp32 100" in matmul_row and "bf16 400" in matmul_row
    assert any(line.startswith("Precision auto") for line in lines)
    assert lines[-3].startswith("All checks passed")
    header = lines.index(next(line for line in lines if line.startswith("preset ")))
    assert lines[header - 1].startswith("Presets under --max-memory 1TB")
    tiny, small, medium, large = lines[header + 1 : header + 5]
    assert tiny.split()[:4] == ["tiny", "1.49M", "yes", "8"]
    assert small.split()[:4] == ["small", "24.4M", "yes", "8"]
    assert medium.endswith("/ 30m over")
    assert "not timed: medium is over the budget" in large
    assert lines[-2] == (
        "small is the largest preset that fits and finishes within 30m; medium would take about "
        f"{units.format_duration(medium_seconds())}, over the 30m budget"
    )
    assert lines[-1] == "recommended: minigpt pretrain --preset small --max-memory 1TB"


def test_doctor_exits_1_when_a_check_fails(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch, fake_timing: FakeTiming
) -> None:
    monkeypatch.setattr(matmul, "measure_device", FakeMeasure())
    monkeypatch.setattr(
        checks,
        "run_checks",
        lambda facts, m=None: [checks.Check("fail", "python", "too old")],
    )
    result = CliRunner().invoke(app, ["doctor", "--runs-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "✗ python  too old" in result.output
    result = CliRunner().invoke(app, ["doctor", "--json", "--runs-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert json.loads(result.output)["exit_status"] == 1


def test_doctor_help_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from minigpt_cli.cli.app import app\n"
        "result = CliRunner().invoke(app, ['doctor', '--help'])\n"
        "assert result.exit_code == 0, result.output\n"
        "assert '--json' in result.output and '--runs-dir' in result.output\n"
        "print(sorted(m for m in ('torch', 'rich', 'numpy', 'psutil') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "torch" not in result.stdout and "numpy" not in result.stdout


# ----------------------------------------------------------------------------------------------
# the recommendation


def expected_seconds(preset: str, micro_batch: int | None = None) -> float:
    """The time the fake timings give a preset's default run, computed independently here: every
    optimizer step (accumulation x micro-step + update) and every validation pass."""
    config = load_config(preset)
    train = config.stage_train("pretrain")
    micro = micro_batch or train.micro_batch_size
    seq = config.model.context_length
    tokens = recommend.builtin_token_estimate(config)
    val_windows = (tokens - int(tokens * (1 - config.data.val_fraction)) - 1) // seq
    eval_sequences = min(val_windows, train.eval_batches * train.micro_batch_size)
    steps = train.max_steps
    evals = -(-steps // train.eval_every)
    forwards = -(-eval_sequences // min(8, micro))
    step = (train.global_batch_size // micro) * FAKE_MICRO_STEP[config.model.n_layer] + 0.001
    return steps * step + evals * forwards * 0.004


def medium_seconds() -> float:
    return expected_seconds("medium")


def _recommend(**kwargs: Any) -> dict[str, Any]:
    precision = resolve_precision("fp32", "cpu", measurements={}, cpu_features={})
    return recommend.recommend_preset(device="cpu", precision=precision, **kwargs)


@pytest.mark.parametrize(
    ("budget", "chosen", "timed"),
    [(30 * 60, "small", [4, 6, 10]), (60, "tiny", [4, 6]), (1, None, [4])],
)
def test_recommendation_is_the_largest_preset_within_the_budget(
    fake_timing: FakeTiming, budget: float, chosen: str | None, timed: list[int]
) -> None:
    result = _recommend(max_memory="1TB", budget_seconds=budget)
    rows = {row["preset"]: row for row in result["presets"]}
    assert [row["preset"] for row in result["presets"]] == ["tiny", "small", "medium", "large"]
    assert all(row["fits"] for row in rows.values())
    # Larger presets are not timed once one is over the budget.
    assert [layers for layers, _, _ in fake_timing.calls] == timed
    for name in ("tiny", "small", "medium")[: len(timed)]:
        assert rows[name]["seconds"] == pytest.approx(expected_seconds(name), abs=0.1)
        assert rows[name]["within_budget"] == (rows[name]["seconds"] <= budget)
        config = load_config(name)
        train = config.stage_train("pretrain")
        step = (train.global_batch_size // train.micro_batch_size) * FAKE_MICRO_STEP[
            config.model.n_layer
        ] + 0.001
        step_tokens = train.global_batch_size * config.model.context_length
        assert rows[name]["tokens_per_sec"] == pytest.approx(step_tokens / step, abs=0.1)
    untimed = ["tiny", "small", "medium", "large"][len(timed) :]
    assert all(rows[name]["tokens_per_sec"] is None for name in untimed)
    assert all(rows[name]["note"].startswith("not timed: ") for name in untimed)
    assert result["preset"] == chosen
    if chosen:
        assert result["command"] == f"minigpt pretrain --preset {chosen} --max-memory 1TB"
    else:
        assert result["command"] is None
        minutes = -(-expected_seconds("tiny") // 60)
        assert result["advice"].startswith("nothing finishes within 1s: tiny needs about")
        assert f"raise --budget (e.g. --budget {minutes:.0f}m)" in result["advice"]


def test_recommendation_respects_the_memory_cap(fake_timing: FakeTiming) -> None:
    tiny, small = load_config("tiny"), load_config("small")
    tiny_needs = plan_micro_batch(tiny, 5000, "fp32", recommend.builtin_data_bytes(tiny), 2**50)
    small_least = plan_micro_batch(small, 10000, "fp32", recommend.builtin_data_bytes(small), 0)
    assert tiny_needs.estimate.total < small_least.estimate.total
    cap_mib = (tiny_needs.estimate.total + small_least.estimate.total) / 2 / 2**20
    result = _recommend(max_memory=f"{cap_mib:.0f}MiB", max_cpu=100)
    fits = {row["preset"]: row["fits"] for row in result["presets"]}
    assert fits == {"tiny": True, "small": False, "medium": False, "large": False}
    assert result["preset"] == "tiny"
    assert (
        result["command"]
        == f"minigpt pretrain --preset tiny --max-memory {cap_mib:.0f}MiB --max-cpu 100"
    )
    assert result["advice"].endswith("; small does not fit under the memory cap")
    assert [layers for layers, _, _ in fake_timing.calls] == [
        4
    ]  # nothing that does not fit is timed
    small_row = result["presets"][1]
    assert small_row["peak_bytes"] == small_least.estimate.total
    assert small_row["micro_batch_size"] is None


def test_nothing_fits_says_how_much_memory_is_needed(fake_timing: FakeTiming) -> None:
    result = _recommend(max_memory="64MB")
    assert result["preset"] is None and not any(row["fits"] for row in result["presets"])
    assert fake_timing.calls == []
    need = -(-result["presets"][0]["peak_bytes"] // 2**20)
    assert result["advice"].startswith("nothing fits: even tiny at micro-batch 1 with activation")
    assert result["advice"].endswith(f"raise it, e.g. --max-memory {need}MiB")
    # That suggestion is enough: tiny fits under it.
    assert _recommend(max_memory=f"{need}MiB")["presets"][0]["fits"]


def test_doctor_and_pretrain_pick_the_same_micro_batch(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch, fake_timing: FakeTiming
) -> None:
    """`doctor --max-memory N` and `pretrain --max-memory N` (its fit_memory) agree, for a cap
    under which the configured micro-batch does not fit and a smaller one does."""
    from minigpt_cli.engine.resources.memory import fit_memory

    monkeypatch.setattr(matmul, "measure_device", FakeMeasure(FP32_MEASURE))
    tiny = load_config("tiny")
    data_bytes = recommend.builtin_data_bytes(tiny)

    def needs(micro: int) -> int:
        return estimate_for_config(
            tiny, micro_batch_size=micro, precision="fp32", data_bytes=data_bytes
        ).total

    # Between micro-batch 4 and 8, far from both: the token count is an estimate (within 3%).
    cap_mib = (needs(4) + needs(8)) / 2 / 2**20
    assert needs(8) - needs(4) > 2 * 0.03 * data_bytes
    flag = f"{cap_mib:.1f}MiB"
    result = CliRunner().invoke(
        app, ["doctor", "--json", "--runs-dir", str(tmp_path), "--max-memory", flag]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["precision"]["dtype_name"] == "fp32"
    recommendation = report["recommendation"]
    assert recommendation.keys() >= {
        "max_memory",
        "cap_bytes",
        "max_cpu",
        "threads",
        "thread_reason",
        "budget_seconds",
        "device",
        "precision",
        "presets",
        "preset",
        "command",
        "advice",
        "not_counted",
    }
    assert recommendation["budget_seconds"] == 30 * 60
    assert recommendation["max_memory"] == flag
    tiny_row = recommendation["presets"][0]
    assert tiny_row.keys() >= {
        "preset",
        "parameters",
        "fits",
        "micro_batch_size",
        "configured_micro_batch_size",
        "activation_checkpointing",
        "peak_bytes",
        "cap_bytes",
        "steps",
        "tokens",
        "tokens_per_sec",
        "seconds",
        "within_budget",
        "speed_source",
        "note",
    }
    config = load_config("tiny", None, {"resources.max_memory": flag})
    micro, messages = fit_memory(config, 5000, "fp32", data_bytes, None)
    assert (tiny_row["micro_batch_size"], tiny_row["configured_micro_batch_size"]) == (micro, 8)
    assert micro == 4 and messages
    assert tiny_row["activation_checkpointing"] is config.model.activation_checkpointing is False
    assert tiny_row["peak_bytes"] == needs(4)
    assert fake_timing.calls[0] == (4, 4, False)  # timed at the planned micro-batch
    assert recommendation["command"] == f"minigpt pretrain --preset tiny --max-memory {flag}"


def test_a_fractional_cpu_cap_slows_the_estimate_by_its_duty_cycle(
    monkeypatch: pytest.MonkeyPatch, fake_timing: FakeTiming
) -> None:
    monkeypatch.setattr(governor.psutil, "cpu_count", lambda logical=True: 4)
    monkeypatch.setattr(governor.os, "cpu_count", lambda: 4)
    # 25% of 4 cores is one core: work that used 2 CPU-seconds takes 2 wall seconds at least.
    quarter = governor.CpuThrottle.from_percent(25)
    assert quarter.throttled_seconds(1.0, 2.0) == 2.0
    assert quarter.throttled_seconds(1.0, 0.5) == 1.0
    every_core = governor.CpuThrottle.from_percent(100)
    assert every_core.throttled_seconds(1.0, 3.0) == 1.0  # no throttle when every core is allowed
    fake_timing.cpu_factor = 2.0
    full = _recommend(max_memory="1TB", max_cpu=100)["presets"][0]
    capped = _recommend(max_memory="1TB", max_cpu=25)
    # Each estimate is rounded to 0.1 s: twice a rounded figure is within 0.15 s of the other.
    assert capped["presets"][0]["seconds"] == pytest.approx(2 * full["seconds"], abs=0.15)
    assert capped["command"].endswith("--max-cpu 25")


def test_format_duration() -> None:
    cases = {0: "0s", 45: "45s", 90: "1m 30s", 1800: "30m", 5520: "1h 32m", 7200: "2h"}
    assert {seconds: units.format_duration(seconds) for seconds in cases} == cases
    assert units.format_duration(3 * 86400 + 4 * 3600) == "3d 4h"
    # The progress line's ETA uses the same function: no figure yet reads "?".
    assert units.format_duration(None) == units.format_duration(float("nan")) == "?"
    assert units.format_duration(185) == "3m 05s" and units.format_duration(-4) == "0s"


def test_builtin_token_estimate_is_a_little_above_the_real_count(tmp_path: Path) -> None:
    """The bytes-per-token ratio still holds: train tiny's tokenizer on the built-in corpus and
    count, as pretrain does (end-of-text tokens included)."""
    from minigpt_cli.datasets.builtin import pretrain_records
    from minigpt_cli.engine.data.tokenizer import Tokenizer
    from minigpt_cli.engine.data.tokenizer_training import train_tokenizer

    config = load_config("tiny")
    texts = [r["text"] for r in pretrain_records(config.data.builtin_size, seed=0)]
    train_tokenizer(texts, config.tokenizer.vocab_size, tmp_path, num_threads=1)
    tokenizer = Tokenizer.load(tmp_path)
    real = sum(len(ids) + 1 for ids in tokenizer.encode_batch(texts))
    estimate = recommend.builtin_token_estimate(config)
    assert real <= estimate <= 1.03 * real
    assert recommend.builtin_data_bytes(config) == 4 * estimate


def test_a_real_tiny_step_is_timed_once_then_read_from_the_cache(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_config("tiny")
    train = config.stage_train("pretrain")
    precision = resolve_precision("fp32", "cpu", measurements={}, cpu_features={})
    rng = torch.get_rng_state()
    args = (config.model, config.tokenizer.vocab_size, train, 8, 8)
    first = step_timing.training_step_timing(*args, device="cpu", precision=precision)
    assert first.source == "measured"
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is left alone
    assert first.micro_step > 0 and first.optimizer > 0 and first.eval_forward > 0
    # A validation forward (no backward) costs less than a training micro-step of as many tokens.
    assert first.eval_forward < first.micro_step

    # The same case again comes from the cache, nothing is measured.
    def refuse(*_: Any, **__: Any) -> None:
        raise AssertionError("measured again")

    monkeypatch.setattr(step_timing, "measure_training_step", refuse)
    second = step_timing.training_step_timing(*args, device="cpu", precision=precision)
    assert second.source == "cached"
    assert second.to_dict() == pytest.approx(first.to_dict())
    # Another micro-batch is another case.
    with pytest.raises(AssertionError, match="measured again"):
        step_timing.training_step_timing(
            config.model,
            config.tokenizer.vocab_size,
            train,
            4,
            4,
            device="cpu",
            precision=precision,
        )


@pytest.mark.parametrize(
    ("flags", "text"),
    [
        (["--budget", "soon"], "--budget: 'soon' is not a duration"),
        (["--budget", "0m"], "--budget: duration must be positive"),
        (["--max-memory", "lots"], "'lots' is not a memory size"),
        (["--max-cpu", "150"], "must be at most 100"),
    ],
)
def test_bad_flag_values_exit_2_with_one_line(flags: list[str], text: str) -> None:
    result = run_cli("doctor", *flags)
    assert result.returncode == 2
    assert text in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""


def test_a_step_that_fails_is_reported_and_stops_the_timing(
    monkeypatch: pytest.MonkeyPatch, cache_dir: Path
) -> None:
    def out_of_memory(model_cfg: Any, *_: Any, **__: Any) -> step_timing.StepTiming:
        if model_cfg.n_layer > 4:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
        return step_timing.StepTiming(0.01, 0.01, 0.001, 0.001, 0.004, 0.004)

    monkeypatch.setattr(step_timing, "measure_training_step", out_of_memory)
    result = _recommend(max_memory="1TB")
    tiny, small, medium, _ = result["presets"]
    assert result["preset"] == "tiny"
    assert small["note"] == "a training step failed: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert small["tokens_per_sec"] is None and small["within_budget"] is None
    assert medium["note"] == "not timed: small could not be timed"
    assert result["advice"] == (
        "tiny is the largest preset that fits and finishes within 30m; small was not timed "
        "(a training step failed: CUDA out of memory. Tried to allocate 2.00 GiB)"
    )
