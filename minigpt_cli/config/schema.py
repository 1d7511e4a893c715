"""The configuration schema: the single source of every default.

One TOML file describes a run; presets are such files. Each section is a pydantic model with
`extra="forbid"`, so a typo is an error rather than a silently ignored key. Stage sections
(`[pretrain]`, later `[sft]`, ...) list only the training keys that stage changes;
`Config.stage_train` merges them over `[train]`. This module imports no torch.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# sentencepiece needs room for its own pieces (unk, bos/eos) plus our reserved specials and the 256
# byte-fallback pieces; above this it refuses or trains pathologically small pieces on laptop data.
MIN_VOCAB_SIZE = 320
MAX_VOCAB_SIZE = 262_144

Precision = Literal["auto", "fp32", "bf16", "fp16"]
Device = Literal["auto", "cpu", "cuda", "mps"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h)?\s*$")
_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(%|GB|MB|GiB|MiB|KB|KiB|TB|TiB)?\s*$", re.IGNORECASE)


def parse_duration(value: str | float | int) -> float:
    """Seconds from `90`, `90s`, `10m`, `2h` (what --max-time accepts)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f"{value!r} is not a duration (use seconds, or e.g. 90s, 10m, 2h)")
        seconds = float(match.group(1)) * {"s": 1, "m": 60, "h": 3600}[match.group(2) or "s"]
    if seconds <= 0:
        raise ValueError(f"duration must be positive, got {value!r}")
    return seconds


def parse_budget(value: str) -> float | None:
    """Seconds of a time budget (`[quickstart] max_time`, `quickstart --max-time`): a duration, or
    None for "none" (no budget: every stage's step limit in full)."""
    return None if value.strip().lower() == "none" else parse_duration(value)


def memory_is_percent(value: str | float | int) -> bool:
    """Whether a memory cap is a share of RAM (a bare number or `N%`) rather than a size; the
    same reading as `parse_memory`'s."""
    match = _MEMORY.match(str(value))
    return match is not None and (match.group(2) or "%") == "%"


def parse_memory(value: str | float | int, total_bytes: int) -> int:
    """Bytes from a memory cap: a bare number is percent of `total_bytes`; `1.5GB`, `6GiB` are
    absolute."""
    match = _MEMORY.match(str(value))
    if not match:
        raise ValueError(
            f"{value!r} is not a memory size (use a percent like 70, or 1.5GB, 6GiB, 512MB)"
        )
    number, unit = float(match.group(1)), (match.group(2) or "%")
    if unit == "%":
        if not 0 < number <= 100:
            raise ValueError(f"memory percent must be in (0, 100], got {value!r}")
        return int(total_bytes * number / 100)
    scale = {
        "kb": 1e3,
        "mb": 1e6,
        "gb": 1e9,
        "tb": 1e12,
        "kib": 2**10,
        "mib": 2**20,
        "gib": 2**30,
        "tib": 2**40,
    }[unit.lower()]
    if number <= 0:
        raise ValueError(f"memory size must be positive, got {value!r}")
    return int(number * scale)


class Section(BaseModel):
    """Base of every section: unknown keys are errors, assignments are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    """The network's shape. The vocabulary size comes from the tokenizer section."""

    n_layer: int = Field(4, ge=1, le=256)
    n_head: int = Field(2, ge=1)
    n_kv_head: int | None = Field(None, ge=1, description="grouped-query heads; None = n_head")
    n_embd: int = Field(128, ge=8)
    head_size: int | None = Field(
        None, ge=2, description="width of one attention head; None = n_embd / n_head"
    )
    intermediate_size: int | None = Field(None, ge=8, description="SwiGLU width; None = computed")
    context_length: int = Field(256, ge=8, le=131_072)
    rope_theta: float = Field(10_000.0, gt=0)
    norm_eps: float = Field(1e-5, gt=0, lt=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    init_std: float = Field(0.02, gt=0)
    tie_embeddings: bool = True
    activation_checkpointing: bool = False

    @model_validator(mode="after")
    def _check_heads(self) -> ModelConfig:
        if self.head_size is not None:
            # An imported checkpoint may set its head width apart from n_embd / n_head (as
            # transformers' `head_dim`): the projections are then n_head x head_size wide.
            if self.head_size % 2:
                raise ValueError(
                    f"head_size ({self.head_size}) must be even (rotary embeddings rotate pairs)"
                )
        elif self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        elif (self.n_embd // self.n_head) % 2:
            raise ValueError(
                f"head size n_embd/n_head = {self.n_embd // self.n_head} must be even "
                "(rotary embeddings rotate pairs)"
            )
        if self.n_kv_head is not None and self.n_head % self.n_kv_head:
            raise ValueError(
                f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})"
            )
        return self

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        """Width of one attention head: `head_size`, else n_embd / n_head."""
        return self.head_size or self.n_embd // self.n_head

    @property
    def ffn_dim(self) -> int:
        """SwiGLU hidden width: Llama's 8/3 · d rounded up to a multiple of 64."""
        if self.intermediate_size is not None:
            return self.intermediate_size
        hidden = int(8 * self.n_embd / 3)
        return 64 * ((hidden + 63) // 64)


class TokenizerConfig(Section):
    """sentencepiece BPE settings (byte fallback, split digits, identity normalisation: fixed)."""

    vocab_size: int = Field(5000, ge=MIN_VOCAB_SIZE, le=MAX_VOCAB_SIZE)
    character_coverage: float = Field(0.9995, ge=0.98, le=1.0)
    max_training_chars: int = Field(
        20_000_000, ge=10_000, description="text sampled to train the tokenizer"
    )


class DataConfig(Section):
    """Where training text comes from and how validation is split off."""

    val_fraction: float = Field(0.05, gt=0, lt=0.5)
    builtin_size: int = Field(
        6000, ge=10, description="records the built-in generator makes per kind"
    )


class TrainConfig(Section):
    """Every training hyperparameter's default; stage sections override a subset."""

    learning_rate: float = Field(3e-3, gt=0, lt=1)
    min_lr: float = Field(3e-4, ge=0)
    warmup_steps: int = Field(30, ge=0)
    max_steps: int | None = Field(400, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    epochs: float | None = Field(None, gt=0)
    max_time: str | None = None
    micro_batch_size: int = Field(8, ge=1)
    global_batch_size: int = Field(32, ge=1, description="sequences per optimizer step")
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    adam_eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    precision: Precision = "auto"
    device: Device = "auto"
    compile: bool = False
    seed: int = Field(1337, ge=0)
    save_every: int = Field(100, ge=1)
    keep_last: int = Field(2, ge=1, description="snapshots kept under checkpoints/")
    eval_every: int = Field(100, ge=1)
    eval_batches: int = Field(20, ge=1, description="micro-batches per validation pass")
    log_every: int = Field(10, ge=1)

    @field_validator("max_time")
    @classmethod
    def _check_time(cls, value: str | None) -> str | None:
        if value is not None:
            parse_duration(value)
        return value

    @model_validator(mode="after")
    def _check_batch(self) -> TrainConfig:
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"micro_batch_size ({self.micro_batch_size})"
            )
        return self


class StageTrainConfig(Section):
    """A stage's overrides of [train]: the same keys, all optional."""

    learning_rate: float | None = Field(None, gt=0, lt=1)
    min_lr: float | None = Field(None, ge=0)
    warmup_steps: int | None = Field(None, ge=0)
    max_steps: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    epochs: float | None = Field(None, gt=0)
    max_time: str | None = None
    micro_batch_size: int | None = Field(None, ge=1)
    global_batch_size: int | None = Field(None, ge=1)
    weight_decay: float | None = Field(None, ge=0)
    beta1: float | None = Field(None, ge=0, lt=1)
    beta2: float | None = Field(None, ge=0, lt=1)
    adam_eps: float | None = Field(None, gt=0)
    grad_clip: float | None = Field(None, ge=0)
    precision: Precision | None = None
    device: Device | None = None
    compile: bool | None = None
    seed: int | None = Field(None, ge=0)
    save_every: int | None = Field(None, ge=1)
    keep_last: int | None = Field(None, ge=1)
    eval_every: int | None = Field(None, ge=1)
    eval_batches: int | None = Field(None, ge=1)
    log_every: int | None = Field(None, ge=1)

    @field_validator("max_time")
    @classmethod
    def _check_time(cls, value: str | None) -> str | None:
        if value is not None:
            parse_duration(value)
        return value


class PretrainConfig(StageTrainConfig):
    """[pretrain]: overrides of [train] for `minigpt pretrain`."""


class SftConfig(StageTrainConfig):
    """[sft]: overrides of [train] for `minigpt sft`, plus the keys only fine-tuning has."""

    train_on_prompt: bool = Field(
        False, description="also learn the system/user turns, not only the assistant's"
    )
    exact_match_per_family: int = Field(
        16, ge=0, description="held-out answers checked per task family at each evaluation; 0 = off"
    )
    text_mix: float = Field(
        0.112,
        ge=0,
        lt=1,
        description="share of each step's sequences that are the chain's pretraining text, "
        "loss on every token (keeps the language model); 0 = off",
    )
    text_chunk: int = Field(
        32, ge=2, description="tokens per pretraining-text sequence (at most the context length)"
    )
    text_weight: float = Field(
        0.1,
        ge=0,
        description="loss weight of a pretraining-text token against an answer token",
    )


class DpoConfig(StageTrainConfig):
    """[dpo]: overrides of [train] for `minigpt dpo`, plus the keys only preference tuning has.

    Preference tuning starts from a tuned model and should move it only a little, so its own
    learning rate and length stand in for the pretraining values of [train].
    """

    learning_rate: float | None = Field(1e-4, gt=0, lt=1)
    min_lr: float | None = Field(1e-5, ge=0)
    warmup_steps: int | None = Field(10, ge=0)
    max_steps: int | None = Field(200, ge=1)
    beta: float = Field(
        0.1, gt=0, description="how far from the reference the policy may move (DPO's beta)"
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="assumed share of pairs labelled the wrong way round"
    )
    max_prompt_tokens: int | None = Field(
        None, ge=2, description="prompts cut from the left to this many tokens; None = as needed"
    )
    exact_match_per_family: int = Field(
        16, ge=0, description="held-out answers checked per task family at each evaluation; 0 = off"
    )


class RewardConfig(StageTrainConfig):
    """[reward]: the reward model `minigpt rlhf` trains first (Bradley-Terry on preference pairs).

    Its run directory is the RLHF run's `reward/`; these keys override [train] for it.
    """

    learning_rate: float | None = Field(3e-4, gt=0, lt=1)
    min_lr: float | None = Field(3e-5, ge=0)
    warmup_steps: int | None = Field(10, ge=0)
    max_steps: int | None = Field(150, ge=1)
    eval_every: int | None = Field(50, ge=1)
    save_every: int | None = Field(50, ge=1)


RL_EPOCHS = {"ppo": 2, "grpo": 1}
"""Passes over each rollout when `[rlhf] ppo_epochs` is not set (see `RlhfConfig.passes`)."""


# [rlhf] learning_rate when none is set, by algorithm. Measured from the quickstart's DPO runs
# over 3 seeds (README "RLHF: the KL control against the learned reward"): PPO against the learned
# reward at 1e-4 cost up to 7 points of a family, at 3e-5 at most 3 in every seed while its reward
# rose more on average; GRPO's one step per rollout on group-normalised advantages is measured at
# 1e-4 (the quickstart's and `--reward rule`'s figures).
RLHF_LEARNING_RATE: dict[str, float] = {"ppo": 3e-5, "grpo": 1e-4}


def default_algorithm(reward: str | None) -> Literal["ppo", "grpo"]:
    """GRPO where the reward has an exact-answer rule in it (`rule`, `both`), else PPO.

    Against a rule GRPO's group baseline is the better fit: a prompt's samples are compared with
    each other and no value model has to learn the reward's scale first. Measured over three
    seeds (README, "RLHF with a verifiable reward"): from the quickstart's SFT runs GRPO with the
    rule kept every family where SFT left it on average where PPO lost 1-2 points on three; from
    its DPO runs GRPO with the reward model and the rule kept every family within 2 points of DPO
    where PPO with both lost up to 4. A learned reward model alone keeps PPO with its per-token
    KL penalty, which holds the policy near the reference, where the reward model can be trusted.
    """
    return "grpo" if reward in ("rule", "both") else "ppo"


class RlhfConfig(StageTrainConfig):
    """[rlhf]: PPO or GRPO against a reward. Lengths and cadences (max_steps, eval_every,
    save_every, log_every) count iterations: one rollout and its optimizer steps."""

    learning_rate: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="None = the algorithm's (RLHF_LEARNING_RATE: PPO 3e-5, GRPO 1e-4)",
    )
    min_lr: float | None = Field(
        None, ge=0, description="None = learning_rate (a constant rate, as PPO and GRPO use)"
    )
    warmup_steps: int | None = Field(0, ge=0)
    max_steps: int | None = Field(30, ge=1)
    micro_batch_size: int | None = Field(16, ge=1)
    global_batch_size: int | None = Field(
        None, ge=1, description="responses per optimizer step; None = the whole rollout"
    )
    eval_every: int | None = Field(10, ge=1)
    save_every: int | None = Field(5, ge=1)
    log_every: int | None = Field(1, ge=1)
    algo: Literal["ppo", "grpo"] | None = Field(
        None, description="ppo or grpo; None = grpo for the rule or both rewards, ppo otherwise"
    )
    reward: Literal["model", "rule", "both"] = "model"
    rollout_batch_size: int = Field(16, ge=1, description="prompts sampled per iteration")
    num_generations: int = Field(8, ge=2, description="GRPO: responses per prompt (a group)")
    ppo_epochs: int | None = Field(
        None, ge=1, description="passes over each rollout; None = the algorithm's (PPO 2, GRPO 1)"
    )
    max_new_tokens: int = Field(
        32, ge=1, description="longest response sampled (a worked sum takes about 25)"
    )
    temperature: float = Field(1.0, gt=0, description="sampling temperature of rollouts")
    kl_coef: float | None = Field(
        None,
        ge=0,
        description="KL penalty weight (PPO: the adaptive one's start); None = the algorithm's "
        "(PPO 1.0, GRPO 0.05); 0 = no penalty",
    )
    target_kl: float | None = Field(
        0.1,
        ge=0,
        description="PPO: the KL per response (nats, summed over its tokens) kl_coef adapts to "
        "hold; 0 = a fixed kl_coef",
    )
    kl_control: Literal["ceiling", "target"] = Field(
        "ceiling",
        description="ceiling: the KL is held under target_kl, kl_coef never below its start; "
        "target: steered towards it both ways (Ziegler et al., TRL)",
    )
    kl_horizon: int = Field(64, ge=1, description="adaptive KL: responses to adapt over")
    gamma: float = Field(1.0, ge=0, le=1, description="GAE discount")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda")
    clip_eps: float = Field(0.2, gt=0, lt=1, description="PPO/GRPO ratio clip")
    value_clip_eps: float = Field(0.2, gt=0, description="PPO value clip")
    vf_coef: float = Field(0.1, ge=0, description="weight of the value loss")
    reward_clip: float | None = Field(
        5.0, gt=0, description="PPO: normalised rewards clipped to +-this (None = no clip)"
    )
    samples_every: int = Field(5, ge=0, description="show a sample every N iterations; 0 = never")
    eval_prompts: int = Field(
        200, ge=1, description="held-out prompts answered at evaluation (50 per built-in family)"
    )

    @property
    def algorithm(self) -> Literal["ppo", "grpo"]:
        """`algo`, else the reward's own (`default_algorithm`)."""
        return self.algo or default_algorithm(self.reward)

    def rollout_responses(self) -> int:
        """Responses one iteration samples: a prompt each for PPO, a group each for GRPO."""
        return self.rollout_batch_size * (self.num_generations if self.algorithm == "grpo" else 1)

    def passes(self) -> int:
        """Passes over each rollout: `ppo_epochs`, else the algorithm's own default.

        GRPO takes one step per rollout (TRL's `num_iterations` = 1): measured on the built-in
        addition family, a second pass over the same groups gained less (54 % against 59 %
        held out after 80 iterations), and cutting each rollout into several small steps lost
        what the first iterations had gained (AdamW's fixed-size steps follow the noise of a
        few groups; see the README's RLHF figures). PPO keeps two passes, as measured with the
        KL control.
        """
        return self.ppo_epochs or RL_EPOCHS[self.algorithm]


LORA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Linear layers LoRA can adapt, by their HF names (also PEFT's `target_modules`)."""

LORA_TARGET_GROUPS: dict[str, tuple[str, ...]] = {
    "attention": LORA_PROJECTIONS[:4],
    "mlp": LORA_PROJECTIONS[4:],
    "all": LORA_PROJECTIONS,
}
"""Shorthands for `[lora] targets`, expanded when the config is validated."""


def expand_lora_targets(names: str | list[str] | tuple[str, ...]) -> list[str]:
    """Projection names from a targets list that may use the shorthands attention, mlp, all.

    A comma-separated string is accepted too (`--set lora.targets=attention,mlp`). The result is
    de-duplicated and in layer order, so equal target sets always compare and dump alike.
    """
    if isinstance(names, str):
        names = names.split(",")
    wanted: set[str] = set()
    for raw in names:
        name = str(raw).strip()
        if name in LORA_TARGET_GROUPS:
            wanted.update(LORA_TARGET_GROUPS[name])
        elif name in LORA_PROJECTIONS:
            wanted.add(name)
        else:
            allowed = ", ".join((*LORA_PROJECTIONS, *LORA_TARGET_GROUPS))
            raise ValueError(f"unknown LoRA target {name!r}; allowed: {allowed}")
    if not wanted:
        raise ValueError("LoRA targets must name at least one projection")
    return [name for name in LORA_PROJECTIONS if name in wanted]


class LoraConfig(Section):
    """[lora]: low-rank adapters for `sft --lora` (the adapter adds alpha/r * B @ A to W)."""

    r: int = Field(8, ge=1, description="adapter rank")
    alpha: float = Field(16.0, gt=0, description="scale numerator: the update is alpha/r * B @ A")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input")
    targets: list[str] = Field(
        default_factory=lambda: list(LORA_TARGET_GROUPS["attention"]),
        description="projections to adapt; or attention, mlp, all",
    )

    @field_validator("targets", mode="before")
    @classmethod
    def _expand_targets(cls, value: object) -> list[str]:
        if not isinstance(value, str | list | tuple):
            raise ValueError("LoRA targets must be a list of projection names")
        return expand_lora_targets(value)


class GenerateConfig(Section):
    """Sampling defaults for generate (and later chat/eval)."""

    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.8, ge=0)
    top_k: int | None = Field(50, ge=1)
    top_p: float | None = Field(0.95, gt=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    num_beams: int = Field(1, ge=1)
    length_penalty: float = 1.0


class EvalConfig(Section):
    """How much `quickstart` evaluates (the `eval` verb's flags default to the same values)."""

    per_family: int | None = Field(
        50, ge=1, description="held-out prompts and preference pairs per task family; None = all"
    )
    samples: int = Field(3, ge=0, description="answers shown per run")
    max_new_tokens: int | None = Field(
        None, ge=1, description="answer budget; None = the longest reference + a margin"
    )
    text_documents: int | None = Field(
        None, ge=1, description="held-out documents scored for perplexity; None = all"
    )


class QuickstartConfig(Section):
    """How long `minigpt quickstart` may take: its budget split over the stages it runs."""

    # "none" rather than None: a preset's budget must be one a config file can also switch off.
    max_time: str = Field(
        "none",
        description="wall time for the whole pipeline, tokenizer to eval (a duration such as "
        '"5m"), or "none" for every stage\'s own step limit in full',
    )

    @field_validator("max_time")
    @classmethod
    def _check_time(cls, value: str) -> str:
        try:
            parse_budget(value)
        except ValueError as error:
            raise ValueError(f'{error}, or "none" for no budget') from None
        return value


class ResourcesConfig(Section):
    """Caps the governor enforces. max_memory: a bare number is percent of physical RAM."""

    max_memory: float | str = 70.0
    max_cpu: float = Field(100.0, gt=0, le=100)
    threads: int | None = Field(None, ge=1)
    nice: int | None = Field(None, ge=0, le=19)

    @field_validator("max_memory")
    @classmethod
    def _check_memory(cls, value: float | str) -> float | str:
        parse_memory(value, 2**40)
        return value


class LogConfig(Section):
    """How progress is shown and what is written besides metrics.jsonl."""

    progress: Literal["auto", "rich", "plain", "none"] = "auto"
    plot: bool = True


class Config(Section):
    """A whole run's configuration, as written to `config.toml` in the run directory."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    sft: SftConfig = Field(default_factory=SftConfig)
    dpo: DpoConfig = Field(default_factory=DpoConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    rlhf: RlhfConfig = Field(default_factory=RlhfConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    quickstart: QuickstartConfig = Field(default_factory=QuickstartConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    log: LogConfig = Field(default_factory=LogConfig)

    def stage_train(self, stage: str) -> TrainConfig:
        """[train] with the stage section's keys laid over it (a stage key beats [train])."""
        overrides = getattr(self, stage, None)
        merged = self.train.model_dump()
        if isinstance(overrides, StageTrainConfig):
            # Keys only a stage has (sft.train_on_prompt, ...) are not training hyperparameters.
            stage_keys = overrides.model_dump(exclude_none=True).items()
            merged.update({k: v for k, v in stage_keys if k in TrainConfig.model_fields})
        if stage == "rlhf" and self.rlhf.learning_rate is None:
            merged["learning_rate"] = RLHF_LEARNING_RATE[self.rlhf.algorithm]
        if stage == "rlhf" and self.rlhf.min_lr is None:
            merged["min_lr"] = merged["learning_rate"]
        if stage == "rlhf" and self.rlhf.global_batch_size is None:
            # One optimizer step over the whole rollout, cut into the largest micro-batches
            # that divide it (gradient accumulation makes that the same update).
            responses = self.rlhf.rollout_responses()
            micro = min(merged["micro_batch_size"], responses)
            while responses % micro:
                micro -= 1
            merged.update(global_batch_size=responses, micro_batch_size=micro)
        return TrainConfig.model_validate(merged)
