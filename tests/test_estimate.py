"""The memory estimate: its mechanisms (arithmetic, no training) and one real measurement."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from minigpt_cli.config.params import count_parameters
from minigpt_cli.config.schema import Config, ModelConfig, parse_memory
from minigpt_cli.engine.resources.activations import activation_bytes
from minigpt_cli.engine.resources.estimate import (
    FRAMEWORK_BYTES,
    OPTIMIZER_IMPORT_BYTES,
    PIPELINE_BYTES,
    MemoryEstimate,
    estimate_for_config,
    estimate_training_memory,
    framework_from_rss,
    largest_micro_batch,
    plan_micro_batch,
)
from minigpt_cli.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TINY = ModelConfig(n_layer=4, n_embd=128, n_head=2, context_length=256)
VOCAB = 5000


def _estimate(micro: int, **kwargs: object) -> MemoryEstimate:
    return estimate_training_memory(TINY, VOCAB, micro_batch_size=micro, **kwargs)  # type: ignore[arg-type]


def test_saved_activations_grow_linearly_with_the_micro_batch() -> None:
    saved = [activation_bytes(TINY, VOCAB, tokens=256 * n).saved for n in (1, 2, 3, 4, 8)]
    per_sequence = saved[1] - saved[0]
    assert per_sequence > 0
    assert saved == [saved[0] + (n - 1) * per_sequence for n in (1, 2, 3, 4, 8)]
    small, large = _estimate(8), _estimate(16)
    assert large.activations > small.activations
    # Everything that does not depend on the micro-batch stays put.
    for name in ("framework", "weights", "gradients", "optimizer", "checkpoint"):
        assert getattr(large, name) == getattr(small, name)
    assert large.total > small.total


def test_activation_checkpointing_reduces_activations_and_the_total() -> None:
    plain = _estimate(16, activation_checkpointing=False)
    checkpointed = _estimate(16, activation_checkpointing=True)
    assert checkpointed.activations < plain.activations / 2
    assert checkpointed.total < plain.total
    # The model config's flag is the default.
    flagged = TINY.model_copy(update={"activation_checkpointing": True})
    via_config = estimate_training_memory(flagged, VOCAB, micro_batch_size=16)
    assert via_config.activations == checkpointed.activations
    assert via_config.activation_checkpointing


def test_weights_gradients_and_adamw_follow_the_parameter_count() -> None:
    estimate = _estimate(4)
    params = count_parameters(TINY, VOCAB)
    assert estimate.gradients == 4 * params
    assert estimate.optimizer == 2 * params * 4
    rotary = 2 * TINY.context_length * TINY.head_dim * 4
    assert estimate.weights == 4 * params + rotary


def test_fewer_trainable_parameters_shrink_gradients_and_adamw_only() -> None:
    full = _estimate(4)
    lora = _estimate(4, trainable_params=50_000)
    assert lora.gradients == 4 * 50_000
    assert lora.optimizer == 8 * 50_000
    assert lora.weights == full.weights
    assert lora.activations == full.activations
    assert lora.total < full.total


def test_frozen_models_and_paired_sequences_are_counted() -> None:
    base = _estimate(4)
    with_reference = _estimate(4, extra_frozen_params=1_000_000)
    assert with_reference.weights == base.weights + 4_000_000
    assert with_reference.gradients == base.gradients
    pairs = _estimate(4, sequences_per_example=2)
    doubled = _estimate(8)
    assert pairs.activations == doubled.activations
    assert "x 2 sequences" in pairs.describe()


def test_data_and_other_bytes_add_to_the_total() -> None:
    base = _estimate(4, global_batch_size=32)
    loaded = _estimate(4, global_batch_size=32, data_bytes=10 * 2**20, other_bytes=3 * 2**20)
    assert loaded.total - base.total == 13 * 2**20
    # A step's token ids (int64, all micro-batches gathered up front) are data too.
    assert base.data == 32 * 257 * 8


def test_describe_is_one_line_whose_terms_add_up() -> None:
    estimate = _estimate(8)
    line = estimate.describe()
    assert "\n" not in line
    assert line.startswith(f"estimated peak {estimate.total / 2**20:,.0f} MB = framework")
    assert "activations" in line and "(micro-batch 8 x 256 tokens)" in line
    terms = line.split(" = ", 1)[1]
    numbers = [float(part.split()[1].replace(",", "")) for part in terms.split(" + ")]
    assert sum(numbers) == pytest.approx(estimate.total / 2**20, abs=len(numbers))


def test_a_checkpoint_save_can_set_the_peak() -> None:
    # A wide model at micro-batch 1: serialising AdamW's moments outweighs the activations.
    wide = ModelConfig(n_layer=6, n_embd=512, n_head=8, context_length=256)
    estimate = estimate_training_memory(wide, 10_000, micro_batch_size=1)
    assert estimate.peak_when == "checkpoint"
    assert estimate.total == estimate.save_peak > estimate.step_peak
    assert estimate.checkpoint == 2 * estimate.optimizer
    assert "while saving a checkpoint" in estimate.describe()


def test_an_evaluation_batch_larger_than_the_micro_batch_can_set_the_peak() -> None:
    # Validation runs 8 sequences at a time whatever the micro-batch: at micro-batch 1 that
    # forward is larger than a training step's.
    single = _estimate(1)
    assert single.peak_when == "eval"
    assert single.total == single.eval_peak > single.step_peak
    assert "while evaluating (8 sequences at a time)" in single.describe()
    assert _estimate(1, eval_sequences=1).peak_when != "eval"
    # At micro-batch 16 the evaluation fits in what the steps already use.
    assert _estimate(16).peak_when == "step"


def test_the_framework_term_defaults_to_a_process_that_prepared_its_data() -> None:
    assert _estimate(4).framework == FRAMEWORK_BYTES + PIPELINE_BYTES
    measured = 400 * 2**20
    framework = framework_from_rss(measured)
    assert framework == measured + OPTIMIZER_IMPORT_BYTES
    assert framework_from_rss(measured, optimizer_built=True) == measured
    assert framework_from_rss(10 * 2**20) == FRAMEWORK_BYTES
    override = _estimate(4, framework_bytes=framework)
    assert override.total - _estimate(4).total == framework - FRAMEWORK_BYTES - PIPELINE_BYTES


def _cap_between(small: int, large: int, **kwargs: object) -> int:
    low = _estimate(small, **kwargs).total
    high = _estimate(large, **kwargs).total
    assert low < high
    return (low + high) // 2


def test_largest_micro_batch_picks_the_largest_that_fits() -> None:
    cap = _cap_between(8, 16, global_batch_size=32)
    assert largest_micro_batch(cap, TINY, VOCAB, configured=16, global_batch_size=32) == 8
    exact = _estimate(16, global_batch_size=32).total
    assert largest_micro_batch(exact, TINY, VOCAB, configured=16, global_batch_size=32) == 16


def test_largest_micro_batch_never_exceeds_the_configured_one() -> None:
    huge = 10**15
    assert largest_micro_batch(huge, TINY, VOCAB, configured=4, global_batch_size=32) == 4


def test_largest_micro_batch_only_picks_divisors_of_the_global_batch() -> None:
    # Divisors of 24 up to 8: 8, 6, 4, 3, ... A cap just under micro-batch 8 gives 6, not 7.
    cap = _estimate(8, global_batch_size=24).total - 1
    assert _estimate(6, global_batch_size=24).total <= cap
    assert largest_micro_batch(cap, TINY, VOCAB, configured=8, global_batch_size=24) == 6
    # For 32 the next divisor below 8 is 4.
    cap = _estimate(8, global_batch_size=32).total - 1
    assert largest_micro_batch(cap, TINY, VOCAB, configured=8, global_batch_size=32) == 4


def test_largest_micro_batch_returns_none_when_nothing_fits() -> None:
    cap = _estimate(1, global_batch_size=32).total - 1
    assert largest_micro_batch(cap, TINY, VOCAB, configured=8, global_batch_size=32) is None


def test_largest_micro_batch_passes_options_through() -> None:
    cap = _cap_between(4, 8, global_batch_size=32)
    assert largest_micro_batch(cap, TINY, VOCAB, configured=8, global_batch_size=32) == 4
    # Checkpointing makes micro-batch 8 fit under the same cap.
    chosen = largest_micro_batch(
        cap, TINY, VOCAB, configured=8, global_batch_size=32, activation_checkpointing=True
    )
    assert chosen == 8


def test_estimate_for_config_reads_the_stage_settings() -> None:
    config = Config()
    config.pretrain.micro_batch_size = 4
    config.pretrain.global_batch_size = 16
    estimate = estimate_for_config(config)
    assert estimate.micro_batch_size == 4
    assert estimate.precision == "fp32"  # "auto" counts as the larger fp32
    assert estimate == estimate_training_memory(
        config.model, config.tokenizer.vocab_size, micro_batch_size=4, global_batch_size=16
    )
    bf16 = estimate_for_config(config, precision="bf16")
    assert bf16.activations < estimate.activations


def _plan_config(micro: int = 8, global_batch: int = 8) -> Config:
    config = Config()
    config.model = TINY.model_copy()
    config.tokenizer.vocab_size = VOCAB
    config.pretrain.micro_batch_size = micro
    config.pretrain.global_batch_size = global_batch
    return config


def _plan_estimate(config: Config, micro: int, checkpointing: bool = False) -> MemoryEstimate:
    """What the plan estimates for `micro`: validation at min(8, configured micro-batch)."""
    return estimate_for_config(
        config,
        micro_batch_size=micro,
        precision="fp32",
        data_bytes=DATA_BYTES,
        activation_checkpointing=checkpointing,
        eval_sequences=min(8, config.stage_train("pretrain").micro_batch_size),
    )


DATA_BYTES = 4 * 300_000


def test_plan_keeps_the_configured_micro_batch_when_it_fits() -> None:
    config = _plan_config()
    configured = _plan_estimate(config, 8)
    plan = plan_micro_batch(config, VOCAB, "fp32", DATA_BYTES, configured.total)
    assert plan.fits and not plan.changed and plan.messages == []
    assert (plan.micro_batch_size, plan.activation_checkpointing) == (8, False)
    assert plan.estimate == plan.configured_estimate == configured


def test_plan_lowers_the_micro_batch_to_the_largest_divisor_that_fits() -> None:
    config = _plan_config(micro=8, global_batch=8)
    four, eight = _plan_estimate(config, 4), _plan_estimate(config, 8)
    cap = (four.total + eight.total) // 2
    plan = plan_micro_batch(config, VOCAB, "fp32", DATA_BYTES, cap)
    assert plan.fits and (plan.micro_batch_size, plan.activation_checkpointing) == (4, False)
    assert plan.estimate == four and plan.configured_estimate == eight
    assert plan.messages == [
        f"micro-batch 8 needs about {eight.total / 2**20:,.0f} MB, over the "
        f"{cap / 2**20:,.0f} MB cap: training with micro-batch 4 x 2 accumulation (global batch "
        f"unchanged, about {four.total / 2**20:,.0f} MB)"
    ]
    assert config.model.activation_checkpointing is False  # the plan changes nothing


def test_plan_turns_on_checkpointing_only_when_no_micro_batch_fits_without_it() -> None:
    config = _plan_config(micro=8, global_batch=8)
    plain, checkpointed = _plan_estimate(config, 1), _plan_estimate(config, 1, True)
    assert checkpointed.total < plain.total
    cap = (plain.total + checkpointed.total) // 2
    plan = plan_micro_batch(config, VOCAB, "fp32", DATA_BYTES, cap)
    assert plan.fits and (plan.micro_batch_size, plan.activation_checkpointing) == (1, True)
    assert plan.estimate == checkpointed
    assert plan.messages[0] == "activation checkpointing switched on to fit the memory cap"
    assert "training with micro-batch 1 x 8 accumulation" in plan.messages[1]
    assert config.model.activation_checkpointing is False


def test_plan_says_why_when_nothing_fits() -> None:
    config = _plan_config()
    smallest = _plan_estimate(config, 1, True)
    plan = plan_micro_batch(config, VOCAB, "fp32", DATA_BYTES, smallest.total // 2)
    assert not plan.fits
    assert (plan.micro_batch_size, plan.activation_checkpointing) == (1, True)
    # The figure it names is the least this plan accepts: a cap that large fits.
    assert plan.estimate == smallest
    assert plan_micro_batch(config, VOCAB, "fp32", DATA_BYTES, smallest.total).fits
    assert plan.refusal.startswith(
        f"does not fit in memory: even micro-batch 1 with activation checkpointing needs about "
        f"{plan.estimate.total / 2**20:,.0f} MB ("
    )
    assert plan.refusal.endswith(
        f"over the {smallest.total // 2 / 2**20:,.0f} MB cap; raise --max-memory, or choose a "
        "smaller preset or model.context_length"
    )


def test_fit_memory_acts_on_the_plan() -> None:
    """pretrain's governor and doctor share one decision: fit_memory returns the plan's choice,
    emits its messages and switches checkpointing on in the config."""
    from minigpt_cli.engine.resources.memory import fit_memory

    events: list = []
    config = _plan_config(micro=8, global_batch=8)
    cases = [
        ((_plan_estimate(config, 4).total + _plan_estimate(config, 8).total) // 2, (4, False)),
        ((_plan_estimate(config, 1).total + _plan_estimate(config, 1, True).total) // 2, (1, True)),
    ]
    for cap, expected in cases:
        config = _plan_config(micro=8, global_batch=8)
        config.resources.max_memory = f"{cap / 2**20:.3f}MiB"
        cap_bytes = parse_memory(config.resources.max_memory, 2**40)
        plan = plan_micro_batch(config, VOCAB, "fp32", DATA_BYTES, cap_bytes)
        events.clear()
        micro, messages = fit_memory(config, VOCAB, "fp32", DATA_BYTES, events.append)
        assert (micro, config.model.activation_checkpointing) == expected
        assert (plan.micro_batch_size, plan.activation_checkpointing) == expected
        assert messages == plan.messages
        assert [e.data["message"] for e in events if e.kind == "governor"] == plan.messages
        notes = [e.data["message"] for e in events if e.kind == "note"]
        assert notes == [
            f"memory: {plan.configured_estimate.describe()}; cap {cap_bytes / 2**20:,.0f} MB"
        ]
    config = _plan_config()
    config.resources.max_memory = "64MB"
    refusal = plan_micro_batch(config, VOCAB, "fp32", DATA_BYTES, 64 * 10**6).refusal
    with pytest.raises(UserError) as raised:
        fit_memory(config, VOCAB, "fp32", DATA_BYTES, None)
    assert str(raised.value) == refusal


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="micro_batch_size"):
        _estimate(0)
    with pytest.raises(ValueError, match="trainable_params"):
        _estimate(1, trainable_params=10**12)
    with pytest.raises(ValueError, match="precision"):
        _estimate(1, precision="int8")
    with pytest.raises(ValueError, match="seq_len"):
        _estimate(1, seq_len=TINY.context_length + 1)


def test_the_module_imports_no_torch() -> None:
    code = "import sys, minigpt_cli.engine.resources.estimate; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "False"


def test_counted_tensors_match_what_autograd_saves() -> None:
    """The per-layer count of saved tensors against saved-tensor hooks on the real model."""
    torch = pytest.importorskip("torch")
    from minigpt_cli.engine.model.gpt import GPT

    shapes = (
        ModelConfig(n_layer=2, n_embd=128, n_head=2, context_length=128),
        ModelConfig(n_layer=2, n_embd=256, n_head=8, n_kv_head=2, context_length=128),
    )
    for shape in shapes:
        for precision in ("fp32", "bf16"):
            torch.manual_seed(0)
            model = GPT(shape, 3000).train()
            ids = torch.randint(0, 3000, (2, shape.context_length))
            storages: dict[int, int] = {}

            def pack(tensor, storages=storages):  # noqa: ANN001, ANN202
                storage = tensor.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
                return tensor

            autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
                model(ids, targets=ids, reduction="sum")
            weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
            measured = sum(size for ptr, size in storages.items() if ptr not in weights)
            counted = activation_bytes(shape, 3000, tokens=ids.numel(), precision=precision).saved
            assert counted == pytest.approx(measured, rel=0.03), (shape, precision)


def test_measured_peak_rss_of_a_real_run_is_near_the_estimate() -> None:
    """Train `tiny` at micro-batch 4 in a fresh process; its peak RSS (from the kernel) must be
    within 25 % of the estimate (generous: measured from outside, and glibc's heap varies)."""
    case = {
        "model": TINY.model_dump(),
        "vocab": VOCAB,
        "micro_batch": 4,
        "steps": 2,
        "accumulation": 2,
        "data_tokens": 200_000,
    }
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "memory.py"), "--worker", json.dumps(case)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    measured = json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"]
    # The worker prepares no data in-process (no tokenizer training): a bare training process.
    estimate = _estimate(
        4, global_batch_size=8, data_bytes=200_000 * 4, framework_bytes=FRAMEWORK_BYTES
    )
    assert abs(estimate.total - measured) / measured < 0.25, (estimate.describe(), measured)
