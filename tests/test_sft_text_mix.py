"""SFT's text mix (`[sft] text_mix`): plain pretraining text in every step, at its share and
weight, from the chain's own training text and never from what evaluation holds out, resumed
exactly; a chain whose text is gone trains without it and says why."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from minigpt_cli.config.loader import read_run_config
from minigpt_cli.datasets import BUILTIN_DATA_SEED
from minigpt_cli.datasets.builtin import pretrain_records
from minigpt_cli.engine.data.shards import TokenShards
from minigpt_cli.engine.data.stage_records import document_split
from minigpt_cli.engine.data.tokenizer import Tokenizer
from minigpt_cli.engine.evaluate.data import builtin_heldout_documents
from minigpt_cli.engine.model.loss import IGNORE_INDEX
from minigpt_cli.engine.stages import sft
from minigpt_cli.engine.stages.pretrain import _encode_texts, training_split
from minigpt_cli.engine.training.text_mix import chain_text
from minigpt_cli.errors import UserError
from tests.conftest import FINETUNE_SETS, TINY_SETS, run_cli, set_args
from tests.test_sft import synthetic

FP32 = ["--precision", "fp32", "--device", "cpu"]


def mixed_stage(
    examples: list, share: float, *, stream: int = 2_000, weight: float = 0.5, base: int = 1000
) -> sft.SftStage:
    # Text ids from `base` up, so a text row is told from an example's (ids below 100).
    text = sft.TextMix(
        train=sft.TokenRange(np.arange(base, base + stream, dtype=np.int32)),
        share=share,
        chunk=16,
        weight=weight,
    )
    return sft.SftStage(
        examples, examples[:4], seq_len=64, seed=3, pad_id=0, group_size=4,
        eval_sequences=4, text=text,
    )  # fmt: skip


def test_every_micro_batch_holds_its_share_of_text_at_its_weight() -> None:
    examples = synthetic([16] * 40)  # as long as a window
    stage = mixed_stage(examples, 0.25)
    for _ in range(30):
        batch = stage.next_batch(8)
        assert batch["input_ids"].shape[0] == 6 and batch["text_ids"].shape == (2, 16)
        # A text row is 17 consecutive stream ids: inputs, and the same shifted by one.
        assert torch.equal(batch["text_targets"][:, :-1], batch["text_ids"][:, 1:])
        assert int(batch["text_ids"][0, 0] - 1000) % 16 == 0  # a window boundary
        answers = int((batch["targets"] != IGNORE_INDEX).sum())
        assert stage.count_tokens(batch) == answers + 32
        assert stage.loss_normaliser(batch) == answers + 0.5 * 32
    # A share that does not divide the micro-batch is exact over the run, to within one.
    stage = mixed_stage(examples, 0.3)
    counts = [stage.next_batch(4).get("text_ids", torch.zeros(0, 16)).shape[0] for _ in range(50)]
    assert sum(counts) == 60 and set(counts) <= {1, 2}
    # Text windows are the stream's windows, each once per pass before any repeats.
    stage = mixed_stage(examples, 0.5, stream=16 * 10 + 1)
    batches = [stage.next_batch(4) for _ in range(5)]
    starts = [int(b["text_ids"][r, 0]) for b in batches for r in range(2)]
    assert sorted(starts) == [1000 + 16 * i for i in range(10)]
    # Off: no text key, and the stage is exactly the one without a mix.
    assert mixed_stage(examples, 0.25).group_size == 3  # a micro-batch of 4 less its window
    plain = mixed_stage(examples, 0.0).next_batch(8)
    assert "text_ids" not in plain and plain["input_ids"].shape[0] == 8


def test_text_windows_take_the_width_of_shorter_examples() -> None:
    # Examples of 10 tokens: the share's 2 windows of 16 tokens become 4 windows of 10 (the
    # first 10 tokens of 4 windows), so no example is padded to a window's length and the step
    # holds at least the text tokens it would have held.
    stage = mixed_stage(synthetic([10] * 40), 0.25)
    for _ in range(10):
        batch = stage.next_batch(8)
        assert batch["input_ids"].shape == (6, 10) and batch["text_ids"].shape == (4, 10)
        assert torch.equal(batch["text_targets"][:, :-1], batch["text_ids"][:, 1:])
        assert all(int(start - 1000) % 16 == 0 for start in batch["text_ids"][:, 0])
        answers = int((batch["targets"] != IGNORE_INDEX).sum())
        assert stage.count_tokens(batch) == answers + 40
        assert stage.loss_normaliser(batch) == answers + 0.5 * 40


@pytest.mark.parametrize("length", [10, 24])  # examples shorter, then longer than a window
def test_the_loss_weighs_text_tokens_as_configured(tiny_pretrain_run: Path, length: int) -> None:
    from minigpt_cli.engine.runs.load import load_run

    model = load_run(tiny_pretrain_run).model
    stage = mixed_stage(synthetic([length] * 40), 0.25, weight=0.5, stream=400, base=100)
    batch = stage.next_batch(8)
    # One forward for examples and windows (padded to one length) ...
    loss, metrics = stage.loss(model, batch)
    loss.backward()
    merged = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    # ... is the two forwards, each at its own length.
    _, answers = model(batch["input_ids"], targets=batch["targets"], reduction="sum")
    _, text = model(batch["text_ids"], targets=batch["text_targets"], reduction="sum")
    (answers + 0.5 * text).backward()
    torch.testing.assert_close(loss, answers + 0.5 * text)
    assert metrics["text_loss"] == pytest.approx(float(text.detach()) / (40 if length < 16 else 32))
    for got, want in zip(merged, [p.grad for p in model.parameters()], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_resuming_replays_the_same_examples_and_text() -> None:
    examples = synthetic(list(range(3, 40)) * 2)
    stage = mixed_stage(examples, 0.25, stream=16 * 12 + 1)
    for _ in range(17):  # past an epoch of the examples and of the text windows
        stage.next_batch(4)
    state = json.loads(json.dumps(stage.data_state()))
    assert state["text"]["epoch"] >= 1
    expected = [stage.next_batch(4) for _ in range(12)]
    fresh = mixed_stage(examples, 0.25, stream=16 * 12 + 1)
    fresh.load_data_state(state)
    for a, b in zip(expected, [fresh.next_batch(4) for _ in range(12)], strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert fresh.data_state() == stage.data_state()
    # Another share or another text is refused, not silently reordered.
    with pytest.raises(UserError, match="text mix changed"):
        mixed_stage(examples, 0.5, stream=16 * 12 + 1).load_data_state(state)
    with pytest.raises(UserError, match="text mix changed"):
        mixed_stage(examples, 0.25, stream=16 * 30 + 1).load_data_state(state)


def test_document_split_leaves_the_straddling_document_out() -> None:
    # Ids laid end to end with an end-of-text each: [0,4) [4,8) [8,12) [12,16); split at 11.
    assert document_split([3, 3, 3, 3], 0.3) == ([0, 1], [3])
    assert document_split([3, 3, 3, 3], 0.25) == ([0, 1, 2], [3])


def test_no_held_out_document_is_ever_rehearsed(tiny_pretrain_run: Path, tmp_path: Path) -> None:
    tokenizer = Tokenizer.load(tiny_pretrain_run)
    config = read_run_config(tiny_pretrain_run)
    # Pretraining's own stream of the built-in corpus, and where it split off validation.
    texts = [r["text"] for r in pretrain_records(config.data.builtin_size, BUILTIN_DATA_SEED)]
    stream = _encode_texts(tokenizer, texts)
    split = training_split(config, len(stream))
    chain = chain_text(tiny_pretrain_run, tokenizer, 64, cache_dir=tmp_path)
    assert chain.train is not None
    rehearsed = chain.train[0 : len(chain.train)]
    # The rehearsed text is a prefix of what pretraining trained on, ending before its split...
    assert len(rehearsed) <= split
    assert np.array_equal(rehearsed, stream[: len(rehearsed)])
    # ...and every document `minigpt eval` scores starts at or after the split.
    held_out, _ = builtin_heldout_documents(tiny_pretrain_run)
    assert held_out
    starts, offset = {}, 0
    for text, ids in zip(texts, tokenizer.encode_batch(texts), strict=True):
        starts.setdefault(text, offset)
        offset += len(ids) + 1
    assert min(starts[text] for text in held_out) >= split > len(rehearsed) - 1
    # What SFT's `text_bpb` scores is held-out text too: its windows are eval's documents.
    first = held_out[0]
    assert chain.held_out and any(
        window[0][1:] == tokenizer.encode(first)[: len(window[0]) - 1] for window in chain.held_out
    )


def test_a_resumed_mixing_run_is_bitwise_identical(tiny_sft_run: Path, tmp_path: Path) -> None:
    # The shared fixture mixes text (the tiny preset's text_mix); it keeps steps 20 and 30.
    state = json.loads((tiny_sft_run / "trainer_state.json").read_text())
    assert state["step"] == 30 and state["data_state"]["text"]["sequences"] == 30 * 8
    died = tmp_path / "died"
    shutil.copytree(tiny_sft_run, died)
    for name in ("model.safetensors", "optimizer.safetensors", "trainer_state.json"):
        (died / name).unlink()
    shutil.rmtree(died / "checkpoints" / "step-00000030")
    result = run_cli("sft", "--out", died, "--resume")
    assert result.returncode == 0, result.stdout + result.stderr
    first = load_file(str(tiny_sft_run / "model.safetensors"))
    second = load_file(str(died / "model.safetensors"))
    assert all(first[name].equal(second[name]) for name in first)
    straight = [json.loads(line) for line in (tiny_sft_run / "metrics.jsonl").open()]
    resumed = [json.loads(line) for line in (died / "metrics.jsonl").open()]
    pick = ("loss", "text_loss", "text_bpb")
    assert [[r.get(k) for k in pick] for r in straight if r["kind"] in ("train", "eval")] == [
        [r.get(k) for k in pick] for r in resumed if r["kind"] in ("train", "eval")
    ]
    assert any("text_bpb" in r for r in resumed)


@pytest.fixture(scope="module")
def data_pretrain_run(tiny_pretrain_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run pretrained on a --data file (the built-in tokenizer reused: no training)."""
    base = tmp_path_factory.mktemp("data-pretrain")
    text = base / "corpus.txt"
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "red", "sea"]
    rng = np.random.default_rng(0)
    text.write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(600)) + "\n")
    result = run_cli(
        "pretrain", "--data", text, "--tokenizer", tiny_pretrain_run, "--out", base / "run",
        "--max-steps", "2", *FP32, *set_args(TINY_SETS),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return base / "run"


def sft_of(parent: Path, out: Path) -> str:
    result = run_cli(
        "sft", "--from", parent, "--out", out, "--max-steps", "2", *FP32, *set_args(FINETUNE_SETS)
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_a_chain_pretrained_on_data_rehearses_its_own_text(
    data_pretrain_run: Path, tmp_path: Path
) -> None:
    tokenizer = Tokenizer.load(data_pretrain_run)
    chain = chain_text(data_pretrain_run, tokenizer, 64, cache_dir=tmp_path)
    shards = TokenShards(data_pretrain_run / "shards" / "train")
    split = training_split(read_run_config(data_pretrain_run), len(shards))
    assert chain.train is not None and len(chain.train) == split
    assert np.array_equal(chain.train[0:split], shards[0:split])
    assert chain.held_out  # windows of the tail pretraining validated on
    out = sft_of(data_pretrain_run, tmp_path / "sft")
    note = next(line for line in out.splitlines() if "text mix" in line)
    assert note.startswith("sft: text mix: ") and f"windows of {data_pretrain_run}'s" in note
    rows = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").open()]
    assert all("text_loss" in r for r in rows if r["kind"] == "train")
    assert any("text_bpb" in r for r in rows if r["kind"] == "eval")


def test_a_chain_whose_text_is_gone_trains_without_it_and_says_why(
    data_pretrain_run: Path, tmp_path: Path
) -> None:
    gone = tmp_path / "pretrain"
    shutil.copytree(data_pretrain_run, gone)
    shutil.rmtree(gone / "shards")  # and the recorded corpus.txt is another folder's
    state = json.loads((gone / "trainer_state.json").read_text())
    state["sources"]["data"] = [str(tmp_path / "deleted.txt")]
    (gone / "trainer_state.json").write_text(json.dumps(state))
    out = sft_of(gone, tmp_path / "sft")
    notes = [line for line in out.splitlines() if "text mix" in line]
    assert len(notes) == 1 and "text mix off:" in notes[0] and "--text FILE" in notes[0]
    assert "deleted.txt" in notes[0]
    saved = json.loads((tmp_path / "sft" / "trainer_state.json").read_text())
    assert saved["finished"] and "text" not in saved["data_state"]
