"""RLHF on the one Trainer: PPO (policy + value head) and GRPO (groups, no value model).

The stage turns reinforcement learning into what the Trainer already runs, optimizer steps:

- An *iteration* samples responses to `rollout_batch_size` prompts with the KV cache (GRPO: G per
  prompt), scores them (`metrics.rewards.RewardSource`: a reward model trained here by
  `stages.reward`, the rule checker, or both) and computes, without gradients, everything the
  losses compare against: the sampling policy's log-probabilities, the frozen reference's, values
  and advantages (PPO: KL-penalised rewards and GAE; GRPO: group-normalised rewards), in the
  precision the losses train in (`autocast`; sampling keeps the decoder's). That happens in
  `before_step`, when the buffer is used up. Under torchrun each rank does its share of the
  prompts and every rank then holds the whole rollout (`RlStage.rollout`).
- The buffer is then consumed in `ppo_epochs` shuffled passes of `global_batch_size` responses
  per optimizer step, so one iteration is `steps_per_iteration` Trainer steps; the Trainer counts
  `max_steps`, `eval_every`, `save_every` and `log_every` in iterations for such a stage, and
  each train row is one iteration's means (`reward_mean`, raw, before normalisation; `kl`,
  per response, summed over its tokens; `kl_coef`; `entropy`, `value_loss`, `clip_frac`,
  `response_len`).
- Everything an iteration decides is a pure function of (seed, iteration) and the weights, and
  the stage checkpoints its buffer, running reward statistics and KL controller, so a killed run
  resumes exactly where it stopped.

Tensors of one batch follow `objectives.rl`: (B, R) over response tokens only, right-padded; the
model reads the whole right-padded sequence (prompt + response) and the response positions are
gathered from it (`objectives.policy.response_outputs`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from minigpt_cli.config.schema import Config
from minigpt_cli.engine.core.events import EventCallback, emit
from minigpt_cli.engine.core.seeding import seed_everything, tensor_from_json, tensor_to_json
from minigpt_cli.engine.data import chat_template
from minigpt_cli.engine.data.tokenizer import Tokenizer
from minigpt_cli.engine.hardware.device import autocast_context
from minigpt_cli.engine.inference.generation import SamplingSettings
from minigpt_cli.engine.inference.rollouts import pack_responses, sample_groups
from minigpt_cli.engine.metrics.exact_match import (
    AnswerResult,
    score_answers,
    summarise_exact_match,
)
from minigpt_cli.engine.metrics.rewards import RewardSource
from minigpt_cli.engine.model.heads import PolicyWithValue, policy_of
from minigpt_cli.engine.objectives import rl
from minigpt_cli.engine.objectives.policy import Reference, response_outputs
from minigpt_cli.engine.resources.memory import fit_memory
from minigpt_cli.engine.runs.files import VALUE_HEAD_FILE, load_tensors
from minigpt_cli.engine.runs.load import language_model_files, load_language_model_files
from minigpt_cli.engine.stages.reward import run_reward
from minigpt_cli.engine.training import distributed
from minigpt_cli.engine.training.finetune import (
    FinetuneInputs,
    finish_finetune,
    start_finetune,
    train_and_val_records,
    trainable_parameters,
)
from minigpt_cli.engine.training.run_spec import RunSpec
from minigpt_cli.engine.training.stage import EVAL_BATCH, Batch, StageBase, WeightFiles
from minigpt_cli.errors import UserError

# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------


@dataclass
class RlSettings:
    """The `[rlhf]` knobs the stage needs (see config.schema.RlhfConfig for their meaning)."""

    algo: str = "ppo"
    rollout_batch_size: int = 16
    num_generations: int = 8
    ppo_epochs: int = 2  # `RlhfConfig.passes()`: the algorithm's default when unset
    max_new_tokens: int = 32
    temperature: float = 1.0
    kl_coef: float | None = None  # None: DEFAULT_KL_COEF[algo]
    target_kl: float | None = 0.1
    kl_control: str = "ceiling"
    kl_horizon: int = 64
    gamma: float = 1.0
    lam: float = 0.95
    clip_eps: float = 0.2
    value_clip_eps: float = 0.2
    vf_coef: float = 0.1
    reward_clip: float | None = 5.0
    samples_every: int = 5
    eval_prompts: int = 200


# The KL coefficient when `kl_coef` is not given. PPO: where the adaptive controller starts
# (benchmarks/rlhf_kl.py: against the learned reward, 0.05 or 0.2 let the policy find what the
# reward model over-rewards within 40-60 iterations, exact match falling; from 1.0 the default
# target holds it over 300). GRPO: its loss's beta, TRL's scale, unchanged.
DEFAULT_KL_COEF = {"ppo": 1.0, "grpo": 0.05}


class RlStage(StageBase):
    """PPO or GRPO iterations as Trainer steps (see the module docstring)."""

    name = "rlhf"
    evaluate_at_start = True  # held-out scores before any update: the "before" of every figure

    def __init__(
        self,
        train_records: Sequence[dict],
        val_records: Sequence[dict],
        *,
        tokenizer: Tokenizer,
        reward: RewardSource,
        reference: Reference,
        settings: RlSettings,
        seed: int,
        global_batch_size: int,
        seq_len: int,
        on_sample: Callable[[str], None] | None = None,
        eval_batch: int = EVAL_BATCH,
        autocast: Callable[[], AbstractContextManager[Any]] | None = None,
    ) -> None:
        if not train_records:
            raise UserError("no RLHF training prompts")
        self.train_records = list(train_records)
        self.val_records = list(val_records)
        self.tokenizer = tokenizer
        self.reward = reward
        self.reference = reference
        self.settings = settings
        self.seed = seed
        self.on_sample = on_sample
        self.autocast = autocast or nullcontext  # the Trainer's precision context, for scoring
        samples = settings.num_generations if settings.algo == "grpo" else 1
        if settings.algo == "grpo" and samples < 2:
            raise UserError("GRPO needs --num-generations of at least 2 (a group to compare)")
        self.samples_per_prompt = samples
        self.rollout_size = settings.rollout_batch_size * samples
        passes = self.rollout_size * settings.ppo_epochs
        if passes % global_batch_size:
            raise UserError(
                f"a rollout of {self.rollout_size} responses x {settings.ppo_epochs} epochs is not "
                f"a whole number of {global_batch_size}-response optimizer steps: choose "
                "rlhf.rollout_batch_size, num_generations and global_batch_size to divide"
            )
        self.steps_per_iteration = passes // global_batch_size
        # GRPO's one step per rollout uses the weights that sampled it: the loss's own forward
        # has the sampling policy's log-probs (PPO needs them earlier, for rewards and GAE).
        self.on_policy = settings.algo == "grpo" and self.steps_per_iteration == 1
        self.seq_len = seq_len
        room = seq_len - settings.max_new_tokens  # a prompt keeps its end (the question)
        if room < 2:
            raise UserError(
                f"rlhf.max_new_tokens ({settings.max_new_tokens}) leaves no room for a prompt in "
                f"the {seq_len}-token context"
            )
        self.prompts = [
            chat_template.prompt_ids(r["prompt_messages"], tokenizer)[-room:]
            for r in self.train_records
        ]
        # kl_coef 0 switches the penalty off whatever the target (a multiplicative controller
        # could never raise it from 0); target_kl 0 or None keeps kl_coef fixed; GRPO's
        # coefficient is its loss's fixed beta (its KL is not a reward to steer).
        kl_coef = settings.kl_coef
        if kl_coef is None:
            kl_coef = DEFAULT_KL_COEF[settings.algo]
        self.kl: rl.FixedKLController | rl.AdaptiveKLController = rl.FixedKLController(kl_coef)
        if settings.algo == "ppo" and settings.target_kl and kl_coef > 0:
            adaptive = (
                rl.CeilingKLController
                if settings.kl_control == "ceiling"
                else rl.AdaptiveKLController
            )
            self.kl = adaptive(kl_coef, settings.target_kl, settings.kl_horizon)
        self.score_moments = rl.RunningMoments()
        self.iteration = 0
        self.prompt_epoch = 0
        self.prompt_cursor = 0
        self.buffer: dict[str, torch.Tensor] | None = None
        self.buffer_order = torch.empty(0, dtype=torch.long)
        self.buffer_cursor = 0
        self.rollout_stats: dict[str, float] = {}
        self.mean_loss_tokens = float(settings.max_new_tokens)
        self.eval_batch = eval_batch

    # ------------------------------------------------------------------------------ rollouts

    def _prompt_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 7, epoch]).permutation(len(self.prompts))

    def _next_prompts(self) -> list[int]:
        picked = []
        order = self._prompt_order(self.prompt_epoch)
        for _ in range(self.settings.rollout_batch_size):
            if self.prompt_cursor >= len(order):
                self.prompt_epoch += 1
                self.prompt_cursor = 0
                order = self._prompt_order(self.prompt_epoch)
            picked.append(int(order[self.prompt_cursor]))
            self.prompt_cursor += 1
        return picked

    def _sample(
        self, model: nn.Module, indices: list[int], numbers: range
    ) -> list[tuple[int, list[int]]]:
        """(record index, response ids incl. end-of-turn when it stopped) per response to the
        prompts `numbers` of `indices`, decoded in one batch; prompt `number` of the iteration
        draws from its own seed, as a prompt-at-a-time rollout would, whichever rank decodes it."""
        sampling = SamplingSettings(
            max_new_tokens=self.settings.max_new_tokens,
            temperature=self.settings.temperature,
            top_k=None,
            top_p=None,
            stop_ids=chat_template.stop_token_ids(self.tokenizer),
        )
        seeds = [
            int(np.random.default_rng([self.seed, self.iteration, number]).integers(2**31))
            for number in numbers
        ]
        picked = [indices[number] for number in numbers]
        prompts = [self.prompts[index] for index in picked]
        groups = sample_groups(policy_of(model), prompts, sampling, self.samples_per_prompt, seeds)
        responses = []
        for index, group in zip(picked, groups, strict=True):
            for tokens in group:
                if len(tokens) < self.settings.max_new_tokens:
                    tokens = [*tokens, self.tokenizer.eot_id]  # the stop is an action too
                responses.append((index, tokens or [self.tokenizer.eot_id]))
        return responses

    @torch.no_grad()
    def rollout(self, model: nn.Module) -> None:
        """Sample, score and prepare one iteration's buffer (no gradients, eval mode).

        Under several processes each rank samples, scores and reads the log-probabilities of its
        share of the prompts (a GRPO group stays on one rank); every rank gathers the whole
        rollout, in one process's order, and computes what is global from it (reward
        normalisation, advantages and whitening, the KL controller's KL, the logged means), so
        all hold the same buffer and the Trainer trains each rank's share of its batches."""
        was_training = model.training
        model.eval()
        try:
            indices = self._next_prompts()
            numbers = distributed.share(len(indices))
            own = self._sample(model, indices, numbers)
            own_texts = [self.tokenizer.decode(r) for _, r in own]
            with self.autocast():
                own_terms = self.reward.terms(
                    [self.train_records[i] for i, _ in own],
                    [[*self.prompts[i], *r] for i, r in own],
                    own_texts,
                )
            responses = distributed.gather_lists(own)
            texts = distributed.gather_lists(own_texts)
            terms = {name: distributed.gather_rows(values) for name, values in own_terms.items()}
            raw = self.reward.combine(terms)
            batch = pack_responses(self.prompts, responses, self.tokenizer.pad_id)
            # This rank's rows of the whole (padded) batch: its prompts' responses.
            group = self.samples_per_prompt
            rows = slice(numbers.start * group, numbers.stop * group)
            own_batch = {key: value[rows] for key, value in batch.items()}
            own_logps = own_values = own_entropy = None
            with self.autocast():
                if not self.on_policy:
                    own_logps, own_values, own_entropy = response_outputs(
                        model, own_batch, with_values=True, with_entropy=True
                    )
                own_ref_logps = self.reference.logps(own_batch)
        finally:
            model.train(was_training)
        mask, kl_stats = batch["mask"], {}
        batch["ref_logps"] = ref_logps = distributed.gather_rows(own_ref_logps)
        if own_logps is not None and own_entropy is not None:  # the entropy: over all ranks
            batch["old_logps"] = old_logps = distributed.gather_rows(own_logps)
            values = None if own_values is None else distributed.gather_rows(own_values)
            own_tokens = float(own_batch["mask"].sum())
            kl_stats = {
                "kl": float(rl.response_kl(old_logps, ref_logps, mask).mean()),
                "entropy": distributed.weighted_mean(float(own_entropy), own_tokens),
            }
        if self.settings.algo == "grpo":
            batch["advantages"] = rl.grpo_advantages(raw.float(), self.samples_per_prompt)
        else:
            scores = rl.normalise_and_clip(
                raw.float(), self.score_moments, self.settings.reward_clip
            )
            rewards = rl.kl_penalised_rewards(scores, old_logps, ref_logps, mask, self.kl.value)
            assert values is not None
            advantages, returns = rl.gae(
                rewards, values, mask, self.settings.gamma, self.settings.lam
            )
            batch.update(
                advantages=rl.masked_whiten(advantages, mask),
                returns=returns,
                old_values=values,
            )
            self.kl.update(kl_stats["kl"], self.rollout_size)
        lengths = mask.sum(dim=1).float()
        self.rollout_stats = {
            "reward_mean": float(raw.float().mean()),
            **kl_stats,
            "response_len": float(lengths.mean()),
            "kl_coef": float(self.kl.value),
        }
        for name, values_of_term in terms.items():
            if len(terms) > 1:
                self.rollout_stats[f"reward_{name}"] = float(values_of_term.float().mean())
        self.buffer = batch
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.iteration)
        self.buffer_order = torch.cat(
            [
                torch.randperm(self.rollout_size, generator=generator)
                for _ in range(self.settings.ppo_epochs)
            ]
        )
        self.buffer_cursor = 0
        self.iteration += 1
        every = self.settings.samples_every
        if self.on_sample is not None and every and (self.iteration - 1) % every == 0:
            first = self.train_records[responses[0][0]]
            prompt = first["prompt_messages"][-1]["content"].replace("\n", " ")[:80]
            sample = texts[0].strip().replace("\n", " ")[:120]
            self.on_sample(
                f"iteration {self.iteration}: {prompt!r} -> {sample!r} (reward {float(raw[0]):.3f})"
            )

    # ------------------------------------------------------------------------------ Stage protocol

    def before_step(self, model: nn.Module, step: int) -> None:
        if self.buffer is None or self.buffer_cursor >= len(self.buffer_order):
            self.rollout(model)

    def next_batch(self, num_sequences: int) -> Batch:
        assert self.buffer is not None, "before_step fills the buffer"
        rows = self.buffer_order[self.buffer_cursor : self.buffer_cursor + num_sequences]
        self.buffer_cursor += num_sequences
        batch = {key: value[rows] for key, value in self.buffer.items()}
        # Trim padding the selected rows do not need.
        width = int(batch["positions"].max()) + 1
        batch["ids"] = batch["ids"][:, :width]
        longest = int(batch["mask"].sum(dim=1).max())
        for key, value in batch.items():
            if key != "ids" and value.dim() == 2:
                batch[key] = value[:, :longest]
        return batch

    def count_tokens(self, batch: Batch) -> int:
        return int(batch["mask"].sum())

    def loss_normaliser(self, batch: Batch) -> int:
        """PPO averages over response tokens, GRPO over sequences (see objectives.rl)."""
        if self.settings.algo == "grpo":
            return int(batch["mask"].shape[0])
        return int(batch["mask"].sum())

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        mask = batch["mask"]
        on_policy = "old_logps" not in batch
        # Through DDP's forward when the Trainer trains under several processes.
        logps, values, entropy = distributed.forward_through(
            model, response_outputs, batch, with_values=True, with_entropy=on_policy
        )
        if self.settings.algo == "grpo":
            # On-policy: the sampling policy is this one (the ratio is exactly 1), and each of the
            # step's equal micro-batches, which the Trainer averages, gives its share of the KL
            # per response and of the entropy per token over all the rollout's tokens.
            old_logps = logps.detach() if on_policy else batch["old_logps"]
            loss, clip_frac, _ = rl.grpo_loss(
                logps,
                old_logps,
                batch["ref_logps"],
                batch["advantages"],
                mask,
                self.settings.clip_eps,
                self.kl.value,
            )
            metrics = {"clip_frac": float(clip_frac)}
            if on_policy:
                kl = rl.response_kl(old_logps, batch["ref_logps"], mask)
                metrics["kl"] = float(kl.mean())
                assert entropy is not None and self.buffer is not None
                share = float(mask.sum()) * self.rollout_size / mask.shape[0]
                metrics["entropy"] = float(entropy) * share / float(self.buffer["mask"].sum())
            return loss * mask.shape[0], {**self.rollout_stats, **metrics}
        policy_loss, clip_frac, approx_kl = rl.ppo_policy_loss(
            logps, batch["old_logps"], batch["advantages"], mask, self.settings.clip_eps
        )
        assert values is not None
        value_loss = rl.ppo_value_loss(
            values, batch["old_values"], batch["returns"], mask, self.settings.value_clip_eps
        )
        loss = policy_loss + self.settings.vf_coef * value_loss
        metrics = {
            "value_loss": float(value_loss.detach()),
            "clip_frac": float(clip_frac),
            "approx_kl": float(approx_kl),
        }
        return loss * mask.sum(), {**self.rollout_stats, **metrics}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Greedy answers to held-out prompts: reward, length, distinct-2, exact match."""
        policy = policy_of(model)
        records = self.val_records[: self.settings.eval_prompts]
        if not records:
            return {}
        results = score_answers(policy, self.tokenizer, records, per_family=None)
        responses = [self.tokenizer.encode(r.prediction) for r in results]
        sequences = [
            [
                *chat_template.prompt_ids(r.prompt_messages, self.tokenizer),
                *ids,
                self.tokenizer.eot_id,
            ]
            for r, ids in zip(results, responses, strict=True)
        ]
        ordered = [self._record_of(r) for r in results]
        terms = self.reward.terms(ordered, sequences, [r.prediction for r in results])
        metrics = {
            "reward_mean": round(float(self.reward.combine(terms, update=False).float().mean()), 5),
            "response_len": round(float(np.mean([len(x) + 1 for x in responses])), 3),
            "distinct_2": round(rl.distinct_n(responses, 2), 5),
        }
        if all(r.get("answer") is not None for r in ordered):
            metrics.update(summarise_exact_match(results))
        return metrics

    def _record_of(self, result: AnswerResult) -> dict:
        return {"prompt_messages": result.prompt_messages, "answer": result.reference}

    def epochs_done(self) -> float:
        return self.prompt_epoch + self.prompt_cursor / len(self.prompts)

    def sequences_per_epoch(self) -> int:
        return len(self.prompts) * self.samples_per_prompt * self.settings.ppo_epochs

    def data_state(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration,
            "prompt_epoch": self.prompt_epoch,
            "prompt_cursor": self.prompt_cursor,
            "buffer_cursor": self.buffer_cursor,
            "prompts": len(self.prompts),
        }

    def load_data_state(self, state: dict[str, Any]) -> None:
        if int(state.get("prompts", len(self.prompts))) != len(self.prompts):
            raise UserError(
                "the RLHF prompts changed since the checkpoint: resume with the same --data, or "
                "start over with --overwrite"
            )
        self.iteration = int(state["iteration"])
        self.prompt_epoch = int(state["prompt_epoch"])
        self.prompt_cursor = int(state["prompt_cursor"])
        self.buffer_cursor = int(state["buffer_cursor"])

    def extra_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "kl": self.kl.state_dict(),
            "score_moments": self.score_moments.state_dict(),
            "reward_moments": {k: m.state_dict() for k, m in self.reward.moments.items()},
            "rollout_stats": self.rollout_stats,
        }
        if self.buffer is not None and self.buffer_cursor < len(self.buffer_order):
            # Mid-iteration: the rollout came from weights that no longer exist; keep it.
            state["buffer"] = {k: tensor_to_json(v) for k, v in self.buffer.items()}
            state["buffer_order"] = tensor_to_json(self.buffer_order)
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.kl.load_state_dict(state["kl"])
        self.score_moments.load_state_dict(state["score_moments"])
        for name, moments in state.get("reward_moments", {}).items():
            self.reward.moments.setdefault(name, rl.RunningMoments()).load_state_dict(moments)
        self.rollout_stats = dict(state.get("rollout_stats", {}))
        if "buffer" in state:
            self.buffer = {k: tensor_from_json(v) for k, v in state["buffer"].items()}
            self.buffer_order = tensor_from_json(state["buffer_order"])
        else:
            self.buffer = None
            self.buffer_order = torch.empty(0, dtype=torch.long)

    def weight_files(self, model: nn.Module) -> WeightFiles:
        """PPO's model checkpoints the policy's own file(s) and the value head beside them, so the
        run's `model.safetensors` (or adapter) stays a plain language model; GRPO's model is the
        policy alone."""
        if not isinstance(model, PolicyWithValue):
            return super().weight_files(model)
        head = {"value_head.weight": model.value_head.weight.detach()}
        return {
            **language_model_files(model.policy),
            VALUE_HEAD_FILE: (head, {"format": "minigpt-value-head"}),
        }

    def load_weight_files(self, model: nn.Module, folder: Path) -> None:
        """Restore what `weight_files` wrote (resume)."""
        if not isinstance(model, PolicyWithValue):
            super().load_weight_files(model, folder)
            return
        head = load_tensors(folder / VALUE_HEAD_FILE)
        with torch.no_grad():
            model.value_head.weight.copy_(head["value_head.weight"])
        load_language_model_files(model.policy, folder)


# ----------------------------------------------------------------------------------------------
# The runs
# ----------------------------------------------------------------------------------------------


def rl_settings(config: Config) -> RlSettings:
    """The stage's knobs from the `[rlhf]` section."""
    section = config.rlhf
    knobs = {name: getattr(section, name) for name in RlSettings.__dataclass_fields__}
    return RlSettings(**{**knobs, "algo": section.algorithm, "ppo_epochs": section.passes()})


@dataclass
class RlhfInputs(FinetuneInputs):
    """A fine-tuning run's inputs plus where the reward model comes from."""

    preference_data: list[Path] = field(default_factory=list)  # the reward model's pairs
    reward_model: Path | None = None  # a reward run to reuse instead of training one


def run_rlhf(
    config: Config, spec: RunSpec, inputs: RlhfInputs, on_event: EventCallback | None = None
) -> dict[str, Any]:
    """Train (or resume) an RLHF run: the reward model first when needed, then PPO or GRPO."""
    setup = start_finetune(config, spec, inputs, "rlhf", on_event)
    settings = rl_settings(config)
    # Before the reward model trains (the CLI asked before the ranks met; a library caller here).
    distributed.check_prompt_share(settings.rollout_batch_size, distributed.world_size())
    reward_model = None
    if config.rlhf.reward in ("model", "both"):
        reward_model, source = run_reward(
            config,
            spec,
            setup,
            parent=inputs.from_run,
            preference_data=inputs.preference_data,
            reuse=inputs.reward_model,
            on_event=on_event,
        )
        reward_model.eval().requires_grad_(False)
        spec.sources["reward_model"] = source
    # The policy's training starts from the seed whether the reward model was just trained,
    # resumed, or reused (a run killed before the policy's first checkpoint resumes by reusing
    # it): the RNG state its checkpoints record does not depend on which.
    seed_everything(setup.train.seed)
    reward = RewardSource(config.rlhf.reward, reward_model, setup.tokenizer.pad_id)
    train_records, val_records = train_and_val_records("rlhf", inputs, config)
    policy = policy_of(setup.model)  # start_finetune's policy itself (PPO wraps it below)
    reference = Reference(policy)  # the starting weights: the Trainer restores a resume later
    if settings.algo == "ppo":
        setup.model = PolicyWithValue(policy).to(setup.device)
    train = setup.train
    frozen = reference.extra_parameters + (
        sum(p.numel() for p in reward_model.parameters()) if reward_model is not None else 0
    )
    longest_prompt = max(
        len(chat_template.prompt_ids(r["prompt_messages"], setup.tokenizer)) for r in train_records
    )
    micro_batch, messages = fit_memory(
        config,
        setup.tokenizer.vocab_size,
        setup.precision.dtype_name,
        0,
        on_event,
        measure_baseline=True,
        stage="rlhf",
        trainable_params=trainable_parameters(policy),  # (+ a value head of n_embd numbers)
        extra_frozen_params=frozen,
        seq_len=min(config.model.context_length, longest_prompt + settings.max_new_tokens),
    )
    spec.events.extend({"event": "governor", "message": m} for m in messages)
    stage = RlStage(
        train_records,
        val_records,
        tokenizer=setup.tokenizer,
        reward=reward,
        reference=reference,
        settings=settings,
        seed=train.seed,
        global_batch_size=train.global_batch_size,
        seq_len=config.model.context_length,
        on_sample=lambda message: emit(on_event, "note", "rlhf", message=message),
        eval_batch=micro_batch,
        autocast=lambda: autocast_context(setup.precision, setup.device),
    )
    return finish_finetune(config, spec, inputs, setup, stage, micro_batch, on_event)
