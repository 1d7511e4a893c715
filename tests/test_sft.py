"""SFT: its examples (`data.examples`), masked loss, length-grouped exact-resume batches, exact
match (`metrics.exact_match`), and `minigpt data inspect`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minigpt_cli.config.loader import load_config
from minigpt_cli.config.schema import ModelConfig
from minigpt_cli.datasets.builtin import TASK_FAMILIES
from minigpt_cli.engine.data import chat_template
from minigpt_cli.engine.data.examples import (
    SftExample,
    build_examples,
    load_sft_records,
    pad_batch,
    render_example,
)
from minigpt_cli.engine.data.stage_records import builtin_records
from minigpt_cli.engine.data.tokenizer import Tokenizer
from minigpt_cli.engine.inference import greedy
from minigpt_cli.engine.metrics import exact_match
from minigpt_cli.engine.model.gpt import GPT
from minigpt_cli.engine.model.loss import IGNORE_INDEX
from minigpt_cli.engine.stages import sft
from minigpt_cli.errors import UserError
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def tok(tiny_pretrain_run: Path) -> Tokenizer:
    return Tokenizer.load(tiny_pretrain_run)


def qa(question: str, answer: str, task: str | None = None) -> dict:
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages, "task": task}


def synthetic(lengths: list[int]) -> list[SftExample]:
    """Examples of the given input lengths; example i's tokens all equal i (to identify it)."""
    out = []
    for index, length in enumerate(lengths):
        ids = np.full(length, index, dtype=np.int64)
        targets = ids.copy()
        targets[: length // 2] = IGNORE_INDEX
        out.append(SftExample(ids, targets, None, int((targets != IGNORE_INDEX).sum())))
    return out


def stage_of(examples: list[SftExample], group_size: int = 8, seed: int = 3) -> sft.SftStage:
    return sft.SftStage(
        examples,
        examples[:4],
        seq_len=64,
        seed=seed,
        pad_id=0,
        group_size=group_size,
        eval_sequences=4,
    )


# ------------------------------------------------------------------------------------ examples


def test_examples_mask_targets_and_count_truncation(tok: Tokenizer) -> None:
    records = [qa("What is 3 + 4?", "7", "addition"), qa("word " * 80, "answer")]
    examples, stats = build_examples(records, tok, max_len=64, train_on_prompt=False)
    ids, mask = chat_template.render(records[0]["messages"], tok)
    first = examples[0]
    assert first.input_ids.tolist() == ids[:-1]
    expected = [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:], strict=True)]
    assert first.targets.tolist() == expected
    assert first.loss_tokens == len(tok.encode("7")) + 1 and first.task == "addition"
    # The long prompt leaves no room for the answer: truncated, then dropped, both counted.
    assert (stats.records, stats.examples, stats.truncated, stats.dropped) == (2, 1, 1, 1)
    assert stats.loss_tokens == first.loss_tokens and stats.tokens == len(ids) - 1
    assert "1 truncated to 64 tokens" in stats.describe()
    assert "1 dropped" in stats.describe()


def test_truncation_drops_oldest_exchanges_first(tok: Tokenizer) -> None:
    old = [
        {"role": "user", "content": "old question " * 10},
        {"role": "assistant", "content": "old answer " * 10},
    ]
    last = qa("What is 1 + 1?", "2")["messages"]
    messages = [{"role": "system", "content": "sys"}, *old, *last]
    kept = [messages[0], *last]
    limit = len(chat_template.render(kept, tok)[0]) - 1  # exactly fits without the old exchange
    rendered = render_example(messages, tok, limit)
    assert rendered.truncated and rendered.dropped_turns == 1
    assert rendered.ids == chat_template.render(kept, tok)[0]
    # A single exchange that is still too long keeps its start.
    cut = render_example(last, tok, 4)
    assert cut.ids == chat_template.render(last, tok)[0][:5] and cut.truncated


def test_train_on_prompt_trains_the_prompt(tok: Tokenizer) -> None:
    record = qa("What is 3 + 4?", "7")
    (masked,), _ = build_examples([record], tok, 64, train_on_prompt=False)
    (full,), _ = build_examples([record], tok, 64, train_on_prompt=True)
    assert full.loss_tokens == len(full) and masked.loss_tokens < full.loss_tokens


def test_bad_role_order_names_the_record(tok: Tokenizer) -> None:
    bad = {"messages": [{"role": "assistant", "content": "x"}], "task": None}
    with pytest.raises(UserError, match="^sft record 2: chat template: message 0"):
        build_examples([qa("a", "b"), bad], tok, 64)


def test_load_sft_records_builtin_and_file_split(tmp_path: Path) -> None:
    config = load_config("tiny", sets=["data.builtin_size=40", "data.val_fraction=0.25"])
    train = load_sft_records(None, "train", config)
    assert len(train) == 40 and set(train[0]) == {"messages", "task"}
    lines = [json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) for i in range(8)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    file_train = load_sft_records([path], "train", config)
    file_val = load_sft_records([path], "val", config)
    everything = load_sft_records([path], "all", config)
    assert (len(file_train), len(file_val), len(everything)) == (6, 2, 8)
    contents = sorted(r["messages"][0]["content"] for r in file_train + file_val)
    assert contents == sorted(r["messages"][0]["content"] for r in everything)
    assert file_val == load_sft_records([path], "val", config)  # fixed, seed-independent


# ------------------------------------------------------------------------------------ loss


def test_loss_is_summed_over_trained_tokens_only(tok: Tokenizer) -> None:
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_embd=32, n_head=2, context_length=64), tok.vocab_size)
    records = [qa("What is 12 + 30?", "42"), qa("Say hello in Chinese.", "你好 there")]
    examples, _ = build_examples(records, tok, 64)
    stage = stage_of(examples, group_size=2)
    batch = pad_batch(examples, pad_id=tok.pad_id)
    assert batch["input_ids"].shape[1] == max(len(e) for e in examples)
    loss, _ = stage.loss(model, batch)  # the training path (gradients on)
    loss = loss.detach()
    # By hand: full logits, cross entropy at the trained positions only.
    with torch.no_grad():
        logits = model(batch["input_ids"]).float()
    targets = batch["targets"]
    trained = targets != IGNORE_INDEX
    per_token = F.cross_entropy(logits[trained], targets[trained], reduction="none")
    assert float(loss) == pytest.approx(float(per_token.sum()), rel=1e-5)
    assert stage.count_tokens(batch) == int(trained.sum()) == sum(e.loss_tokens for e in examples)
    # Masked positions contribute nothing: giving them their real next tokens as targets adds
    # exactly their cross entropy, and padding (changed to any id) changes nothing.
    real = batch["input_ids"].roll(-1, dims=1)
    unmasked = torch.where(trained, targets, real)
    with torch.no_grad():
        _, with_prompt = model(batch["input_ids"], targets=unmasked, reduction="sum")
    assert float(with_prompt) > float(loss)
    padded = batch["input_ids"].clone()
    short = min(range(len(examples)), key=lambda i: len(examples[i]))
    padded[short, len(examples[short]) :] = 5
    same = stage.loss(model, {"input_ids": padded, "targets": targets})[0].detach()
    assert float(same) == pytest.approx(float(loss), rel=1e-6)
    # Each example's loss is independent of its batch-mates (padding does not leak in).
    alone = sum(float(stage.loss(model, pad_batch([e], tok.pad_id))[0].detach()) for e in examples)
    assert alone == pytest.approx(float(loss), rel=1e-5)


# ------------------------------------------------------------------------------------ batches


def padding_of(batches: list[dict]) -> tuple[int, int]:
    pad = real = 0
    for batch in batches:
        inputs = batch["input_ids"]
        # synthetic example i is all i's: its length is the count of its id in the row
        lengths = [int((row == row[0]).sum()) for row in inputs]
        real += sum(lengths)
        pad += inputs.numel() - sum(lengths)
    return pad, real


def test_batches_are_length_grouped() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 61, size=512).tolist()
    examples = synthetic([max(2, n) for n in lengths])
    # Make row identity robust: ids start at 1 so padding (0) never looks like an example.
    examples = [SftExample(e.input_ids + 1, e.targets, None, e.loss_tokens) for e in examples]
    group = 8
    stage = stage_of(examples, group_size=group)
    batches = [stage.next_batch(group) for _ in range(512 // group)]
    assert stage.epoch == 0 and stage.cursor == 512
    seen = sorted(int(b["input_ids"][r, 0]) - 1 for b in batches for r in range(group))
    assert seen == list(range(512))  # one epoch = every example once
    pad, real = padding_of(batches)
    # Groups are consecutive runs of a window sorted by length, so within one window the
    # groups' length ranges add up to at most the window's range; per group padding is at most
    # (group - 1) x its range.
    windows = 512 // (group * sft.GROUPS_PER_WINDOW)
    bound = windows * (group - 1) * (max(lengths) - min(lengths))
    assert pad <= bound
    shuffled = torch.randperm(512, generator=torch.Generator().manual_seed(0)).tolist()
    random_batches = [
        pad_batch([examples[i] for i in shuffled[s : s + group]], 0) for s in range(0, 512, group)
    ]
    random_pad, _ = padding_of(random_batches)
    assert pad / (pad + real) < 0.1 < random_pad / (random_pad + real)


def test_uneven_epochs_stay_aligned_and_cover_everything() -> None:
    examples = synthetic(list(range(3, 3 + 21)))  # 21 examples, groups of 4
    examples = [SftExample(e.input_ids + 1, e.targets, None, e.loss_tokens) for e in examples]
    stage = stage_of(examples, group_size=4)
    first_epoch = [stage.next_batch(4) for _ in range(6)]  # 24 = 21 rounded up to whole groups
    assert stage.epoch == 0 and stage.epochs_done() == 1.0
    seen = {int(b["input_ids"][r, 0]) - 1 for b in first_epoch for r in range(4)}
    assert seen == set(range(21))
    stage.next_batch(4)
    assert stage.epoch == 1 and stage.cursor == 4
    assert stage.sequences_per_epoch() == 21


def test_data_state_resumes_the_exact_batches() -> None:
    examples = synthetic(list(range(3, 40)) * 2)  # 74 examples
    stage = stage_of(examples, group_size=4)
    for _ in range(17):  # into the second epoch (76 per epoch)
        stage.next_batch(4)
    state = json.loads(json.dumps(stage.data_state()))
    expected = [stage.next_batch(4) for _ in range(12)]
    fresh = stage_of(examples, group_size=4)
    fresh.load_data_state(state)
    replayed = [fresh.next_batch(4) for _ in range(12)]
    for a, b in zip(expected, replayed, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"])
        assert torch.equal(a["targets"], b["targets"])
    assert stage.epoch == 1 and fresh.data_state() == stage.data_state()
    # A different seed orders differently; a different example count is refused.
    other = stage_of(examples, group_size=4, seed=4)
    assert not torch.equal(
        other.next_batch(4)["input_ids"], stage_of(examples, 4).next_batch(4)["input_ids"]
    )
    with pytest.raises(UserError, match="training data changed"):
        stage_of(examples[:-1], group_size=4).load_data_state(state)


# ------------------------------------------------------------------------------------ exact match


@pytest.mark.parametrize(
    ("prediction", "reference", "equal"),
    [
        ("  Paris ", "paris", True),
        ("The  Cat\tsat\n", "the cat sat", True),
        ("STRASSE", "straße", True),  # case folding, not just lower()
        ("你好 世界", "你好\u3000世界", True),  # ideographic space collapses like any space
        (" 北京 ", "北京", True),
        ("北京。", "北京", False),  # punctuation is kept
        ("42", "24", False),
        ("cat dog", "catdog", False),
    ],
)
def test_normalise_answer(prediction: str, reference: str, equal: bool) -> None:
    normalise = exact_match.normalise_answer
    assert (normalise(prediction) == normalise(reference)) is equal


def val_records(per_family: int = 3) -> list[dict]:
    records = builtin_records("sft", "val", 400)
    return exact_match.select_per_family(records, per_family)


def test_exact_match_by_family_right_and_wrong(
    tok: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = val_records(3)
    answers = {
        tuple(chat_template.prompt_ids(r["messages"][:-1], tok)): r["messages"][-1]["content"]
        for r in records
    }
    calls = []

    def right(model, prompts, max_new_tokens, stop_ids):  # noqa: ANN001, ANN202
        calls.append((len(prompts), max_new_tokens, tuple(stop_ids)))
        return [tok.encode("  " + answers[tuple(p)].upper() + " ") for p in prompts]

    monkeypatch.setattr(greedy, "greedy_complete", right)
    scores = exact_match.exact_match_by_family(None, tok, records, per_family=2, batch_size=3)
    assert scores == {"exact_match": 1.0, **{f"exact_match/{f}": 1.0 for f in TASK_FAMILIES}}
    assert sum(n for n, _, _ in calls) == 2 * len(TASK_FAMILIES)  # two per family
    assert all(n <= 3 and stops == (tok.eot_id, tok.eos_id) for n, _, stops in calls)

    def wrong(model, prompts, max_new_tokens, stop_ids):  # noqa: ANN001, ANN202
        return [tok.encode(answers[tuple(p)] + " extra") for p in prompts]

    monkeypatch.setattr(greedy, "greedy_complete", wrong)
    scores = exact_match.exact_match_by_family(None, tok, records, per_family=2)
    assert scores["exact_match"] == 0.0
    assert all(scores[f"exact_match/{f}"] == 0.0 for f in TASK_FAMILIES)


def test_exact_match_reads_rlhf_records_with_answers(
    tok: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = builtin_records("rlhf", "val", 400)[:8]
    answers = {
        tuple(chat_template.prompt_ids(r["prompt_messages"], tok)): r["answer"] for r in records
    }
    monkeypatch.setattr(
        greedy,
        "greedy_complete",
        lambda model, prompts, max_new_tokens, stop_ids: [
            tok.encode(answers[tuple(p)]) for p in prompts
        ],
    )
    results = exact_match.score_answers(None, tok, records, per_family=None)
    assert [r.reference for r in results] == [r["answer"] for r in records]
    assert exact_match.summarise_exact_match(results)["exact_match"] == 1.0


def test_greedy_batch_equals_one_by_one_generation(tiny_pretrain_run: Path) -> None:
    from minigpt_cli.engine.inference.decode import generate
    from minigpt_cli.engine.inference.generation import SamplingSettings
    from minigpt_cli.engine.runs.load import load_run

    loaded = load_run(tiny_pretrain_run)
    tok = loaded.tokenizer
    prompts = [chat_template.prompt_ids(r["messages"][:-1], tok) for r in val_records(1)]
    assert len({len(p) for p in prompts}) > 1  # different lengths: the interesting case
    stops = chat_template.stop_token_ids(tok)
    settings = SamplingSettings(
        max_new_tokens=6, greedy=True, top_k=None, top_p=None, stop_ids=stops
    )
    torch.manual_seed(0)
    # A random untied model with large weights: varied, context-dependent choices.
    shape = loaded.config.model.model_copy(update={"init_std": 0.5, "tie_embeddings": False})
    random_model = GPT(shape, tok.vocab_size).eval()
    for model in (loaded.model, random_model):
        batched = greedy.greedy_complete(model, prompts, 6, stops)
        assert batched == [generate(model, p, settings) for p in prompts]
    assert len({tuple(row) for row in batched}) > 1


def test_evaluate_reports_loss_and_exact_match_per_family(tiny_pretrain_run: Path) -> None:
    from minigpt_cli.engine.runs.load import load_run

    loaded = load_run(tiny_pretrain_run)
    tok = loaded.tokenizer
    records = val_records(2)
    examples, _ = build_examples(records, tok, 64)
    stage = sft.SftStage(
        examples,
        examples,
        seq_len=64,
        seed=0,
        pad_id=tok.pad_id,
        group_size=4,
        eval_sequences=len(examples),
        tokenizer=tok,
        exact_match_records=records,
        exact_match_per_family=2,
    )
    with torch.no_grad():
        metrics = stage.evaluate(loaded.model)
        batch = pad_batch(examples, tok.pad_id)
        _, total = loaded.model(batch["input_ids"], targets=batch["targets"], reduction="sum")
    mean = float(total) / sum(e.loss_tokens for e in examples)
    assert metrics["val_loss"] == pytest.approx(mean, abs=1e-4)
    assert metrics["val_ppl"] == pytest.approx(np.exp(mean), rel=1e-3)
    keys = {"exact_match", *(f"exact_match/{f}" for f in TASK_FAMILIES)}
    assert keys <= metrics.keys()
    assert all(0.0 <= metrics[k] <= 1.0 for k in keys)


# ------------------------------------------------------------------------------------ inspect


def test_inspect_shows_trained_tokens_and_counts(tiny_pretrain_run: Path, tmp_path: Path) -> None:
    tok = Tokenizer.load(tiny_pretrain_run)
    data = tmp_path / "d.jsonl"
    data.write_text(
        json.dumps({"instruction": "What is 3 + 4?", "output": "7"})
        + "\n"
        + json.dumps({"prompt": "word " * 80, "completion": "x"})
        + "\n"
    )
    result = run_cli("data", "inspect", "--data", data, "--run", tiny_pretrain_run, "-n", "2")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    ids, mask = chat_template.render(qa("What is 3 + 4?", "7")["messages"], tok)
    assert f"[#1 · {len(ids)} tokens, {sum(mask)} trained]" in out
    assert "<|user|>What is 3 + 4?<|end_of_turn|><|assistant|>[[7<|end_of_turn|>]]" in out
    assert (
        "[#2 · 65 tokens, 0 trained, truncated to fit the context (the end is cut off); "
        "nothing left to learn, so training skips it]"
    ) in out  # the run's context is 64: 64 inputs + the last target
    assert "total: 2 examples" in out and "1 truncated" in out


def test_inspect_dpo_shows_both_responses(tiny_pretrain_run: Path) -> None:
    result = run_cli("data", "inspect", "--kind", "dpo", "--run", tiny_pretrain_run, "-n", "1")
    assert result.returncode == 0, result.stderr
    body = result.stdout.split("\n", 2)[2]  # below the header, which explains the [[ ]] marks
    assert "\nprompt:\n<|begin_of_text|><|user|>" in body
    assert "\nchosen (" in body and "\nrejected (" in body
    assert body.count("[[") == 2 and body.count("<|end_of_turn|>]]") == 2  # one reply each
    assert "total: 1 pair," in body


def test_inspect_errors_are_one_line(tiny_pretrain_run: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n{not json\n")
    result = run_cli("data", "inspect", "--data", bad, "--run", tiny_pretrain_run)
    assert result.returncode == 2
    assert result.stderr.strip().startswith(f"error: {bad}:2: invalid JSON")
    assert len(result.stderr.strip().splitlines()) == 1
    # No --run and no runs/ here: say what to do.
    empty = run_cli("data", "inspect", cwd=tmp_path)
    assert empty.returncode == 2 and "pass --run" in empty.stderr
    # The newest run under runs/ is the default.
    for name in ("old", "new"):
        (tmp_path / "runs" / name).mkdir(parents=True)
        shutil.copy(tiny_pretrain_run / "tokenizer.model", tmp_path / "runs" / name)
    found = run_cli("data", "inspect", "-n", "1", cwd=tmp_path)
    assert found.returncode == 0, found.stderr
    assert f"tokenizer: {Path('runs') / 'new'} " in found.stdout
