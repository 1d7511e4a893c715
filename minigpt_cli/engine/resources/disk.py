"""Disk space a training run will take, predicted from the config before it writes anything.

A training verb refuses to start when its run folder's filesystem has less room than this plan
says it needs (exit status 2, with the numbers), so a full disk is met before the tokenizer is
trained rather than at a checkpoint an hour in. Like the memory estimate (`estimate.py`) it is
plain arithmetic on the config: no torch, no file system. What it cannot know from the config
(input sizes, the parent's adapter, what the run folder already holds) the caller measures and
passes in as `DiskFacts` (`engine/runs/space.py` does, for the CLI).

Every term is an upper bound, in bytes, each file rounded up to whole 4 KiB blocks:

- a snapshot (`checkpoints/step-N/`): the weight file(s) the stage saves (the whole model; a LoRA
  run's adapter only; PPO adds its value head; a reward model drops an untied output head and adds
  its score head), all fp32 as the Trainer saves them; the optimizer file (AdamW's two fp32 moments
  and a step per trainable tensor); trainer_state.json (mostly the RNG states, 29 kB; RLHF's may
  hold a rollout buffer). Safetensors headers are counted per tensor at a generous name length.
  Against the real snapshots of tiny runs: 0.7-2.5 % above for a whole model, 8-11 % for a LoRA
  adapter, whose snapshot is a third trainer state (`tests/test_disk.py`).
- snapshots at the peak: a new snapshot is complete before the oldest is removed, so a run holds
  `keep_last + 1` of them while saving (fewer when it saves fewer times; a resumed run counts the
  ones already there). The run's top-level files are hard links into the newest one; on a
  filesystem without hard links they are copies (`_link_into_place` falls back to copying),
  counted as one more snapshot and its largest file, which exists twice while it is swapped.
- shards: pretraining text is encoded into uint16 (uint32 past 65,536 pieces) shards; a token covers
  at least one byte of input (byte-fallback BPE, identity normalisation), plus one end-of-text per
  .txt file and, with an imported tokenizer's dummy prefix, the prefix's piece (a JSONL line's
  `{"text": ...}` has more bytes of syntax than both).
  Shards already there and unchanged are reused (nothing new); changed ones are removed first.
- tokenizer files, config.toml, metrics.jsonl (rows from the step count and cadences; not counted
  when the length follows data the plan does not know, e.g. `epochs` of fine-tuning records: a
  kilobyte a row), loss.png (its raw RGBA size, 1.4 MB: a PNG is never meaningfully larger; real
  ones are ~35 kB), the merged model of `--merge`.

Two moments can set the peak: a save during training (`keep_last + 1` snapshots), and the end
(one snapshot fewer, plus the merged model and loss.png). RLHF adds a third when it trains its
reward model first (in `RUN/reward/`, planned as its own run): that run's peak, after which what
it keeps stays. `DiskPlan` keeps the largest moment's terms.

The vocabulary a pretraining config names may be larger than the tokenizer trained (the built-in
corpus caps it), so a pretraining plan is an upper bound there too; fine-tuning stages read their
parent's real vocabulary. Checked for real: a tiny pretraining run (plan 5.53 MB) completes on a
tmpfs of exactly that size; its used space, polled, peaked at 5.40 MB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from minigpt_cli.config.params import count_parameters
from minigpt_cli.config.schema import Config, ModelConfig, TrainConfig
from minigpt_cli.engine.core.units import format_bytes

# ------------------------------------------------------------------------------- constants

HEADER_BYTES_PER_TENSOR = 160
"""Safetensors header bytes per tensor in a weight file: the name (`model.layers.12.self_attn.
q_proj.weight`, or a LoRA `...lora_A.weight`), its dtype, shape and 12-digit data offsets.
Measured: 104 (model), 115 (adapter) bytes per tensor at the fixtures' shapes."""

OPTIMIZER_HEADER_BYTES_PER_TENSOR = 576
"""Header bytes per trainable tensor in optimizer.safetensors: three entries (`name::exp_avg`,
`name::exp_avg_sq`, `name::step`) and the name again in the `param_groups` metadata. Measured:
400 (model), 434 (adapter)."""

HEADER_FIXED_BYTES = 1024
"""The length prefix, metadata (format, step, LoRA settings, param_groups' hyperparameters) and
padding of one safetensors file."""

STEP_BYTES = 8
"""AdamW's per-tensor step, saved as a 0-dim tensor (fp32 in torch 2; 8 allows int64)."""

STATE_BYTES = 36 * 1024
"""trainer_state.json without its `sources` and RLHF's rollout buffer: the torch, Python and numpy
RNG states, indented (29,047 bytes measured; at most ~29.5 kB with every 32-bit word at 10
digits), and the counters. Measured whole: 32.1-32.7 kB over every stage."""

METRICS_ROW_BYTES = 1024
"""One metrics.jsonl row (measured: 320-530 bytes, an eval row with exact match per family the
longest)."""

METRICS_EXTRA_ROWS = 8
"""Event rows besides train, eval and checkpoint rows: resume, governor and notes."""

PLOT_BYTES = 440 * (1 + 770 * 4) + 4096
"""loss.png: a 7 x 4 inch figure at 110 dpi (`training/plot.py`) is 770 x 440 RGBA pixels; PNG
stores at most the raw rows (with a filter byte each) plus chunk overhead. Measured: 35 kB."""

CONFIG_BYTES = 16 * 1024
"""config.toml (measured: 3.3-3.4 kB)."""

TOKENIZER_BYTES_PER_PIECE = 80
"""A sentencepiece model's bytes per vocabulary piece: at most 16 characters of up to 4 UTF-8
bytes, a score and a type, protobuf-framed (measured: 15 bytes a piece on the built-in corpus)."""

TOKENIZER_FIXED_BYTES = 8 * 1024
"""The sentencepiece model's trainer and normaliser specs and tokenizer.json's fixed fields."""

TOKENIZER_BYTES_PER_INPUT = 512
"""tokenizer.json and a shard folder's meta.json record each input file (path, size, sha256)."""

SHARD_META_BYTES = 2048
"""A shard folder's meta.json without its inputs."""

RL_BUFFER_BYTES_PER_TOKEN = 40
"""RLHF's trainer state holds the rollout buffer when a save falls mid-iteration (a Ctrl-C): per
response token an id, a position and a mask plus five fp32 values, base64-encoded (29 bytes raw);
per prompt token an int64 id, also base64."""


BLOCK_BYTES = 4096
"""A filesystem allocates whole blocks (ext4, xfs, APFS, tmpfs pages: 4 KiB): every file and folder
a run writes is counted rounded up to one."""


def on_disk(size: int) -> int:
    """`size` bytes of one file as the filesystem allocates them: whole blocks."""
    return -(-size // BLOCK_BYTES) * BLOCK_BYTES


def tensor_file_bytes(params: int, tensors: int, header_per_tensor: int) -> int:
    """Bytes of a safetensors file of `params` fp32 numbers in `tensors` tensors (upper bound)."""
    return 4 * params + tensors * header_per_tensor + HEADER_FIXED_BYTES


def model_tensor_count(model_cfg: ModelConfig) -> int:
    """Tensors of `GPT.export_state_dict()`: the embedding, nine per layer (four attention and
    three MLP projections, two norms), the final norm, and an untied output head."""
    return 2 + 9 * model_cfg.n_layer + (0 if model_cfg.tie_embeddings else 1)


# ------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class DiskFacts:
    """What a disk plan needs besides the config: measured by the caller, never guessed here.

    - `vocab_size`: the tokenizer's (a pretraining run that trains one: the config's, the bound).
    - `lora_params` / `lora_tensors`: the adapter a LoRA run trains (0: a full run).
    - `merge`: `--merge` writes the merged model.safetensors at the end.
    - `tokenizer_bytes`: the tokenizer files this run writes (copied from a parent or a given
      tokenizer: their size; None: trained here, bounded from the vocabulary; 0: already there).
    - `tokenizer_inputs`: input files a trained tokenizer records in tokenizer.json.
    - `shard_bytes`: shards still to write (an upper bound from the input sizes, less those already
      there that encoding would replace; 0 when they are reused or the data is in memory).
    - `token_bound`: at most this many training tokens (shards' bound), for an `epochs` length.
    - `steps_done`: steps (RLHF: iterations) already trained; `snapshots_present`: snapshot
      folders already there; `metrics_present`: bytes of metrics.jsonl already there (a resume
      rewrites it).
    - `hard_links`: whether the run folder's filesystem takes hard links.
    - `sources_bytes`: the length of the run's `sources` as JSON (paths of its inputs), which
      trainer_state.json repeats.
    - `reward`: RLHF: the facts of the reward model's own run when it is trained here.
    """

    vocab_size: int
    lora_params: int = 0
    lora_tensors: int = 0
    merge: bool = False
    tokenizer_bytes: int | None = None
    tokenizer_inputs: int = 1
    shard_bytes: int = 0
    token_bound: int | None = None
    steps_done: int = 0
    snapshots_present: int = 0
    metrics_present: int = 0
    hard_links: bool = True
    sources_bytes: int = 0
    reward: DiskFacts | None = None


# ------------------------------------------------------------------------------- one snapshot


@dataclass(frozen=True)
class SnapshotSize:
    """One snapshot's files in bytes (upper bounds of their sizes): `weights` (model or adapter,
    value head), `optimizer`, `state`. `total` is what the folder takes on disk (each file in
    whole blocks, and the folder's own block); `largest` the largest file, on disk."""

    weights: tuple[int, ...]
    optimizer: int
    state: int

    @property
    def files(self) -> tuple[int, ...]:
        return (*self.weights, self.optimizer, self.state)

    @property
    def total(self) -> int:
        return sum(on_disk(size) for size in self.files) + BLOCK_BYTES

    @property
    def largest(self) -> int:
        return on_disk(max(self.files))


def snapshot_size(
    model_cfg: ModelConfig,
    vocab_size: int,
    *,
    stage: str = "pretrain",
    lora_params: int = 0,
    lora_tensors: int = 0,
    value_head: bool = False,
    extra_state_bytes: int = 0,
) -> SnapshotSize:
    """What one checkpoint of `stage` writes, from the model's shape.

    `stage="reward"` is the reward model (backbone without an untied output head, plus the score
    head, every weight trained); `lora_params` > 0 saves and trains only the adapter;
    `value_head` adds PPO's value_head.safetensors and its moments. `extra_state_bytes` is added
    to trainer_state.json (the run's sources, RLHF's rollout buffer).
    """
    width = model_cfg.n_embd
    if stage == "reward":
        untied_head = 0 if model_cfg.tie_embeddings else vocab_size * width
        params = count_parameters(model_cfg, vocab_size) - untied_head + width
        tensors = model_tensor_count(model_cfg) - (0 if model_cfg.tie_embeddings else 1) + 1
    elif lora_params:
        params, tensors = lora_params, lora_tensors
    else:
        params, tensors = count_parameters(model_cfg, vocab_size), model_tensor_count(model_cfg)
    files = [tensor_file_bytes(params, tensors, HEADER_BYTES_PER_TENSOR)]
    trained_params, trained_tensors = params, tensors
    if value_head:
        files.append(tensor_file_bytes(width, 1, HEADER_BYTES_PER_TENSOR))
        trained_params, trained_tensors = params + width, tensors + 1
    optimizer = (
        2 * 4 * trained_params
        + STEP_BYTES * trained_tensors
        + trained_tensors * OPTIMIZER_HEADER_BYTES_PER_TENSOR
        + HEADER_FIXED_BYTES
    )
    return SnapshotSize(tuple(files), optimizer, STATE_BYTES + extra_state_bytes)


def rl_buffer_bytes(config: Config) -> int:
    """The rollout buffer in RLHF's trainer state (a mid-iteration save): every sequence's ids, and
    per response token what PPO/GRPO keeps, base64 (4/3) in JSON."""
    rl = config.rlhf
    sequences = rl.rollout_responses()
    context = config.model.context_length
    per_sequence = 8 * context * 4 // 3 + RL_BUFFER_BYTES_PER_TOKEN * rl.max_new_tokens + 64
    return sequences * per_sequence + 1024


def rl_steps_per_iteration(config: Config) -> int:
    """Optimizer steps in one RLHF iteration (as `RlStage` computes them): a run's saved `step`
    counts these, its lengths and cadences count iterations."""
    passes = config.rlhf.rollout_responses() * config.rlhf.passes()
    return max(1, passes // config.stage_train("rlhf").global_batch_size)


# ------------------------------------------------------------------------------- the run


def step_bound(
    train: TrainConfig, stage: str, seq_len: int, token_bound: int | None = None
) -> int | None:
    """At most this many steps (RLHF: iterations) from the training limits, or None when the
    length follows data the plan does not know (`epochs` over records, the built-in corpus).

    `max_tokens` bounds a pretraining run at a full window per sequence; a fine-tuning step trains
    at least one token, which bounds it too, loosely. `epochs` is bounded for pretraining on
    files (`token_bound`: windows of `seq_len`).
    """
    limits = []
    if train.max_steps is not None:
        limits.append(train.max_steps)
    if train.max_tokens is not None and stage != "rlhf":
        per_step = train.global_batch_size * seq_len if stage == "pretrain" else 1
        limits.append(max(1, math.ceil(train.max_tokens / per_step)))
    if train.epochs is not None and stage == "pretrain" and token_bound is not None:
        windows = max(1, (token_bound - 1) // seq_len)
        limits.append(max(1, math.ceil(train.epochs * windows / train.global_batch_size)))
    return min(limits) if limits else None


def snapshot_counts(present: int, saves: int | None, keep_last: int) -> tuple[int, int]:
    """(snapshots at the peak, snapshots at the end) when `saves` more are made (None: unknown,
    as many as it takes) over `present`: each save adds one, then the oldest beyond `keep_last`
    are removed (`save_checkpoint`)."""
    keep = max(keep_last, 1)
    count = peak = present
    rounds = keep + 2 if saves is None else min(saves, keep + 2)
    for _ in range(rounds):
        count += 1
        peak = max(peak, count)
        count = min(count, keep)
    return peak, count


@dataclass(frozen=True)
class DiskPlan:
    """A run's disk need at its peak: `terms` in bytes (what the sum is made of, in words), the
    moment it peaks (`when`; every moment's total in `moments`), one snapshot's size and how many
    new ones exist at the peak, whether the length was known (metrics.jsonl is not counted when it
    was not), and an RLHF run's plan for the reward model it trains first (`reward`)."""

    stage: str
    terms: dict[str, int]
    when: str
    snapshot: SnapshotSize
    new_snapshots: int
    length_known: bool = True
    moments: dict[str, int] = field(default_factory=dict)
    reward: DiskPlan | None = None
    keep_last: tuple[str, int] = ("train.keep_last", 2)  # the setting that decides, its value

    @property
    def need(self) -> int:
        """Bytes the run still writes at its peak (never below zero: a resume may free space)."""
        return max(0, sum(self.terms.values()))

    def describe(self) -> str:
        """The terms that add up to `need`, largest first: `3 snapshots x 1.8 MB, ...`."""
        parts = [
            self._term(name, value)
            for name, value in sorted(self.terms.items(), key=lambda item: -item[1])
            if value > 0
        ]
        text = ", ".join(parts) if parts else "nothing new"
        if self.when != "training":
            text += f"; at {self.when}"
        if not self.length_known:
            text += "; metrics.jsonl not counted (the run's length follows its data)"
        return text

    def _term(self, name: str, value: int) -> str:
        if name == "snapshots":
            count = self.new_snapshots
            unit = "snapshot" if count == 1 else "snapshots"
            return f"{count} {unit} x {format_bytes(self.snapshot.total)}"
        return f"{name} {format_bytes(value)}"

    def fits(self, free: int) -> bool:
        return self.need <= free

    def line(self, free: int) -> str:
        """The line shown before training: the need beside the free space."""
        need = format_bytes(self.need)
        return f"disk: needs at most {need} ({self.describe()}); {format_bytes(free)} free"

    def refusal(self, run_dir: object, free: int) -> str:
        """Why the run cannot start on this disk, with the numbers and what to change."""
        need, have = format_bytes(self.need), format_bytes(free)
        if need == have:  # close enough to print alike: show the difference
            need, have = f"{self.need / 1e6:,.3f} MB", f"{free / 1e6:,.3f} MB"
        key, value = self.keep_last
        fewer = f", keep fewer snapshots ({key} is {value})" if value > 1 else ""
        return (
            f"{run_dir}: needs {need} free ({self.describe()}), the disk has {have} free; "
            f"free some space{fewer}, or choose another --out"
        )


def _metrics_rows(
    train: TrainConfig, steps: int | None, done: int, saves: int | None, start_eval: bool
) -> int:
    if steps is None or saves is None or saves == 0:  # unknown length, or nothing left to train
        return 0
    rows = steps // train.log_every - done // train.log_every + 1
    rows += steps // train.eval_every - done // train.eval_every + 1
    rows += saves + METRICS_EXTRA_ROWS + (1 if start_eval and done == 0 else 0)
    return max(rows, 0)


def plan_disk(config: Config, stage: str, facts: DiskFacts) -> DiskPlan:
    """The disk a run of `stage` still needs at its peak, from the config and measured `facts`.

    `stage` is pretrain, sft, dpo, rlhf, or reward (RLHF's reward model, also planned through
    `facts.reward` of an rlhf plan).
    """
    train = config.stage_train(stage)
    seq_len = config.model.context_length
    extra_state = 2 * facts.sources_bytes
    if stage == "rlhf":
        extra_state += rl_buffer_bytes(config)
    snapshot = snapshot_size(
        config.model,
        facts.vocab_size,
        stage=stage,
        lora_params=facts.lora_params if stage != "reward" else 0,
        lora_tensors=facts.lora_tensors,
        value_head=stage == "rlhf" and config.rlhf.algorithm == "ppo",
        extra_state_bytes=extra_state,
    )
    steps = step_bound(train, stage, seq_len, facts.token_bound)
    done = facts.steps_done
    saves = None
    if steps is not None:
        saves = max(0, -(-steps // train.save_every) - done // train.save_every)
    if steps is not None and done >= steps:
        saves = 0
    present = facts.snapshots_present
    peak, end = snapshot_counts(present, saves, train.keep_last)

    if facts.tokenizer_bytes is None:
        tokenizer = (
            on_disk(
                TOKENIZER_BYTES_PER_PIECE * facts.vocab_size
                + TOKENIZER_FIXED_BYTES
                + TOKENIZER_BYTES_PER_INPUT * facts.tokenizer_inputs
            )
            + BLOCK_BYTES
        )  # tokenizer.model and tokenizer.json
    else:
        tokenizer = facts.tokenizer_bytes
    rows = _metrics_rows(train, steps, done, saves, start_eval=stage == "rlhf")
    steady = {
        "tokenizer": tokenizer,
        "shards": facts.shard_bytes,
        "metrics": on_disk(facts.metrics_present) + on_disk(METRICS_ROW_BYTES * rows),
        # config.toml, the lock, checkpoints/ and shards/ folders
        "config": CONFIG_BYTES + 3 * BLOCK_BYTES if saves != 0 else 0,
    }
    if not facts.hard_links and saves != 0:
        # Top-level copies of the newest snapshot, and the one file being swapped beside its copy.
        steady["top-level copies (no hard links here)"] = snapshot.total + snapshot.largest
    reward_moment: dict[str, int] = {}
    reward_plan = None
    if facts.reward is not None:
        reward_plan = plan_disk(config, "reward", facts.reward)
        kept = reward_plan.moments.get("the end", reward_plan.need)
        steady["reward model"] = kept
        reward_moment = {"tokenizer": tokenizer, "reward model": reward_plan.need}
    training = {**steady, "snapshots": (peak - present) * snapshot.total}
    ending = {**steady, "snapshots": (end - present) * snapshot.total}
    if saves != 0:
        if facts.merge and facts.lora_params:
            merged = count_parameters(config.model, facts.vocab_size)
            ending["merged model"] = on_disk(
                tensor_file_bytes(merged, model_tensor_count(config.model), HEADER_BYTES_PER_TENSOR)
            )
        if config.log.plot:
            ending["loss.png"] = on_disk(PLOT_BYTES)
    candidates = {"training": training, "the end": ending}
    if reward_moment:
        candidates["reward model training"] = reward_moment
    moments = {name: sum(terms.values()) for name, terms in candidates.items()}
    when = max(moments, key=lambda name: (moments[name], name == "training"))
    terms = candidates[when]
    new = (peak if when == "training" else end) - present
    return DiskPlan(
        stage=stage,
        terms=terms,
        when=when,
        snapshot=snapshot,
        new_snapshots=max(new, 0) if when != "reward model training" else 0,
        length_known=steps is not None,
        moments=moments,
        reward=reward_plan,
        keep_last=reward_plan.keep_last
        if reward_plan is not None and when == "reward model training"
        else (_keep_last_key(config, stage), train.keep_last),
    )


def _keep_last_key(config: Config, stage: str) -> str:
    """The setting a user changes to keep fewer snapshots: the stage's own when it sets one."""
    if getattr(getattr(config, stage, None), "keep_last", None) is not None:
        return f"{stage}.keep_last"
    return "train.keep_last"
