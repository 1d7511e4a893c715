"""What `minigpt eval` is asked and what it answers: the options, and the report --json prints.

Kept apart from the measuring so the CLI and quickstart can build options and render a report
without importing torch, and so `data` and `run` share one definition of the options.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from minigpt_cli.config.schema import EvalConfig

# Prompts and pairs per task family (tiny runs evaluate in seconds): the schema holds the default.
DEFAULT_PER_FAMILY: int = EvalConfig.model_fields["per_family"].default

PARTS = ("text", "generation", "preference")
PARENT_REWARD = "parent_reward"  # pref_score: log p_run(reply) - log p_parent(reply)
MEAN_LOGPROB = "mean_logprob"  # pref_score: mean log p_run per reply token (no parent)


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
    quantize: str | None = None  # "int8": every run (and a parent scored beside it) in int8 weights

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


BEST_RUN_RULE = (
    "the chat run with the highest held-out exact match; a tie goes to the higher reward-model "
    "score, then to the later stage"
)


def best_chat_run(report: EvalReport) -> RunReport | None:
    """The run quickstart tells the user to chat with, by `BEST_RUN_RULE` (None: no chat run).

    Chosen from measurements, not by position: the last stage is not always the best model (an RL
    stage that exploits its reward model answers worse), and a user who chats with the wrong run
    judges the whole pipeline by it. Exact match comes first because it is what the held-out
    questions check; the reward model's score only separates runs that answer equally well.
    """
    candidates = [
        (index, run)
        for index, run in enumerate(report.runs)
        if run.chat and run.metrics.get("exact_match") is not None
    ]
    if not candidates:
        return None

    def key(entry: tuple[int, RunReport]) -> tuple[float, float, int]:
        index, run = entry
        reward = run.metrics.get("reward")
        return (run.metrics["exact_match"], float("-inf") if reward is None else reward, index)

    return max(candidates, key=key)[1]
