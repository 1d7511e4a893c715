"""Direct preference optimisation: learn from (prompt, chosen, rejected) without a reward model.

The pieces `minigpt dpo` assembles (`run_dpo`, at the end, puts them together):

- `load_dpo_records`: the user's pairs (already normalised to `{"prompt_messages", "chosen",
  "rejected", "task"}` by `engine.data`, a `Human: ... Assistant:` prompt split into turns) or the
  built-in pairs.
- `build_pairs`: render each prompt with the one chat template (`data.chat_template`) and append
  each reply and its end-of-turn token, so preference training scores exactly what SFT taught.
  What does not fit the context is cut, prompts from the left and replies from the right, and
  counted.
- `sequence_logps`: log p(reply | prompt) summed over the reply's tokens.
- `dpo_loss` / `preference_metrics`: the sigmoid DPO loss (with TRL's conservative label
  smoothing) and the implicit rewards beta * (log p_policy - log p_reference).
- `DpoStage`: the Trainer's `Stage`. The reference model is the frozen starting policy; its
  log-probabilities are computed once (`cache_reference`) and stored on the stage, so memory holds
  one model and a resumed run uses exactly the reference of the first run.

Loss normalisation: the Trainer divides a step's summed loss by the sum of `loss_normaliser` over
its micro-batches. Here that is the number of pairs and `loss` the sum of per-pair losses, so a
step optimises the mean loss per pair however the step is split into micro-batches;
`count_tokens` (scored reply tokens) only feeds throughput and --max-tokens.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from minigpt_cli.engine.core.events import EventCallback, emit
from minigpt_cli.engine.data import chat_template
from minigpt_cli.engine.training.trainer import EVAL_BATCH, Batch, StageBase
from minigpt_cli.errors import UserError

if TYPE_CHECKING:
    from minigpt_cli.config.schema import Config
    from minigpt_cli.engine.stages.sft import FinetuneInputs


# Logits materialised at once when scoring replies (4M floats = 16 MB), as in the model's fused
# loss: large enough for efficient matmuls, small enough that a long batch never holds
# (tokens x vocabulary) logits.
_LOGIT_CHUNK_ELEMENTS = 4 * 2**20

# Reference log-probabilities must be reproduced on resume; a drift above this means the reference
# model is not the one the run started from.
_REFERENCE_TOLERANCE = 1e-3


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def load_dpo_records(paths: Sequence[Path] | None, split: str, config: Config) -> list[dict]:
    """Preference records `{"prompt_messages", "chosen", "rejected", "task"}` of `split` (see
    `data.stage_records`)."""
    from minigpt_cli.engine.data.records import stage_records

    return stage_records("dpo", paths, split, config.data.builtin_size, config.data.val_fraction)


@dataclass(frozen=True)
class PreferencePair:
    """One prompt with two replies, as full token sequences that share the prompt's ids.

    `*_mask[i]` is True when `*_ids[i]` is a reply token (the reply's end-of-turn included): only
    those are scored. Sequences hold at most `max_len + 1` ids (the model reads `ids[:-1]`).
    """

    chosen_ids: np.ndarray  # int64: prompt + chosen reply + end of turn
    chosen_mask: np.ndarray  # bool
    rejected_ids: np.ndarray  # int64: prompt + rejected reply + end of turn
    rejected_mask: np.ndarray  # bool
    prompt_len: int
    task: str | None

    @property
    def tokens(self) -> int:
        """Model inputs of both sequences (what a forward pass reads)."""
        return len(self.chosen_ids) - 1 + len(self.rejected_ids) - 1


@dataclass(frozen=True)
class PairStats:
    """What `build_pairs` did to the records, for the one line a verb prints."""

    records: int
    pairs: int
    prompts_truncated: int  # pairs whose prompt lost its oldest turns or tokens (kept)
    replies_truncated: int  # chosen or rejected replies cut at the end (each counted; kept)
    dropped: int  # pairs whose two replies became identical when cut: no preference (not kept)
    tokens: int  # model inputs of the kept pairs, both sequences, no padding
    reply_tokens: int  # scored reply tokens of the kept pairs
    max_len: int

    def describe(self) -> str:
        """e.g. '5,600 pairs, 190,000 tokens (40,000 scored); 3 prompts cut from the left ...'."""
        text = f"{self.pairs:,} pairs, {self.tokens:,} tokens ({self.reply_tokens:,} scored)"
        cuts = []
        if self.prompts_truncated:
            cuts.append(f"{self.prompts_truncated:,} prompts cut from the left")
        if self.replies_truncated:
            cuts.append(f"{self.replies_truncated:,} replies cut at the end")
        if cuts:
            text += f"; {' and '.join(cuts)} to fit {self.max_len} tokens"
        if self.dropped:
            text += (
                f"; {self.dropped:,} dropped: both replies identical after truncation, nothing "
                "to prefer (raise model.context_length or shorten the prompts)"
            )
        return text


def _exchange_starts(messages: Sequence[dict]) -> list[int]:
    return [i for i, m in enumerate(messages) if m["role"] == "user"]


def fit_prompt(
    messages: Sequence[dict], tokenizer: Any, limit: int
) -> tuple[list[int], list[dict], bool]:
    """(prompt ids, messages kept, truncated): the prompt in the template, at most `limit` ids.

    Cut from the left, because the latest turn is the one the replies answer: first the oldest
    user/assistant exchanges are dropped (the system message stays) while more than one is left,
    as SFT does, so the rest reads as a conversation; if the last turn alone is still too long, its
    oldest tokens go, keeping the leading begin-of-text id and the closing `<|assistant|>`.
    """
    if limit < 2:
        raise ValueError(f"a prompt needs at least 2 ids (begin of text, assistant), got {limit}")
    current = list(messages)
    ids = chat_template.prompt_ids(current, tokenizer)
    if len(ids) <= limit:
        return ids, current, False
    while len(ids) > limit:
        starts = _exchange_starts(current)
        if len(starts) < 2:
            break
        current = current[: starts[0]] + current[starts[1] :]
        ids = chat_template.prompt_ids(current, tokenizer)
    if len(ids) > limit:
        ids = ids[:1] + ids[len(ids) - (limit - 1) :]
    return ids, current, True


def forward_length(pairs: Sequence[PreferencePair]) -> int:
    """The longest forward pass over `pairs`: a sequence of n ids is read as its first n - 1 (the
    last id is only a target), what the memory estimate must be given."""
    return max(1, max(max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs) - 1)


def build_pairs(
    records: Sequence[dict],
    tokenizer: Any,
    max_len: int,
    max_prompt_tokens: int | None = None,
) -> tuple[list[PreferencePair], PairStats]:
    """Token sequences of preference records, and counts of what was cut or dropped.

    `max_len` is the model's context length: each sequence keeps at most `max_len + 1` ids. The
    prompt is rendered once (the same ids start both sequences) and is cut from the LEFT
    (`fit_prompt`): to `max_prompt_tokens` when given, and when prompt and the longer reply do not
    fit, down to what leaves room for that reply, but never below half the context unless
    `max_prompt_tokens` says so. Replies are then cut from the RIGHT to the room left (their start
    is what the preference is about; a cut reply loses its end-of-turn). A reply is never cut to
    nothing: the room left is at least half the context, or `max_len + 1 - max_prompt_tokens` >= 2.
    Every cut is counted; a pair whose two replies become identical when cut carries no preference
    and is dropped and counted, never silently. Role-order problems raise `UserError` naming the
    record.
    """
    budget = max_len + 1
    if max_prompt_tokens is not None and max_prompt_tokens >= max_len:
        raise UserError(
            f"dpo.max_prompt_tokens ({max_prompt_tokens}) must be below model.context_length "
            f"({max_len}) to leave room for the replies"
        )
    pairs: list[PreferencePair] = []
    prompts_cut = replies_cut = identical = tokens = reply_tokens = 0
    for number, record in enumerate(records, start=1):
        messages = record["prompt_messages"]
        try:
            prompt = chat_template.prompt_ids(messages, tokenizer)
            replies = [
                _reply_ids(messages, record[key], tokenizer, prompt)
                for key in ("chosen", "rejected")
            ]
        except UserError as error:
            raise UserError(f"dpo record {number}: {error}") from None
        longest = max(len(reply) for reply in replies)
        limit = len(prompt)
        if max_prompt_tokens is not None:
            limit = min(limit, max_prompt_tokens)
        if limit + longest > budget:
            limit = min(limit, max(budget - longest, budget // 2))
        if limit < len(prompt):
            prompt, _, _ = fit_prompt(messages, tokenizer, limit)
            prompts_cut += 1
        room = budget - len(prompt)
        replies_cut += sum(len(reply) > room for reply in replies)
        replies = [reply[:room] for reply in replies]
        if replies[0] == replies[1]:
            identical += 1
            continue
        chosen_ids, chosen_mask = _sequence(prompt, replies[0])
        rejected_ids, rejected_mask = _sequence(prompt, replies[1])
        pair = PreferencePair(
            chosen_ids, chosen_mask, rejected_ids, rejected_mask, len(prompt), record.get("task")
        )
        pairs.append(pair)
        tokens += pair.tokens
        reply_tokens += len(replies[0]) + len(replies[1])
    stats = PairStats(
        records=len(records),
        pairs=len(pairs),
        prompts_truncated=prompts_cut,
        replies_truncated=replies_cut,
        dropped=identical,
        tokens=tokens,
        reply_tokens=reply_tokens,
        max_len=max_len,
    )
    return pairs, stats


def _reply_ids(
    messages: Sequence[dict], reply: str, tokenizer: Any, prompt: list[int]
) -> list[int]:
    """The reply's ids (its end-of-turn included) exactly as the chat template renders them."""
    ids, _ = chat_template.render_response(messages, reply, tokenizer)
    if ids[: len(prompt)] != prompt:
        raise AssertionError(
            "chat_template.render_response no longer extends chat_template.prompt_ids"
        )
    return ids[len(prompt) :]


def _sequence(prompt: list[int], reply: list[int]) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(prompt + reply, dtype=np.int64)
    mask = np.zeros(len(ids), dtype=bool)
    mask[len(prompt) :] = True
    return ids, mask


def pad_pairs(pairs: Sequence[PreferencePair], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), each (2n, width): the n chosen sequences, then the n rejected ones.

    Right padding needs no attention mask: causal attention never lets a real token see the padding
    after it, and padding is never scored (mask False).
    """
    sequences = [(p.chosen_ids, p.chosen_mask) for p in pairs]
    sequences += [(p.rejected_ids, p.rejected_mask) for p in pairs]
    width = max(len(ids) for ids, _ in sequences)
    ids_out = np.full((len(sequences), width), pad_id, dtype=np.int64)
    mask_out = np.zeros((len(sequences), width), dtype=bool)
    for row, (ids, mask) in enumerate(sequences):
        ids_out[row, : len(ids)] = ids
        mask_out[row, : len(mask)] = mask
    return torch.from_numpy(ids_out), torch.from_numpy(mask_out)


# ----------------------------------------------------------------------------------------------
# Scoring and the loss
# ----------------------------------------------------------------------------------------------


def _language_model(model: torch.nn.Module) -> torch.nn.Module:
    """The GPT inside a `torch.compile` wrapper (scoring needs its `hidden_states`)."""
    return getattr(model, "_orig_mod", model)


def _token_logps(
    head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    logits = head(hidden).float()
    picked = logits.gather(1, targets.unsqueeze(1)).squeeze(1)
    return picked - torch.logsumexp(logits, dim=-1)


def sequence_logps(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of log p(ids[t] | ids[:t]) over the positions t where `mask` is True, per row (fp32).

    `ids` and `mask` are (B, L): the model reads `ids[:, :-1]`, and `mask[:, 0]` is ignored (the
    first id has no context). Prompt and padding positions (mask False) contribute nothing.

    Only the scored positions go through the output head, chunk by chunk, and while gradients are
    on each chunk's logits are recomputed in backward rather than kept, so the (tokens x
    vocabulary) logits of a batch are never held at once.
    """
    network = _language_model(model)
    inputs, targets, scored = ids[:, :-1], ids[:, 1:], mask[:, 1:].bool()
    hidden = network.hidden_states(inputs)
    picked_hidden = hidden[scored]
    picked_targets = targets[scored]
    head = network.lm_head
    chunk = max(1, _LOGIT_CHUNK_ELEMENTS // int(network.vocab_size))
    pieces = []
    for start in range(0, picked_hidden.shape[0], chunk):
        rows = picked_hidden[start : start + chunk]
        row_targets = picked_targets[start : start + chunk]
        if torch.is_grad_enabled() and rows.requires_grad:
            pieces.append(checkpoint(_token_logps, head, rows, row_targets, use_reentrant=False))
        else:
            pieces.append(_token_logps(head, rows, row_targets))
    token_logps = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)
    per_position = torch.zeros(scored.shape, dtype=torch.float32, device=ids.device)
    per_position = per_position.masked_scatter(scored, token_logps)
    return per_position.sum(dim=1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair losses, chosen rewards, rejected rewards), each (B,), from sequence log-probs.

    The sigmoid DPO loss on h = (pi_c - ref_c) - (pi_r - ref_r):
    -(1 - ls) * log sigmoid(beta * h) - ls * log sigmoid(-beta * h), where ls is the share of pairs
    assumed to be labelled the wrong way round (cDPO, as TRL computes it; ls = 0 is plain DPO).
    Rewards are the implicit ones, beta * (policy - reference), detached: they are for reporting.
    """
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    logits = beta * (chosen_ratio - rejected_ratio)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(
        -logits
    )
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def preference_metrics(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor
) -> dict[str, float]:
    """Means of the implicit rewards, their margin, and how often the chosen reply wins.

    A tie counts as wrong (strictly greater wins), so a policy that has not moved from its
    reference scores 0, not 0.5.
    """
    chosen = chosen_rewards.detach().float()
    rejected = rejected_rewards.detach().float()
    return {
        "chosen_reward": float(chosen.mean()),
        "rejected_reward": float(rejected.mean()),
        "margin": float((chosen - rejected).mean()),
        "pref_accuracy": float((chosen > rejected).float().mean()),
    }


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------


def pair_fingerprint(pairs: Sequence[PreferencePair]) -> str:
    """A short hash of every pair's ids, so a resume can refuse data that changed."""
    digest = hashlib.sha256()
    for pair in pairs:
        for array in (pair.chosen_ids, pair.rejected_ids):
            digest.update(len(array).to_bytes(4, "little"))
            digest.update(array.tobytes())
    return digest.hexdigest()[:16]


class PairOrder:
    """Which training pair comes next, as a position a checkpoint can save and restore.

    A permutation of the pairs per epoch, a pure function of (seed, epoch), taken `n` pairs at a
    time: `state()` (epoch + cursor) replays the exact batches, and 2 micro-batches of 2 pairs
    train the same 4 pairs as one micro-batch of 4. The state also records the pairs' count and
    fingerprint, so a resume on changed data is refused rather than silently reordered. Shared by
    every stage that trains on preference pairs (DPO, the reward model).
    """

    def __init__(self, pairs: Sequence[PreferencePair], seed: int, data_name: str) -> None:
        if not pairs:
            raise ValueError("PairOrder needs at least one pair")
        self.count = len(pairs)
        self.seed = seed
        self.data_name = data_name  # names the data in the refusal message ("DPO", "reward")
        self.fingerprint = pair_fingerprint(pairs)
        self.epoch = 0
        self.cursor = 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.count)

    def take(self, count: int) -> list[int]:
        """The indices of the next `count` pairs, crossing into the next epoch as needed."""
        indices = []
        for _ in range(count):
            if self.cursor >= len(self._order):
                self.epoch += 1
                self.cursor = 0
                self._order = self._epoch_order(self.epoch)
            indices.append(int(self._order[self.cursor]))
            self.cursor += 1
        return indices

    def epochs_done(self) -> float:
        return self.epoch + self.cursor / self.count

    def state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "pairs": self.count,
            "fingerprint": self.fingerprint,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        saved_count = state.get("pairs")
        saved_print = state.get("fingerprint")
        if (saved_count is not None and int(saved_count) != self.count) or (
            saved_print is not None and saved_print != self.fingerprint
        ):
            raise UserError(
                f"the {self.data_name} training data changed since the checkpoint ({saved_count} "
                f"pairs then, {self.count} now, or different pairs): resume with the same data "
                "and context length, or start over with --overwrite"
            )
        self.epoch = int(state["epoch"])
        self.cursor = int(state["cursor"])
        self._order = self._epoch_order(self.epoch)


class PairStage(StageBase):
    """What every stage over preference pairs shares: its position is a `PairOrder`."""

    order: PairOrder
    train_pairs: list[PreferencePair]

    def epochs_done(self) -> float:
        return self.order.epochs_done()

    def sequences_per_epoch(self) -> int:
        """Pairs in one pass (the Trainer's batch sizes count pairs for this stage)."""
        return len(self.train_pairs)

    def data_state(self) -> dict[str, Any]:
        return self.order.state()

    def load_data_state(self, state: dict[str, Any]) -> None:
        self.order.load_state(state)


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

    # ------------------------------------------------------------------------------ reference

    @torch.no_grad()
    def cache_reference(
        self,
        model: torch.nn.Module,
        *,
        batch_pairs: int = 8,
        autocast: Callable[[], AbstractContextManager[Any]] | None = None,
        on_event: EventCallback | None = None,
    ) -> None:
        """Score every training and held-out pair with `model` (the reference) and keep the numbers.

        Eval mode (no dropout) and no gradients; `autocast` (e.g. the Trainer's precision context)
        should be the one training uses, so that at step 0 policy and reference agree. Emits
        `progress` events (unit "pairs").
        """
        context = autocast or nullcontext
        total = len(self.train_pairs) + len(self.val_pairs)
        done = 0
        was_training = model.training
        model.eval()
        results = []
        try:
            for pairs in (self.train_pairs, self.val_pairs):
                scores = torch.empty(len(pairs), 2, dtype=torch.float32)
                for start in range(0, len(pairs), max(1, batch_pairs)):
                    chunk = pairs[start : start + max(1, batch_pairs)]
                    scores[start : start + len(chunk)] = self._score(model, chunk, context)
                    done += len(chunk)
                    emit(
                        on_event,
                        "progress",
                        self.name,
                        task="reference log-probs",
                        done=done,
                        total=total,
                        unit="pairs",
                    )
                results.append(scores)
        finally:
            model.train(was_training)
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
        return {"ids": ids, "mask": mask, "pair_index": index, "reference": reference[index]}

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
        logps = sequence_logps(model, ids, mask)
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
        from minigpt_cli.engine.stages.sft import held_out_exact_match

        metrics = self.preference_eval(model)
        metrics.update(
            held_out_exact_match(
                model, self.tokenizer, self.exact_match_records, self.exact_match_per_family
            )
        )
        return metrics

    # ------------------------------------------------------------------------------ position

    def extra_state(self) -> dict[str, Any]:
        """A summary of the cached reference, so a resume can tell it was recomputed faithfully."""
        if self.reference_train is None:
            return {}
        return {"reference_mean": [float(v) for v in self.reference_train.double().mean(0)]}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        saved = state.get("reference_mean")
        if saved is None or self.reference_train is None:
            return
        now = [float(v) for v in self.reference_train.double().mean(0)]
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
    config: Config, spec: Any, inputs: FinetuneInputs, on_event: EventCallback | None = None
) -> dict[str, Any]:
    """Preference-tune (or resume) a DPO run in `spec.run_dir`; returns the Trainer's summary.

    The reference is the starting policy (the parent, adapters included), scored once before the
    Trainer restores any checkpoint, so only one model is ever in memory.
    """
    from minigpt_cli.engine.hardware.device import autocast_context
    from minigpt_cli.engine.resources.memory import fit_memory
    from minigpt_cli.engine.stages.sft import (
        finish_finetune,
        load_sft_records,
        start_finetune,
        train_and_val_records,
        trainable_parameters,
    )

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
    stage.cache_reference(
        setup.model,
        batch_pairs=micro_batch,
        autocast=lambda: autocast_context(setup.precision, setup.device),
        on_event=on_event,
    )
    return finish_finetune(config, spec, inputs, setup, stage, micro_batch, on_event)
