"""Text metrics: how well a model predicts held-out text, and how close its answers come to a
reference.

- Perplexity and bits per byte (`score_windows` -> `TextScore`): the summed negative log-likelihood
  of non-overlapping context windows, in the model's own fused loss; bytes come from
  `token_byte_lengths`, so bits per byte are exact and comparable between tokenizers (pretraining's
  and SFT's validation use the same table).
- BLEU: sacrebleu's sufficient statistics per answer (`13a` tokens for English, `zh` for Chinese),
  pooled into one corpus BLEU, so every answer keeps its language's tokenizer.
- ROUGE-1/2/L: precision, recall and F1 over words for English, characters for Chinese.
- `generation_metrics`: BLEU, ROUGE and exact match over a set of `Answer`s, overall and per task
  family.

ROUGE is written here (a few dozen lines) instead of taken from Google's `rouge-score`: that package
would be one more runtime dependency (with nltk and absl) for three counts, and its tokenizer keeps
only ASCII letters and digits, so a Chinese answer would score as empty. `tests/test_rouge.py`
checks precision, recall and F1 against `rouge_score.rouge_scorer.RougeScorer` (no stemmer) to
1e-9: on English with its own tokenizer, and on Chinese with our tokens handed to it.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from minigpt_cli.engine.data.tokenizer import Tokenizer
from minigpt_cli.engine.model.gpt import GPT
from minigpt_cli.engine.model.loss import IGNORE_INDEX
from minigpt_cli.engine.resources.governor import throttle_point

if TYPE_CHECKING:
    from sacrebleu.metrics import BLEU

TEXT_BATCH = 8  # context windows scored per forward pass

# Han ideographs (with extension A and the compatibility block), kana: scripts written without
# spaces between words, so they are scored character by character.
_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff"
_CJK_CHAR = re.compile(f"[{_CJK}]")
_ROUGE_TOKEN = re.compile(f"[{_CJK}]|[^\\W_{_CJK}]+")


# ----------------------------------------------------------------------------------------------
# Held-out text: perplexity and bits per byte
# ----------------------------------------------------------------------------------------------


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """UTF-8 bytes each token stands for, so validation can report bits per byte exactly."""
    special = set(tokenizer.special_ids)
    lengths = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    for token_id in range(tokenizer.vocab_size):
        if token_id in special:
            continue
        if tokenizer.is_byte(token_id):
            lengths[token_id] = 1
        elif not tokenizer.is_control(token_id):
            lengths[token_id] = len(tokenizer.piece(token_id).replace("\u2581", " ").encode())
    return lengths


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
    tokenizer: Tokenizer, documents: Sequence[str], context: int
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
    model: GPT,
    windows: Sequence[tuple[list[int], list[int]]],
    token_bytes: np.ndarray,
    pad_id: int,
    *,
    batch_size: int = TEXT_BATCH,
    on_batch: Callable[[], None] | None = None,
    prefix_bytes: int = 0,
) -> TextScore:
    """Summed negative log-likelihood of the windows' targets (the model's own fused loss, padding
    ignored) and the UTF-8 bytes those targets stand for, less `prefix_bytes` that are in no
    document (`dummy_prefix_bytes`)."""
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
    return TextScore(nats, tokens, total_bytes - prefix_bytes)


def dummy_prefix_bytes(tokenizer: Tokenizer, documents: Sequence[str]) -> int:
    """Bytes the targets of `documents` stand for that no document holds: with a dummy prefix
    (an imported Llama 2 tokenizer) each non-empty document's first token carries the space the
    prefix adds, one byte, which bits per byte must not count."""
    return sum(1 for document in documents if document) if tokenizer.dummy_prefix else 0


def score_text(model: GPT, tokenizer: Tokenizer, documents: Sequence[str]) -> TextScore:
    """Negative log-likelihood of `documents` under `model`, scored as `minigpt eval` scores text:
    from an end-of-text id, in non-overlapping windows of the model's context."""
    windows = text_windows(tokenizer, documents, int(model.config.context_length))
    return score_windows(
        model,
        windows,
        token_byte_lengths(tokenizer),
        tokenizer.pad_id,
        prefix_bytes=dummy_prefix_bytes(tokenizer, documents),
    )


def text_batches(windows: Sequence[tuple[list[int], list[int]]]) -> int:
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


_BLEU_SCORERS: dict[str, BLEU] = {}


def bleu_stats(hypothesis: str, reference: str, tokenize: str | None = None) -> BleuStats:
    """sacrebleu's statistics of one example, tokenised per `bleu_tokenizer(reference)` unless
    `tokenize` names one."""
    # lazy: every training stage imports this module (for `token_byte_lengths`) and never scores
    # BLEU; sacrebleu costs about 0.15 s and pulls in lxml and portalocker
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
    from sacrebleu.metrics import BLEU  # lazy: as in `bleu_stats`

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


@dataclass(frozen=True)
class RougeScore:
    """One ROUGE variant of one answer: the fields of rouge-score's `Score`."""

    precision: float  # matched units over the answer's units
    recall: float  # matched units over the reference's units
    fmeasure: float  # F1 (beta = 1)


def _overlap_score(overlap: int, hypothesis_count: int, reference_count: int) -> RougeScore:
    if overlap == 0 or hypothesis_count == 0 or reference_count == 0:
        return RougeScore(0.0, 0.0, 0.0)
    precision, recall = overlap / hypothesis_count, overlap / reference_count
    return RougeScore(precision, recall, 2 * precision * recall / (precision + recall))


def rouge_n_score(hypothesis: Sequence[str], reference: Sequence[str], n: int) -> RougeScore:
    """ROUGE-N: clipped n-gram overlap over the hypothesis's and the reference's n-grams."""
    hyp = Counter(tuple(hypothesis[i : i + n]) for i in range(len(hypothesis) - n + 1))
    ref = Counter(tuple(reference[i : i + n]) for i in range(len(reference) - n + 1))
    overlap = sum((hyp & ref).values())
    return _overlap_score(overlap, sum(hyp.values()), sum(ref.values()))


def rouge_n(hypothesis: Sequence[str], reference: Sequence[str], n: int) -> float:
    """ROUGE-N F1."""
    return rouge_n_score(hypothesis, reference, n).fmeasure


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


def rouge_l_score(hypothesis: Sequence[str], reference: Sequence[str]) -> RougeScore:
    """ROUGE-L: the longest common subsequence over both lengths (sentence-level: rouge-score's
    `rougeL`, not its `rougeLsum`)."""
    return _overlap_score(lcs_length(hypothesis, reference), len(hypothesis), len(reference))


def rouge_l(hypothesis: Sequence[str], reference: Sequence[str]) -> float:
    """ROUGE-L F1 (beta = 1)."""
    return rouge_l_score(hypothesis, reference).fmeasure


def rouge(hypothesis: str, reference: str) -> dict[str, RougeScore]:
    """`rouge1`, `rouge2`, `rougeL` of one answer against its reference, over `rouge_tokens`: what
    rouge-score's `RougeScorer.score(reference, answer)` gives for the same tokens."""
    hyp, ref = rouge_tokens(hypothesis), rouge_tokens(reference)
    return {
        "rouge1": rouge_n_score(hyp, ref, 1),
        "rouge2": rouge_n_score(hyp, ref, 2),
        "rougeL": rouge_l_score(hyp, ref),
    }


def rouge_scores(hypothesis: str, reference: str) -> dict[str, float]:
    """`rouge1`, `rouge2`, `rougeL` F1 of one answer against its reference."""
    return {key: score.fmeasure for key, score in rouge(hypothesis, reference).items()}


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
