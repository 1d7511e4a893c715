"""The reward model of RLHF: the policy's backbone with a scalar head, trained on preference pairs.

InstructGPT's recipe on the user's own small model: copy the starting policy, replace its output
head with a linear `score` head (n_embd -> 1), and train the whole network so that the chosen reply
of each pair scores above the rejected one (Bradley-Terry). PPO then asks it for the reward of
each sampled response.

The pieces (`minigpt rlhf` assembles them):

- `model.heads.RewardModel`: backbone + `score` (the head on the last real token's hidden state).
- `objectives.preference.bradley_terry_loss` / `reward_metrics`: -log sigmoid(score_chosen -
  score_rejected) and the held-out figures (`pref_accuracy`, ties counting as wrong, as in DPO).
- `RewardStage`: the Trainer's `Stage`, on the same pairs as DPO (`data.pairs.build_pairs`, built
  one id shorter by `build_reward_pairs` because the reward model reads every id, the last
  included) and the same resumable order (`data.pairs.PairOrder`).
- `run_reward`: the reward model an RLHF run uses, reused, or trained in the run's `reward/`.
- a trained reward model is opened by `runs.load.load_reward_model` (safetensors only).

Loss normalisation: `loss` returns the sum of per-pair losses and `loss_normaliser` the number of
pairs, so the Trainer optimises the mean loss per pair however a step is split into micro-batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from minigpt_cli.config.schema import Config
from minigpt_cli.engine.core.events import EventCallback, emit
from minigpt_cli.engine.core.io import make_dir
from minigpt_cli.engine.core.seeding import seed_everything
from minigpt_cli.engine.data.pairs import (
    PairOrder,
    PreferencePair,
    build_reward_pairs,
    load_dpo_records,
    pad_pairs,
)
from minigpt_cli.engine.model.heads import (
    RewardModel,
    policy_of,
    reward_model_from_policy,
)
from minigpt_cli.engine.objectives.preference import bradley_terry_loss, reward_metrics
from minigpt_cli.engine.resources.memory import fit_memory
from minigpt_cli.engine.runs.checkpoint import clear_run, find_resume_point, read_state, republish
from minigpt_cli.engine.runs.files import REWARD_DIR
from minigpt_cli.engine.runs.load import load_reward_model
from minigpt_cli.engine.training import distributed
from minigpt_cli.engine.training.finetune import FinetuneSetup
from minigpt_cli.engine.training.pair_stage import PairStage
from minigpt_cli.engine.training.run_spec import RunSpec
from minigpt_cli.engine.training.stage import EVAL_BATCH, Batch
from minigpt_cli.engine.training.trainer import Trainer
from minigpt_cli.errors import UserError


def _lengths(pairs: Sequence[PreferencePair]) -> torch.Tensor:
    """Real ids per row of `pad_pairs(pairs)`: the chosen sequences, then the rejected ones."""
    chosen = [len(p.chosen_ids) for p in pairs]
    rejected = [len(p.rejected_ids) for p in pairs]
    return torch.tensor(chosen + rejected, dtype=torch.long)


class RewardStage(PairStage):
    """Batches of preference pairs; the Bradley-Terry loss of the reward model's two scores.

    Order: `data.pairs.PairOrder` (a per-epoch permutation, a pure function of (seed, epoch)), so
    `data_state` replays the exact batches, accumulation equals one big batch, and a resume on
    changed data is refused. A batch holds the chosen and rejected sequences padded together
    (2n rows, chosen first), their lengths and the pair indices.

    `center_coef` > 0 adds TRL's `center_rewards_coefficient` term, coef * (chosen + rejected)^2
    per pair, which keeps scores centred on 0 (the loss only sees differences) so that PPO's
    rewards start on a sensible scale. `val_loss` reports the Bradley-Terry loss alone.
    """

    name = "reward"
    evaluate_at_start = True  # the untrained head's held-out accuracy: the "before" (about chance)

    def __init__(
        self,
        train_pairs: Sequence[PreferencePair],
        val_pairs: Sequence[PreferencePair],
        *,
        seq_len: int,
        seed: int,
        pad_id: int,
        eval_pairs: int | None = None,
        center_coef: float = 0.0,
        eval_batch: int = EVAL_BATCH,
    ) -> None:
        if not train_pairs:
            raise UserError(
                "no reward-model training pairs (all were empty or identical after truncation)"
            )
        if not val_pairs:
            raise UserError("no reward-model validation pairs (add data or pass --val-data)")
        if center_coef < 0:
            raise ValueError(f"center_coef must be >= 0, got {center_coef}")
        longest = max(
            max(len(p.chosen_ids), len(p.rejected_ids)) for p in [*train_pairs, *val_pairs]
        )
        if longest > seq_len:
            raise ValueError(
                f"a pair holds {longest} ids, more than the context ({seq_len}): build reward "
                "pairs with build_reward_pairs(records, tokenizer, context_length)"
            )
        self.train_pairs = list(train_pairs)
        self.seq_len = seq_len
        # Scored reply tokens per pair: what the Trainer plans --max-tokens and throughput with.
        self.mean_loss_tokens = float(
            np.mean([p.chosen_mask.sum() + p.rejected_mask.sum() for p in self.train_pairs])
        )
        self.pad_id = pad_id
        self.center_coef = center_coef
        count = len(val_pairs) if eval_pairs is None else min(len(val_pairs), max(1, eval_pairs))
        picks = np.linspace(0, len(val_pairs) - 1, count).round().astype(np.int64)
        self.val_pairs = [val_pairs[i] for i in sorted(set(picks.tolist()))]
        self.eval_batch = eval_batch  # pairs per evaluation forward; the caller may lower it
        self.order = PairOrder(self.train_pairs, seed, "reward-model")

    # ------------------------------------------------------------------------------ batches

    def next_batch(self, num_sequences: int) -> Batch:
        """The next `num_sequences` pairs (2 x that many sequences)."""
        indices = self.order.take(num_sequences)
        pairs = [self.train_pairs[i] for i in indices]
        ids, mask = pad_pairs(pairs, self.pad_id)
        return {
            "ids": ids,
            "mask": mask,
            "lengths": _lengths(pairs),
            "pair_index": torch.tensor(indices, dtype=torch.long),
        }

    def count_tokens(self, batch: Batch) -> int:
        """Reply tokens in the batch (both replies): throughput and --max-tokens, as in DPO."""
        return int(batch["mask"].sum())

    def loss_normaliser(self, batch: Batch) -> int:
        """Pairs in the batch: the Trainer divides by this, so a step averages per pair."""
        return int(batch["pair_index"].shape[0])

    def pair_scores(
        self, model: torch.nn.Module, ids: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen scores, rejected scores) of a padded batch whose first half is the chosen."""
        scores = model(ids, lengths)
        pairs = ids.shape[0] // 2
        return scores[:pairs], scores[pairs:]

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        chosen, rejected = self.pair_scores(model, batch["ids"], batch["lengths"])
        losses = bradley_terry_loss(chosen, rejected)
        if self.center_coef:
            losses = losses + self.center_coef * (chosen + rejected) ** 2
        return losses.sum(), reward_metrics(chosen, rejected)

    # ------------------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Mean Bradley-Terry loss (`val_loss`) and `reward_metrics` over the held-out pairs."""
        device = next(model.parameters()).device
        chosen, rejected = [], []
        size = max(1, self.eval_batch)
        for start in range(0, len(self.val_pairs), size):
            pairs = self.val_pairs[start : start + size]
            ids, _ = pad_pairs(pairs, self.pad_id)
            chosen_scores, rejected_scores = self.pair_scores(
                model, ids.to(device), _lengths(pairs).to(device)
            )
            chosen.append(chosen_scores.float().cpu())
            rejected.append(rejected_scores.float().cpu())
        all_chosen, all_rejected = torch.cat(chosen), torch.cat(rejected)
        result = {"val_loss": float(bradley_terry_loss(all_chosen, all_rejected).mean())}
        result.update(reward_metrics(all_chosen, all_rejected))
        return {key: round(value, 5) for key, value in result.items()}


def run_reward(
    config: Config,
    spec: RunSpec,
    setup: FinetuneSetup,
    *,
    parent: Path,
    preference_data: list[Path],
    reuse: Path | None = None,
    on_event: EventCallback | None = None,
) -> tuple[RewardModel, str]:
    """The reward model of the RLHF run `spec` and where it came from: `reuse` (--reward-model),
    finished earlier in reward/, or trained now on `preference_data` (none = the built-in pairs).

    Trained as its own run directory (`reward/` inside the RLHF run) by the one Trainer, so it
    resumes on its own after a kill, and starts from the policy's weights (InstructGPT's recipe:
    a reward model that already knows the language the policy speaks).
    """
    if reuse is not None:
        loaded = load_reward_model(reuse, str(setup.device))
        return loaded.model, str(reuse)
    reward_dir = spec.run_dir / REWARD_DIR
    train = config.stage_train("reward")

    def prepare() -> Path | None:
        """The sub-run's resume point. A sub-run: its publication a crash cut short is finished
        here, as the CLI does for a run, so a reward model whose last save was cut is loaded
        whole; an attempt killed before its first save leaves nothing to continue. Rank 0 alone
        writes; the others then find what it left."""
        point = republish(reward_dir, train.keep_last) if reward_dir.is_dir() else None
        if point is None and reward_dir.is_dir():
            clear_run(reward_dir)
        return point

    point = distributed.first_rank(
        prepare, lambda: find_resume_point(reward_dir) if reward_dir.is_dir() else None
    )
    if point is not None and read_state(point).get("finished"):
        emit(
            on_event, "note", "reward", message=f"reusing the finished reward model in {reward_dir}"
        )
        return load_reward_model(reward_dir, str(setup.device)).model, str(reward_dir)
    # Before it trains: the ranks must be able to share the reward model's steps too.
    distributed.check_split(
        train.global_batch_size, train.micro_batch_size, distributed.world_size(), "reward"
    )
    emit(on_event, "note", "reward", message="training the reward model on preference pairs")
    seed_everything(train.seed)
    model = reward_model_from_policy(policy_of(setup.model)).to(setup.device)
    context = config.model.context_length
    data = preference_data or None
    train_pairs, stats = build_reward_pairs(
        load_dpo_records(data, "train", config), setup.tokenizer, context
    )
    val_pairs, _ = build_reward_pairs(
        load_dpo_records(data, "val", config), setup.tokenizer, context
    )
    emit(on_event, "note", "reward", message=f"training: {stats.describe()}")
    micro_batch, messages = fit_memory(
        config,
        setup.tokenizer.vocab_size,
        setup.precision.dtype_name,
        16 * stats.tokens,
        on_event,
        measure_baseline=True,
        stage="reward",
        sequences_per_example=2,
        # A reward model reads every id of a pair (the last is the one it scores).
        seq_len=max(max(len(p.chosen_ids), len(p.rejected_ids)) for p in train_pairs),
    )
    stage = RewardStage(
        train_pairs,
        val_pairs,
        seq_len=context,
        seed=train.seed,
        pad_id=setup.tokenizer.pad_id,
        eval_pairs=train.eval_batches * train.micro_batch_size,
        eval_batch=min(EVAL_BATCH, micro_batch),
    )
    if distributed.is_writer():
        make_dir(reward_dir)
        setup.tokenizer.save(reward_dir)
    reward_spec = RunSpec(
        run_dir=reward_dir,
        resume=point is not None,
        parent=str(parent),
        # The RLHF run's own sources too, under its stage name: `minigpt rlhf --resume` of a run
        # killed before the policy's first checkpoint starts it again from these.
        sources={"preference_data": [str(p) for p in preference_data], "rlhf": dict(spec.sources)},
        events=[{"event": "governor", "message": m} for m in messages],
    )
    Trainer(
        config,
        stage,
        model,
        reward_spec,
        device=setup.device,
        precision=setup.precision,
        on_event=on_event,
        vocab_size=setup.tokenizer.vocab_size,
        micro_batch_size=micro_batch,
    ).fit()
    distributed.barrier()  # rank 0's last save is complete before any rank loads it
    return load_reward_model(reward_dir, str(setup.device)).model, str(reward_dir)
