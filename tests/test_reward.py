"""The reward model (model/heads.py, stages/reward.py): the Bradley-Terry loss, scores read at the
last real token, the reward stage's batches and resume, learning through the real Trainer, and
export/load of a reward run directory."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from minigpt_cli.config.loader import load_config
from minigpt_cli.config.schema import ModelConfig
from minigpt_cli.engine.core.seeding import seed_everything
from minigpt_cli.engine.data.pairs import PreferencePair, build_pairs, build_reward_pairs
from minigpt_cli.engine.data.stage_records import builtin_records
from minigpt_cli.engine.data.tokenizer import Tokenizer
from minigpt_cli.engine.data.tokenizer_training import train_tokenizer
from minigpt_cli.engine.hardware.device import resolve_precision
from minigpt_cli.engine.inference.scoring import score_texts
from minigpt_cli.engine.model.gpt import GPT
from minigpt_cli.engine.model.heads import RewardModel, reward_model_from_policy
from minigpt_cli.engine.objectives.preference import bradley_terry_loss, reward_metrics
from minigpt_cli.engine.runs.files import MODEL_FILE, save_tensors
from minigpt_cli.engine.runs.load import load_reward_model
from minigpt_cli.engine.stages import reward
from minigpt_cli.engine.training.run_spec import RunSpec
from minigpt_cli.engine.training.trainer import Trainer
from minigpt_cli.errors import UserError
from tests.test_dpo import CharTokenizer

TOK = CharTokenizer()
CONTEXT = 96


# One thread for tiny tensors (`conftest.one_thread` says why).
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_reward_model(seed: int = 0, tie: bool = True, vocab: int = TOK.vocab_size):
    torch.manual_seed(seed)
    config = ModelConfig(n_layer=2, n_head=2, n_embd=32, context_length=CONTEXT, tie_embeddings=tie)
    return RewardModel(GPT(config, vocab))


def builtin_pairs(n: int, split: str = "train") -> list[PreferencePair]:
    records = builtin_records("reward", split, None, 0)[:n]
    pairs, stats = build_reward_pairs(records, TOK, CONTEXT)
    assert stats.dropped == 0
    return pairs


def make_stage(train: list[PreferencePair], val=None, **kwargs) -> reward.RewardStage:
    settings = {"seq_len": CONTEXT, "seed": 3, "pad_id": TOK.pad_id, **kwargs}
    return reward.RewardStage(train, val if val is not None else train[:4], **settings)


# ------------------------------------------------------------------------------------ the loss


def test_bradley_terry_loss_and_metrics_by_hand() -> None:
    chosen = torch.tensor([2.0, 0.0, -1.0])
    rejected = torch.tensor([1.0, 0.0, 1.0])
    losses = bradley_terry_loss(chosen, rejected)
    # -log sigmoid(d) = log(1 + exp(-d)) for d = 1, 0, -2.
    expected = [math.log1p(math.exp(-1.0)), math.log(2.0), math.log1p(math.exp(2.0))]
    torch.testing.assert_close(losses, torch.tensor(expected))
    assert float(losses[0]) == pytest.approx(0.3132617)
    metrics = reward_metrics(chosen, rejected)
    assert metrics["pref_accuracy"] == pytest.approx(1 / 3)  # the tie counts as wrong
    assert metrics["margin"] == pytest.approx(-1 / 3)
    assert metrics["chosen_score"] == pytest.approx(1 / 3)
    assert metrics["rejected_score"] == pytest.approx(2 / 3)


# ------------------------------------------------------------------------------------ the model


def test_the_reward_reads_the_last_real_token_whatever_the_padding() -> None:
    model = tiny_reward_model().eval()
    ids = torch.randint(7, TOK.vocab_size, (3, 20), generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([20, 12, 5])
    with torch.no_grad():
        scores = model(ids, lengths)
        alone = [
            float(model.score(model.backbone.hidden_states(ids[row : row + 1, :n])[0, -1]))
            for row, n in enumerate(lengths.tolist())
        ]
        torch.testing.assert_close(scores, torch.tensor(alone), rtol=1e-5, atol=1e-6)
        # Other padding ids, and more of it: the same scores.
        repadded = torch.full((3, 30), 17)
        for row, n in enumerate(lengths.tolist()):
            repadded[row, :n] = ids[row, :n]
        torch.testing.assert_close(model(repadded, lengths), scores, rtol=1e-5, atol=1e-6)
        # The last real token is what is read: a shorter length is another score, and changing
        # a real token changes it.
        assert float(model(ids[1:2], torch.tensor([11]))) != pytest.approx(float(scores[1]))
        changed = ids.clone()
        changed[2, 4] = 8 if int(ids[2, 4]) != 8 else 9
        assert float(model(changed, lengths)[2]) != pytest.approx(float(scores[2]))
        # Without lengths every row is read at its end.
        torch.testing.assert_close(model(ids)[0], scores[0])
        values = model.position_scores(ids)
        assert values.shape == (3, 20)
        torch.testing.assert_close(values[1, 11], scores[1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="lengths"):
        model(ids, torch.tensor([20, 0, 5]))


def test_score_texts_batches_by_length_and_keeps_the_order() -> None:
    model = tiny_reward_model(seed=2)
    generator = torch.Generator().manual_seed(3)
    sequences = [
        torch.randint(7, TOK.vocab_size, (n,), generator=generator).tolist()
        for n in (9, 3, 40, 1, 17)
    ]
    scores = score_texts(model, sequences, batch_size=2, pad_id=TOK.pad_id)
    assert scores.dtype == torch.float32 and scores.shape == (5,)
    assert model.training  # restored after scoring in eval mode
    model.eval()
    with torch.no_grad():
        one_by_one = [float(model(torch.tensor([s]))) for s in sequences]
    torch.testing.assert_close(scores, torch.tensor(one_by_one), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="sequence 1 has 0 ids"):
        score_texts(model, [[5], []])
    with pytest.raises(ValueError, match=f"1..{CONTEXT}"):
        score_texts(model, [[5] * (CONTEXT + 1)])


@pytest.mark.parametrize("tie", [True, False])
def test_export_uses_hf_sequence_classification_names_and_loads_back(tie: bool) -> None:
    model = tiny_reward_model(seed=0, tie=tie)
    exported = model.export_state_dict()
    assert "score.weight" in exported and exported["score.weight"].shape == (1, 32)
    assert "lm_head.weight" not in exported  # HF's LlamaForSequenceClassification has none
    assert "model.embed_tokens.weight" in exported
    assert not any(name.startswith("backbone.") for name in exported)
    other = tiny_reward_model(seed=1, tie=tie)
    ids = torch.randint(7, TOK.vocab_size, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert not torch.allclose(other(ids), model(ids))
        other.load_exported_state_dict(exported)
        torch.testing.assert_close(other(ids), model(ids))
    # Untied, the language-model head is unused and frozen; tied, it is the (trained) embedding.
    assert model.backbone.lm_head.weight.requires_grad == tie
    gpt = model.backbone
    head = 0 if tie else gpt.lm_head.weight.numel()
    assert model.num_parameters() == gpt.num_parameters() - head + 32
    with pytest.raises(RuntimeError, match="score.weight"):
        other.load_exported_state_dict({k: v for k, v in exported.items() if k != "score.weight"})


def test_reward_model_from_a_lora_policy_merges_a_copy() -> None:
    from minigpt_cli.config.schema import LoraConfig
    from minigpt_cli.engine.model import lora

    torch.manual_seed(0)
    policy = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, context_length=CONTEXT), 122)
    lora.apply_lora(policy, LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)  # a trained adapter: not a no-op
    with pytest.raises(ValueError, match="LoRA"):
        RewardModel(policy)
    model = reward_model_from_policy(policy)
    assert lora.has_lora(policy) and not lora.has_lora(model)
    assert all(p.requires_grad for p in model.parameters())
    ids = torch.randint(7, 122, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(
            model.backbone.hidden_states(ids), policy.hidden_states(ids), rtol=1e-4, atol=1e-5
        )


# ------------------------------------------------------------------------------------ the stage


def test_reward_pairs_fit_the_context_with_their_last_id() -> None:
    records = builtin_records("reward", "train", None, 0)[:40]
    pairs, stats = build_reward_pairs(records, TOK, 40)
    assert stats.max_len == 39
    assert max(max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs) == 40
    reward.RewardStage(pairs, pairs[:2], seq_len=40, seed=0, pad_id=TOK.pad_id)
    too_long, _ = build_pairs(records, TOK, 40)  # DPO's: 41 ids
    with pytest.raises(ValueError, match="build_reward_pairs"):
        reward.RewardStage(too_long, too_long[:2], seq_len=40, seed=0, pad_id=TOK.pad_id)


def test_batches_losses_and_normalisers() -> None:
    pairs = builtin_pairs(12)
    stage = make_stage(pairs)
    model = tiny_reward_model()
    batch = stage.next_batch(4)
    assert batch["ids"].shape[0] == 8 and stage.loss_normaliser(batch) == 4
    assert stage.count_tokens(batch) == int(batch["mask"].sum())
    chosen = [pairs[i] for i in batch["pair_index"].tolist()]
    assert batch["lengths"].tolist() == [len(p.chosen_ids) for p in chosen] + [
        len(p.rejected_ids) for p in chosen
    ]
    loss, metrics = stage.loss(model, batch)
    with torch.no_grad():
        scores = model(batch["ids"], batch["lengths"])
    expected = bradley_terry_loss(scores[:4], scores[4:]).sum()
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-6)
    assert metrics == pytest.approx(reward_metrics(scores[:4], scores[4:]))
    # Two micro-batches of 2 pairs sum to the loss of the same 4 pairs at once.
    halves = make_stage(pairs)
    total = sum(float(halves.loss(model, halves.next_batch(2))[0].detach()) for _ in range(2))
    assert total == pytest.approx(float(loss.detach()), rel=1e-5)
    # The centring term adds coef * (chosen + rejected)^2 per pair.
    centred = make_stage(pairs, center_coef=0.5)
    centred_loss, _ = centred.loss(model, centred.next_batch(4))
    extra = 0.5 * float(((scores[:4] + scores[4:]) ** 2).sum())
    assert float(centred_loss.detach()) == pytest.approx(float(expected) + extra, rel=1e-5)


def test_data_state_replays_batches_and_refuses_changed_pairs() -> None:
    pairs = builtin_pairs(10)
    first = make_stage(pairs)
    for _ in range(3):
        first.next_batch(4)
    state = json.loads(json.dumps(first.data_state()))
    expected = [first.next_batch(4) for _ in range(2)]
    assert first.epochs_done() == pytest.approx(2.0)
    second = make_stage(pairs)
    second.load_data_state(state)
    for want in expected:
        got = second.next_batch(4)
        for key in want:
            assert torch.equal(got[key], want[key]), key
    with pytest.raises(UserError, match="reward-model training data changed"):
        make_stage(pairs[:9]).load_data_state(state)


def test_evaluate_reports_loss_and_metrics_on_held_out_pairs() -> None:
    pairs = builtin_pairs(6)
    val = builtin_pairs(5, "val")
    stage = make_stage(pairs, val, eval_batch=2)  # three forward passes, one of a single pair
    model = tiny_reward_model().eval()
    metrics = stage.evaluate(model)
    assert set(metrics) == {"val_loss", "pref_accuracy", "margin", "chosen_score", "rejected_score"}
    with torch.no_grad():
        chosen, rejected = _direct_scores(model, val)
    assert metrics["val_loss"] == pytest.approx(
        float(bradley_terry_loss(chosen, rejected).mean()), abs=1e-5
    )
    assert metrics["pref_accuracy"] == pytest.approx(float((chosen > rejected).float().mean()))


def _direct_scores(model, pairs: list[PreferencePair]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence scored alone, unpadded."""
    chosen = torch.stack([model(torch.from_numpy(p.chosen_ids)[None])[0] for p in pairs])
    rejected = torch.stack([model(torch.from_numpy(p.rejected_ids)[None])[0] for p in pairs])
    return chosen, rejected


# ------------------------------------------------------------------------------ with the Trainer

TRAINER_SETS = [
    "model.n_embd=32",
    "model.n_layer=2",
    "model.n_head=2",
    f"model.context_length={CONTEXT}",
    "reward.warmup_steps=0",
    "reward.eval_every=1000",
    "reward.save_every=1000",
    "train.log_every=1",
    "log.plot=false",
]


def train_reward(
    run_dir: Path, model: RewardModel, stage: reward.RewardStage, sets: list[str], vocab: int
) -> list[dict]:
    config = load_config("tiny", sets=[*TRAINER_SETS, *sets])
    trainer = Trainer(
        config,
        stage,
        model,
        RunSpec(run_dir=run_dir),
        device=torch.device("cpu"),
        precision=resolve_precision("fp32", torch.device("cpu"), measurements={}),
        vocab_size=vocab,
    )
    trainer.fit()
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_raises_preference_accuracy_above_chance(tmp_path: Path) -> None:
    pairs = builtin_pairs(16)
    seed_everything(0)
    model = tiny_reward_model(seed=0)
    stage = make_stage(pairs, pairs)
    sets = [
        "train.micro_batch_size=8",
        "train.global_batch_size=8",
        "reward.max_steps=30",
        "reward.learning_rate=1e-2",
        "reward.min_lr=1e-3",
    ]
    rows = train_reward(tmp_path, model, stage, sets, TOK.vocab_size)
    train_rows = [r for r in rows if r["kind"] == "train"]
    before, final = [r for r in rows if r["kind"] == "eval"]
    assert before["step"] == 0 and final["step"] == 30
    assert final["pref_accuracy"] > before["pref_accuracy"]
    assert len(train_rows) == 30 and train_rows[0]["stage"] == "reward"
    assert {"pref_accuracy", "margin", "chosen_score", "rejected_score"} <= set(train_rows[-1])
    late = [r["pref_accuracy"] for r in train_rows[-6:]]
    assert sum(late) / len(late) > 0.8
    assert final["pref_accuracy"] >= 0.875  # held-out = the training pairs here
    assert final["val_loss"] < 0.5 * train_rows[0]["loss"]
    assert final["margin"] > 0 and final["chosen_score"] > final["rejected_score"]


# ------------------------------------------------------------------------------ a reward run


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    records = builtin_records("reward", "train", None, 0)[:200]
    texts = [
        " ".join([r["prompt_messages"][-1]["content"], r["chosen"], r["rejected"]]) for r in records
    ]
    folder = tmp_path_factory.mktemp("tok")
    train_tokenizer(texts, 400, folder, num_threads=1)
    return Tokenizer.load(folder)


def test_a_reward_run_directory_loads_back_and_a_language_model_is_refused(
    tmp_path: Path, sp_tokenizer: Tokenizer
) -> None:
    records = builtin_records("reward", "train", None, 0)[:12]
    pairs, _ = build_reward_pairs(records, sp_tokenizer, CONTEXT)
    seed_everything(0)
    model = tiny_reward_model(seed=0, tie=False, vocab=sp_tokenizer.vocab_size)
    stage = reward.RewardStage(
        pairs, pairs[:3], seq_len=CONTEXT, seed=0, pad_id=sp_tokenizer.pad_id
    )
    run_dir = tmp_path / "reward"
    sets = [
        "model.tie_embeddings=false",
        "train.micro_batch_size=4",
        "train.global_batch_size=4",
        "reward.max_steps=2",
    ]
    train_reward(run_dir, model, stage, sets, sp_tokenizer.vocab_size)
    sp_tokenizer.save(run_dir)
    sequences = [p.chosen_ids.tolist() for p in pairs[:5]]
    expected = score_texts(model, sequences, pad_id=sp_tokenizer.pad_id)

    loaded = load_reward_model(run_dir)
    assert isinstance(loaded.model, RewardModel) and not loaded.model.training
    assert loaded.state["step"] == 2 and loaded.config.model.tie_embeddings is False
    assert loaded.tokenizer.vocab_size == sp_tokenizer.vocab_size
    got = score_texts(loaded.model, sequences, pad_id=sp_tokenizer.pad_id)
    torch.testing.assert_close(got, expected)

    lm_dir = tmp_path / "lm"
    shutil.copytree(run_dir, lm_dir)
    save_tensors(lm_dir / MODEL_FILE, model.backbone.export_state_dict(), {"format": "minigpt"})
    with pytest.raises(UserError, match="not a reward model"):
        load_reward_model(lm_dir)
    with pytest.raises(UserError, match="no such reward-model directory"):
        load_reward_model(tmp_path / "missing")
