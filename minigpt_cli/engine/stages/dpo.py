"""Direct preference optimisation: learn from (prompt, chosen, rejected) without a reward model.

`run_dpo`, the engine function behind `minigpt dpo`, builds the pairs (`data.pairs.build_pairs`:
each prompt in the one chat template, each reply and its end-of-turn after it, cuts counted) and
trains a `DpoStage` on the one Trainer, the policy started and finished by `training.finetune`.

- `DpoStage`: the Trainer's `Stage`. The reference model is the frozen starting policy; its
  log-probabilities are computed once, for the pairs the run's steps will draw
  (`cache_reference`; under torchrun each rank scores its share, then all have them all), and
  stored on the stage, so memory holds one model and a resumed run uses exactly the reference of
  the first run.
- The loss is `objectives.preference.dpo_loss` on `sequence_logps` (the sigmoid DPO loss with
  TRL's conservative label smoothing) and the implicit rewards beta * (log p_policy - log
  p_reference) feed `preference_metrics`.

Loss normalisation: the Trainer divides a step's summed loss by the sum of `loss_normaliser` over
its micro-batches. Here that is the number of pairs and `loss` the sum of per-pair losses, so a
step optimises the mean loss per pair however the step is split into micro-batches;
`count_tokens` (scored reply tokens) only feeds throughput and --max-tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, cast

import numpy as np
import torch

from minigpt_cli.config.schema import Config
from minigpt_cli.engine.core.events import EventCallback, emit
from minigpt_cli.engine.data.examples import load_sft_records
from minigpt_cli.engine.data.pairs import (
    PairOrder,
    PreferencePair,
    build_pairs,
    forward_length,
    pad_pairs,
)
from minigpt_cli.engine.hardware.device import autocast_context
from minigpt_cli.engine.metrics.exact_match import held_out_exact_match
from minigpt_cli.engine.model.gpt import GPT
from minigpt_cli.engine.objectives.preference import dpo_loss, preference_metrics, sequence_logps
from minigpt_cli.engine.resources.memory import fit_memory
from minigpt_cli.engine.training import distributed
from minigpt_cli.engine.training.finetune import (
    FinetuneInputs,
    finish_finetune,
    start_finetune,
    train_and_val_records,
    trainable_parameters,
)
from minigpt_cli.engine.training.pair_stage import PairStage
from minigpt_cli.engine.training.run_spec import RunSpec
from minigpt_cli.engine.training.stage import EVAL_BATCH, Batch
from minigpt_cli.errors import UserError

# Reference log-probabilities must be reproduced on resume; a drift above this means the reference
# model is not the one the run started from.
_REFERENCE_TOLERANCE = 1e-3


class DpoStage(PairStage):
    """Batches of preference pairs; the DPO loss against reference log-probabilities cached once.

    Order: `PairOrder` (a per-epoch permutation, a pure function of (seed, epoch)), so
    `data_state` replays the exact batches and a step of 2 micro-batches of 2 pairs trains the
    same 4 pairs as one micro-batch of 4. A batch holds the
    chosen and the rejected sequences padded together (2n rows), the pair indices and the pairs'
    reference log-probabilities.

    Call `cache_reference(model)` with the starting policy before training (and before a resumed
    Trainer restores its weights): the reference is that model, frozen, and only its numbers are
    kept.
    """

    name = "dpo"

    def __init__(
        self,
        train_pairs: Sequence[PreferencePair],
        val_pairs: Sequence[PreferencePair],
        *,
        seq_len: int,
        seed: int,
        pad_id: int,
        beta: float,
        label_smoothing: float = 0.0,
        eval_pairs: int | None = None,
        tokenizer: Any = None,
        exact_match_records: Sequence[dict] = (),
        exact_match_per_family: int = 16,
        eval_batch: int = EVAL_BATCH,
    ) -> None:
        if not train_pairs:
            raise UserError("no DPO training pairs (all were empty or identical after truncation)")
        if not val_pairs:
            raise UserError("no DPO validation pairs (add data or pass --val-data)")
        if beta <= 0:
            raise ValueError(f"beta must be positive, got {beta}")
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
        self.train_pairs = list(train_pairs)
        self.seq_len = seq_len
        # Scored reply tokens per pair: what the Trainer plans --max-tokens and throughput with.
        self.mean_loss_tokens = (
            float(np.mean([p.chosen_mask.sum() + p.rejected_mask.sum() for p in self.train_pairs]))
            if self.train_pairs
            else 0.0
        )
        self.seed = seed
        self.pad_id = pad_id
        self.beta = beta
        self.label_smoothing = label_smoothing
        self.tokenizer = tokenizer
        self.exact_match_records = list(exact_match_records)
        self.exact_match_per_family = exact_match_per_family
        count = len(val_pairs) if eval_pairs is None else min(len(val_pairs), max(1, eval_pairs))
        picks = np.linspace(0, len(val_pairs) - 1, count).round().astype(np.int64)
        self.val_pairs = [val_pairs[i] for i in sorted(set(picks.tolist()))]
        self.eval_batch = eval_batch  # pairs per evaluation forward; the caller may lower it
        self.order = PairOrder(self.train_pairs, seed, "DPO")
        self.reference_train: torch.Tensor | None = None  # (pairs, 2): chosen, rejected
        self.reference_val: torch.Tensor | None = None
        self.reference_pairs = 0  # the training pairs scored: the first of the first epoch's

    # ------------------------------------------------------------------------------ reference

    @torch.no_grad()
    def cache_reference(
        self,
        model: torch.nn.Module,
        *,
        batch_pairs: int = 8,
        pairs_drawn: int | None = None,
        autocast: Callable[[], AbstractContextManager[Any]] | None = None,
        on_event: EventCallback | None = None,
    ) -> None:
        """Score the training pairs the run will draw, and every held-out pair, with `model` (the
        reference), and keep the numbers.

        `pairs_drawn` (max_steps x the global batch; None: every pair) bounds the training pairs:
        the first that many of the first epoch's order, so the tiny preset's 100 steps of 8 pairs
        score 800 of 6,000 (scoring all had been a third of its DPO stage's time). They are
        scored in chunks of `batch_pairs` consecutive places of that order, so a resume with a
        longer run scores the same chunks first (all but the last, partial one, the same
        numbers); a pair left unscored holds NaN, which `next_batch` refuses.

        Eval mode (no dropout) and no gradients; `autocast` (e.g. the Trainer's precision context)
        should be the one training uses, so that at step 0 policy and reference agree. Emits
        `progress` events (unit "pairs").

        Under several processes each rank scores its own share of the chunks, then every rank
        gets all of them: the pairs are scored once in the job, each in the same chunk (the same
        padding) as one process scores it, so the numbers are its.
        """
        context = autocast or nullcontext
        size = max(1, batch_pairs)
        first_epoch = self.order.first_epoch()
        drawn = len(first_epoch) if pairs_drawn is None else min(pairs_drawn, len(first_epoch))
        self.reference_pairs = drawn
        places = (first_epoch[:drawn], np.arange(len(self.val_pairs)))
        splits = (self.train_pairs, self.val_pairs)
        chunks = [
            (which, places[which][start : start + size])
            for which in (0, 1)
            for start in range(0, len(places[which]), size)
        ]
        mine = distributed.share(len(chunks))
        total = sum(len(chunks[number][1]) for number in mine)
        done = 0
        was_training = model.training
        model.eval()
        scored: list[tuple[int, torch.Tensor]] = []
        try:
            for number in mine:
                which, indices = chunks[number]
                pairs = [splits[which][int(i)] for i in indices]
                scored.append((number, self._score(model, pairs, context)))
                done += len(indices)
                emit(
                    on_event,
                    "progress",
                    self.name,
                    task="reference log-probs",
                    done=done,
                    total=total,
                    unit="pairs",
                )
        finally:
            model.train(was_training)
        results = [torch.full((len(pairs), 2), math.nan) for pairs in splits]
        for number, scores in distributed.gather_lists(scored):
            which, indices = chunks[number]
            results[which][torch.from_numpy(indices)] = scores
        self.reference_train, self.reference_val = results

    def _score(
        self,
        model: torch.nn.Module,
        pairs: Sequence[PreferencePair],
        context: Callable[[], AbstractContextManager[Any]],
    ) -> torch.Tensor:
        """(n, 2) summed reply log-probs, chosen then rejected, on the CPU."""
        ids, mask = pad_pairs(pairs, self.pad_id)
        device = next(model.parameters()).device
        with context():
            logps = sequence_logps(model, ids.to(device), mask.to(device)).float().cpu()
        return torch.stack((logps[: len(pairs)], logps[len(pairs) :]), dim=1)

    def _require_reference(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.reference_train is None or self.reference_val is None:
            raise RuntimeError("DpoStage.cache_reference(model) must run before training")
        return self.reference_train, self.reference_val

    # ------------------------------------------------------------------------------ batches

    def next_batch(self, num_sequences: int) -> Batch:
        """The next `num_sequences` pairs (2 x that many sequences)."""
        reference, _ = self._require_reference()
        indices = self.order.take(num_sequences)
        ids, mask = pad_pairs([self.train_pairs[i] for i in indices], self.pad_id)
        index = torch.tensor(indices, dtype=torch.long)
        drawn = reference[index]
        if drawn.isnan().any():
            raise RuntimeError(
                f"DPO drew more than the {self.reference_pairs} pairs its reference was scored for"
            )
        return {"ids": ids, "mask": mask, "pair_index": index, "reference": drawn}

    def count_tokens(self, batch: Batch) -> int:
        """Reply tokens scored in the batch (both replies): throughput and --max-tokens."""
        return int(batch["mask"].sum())

    def loss_normaliser(self, batch: Batch) -> int:
        """Pairs in the batch: the Trainer divides by this, so a step averages per pair."""
        return int(batch["pair_index"].shape[0])

    def pair_loss(
        self, model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, reference: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`dpo_loss` of a padded batch (chosen rows first) against its (n, 2) reference."""
        pairs = reference.shape[0]
        # Through DDP's forward when the Trainer trains under several processes.
        logps = distributed.forward_through(model, sequence_logps, ids, mask)
        return dpo_loss(
            logps[:pairs],
            logps[pairs:],
            reference[:, 0].to(logps),
            reference[:, 1].to(logps),
            self.beta,
            self.label_smoothing,
        )

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        losses, chosen, rejected = self.pair_loss(
            model, batch["ids"], batch["mask"], batch["reference"]
        )
        return losses.sum(), preference_metrics(chosen, rejected)

    # ------------------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def preference_eval(self, model: torch.nn.Module) -> dict[str, float]:
        """Mean DPO loss (`val_loss`) and the preference metrics over the held-out pairs."""
        _, reference = self._require_reference()
        device = next(model.parameters()).device
        losses, chosen, rejected = [], [], []
        size = max(1, self.eval_batch)
        for start in range(0, len(self.val_pairs), size):
            ids, mask = pad_pairs(self.val_pairs[start : start + size], self.pad_id)
            loss, chosen_reward, rejected_reward = self.pair_loss(
                model, ids.to(device), mask.to(device), reference[start : start + size].to(device)
            )
            losses.append(loss.float().cpu())
            chosen.append(chosen_reward.float().cpu())
            rejected.append(rejected_reward.float().cpu())
        metrics = preference_metrics(torch.cat(chosen), torch.cat(rejected))
        result = {"val_loss": round(float(torch.cat(losses).mean()), 5)}
        result.update({key: round(value, 5) for key, value in metrics.items()})
        return result

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        gpt = cast(GPT, model)  # DPO trains a GPT (LoRA adapts its layers in place)
        records, per_family = self.exact_match_records, self.exact_match_per_family
        held_out = held_out_exact_match(gpt, self.tokenizer, records, per_family)
        return {**self.preference_eval(model), **held_out}

    # ------------------------------------------------------------------------------ position

    def _reference_mean(self, pairs: int) -> list[float]:
        """Mean chosen and rejected reference log-probs of the first `pairs` scored pairs."""
        assert self.reference_train is not None
        first = torch.from_numpy(self.order.first_epoch()[:pairs])
        return [float(v) for v in self.reference_train[first].double().mean(0)]

    def extra_state(self) -> dict[str, Any]:
        """A summary of the cached reference, so a resume can tell it was recomputed faithfully."""
        if self.reference_train is None:
            return {}
        return {
            "reference_mean": self._reference_mean(self.reference_pairs),
            "reference_pairs": self.reference_pairs,
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Refuse a resume whose reference differs from the run's: compared over the pairs both
        scored (a checkpoint from before `reference_pairs` scored every pair)."""
        saved = state.get("reference_mean")
        saved_pairs = int(state.get("reference_pairs", len(self.train_pairs)))
        if saved is None or self.reference_train is None or saved_pairs > self.reference_pairs:
            return  # this run scores fewer pairs (a shorter max_steps): nothing to compare
        now = self._reference_mean(saved_pairs)
        if any(
            not math.isclose(a, b, rel_tol=_REFERENCE_TOLERANCE, abs_tol=_REFERENCE_TOLERANCE)
            for a, b in zip(saved, now, strict=True)
        ):
            raise UserError(
                "the reference model differs from the one this run started from (mean reference "
                f"log-probs {saved[0]:.4f}/{saved[1]:.4f} then, {now[0]:.4f}/{now[1]:.4f} now): "
                "was the parent run changed? Resume from the same parent, or start over with "
                "--overwrite"
            )


def run_dpo(
    config: Config, spec: RunSpec, inputs: FinetuneInputs, on_event: EventCallback | None = None
) -> dict[str, Any]:
    """Preference-tune (or resume) a DPO run in `spec.run_dir`; returns the Trainer's summary.

    The reference is the starting policy (the parent, adapters included), scored once before the
    Trainer restores any checkpoint, so only one model is ever in memory.
    """
    setup = start_finetune(config, spec, inputs, "dpo", on_event)
    train, tokenizer, settings = setup.train, setup.tokenizer, config.dpo
    train_records, val_records = train_and_val_records("dpo", inputs, config)
    context = config.model.context_length
    train_pairs, train_stats = build_pairs(
        train_records, tokenizer, context, settings.max_prompt_tokens
    )
    val_pairs, val_stats = build_pairs(val_records, tokenizer, context, settings.max_prompt_tokens)
    emit(on_event, "note", "dpo", message=f"training: {train_stats.describe()}")
    emit(on_event, "note", "dpo", message=f"validation: {val_stats.describe()}")
    micro_batch, governor_messages = fit_memory(
        config,
        tokenizer.vocab_size,
        setup.precision.dtype_name,
        16 * (train_stats.tokens + val_stats.tokens),
        on_event,
        measure_baseline=True,
        stage="dpo",
        trainable_params=trainable_parameters(setup.model),
        sequences_per_example=2,
        # Batches are padded to their longest sequence, never to the context length.
        seq_len=forward_length([*train_pairs, *val_pairs]),
    )
    spec.events.extend({"event": "governor", "message": m} for m in governor_messages)
    # Exact match on the held-out instructions shows whether preference tuning kept the skills.
    exact_match_records = (
        [r for r in load_sft_records(None, "val", config) if r.get("task")]
        if not inputs.data
        else []
    )
    stage = DpoStage(
        train_pairs,
        val_pairs,
        seq_len=context,
        seed=train.seed,
        pad_id=tokenizer.pad_id,
        beta=settings.beta,
        label_smoothing=settings.label_smoothing,
        eval_pairs=train.eval_batches * train.micro_batch_size,
        tokenizer=tokenizer,
        exact_match_records=exact_match_records,
        exact_match_per_family=settings.exact_match_per_family,
        eval_batch=min(EVAL_BATCH, micro_batch),
    )
    steps = train.max_steps
    stage.cache_reference(
        setup.model,
        batch_pairs=micro_batch,
        pairs_drawn=None if steps is None else steps * train.global_batch_size,
        autocast=lambda: autocast_context(setup.precision, setup.device),
        on_event=on_event,
    )
    return finish_finetune(config, spec, inputs, setup, stage, micro_batch, on_event)
