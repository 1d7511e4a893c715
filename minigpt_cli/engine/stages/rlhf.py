"""RLHF on the one Trainer: PPO (policy + value head) and GRPO (groups, no value model).

The stage turns reinforcement learning into what the Trainer already runs, a sequence of optimizer
steps over batches:

- An *iteration* samples responses to `rollout_batch_size` prompts with the KV cache (GRPO: G per
  prompt), scores them (`RewardFunction`: a reward model trained here, the rule checker, or both)
  and computes, without gradients, everything the losses compare against: the sampling policy's
  log-probabilities, the frozen reference's, values and advantages (PPO: KL-penalised rewards and
  GAE; GRPO: group-normalised rewards). That happens in `before_step`, when the buffer is used up.
- The buffer is then consumed in `ppo_epochs` shuffled passes of `global_batch_size` responses
  per optimizer step, so one iteration is `steps_per_iteration` Trainer steps; the Trainer counts
  `max_steps`, `eval_every`, `save_every` and `log_every` in iterations for such a stage, and
  each train row is one iteration's means (`reward_mean`, raw, before normalisation; `kl`,
  `entropy`, `value_loss`, `clip_frac`, `response_len`).
- Everything an iteration decides is a pure function of (seed, iteration) and the weights, and
  the stage checkpoints its buffer, running reward statistics and KL controller, so a killed run
  resumes exactly where it stopped.

Tensors of one batch follow `engine.rl`: (B, R) over response tokens only, right-padded; the model
reads the whole right-padded sequence (prompt + response) and the response positions are
gathered from it.
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from minigpt_cli.engine.data import chat_template
from minigpt_cli.engine.objectives import rl
from minigpt_cli.engine.training.trainer import EVAL_BATCH, Batch, StageBase, WeightFiles
from minigpt_cli.errors import UserError

# Files a PPO run adds beside the policy's: the value head and its metadata.
VALUE_HEAD_FILE = "value_head.safetensors"


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


class PolicyWithValue(nn.Module):
    """The PPO model: the policy GPT plus a scalar value head on its final hidden states.

    Sharing the trunk keeps one model in memory (early TRL's `ValueHead` design) instead of a
    second network of the policy's size. The run's `model.safetensors` (or adapter) stays a plain
    language model that generate/chat/eval load; the head is saved beside it.
    """

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self.policy = policy
        self.value_head = nn.Linear(policy.config.n_embd, 1, bias=False)
        nn.init.zeros_(self.value_head.weight)  # values start at 0: returns are learned from there

    @property
    def config(self) -> Any:
        return self.policy.config

    @property
    def vocab_size(self) -> int:
        return int(self.policy.vocab_size)


def policy_of(model: nn.Module) -> nn.Module:
    """The language model inside a PPO wrapper (or the model itself for GRPO)."""
    return model.policy if isinstance(model, PolicyWithValue) else model


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run a LoRA model as its base (adapter scale 0): the reference policy for free."""
    from minigpt_cli.engine.model.lora import LoRALinear

    modules = [m for m in model.modules() if isinstance(m, LoRALinear)]
    scales = [m.scaling for m in modules]
    for module in modules:
        module.scaling = 0.0
    try:
        yield
    finally:
        for module, scale in zip(modules, scales, strict=True):
            module.scaling = scale


class Reference:
    """The frozen starting policy the KL penalty measures against, in its cheapest form.

    A LoRA policy's reference is the same network with its adapters switched off (no copy at all);
    a fully trained policy gets a frozen copy of its starting weights.
    """

    def __init__(self, policy: nn.Module) -> None:
        from minigpt_cli.engine.model.lora import has_lora

        self.shared = has_lora(policy)
        self.policy = policy
        self.copy: nn.Module | None = None
        if not self.shared:
            import copy

            self.copy = copy.deepcopy(policy).eval().requires_grad_(False)

    @property
    def extra_parameters(self) -> int:
        """Parameters held beyond the policy's (for the memory estimate)."""
        return 0 if self.copy is None else sum(p.numel() for p in self.copy.parameters())

    @torch.no_grad()
    def logps(self, batch: Batch) -> torch.Tensor:
        if self.copy is not None:
            return response_outputs(self.copy, batch)[0]
        was_training = self.policy.training
        self.policy.eval()
        try:
            with adapters_disabled(self.policy):
                return response_outputs(self.policy, batch)[0]
        finally:
            self.policy.train(was_training)


def response_outputs(
    model: nn.Module, batch: Batch, *, with_values: bool = False, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(logps, values, entropy) of the response tokens of a batch, each (B, R).

    `batch["ids"]` (B, L) holds prompt + response + padding, `batch["positions"]` (B, R) the
    index in `ids` of each response token. Only the response positions go through the output head.
    """
    policy = policy_of(model)
    ids, positions = batch["ids"], batch["positions"]
    hidden = policy.hidden_states(ids[:, :-1])
    # The token at position p is predicted from the hidden state at p - 1.
    index = (positions - 1).clamp(min=0)
    selected = hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    logits = policy.lm_head(selected).float()
    tokens = ids.gather(1, positions)
    logps = rl.logps_from_logits(logits, tokens)
    values = None
    if with_values and isinstance(model, PolicyWithValue):
        values = model.value_head(selected).squeeze(-1).float()
    entropy = None
    if with_entropy:
        entropy = rl.entropy_from_logits(logits, batch["mask"])
    return logps, values, entropy


# ----------------------------------------------------------------------------------------------
# Rewards
# ----------------------------------------------------------------------------------------------


RewardFunction = Callable[[list[dict], list[list[int]], list[str]], dict[str, torch.Tensor]]
"""(records, full sequences as ids, response texts) -> named (N,) score tensors."""


def rule_scores(records: Sequence[dict], responses: Sequence[str]) -> torch.Tensor:
    """1.0 where the response equals the record's answer after SFT's normalisation, else 0.0."""
    from minigpt_cli.engine.stages.sft import normalise_answer

    scores = []
    for record, response in zip(records, responses, strict=True):
        answer = record.get("answer")
        if answer is None:
            raise UserError(
                "the rule reward needs prompts with an 'answer' (use --reward model otherwise)"
            )
        scores.append(float(normalise_answer(response) == normalise_answer(str(answer))))
    return torch.tensor(scores)


@dataclass
class RewardSource:
    """How responses are judged: `kind` is model, rule or both (each term standardised)."""

    kind: str
    reward_model: nn.Module | None = None
    pad_id: int = 0
    moments: dict[str, rl.RunningMoments] = field(default_factory=dict)

    def terms(
        self, records: Sequence[dict], sequences: Sequence[list[int]], responses: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        """The raw scores per term, each (N,)."""
        from minigpt_cli.engine.stages.reward import score_texts

        terms: dict[str, torch.Tensor] = {}
        if self.kind in ("model", "both"):
            assert self.reward_model is not None
            # A long answer keeps its end (the response) within the model's context.
            context = self.reward_model.config.context_length
            clipped = [list(sequence[-context:]) for sequence in sequences]
            terms["model"] = score_texts(self.reward_model, clipped, pad_id=self.pad_id)
        if self.kind in ("rule", "both"):
            terms["rule"] = rule_scores(records, responses)
        return terms

    def combine(self, terms: dict[str, torch.Tensor], update: bool = True) -> torch.Tensor:
        """One raw reward per response: the term itself, or the sum of standardised terms."""
        if len(terms) == 1:
            return next(iter(terms.values()))
        total = torch.zeros_like(next(iter(terms.values())))
        for name, values in terms.items():
            moments = self.moments.setdefault(name, rl.RunningMoments())
            total += rl.normalise_and_clip(values, moments, None, update=update)
        return total


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------


@dataclass
class RlSettings:
    """The `[rlhf]` knobs the stage needs (see config.schema.RlhfConfig for their meaning)."""

    algo: str = "ppo"
    rollout_batch_size: int = 16
    num_generations: int = 4
    ppo_epochs: int = 2
    max_new_tokens: int = 32
    temperature: float = 1.0
    kl_coef: float = 0.05
    target_kl: float | None = None
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    clip_eps: float = 0.2
    value_clip_eps: float = 0.2
    vf_coef: float = 0.1
    reward_clip: float | None = 5.0
    samples_every: int = 5
    eval_prompts: int = 32


def _encode_tensor(tensor: torch.Tensor) -> dict[str, Any]:
    array = tensor.detach().cpu().contiguous().numpy()
    return {
        "dtype": str(array.dtype),
        "shape": list(array.shape),
        "data": base64.b64encode(array.tobytes()).decode(),
    }


def _decode_tensor(payload: dict[str, Any]) -> torch.Tensor:
    raw = base64.b64decode(payload["data"])
    array = np.frombuffer(raw, dtype=np.dtype(payload["dtype"])).reshape(payload["shape"])
    return torch.from_numpy(array.copy())


class RlStage(StageBase):
    """PPO or GRPO iterations as Trainer steps (see the module docstring)."""

    name = "rlhf"
    evaluate_at_start = True  # held-out scores before any update: the "before" of every figure

    def __init__(
        self,
        train_records: Sequence[dict],
        val_records: Sequence[dict],
        *,
        tokenizer: Any,
        reward: RewardSource,
        reference: Reference,
        settings: RlSettings,
        seed: int,
        global_batch_size: int,
        seq_len: int,
        on_sample: Callable[[str], None] | None = None,
        eval_batch: int = EVAL_BATCH,
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
        self.kl = (
            rl.AdaptiveKLController(settings.kl_coef, settings.target_kl, settings.kl_horizon)
            if settings.target_kl
            else rl.FixedKLController(settings.kl_coef)
        )
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

    def _sample(self, model: nn.Module, indices: list[int]) -> list[tuple[int, list[int]]]:
        """(record index, response ids incl. end-of-turn when it stopped) per sampled response."""
        from minigpt_cli.engine.inference.generation import SamplingSettings, generate_batch

        policy = policy_of(model)
        stops = chat_template.stop_token_ids(self.tokenizer)
        responses = []
        for number, index in enumerate(indices):
            prompt = self.prompts[index]
            sampling = SamplingSettings(
                max_new_tokens=self.settings.max_new_tokens,
                temperature=self.settings.temperature,
                top_k=None,
                top_p=None,
                stop_ids=stops,
                seed=int(
                    np.random.default_rng([self.seed, self.iteration, number]).integers(2**31)
                ),
            )
            for tokens in generate_batch(policy, prompt, sampling, self.samples_per_prompt):
                if len(tokens) < self.settings.max_new_tokens:
                    tokens = [*tokens, self.tokenizer.eot_id]  # the stop is an action too
                responses.append((index, tokens or [self.tokenizer.eot_id]))
        return responses

    def _pack(self, responses: list[tuple[int, list[int]]]) -> dict[str, torch.Tensor]:
        """Right-padded sequences and the positions of their response tokens."""
        rows, positions, masks = [], [], []
        width = max(len(self.prompts[i]) + len(r) for i, r in responses)
        longest = max(len(r) for _, r in responses)
        for index, response in responses:
            prompt = self.prompts[index]
            ids = [*prompt, *response] + [self.tokenizer.pad_id] * (
                width - len(prompt) - len(response)
            )
            rows.append(ids)
            span = list(range(len(prompt), len(prompt) + len(response)))
            pad = [span[-1]] * (longest - len(span))
            positions.append(span + pad)
            masks.append([True] * len(span) + [False] * len(pad))
        return {
            "ids": torch.tensor(rows, dtype=torch.long),
            "positions": torch.tensor(positions, dtype=torch.long),
            "mask": torch.tensor(masks, dtype=torch.bool),
            "record": torch.tensor([i for i, _ in responses], dtype=torch.long),
        }

    @torch.no_grad()
    def rollout(self, model: nn.Module) -> None:
        """Sample, score and prepare one iteration's buffer (no gradients, eval mode)."""
        was_training = model.training
        model.eval()
        try:
            indices = self._next_prompts()
            responses = self._sample(model, indices)
            batch = self._pack(responses)
            texts = [self.tokenizer.decode(r) for _, r in responses]
            records = [self.train_records[i] for i, _ in responses]
            sequences = [[*self.prompts[i], *r] for i, r in responses]
            terms = self.reward.terms(records, sequences, texts)
            raw = self.reward.combine(terms)
            old_logps, values, entropy = response_outputs(
                model, batch, with_values=True, with_entropy=True
            )
            ref_logps = self.reference.logps(batch)
        finally:
            model.train(was_training)
        mask = batch["mask"]
        kl_tokens = rl.per_token_kl(old_logps, ref_logps)
        kl_per_sequence = rl.masked_mean(kl_tokens, mask, dim=1)
        batch.update(old_logps=old_logps, ref_logps=ref_logps)
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
            self.kl.update(float(kl_per_sequence.mean()), self.rollout_size)
        lengths = mask.sum(dim=1).float()
        self.rollout_stats = {
            "reward_mean": float(raw.float().mean()),
            "kl": float(kl_per_sequence.mean()),
            "entropy": float(entropy) if entropy is not None else 0.0,
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
            prompt = records[0]["prompt_messages"][-1]["content"].replace("\n", " ")[:80]
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
        """PPO averages over response tokens, GRPO over sequences (see engine.rl)."""
        if self.settings.algo == "grpo":
            return int(batch["mask"].shape[0])
        return int(batch["mask"].sum())

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        mask = batch["mask"]
        logps, values, _ = response_outputs(model, batch, with_values=True)
        if self.settings.algo == "grpo":
            loss, clip_frac, _ = rl.grpo_loss(
                logps,
                batch["old_logps"],
                batch["ref_logps"],
                batch["advantages"],
                mask,
                self.settings.clip_eps,
                self.kl.value,
            )
            metrics = {"clip_frac": float(clip_frac)}
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
        from minigpt_cli.engine.stages.sft import score_answers, summarise_exact_match

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

    def _record_of(self, result: Any) -> dict:
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
            state["buffer"] = {k: _encode_tensor(v) for k, v in self.buffer.items()}
            state["buffer_order"] = _encode_tensor(self.buffer_order)
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
            self.buffer = {k: _decode_tensor(v) for k, v in state["buffer"].items()}
            self.buffer_order = _decode_tensor(state["buffer_order"])
        else:
            self.buffer = None
            self.buffer_order = torch.empty(0, dtype=torch.long)

    def weight_files(self, model: nn.Module) -> WeightFiles:
        """PPO's model checkpoints the policy's own file(s) and the value head beside them, so the
        run's `model.safetensors` (or adapter) stays a plain language model; GRPO's model is the
        policy alone."""
        from minigpt_cli.engine.model.lora import language_model_files

        if not isinstance(model, PolicyWithValue):
            return super().weight_files(model)
        head = {"value_head.weight": model.value_head.weight.detach()}
        return {
            **language_model_files(model.policy),
            VALUE_HEAD_FILE: (head, {"format": "minigpt-value-head"}),
        }

    def load_weight_files(self, model: nn.Module, folder: Path) -> None:
        """Restore what `weight_files` wrote (resume)."""
        from minigpt_cli.engine.model.lora import load_language_model_files
        from minigpt_cli.engine.runs.checkpoint import load_tensors

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


REWARD_DIR = "reward"


def train_reward_model(
    config: Any, spec: Any, inputs: Any, setup: Any, on_event: Any
) -> tuple[nn.Module, str]:
    """The reward model: reused (--reward-model), finished earlier in reward/, or trained now.

    Trained as its own run directory (`reward/` inside the RLHF run) by the one Trainer, so it
    resumes on its own after a kill, and starts from the policy's weights (InstructGPT's recipe:
    a reward model that already knows the language the policy speaks).
    """
    from minigpt_cli.engine.core.events import emit
    from minigpt_cli.engine.resources.memory import fit_memory
    from minigpt_cli.engine.runs import checkpoint as ckpt
    from minigpt_cli.engine.stages.dpo import load_dpo_records
    from minigpt_cli.engine.stages.reward import (
        RewardStage,
        build_reward_pairs,
        load_reward_model,
        reward_model_from_policy,
    )
    from minigpt_cli.engine.training.trainer import RunSpec, Trainer, seed_everything

    if inputs.reward_model is not None:
        loaded = load_reward_model(inputs.reward_model, str(setup.device))
        return loaded.model, str(inputs.reward_model)
    reward_dir = spec.run_dir / REWARD_DIR
    point = ckpt.find_resume_point(reward_dir) if reward_dir.is_dir() else None
    if point is not None and ckpt.read_state(point).get("finished"):
        emit(
            on_event, "note", "reward", message=f"reusing the finished reward model in {reward_dir}"
        )
        return load_reward_model(reward_dir, str(setup.device)).model, str(reward_dir)
    emit(on_event, "note", "reward", message="training the reward model on preference pairs")
    train = config.stage_train("reward")
    seed_everything(train.seed)
    model = reward_model_from_policy(policy_of(setup.model)).to(setup.device)
    context = config.model.context_length
    data = inputs.preference_data or None
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
    reward_dir.mkdir(parents=True, exist_ok=True)
    setup.tokenizer.save(reward_dir)
    reward_spec = RunSpec(
        run_dir=reward_dir,
        resume=point is not None,
        parent=str(inputs.from_run),
        sources={"preference_data": [str(p) for p in inputs.preference_data]},
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
    return load_reward_model(reward_dir, str(setup.device)).model, str(reward_dir)


def rl_settings(config: Any) -> RlSettings:
    """The stage's knobs from the `[rlhf]` section."""
    section = config.rlhf
    return RlSettings(**{name: getattr(section, name) for name in RlSettings.__dataclass_fields__})


def run_rlhf(config: Any, spec: Any, inputs: Any, on_event: Any = None) -> dict[str, Any]:
    """Train (or resume) an RLHF run: the reward model first when needed, then PPO or GRPO."""
    from minigpt_cli.engine.core.events import emit
    from minigpt_cli.engine.resources.memory import fit_memory
    from minigpt_cli.engine.stages.sft import (
        finish_finetune,
        start_finetune,
        train_and_val_records,
        trainable_parameters,
    )

    setup = start_finetune(config, spec, inputs, "rlhf", on_event)
    settings = rl_settings(config)
    reward_model = None
    if config.rlhf.reward in ("model", "both"):
        reward_model, source = train_reward_model(config, spec, inputs, setup, on_event)
        reward_model.eval().requires_grad_(False)
        spec.sources["reward_model"] = source
    reward = RewardSource(config.rlhf.reward, reward_model, setup.tokenizer.pad_id)
    train_records, val_records = train_and_val_records("rlhf", inputs, config)
    policy = setup.model
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
    )
    return finish_finetune(config, spec, inputs, setup, stage, micro_batch, on_event)
