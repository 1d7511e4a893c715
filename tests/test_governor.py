"""The resource governor: back-off decisions, pauses, the CPU duty cycle, and (measured from
outside the process, the one place tests do so) that real runs stay under their caps."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from minigpt_cli.engine.core.events import Event
from minigpt_cli.engine.resources import governor as gov
from tests import cpu_work
from tests.conftest import TINY_SETS, set_args
from tests.test_trainer import _train

MB = 2**20


class FakeMachine:
    """Memory readings a test scripts, and a clock that sleeping advances."""

    def __init__(self, peaks: list[int], available: list[int]) -> None:
        self.peaks, self.available = list(peaks), list(available)
        self.slept = 0.0

    def peak(self) -> int:
        return self.peaks.pop(0) if len(self.peaks) > 1 else self.peaks[0]

    def avail(self) -> int:
        return self.available.pop(0) if len(self.available) > 1 else self.available[0]

    def sleep(self, seconds: float) -> None:
        self.slept += seconds


def _governor(machine: FakeMachine, notices: list[str], cap: int = 1000 * MB) -> gov.Governor:
    return gov.Governor(
        cap,
        total_memory=16_000 * MB,
        read_peak=machine.peak,
        read_available=machine.avail,
        sleep=machine.sleep,
        on_pause=notices.append,
    )


def test_smaller_micro_batch_halves_to_a_divisor_of_the_global_batch() -> None:
    assert gov.smaller_micro_batch(8, 16) == 4
    assert gov.smaller_micro_batch(6, 12) == 3
    assert gov.smaller_micro_batch(12, 24) == 6
    assert gov.smaller_micro_batch(9, 36) == 4  # 4.5 is not a size: the next divisor below
    assert gov.smaller_micro_batch(1, 8) is None


def test_below_the_soft_limit_nothing_changes() -> None:
    machine = FakeMachine([800 * MB], [8000 * MB])
    assert _governor(machine, []).after_step(8, 16, False) is None


def test_near_the_cap_it_backs_off_then_checkpoints_activations_then_stops() -> None:
    notices: list[str] = []
    machine = FakeMachine([980 * MB], [8000 * MB])
    governor = _governor(machine, notices)
    first = governor.after_step(8, 16, False)
    assert first is not None and first.micro_batch_size == 4
    assert "micro-batch 8 -> 4, accumulation 2 -> 4 (global batch unchanged)" in first.message
    assert "near the 1,000 MB cap" in first.message
    last = governor.after_step(1, 16, False)
    assert last is not None and last.micro_batch_size == 1 and last.activation_checkpointing
    assert governor.after_step(1, 16, True) is None  # near, not over: nothing left, keep going
    machine.peaks = [1100 * MB]
    with pytest.raises(gov.MemoryCapExceeded, match="over the 1,000 MB cap"):
        governor.after_step(1, 16, True)


def test_a_machine_short_of_memory_backs_off_then_pauses_visibly_until_it_recovers() -> None:
    notices: list[str] = []
    reserve = gov.system_reserve_bytes(16_000 * MB)
    machine = FakeMachine([100 * MB], [reserve - 1])
    governor = _governor(machine, notices)
    change = governor.after_step(4, 4, True)
    assert change is not None and change.micro_batch_size == 2
    assert "short of memory" in change.message
    # At the smallest setting the only lever left is to wait; three readings short, then free.
    machine.available = [reserve - 1, reserve - 1, reserve - 1, reserve - 1, reserve + 1]
    assert governor.after_step(1, 4, True) is None
    assert machine.slept == 3 * gov.PAUSE_POLL_SECONDS
    assert notices[0].startswith("paused: the machine is short of memory")
    assert notices[-1].startswith("resumed after")


class FakeClock:
    def __init__(self) -> None:
        self.wall = 0.0
        self.cpu = 0.0

    def sleep(self, seconds: float) -> None:
        self.wall += seconds

    def work(self, seconds: float, threads: int) -> None:
        self.wall += seconds
        self.cpu += seconds * threads


def test_throttle_keeps_average_cpu_at_a_fractional_cap() -> None:
    clock = FakeClock()
    throttle = gov.CpuThrottle(
        1.5, window=100.0, clock=lambda: clock.wall, cpu_clock=lambda: clock.cpu, sleep=clock.sleep
    )
    throttle.active = True
    for _ in range(50):
        clock.work(0.2, threads=2)
        throttle()
    assert clock.cpu / clock.wall == pytest.approx(1.5, rel=1e-6)


def test_throttle_does_not_bank_idle_time_beyond_its_window() -> None:
    clock = FakeClock()
    throttle = gov.CpuThrottle(
        1.0, window=2.0, clock=lambda: clock.wall, cpu_clock=lambda: clock.cpu, sleep=clock.sleep
    )
    throttle.active = True
    clock.wall += 60.0  # a long idle stretch (a pause, a slow disk)
    throttle()
    start_wall, start_cpu = clock.wall, clock.cpu
    for _ in range(20):
        clock.work(0.5, threads=2)
        throttle()
    assert (clock.cpu - start_cpu) / (clock.wall - start_wall) == pytest.approx(1.0, rel=0.05)


def test_a_cap_over_every_core_never_sleeps() -> None:
    assert not gov.CpuThrottle.from_percent(100).active


def _pressure_after(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """The process's measured peak jumps far over any cap once, after `step` optimizer steps."""
    calls = {"n": 0}

    def fake_peak() -> int:
        calls["n"] += 1
        return 2**50 if calls["n"] == step else 0

    monkeypatch.setattr(gov.Governor, "_process_peak", staticmethod(fake_peak))


SETS = ["train.micro_batch_size=4", "train.global_batch_size=8", "train.max_steps=6"]


def _losses(events: list[Event]) -> list[float]:
    return [e.data["loss"] for e in events if e.kind == "step"]


def test_a_back_off_mid_run_trains_the_same_tokens_and_resumes_with_its_micro_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, calm = _train(tmp_path / "calm", SETS)
    _pressure_after(monkeypatch, 2)
    _, pressed = _train(tmp_path / "pressed", [*SETS, "train.save_every=3"])
    notices = [e.data["message"] for e in pressed if e.kind == "governor"]
    assert len(notices) == 1 and "micro-batch 4 -> 2, accumulation 2 -> 4" in notices[0]
    sizes = [e.data["micro_batch_size"] for e in pressed if e.kind == "step"]
    assert sizes == [4, 4, 2, 2, 2, 2]
    # The same sequences in the same steps: only the float summation order differs.
    np.testing.assert_allclose(_losses(pressed), _losses(calm), rtol=1e-4)
    assert [e.data["tokens"] for e in pressed if e.kind == "step"] == [
        e.data["tokens"] for e in calm if e.kind == "step"
    ]
    lines = (tmp_path / "pressed" / "metrics.jsonl").read_text().splitlines()
    events = [r.get("event") for r in map(json.loads, lines) if r["kind"] == "event"]
    assert "governor" in events
    snapshot = tmp_path / "pressed" / "checkpoints" / "step-00000003" / "trainer_state.json"
    assert json.loads(snapshot.read_text())["micro_batch_size"] == 2


# ------------------------------------------------------------------------ measured from outside


def _tree(process: psutil.Process) -> list[psutil.Process]:
    try:
        return [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _tree_rss(process: psutil.Process) -> int:
    total = 0
    for proc in _tree(process):
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


def _pretrain(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "minigpt_cli", "pretrain", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


CAP_SETS = [
    *TINY_SETS,
    "model.n_embd=128",
    "model.context_length=512",
    "train.micro_batch_size=16",
    "train.global_batch_size=16",
    "train.eval_batches=1",
]


def _estimate_mb(micro_batch: int) -> float:
    from minigpt_cli.config.loader import load_config
    from minigpt_cli.engine.resources.estimate import estimate_training_memory

    config = load_config("tiny", sets=CAP_SETS)
    return (
        estimate_training_memory(
            config.model,
            600,
            micro_batch_size=micro_batch,
            precision="fp32",
            global_batch_size=16,
            eval_sequences=min(8, micro_batch),
        ).total
        / MB
    )


def test_a_memory_cap_holds_when_measured_from_outside(tmp_path: Path) -> None:
    low, high = _estimate_mb(8), _estimate_mb(16)
    assert high > 1.2 * low, "the shape must separate the two micro-batches clearly"
    # Between the two, nearer the larger: the smaller one's real peak (this machine's imports can
    # weigh a few tens of MB more than the estimator's constant) stays clear of the back-off line.
    cap_mb = low + 0.75 * (high - low)
    common = ["--max-steps", "3", "--precision", "fp32", "--device", "cpu", *set_args(CAP_SETS)]
    free = _pretrain(["--out", str(tmp_path / "free"), *common], tmp_path)
    assert free.wait(timeout=300) == 0, free.stderr.read() if free.stderr else ""

    capped = _pretrain(
        ["--out", str(tmp_path / "capped"), "--max-memory", f"{cap_mb:.1f}MiB", *common], tmp_path
    )
    watched = psutil.Process(capped.pid)
    peak = 0
    while capped.poll() is None:
        peak = max(peak, _tree_rss(watched))
        time.sleep(0.02)
    out, err = capped.communicate()
    assert capped.returncode == 0, err
    assert peak / MB < cap_mb, f"peak RSS {peak / MB:.0f} MB over the {cap_mb:.0f} MB cap"
    assert "training with micro-batch 8 x 2 accumulation" in out
    state = json.loads((tmp_path / "capped" / "trainer_state.json").read_text())
    assert state["micro_batch_size"] == 8

    def train_rows(run: str) -> list[dict]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["kind"] == "train"]

    free_rows, capped_rows = train_rows("free"), train_rows("capped")
    assert [r["tokens"] for r in capped_rows] == [r["tokens"] for r in free_rows]
    np.testing.assert_allclose(
        [r["loss"] for r in capped_rows], [r["loss"] for r in free_rows], rtol=1e-4
    )


@pytest.mark.exclusive  # another worker's tests would take CPU time the capped run is owed
def test_a_fractional_cpu_cap_holds_over_fifteen_seconds(tmp_path: Path) -> None:
    cores = psutil.cpu_count(logical=True) or 1
    cap_pct = 25.0 if cores >= 2 else 50.0  # half of one core on the 2-core CI machine
    run_dir = tmp_path / "cpu"
    proc = _pretrain(
        [
            "--out",
            str(run_dir),
            "--max-cpu",
            f"{cap_pct:g}",
            "--max-steps",
            "100000",
            "--max-time",
            "90s",
            "--precision",
            "fp32",
            "--device",
            "cpu",
            *set_args([*TINY_SETS, "train.eval_every=100000", "train.save_every=100000"]),
        ],
        tmp_path,
    )
    try:
        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.exists() and '"kind": "train"' in metrics.read_text()):
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.2)
        watched = psutil.Process(proc.pid)
        before_cpu, before_wall = watched.cpu_times(), time.monotonic()
        time.sleep(15)
        after_cpu, after_wall = watched.cpu_times(), time.monotonic()
        assert proc.poll() is None, "the run ended inside the window"
    finally:
        proc.kill()
        proc.communicate()
    used = (after_cpu.user + after_cpu.system) - (before_cpu.user + before_cpu.system)
    measured_pct = 100 * used / (after_wall - before_wall) / cores
    assert abs(measured_pct - cap_pct) <= 0.2 * cap_pct, f"{measured_pct:.1f}% vs cap {cap_pct}%"


def test_the_tokenizer_sample_shrinks_to_fit_beside_what_the_process_holds() -> None:
    cap, held = 500 * MB, 400 * MB
    room = int(gov.SOFT_LIMIT_FRACTION * cap) - held
    assert (
        gov.tokenizer_training_chars(20_000_000, cap, held) == room // gov.TOKENIZER_BYTES_PER_CHAR
    )
    assert gov.tokenizer_training_chars(1_000_000, cap, held) == 1_000_000  # fits: unchanged
    assert gov.tokenizer_training_chars(1_000_000, cap, cap) == 0


def test_a_capped_child_process_is_paused_to_the_cap_and_returns_its_result() -> None:
    ticks: list[float] = []
    start = time.monotonic()
    result = gov.run_duty_cycled(cpu_work.burn_cpu, (1.0,), cap_cores=0.5, on_tick=ticks.append)
    wall = time.monotonic() - start
    assert result == "done"
    assert wall >= 1.0 / 0.5 * 0.9, f"1 CPU-second at half a core took only {wall:.2f} s"
    assert ticks, "progress ticks while the child works"
    with pytest.raises(RuntimeError, match="ValueError: Vocabulary size too high"):
        gov.run_duty_cycled(cpu_work.fail_loudly, (), cap_cores=0.5)


def test_tokenizer_training_under_a_fractional_cap_gives_the_same_tokenizer(tmp_path: Path) -> None:
    from minigpt_cli.datasets.builtin import pretrain_records
    from minigpt_cli.engine.data.tokenizer_training import train_tokenizer

    texts = [r["text"] for r in pretrain_records(300)]
    train_tokenizer(texts, 600, tmp_path / "free", num_threads=1)
    previous = gov.install_throttle(gov.CpuThrottle(0.5))
    try:
        assert gov.fractional_cpu_cap() == 0.5
        train_tokenizer(texts, 600, tmp_path / "capped", num_threads=1)
    finally:
        gov.install_throttle(previous)
    free = (tmp_path / "free" / "tokenizer.model").read_bytes()
    assert (tmp_path / "capped" / "tokenizer.model").read_bytes() == free


def test_the_process_tree_counts_a_new_child_from_its_next_rescan() -> None:
    """The governor reads the tree after every step: the expensive part (listing the children
    from /proc) runs at most once per rescan interval, yet a new child's memory is counted."""
    from minigpt_cli.engine.hardware.monitor import ProcessTree

    now = [0.0]
    tree = ProcessTree(rescan_seconds=1.0, clock=lambda: now[0])
    alone = tree.rss_bytes()
    # The child holds ~200 MB, far above the parent's RSS noise between two readings.
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; b = bytearray(200 * 2**20); time.sleep(60)"],
        stdin=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while psutil.Process(child.pid).memory_info().rss < 150 * 2**20:
            assert time.monotonic() < deadline, "the child never allocated"
            time.sleep(0.05)
        before_rescan = tree.rss_bytes()  # same instant on the tree's clock: the old list
        now[0] += 1.0
        after_rescan = tree.rss_bytes()
    finally:
        child.kill()
        child.wait()
    assert before_rescan < alone + 100 * 2**20
    assert after_rescan > alone + 150 * 2**20
    now[0] += 1.0
    assert tree.rss_bytes() < alone + 100 * 2**20  # a child that ended is dropped


_PAGE_FAULTS_OF_A_STEP_PATTERN = """
import ctypes, resource, sys, torch
from minigpt_cli.engine.resources import governor as gov
if sys.argv[1] == "keep":
    assert gov.keep_freed_pages()
else:  # glibc's static default, 128 KiB (its dynamic one moves with the heap's layout)
    assert ctypes.CDLL("libc.so.6").mallopt(gov._M_MMAP_THRESHOLD, 128 * 1024)
def step():  # a step's pattern: large tensors allocated, touched, all freed at its end
    held = [torch.ones(2 * 2**20) for _ in range(8)]
    del held
step(); step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_freed_pages_are_kept_for_the_next_step_not_faulted_in_again() -> None:
    """`keep_freed_pages` (every verb's `apply_resources`): with glibc's threshold, freed blocks
    are unmapped at each step's end and the next step page-faults them all in again. (glibc's
    dynamic threshold sometimes keeps them, depending on the heap's layout: 2,048 to 32,737
    faults in five runs of this pattern; the baseline here is its static 128 KiB.)"""
    if not gov.keep_freed_pages():
        pytest.skip("not glibc: no mallopt")
    faults = {}
    for mode in ("default", "keep"):
        command = [sys.executable, "-c", _PAGE_FAULTS_OF_A_STEP_PATTERN, mode]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        faults[mode] = int(output.split()[-1])
    # Ten steps touch 163,840 pages of 4 KiB; kept, they fault in once (2,048 or none measured).
    assert faults["keep"] * 10 < faults["default"], faults
