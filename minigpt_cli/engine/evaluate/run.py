"""`minigpt eval`'s entry point: every run loaded once, measured on the same data, and freed.

`run_eval` orders the runs (parents first, so a parent's pair scores are at hand for its child),
measures each (`_measure_run`: held-out text, answers, preference pairs), scores a parent that is
not listed only as the reference of its child's pairs, and assembles the `EvalReport`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minigpt_cli.engine.core.events import EventCallback, emit
from minigpt_cli.engine.evaluate.answers import (
    answer_batches,
    answer_prompts,
    load_reward_judge,
    reward_metrics,
)
from minigpt_cli.engine.evaluate.data import load_eval_data
from minigpt_cli.engine.evaluate.preferences import (
    PairScores,
    pair_batches,
    preference_scores,
    preference_summary,
    score_pairs,
)
from minigpt_cli.engine.evaluate.report import (
    MEAN_LOGPROB,
    PARENT_REWARD,
    PARTS,
    EvalOptions,
    EvalReport,
    RunReport,
)
from minigpt_cli.engine.hardware.device import resolve_device
from minigpt_cli.engine.metrics.text import (
    dummy_prefix_bytes,
    generation_metrics,
    score_windows,
    text_batches,
    text_windows,
    token_byte_lengths,
)
from minigpt_cli.engine.model.quantize import quantize_model
from minigpt_cli.engine.resources.governor import release_memory
from minigpt_cli.engine.runs.checkpoint import read_state
from minigpt_cli.engine.runs.files import ADAPTER_FILE, MODEL_FILE
from minigpt_cli.engine.runs.load import RewardRun, ancestors, load_run, parent_run
from minigpt_cli.errors import UserError

STAGE = "eval"  # the stage name of every event this module emits


def check_run_dirs(run_dirs: Sequence[Path]) -> None:
    """Refuse a path that is not a run holding weights, naming it, before anything is loaded."""
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
        sum(ancestor.resolve() in listed for ancestor in ancestors(Path(run_dir)))
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


def run_eval(
    run_dirs: Sequence[Path], options: EvalOptions, on_event: EventCallback | None = None
) -> EvalReport:
    """Measure every run on the same data; the report lists them in the order given.

    Each run is loaded once (parents first when both are listed) and freed before the next; a
    parent that is not listed is loaded only to score the preference pairs. The output depends
    only on the runs, the data, the options and the device.
    """
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
            parent = parent_run(run_dir, state)
            parent_pairs = None
            if parent is not None:
                parent_pairs = pair_cache.get(parent.resolve())
                if parent_pairs is None:
                    parent_pairs = _score_parent(
                        parent, pair_records, device, on_event, options.quantize
                    )
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
    judge: RewardRun | None = None,
) -> tuple[RunReport, PairScores | None]:
    """Load one run and measure what `data` holds; its own pair scores come back separately (the
    preference metrics need the parent's too). The model is freed when this returns."""
    loaded = load_run(run_dir, str(device))
    if options.quantize is not None:
        quantize_model(loaded.model, options.quantize)
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
            model,
            windows,
            token_byte_lengths(tokenizer),
            tokenizer.pad_id,
            on_batch=progress,
            prefix_bytes=dummy_prefix_bytes(tokenizer, data["text"]),
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
    parent: Path,
    records: Sequence[dict],
    device: torch.device,
    on_event: EventCallback | None,
    quantize: str | None = None,
) -> PairScores:
    """Load a parent run only to score the preference pairs as the reference, then free it (in
    the same int8 weights as the run, with `--quantize`, so both sides of the margin match)."""
    loaded = load_run(parent, str(device))
    if quantize is not None:
        quantize_model(loaded.model, quantize)
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
