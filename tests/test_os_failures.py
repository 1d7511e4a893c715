"""When the machine says no: every operating-system failure is one line, a distinct exit status,
and nothing is lost.

Failures are made for real where the machine allows (a path under a file, a removed run folder, a
small or read-only filesystem in a private mount namespace) and otherwise through the one write seam
(`core/io.py`, MINIGPT_FAULT=ERRNO@N fails the Nth write and every later one, as a full disk stays
full). The sweep fails a short pretraining run at each of its writes in turn, in this process (a
run costs under a second once torch is imported).
"""

from __future__ import annotations

import contextlib
import errno
import filecmp
import io as text_io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minigpt_cli.cli.app import main
from minigpt_cli.engine.core import io
from minigpt_cli.engine.runs.checkpoint import find_resume_point, read_state
from minigpt_cli.errors import RunFailed
from tests.conftest import FINETUNE_SETS, TINY_SETS, run_cli, set_args

# Checkpoints every 2 steps, all kept: each step's snapshot can be compared with the reference.
SWEEP_SETS = [
    *TINY_SETS,
    "train.eval_every=2",
    "train.save_every=2",
    "train.log_every=2",
    "train.keep_last=3",
    "train.eval_batches=1",
    "log.plot=true",
    "log.progress=none",
    # Fixed, not chosen from the machine's load: every run must make the same float reductions.
    "resources.threads=1",
]
SWEEP_STEPS = 4
FP32 = ["--precision", "fp32", "--device", "cpu"]


def minigpt(
    *args: str | Path, fault: str | None = None, monkeypatch: pytest.MonkeyPatch
) -> tuple[int, str]:
    """Run the CLI's entry point in this process, as the console script does: (exit status,
    stderr). `fault` is a MINIGPT_FAULT value, counted from this run's first write."""
    io._FaultCounter.spec = None  # count this run's writes from 1, even for a repeated value
    if fault is None:
        monkeypatch.delenv(io.FAULT_ENV, raising=False)
    else:
        monkeypatch.setenv(io.FAULT_ENV, fault)
    monkeypatch.setattr(sys, "argv", ["minigpt", *map(str, args)])
    errors = text_io.StringIO()
    code: int | str | None = 0
    with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(text_io.StringIO()):
        try:
            main()
        except SystemExit as stop:
            code = stop.code
    monkeypatch.delenv(io.FAULT_ENV, raising=False)
    return int(code or 0), errors.getvalue()


def temporaries(run_dir: Path) -> list[Path]:
    """What a writer leaves half-made: hidden .tmp/.link files or folders, partial shards."""
    return [
        path
        for path in run_dir.rglob("*")
        if (path.name.startswith(".") and path.name.endswith((".tmp", ".link")))
        or path.name.endswith(".partial")
    ]


def same_bytes(first: Path, second: Path) -> bool:
    return filecmp.cmp(first, second, shallow=False)


def without_wall_clock(path: Path) -> dict:
    state = json.loads(path.read_text())
    state.pop("elapsed", None)
    return state


@pytest.fixture(scope="module")
def sweep_reference(
    tiny_pretrain_run: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[str]]:
    """An uninterrupted 4-step run (snapshots at 2 and 4 kept) and the command that makes it."""
    run_dir = tmp_path_factory.mktemp("sweep") / "reference"
    command = [
        "pretrain",
        "--out",
        str(run_dir),
        "--max-steps",
        str(SWEEP_STEPS),
        "--tokenizer",
        str(tiny_pretrain_run),
        *FP32,
        *set_args(SWEEP_SETS),
    ]
    monkeypatch = pytest.MonkeyPatch()
    try:
        code, errors = minigpt(*command, monkeypatch=monkeypatch)
    finally:
        monkeypatch.undo()
    assert code == 0, errors
    return run_dir, command


def test_a_full_disk_at_every_write_keeps_the_newest_snapshot_and_resumes_bitwise(
    sweep_reference: tuple[Path, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference, command = sweep_reference
    failures: dict[int, str] = {}
    resumed_from: set[int | None] = set()
    write = 0
    while True:
        write += 1
        run_dir = tmp_path / f"full-at-{write}"
        args = [run_dir if arg == str(reference) else arg for arg in command]
        code, errors = minigpt(*args, fault=f"ENOSPC@{write}", monkeypatch=monkeypatch)
        if code == 0:
            break  # past the last write the run makes, or the failing write was the plot
        lines = errors.strip().splitlines()
        failures[write] = lines[-1]
        if write == 1:  # the check before any work: refused, nothing started
            assert code == 2 and "cannot write the output" in errors, errors
            assert not run_dir.exists()
            continue
        assert code == 3, (write, errors)
        assert len(lines) == 1 and "no space left on the device" in lines[0], (write, errors)
        assert "Traceback" not in errors
        assert temporaries(run_dir) == [], write
        point = find_resume_point(run_dir)
        kept = read_state(point)["step"] if point is not None else None
        if kept is None:
            assert "nothing was kept" in lines[0] and "--overwrite" in lines[0], lines[0]
        else:
            # What resume starts from is the newest complete snapshot: the same bytes as the
            # uninterrupted run's snapshot of that step.
            assert f"kept the checkpoint at step {kept}" in lines[0], lines[0]
            assert f"minigpt pretrain --out {run_dir} --resume" in lines[0]
            snapshot = reference / "checkpoints" / f"step-{kept:08d}"
            for name in ("model.safetensors", "optimizer.safetensors"):
                assert same_bytes(point / name, snapshot / name), (write, name)
        if kept in resumed_from:
            continue  # this kept state was already resumed: the outcome is the same
        resumed_from.add(kept)
        again = ["--resume"] if kept is not None else ["--overwrite"]
        code, errors = minigpt(*args, *again, monkeypatch=monkeypatch)
        assert code == 0, (write, errors)
        for name in ("model.safetensors", "optimizer.safetensors"):
            assert same_bytes(run_dir / name, reference / name), (write, name)
        assert without_wall_clock(run_dir / "trainer_state.json") == without_wall_clock(
            reference / "trainer_state.json"
        )
        assert temporaries(run_dir) == []
    # Past the last failure the run ended well: the failing write was the plot (the run's last
    # write), whose failure costs only the picture.
    assert not (run_dir / "loss.png").exists() and (reference / "loss.png").exists()
    assert same_bytes(run_dir / "model.safetensors", reference / "model.safetensors")
    # The sweep reached every kind of write: the tokenizer, the config, metrics, each file of a
    # snapshot and publishing it.
    assert write > 25
    sites = " ".join(failures.values())
    for site in ("tokenizer.model", "config.toml", "metrics.jsonl", ".step-00000002.tmp"):
        assert site in sites, site
    assert resumed_from == {None, 2, 4}


@pytest.mark.parametrize(
    ("name", "cause"),
    [
        ("EACCES", "permission denied"),
        ("EROFS", "read-only filesystem"),
        ("EMFILE", "too many open files"),
        ("ENOENT", "no such file or folder"),
    ],
)
def test_other_failures_during_a_run_say_what_was_kept(
    sweep_reference: tuple[Path, list[str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    cause: str,
) -> None:
    reference, command = sweep_reference
    run_dir = tmp_path / "run"
    args = [run_dir if arg == str(reference) else arg for arg in command]
    # Write 20 falls after the first snapshot (step 2) is published.
    code, errors = minigpt(*args, fault=f"{name}@20", monkeypatch=monkeypatch)
    assert code == 3, errors  # during a run every failure is the machine's: exit 3
    line = errors.strip()
    assert "\n" not in line and cause in line and "kept the checkpoint at step 2" in line, line
    assert temporaries(run_dir) == []


def test_a_path_under_a_file_is_refused_before_any_work(
    tiny_pretrain_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    cases = [
        ("pretrain", "--out", notes / "run"),
        ("sft", "--from", tiny_pretrain_run, "--out", notes / "sft"),
        ("tokenize", "train", "--input", notes, "--out", notes / "tok"),
        ("tokenize", "encode", "-i", notes, "--tokenizer", tiny_pretrain_run, "-o", notes / "s"),
        ("data", "export", "--kind", "sft", "--out", notes / "sft.jsonl"),
        ("eval", tiny_pretrain_run, "--output", notes / "report.json"),
    ]
    for args in cases:
        code, errors = minigpt(*args, monkeypatch=monkeypatch)
        assert code == 2, (args, errors)
        assert errors.count("\n") == 1 and "Traceback" not in errors, (args, errors)
        assert f"{notes} is a file, not a folder" in errors, (args, errors)
    assert notes.read_text() == "my notes\n"


@pytest.mark.parametrize(
    "args",
    [
        ("data", "export", "--kind", "sft", "--out", "{out}/sft.jsonl"),
        ("tokenize", "train", "-i", "{corpus}", "--out", "{out}/tok", "--vocab-size", "320"),
    ],
)
def test_a_full_disk_outside_a_run_is_one_line_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: tuple[str, ...]
) -> None:
    corpus = tmp_path / "corpus.txt"
    lines = (
        f"line {i}: the {i % 7} cats sat on {i % 13} mats. 第{i}只猫坐在垫子上。\n"
        for i in range(900)
    )
    corpus.write_text("".join(lines))
    out = tmp_path / "out"
    out.mkdir()
    filled = [arg.format(out=out, corpus=corpus) for arg in args]
    # Write 1 is the check before any work (exit 2: nothing started); later ones fail the work
    # (exit 3). Each leaves nothing behind.
    write = 0
    while True:
        write += 1
        code, errors = minigpt(*filled, fault=f"ENOSPC@{write}", monkeypatch=monkeypatch)
        if code == 0:
            break
        assert code == (2 if write == 1 else 3), (write, errors)
        last = errors.strip().splitlines()[-1]  # after any progress lines
        assert last.startswith("error: ") and "no space left on the device" in last, errors
        assert "Traceback" not in errors
        leftovers = [p for p in out.rglob("*") if p.is_file()]
        assert leftovers == [], leftovers
    assert write >= 3  # the check and at least one write of the work itself failed


def test_encoding_shards_onto_a_full_disk_leaves_no_partial_shards(
    tiny_pretrain_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = tmp_path / "corpus.txt"
    text.write_text("the cat sat on the mat.\n" * 4000)
    out = tmp_path / "shards"
    args = ["tokenize", "encode", "-i", text, "--tokenizer", tiny_pretrain_run, "--out", out]
    write = 1  # the check before any work
    while True:
        write += 1  # the folder, opening the shard, writing it, naming it, its meta.json
        code, errors = minigpt(*args, fault=f"ENOSPC@{write}", monkeypatch=monkeypatch)
        if code == 0:
            break
        assert code == 3 and "no space left" in errors.strip().splitlines()[-1], errors
        assert not out.is_dir() or list(out.iterdir()) == [], list(out.iterdir())
    assert write >= 6
    assert json.loads((out / "meta.json").read_text())["total_tokens"] > 0


def test_nothing_to_resume_says_how_to_start_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "run").mkdir()
    code, errors = minigpt(
        "pretrain", "--out", tmp_path / "run", "--resume", monkeypatch=monkeypatch
    )
    assert code == 2
    assert "nothing to resume" in errors and "--overwrite" in errors


def test_debug_shows_the_traceback_of_an_os_failure(
    sweep_reference: tuple[Path, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference, command = sweep_reference
    args = [tmp_path / "run" if arg == str(reference) else arg for arg in command]
    monkeypatch.setenv("MINIGPT_DEBUG", "0")  # --debug sets it to 1: restored after the test
    monkeypatch.setattr(sys, "argv", ["minigpt", "--debug", *map(str, args)])
    monkeypatch.setenv(io.FAULT_ENV, "ENOSPC@20")
    io._FaultCounter.spec = None
    with pytest.raises(RunFailed) as raised:
        main()
    assert isinstance(raised.value.__cause__, OSError)
    assert raised.value.__cause__.errno == errno.ENOSPC


# --------------------------------------------------------------------- real failures, no seam


def _popen(*args: str | Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "minigpt_cli", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _wait_for(path: Path, process: subprocess.Popen[str], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.01)


def test_a_run_folder_removed_under_a_running_job_stops_it_in_one_line(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    process = _popen("pretrain", "--out", run_dir, "--max-steps", 5000, *FP32, *set_args(TINY_SETS))
    try:
        _wait_for(run_dir / "checkpoints" / "step-00000010", process)
        for _ in range(50):  # the job keeps writing while we remove
            shutil.rmtree(run_dir, ignore_errors=True)
            if not run_dir.exists():
                break
        _, errors = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 3, errors
    line = errors.strip().splitlines()[-1]
    assert "removed" in line or "no such file or folder" in line, line
    assert "Traceback" not in errors
    assert not run_dir.exists() or not (run_dir / "model.safetensors").exists()


def _private_mount_prefix() -> list[str] | None:
    """A command prefix that runs its command in a private mount namespace where it may mount a
    small tmpfs (root: `unshare -m`; others: `unshare -Urm`), or None when this machine refuses."""
    if shutil.which("unshare") is None:
        return None
    prefix = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-Urm"]
    probe = subprocess.run(
        [*prefix, "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt 2>/dev/null || exit 9"],
        capture_output=True,
    )
    return prefix if probe.returncode == 0 else None


def _in_small_filesystem(
    script: str, size: str, tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    prefix = _private_mount_prefix()
    if prefix is None:
        pytest.skip("this machine does not allow a private tmpfs mount (unshare -m / -Urm)")
    disk = tmp_path / "disk"
    disk.mkdir()
    return subprocess.run(
        [*prefix, "sh", "-c", f"mount -t tmpfs -o size={size} tmpfs {disk} && {script}"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "DISK": str(disk), "PY": sys.executable},
    )


def test_a_disk_that_fills_during_a_real_run_keeps_the_snapshot_and_resumes_bitwise(
    tiny_pretrain_run: Path, tmp_path: Path
) -> None:
    # Inside a private 64 MB tmpfs: train, fill the disk once the first snapshot is out, let the
    # run hit the full disk, free the space, resume, and copy the result out for comparison. The
    # job is stopped (SIGSTOP) while the disk fills: a fast machine otherwise wrote the step-20
    # snapshot before `head` had filled the disk, and the run kept step 20 instead of 10.
    args = " ".join(
        f"'{a}'"
        for a in ["--max-steps", "30", *FP32, *set_args(TINY_SETS), "--set", "log.plot=false"]
    )
    script = f"""
cd {Path.cwd()}
"$PY" -m minigpt_cli pretrain --out "$DISK/run" {args} 2> "$DISK/err" &
job=$!
while [ ! -d "$DISK/run/checkpoints/step-00000010" ]; do sleep 0.01; done
kill -STOP $job
head -c 200M /dev/zero > "$DISK/filler" 2>/dev/null
kill -CONT $job
wait $job; echo "status=$?"
cat "$DISK/err" | tail -1
rm "$DISK/filler"
"$PY" -m minigpt_cli pretrain --out "$DISK/run" --resume > /dev/null 2>&1; echo "resumed=$?"
cp "$DISK/run/model.safetensors" "$DISK/run/optimizer.safetensors" {tmp_path}/
ls -a "$DISK/run" "$DISK/run/checkpoints"
"""
    result = _in_small_filesystem(script, "64m", tmp_path)
    out = result.stdout
    assert "status=3" in out, out + result.stderr
    assert "no space left on the device" in out and "kept the checkpoint at step 10" in out, out
    assert "resumed=0" in out, out
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert same_bytes(tmp_path / name, tiny_pretrain_run / name), name
    assert ".tmp" not in out and ".link" not in out, out


def test_a_read_only_filesystem_is_refused_before_any_work(tmp_path: Path) -> None:
    script = (
        'mount -o remount,ro "$DISK" && "$PY" -m minigpt_cli pretrain --out "$DISK/run"; '
        'echo "status=$?"'
    )
    result = _in_small_filesystem(script, "4m", tmp_path)
    assert "status=2" in result.stdout, result.stdout + result.stderr
    line = result.stderr.strip()
    assert "\n" not in line and "read-only filesystem" in line and "Traceback" not in line, line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into folders without write permission")
def test_a_folder_without_write_permission_is_refused_before_any_work(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        result = run_cli("pretrain", "--out", locked / "run")
    finally:
        locked.chmod(0o755)
    assert result.returncode == 2, result.stderr
    assert "permission denied" in result.stderr and result.stderr.count("\n") == 1


def test_a_finetune_run_on_a_full_disk_says_what_was_kept(
    tiny_pretrain_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "sft"
    args = [
        "sft", "--from", tiny_pretrain_run, "--out", run_dir, "--max-steps", "4", *FP32,
        *set_args([*FINETUNE_SETS, "sft.save_every=2", "sft.eval_every=2", "sft.log_every=2"]),
    ]  # fmt: skip
    code, errors = minigpt(*args, fault="ENOSPC@22", monkeypatch=monkeypatch)
    assert code == 3, errors
    line = errors.strip()
    assert "\n" not in line and "during sft" in line, line
    if "kept the checkpoint" in line:
        assert f"minigpt sft --out {run_dir} --resume" in line
        code, errors = minigpt("sft", "--out", run_dir, "--resume", monkeypatch=monkeypatch)
        assert code == 0, errors
    assert temporaries(run_dir) == []
