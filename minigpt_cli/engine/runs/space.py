"""A training run's disk plan from what is on disk: its inputs, its parent, its run folder.

`resources/disk.py` does the arithmetic from the config; this module measures what the config
does not say, before the verb's engine runs (so before a tokenizer is trained): the vocabulary and
tokenizer files a run copies, the adapter a LoRA run trains, the input bytes that bound the shards
(and which shards are already there and unchanged), the steps and snapshots a resumed run already
has, and the reward model an RLHF run trains first. `cli/training.py:execute` compares the plan's
need with `free_bytes` and refuses the run (exit 2) when it does not fit.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from minigpt_cli.config.loader import read_run_config
from minigpt_cli.config.schema import Config
from minigpt_cli.engine.data.files import expand_paths
from minigpt_cli.engine.data.shards import META_FILE as SHARD_META_FILE
from minigpt_cli.engine.data.shards import (
    DEFAULT_SHARD_TOKENS,
    is_shard_folder,
    shard_dtype,
    shards_on_disk,
    unchanged_shards,
)
from minigpt_cli.engine.data.tokenizer import Tokenizer
from minigpt_cli.engine.model.lora import count_lora_parameters
from minigpt_cli.engine.resources.disk import (
    BLOCK_BYTES,
    SHARD_META_BYTES,
    TOKENIZER_BYTES_PER_INPUT,
    DiskFacts,
    DiskPlan,
    on_disk,
    plan_disk,
    rl_steps_per_iteration,
)
from minigpt_cli.engine.runs import checkpoint as ckpt
from minigpt_cli.engine.runs.files import (
    ADAPTER_FILE,
    METRICS_FILE,
    MODEL_FILE,
    REWARD_DIR,
    TOKENIZER_FILE,
)


def free_bytes(folder: Path) -> int:
    """Bytes this user may still write on `folder`'s filesystem."""
    return shutil.disk_usage(folder).free


def plan_run_disk(
    stage: str,
    config: Config,
    run_dir: Path,
    sources: dict[str, Any],
    *,
    resume: bool,
    hard_links: bool = True,
) -> DiskPlan:
    """The disk plan of a `stage` run (pretrain, sft, dpo, rlhf) of the resolved `config` in
    `run_dir`, whose inputs are `sources` (the RunSpec's: data, val_data, from_run, tokenizer,
    lora, merge, reward_model...). Call it holding the run lock, after an --overwrite cleared the
    folder: what the folder holds then counts as present."""
    point = ckpt.find_resume_point(run_dir) if resume and run_dir.is_dir() else None
    steps = int(ckpt.read_state(point)["step"]) if point is not None else 0
    if stage == "rlhf":  # a saved step counts optimizer steps; RLHF's lengths count iterations
        steps //= rl_steps_per_iteration(config)
    base = _progress(
        run_dir,
        point,
        steps,
        vocab_size=config.tokenizer.vocab_size,
        hard_links=hard_links,
        sources_bytes=len(json.dumps(sources, ensure_ascii=False)),
    )
    if stage == "pretrain":
        return plan_disk(config, stage, _pretrain_facts(base, config, run_dir, sources, resume))
    parent = Path(sources["from_run"])
    tokenizer = Tokenizer.load(parent)
    facts = replace(
        _lora_facts(base, config, parent, sources),
        vocab_size=tokenizer.vocab_size,
        tokenizer_bytes=_tokenizer_bytes(tokenizer, parent),
    )
    if stage == "rlhf":
        facts = replace(facts, reward=_reward_facts(config, run_dir, sources, facts))
    return plan_disk(config, stage, facts)


# ------------------------------------------------------------------------------- measurements


def _progress(
    run_dir: Path,
    point: Path | None,
    steps: int,
    *,
    vocab_size: int,
    hard_links: bool,
    sources_bytes: int,
) -> DiskFacts:
    """What a run folder already holds: `steps` trained at its resume `point` (None: a run that
    starts now), its snapshot folders, and a resumed run's metrics.jsonl (rewritten when it is
    trimmed); with the facts every run shares."""
    metrics = run_dir / METRICS_FILE
    return DiskFacts(
        vocab_size=vocab_size,
        steps_done=steps,
        snapshots_present=len(ckpt.snapshots(run_dir)),
        metrics_present=metrics.stat().st_size if point is not None and metrics.is_file() else 0,
        hard_links=hard_links,
        sources_bytes=sources_bytes,
    )


def _tokenizer_bytes(tokenizer: Tokenizer, source: Path) -> int:
    """The files `Tokenizer.save` writes for `tokenizer`, loaded from `source` (folder or file)."""
    model = source / TOKENIZER_FILE if source.is_dir() else source
    meta = len(json.dumps(tokenizer.meta, indent=2, ensure_ascii=False).encode("utf-8"))
    return on_disk(model.stat().st_size) + (on_disk(meta) if tokenizer.meta else 0)


def _pretrain_facts(
    base: DiskFacts, config: Config, run_dir: Path, sources: dict[str, Any], resume: bool
) -> DiskFacts:
    """Vocabulary, tokenizer files and shards of a pretraining run.

    The tokenizer is the run's own on --resume, else a copy of --tokenizer or --from, else trained
    here (the config's vocabulary, an upper bound). Text inputs are encoded into RUN/shards/:
    bounded from their sizes, less the shards already there that the encode removes first; shards
    already there for the same tokenizer and unchanged inputs are reused (nothing new).
    """
    given = sources.get("tokenizer") or sources.get("from_run")
    if resume and (run_dir / TOKENIZER_FILE).is_file():
        tokenizer: Tokenizer | None = Tokenizer.load(run_dir)
        tokenizer_bytes: int | None = 0
    elif given:
        tokenizer = Tokenizer.load(Path(given))
        tokenizer_bytes = _tokenizer_bytes(tokenizer, Path(given))
    else:
        tokenizer, tokenizer_bytes = None, None
    vocab = tokenizer.vocab_size if tokenizer is not None else config.tokenizer.vocab_size
    itemsize = shard_dtype(vocab).itemsize
    shard_bytes, token_bound, inputs = 0, None, 1
    for key, folder in (("data", "train"), ("val_data", "val")):
        paths = [Path(p) for p in sources.get(key) or []]
        if not paths:
            continue
        if len(paths) == 1 and is_shard_folder(paths[0]):
            if key == "data":
                meta = json.loads((paths[0] / SHARD_META_FILE).read_text(encoding="utf-8"))
                token_bound = int(meta.get("total_tokens", 0)) or None
            continue
        files = expand_paths(paths, kind="pretrain")
        # A .txt file is one document: its end of text, and a dummy prefix's piece if any.
        per_txt = 2 if tokenizer is not None and tokenizer.dummy_prefix else 1
        tokens = sum(
            path.stat().st_size + per_txt * (path.suffix.lower() == ".txt") for path in files
        )
        if key == "data":
            token_bound, inputs = tokens, len(files)
        meta_bytes = SHARD_META_BYTES + sum(
            TOKENIZER_BYTES_PER_INPUT + len(str(path.resolve())) for path in files
        )
        shard_files = max(1, -(-tokens // DEFAULT_SHARD_TOKENS))  # each rounded up to a block
        bound = itemsize * tokens + (shard_files + 1) * BLOCK_BYTES + on_disk(meta_bytes)
        out = run_dir / "shards" / folder
        if tokenizer is not None and unchanged_shards(out, tokenizer.sha256, files):
            continue
        shard_bytes += max(0, bound - shards_on_disk(out))
    return replace(
        base,
        vocab_size=vocab,
        tokenizer_bytes=tokenizer_bytes,
        tokenizer_inputs=inputs,
        shard_bytes=shard_bytes,
        token_bound=token_bound,
    )


def _lora_facts(
    base: DiskFacts, config: Config, parent: Path, sources: dict[str, Any]
) -> DiskFacts:
    """The adapter a fine-tuning run trains: --lora's, or an unmerged LoRA parent's (continued
    with the parent's settings); none for a full run."""
    parent_adapter = (parent / ADAPTER_FILE).is_file() and not (parent / MODEL_FILE).is_file()
    if not (sources.get("lora") or parent_adapter):
        return base
    settings = read_run_config(parent).lora if parent_adapter else config.lora
    return replace(
        base,
        lora_params=count_lora_parameters(config.model, settings),
        lora_tensors=2 * config.model.n_layer * len(settings.targets),
        merge=bool(sources.get("merge")),
    )


def _reward_facts(
    config: Config, run_dir: Path, sources: dict[str, Any], policy: DiskFacts
) -> DiskFacts | None:
    """The reward model's run (RUN/reward/) when this RLHF run trains one: none with --reward rule
    or --reward-model (a resumed run names its own reward/ there), nor when it finished earlier.
    It shares the policy's vocabulary, tokenizer files and filesystem."""
    if config.rlhf.reward not in ("model", "both") or sources.get("reward_model"):
        return None
    reward_dir = run_dir / REWARD_DIR
    point = ckpt.find_resume_point(reward_dir) if reward_dir.is_dir() else None
    state = ckpt.read_state(point) if point is not None else {}
    if state.get("finished"):
        return None
    preference = {"preference_data": list(sources.get("preference_data") or [])}
    progress = _progress(
        reward_dir,
        point,
        int(state.get("step", 0)),
        vocab_size=policy.vocab_size,
        hard_links=policy.hard_links,
        sources_bytes=len(json.dumps(preference, ensure_ascii=False)),
    )
    return replace(progress, tokenizer_bytes=policy.tokenizer_bytes)
