"""doctor: facts, matmul measurement and its cache, checks, and the `minigpt doctor` verb."""

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
from minigpt_cli.engine import doctor
from minigpt_cli.engine.device import resolve_precision

REPORT_KEYS = {"minigpt_version", "facts", "measurements", "checks", "precision", "exit_status"}
FACT_KEYS = {"minigpt", "os", "python", "torch", "cpu", "memory", "disk", "accelerators"}


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty, private matmul cache for the test."""
    directory = tmp_path / "cache"
    monkeypatch.setenv(doctor.CACHE_ENV, str(directory))
    return directory


@pytest.fixture(scope="module")
def facts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return doctor.collect_facts(tmp_path_factory.mktemp("runs"))


class FakeMeasure:
    """Stands in for `measure_device`: fixed figures, and a record of what was asked for."""

    def __init__(self, gflops: dict[str, float] | None = None) -> None:
        self.gflops = gflops or {"fp32": 100.0, "fp32_medium": 200.0, "bf16": 400.0}
        self.calls: list[tuple[str, ...]] = []

    def __call__(self, device: Any, seconds_budget: float = 1.0, keys: Any = None) -> dict:
        device = torch.device(device)
        wanted = tuple(keys) if keys is not None else doctor.MATMUL_KEYS[device.type]
        self.calls.append(wanted)
        return {
            "device": device.type,
            "device_name": doctor.device_name(device),
            "fingerprint": doctor.machine_fingerprint(device),
            "measured_at": "2025-01-01T00:00:00+00:00",
            "seconds": 0.0,
            "gflops": {key: self.gflops[key] for key in wanted},
            "speedup": {},
            "sizes": {key: 1024 for key in wanted},
            "rel_error": {key: 1e-7 for key in wanted},
            "errors": {},
        }


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
    model, flags = doctor.parse_cpuinfo(X86_CPUINFO)
    assert model == "Intel(R) Xeon(R) Platinum 8480+"
    assert {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"} <= flags
    features = {name: name in flags for name in doctor.CPU_FEATURES}
    assert doctor.bf16_hardware(features) == "AMX"
    assert doctor.bf16_hardware({"avx512_bf16": True}) == "AVX512-BF16"
    assert doctor.bf16_hardware({"avx2": True, "avx512f": True}) is None


def test_parse_cpuinfo_maps_arm_bf16_without_confusing_x86_flags() -> None:
    model, flags = doctor.parse_cpuinfo(ARM_CPUINFO)
    assert model is None
    assert "arm_bf16" in flags and "bf16" not in flags
    assert doctor.bf16_hardware({"arm_bf16": True}) == "ARM BF16"


def test_collect_facts_describes_this_machine(tmp_path: Path) -> None:
    runs = tmp_path / "not" / "yet" / "runs"
    facts = doctor.collect_facts(runs)
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
    assert set(cpu["features"]) == set(doctor.CPU_FEATURES)
    assert 0 < facts["memory"]["available_bytes"] <= facts["memory"]["total_bytes"]
    assert facts["accelerators"]["cuda"]["available"] == torch.cuda.is_available()
    assert len(facts["accelerators"]["cuda"]["devices"]) == (
        torch.cuda.device_count() if torch.cuda.is_available() else 0
    )


def test_collect_facts_reads_cpu_flags_on_linux() -> None:
    if not Path("/proc/cpuinfo").exists():
        pytest.skip("no /proc/cpuinfo")
    model, flags = doctor.parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    info = doctor.cpu_info()
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
    fp32 = doctor.measure_matmul("cpu", torch.float32, 0.15, fp32_precision="medium")
    assert fp32 > 0
    assert torch.get_float32_matmul_precision() == "highest"
    # peak_flops may measure mid-training: the global RNG must not move.
    assert torch.equal(torch.get_rng_state(), rng_state)
    # Without bf16 hardware one 1024² bf16 product can take seconds; the size ladder must keep
    # the measurement near its budget anyway.
    began = time.perf_counter()
    bf16 = doctor.measure_matmul("cpu", "bf16", 0.15)
    assert bf16 > 0
    assert time.perf_counter() - began < 2.0


def test_measure_device_compares_precisions_like_with_like() -> None:
    result = doctor.measure_device("cpu", 0.45)
    assert set(result["gflops"]) == {"fp32", "fp32_medium", "bf16"}
    assert all(value > 0 for value in result["gflops"].values())
    # fp32 variants are timed at the same side, so their ratio is fair.
    assert result["sizes"]["fp32_medium"] == result["sizes"]["fp32"]
    assert result["sizes"]["bf16"] <= result["sizes"]["fp32"]
    assert result["speedup"]["fp32"] == 1.0 and result["speedup"]["bf16"] > 0
    # The accuracy probe separates fp32 arithmetic from bf16 arithmetic.
    assert result["rel_error"]["fp32"] < doctor.FP32_LEVEL_ERROR < result["rel_error"]["bf16"]
    assert result["fingerprint"] == doctor.machine_fingerprint("cpu")
    assert result["seconds"] < 3.0


def test_matmul_rel_error_detects_reduced_precision() -> None:
    assert doctor.matmul_rel_error("cpu", torch.float32) < 1e-5
    assert doctor.matmul_rel_error("cpu", torch.bfloat16) > 1e-3


def test_unknown_measurement_key_is_rejected() -> None:
    with pytest.raises(ValueError, match="fp8"):
        doctor.measure_device("cpu", 0.1, keys=("fp8",))
    with pytest.raises(ValueError):
        doctor.precision_key("cpu", "bf16_medium")


# ----------------------------------------------------------------------------------------------
# cache and peak_flops


def test_peak_flops_measures_once_then_reads_the_cache(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeMeasure()
    monkeypatch.setattr(doctor, "measure_device", fake)
    assert doctor.peak_flops("cpu", "bf16") == 400e9
    assert fake.calls == [("bf16",)]
    cache_file = cache_dir / doctor.CACHE_FILE
    stamp = cache_file.stat().st_mtime_ns
    assert doctor.peak_flops("cpu", "bf16") == 400e9
    assert fake.calls == [("bf16",)]  # read from the cache, nothing measured
    assert cache_file.stat().st_mtime_ns == stamp
    # A precision not cached yet is measured alone and merged into the same entry.
    assert doctor.peak_flops("cpu", "fp32") == 100e9
    assert fake.calls == [("bf16",), ("fp32",)]
    entries = json.loads(cache_file.read_text())["entries"]
    assert len(entries) == 1
    (entry,) = entries.values()
    assert entry["gflops"] == {"bf16": 400.0, "fp32": 100.0}


def test_peak_flops_real_measurement_is_positive_and_cached(cache_dir: Path) -> None:
    first = doctor.peak_flops("cpu", "fp32")
    assert first > 0
    cache_file = cache_dir / doctor.CACHE_FILE
    before = cache_file.read_bytes()
    assert doctor.peak_flops("cpu", "fp32") == first
    assert cache_file.read_bytes() == before


def test_fp32_peak_follows_the_matmul_precision_in_force(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(doctor, "measure_device", FakeMeasure())
    with doctor.float32_matmul_precision("medium"):
        assert doctor.precision_key("cpu", "fp32") == "fp32_medium"
        assert doctor.peak_flops("cpu", "fp32") == 200e9
    with doctor.float32_matmul_precision("highest"):
        assert doctor.peak_flops("cpu", "fp32") == 100e9
    decision = resolve_precision("bf16", "cpu", measurements={}, cpu_features={})
    assert doctor.precision_key("cpu", decision) == "bf16"


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
    (cache_dir / doctor.CACHE_FILE).write_text(content)
    fake = FakeMeasure()
    monkeypatch.setattr(doctor, "measure_device", fake)
    assert doctor.peak_flops("cpu", "fp32") == 100e9
    assert len(fake.calls) == 1
    data = json.loads((cache_dir / doctor.CACHE_FILE).read_text())
    assert data["version"] == doctor.CACHE_VERSION
    key = doctor.fingerprint_key(doctor.machine_fingerprint("cpu"))
    assert data["entries"][key]["gflops"]["fp32"] == 100.0


def test_invalid_cache_entry_is_remeasured(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = doctor.fingerprint_key(doctor.machine_fingerprint("cpu"))
    cache_dir.mkdir(parents=True)
    fake = FakeMeasure()
    monkeypatch.setattr(doctor, "measure_device", fake)
    for entry in ({"gflops": {"fp32": -5}}, {"gflops": {"fp32": 5}, "speedup": {"bf16": "x"}}):
        bad = {"version": 1, "entries": {key: entry}}
        (cache_dir / doctor.CACHE_FILE).write_text(json.dumps(bad))
        assert doctor.peak_flops("cpu", "fp32") == 100e9
    assert len(fake.calls) == 2


def test_another_machine_or_torch_gets_its_own_entry(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeMeasure()
    monkeypatch.setattr(doctor, "measure_device", fake)
    doctor.peak_flops("cpu", "fp32")
    real = doctor.machine_fingerprint

    def other_torch(device: Any) -> dict[str, Any]:
        return {**real(device), "torch": "9.9.9"}

    monkeypatch.setattr(doctor, "machine_fingerprint", other_torch)
    doctor.peak_flops("cpu", "fp32")
    assert len(fake.calls) == 2
    assert len(json.loads((cache_dir / doctor.CACHE_FILE).read_text())["entries"]) == 2


def test_unwritable_cache_does_not_stop_peak_flops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv(doctor.CACHE_ENV, str(blocker / "cache"))
    fake = FakeMeasure()
    monkeypatch.setattr(doctor, "measure_device", fake)
    assert doctor.peak_flops("cpu", "bf16") == 400e9
    assert doctor.store_measurements(fake("cpu", keys=("fp32",))) is False


def test_cache_location_defaults_to_user_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(doctor.CACHE_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert doctor.cache_path() == Path.home() / ".cache" / "minigpt" / "matmul.json"
    monkeypatch.setenv(doctor.CACHE_ENV, "/somewhere/else")
    assert doctor.cache_path() == Path("/somewhere/else/matmul.json")


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


def _by_name(checks: list[doctor.Check]) -> dict[str, doctor.Check]:
    return {check.name: check for check in checks}


def test_healthy_cpu_only_machine_passes(facts: dict[str, Any]) -> None:
    healthy = _facts(
        facts,
        accelerators={
            "cuda": {"built": False, "available": False, "devices": [], "driver": False},
            "mps": {"built": False, "available": False},
        },
        cpu__features={**dict.fromkeys(doctor.CPU_FEATURES, False), "avx512_bf16": True},
    )
    checks = doctor.run_checks(healthy, GOOD_MEASUREMENTS)
    by_name = _by_name(checks)
    assert {c.status for c in checks} == {"pass"}, checks
    assert "CPU only" in by_name["accelerator"].message
    assert "4.5x" in by_name["bf16"].message and "AVX512-BF16" in by_name["bf16"].message
    assert doctor.exit_status(checks) == 0


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
    checks = doctor.run_checks(_facts(facts, **changes), GOOD_MEASUREMENTS)
    check = _by_name(checks)[name]
    assert check.status == status, check
    assert text in check.message
    assert doctor.exit_status(checks) == (1 if status == "fail" else 0)


def test_fewer_threads_than_cores_warns(facts: dict[str, Any]) -> None:
    many = _facts(facts, cpu__physical_cores=8, cpu__logical_cores=16, cpu__usable_cores=16)
    many["cpu"]["torch_threads"] = 2
    many["cpu"]["thread_env"] = {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": None}
    check = _by_name(doctor.run_checks(many, GOOD_MEASUREMENTS))["threads"]
    assert check.status == "warn" and "OMP_NUM_THREADS=2" in check.message
    many["cpu"]["torch_threads"] = 8
    assert _by_name(doctor.run_checks(many, GOOD_MEASUREMENTS))["threads"].status == "pass"


def test_slow_bf16_warns_and_says_what_it_means(facts: dict[str, Any]) -> None:
    slow = dict(GOOD_MEASUREMENTS, speedup={"fp32": 1.0, "fp32_medium": 1.0, "bf16": 0.01})
    no_bf16 = _facts(facts, cpu__features=dict.fromkeys(doctor.CPU_FEATURES, False))
    check = _by_name(doctor.run_checks(no_bf16, slow))["bf16"]
    assert check.status == "warn"
    assert "0.01x" in check.message and "fp32" in check.message


def test_wrong_matmul_results_fail(facts: dict[str, Any]) -> None:
    broken = dict(GOOD_MEASUREMENTS, rel_error={"fp32": 0.3})
    check = _by_name(doctor.run_checks(_facts(facts), broken))["matmul"]
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
        check = _by_name(doctor.run_checks(_facts(facts, accelerators=accelerators)))["accelerator"]
        assert check.status == status and text in check.message, check
    mps = {"cuda": cases[0][0], "mps": {"built": True, "available": True}}
    assert (
        "MPS" in _by_name(doctor.run_checks(_facts(facts, accelerators=mps)))["accelerator"].message
    )
    # On an old GPU the bf16 line explains the fp16 fallback.
    old_gpu = _facts(facts, accelerators={"cuda": cases[3][0], "mps": mps["mps"]})
    bf16 = _by_name(doctor.run_checks(old_gpu, {**GOOD_MEASUREMENTS, "device": "cuda"}))["bf16"]
    assert bf16.status == "warn" and "fp16" in bf16.message


def test_version_tuple() -> None:
    assert doctor.version_tuple("2.13.0+cpu") == (2, 13, 0)
    assert doctor.version_tuple("2.5.0a0+gitabc") == (2, 5, 0)
    assert doctor.version_tuple("3.11.7") == (3, 11, 7)


# ----------------------------------------------------------------------------------------------
# the CLI


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, doctor.CACHE_ENV: str(cache), "COLUMNS": "200"}


def test_doctor_json_parses_and_caches_the_measurement(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    result = subprocess.run(
        [sys.executable, "-m", "minigpt_cli", "doctor", "--json", "--runs-dir", str(tmp_path)],
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
    cached = json.loads((cache / doctor.CACHE_FILE).read_text())["entries"]
    assert [entry["gflops"] for entry in cached.values()] == [gflops]


def test_doctor_plain_output_is_readable(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(doctor, "measure_device", FakeMeasure())
    result = CliRunner().invoke(app, ["doctor", "--runs-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("minigpt doctor")
    assert any(line.startswith("✓ python") for line in lines)
    assert any(line.startswith(("✓ accelerator", "! accelerator")) for line in lines)
    matmul = next(line for line in lines if line.startswith("Matmul (cpu)"))
    assert "fp32 100" in matmul and "bf16 400" in matmul
    assert any(line.startswith("Precision auto") for line in lines)
    assert lines[-1].startswith("All checks passed")


def test_doctor_exits_1_when_a_check_fails(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(doctor, "measure_device", FakeMeasure())
    monkeypatch.setattr(
        doctor, "run_checks", lambda facts, m=None: [doctor.Check("fail", "python", "too old")]
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
