"""DPO: pairs and truncation (`data.pairs`), sequence log-probs and the loss
(`objectives.preference`), the stage's batches, cached reference, resume and learning, on a tiny
model and a character tokenizer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minigpt_cli.config.loader import dump_config, load_config
from minigpt_cli.config.schema import ModelConfig
from minigpt_cli.engine.core.seeding import seed_everything
from minigpt_cli.engine.data import chat_template
from minigpt_cli.engine.data.pairs import PreferencePair, build_pairs, pad_pairs
from minigpt_cli.engine.data.stage_records import builtin_records, split_records
from minigpt_cli.engine.hardware.device import resolve_precision
from minigpt_cli.engine.model.gpt import GPT
from minigpt_cli.engine.objectives.preference import dpo_loss, preference_metrics, sequence_logps
from minigpt_cli.engine.stages import dpo
from minigpt_cli.engine.training.run_spec import RunSpec
from minigpt_cli.engine.training.trainer import Trainer
from minigpt_cli.errors import UserError


class CharTokenizer:
    """One id per character (printable ASCII decodes exactly), so lengths in tests are exact."""

    pad_id, bos_id, eos_id, system_id, user_id, assistant_id, eot_id = range(7)
    vocab_size = 7 + 95 + 20  # specials, printable ASCII, 20 buckets for everything else

    def encode(self, text: str) -> list[int]:
        return [7 + ord(c) - 32 if 32 <= ord(c) < 127 else 102 + ord(c) % 20 for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i - 7 + 32) if 7 <= i < 102 else "?" for i in ids if i >= 7)


TOK = CharTokenizer()


# One thread for tiny tensors (`conftest.one_thread` says why).
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed: int = 0, context: int = 96) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, context_length=context), TOK.vocab_size)


def pair(prompt: str, chosen: str, rejected: str, task: str | None = None) -> dict:
    messages = [{"role": "user", "content": prompt}]
    return {"prompt_messages": messages, "chosen": chosen, "rejected": rejected, "task": task}


def builtin_pairs(n: int, split: str = "train", max_len: int = 96) -> list[PreferencePair]:
    records = builtin_records("dpo", split, n, 0)[:n]
    pairs, stats = build_pairs(records, TOK, max_len)
    assert stats.dropped == 0
    return pairs


def make_stage(
    train: list[PreferencePair],
    val: list[PreferencePair] | None = None,
    *,
    seed: int = 3,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    **kwargs,
) -> dpo.DpoStage:
    return dpo.DpoStage(
        train,
        val if val is not None else train[:4],
        seq_len=96,
        seed=seed,
        pad_id=TOK.pad_id,
        beta=beta,
        label_smoothing=label_smoothing,
        **kwargs,
    )


# ------------------------------------------------------------------------------------ the loss


def test_dpo_loss_matches_a_hand_computation_with_and_without_label_smoothing() -> None:
    policy_c = torch.tensor([-10.0, -4.0, -7.0])
    policy_r = torch.tensor([-12.0, -3.0, -7.0])
    ref_c = torch.tensor([-11.0, -5.0, -6.0])
    ref_r = torch.tensor([-11.0, -5.0, -8.0])
    beta = 0.5
    # h = (pi_c - ref_c) - (pi_r - ref_r): (1 - -1, 1 - 2, -1 - 1) = (2, -1, -2)
    h = [2.0, -1.0, -2.0]

    def log_sigmoid(x: float) -> float:
        return -math.log1p(math.exp(-x))

    losses, chosen, rejected = dpo_loss(policy_c, policy_r, ref_c, ref_r, beta, 0.0)
    expected = [-log_sigmoid(beta * x) for x in h]
    torch.testing.assert_close(losses, torch.tensor(expected))
    torch.testing.assert_close(chosen, torch.tensor([0.5, 0.5, -0.5]))
    torch.testing.assert_close(rejected, torch.tensor([-0.5, 1.0, 0.5]))

    smoothed, _, _ = dpo_loss(policy_c, policy_r, ref_c, ref_r, beta, 0.2)
    expected = [-0.8 * log_sigmoid(beta * x) - 0.2 * log_sigmoid(-beta * x) for x in h]
    torch.testing.assert_close(smoothed, torch.tensor(expected))
    # Smoothing pulls a confident pair's loss up: the label might be wrong.
    assert smoothed[0] > losses[0]


def test_preference_metrics_count_ties_as_wrong() -> None:
    chosen = torch.tensor([1.0, 0.0, 0.5, -2.0])
    rejected = torch.tensor([0.0, 0.0, 1.0, -3.0])
    metrics = preference_metrics(chosen, rejected)
    assert metrics["pref_accuracy"] == 0.5  # pairs 0 and 3 win; the tie (pair 1) does not
    assert metrics["chosen_reward"] == pytest.approx(-0.125)
    assert metrics["rejected_reward"] == pytest.approx(-0.5)
    assert metrics["margin"] == pytest.approx(0.375)
    zeros = torch.zeros(5)
    assert preference_metrics(zeros, zeros)["pref_accuracy"] == 0.0


# ------------------------------------------------------------------------------ sequence log-probs


def test_sequence_logps_is_the_masked_per_token_sum_and_ignores_prompt_and_padding() -> None:
    model = tiny_model().eval()
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(7, TOK.vocab_size, (3, 20), generator=generator)
    mask = torch.zeros(3, 20, dtype=torch.bool)
    mask[0, 5:20] = True
    mask[1, 8:14] = True  # ids[1, 14:] are padding
    mask[2, 1:3] = True
    head_rows: list[int] = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: head_rows.append(i[0].shape[0]))
    with torch.no_grad():
        got = sequence_logps(model, ids, mask)
    hook.remove()
    # The 23 scored positions of 3 x 19 reach the head topped up with unscored ones to a multiple
    # of 32 rows (`gpt.kept_rows`: few matmul shapes), which the sums leave out.
    assert int(mask[:, 1:].sum()) == 23 and head_rows == [32]
    with torch.no_grad():
        logprobs = F.log_softmax(model(ids[:, :-1]).float(), dim=-1)
    per_token = logprobs.gather(2, ids[:, 1:, None]).squeeze(2)
    brute = [float(per_token[row][mask[row, 1:]].sum()) for row in range(3)]
    torch.testing.assert_close(got, torch.tensor(brute), rtol=1e-5, atol=1e-5)

    changed = ids.clone()
    changed[1, 14:] = 9  # other padding after the reply
    changed[2, 4:] = 11
    longer = torch.cat([changed, torch.full((3, 6), 13)], dim=1)  # and wider padding
    wider_mask = torch.cat([mask, torch.zeros(3, 6, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        again = sequence_logps(model, longer, wider_mask)
    torch.testing.assert_close(again, got, rtol=1e-6, atol=1e-6)


def test_sequence_logps_gradient_equals_the_plain_computation() -> None:
    model = tiny_model()
    ids = torch.randint(7, TOK.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[:, 28:] = True  # 24 scored positions, the head's 32 rows topped up with unscored ones
    weights = torch.tensor([1.0, -2.0])  # a different upstream gradient per sequence
    (sequence_logps(model, ids, mask) * weights).sum().backward()
    chunked = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logprobs = F.log_softmax(model(ids[:, :-1]).float(), dim=-1)
    per_token = logprobs.gather(2, ids[:, 1:, None]).squeeze(2) * mask[:, 1:]
    (per_token.sum(1) * weights).sum().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(chunked[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------ pairs


def test_pairs_share_the_rendered_prompt_and_mask_only_the_replies() -> None:
    records = [pair("Add 2 and 3.", "5", "6", "addition")]
    pairs, stats = build_pairs(records, TOK, max_len=64)
    (only,) = pairs
    prompt = chat_template.prompt_ids(records[0]["prompt_messages"], TOK)
    chosen_ids, chosen_mask = chat_template.render_response(records[0]["prompt_messages"], "5", TOK)
    assert only.chosen_ids.tolist() == chosen_ids and only.chosen_mask.tolist() == chosen_mask
    assert only.rejected_ids.tolist() == prompt + TOK.encode("6") + [TOK.eot_id]
    assert only.rejected_mask.tolist() == [False] * len(prompt) + [True, True]
    assert only.prompt_len == len(prompt) and only.task == "addition"
    assert (stats.pairs, stats.prompts_truncated, stats.replies_truncated) == (1, 0, 0)
    assert stats.tokens == 2 * (len(prompt) + 2 - 1) and stats.reply_tokens == 4
    assert stats.describe() == f"1 pairs, {stats.tokens} tokens (4 scored)"


def test_long_prompts_are_cut_from_the_left_keeping_begin_of_text() -> None:
    text = "".join(str(i % 10) for i in range(30))  # 30 characters, 34 ids as a prompt
    records = [pair(text, "yes", "no!")]
    pairs, stats = build_pairs(records, TOK, max_len=20)
    (only,) = pairs
    full = chat_template.prompt_ids(records[0]["prompt_messages"], TOK)
    # Budget 21 ids: the prompt gives way to the 4-id replies and keeps 17 ids, begin-of-text and
    # the last 16 (the end of the question, `<|end_of_turn|>`, `<|assistant|>`).
    assert only.prompt_len == 17
    assert only.chosen_ids[:17].tolist() == [TOK.bos_id, *full[-16:]]
    assert TOK.decode(only.chosen_ids[2:15].tolist()) == text[-13:]
    assert only.chosen_ids.tolist()[-4:] == [*TOK.encode("yes"), TOK.eot_id]
    assert len(only.chosen_ids) == 21
    assert (stats.prompts_truncated, stats.replies_truncated, stats.dropped) == (1, 0, 0)
    assert "1 prompts cut from the left to fit 20 tokens" in stats.describe()
    # A long reply cannot push the prompt below half the budget (10 ids): the reply is cut too.
    pairs, stats = build_pairs([pair(text, "a" * 40, "b")], TOK, max_len=20)
    assert pairs[0].prompt_len == 10 and len(pairs[0].chosen_ids) == 21
    assert pairs[0].chosen_ids[:10].tolist() == [TOK.bos_id, *full[-9:]]
    assert (stats.prompts_truncated, stats.replies_truncated) == (1, 1)


def test_long_replies_are_cut_from_the_right_keeping_their_start() -> None:
    records = [pair("hi", "abcdefghij" * 3, "zyx"), pair("hi", "same start A", "same start B")]
    pairs, stats = build_pairs(records, TOK, max_len=15)
    (only,) = pairs  # the second pair's replies are identical once cut: dropped, counted
    prompt_len = len(chat_template.prompt_ids(records[0]["prompt_messages"], TOK))
    assert prompt_len == 6  # short prompts are never cut to make room
    room = 16 - prompt_len
    assert only.chosen_ids[prompt_len:].tolist() == TOK.encode("abcdefghij")[:room]  # no eot
    assert only.rejected_ids[prompt_len:].tolist() == [*TOK.encode("zyx"), TOK.eot_id]
    assert (stats.records, stats.pairs, stats.replies_truncated, stats.dropped) == (2, 1, 3, 1)
    assert stats.prompts_truncated == 0
    line = stats.describe()
    assert "3 replies cut at the end to fit 15 tokens" in line
    assert "1 dropped: both replies identical after truncation" in line


def test_prompt_truncation_drops_the_oldest_exchange_first_and_keeps_the_system_message() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "an old question " * 3},
        {"role": "assistant", "content": "an old answer"},
        {"role": "user", "content": "Add 2 and 3."},
    ]
    record = {"prompt_messages": messages, "chosen": "5", "rejected": "6", "task": None}
    full = chat_template.prompt_ids(messages, TOK)
    latest = chat_template.prompt_ids([messages[0], messages[3]], TOK)
    pairs, stats = build_pairs([record], TOK, max_len=len(full) - 1, max_prompt_tokens=None)
    assert pairs[0].chosen_ids[: pairs[0].prompt_len].tolist() == latest
    assert stats.prompts_truncated == 1
    # An explicit cap applies even when everything would fit, and is counted.
    pairs, stats = build_pairs([record], TOK, max_len=200, max_prompt_tokens=10)
    assert pairs[0].prompt_len == 10 and stats.prompts_truncated == 1
    assert pairs[0].chosen_ids[:10].tolist() == [TOK.bos_id, *latest[-9:]]
    with pytest.raises(UserError, match="max_prompt_tokens"):
        build_pairs([record], TOK, max_len=10, max_prompt_tokens=10)


def test_split_pairs_holds_out_a_fixed_random_share() -> None:
    records = [pair(f"q{i}", "a", "b") for i in range(40)]
    train, val = split_records(records, 0.1, "dpo")
    assert len(val) == 4 and len(train) == 36
    assert split_records(records, 0.1, "dpo") == (train, val)
    assert [r["prompt_messages"][0]["content"] for r in val] != ["q36", "q37", "q38", "q39"]
    with pytest.raises(UserError, match="at least 2"):
        split_records(records[:1], 0.1, "dpo")


# ------------------------------------------------------------------------------------ the stage


def test_at_step_zero_the_loss_is_log_two_per_pair_and_nothing_is_preferred() -> None:
    pairs = builtin_pairs(12)
    stage = make_stage(pairs)
    model = tiny_model()
    stage.cache_reference(model, batch_pairs=5)  # other batches than training's: same numbers
    model.train()
    batch = stage.next_batch(6)
    assert batch["ids"].shape[0] == 12 and stage.loss_normaliser(batch) == 6
    assert stage.count_tokens(batch) == int(batch["mask"].sum()) > 6
    loss, metrics = stage.loss(model, batch)
    assert float(loss.detach()) == pytest.approx(6 * math.log(2), abs=1e-5)
    assert metrics["chosen_reward"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["rejected_reward"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["margin"] == pytest.approx(0.0, abs=1e-6)
    # Ties count as wrong; here the rewards are zero only to float rounding (a reference cached
    # in other batches), so the tie rule is checked on exact zeros.
    assert preference_metrics(torch.zeros(6), torch.zeros(6))["pref_accuracy"] == 0.0
    evaluated = stage.evaluate(model)
    assert evaluated["val_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert evaluated["pref_accuracy"] == 0.0


def test_batches_need_the_reference_first() -> None:
    stage = make_stage(builtin_pairs(4))
    with pytest.raises(RuntimeError, match="cache_reference"):
        stage.next_batch(2)


def test_reference_is_the_model_as_cached_not_as_trained() -> None:
    pairs = builtin_pairs(4)
    stage = make_stage(pairs)
    model = tiny_model()
    stage.cache_reference(model)
    cached = stage.reference_train.clone()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05)
    batch = stage.next_batch(4)
    torch.testing.assert_close(batch["reference"], cached[batch["pair_index"]])
    _, metrics = stage.loss(model, batch)
    assert metrics["chosen_reward"] != 0.0  # the policy moved away from the frozen reference


def test_data_state_round_trip_replays_the_same_batches() -> None:
    pairs = builtin_pairs(10)
    model = tiny_model()
    first = make_stage(pairs)
    first.cache_reference(model)
    for _ in range(3):
        first.next_batch(4)  # 12 pairs: into the second epoch
    state = json.loads(json.dumps(first.data_state()))
    expected = [first.next_batch(4) for _ in range(3)]
    assert first.epochs_done() == pytest.approx(2.4)

    second = make_stage(pairs)
    second.cache_reference(model)
    second.load_data_state(state)
    for want in expected:
        got = second.next_batch(4)
        for key in want:
            assert torch.equal(got[key], want[key]), key
    # Each epoch is a permutation of every pair.
    third = make_stage(pairs)
    third.cache_reference(model)
    seen = torch.cat([third.next_batch(5)["pair_index"] for _ in range(2)])
    assert sorted(seen.tolist()) == list(range(10))

    changed = make_stage(pairs[:9])
    with pytest.raises(UserError, match="DPO training data changed"):
        changed.load_data_state(state)
    edited = make_stage([pairs[1], pairs[0], *pairs[2:]])
    with pytest.raises(UserError, match="DPO training data changed"):
        edited.load_data_state(state)


def test_the_reference_scores_only_the_pairs_the_run_draws() -> None:
    pairs = builtin_pairs(12)
    model = tiny_model()
    whole = make_stage(pairs)
    whole.cache_reference(model, batch_pairs=4)
    short = make_stage(pairs)
    short.cache_reference(model, batch_pairs=4, pairs_drawn=6)  # 3 steps of 2 pairs
    drawn = torch.from_numpy(short.order.first_epoch()[:6])
    unscored = torch.ones(12, dtype=torch.bool)
    unscored[drawn] = False
    assert short.reference_train[unscored].isnan().all()
    assert not short.reference_train[drawn].isnan().any()
    # The same numbers as scoring every pair (other chunks, other padding: to rounding).
    torch.testing.assert_close(short.reference_train[drawn], whole.reference_train[drawn])
    torch.testing.assert_close(short.reference_val, whole.reference_val)
    for _ in range(3):
        batch = short.next_batch(2)
        assert not batch["reference"].isnan().any()
    with pytest.raises(RuntimeError, match="more than the 6 pairs"):
        short.next_batch(2)
    # A resume that runs longer (or scores every pair) checks the reference on the pairs both
    # scored; one that scores fewer has nothing to compare and accepts.
    saved = json.loads(json.dumps(short.extra_state()))
    assert saved["reference_pairs"] == 6
    whole.load_extra_state(saved)
    other = make_stage(pairs)
    other.cache_reference(tiny_model(seed=1), batch_pairs=4, pairs_drawn=8)
    with pytest.raises(UserError, match="reference model differs"):
        other.load_extra_state(saved)
    shorter = make_stage(pairs)
    shorter.cache_reference(tiny_model(seed=1), batch_pairs=4, pairs_drawn=4)
    shorter.load_extra_state(saved)


def test_resume_refuses_a_different_reference_model() -> None:
    pairs = builtin_pairs(6)
    stage = make_stage(pairs)
    stage.cache_reference(tiny_model(seed=0))
    saved = json.loads(json.dumps(stage.extra_state()))
    again = make_stage(pairs)
    again.cache_reference(tiny_model(seed=0))
    again.load_extra_state(saved)  # the same reference recomputed: accepted
    other = make_stage(pairs)
    other.cache_reference(tiny_model(seed=1))
    with pytest.raises(UserError, match="reference model differs"):
        other.load_extra_state(saved)


# ------------------------------------------------------------------------------ with the Trainer

TRAINER_SETS = [
    "model.n_embd=32",
    "model.n_layer=2",
    "model.n_head=2",
    "model.context_length=96",
    "dpo.warmup_steps=0",
    "dpo.eval_every=1000",
    "dpo.save_every=1000",
    "dpo.log_every=1",
    "log.plot=false",
]


def train_dpo(
    run_dir: Path, pairs: list[PreferencePair], sets: list[str], val=None
) -> tuple[GPT, dpo.DpoStage, list[dict]]:
    config = load_config("tiny", sets=[*TRAINER_SETS, *sets])
    seed_everything(0)
    model = GPT(config.model, TOK.vocab_size)
    settings = config.dpo
    stage = make_stage(
        pairs, val, seed=5, beta=settings.beta, label_smoothing=settings.label_smoothing
    )
    stage.cache_reference(model)
    trainer = Trainer(
        config,
        stage,
        model,
        RunSpec(run_dir=run_dir),
        device=torch.device("cpu"),
        precision=resolve_precision("fp32", torch.device("cpu"), measurements={}),
        vocab_size=TOK.vocab_size,
    )
    trainer.fit()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return model, stage, rows


def test_accumulated_micro_batches_give_the_same_step_as_one_batch(tmp_path: Path) -> None:
    pairs = builtin_pairs(16)
    common = ["dpo.global_batch_size=4", "dpo.max_steps=3", "dpo.learning_rate=1e-2"]
    one, _, rows_one = train_dpo(tmp_path / "one", pairs, [*common, "dpo.micro_batch_size=4"])
    two, _, rows_two = train_dpo(tmp_path / "two", pairs, [*common, "dpo.micro_batch_size=2"])
    train_one = [r for r in rows_one if r["kind"] == "train"]
    train_two = [r for r in rows_two if r["kind"] == "train"]
    assert [r["micro_batch_size"] for r in train_two] == [2, 2, 2]
    for a, b in zip(train_one, train_two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["margin"] == pytest.approx(a["margin"], rel=1e-4, abs=1e-5)
        assert b["pref_accuracy"] == a["pref_accuracy"]
    assert train_one[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference
    assert train_one[1]["margin"] != 0.0  # the later steps ran on an updated policy
    for (name, a), (_, b) in zip(one.named_parameters(), two.named_parameters(), strict=True):
        # Padding to other lengths sums in another order; AdamW divides each gradient by its own
        # size, so a float-noise difference reaches a few 1e-5 (measured 4e-5 on 2 of 3,904
        # embedding numbers), far below a wrong accumulation (every weight off by ~lr = 1e-2).
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)


def test_training_raises_preference_accuracy_on_the_training_pairs(tmp_path: Path) -> None:
    pairs = builtin_pairs(8)
    sets = [
        "dpo.micro_batch_size=4",
        "dpo.global_batch_size=8",
        "dpo.max_steps=20",
        "dpo.learning_rate=1e-2",
        "dpo.min_lr=1e-3",
    ]
    model, stage, rows = train_dpo(tmp_path, pairs, sets, val=pairs)
    train_rows = [r for r in rows if r["kind"] == "train"]
    (final,) = [r for r in rows if r["kind"] == "eval"]
    assert train_rows[0]["pref_accuracy"] == 0.0 and train_rows[0]["margin"] == 0.0
    # Held-out = the training pairs here: every pair is now preferred the right way round.
    assert final["pref_accuracy"] == 1.0
    assert final["margin"] > 0.5
    assert final["val_loss"] < 0.5 * math.log(2)
    assert final["chosen_reward"] > final["rejected_reward"]
    assert {"chosen_reward", "rejected_reward", "margin", "pref_accuracy"} <= set(train_rows[-1])


def test_evaluation_adds_exact_match_per_family() -> None:
    pairs = builtin_pairs(4)
    records = [
        {"messages": [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "5"}]}
        | {"task": "addition"},
        {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "x"}]}
        | {"task": "facts"},
    ]
    stage = make_stage(pairs, tokenizer=TOK, exact_match_records=records, exact_match_per_family=4)
    model = tiny_model()
    stage.cache_reference(model)
    metrics = stage.evaluate(model)
    assert {"val_loss", "pref_accuracy", "margin", "exact_match"} <= set(metrics)
    assert {"exact_match/addition", "exact_match/facts"} <= set(metrics)
    assert metrics["exact_match"] == 0.0  # an untrained model answers neither


# ------------------------------------------------------------------------------------ config


def test_dpo_config_section_and_stage_train() -> None:
    config = load_config("tiny", sets=["dpo.beta=0.3", "dpo.label_smoothing=0.1"])
    assert (config.dpo.beta, config.dpo.label_smoothing) == (0.3, 0.1)
    train = config.stage_train("dpo")
    assert train.learning_rate == config.dpo.learning_rate != config.train.learning_rate
    assert train.micro_batch_size == config.train.micro_batch_size  # not overridden: [train]'s
    assert "beta" not in train.model_dump()
    again = load_config("tiny", sets=["dpo.max_steps=7"]).stage_train("dpo")
    assert again.max_steps == 7
    with pytest.raises(UserError):
        load_config("tiny", sets=["dpo.label_smoothing=0.5"])
    with pytest.raises(UserError):
        load_config("tiny", sets=["dpo.beta=0"])


def test_dpo_config_round_trips_through_toml(tmp_path: Path) -> None:
    config = load_config("tiny", sets=["dpo.beta=0.25", "dpo.max_prompt_tokens=64"])
    path = tmp_path / "config.toml"
    path.write_text(dump_config(config))
    assert load_config(None, path) == config


def test_pad_pairs_puts_chosen_rows_first() -> None:
    pairs = builtin_pairs(3)
    ids, mask = pad_pairs(pairs, TOK.pad_id)
    width = max(max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs)
    assert ids.shape == (6, width) and mask.shape == (6, width)
    for row, p in enumerate(pairs):
        assert ids[row, : len(p.chosen_ids)].tolist() == p.chosen_ids.tolist()
        assert ids[row + 3, : len(p.rejected_ids)].tolist() == p.rejected_ids.tolist()
        assert not mask[row, len(p.chosen_ids) :].any()
        assert np.array_equal(mask[row + 3, : len(p.rejected_ids)].numpy(), p.rejected_mask)
