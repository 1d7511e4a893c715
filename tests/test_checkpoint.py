"""Checkpoint files: atomic, consistent on resume, never unpickled, one writer per run."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minigpt_cli.engine.core.io import atomic_write_text
from minigpt_cli.engine.runs import checkpoint as ckpt
from minigpt_cli.engine.runs.files import (
    LOCK_FILE,
    METRICS_FILE,
    MODEL_FILE,
    STATE_FILE,
    canonical_safetensors,
    load_tensors,
    read_metadata,
    save_tensors,
)
from minigpt_cli.errors import UserError


def _files(step: int) -> dict:
    weights = {"w": torch.full((3, 2), float(step))}
    return {MODEL_FILE: (weights, {"format": "minigpt"})}


def test_save_publishes_snapshot_and_prunes(tmp_path: Path) -> None:
    for step in (10, 20, 30):
        ckpt.save_checkpoint(tmp_path, step, _files(step), {"tokens": step}, keep_last=2)
    names = [p.name for p in ckpt.snapshots(tmp_path)]
    assert names == ["step-00000020", "step-00000030"]
    assert ckpt.read_state(tmp_path)["step"] == 30
    assert float(load_tensors(tmp_path / MODEL_FILE)["w"][0, 0]) == 30.0
    assert read_metadata(tmp_path / MODEL_FILE)["step"] == "30"
    assert ckpt.find_resume_point(tmp_path) == tmp_path


def test_torn_publish_falls_back_to_newest_complete_snapshot(tmp_path: Path) -> None:
    ckpt.save_checkpoint(tmp_path, 10, _files(10), {}, keep_last=3)
    ckpt.save_checkpoint(tmp_path, 20, _files(20), {}, keep_last=3)
    # A crash after the new weights were swapped in but before the state file was: they disagree.
    state = json.loads((tmp_path / STATE_FILE).read_text())
    os.unlink(tmp_path / STATE_FILE)
    state["step"] = 10
    atomic_write_text(tmp_path / STATE_FILE, json.dumps(state))
    assert ckpt.find_resume_point(tmp_path) == tmp_path / "checkpoints" / "step-00000020"


def test_truncated_safetensors_is_a_clean_error(tmp_path: Path) -> None:
    ckpt.save_checkpoint(tmp_path, 1, _files(1), {}, keep_last=1)
    data = (tmp_path / MODEL_FILE).read_bytes()
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(data[: len(data) - 5])
    with pytest.raises(UserError, match="truncated"):
        load_tensors(broken)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"abc")
    with pytest.raises(UserError, match="not a safetensors file"):
        load_tensors(tiny)


class _Payload:
    """Unpickling this creates a file: proof that a loader executed pickle code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (Path(self.marker),))


def test_pickle_checkpoint_is_refused_and_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    planted = tmp_path / "model.safetensors"
    planted.write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(UserError, match="never unpickles"):
        load_tensors(planted)
    torch.save({"w": torch.zeros(2)}, tmp_path / "zip.safetensors")
    with pytest.raises(UserError, match="pickle/zip"):
        load_tensors(tmp_path / "zip.safetensors")
    assert not marker.exists()


def test_run_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; "
            "from minigpt_cli.engine.runs.checkpoint import RunLock; "
            "lock = RunLock(Path(sys.argv[1])); lock.acquire(); print('held', flush=True); "
            "time.sleep(60)",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"in use by process {holder.pid}"):
            ckpt.RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing: its lock is stale and is taken over.
    lock = ckpt.RunLock(tmp_path)
    lock.acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_metrics_log_drops_lines_after_the_restored_step(tmp_path: Path) -> None:
    path = tmp_path / METRICS_FILE
    log = ckpt.MetricsLog(path)
    for step in range(1, 6):
        log.write({"stage": "pretrain", "kind": "train", "step": step})
    log.close()
    with path.open("a") as handle:
        handle.write('{"stage": "pretrain", "kind": "tr')  # a line cut by a kill
    log = ckpt.MetricsLog(path, keep_through_step=3)
    log.write({"stage": "pretrain", "kind": "event", "step": 3, "event": "resume"})
    log.close()
    steps = [r["step"] for r in ckpt.read_metrics(tmp_path)]
    assert steps == [1, 2, 3, 3]


def test_optimizer_state_round_trips_by_parameter_name(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    names = {i: n for i, (n, _) in enumerate(model.named_parameters())}
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    tensors, meta = ckpt.optimizer_tensors(optimizer, names)
    fresh = torch.optim.AdamW(model.parameters(), lr=0.5)
    ckpt.restore_optimizer(fresh, tensors, meta, names)
    for before, after in zip(optimizer.state.values(), fresh.state.values(), strict=True):
        assert torch.equal(before["exp_avg_sq"], after["exp_avg_sq"])
    assert fresh.param_groups[0]["lr"] == 0.1


def test_a_header_whose_length_starts_with_the_pickle_byte_still_loads(tmp_path: Path) -> None:
    """A safetensors header of 128 + 256k bytes begins with 0x80, pickle's first byte."""
    import struct

    for pad in range(0, 300):
        path = tmp_path / "t.safetensors"
        save_tensors(path, {"w": torch.zeros(2)}, {"note": "x" * pad})
        if path.read_bytes()[:1] == b"\x80":
            break
    else:
        raise AssertionError("no metadata length gave a header starting with 0x80")
    assert struct.unpack("<Q", path.read_bytes()[:8])[0] % 256 == 0x80
    assert load_tensors(path)["w"].equal(torch.zeros(2))


def test_tensor_files_are_the_same_bytes_whatever_order_their_metadata_came_in(
    tmp_path: Path,
) -> None:
    # The safetensors writer keeps metadata in a hash map whose order changes between processes
    # (and between maps): the same weights must still be the same file, byte for byte.
    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(5, dtype=torch.bfloat16)}
    metadata = {"format": "minigpt", "step": "7", "param_groups": "[]", "lora_r": "8"}
    written = []
    for index in range(8):
        order = list(metadata.items())[index % 4 :] + list(metadata.items())[: index % 4]
        path = tmp_path / f"{index}.safetensors"
        save_tensors(path, tensors, dict(order))
        written.append(path.read_bytes())
    assert len(set(written)) == 1
    header_len = int.from_bytes(written[0][:8], "little")
    header = json.loads(written[0][8 : 8 + header_len])
    assert list(header["__metadata__"]) == sorted(metadata)
    assert read_metadata(tmp_path / "0.safetensors") == metadata
    loaded = load_tensors(tmp_path / "0.safetensors")
    assert all(loaded[name].equal(tensors[name]) for name in tensors)
    # Written with the mode open() gives (the umask's), not a temporary file's private 0o600.
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "0.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_writing_a_tensor_file_holds_at_most_two_copies_of_it(tmp_path: Path) -> None:
    # safetensors serialises into one buffer beside its per-tensor bytes (two copies); making the
    # header canonical by slicing and concatenating that buffer held two more at once, which made
    # a `small` run's snapshot save peak 215-410 MB above its memory estimate.
    import tracemalloc

    tensors = {"big": torch.randn(1024, 1024), "small": torch.ones(3)}  # 4 MiB of fp32
    path = tmp_path / "w.safetensors"
    tracemalloc.start()
    try:
        save_tensors(path, tensors, {"step": "1"})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    size = path.stat().st_size
    assert size > 4 * 2**20
    assert peak < 2.5 * size, (peak, size)
    assert canonical_safetensors(path.read_bytes()) == path.read_bytes()
    assert load_tensors(path)["big"].equal(tensors["big"])


def test_a_crash_cut_publication_is_finished_before_resuming(tmp_path: Path) -> None:
    ckpt.save_checkpoint(tmp_path, 1, _files(1), {"elapsed": 0.0}, keep_last=3)
    ckpt.save_checkpoint(tmp_path, 2, _files(2), {"elapsed": 0.0}, keep_last=3)
    # A kill after the step-3 snapshot was renamed into place but before any top-level swap.
    snapshot = ckpt.save_checkpoint(tmp_path, 3, _files(3), {"elapsed": 0.0}, keep_last=3)
    for name in (MODEL_FILE, STATE_FILE):
        (tmp_path / name).unlink()
        os.link(tmp_path / "checkpoints" / "step-00000002" / name, tmp_path / name)
    (tmp_path / "checkpoints" / ".model.safetensors.123.link").write_text("half made")
    assert ckpt.find_resume_point(tmp_path) == tmp_path  # the top level agrees with itself...
    os.unlink(tmp_path / STATE_FILE)
    os.link(snapshot / STATE_FILE, tmp_path / STATE_FILE)  # ...until the state says step 3
    assert ckpt.find_resume_point(tmp_path) == snapshot
    assert ckpt.republish(tmp_path) == snapshot
    assert ckpt.find_resume_point(tmp_path) == tmp_path
    assert load_tensors(tmp_path / MODEL_FILE)["w"].eq(3.0).all()
    removed = ckpt.remove_temporaries(tmp_path)
    assert [p.name for p in removed] == [".model.safetensors.123.link"]
    assert not list(tmp_path.rglob(".*.link"))
