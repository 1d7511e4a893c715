"""Peak memory of a training run, predicted from the config before anything large is allocated.

The resource governor shows this estimate beside the memory cap before the first step, lowers the
micro-batch (then turns on activation checkpointing) when the configured one would not fit, and
refuses to start when nothing fits; `doctor` recommends a preset from the same numbers. All of that
happens before torch allocates the model, so this is plain arithmetic on the config: no torch
import, here or inside.

The estimate is of the process's peak RSS on the CPU, term by term (bytes):

- framework: the interpreter, torch and the libraries a training run imports, the optimizer's
  first-use imports, and the heap that preparing the data (tokenizer training, encoding) leaves
  behind. Measured (FRAMEWORK_BYTES + PIPELINE_BYTES), or passed in by a caller that measured.
- weights: fp32 parameters (the master copy, also under bf16 autocast), the rotary tables, and any
  frozen models a stage holds (PPO's reference and reward models; DPO keeps only cached numbers).
- gradients: one fp32 gradient per trainable parameter. They live across the micro-batches of an
  optimizer step, so they coexist with a whole micro-batch's activations.
- buckets: under DistributedDataParallel, the reducer's flat buffers the gradients are copied
  into for the all-reduce (buckets of `bucket_cap_mb`, 25 MB by default, covering every trainable
  parameter: one more copy of the gradients, allocated when the model is wrapped, for the run).
- optimizer: AdamW's two fp32 moments per trainable parameter.
- activations: what autograd saves for backward over one micro-batch, counted tensor by tensor
  from `model/layers.py` (`activations.py`; a test checks the count against saved-tensor hooks on
  the real model), plus the largest short-lived working set of the step (a chunk of the fused
  loss's logits, or the SwiGLU backward).
- allocator: heap that glibc keeps resident beyond the live tensors (ALLOCATOR_SLACK).
- data: token buffers (the built-in corpus as an int32 array; the resident pages of memory-mapped
  shards) and the token ids of one optimizer step's micro-batches.
- other: anything else a stage holds (a KV cache for rollouts, ...).

A training step is one peak; two more come between steps, when gradients and activations are freed
but most of the heap they used stays resident (SAVE_RESIDUE): saving a snapshot, with the
serialised files on top (checkpoint), and validation, whose 8-sequence batches can be larger than
a small micro-batch (evaluation). `MemoryEstimate.total` is the largest of the three.

Calibration (`benchmarks/memory.py`, x86-64 Linux, glibc malloc, torch 2.13 CPU, one thread, fp32):
shapes tiny, small, a grouped-query and a deep narrow one, micro-batches 1-32, with and without
activation checkpointing; the constants below are fitted there and the benchmark's table is in the
README. bf16 autocast is counted structurally (2-byte saved tensors, autocast's weight copies) and
not calibrated separately; on CUDA and MPS the tensors live in device memory and only `framework`
and `data` are host RSS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict, Unpack

from minigpt_cli.config.params import count_parameters
from minigpt_cli.config.schema import Config, ModelConfig
from minigpt_cli.engine.resources.activations import activation_bytes, evaluation_bytes

MiB = 2**20

# ------------------------------------------------------------------------------- constants

FRAMEWORK_BYTES = 310 * MiB
"""RSS of a training process once everything but the model is in place: about 220 MiB right after
`import torch`, 230 MiB with the model code, and another ~70 MiB when the first `torch.optim.AdamW`
is built (its lazy imports). Measured as RSS after the Trainer is built minus weights and data:
310-312 MiB for every benchmarked shape."""

ALLOCATOR_SLACK = 0.75
"""Resident heap beyond the live tensors, as a fraction of one micro-batch's heap-allocated
activations. glibc serves blocks under its adaptive mmap threshold (up to 32 MiB) from the heap,
and a freed block between live ones stays resident; forward and backward allocate and free in
different orders, so the heap settles well above what is live at once (per benchmark row 0.55-0.95,
varying from run to run too). A fixed mmap threshold (mallopt M_MMAP_THRESHOLD = 1 MiB) removes
this slack but made a `tiny` step 50 % slower (page faults on every fresh block), so it is counted
rather than avoided."""

CHECKPOINTED_SLACK = 0.55
"""The same with activation checkpointing, as a fraction of the activations the micro-batch would
have without it: what fragments the heap is everything the forward allocates, kept or not, but
each checkpointed layer frees its tensors before the next one allocates (fitted: 0.45-0.72)."""

SAVE_RESIDUE = 0.7
"""Fraction of a step's gradients + activations + allocator heap (blocks mapped on their own aside)
still resident while a snapshot is saved after it: glibc trims only the top of the heap. Varies
from run to run (fitted: 0.57-0.81)."""

CHECKPOINT_COPIES = 2
"""In-memory copies of the largest file while a snapshot is written: `engine/runs/checkpoint.py` has
safetensors serialise each file into a buffer and then into bytes (measured: a 192 MiB file raised
peak RSS by 385 MiB)."""

PIPELINE_BYTES = 45 * MiB
"""Heap that preparing the data leaves resident in a `minigpt` training process: training the
tokenizer (sentencepiece) and encoding the corpus into Python lists before the int32 array.
Measured on `minigpt pretrain` with the built-in corpus: 40-50 MiB over a bare training process.
Counted by default; `framework_bytes` replaces FRAMEWORK_BYTES + PIPELINE_BYTES."""

OPTIMIZER_IMPORT_BYTES = 72 * MiB
"""RSS added by building the first `torch.optim` optimizer: it imports some 800 modules (dynamo,
sympy, mpmath). Part of FRAMEWORK_BYTES; for callers that measure their RSS before building one."""


# ------------------------------------------------------------------------------- the estimate


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak RSS of a training run, in bytes, by what holds the memory.

    The terms are the module doc's; besides them, `mapped` is the part of `activations` in blocks
    glibc maps on their own (returned when freed), and `evaluation` the resident cost of one
    validation forward of `eval_sequences` sequences.
    """

    framework: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    allocator: int
    checkpoint: int
    data: int
    other: int
    micro_batch_size: int
    seq_len: int
    sequences_per_example: int = 1
    activation_checkpointing: bool = False
    precision: str = "fp32"
    mapped: int = 0
    evaluation: int = 0
    eval_sequences: int = 8
    buckets: int = 0

    @property
    def resident(self) -> int:
        """What stays allocated all run: framework, weights, AdamW moments, DDP's buckets, data,
        other."""
        return (
            self.framework + self.weights + self.optimizer + self.buckets + self.data + self.other
        )

    @property
    def step_heap(self) -> int:
        """What a training step adds: gradients, one micro-batch's activations, allocator slack."""
        return self.gradients + self.activations + self.allocator

    @property
    def step_peak(self) -> int:
        """Peak RSS during a training step."""
        return self.resident + self.step_heap

    @property
    def settled_heap(self) -> int:
        """What stays resident of a step's heap once the step is over (glibc trims only the top
        of the heap; blocks that had their own mapping are returned)."""
        return int(SAVE_RESIDUE * (self.step_heap - self.mapped))

    @property
    def save_peak(self) -> int:
        """Peak RSS while saving a snapshot: the settled heap plus the serialised files."""
        return self.resident + self.settled_heap + self.checkpoint

    @property
    def eval_peak(self) -> int:
        """Peak RSS while evaluating after a step: the settled heap plus the evaluation's forward
        (its batch can be larger than the micro-batch), or the step's heap if that is larger."""
        return self.resident + max(self.step_heap, self.settled_heap + self.evaluation)

    @property
    def peaks(self) -> dict[str, int]:
        """Each moment's peak RSS: a training step, an evaluation, a checkpoint save."""
        return {"step": self.step_peak, "eval": self.eval_peak, "checkpoint": self.save_peak}

    @property
    def total(self) -> int:
        """The predicted peak RSS of the whole process: the largest of the three peaks."""
        return max(self.peaks.values())

    @property
    def peak_when(self) -> str:
        """Which moment sets the peak: "step", "eval" or "checkpoint" (a tie goes to the step)."""
        peaks = self.peaks
        return max(peaks, key=lambda name: (peaks[name], name == "step"))

    def describe(self) -> str:
        """One line in MB (2^20 bytes): the total and the terms that add up to it."""

        def mb(value: float) -> str:
            return f"{value / MiB:,.0f}"

        shape = f"micro-batch {self.micro_batch_size}"
        if self.sequences_per_example != 1:
            shape += f" x {self.sequences_per_example} sequences"
        shape += f" x {self.seq_len} tokens"
        if self.activation_checkpointing:
            shape += ", checkpointed"
        parts = [
            f"framework {mb(self.framework)}",
            f"weights {mb(self.weights)}",
            f"grads {mb(self.gradients)}",
            f"AdamW {mb(self.optimizer)}",
            *([f"DDP buckets {mb(self.buckets)}"] if self.buckets else []),
            f"activations {mb(self.activations)} ({shape})",
            f"allocator {mb(self.allocator)}",
            f"data {mb(self.data)}",
        ]
        if self.other:
            parts.append(f"other {mb(self.other)}")
        terms = " + ".join(parts)
        when = self.peak_when
        if when == "step":
            return f"estimated peak {mb(self.total)} MB = {terms}"
        moment = {
            "checkpoint": f"while saving a checkpoint ({mb(self.checkpoint)} MB serialised)",
            "eval": f"while evaluating ({self.eval_sequences} sequences at a time)",
        }[when]
        return (
            f"estimated peak {mb(self.total)} MB {moment}; a training step peaks at "
            f"{mb(self.step_peak)} MB = {terms}"
        )


class StageMemory(TypedDict, total=False):
    """What a stage tells the estimate beyond its config: keywords of `estimate_training_memory`."""

    seq_len: int | None
    trainable_params: int | None
    extra_frozen_params: int
    sequences_per_example: int
    other_bytes: int
    framework_bytes: int | None
    ddp_buckets: bool


class MemoryInputs(StageMemory, total=False):
    """The estimate's keywords besides the model, the batch, precision and checkpointing."""

    data_bytes: int
    eval_sequences: int


def estimate_training_memory(
    model_cfg: ModelConfig,
    vocab_size: int,
    *,
    micro_batch_size: int,
    seq_len: int | None = None,
    precision: str = "fp32",
    activation_checkpointing: bool | None = None,
    trainable_params: int | None = None,
    extra_frozen_params: int = 0,
    sequences_per_example: int = 1,
    global_batch_size: int | None = None,
    data_bytes: int = 0,
    other_bytes: int = 0,
    eval_sequences: int = 8,
    framework_bytes: int | None = None,
    ddp_buckets: bool = False,
) -> MemoryEstimate:
    """Predicted peak RSS of training `GPT(model_cfg, vocab_size)` at this micro-batch.

    - `seq_len`: tokens per sequence (default: the model's context length).
    - `precision`: "fp32", or "bf16"/"fp16" autocast (weights and AdamW stay fp32). A run whose
      precision is still "auto" should pass "fp32", the larger estimate.
    - `activation_checkpointing`: default: the model config's flag.
    - `trainable_params`: parameters with gradients and AdamW moments (default: all; LoRA passes
      its adapters' count).
    - `extra_frozen_params`: parameters of other models the stage holds without training them
      (PPO's reference and reward models), fp32.
    - `sequences_per_example`: sequences one example puts through the model (DPO: 2, chosen and
      rejected), so a micro-batch of n examples runs n x this many sequences.
    - `global_batch_size`: examples per optimizer step (default: the micro-batch); the Trainer
      gathers the token ids of all of a step's micro-batches before the first forward.
    - `data_bytes`: token buffers held in memory (the built-in corpus: 4 bytes per token;
      memory-mapped shards: the pages a run touches). `other_bytes`: anything else the stage holds.
    - `eval_sequences`: sequences per validation forward (`PretrainStage` evaluates 8 at a time,
      whatever the micro-batch).
    - `framework_bytes`: the process's own footprint. Default: FRAMEWORK_BYTES + PIPELINE_BYTES,
      a training process that prepared its data itself. A caller that can measure does better:
      `framework_from_rss(rss)` with its RSS just before the model is built (the data's heap
      included; then pass data already loaded as data_bytes=0).
    - `ddp_buckets`: the model trains under DistributedDataParallel (one more gradient copy).
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be at least 1, got {micro_batch_size}")
    if sequences_per_example < 1:
        raise ValueError(f"sequences_per_example must be at least 1, got {sequences_per_example}")
    if min(extra_frozen_params, data_bytes, other_bytes, framework_bytes or 0) < 0:
        raise ValueError(
            "extra_frozen_params, data_bytes, other_bytes and framework_bytes must not be negative"
        )
    if eval_sequences < 1:
        raise ValueError(f"eval_sequences must be at least 1, got {eval_sequences}")
    seq = model_cfg.context_length if seq_len is None else seq_len
    if not 1 <= seq <= model_cfg.context_length:
        raise ValueError(f"seq_len must be in 1..{model_cfg.context_length}, got {seq}")
    checkpointing = (
        model_cfg.activation_checkpointing
        if activation_checkpointing is None
        else activation_checkpointing
    )
    total_params = count_parameters(model_cfg, vocab_size)
    trainable = total_params if trainable_params is None else trainable_params
    if not 0 <= trainable <= total_params:
        raise ValueError(f"trainable_params must be in 0..{total_params}, got {trainable}")
    rotary = 2 * model_cfg.context_length * model_cfg.head_dim * 4
    tokens = micro_batch_size * sequences_per_example * seq
    acts = activation_bytes(
        model_cfg,
        vocab_size,
        tokens=tokens,
        precision=precision,
        activation_checkpointing=checkpointing,
    )
    # The heap fragments with everything the forward allocates, kept or recomputed.
    churn = activation_bytes(model_cfg, vocab_size, tokens=tokens, precision=precision).heap
    slack = CHECKPOINTED_SLACK if checkpointing else ALLOCATOR_SLACK
    evaluation = evaluation_bytes(
        model_cfg, vocab_size, tokens=eval_sequences * seq, precision=precision
    )
    examples = micro_batch_size if global_batch_size is None else global_batch_size
    if examples < micro_batch_size:
        raise ValueError(
            f"global_batch_size ({examples}) is smaller than micro_batch_size ({micro_batch_size})"
        )
    batch_ids = examples * sequences_per_example * (seq + 1) * 8
    return MemoryEstimate(
        framework=FRAMEWORK_BYTES + PIPELINE_BYTES if framework_bytes is None else framework_bytes,
        weights=4 * (total_params + extra_frozen_params) + rotary,
        gradients=4 * trainable,
        optimizer=8 * trainable,
        buckets=4 * trainable if ddp_buckets else 0,
        activations=acts.live,
        mapped=acts.mapped,
        allocator=int(slack * churn),
        # The optimizer file (two moments per trainable parameter) or the model file.
        checkpoint=CHECKPOINT_COPIES * max(8 * trainable, 4 * total_params),
        data=data_bytes + batch_ids,
        other=other_bytes,
        micro_batch_size=micro_batch_size,
        seq_len=seq,
        sequences_per_example=sequences_per_example,
        activation_checkpointing=checkpointing,
        precision=precision,
        evaluation=int((1 + ALLOCATOR_SLACK) * evaluation),
        eval_sequences=eval_sequences,
    )


def framework_from_rss(rss_bytes: int, optimizer_built: bool = False) -> int:
    """`framework_bytes` from the process's RSS measured before the model is built: that, plus
    what building the first optimizer will import, and never less than a bare process's
    FRAMEWORK_BYTES (other imports may still come)."""
    return max(FRAMEWORK_BYTES, rss_bytes + (0 if optimizer_built else OPTIMIZER_IMPORT_BYTES))


def estimate_for_config(
    config: Config,
    vocab_size: int | None = None,
    *,
    stage: str = "pretrain",
    micro_batch_size: int | None = None,
    precision: str | None = None,
    activation_checkpointing: bool | None = None,
    **kwargs: Unpack[MemoryInputs],
) -> MemoryEstimate:
    """The estimate for a resolved run config: its stage's micro- and global batch, its model.

    `precision` defaults to the stage's setting, with "auto" counted as fp32 (the larger of the
    two); `vocab_size` to the tokenizer section's. Other keywords go to
    `estimate_training_memory` (data_bytes, trainable_params, ...).
    """
    train = config.stage_train(stage)
    chosen = precision or train.precision
    return estimate_training_memory(
        config.model,
        config.tokenizer.vocab_size if vocab_size is None else vocab_size,
        micro_batch_size=micro_batch_size or train.micro_batch_size,
        global_batch_size=train.global_batch_size,
        precision="fp32" if chosen == "auto" else chosen,
        activation_checkpointing=activation_checkpointing,
        **kwargs,
    )


def largest_micro_batch(
    cap_bytes: int,
    model_cfg: ModelConfig,
    vocab_size: int,
    *,
    configured: int,
    global_batch_size: int,
    precision: str = "fp32",
    activation_checkpointing: bool | None = None,
    **kwargs: Unpack[MemoryInputs],
) -> int | None:
    """The largest micro-batch <= `configured` that divides `global_batch_size` and whose
    estimate fits under `cap_bytes`; None when not even 1 fits.

    The governor never raises the micro-batch above the configured one, and only picks divisors of
    the global batch so accumulation keeps the global batch exact. Other keywords (seq_len,
    precision, activation_checkpointing, trainable_params, ...) go to `estimate_training_memory`.
    """
    if configured < 1 or global_batch_size < 1:
        raise ValueError("configured and global_batch_size must be at least 1")
    for size in range(min(configured, global_batch_size), 0, -1):
        if global_batch_size % size:
            continue
        estimate = estimate_training_memory(
            model_cfg,
            vocab_size,
            micro_batch_size=size,
            global_batch_size=global_batch_size,
            precision=precision,
            activation_checkpointing=activation_checkpointing,
            **kwargs,
        )
        if estimate.total <= cap_bytes:
            return size
    return None


# ------------------------------------------------------------------------------- the decision


@dataclass(frozen=True)
class MemoryPlan:
    """What the governor does about memory before the first step, decided from the estimate alone.

    - `micro_batch_size` / `activation_checkpointing`: the setting to train with (when nothing
      fits: micro-batch 1 with checkpointing, the smallest there is).
    - `estimate`: the chosen setting's estimate (when nothing fits: that smallest setting's, the
      least this plan accepts: a cap of at least its total fits).
    - `configured_estimate`: the configured setting's, shown beside the cap before training.
    - `messages`: governor messages for what was changed (empty when the configured one fits).
    - `fits`: False when not even the smallest setting fits under `cap_bytes`.
    """

    micro_batch_size: int
    activation_checkpointing: bool
    estimate: MemoryEstimate
    configured_estimate: MemoryEstimate
    messages: list[str]
    fits: bool
    cap_bytes: int
    configured_micro_batch_size: int
    global_batch_size: int

    @property
    def changed(self) -> bool:
        """True when the governor lowers the micro-batch or switches checkpointing on."""
        return bool(self.messages)

    @property
    def refusal(self) -> str:
        """The one-line reason a run cannot start under this cap (meaningful when not `fits`)."""
        return (
            "does not fit in memory: even micro-batch 1 with activation checkpointing needs about "
            f"{self.estimate.total / MiB:,.0f} MB ({self.estimate.describe()}), over the "
            f"{self.cap_bytes / MiB:,.0f} MB cap; raise --max-memory, or choose a smaller preset "
            "or model.context_length"
        )


def plan_micro_batch(
    config: Config,
    vocab_size: int,
    precision: str,
    data_bytes: int,
    cap_bytes: int,
    *,
    stage: str = "pretrain",
    **kwargs: Unpack[StageMemory],
) -> MemoryPlan:
    """The governor's memory decision for a run of `config` under `cap_bytes`, before step 1.

    One function so that `pretrain` (which acts on it) and `doctor` (which recommends from it)
    cannot disagree. The order of levers is the cheapest first: keep the configured micro-batch if
    it fits; else the largest smaller one that divides the global batch (accumulation rises, the
    global batch never changes, so the run's result is the same, only slower); only then
    activation checkpointing (recomputing every layer costs about a third more compute). The
    micro-batch is never raised above the configured one: the user may have chosen it for speed.
    Validation is estimated at `min(8, configured micro-batch)` sequences per forward.

    Nothing is mutated: the caller switches `config.model.activation_checkpointing` on when the
    plan says so. Other keywords (trainable_params, extra_frozen_params, sequences_per_example,
    framework_bytes, other_bytes) go to `estimate_training_memory`.
    """
    train = config.stage_train(stage)
    configured = train.micro_batch_size
    configured_checkpointing = config.model.activation_checkpointing
    inputs: MemoryInputs = {
        "data_bytes": data_bytes,
        "eval_sequences": min(8, configured),
        **kwargs,
    }

    def estimate(size: int, checkpointing: bool) -> MemoryEstimate:
        return estimate_training_memory(
            config.model,
            vocab_size,
            micro_batch_size=size,
            global_batch_size=train.global_batch_size,
            precision=precision,
            activation_checkpointing=checkpointing,
            **inputs,
        )

    def plan(
        size: int, checkpointing: bool, chosen: MemoryEstimate, messages: list[str], fits: bool
    ) -> MemoryPlan:
        return MemoryPlan(
            micro_batch_size=size,
            activation_checkpointing=checkpointing,
            estimate=chosen,
            configured_estimate=configured_estimate,
            messages=messages,
            fits=fits,
            cap_bytes=cap_bytes,
            configured_micro_batch_size=configured,
            global_batch_size=train.global_batch_size,
        )

    configured_estimate = estimate(configured, configured_checkpointing)
    if configured_estimate.total <= cap_bytes:
        return plan(configured, configured_checkpointing, configured_estimate, [], True)
    cap_mb = cap_bytes / MiB
    for checkpointing in (configured_checkpointing, True):
        chosen = largest_micro_batch(
            cap_bytes,
            config.model,
            vocab_size,
            configured=configured,
            global_batch_size=train.global_batch_size,
            precision=precision,
            activation_checkpointing=checkpointing,
            **inputs,
        )
        if chosen is None:
            continue
        messages = []
        if checkpointing and not configured_checkpointing:
            messages.append("activation checkpointing switched on to fit the memory cap")
        fitted = estimate(chosen, checkpointing)
        messages.append(
            f"micro-batch {configured} needs about {configured_estimate.total / MiB:,.0f} MB, over "
            f"the {cap_mb:,.0f} MB cap: training with micro-batch {chosen} x "
            f"{train.global_batch_size // chosen} accumulation (global batch unchanged, "
            f"about {fitted.total / MiB:,.0f} MB)"
        )
        return plan(chosen, checkpointing, fitted, messages, True)
    # What the search above compared with the cap last: a cap of at least this fits, so the
    # refusal's "raise --max-memory" has a number that works.
    smallest = estimate(1, True)
    return plan(1, True, smallest, [], False)
