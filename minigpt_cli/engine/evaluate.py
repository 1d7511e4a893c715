"""`minigpt eval`: several runs measured on the same held-out data, side by side.

Three kinds of evidence, each computed the way the training stage that produced a run computes
it, so a number here can be checked against the run's own metrics.jsonl:

- Held-out text: perplexity and bits per byte (`ppl`, `bpb`). Each document is scored from an
  end-of-text id (how pretraining separates documents) in non-overlapping windows of the model's
  context, as pretraining's validation does; bytes come from `token_byte_lengths`, so bits per
  byte are exact and comparable between runs with different tokenizers.
- Answers to held-out prompts, greedy and batched (`greedy.greedy_complete`), prompted in the one
  chat template for every run, base runs included (zero-shot, exactly as SFT's held-out check):
  exact match (`exact_match.normalise_answer`), BLEU (sacrebleu; `13a` tokens for English, `zh` for
  Chinese), ROUGE-1/2/L F1 (words for English, characters for Chinese), per task family and
  overall.
- Preference pairs: accuracy of the implicit reward log p_run(reply) - log p_parent(reply) (what
  DPO optimises, beta only scales it) when the run has a parent, else of the mean log-probability
  per reply token (a base model has no reference to be compared with). Ties count as wrong.

Runs are loaded one at a time and freed before the next; a parent needed only as a reference is
loaded once, scored, and freed too. Progress goes out as events (stage "eval"); nothing prints.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minigpt_cli.config.schema import EvalConfig
from minigpt_cli.engine.core.events import EventCallback, emit
from minigpt_cli.engine.metrics.exact_match import select_per_family
from minigpt_cli.errors import UserError

STAGE = "eval"  # the stage name of every event this module emits
TEXT_BATCH = 8  # context windows scored per forward pass
PAIR_BATCH = 8  # preference pairs (16 sequences) scored per forward pass
# Prompts and pairs per task family (tiny runs evaluate in seconds): the schema holds the default.
DEFAULT_PER_FAMILY: int = EvalConfig.model_fields["per_family"].default

# Han ideographs (with extension A and the compatibility block), kana: scripts written without
# spaces between words, so they are scored character by character.
_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff"
_CJK_CHAR = re.compile(f"[{_CJK}]")
_ROUGE_TOKEN = re.compile(f"[{_CJK}]|[^\\W_{_CJK}]+")

PARTS = ("text", "generation", "preference")
PARENT_REWARD = "parent_reward"  # pref_score: log p_run(reply) - log p_parent(reply)
MEAN_LOGPROB = "mean_logprob"  # pref_score: mean log p_run per reply token (no parent)


# ----------------------------------------------------------------------------------------------
# Options and the report
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalOptions:
    """What to measure and on which data (empty paths = the built-in held-out data)."""

    text: Sequence[Path] = ()
    sft_data: Sequence[Path] = ()
    pref_data: Sequence[Path] = ()
    per_family: int | None = DEFAULT_PER_FAMILY  # None: every record
    samples: int = 3  # answers shown per run
    seed: int = 0  # which records of a family are drawn when it has more than `per_family`
    device: str = "auto"
    max_new_tokens: int | None = None  # None: the longest reference of a batch + SFT's margin
    parts: Sequence[str] = PARTS
    text_documents: int | None = None  # None: every document
    reward_model: Path | None = None  # a reward run: its score of every run's answers, `reward`

    @classmethod
    def from_config(cls, section: EvalConfig, **fields: Any) -> EvalOptions:
        """Options from a config's [eval] section (what quickstart evaluates), plus `fields`."""
        return cls(
            per_family=section.per_family,
            samples=section.samples,
            max_new_tokens=section.max_new_tokens,
            text_documents=section.text_documents,
            **fields,
        )


@dataclass
class RunReport:
    """One run's results; `metrics` holds numbers only, keyed as in metrics.jsonl."""

    name: str
    path: str
    stage: str | None
    parent: str | None
    chat: bool
    metrics: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    pref_score: str | None = None  # PARENT_REWARD | MEAN_LOGPROB
    samples: list[dict[str, str]] = field(default_factory=list)


@dataclass
class EvalReport:
    """Every run's results plus what they were measured on; `to_json` is what --json prints."""

    runs: list[RunReport]
    data: dict[str, str]
    options: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """A plain dict (JSON types only), the same for the same runs, data and seed."""
        return {
            "options": dict(self.options),
            "data": dict(self.data),
            "runs": [asdict(run) for run in self.runs],
        }


# ----------------------------------------------------------------------------------------------
# Text metrics
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextScore:
    """Summed negative log-likelihood of a text and what it was spread over."""

    nats: float
    tokens: int
    bytes: int

    def metrics(self) -> dict[str, float]:
        """`ppl` (per token, this tokenizer's) and `bpb` (per UTF-8 byte, any tokenizer)."""
        if not self.tokens:
            return {}
        mean = self.nats / self.tokens
        result = {"nll": round(mean, 5), "ppl": round(math.exp(min(mean, 50.0)), 3)}
        if self.bytes:
            result["bpb"] = round(self.nats / math.log(2) / self.bytes, 5)
        return result


def document_windows(ids: Sequence[int], context: int) -> list[tuple[list[int], list[int]]]:
    """(inputs, targets) windows of one document's ids, non-overlapping, at most `context` long.

    `ids` already starts with the end-of-text id, which is context only: every later id is a
    target exactly once, as in pretraining's validation windows over the token stream.
    """
    windows = []
    for start in range(0, len(ids) - 1, context):
        chunk = list(ids[start : start + context + 1])
        windows.append((chunk[:-1], chunk[1:]))
    return windows


def text_windows(
    tokenizer: Any, documents: Sequence[str], context: int
) -> list[tuple[list[int], list[int]]]:
    """Every document's windows (each document from an end-of-text id), shortest first so
    similar lengths batch together with little padding."""
    windows = []
    for encoded in tokenizer.encode_batch(list(documents)):
        windows.extend(document_windows([tokenizer.eos_id, *encoded], context))
    windows.sort(key=lambda window: len(window[0]))
    return windows


@torch.no_grad()
def score_windows(
    model: Any,
    windows: Sequence[tuple[list[int], list[int]]],
    token_bytes: np.ndarray,
    pad_id: int,
    *,
    batch_size: int = TEXT_BATCH,
    on_batch: Callable[[], None] | None = None,
) -> TextScore:
    """Summed negative log-likelihood of the windows' targets (the model's own fused loss, padding
    ignored) and the UTF-8 bytes those targets stand for."""
    from minigpt_cli.engine.model.gpt import IGNORE_INDEX
    from minigpt_cli.engine.resources.governor import throttle_point

    device = next(model.parameters()).device
    nats, tokens, total_bytes = 0.0, 0, 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(windows), max(1, batch_size)):
            throttle_point()
            batch = windows[start : start + max(1, batch_size)]
            width = max(len(inputs) for inputs, _ in batch)
            inputs = torch.full((len(batch), width), pad_id, dtype=torch.long)
            targets = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
            for row, (window_inputs, window_targets) in enumerate(batch):
                inputs[row, : len(window_inputs)] = torch.tensor(window_inputs)
                targets[row, : len(window_targets)] = torch.tensor(window_targets)
            _, loss = model(inputs.to(device), targets=targets.to(device), reduction="sum")
            nats += float(loss)
            scored = targets[targets != IGNORE_INDEX].numpy()
            tokens += int(scored.size)
            total_bytes += int(token_bytes[scored].sum())
            if on_batch is not None:
                on_batch()
    finally:
        model.train(was_training)
    return TextScore(nats, tokens, total_bytes)


def score_text(model: Any, tokenizer: Any, documents: Sequence[str]) -> TextScore:
    """Negative log-likelihood of `documents` under `model`, scored as `minigpt eval` scores text:
    from an end-of-text id, in non-overlapping windows of the model's context."""
    from minigpt_cli.engine.stages.pretrain import token_byte_lengths

    windows = text_windows(tokenizer, documents, int(model.config.context_length))
    return score_windows(model, windows, token_byte_lengths(tokenizer), tokenizer.pad_id)


def text_batches(windows: Sequence[Any]) -> int:
    """How many forward passes `score_windows` makes (for progress totals)."""
    return math.ceil(len(windows) / TEXT_BATCH)


# ----------------------------------------------------------------------------------------------
# Generation metrics: BLEU, ROUGE, exact match
# ----------------------------------------------------------------------------------------------


def is_cjk(text: str) -> bool:
    """Whether `text` contains Chinese (or Japanese) characters: it is then scored per character."""
    return _CJK_CHAR.search(text) is not None


def bleu_tokenizer(reference: str) -> str:
    """sacrebleu's tokenizer for an example: `zh` when the reference has CJK characters (which
    `13a` would leave as one unsplit token), else the standard `13a`."""
    return "zh" if is_cjk(reference) else "13a"


@dataclass(frozen=True)
class BleuStats:
    """One example's BLEU sufficient statistics (n-gram matches and totals, lengths)."""

    correct: tuple[int, ...]
    total: tuple[int, ...]
    sys_len: int
    ref_len: int


_BLEU_SCORERS: dict[str, Any] = {}


def bleu_stats(hypothesis: str, reference: str, tokenize: str | None = None) -> BleuStats:
    """sacrebleu's statistics of one example, tokenised per `bleu_tokenizer(reference)` unless
    `tokenize` names one."""
    from sacrebleu.metrics import BLEU

    name = tokenize or bleu_tokenizer(reference)
    scorer = _BLEU_SCORERS.get(name)
    if scorer is None:
        # effective_order only changes a sentence's own score (unused), not its statistics; on, it
        # keeps sacrebleu from warning about sentence-level BLEU.
        scorer = _BLEU_SCORERS[name] = BLEU(tokenize=name, effective_order=True)
    score = scorer.sentence_score(hypothesis, [reference])
    return BleuStats(tuple(score.counts), tuple(score.totals), score.sys_len, score.ref_len)


def corpus_bleu(stats: Sequence[BleuStats]) -> float:
    """Corpus BLEU (0-100) from pooled per-example statistics, so each example keeps the
    tokenizer of its language.

    As `sacrebleu`'s corpus BLEU (exponential smoothing) with `effective_order`: n-gram orders that
    no answer is long enough to have are left out instead of making the score 0. Without it a
    corpus of one-word answers (most built-in tasks) would score 0 even when every answer is
    right; with any answer of 4+ tokens in the corpus the two are identical.
    """
    from sacrebleu.metrics import BLEU

    if not stats:
        return 0.0
    correct = np.sum([s.correct for s in stats], axis=0).tolist()
    total = np.sum([s.total for s in stats], axis=0).tolist()
    sys_len = sum(s.sys_len for s in stats)
    ref_len = sum(s.ref_len for s in stats)
    score = BLEU.compute_bleu(
        correct, total, sys_len, ref_len, smooth_method="exp", effective_order=True
    )
    return float(score.score)


def rouge_tokens(text: str) -> list[str]:
    """ROUGE's units: each CJK character alone, other words as runs of letters and digits,
    case-folded; punctuation dropped. So Chinese is scored by characters and never comes out
    empty, English by words."""
    return _ROUGE_TOKEN.findall(text.casefold())


def _f1(overlap: int, hypothesis_count: int, reference_count: int) -> float:
    if overlap == 0 or hypothesis_count == 0 or reference_count == 0:
        return 0.0
    precision, recall = overlap / hypothesis_count, overlap / reference_count
    return 2 * precision * recall / (precision + recall)


def rouge_n(hypothesis: Sequence[str], reference: Sequence[str], n: int) -> float:
    """ROUGE-N F1: clipped n-gram overlap over the hypothesis's and the reference's n-grams."""
    hyp = Counter(tuple(hypothesis[i : i + n]) for i in range(len(hypothesis) - n + 1))
    ref = Counter(tuple(reference[i : i + n]) for i in range(len(reference) - n + 1))
    overlap = sum((hyp & ref).values())
    return _f1(overlap, sum(hyp.values()), sum(ref.values()))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row kept)."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for item in a:
        current = [0]
        for j, other in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if item == other else max(previous[j], current[-1]))
        previous = current
    return previous[-1]


def rouge_l(hypothesis: Sequence[str], reference: Sequence[str]) -> float:
    """ROUGE-L F1: the longest common subsequence over both lengths (beta = 1)."""
    return _f1(lcs_length(hypothesis, reference), len(hypothesis), len(reference))


def rouge_scores(hypothesis: str, reference: str) -> dict[str, float]:
    """`rouge1`, `rouge2`, `rougeL` F1 of one answer against its reference."""
    hyp, ref = rouge_tokens(hypothesis), rouge_tokens(reference)
    return {
        "rouge1": rouge_n(hyp, ref, 1),
        "rouge2": rouge_n(hyp, ref, 2),
        "rougeL": rouge_l(hyp, ref),
    }


@dataclass(frozen=True)
class Answer:
    """One held-out prompt answered greedily, with everything its metrics need."""

    family: str | None
    prompt: str  # the last user turn, for showing samples
    reference: str
    prediction: str
    correct: bool  # exact match after `exact_match.normalise_answer`
    prompt_messages: tuple[dict, ...] = ()  # the conversation answered (for a reward model)


def generation_metrics(answers: Sequence[Answer]) -> dict[str, float]:
    """BLEU (pooled), mean ROUGE F1s and exact match, overall and as `<metric>/<family>` for each
    task family (untagged records count in the overall figures only, as in SFT's exact match)."""
    if not answers:
        return {}
    stats = [bleu_stats(a.prediction, a.reference) for a in answers]
    rouges = [rouge_scores(a.prediction, a.reference) for a in answers]

    def summary(indices: list[int]) -> dict[str, float]:
        values = {"bleu": round(corpus_bleu([stats[i] for i in indices]), 4)}
        for key in ("rouge1", "rouge2", "rougeL"):
            values[key] = round(sum(rouges[i][key] for i in indices) / len(indices), 4)
        values["exact_match"] = round(sum(answers[i].correct for i in indices) / len(indices), 4)
        return values

    metrics = summary(list(range(len(answers))))
    for family in sorted({a.family for a in answers if a.family}):
        mine = [i for i, a in enumerate(answers) if a.family == family]
        metrics.update({f"{key}/{family}": value for key, value in summary(mine).items()})
    return metrics


def _check_ends_with_answer(records: Sequence[dict]) -> None:
    """A reference answer is the conversation's last assistant turn; without one, say so."""
    for record in records:
        messages = record.get("messages") or []
        if not messages or messages[-1]["role"] != "assistant":
            raise UserError("an SFT record for evaluation must end with the assistant's answer")


def answer_batches(count: int) -> int:
    """How many decoding batches `answer_prompts` makes (for progress totals)."""
    from minigpt_cli.engine.metrics.exact_match import EXACT_MATCH_BATCH

    return math.ceil(count / EXACT_MATCH_BATCH)


def answer_prompts(
    model: Any,
    tokenizer: Any,
    records: Sequence[dict],
    *,
    max_new_tokens: int | None = None,
    on_batch: Callable[[], None] | None = None,
) -> list[Answer]:
    """Greedy answers to SFT records, in their order, decoded by SFT's own held-out check
    (`exact_match.score_answers`), so exact match equals `exact_match_by_family` on the same
    records."""
    from minigpt_cli.engine.metrics.exact_match import score_answers

    _check_ends_with_answer(records)
    results = score_answers(
        model,
        tokenizer,
        records,
        per_family=None,
        max_new_tokens=max_new_tokens,
        on_batch=on_batch,
    )
    answers = []
    for result in results:
        user_turns = [m["content"] for m in result.prompt_messages if m["role"] == "user"]
        prompt = user_turns[-1] if user_turns else ""
        answers.append(
            Answer(
                result.family,
                prompt,
                result.reference,
                result.prediction,
                result.correct,
                tuple(result.prompt_messages),
            )
        )
    return answers


def reward_metrics(reward_run: Any, tokenizer: Any, answers: Sequence[Answer]) -> dict[str, float]:
    """The reward model's mean score of the answers (each as prompt + reply in the chat template,
    as RLHF scores its rollouts), overall and per task family: what RLHF optimised, measured on
    held-out prompts for every run alike."""
    from minigpt_cli.engine.data import chat_template
    from minigpt_cli.engine.inference.scoring import score_texts

    context = reward_run.model.config.context_length
    sequences = [
        chat_template.render_response(list(a.prompt_messages), a.prediction, tokenizer)[0][
            -context:
        ]
        for a in answers
    ]
    scores = score_texts(reward_run.model, sequences, pad_id=tokenizer.pad_id).tolist()
    metrics = {"reward": round(sum(scores) / len(scores), 4)}
    for family in sorted({a.family for a in answers if a.family}):
        mine = [score for score, a in zip(scores, answers, strict=True) if a.family == family]
        metrics[f"reward/{family}"] = round(sum(mine) / len(mine), 4)
    return metrics


def load_reward_judge(path: Path, first_run: Path, device: torch.device) -> Any:
    """The reward run that judges every run's answers; its tokenizer must be the runs' own (the
    scores are of token ids), which holds for every run of one pipeline."""
    from minigpt_cli.engine.data.tokenizer import MODEL_FILE
    from minigpt_cli.engine.stages.reward import load_reward_model

    judge = load_reward_model(path, str(device))
    if (path / MODEL_FILE).read_bytes() != (first_run / MODEL_FILE).read_bytes():
        raise UserError(
            f"{path}: this reward model has another tokenizer than {first_run}; it can only "
            "judge runs of the pipeline it was trained in"
        )
    return judge


# ----------------------------------------------------------------------------------------------
# Preference accuracy
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairScores:
    """Per record: summed reply log-probs and reply tokens, chosen and rejected (NaN: the pair was
    dropped by `pairs.build_pairs`, both replies identical after truncation)."""

    chosen: np.ndarray  # float64 (records,)
    rejected: np.ndarray
    chosen_tokens: np.ndarray  # int64 (records,)
    rejected_tokens: np.ndarray


def pair_batches(count: int) -> int:
    """How many forward passes `score_pairs` makes for `count` records (for progress totals)."""
    return math.ceil(count / PAIR_BATCH)


@torch.no_grad()
def score_pairs(
    model: Any,
    tokenizer: Any,
    records: Sequence[dict],
    *,
    max_prompt_tokens: int | None = None,
    on_batch: Callable[[], None] | None = None,
) -> PairScores:
    """log p(reply | prompt) of both replies of every record, with DPO's own pair building
    (`pairs.build_pairs`: the chat template, prompts cut from the left, replies from the right) and
    scoring (`preference.sequence_logps`)."""
    from minigpt_cli.engine.data.pairs import build_pairs, pad_pairs
    from minigpt_cli.engine.objectives.preference import sequence_logps
    from minigpt_cli.engine.resources.governor import throttle_point

    context = int(model.config.context_length)
    kept: list[tuple[int, Any]] = []
    for index, record in enumerate(records):
        # One record at a time, so a dropped pair is known by its index (and stays aligned with
        # the parent's scores).
        pairs, _ = build_pairs([record], tokenizer, context, max_prompt_tokens)
        kept.extend((index, pair) for pair in pairs)
    result = PairScores(
        np.full(len(records), np.nan),
        np.full(len(records), np.nan),
        np.zeros(len(records), dtype=np.int64),
        np.zeros(len(records), dtype=np.int64),
    )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(kept), PAIR_BATCH):
            throttle_point()
            chunk = kept[start : start + PAIR_BATCH]
            ids, mask = pad_pairs([pair for _, pair in chunk], tokenizer.pad_id)
            logps = sequence_logps(model, ids.to(device), mask.to(device)).double().cpu().numpy()
            counts = mask[:, 1:].sum(dim=1).numpy()
            for row, (index, _) in enumerate(chunk):
                result.chosen[index] = logps[row]
                result.rejected[index] = logps[len(chunk) + row]
                result.chosen_tokens[index] = counts[row]
                result.rejected_tokens[index] = counts[len(chunk) + row]
            if on_batch is not None:
                on_batch()
    finally:
        model.train(was_training)
    return result


def preference_accuracy(chosen: Sequence[float], rejected: Sequence[float]) -> float:
    """Share of pairs whose chosen score is strictly above the rejected one: a tie is wrong, so a
    run that has not moved from its parent scores 0, not 0.5 (as `preference_metrics`)."""
    from minigpt_cli.engine.objectives.preference import preference_metrics

    if len(chosen) == 0:
        return 0.0
    # Differences against zero: `preference_metrics` compares in float32, which could round two
    # close float64 scores into a tie; the sign of their difference survives the cast.
    differences = np.asarray(chosen, dtype=np.float64) - np.asarray(rejected, dtype=np.float64)
    return preference_metrics(torch.from_numpy(differences), torch.zeros(len(differences)))[
        "pref_accuracy"
    ]


def preference_scores(own: PairScores, parent: PairScores | None) -> tuple[np.ndarray, np.ndarray]:
    """(chosen, rejected) scores per record: the implicit reward log p_run - log p_parent with a
    parent, else the mean log-probability per reply token. NaN where a pair was dropped."""
    if parent is not None:
        return own.chosen - parent.chosen, own.rejected - parent.rejected
    with np.errstate(invalid="ignore", divide="ignore"):
        return own.chosen / own.chosen_tokens, own.rejected / own.rejected_tokens


def preference_summary(
    chosen: np.ndarray, rejected: np.ndarray, families: Sequence[str | None]
) -> dict[str, float]:
    """`pref_accuracy` and `pref_margin` (mean chosen - rejected score), overall and per family;
    dropped pairs (NaN) are left out."""
    valid = ~(np.isnan(chosen) | np.isnan(rejected))

    def summary(selected: np.ndarray) -> dict[str, float]:
        if not selected.any():
            return {}
        accuracy = preference_accuracy(chosen[selected].tolist(), rejected[selected].tolist())
        margin = float(np.mean(chosen[selected] - rejected[selected]))
        return {"pref_accuracy": round(accuracy, 4), "pref_margin": round(margin, 4)}

    metrics = summary(valid)
    family_array = np.array([f or "" for f in families], dtype=object)
    for family in sorted({f for f in families if f}):
        values = summary(valid & (family_array == family))
        metrics.update({f"{key}/{family}": value for key, value in values.items()})
    return metrics


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def _parent_dir(run_dir: Path, state: dict[str, Any]) -> Path | None:
    """The parent run a run records, found as `checkpoint.load_run` finds a LoRA run's parent
    (None when there is none, or it is gone)."""
    from minigpt_cli.engine.runs.checkpoint import find_parent

    written = state.get("parent")
    if not isinstance(written, str) or not written:
        return None
    return find_parent(run_dir, written)


def _ancestors(run_dir: Path) -> list[Path]:
    """The runs `run_dir` descends from, its parent first, as far as they can be found."""
    from minigpt_cli.engine.runs.checkpoint import read_state

    found: list[Path] = []
    current, seen = run_dir, {run_dir.resolve()}
    while True:
        try:
            parent = _parent_dir(current, read_state(current))
        except UserError:  # an unreadable state ends the chain here
            return found
        if parent is None or parent.resolve() in seen:
            return found
        seen.add(parent.resolve())
        found.append(parent)
        current = parent


def builtin_heldout_documents(run_dir: Path) -> tuple[list[str], str]:
    """The built-in documents pretraining held out, and a line saying so.

    The built-in corpus has no separate validation split: pretraining validates on the last
    `data.val_fraction` of its tokens. So this rebuilds the corpus of the chain's pretraining run
    (its `data.builtin_size`, its tokenizer) and keeps the documents that lie wholly in that tail:
    text none of the runs was trained on.
    """
    from minigpt_cli.config.loader import read_run_config
    from minigpt_cli.engine.data.records import builtin_documents
    from minigpt_cli.engine.data.tokenizer import Tokenizer
    from minigpt_cli.engine.runs.checkpoint import read_state

    root = ([run_dir, *_ancestors(run_dir)])[-1]  # normally the pretraining run
    config = read_run_config(root)
    documents = builtin_documents(config.data.builtin_size, seed=0)
    tokenizer = Tokenizer.load(root)
    starts, offset = [], 0
    for ids in tokenizer.encode_batch(documents):
        starts.append(offset)
        offset += len(ids) + 1  # each document is followed by an end-of-text id
    split = int(offset * (1 - config.data.val_fraction))
    held_out = [doc for doc, start in zip(documents, starts, strict=True) if start >= split]
    fraction = 100 * config.data.val_fraction
    line = (
        f"{len(held_out)} built-in documents pretraining held out (the last {fraction:g} % of "
        f"the {config.data.builtin_size}-document corpus of {root})"
    )
    sources = read_state(root).get("sources") or {}
    if sources.get("data") or sources.get("from_run"):
        line = (
            f"{len(held_out)} built-in documents (the last {fraction:g} % of the built-in "
            f"corpus; {root} was pretrained on other text: pass --text for its own held-out text)"
        )
    return held_out, line


def _describe_files(paths: Sequence[Path]) -> str:
    return ", ".join(str(p) for p in paths)


def load_eval_data(options: EvalOptions, first_run: Path) -> tuple[dict[str, list], dict[str, str]]:
    """Every part's records (user files or the built-in held-out data), read before any model is
    loaded so a bad line stops the command at once (`path:line: problem`)."""
    from minigpt_cli.engine.data.records import builtin_records, read_records

    data: dict[str, list] = {}
    described: dict[str, str] = {}
    if "text" in options.parts:
        if options.text:
            data["text"] = [r["text"] for r in read_records(list(options.text), "pretrain")]
            described["text"] = (
                f"{len(data['text'])} documents from {_describe_files(options.text)}"
            )
        else:
            data["text"], described["text"] = builtin_heldout_documents(first_run)
        if options.text_documents is not None and len(data["text"]) > options.text_documents:
            described["text"] += f" (the first {options.text_documents} scored)"
            data["text"] = data["text"][: options.text_documents]
    for part, paths, kind, what in (
        ("generation", options.sft_data, "sft", "SFT records"),
        ("preference", options.pref_data, "dpo", "preference pairs"),
    ):
        if part not in options.parts:
            continue
        records = read_records(list(paths), kind) if paths else builtin_records(kind, "val")
        source = _describe_files(paths) if paths else "built-in held-out"
        data[part] = select_per_family(records, options.per_family, options.seed)
        described[part] = f"{len(data[part])} of {len(records)} {source} {what}"
    return data, described


# ----------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------


def check_run_dirs(run_dirs: Sequence[Path]) -> None:
    """Refuse a path that is not a run holding weights, naming it, before anything is loaded."""
    from minigpt_cli.engine.model.lora import ADAPTER_FILE
    from minigpt_cli.engine.runs.checkpoint import MODEL_FILE

    if not run_dirs:
        raise UserError("no run to evaluate: name at least one run directory")
    for run_dir in run_dirs:
        path = Path(run_dir)
        if not path.is_dir():
            raise UserError(f"{path}: no such run directory")
        if not (path / MODEL_FILE).is_file() and not (path / ADAPTER_FILE).is_file():
            raise UserError(f"{path}: holds no model (no {MODEL_FILE} or {ADAPTER_FILE})")


def display_names(run_dirs: Sequence[Path]) -> list[str]:
    """Short names that tell the runs apart: the folder name, with more of the path when two
    runs share it (and a #n suffix when a run is listed twice)."""
    paths = [Path(p) for p in run_dirs]
    depth = 1
    names = ["/".join(p.parts[-depth:]) for p in paths]
    while len(set(names)) < len(names) and depth < max(len(p.parts) for p in paths):
        depth += 1
        names = ["/".join(p.parts[-depth:]) for p in paths]
    seen: Counter[str] = Counter()
    unique = []
    for name in names:
        seen[name] += 1
        unique.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return unique


def _evaluation_order(run_dirs: Sequence[Path]) -> list[int]:
    """Indices of the runs with every listed parent before its children, so a parent's scores
    are cached when its child needs them and no run is loaded twice."""
    listed = {Path(p).resolve() for p in run_dirs}
    depth = [
        sum(ancestor.resolve() in listed for ancestor in _ancestors(Path(run_dir)))
        for run_dir in run_dirs
    ]
    return sorted(range(len(run_dirs)), key=lambda i: depth[i])


class _Progress:
    """Counts a run's forward passes and reports them as one progress row."""

    def __init__(self, on_event: EventCallback | None, task: str, total: int) -> None:
        self.on_event, self.task, self.total, self.done = on_event, task, total, 0
        self.phase = ""
        emit(on_event, "progress", STAGE, task=task, done=0, total=total, unit="batches")

    def start(self, phase: str) -> None:
        self.phase = phase

    def __call__(self) -> None:
        self.done += 1
        emit(
            self.on_event,
            "progress",
            STAGE,
            task=self.task,
            done=self.done,
            total=self.total,
            unit="batches",
            message=self.phase,
        )


def evaluate_runs(
    run_dirs: Sequence[Path], options: EvalOptions, on_event: EventCallback | None = None
) -> EvalReport:
    """Measure every run on the same data; the report lists them in the order given.

    Each run is loaded once (parents first when both are listed) and freed before the next; a
    parent that is not listed is loaded only to score the preference pairs. The output depends
    only on the runs, the data, the options and the device.
    """
    from minigpt_cli.engine.hardware.device import resolve_device
    from minigpt_cli.engine.resources.governor import release_memory
    from minigpt_cli.engine.runs.checkpoint import read_state

    unknown = sorted(set(options.parts) - set(PARTS))
    if unknown:
        raise UserError(f"unknown eval part {unknown[0]!r} (expected {', '.join(PARTS)})")
    paths = [Path(p) for p in run_dirs]
    check_run_dirs(paths)
    data, described = load_eval_data(options, paths[0])
    for part, line in described.items():
        emit(on_event, "note", STAGE, message=f"{part}: {line}")
    device = resolve_device(options.device)
    names = display_names(paths)
    judge = None
    if options.reward_model is not None and data.get("generation"):
        judge = load_reward_judge(Path(options.reward_model), paths[0], device)
        described["reward"] = f"answers scored by the reward model in {options.reward_model}"
        emit(on_event, "note", STAGE, message=f"reward: {described['reward']}")
    reports: dict[int, RunReport] = {}
    pair_cache: dict[Path, PairScores] = {}  # every run's pair scores: a later child's reference
    pair_records = data.get("preference", [])
    families = [r.get("task") for r in pair_records]

    for index in _evaluation_order(paths):
        run_dir, name = paths[index], names[index]
        state = read_state(run_dir)
        report, own_pairs = _measure_run(
            run_dir, name, state, data, options, device, on_event, judge
        )
        release_memory()  # the run's model went out of scope with `_measure_run`
        if own_pairs is not None:
            pair_cache[run_dir.resolve()] = own_pairs
            parent = _parent_dir(run_dir, state)
            parent_pairs = None
            if parent is not None:
                parent_pairs = pair_cache.get(parent.resolve())
                if parent_pairs is None:
                    parent_pairs = _score_parent(parent, pair_records, device, on_event)
                    pair_cache[parent.resolve()] = parent_pairs
            elif state.get("parent"):
                emit(
                    on_event,
                    "note",
                    STAGE,
                    message=f"{name}: parent run {state['parent']} not found: preference "
                    "accuracy uses the mean log-probability per reply token",
                )
            chosen, rejected = preference_scores(own_pairs, parent_pairs)
            report.metrics.update(preference_summary(chosen, rejected, families))
            report.counts["pairs"] = int(np.sum(~np.isnan(chosen)))
            report.pref_score = PARENT_REWARD if parent_pairs is not None else MEAN_LOGPROB
        reports[index] = report

    return EvalReport(
        runs=[reports[i] for i in range(len(paths))],
        data=described,
        options={
            "per_family": options.per_family,
            "seed": options.seed,
            "max_new_tokens": options.max_new_tokens,
            "samples": options.samples,
            "parts": [p for p in PARTS if p in options.parts],
            "device": device.type,
        },
    )


def _measure_run(
    run_dir: Path,
    name: str,
    state: dict[str, Any],
    data: dict[str, list],
    options: EvalOptions,
    device: torch.device,
    on_event: EventCallback | None,
    judge: Any = None,
) -> tuple[RunReport, PairScores | None]:
    """Load one run and measure what `data` holds; its own pair scores come back separately (the
    preference metrics need the parent's too). The model is freed when this returns."""
    from minigpt_cli.engine.runs.checkpoint import load_run
    from minigpt_cli.engine.stages.pretrain import token_byte_lengths

    loaded = load_run(run_dir, str(device))
    model, tokenizer = loaded.model, loaded.tokenizer
    windows = text_windows(tokenizer, data.get("text", []), int(model.config.context_length))
    prompts, pairs = data.get("generation", []), data.get("preference", [])
    total = text_batches(windows) + answer_batches(len(prompts)) + pair_batches(len(pairs))
    progress = _Progress(on_event, name, total)
    report = RunReport(
        name=name,
        path=str(run_dir),
        stage=state.get("stage"),
        parent=state.get("parent"),
        chat=bool(state.get("chat")),
    )
    if windows:
        progress.start("held-out text")
        score = score_windows(
            model, windows, token_byte_lengths(tokenizer), tokenizer.pad_id, on_batch=progress
        )
        report.metrics.update(score.metrics())
        report.counts.update(
            text_documents=len(data["text"]), text_tokens=score.tokens, text_bytes=score.bytes
        )
    if prompts:
        progress.start("answers")
        answers = answer_prompts(
            model, tokenizer, prompts, max_new_tokens=options.max_new_tokens, on_batch=progress
        )
        report.metrics.update(generation_metrics(answers))
        if judge is not None:
            report.metrics.update(reward_metrics(judge, tokenizer, answers))
        report.counts["answers"] = len(answers)
        report.samples = [
            dict(family=a.family or "", prompt=a.prompt, reference=a.reference, answer=a.prediction)
            for a in answers[: max(0, options.samples)]
        ]
    own_pairs = None
    if pairs:
        progress.start("preference pairs")
        own_pairs = score_pairs(
            model,
            tokenizer,
            pairs,
            max_prompt_tokens=loaded.config.dpo.max_prompt_tokens,
            on_batch=progress,
        )
    return report, own_pairs


def _score_parent(
    parent: Path, records: Sequence[dict], device: torch.device, on_event: EventCallback | None
) -> PairScores:
    """Load a parent run only to score the preference pairs as the reference, then free it."""
    from minigpt_cli.engine.resources.governor import release_memory
    from minigpt_cli.engine.runs.checkpoint import load_run

    loaded = load_run(parent, str(device))
    progress = _Progress(on_event, f"{parent.name} (reference)", pair_batches(len(records)))
    progress.start("preference pairs")
    scores = score_pairs(
        loaded.model,
        loaded.tokenizer,
        records,
        max_prompt_tokens=loaded.config.dpo.max_prompt_tokens,
        on_batch=progress,
    )
    del loaded
    release_memory()
    return scores
