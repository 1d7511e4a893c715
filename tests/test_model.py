"""The model: cache-exact decoding, HF layout, parameter counts, the fused loss, checkpointing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from minigpt_cli.config.params import (
    count_non_embedding_parameters,
    count_parameters,
    flops_per_token,
    format_count,
)
from minigpt_cli.config.schema import ModelConfig
from minigpt_cli.engine.model.gpt import GPT
from minigpt_cli.engine.model.loss import IGNORE_INDEX

VOCAB = 61


# One thread for tiny tensors (`conftest.one_thread` says why).
pytestmark = pytest.mark.usefixtures("one_thread")


def small_cfg(**changes) -> ModelConfig:
    values = dict(n_layer=2, n_head=4, n_embd=32, context_length=32)
    values.update(changes)
    return ModelConfig(**values)


def make_model(seed: int = 0, vocab: int = VOCAB, **changes) -> GPT:
    torch.manual_seed(seed)
    return GPT(small_cfg(**changes), vocab)


# ------------------------------------------------------------------------------ KV cache


@pytest.mark.parametrize("kv_heads", [None, 2, 1])
def test_kv_cache_logits_equal_full_forward(kv_heads: int | None) -> None:
    model = make_model(n_kv_head=kv_heads).eval()
    ids = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_kv_cache(3)
        pieces = [model(ids[:, :9], kv_cache=cache)]  # prefill
        pieces.append(model(ids[:, 9:14], kv_cache=cache))  # several tokens after a prefix
        pieces += [model(ids[:, i : i + 1], kv_cache=cache) for i in range(14, 24)]
    assert cache.length == 24
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_cache_reorder_moves_rows() -> None:
    model = make_model().eval()
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cache = model.new_kv_cache(2)
        model(ids, kv_cache=cache)
        cache.reorder(torch.tensor([1, 1]))
        next_token = torch.tensor([[5], [5]])
        logits = model(next_token, kv_cache=cache)
        reference = model(torch.cat((ids[1:2], next_token[:1]), dim=1))[:, -1]
    torch.testing.assert_close(logits[0, -1], reference[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1, -1], reference[0], atol=1e-5, rtol=1e-5)


def test_positions_beyond_context_are_refused() -> None:
    model = make_model().eval()
    with pytest.raises(ValueError, match="exceed"):
        model(torch.zeros(1, 33, dtype=torch.long))
    cache = model.new_kv_cache(1, max_len=8)
    model(torch.zeros(1, 8, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="cache"):
        model(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache)


def test_stacked_weights_never_outlive_a_decoding_call() -> None:
    """Decoding stacks q/k/v and gate/up weights once per call; an optimizer step between two
    calls (fused AdamW changes weights without bumping version counters) must be seen."""
    from minigpt_cli.engine.model.layers import reuse_stacked_weights

    torch.manual_seed(0)
    model = make_model()
    ids = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode(), reuse_stacked_weights():
        before = model(ids)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    model(ids).float().pow(2).mean().backward()
    optimizer.step()
    with torch.inference_mode(), reuse_stacked_weights():
        after = model(ids)
    with torch.no_grad():
        expected = model(ids)  # the training path concatenates afresh
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected, atol=1e-5, rtol=1e-5)


def test_hugging_face_tensor_names_and_shapes() -> None:
    model = make_model(n_kv_head=2, tie_embeddings=False)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    ffn = small_cfg().ffn_dim
    expected = {"model.embed_tokens.weight": (VOCAB, 32), "model.norm.weight": (32,)}
    expected["lm_head.weight"] = (VOCAB, 32)
    for i in range(2):
        p = f"model.layers.{i}."
        expected.update(
            {
                p + "self_attn.q_proj.weight": (32, 32),
                p + "self_attn.k_proj.weight": (16, 32),  # 2 kv heads x head_dim 8
                p + "self_attn.v_proj.weight": (16, 32),
                p + "self_attn.o_proj.weight": (32, 32),
                p + "mlp.gate_proj.weight": (ffn, 32),
                p + "mlp.up_proj.weight": (ffn, 32),
                p + "mlp.down_proj.weight": (32, ffn),
                p + "input_layernorm.weight": (32,),
                p + "post_attention_layernorm.weight": (32,),
            }
        )
    assert shapes == expected


def _reference_llama_logits(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    """HF LlamaForCausalLM's forward written out from its formulas, reading our state dict.

    Independent of the model package's code paths (no fused weights, no SDPA, explicit repeat_kv and
    rotate_half), so agreement proves the weights can be exported to HF by name alone.
    """
    cfg = model.config
    sd = model.state_dict()
    h, kv, hd = cfg.n_head, cfg.kv_heads, cfg.head_dim
    batch, seq = ids.shape

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps))

    def rotate_half(x):
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return torch.cat((-x2, x1), dim=-1)

    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    freqs = torch.outer(torch.arange(seq, dtype=torch.float64), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().float(), emb.sin().float()

    x = sd["model.embed_tokens.weight"][ids]
    causal = torch.full((seq, seq), float("-inf")).triu(1)
    for i in range(cfg.n_layer):
        p = f"model.layers.{i}."
        a = rms(x, sd[p + "input_layernorm.weight"])
        q = (a @ sd[p + "self_attn.q_proj.weight"].T).view(batch, seq, h, hd).transpose(1, 2)
        k = (a @ sd[p + "self_attn.k_proj.weight"].T).view(batch, seq, kv, hd).transpose(1, 2)
        v = (a @ sd[p + "self_attn.v_proj.weight"].T).view(batch, seq, kv, hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k = k.repeat_interleave(h // kv, dim=1)
        v = v.repeat_interleave(h // kv, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd) + causal
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, seq, h * hd)
        x = x + out @ sd[p + "self_attn.o_proj.weight"].T
        m = rms(x, sd[p + "post_attention_layernorm.weight"])
        gate = m @ sd[p + "mlp.gate_proj.weight"].T
        up = m @ sd[p + "mlp.up_proj.weight"].T
        x = x + (F.silu(gate) * up) @ sd[p + "mlp.down_proj.weight"].T
    x = rms(x, sd["model.norm.weight"])
    return x @ sd["lm_head.weight"].T


@pytest.mark.parametrize("kv_heads", [None, 2])
def test_matches_hugging_face_llama_formulas(kv_heads: int | None) -> None:
    model = make_model(n_kv_head=kv_heads, rope_theta=500.0).eval()
    with torch.no_grad():  # norms away from 1 so their weights matter
        for param in model.parameters():
            if param.dim() == 1:
                param.uniform_(0.5, 1.5)
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = model(ids)
        reference = _reference_llama_logits(model, ids)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)


def test_tied_embeddings_share_storage_and_export_once() -> None:
    model = make_model()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.num_parameters() == count_parameters(model.config, VOCAB)
    exported = model.export_state_dict()
    assert "lm_head.weight" not in exported
    clone = make_model(seed=9)
    clone.load_exported_state_dict(exported)
    assert clone.lm_head.weight is clone.model.embed_tokens.weight
    torch.testing.assert_close(clone.lm_head.weight, model.model.embed_tokens.weight)
    assert len(list(clone.parameters())) == len(list(model.parameters()))


def test_untied_head_is_separate_and_exported() -> None:
    model = make_model(tie_embeddings=False)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert "lm_head.weight" in model.export_state_dict()
    assert model.num_parameters() == count_parameters(model.config, VOCAB)


def test_tied_model_refuses_a_different_head() -> None:
    state = make_model(tie_embeddings=False).state_dict()
    with pytest.raises(ValueError, match="ties them"):
        make_model().load_state_dict(state)


# ------------------------------------------------------------------------------ sizes


PRESET_SHAPES = {
    "tiny": (dict(n_embd=128, n_layer=4, n_head=2, context_length=256), 5000),
    "small": (dict(n_embd=512, n_layer=6, n_head=8, context_length=256), 10000),
    "medium": (dict(n_embd=640, n_layer=10, n_head=10, context_length=512), 16000),
    "large": (dict(n_embd=768, n_layer=12, n_head=12, context_length=512), 32000),
    "gqa": (dict(n_embd=256, n_layer=3, n_head=8, n_kv_head=2, context_length=128), 1000),
    "untied": (dict(n_embd=96, n_layer=2, n_head=3, tie_embeddings=False), 700),
}


@pytest.mark.parametrize("name", list(PRESET_SHAPES))
def test_count_parameters_equals_the_real_model(name: str) -> None:
    shape, vocab = PRESET_SHAPES[name]
    cfg = ModelConfig(**shape)
    with torch.device("meta"):
        model = GPT(cfg, vocab)
    assert model.num_parameters() == count_parameters(cfg, vocab)
    non_embedding = model.num_parameters(exclude_embeddings=True)
    assert non_embedding == count_non_embedding_parameters(cfg)


def test_preset_sizes_are_the_expected_orders_of_magnitude() -> None:
    sizes = {
        name: count_parameters(ModelConfig(**shape), vocab)
        for name, (shape, vocab) in PRESET_SHAPES.items()
        if name in ("tiny", "small", "medium", "large")
    }
    assert format_count(sizes["tiny"]) == "1.49M"
    assert sizes["tiny"] < sizes["small"] < sizes["medium"] < sizes["large"]
    assert 100e6 < sizes["large"] < 150e6


def test_flops_per_token_counts_matmul_weights_and_attention() -> None:
    cfg = ModelConfig(n_embd=128, n_layer=4, n_head=2, context_length=256)
    blocks = count_non_embedding_parameters(cfg)
    assert flops_per_token(cfg, 5000) == 6 * (blocks + 5000 * 128) + 12 * 4 * 128 * 256
    assert flops_per_token(cfg, 5000, seq_len=64) == 6 * (blocks + 5000 * 128) + 12 * 4 * 128 * 64
    untied = ModelConfig(n_embd=128, n_layer=4, n_head=2, tie_embeddings=False)
    # The untied input table is a lookup, not a matmul: same FLOPs, more parameters.
    assert flops_per_token(untied, 5000) == flops_per_token(cfg, 5000)
    assert count_parameters(untied, 5000) == count_parameters(cfg, 5000) + 5000 * 128
    model = GPT(cfg, 5000)
    assert model.estimate_flops_per_token() == flops_per_token(cfg, 5000)


@pytest.mark.parametrize(
    ("count", "text"),
    [(0, "0"), (999, "999"), (1000, "1.00K"), (12_345, "12.3K"), (999_960, "1.00M")]
    + [(1_234_567, "1.23M"), (123_456_789, "123M"), (4_560_000_000, "4.56B")],
)
def test_format_count(count: int, text: str) -> None:
    assert format_count(count) == text


# ------------------------------------------------------------------------------ loss


def _reference_loss(model: GPT, ids, targets, reduction):
    logits = model(ids)
    return F.cross_entropy(
        logits.float().flatten(0, 1),
        targets.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_loss_and_gradients_equal_plain_cross_entropy(reduction: str) -> None:
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (3, 16), generator=gen)
    targets = torch.randint(0, VOCAB, (3, 16), generator=gen)
    targets[0, :7] = IGNORE_INDEX
    targets[2, :] = IGNORE_INDEX
    fused_model, plain_model = make_model(), make_model()
    logits, loss = fused_model(ids, targets=targets, reduction=reduction)
    assert logits is None  # not materialised on the training path
    loss.backward()
    reference = _reference_loss(plain_model, ids, targets, reduction)
    reference.backward()
    torch.testing.assert_close(loss, reference, atol=1e-5, rtol=1e-5)
    for (name, a), (_, b) in zip(
        fused_model.named_parameters(), plain_model.named_parameters(), strict=True
    ):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_the_head_sees_the_scored_rows_and_enough_ignored_ones_for_a_multiple_of_32(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import minigpt_cli.engine.model.gpt as gpt_module

    targets = torch.full((120,), IGNORE_INDEX)
    targets[[3, 50, 119]] = 7
    rows = gpt_module.scored_rows(targets)
    assert rows is not None and len(rows) == gpt_module.SCORED_ROWS_MULTIPLE
    assert rows[:3].tolist() == [3, 50, 119]  # the scored rows first, then ignored ones
    assert bool((targets[rows[3:]] == IGNORE_INDEX).all()) and len(set(rows.tolist())) == 32
    targets[:40] = 7  # 42 scored rows: 64 kept
    assert len(gpt_module.scored_rows(targets)) == 64
    assert gpt_module.scored_rows(torch.full((120,), 7)) is None  # pretraining: every row
    assert gpt_module.scored_rows(targets[:60]) is None  # 64 would save nothing

    # In a forward, the fused head gets only those rows, and the loss is the plain one.
    seen = []
    fused = gpt_module.FusedLinearCrossEntropy.apply
    monkeypatch.setattr(
        gpt_module.FusedLinearCrossEntropy,
        "apply",
        lambda hidden, *rest: seen.append(hidden.shape[0]) or fused(hidden, *rest),
    )
    ids = torch.randint(0, VOCAB, (4, 24), generator=torch.Generator().manual_seed(1))
    answers = torch.full((4, 24), IGNORE_INDEX)
    answers[:, 20:] = ids[:, 20:]
    model = make_model()
    _, loss = model(ids, targets=answers, reduction="sum")
    assert seen == [32]
    torch.testing.assert_close(loss, _reference_loss(model, ids, answers, "sum"))


def test_group_losses_are_each_groups_own_forward_in_one_pass() -> None:
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (5, 12), generator=gen)
    targets = torch.randint(0, VOCAB, (5, 12), generator=gen)
    targets[:3, :6] = IGNORE_INDEX
    model = make_model()
    first, second = model.group_losses(ids, targets, (3, 2))
    (first + 0.25 * second).backward()
    together = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    _, alone_first = model(ids[:3], targets=targets[:3], reduction="sum")
    _, alone_second = model(ids[3:], targets=targets[3:], reduction="sum")
    (alone_first + 0.25 * alone_second).backward()
    torch.testing.assert_close(first, alone_first)
    torch.testing.assert_close(second, alone_second)
    for got, want in zip(together, [p.grad for p in model.parameters()], strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
    with pytest.raises(ValueError, match="groups of"):
        model.group_losses(ids, targets, (3, 3))


def test_fused_loss_spans_several_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    import minigpt_cli.engine.model.loss as loss_module

    # At most 7 rows per chunk: 48 rows -> 7 chunks of 7 rows, the last one partial.
    monkeypatch.setattr(loss_module, "_LOSS_CHUNK_ROWS", 7)
    assert loss_module.loss_chunk_rows(48) == 7 and loss_module.loss_chunk_rows(7) == 7
    assert loss_module.loss_chunk_rows(8) == 4  # two equal chunks rather than 7 + 1
    test_fused_loss_and_gradients_equal_plain_cross_entropy("sum")


@pytest.mark.parametrize("group_rows", [5, 10, 1000])
def test_bf16_head_gradient_summed_by_groups_of_chunks(
    monkeypatch: pytest.MonkeyPatch, group_rows: int
) -> None:
    """Under autocast a large head's gradient is one bf16 product per group of chunks (one chunk,
    two, or all ten here), summed in fp32: each grouping must give the fp32 gradient to bf16
    accuracy, with ignored rows contributing nothing and a partial last group. Which heads count
    as large: small's and up, not tiny's (whose runs keep their per-chunk rounding)."""
    import minigpt_cli.engine.model.loss as loss_module
    from minigpt_cli.config.loader import load_config
    from minigpt_cli.engine.resources.activations import loss_grad_grouped

    for preset, large in (("tiny", False), ("small", True), ("medium", True)):
        config = load_config(preset)
        assert loss_grad_grouped(config.tokenizer.vocab_size, config.model.n_embd) is large
    monkeypatch.setattr(loss_module, "_LOSS_CHUNK_ROWS", 5)
    monkeypatch.setattr(loss_module, "LOSS_GRAD_GROUP_ROWS", group_rows)
    monkeypatch.setattr(loss_module, "loss_grad_grouped", lambda vocab, width: True)
    assert loss_module.loss_grad_group_rows(48, 5) == min(max(5, group_rows // 5 * 5), 50)
    gen = torch.Generator().manual_seed(8)
    ids = torch.randint(0, VOCAB, (3, 16), generator=gen)
    targets = torch.randint(0, VOCAB, (3, 16), generator=gen)
    targets[0, :7] = IGNORE_INDEX
    grouped, reference = make_model(), make_model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = grouped(ids, targets=targets, reduction="sum")
    loss.backward()
    _reference_loss(reference, ids, targets, "sum").backward()
    head, expected = grouped.lm_head.weight.grad, reference.lm_head.weight.grad
    assert head.dtype == torch.float32
    torch.testing.assert_close(head, expected, atol=0.02 * expected.abs().max().item(), rtol=0.05)
    # Rows whose targets are all ignored feed no gradient: a model fed only those gets none.
    only_ignored = make_model()
    blank = torch.full_like(targets, IGNORE_INDEX)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, nothing = only_ignored(ids, targets=blank, reduction="sum")
    nothing.backward()
    assert torch.count_nonzero(only_ignored.lm_head.weight.grad) == 0


def test_per_token_losses_and_returned_logits() -> None:
    model = make_model()
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(6))
    targets = ids.roll(-1, dims=1)
    targets[:, -1] = IGNORE_INDEX
    logits, per_token = model(ids, targets=targets, reduction="none")
    assert per_token.shape == (2, 10)
    assert torch.all(per_token[:, -1] == 0)
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets[:, :-1].flatten())
    torch.testing.assert_close(per_token[:, :-1].mean(), expected)
    logits, mean = model(ids, targets=targets, return_logits=True)
    assert logits.shape == (2, 10, VOCAB)
    torch.testing.assert_close(mean, expected)


def test_loss_under_bf16_autocast_is_fp32_and_close() -> None:
    model = make_model()
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(7))
    targets = ids.roll(-1, dims=1)
    _, fp32 = model(ids, targets=targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, bf16 = model(ids, targets=targets)
    bf16.backward()
    assert bf16.dtype == torch.float32
    assert abs(bf16.item() - fp32.item()) < 0.05
    assert model.lm_head.weight.grad.dtype == torch.float32
    assert torch.isfinite(model.lm_head.weight.grad).all()


def test_cpu_bf16_forwards_pad_the_length_to_a_multiple_of_8_and_cut_it_off_again() -> None:
    # What the caller would get by padding each batch itself (the padding never scored): the
    # same numbers, bit for bit, whichever width the batch has; in fp32 nothing is added.
    model = make_model()
    ids = torch.randint(0, VOCAB, (3, 13), generator=torch.Generator().manual_seed(9))
    targets = ids.roll(-1, dims=1)
    padded_ids = F.pad(ids, (0, 3))
    padded_targets = F.pad(targets, (0, 3), value=IGNORE_INDEX)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, per_token = model(ids, targets=targets, reduction="none")
        want_logits, want = model(padded_ids, targets=padded_targets, reduction="none")
        _, total = model(ids, targets=targets, reduction="sum")
        _, want_total = model(padded_ids, targets=padded_targets, reduction="sum")
        hidden = model.hidden_states(ids)
        want_hidden = model.hidden_states(padded_ids)[:, :13]
        last = model(ids, last_only=True)
        assert model._length_padding(ids, None, room=32) == 3
        assert model._length_padding(ids, None, room=14) == 1  # never past the context
    assert logits.shape == (3, 13, VOCAB) and per_token.shape == (3, 13)
    assert torch.equal(logits, want_logits[:, :13]) and torch.equal(per_token, want[:, :13])
    assert torch.equal(total, want_total)
    assert torch.equal(hidden, want_hidden)
    assert torch.equal(last, want_logits[:, 12:13])
    assert model._length_padding(ids, None, room=32) == 0  # fp32: no padding


def test_no_gradient_work_under_no_grad() -> None:
    model = make_model()
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        _, loss = model(ids, targets=ids)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, _reference_loss(model, ids, ids, "mean").detach())


def test_activation_checkpointing_gives_same_loss_and_gradients() -> None:
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(9))
    targets = ids.roll(-1, dims=1)
    results = []
    for checkpointing in (False, True):
        model = make_model(activation_checkpointing=checkpointing, dropout=0.0).train()
        _, loss = model(ids, targets=targets)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, atol=0, rtol=0)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-7, rtol=1e-6, msg=name)


# ------------------------------------------------------------------------------ init / training


def test_initialisation_scales_residual_outputs() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(n_embd=256, n_layer=8, n_head=4, init_std=0.02)
    model = GPT(cfg, 500)
    layer = model.model.layers[3]
    assert layer.self_attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert layer.self_attn.o_proj.weight.std().item() == pytest.approx(0.005, rel=0.05)
    assert layer.mlp.down_proj.weight.std().item() == pytest.approx(0.005, rel=0.05)
    assert torch.all(layer.input_layernorm.weight == 1)
    # A fresh model predicts close to uniform: loss near log(vocab), not a blown-up start. (The
    # tied head favours the current token a little, hence the tolerance.)
    ids = torch.randint(0, 500, (2, 64))
    _, loss = model(ids, targets=torch.randint(0, 500, (2, 64)))
    assert abs(loss.item() - math.log(500)) < 0.5


def test_a_few_adamw_steps_learn_a_repeated_sequence() -> None:
    model = make_model(dropout=0.1).train()
    ids = torch.arange(0, 32).remainder(VOCAB).unsqueeze(0).repeat(4, 1)
    targets = ids.roll(-1, dims=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        _, loss = model(ids, targets=targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_loss_of_a_hopeless_prediction_stays_exact() -> None:
    """A target probability that underflows fp32 must still give the true (huge) loss."""
    from minigpt_cli.engine.model.loss import _softmax_and_losses

    logits = torch.tensor([[0.0, -200.0, 5.0], [1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    target = torch.tensor([[1], [2], [0]])
    valid = torch.tensor([True, True, False])
    probs, losses = _softmax_and_losses(logits, target, valid)
    expected = torch.logsumexp(logits, -1) - logits.gather(1, target).squeeze(1)
    torch.testing.assert_close(losses[:2], expected[:2])
    assert losses[0].item() > 200 and losses[2].item() == 0.0
    torch.testing.assert_close(probs, logits.softmax(-1))
    _, easy = _softmax_and_losses(logits[1:], target[1:], valid[1:])  # the fast path
    torch.testing.assert_close(easy[0], expected[1])


def test_rms_norm_gradients_are_exact() -> None:
    from minigpt_cli.engine.model.layers import RMSNorm, _RMSNormFunction

    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, w: _RMSNormFunction.apply(a, w, 1e-5, False), (x, weight)
    )
    norm = RMSNorm(8, 1e-5)
    data = torch.randn(4, 8) * 3
    expected = F.rms_norm(data, (8,), norm.weight, 1e-5)
    torch.testing.assert_close(norm(data), expected)
    with torch.no_grad():
        torch.testing.assert_close(norm(data), expected)
        assert norm(data.bfloat16()).dtype == torch.bfloat16  # computed in fp32, returned as given


def _norm_step(feeds_matmul: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A decoder-layer-shaped norm under bf16 autocast: (output, x's gradient, weight's)."""
    from minigpt_cli.engine.model.layers import _RMSNormFunction

    generator = torch.Generator().manual_seed(11)
    x = (torch.randn(3, 7, 16, generator=generator) * 2).requires_grad_()
    weight = (torch.rand(16, generator=generator) + 0.5).requires_grad_()
    upstream = torch.randn(3, 7, 16, generator=generator).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _RMSNormFunction.apply(x, weight, 1e-5, feeds_matmul)
    out.backward(upstream.to(out.dtype))
    assert x.grad is not None and weight.grad is not None
    return out.detach(), x.grad, weight.grad


def test_bf16_norms_that_feed_a_matmul_run_compiled_kernels_with_eagers_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under autocast a decoder layer's norm (wide models; here every width counts as wide) runs
    one compiled kernel each way and hands over the bf16 copy autocast's matmul would make: the
    same values as the eager norm followed by autocast's cast, gradients to fp32 rounding."""
    from minigpt_cli.engine.model import kernels, layers

    monkeypatch.setattr(layers, "FUSED_BACKWARD_MIN_WIDTH", 0)
    want_out, want_x, want_weight = _norm_step(feeds_matmul=False)
    assert want_out.dtype == torch.float32  # the final norm's kind: eager, fp32 out
    out, grad_x, grad_weight = _norm_step(feeds_matmul=True)
    if kernels.unavailable_reason() is not None:
        pytest.skip(f"torch.compile cannot build kernels here: {kernels.unavailable_reason()}")
    assert out.dtype == torch.bfloat16
    assert str(kernels.note(2.5)).startswith("torch.compile kernels for RMSNorm")
    assert "(2.5 s;" in str(kernels.note(2.5))
    torch.testing.assert_close(out.float(), want_out.bfloat16().float(), rtol=8e-3, atol=1e-6)
    torch.testing.assert_close(grad_x, want_x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_weight, want_weight, rtol=1e-5, atol=1e-6)


def test_norms_stay_eager_for_the_rest_of_the_process_once_compiling_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No C++ compiler (say): the failure is kept and said; the norm's values are eager's."""
    from minigpt_cli.engine.model import kernels, layers

    monkeypatch.setattr(layers, "FUSED_BACKWARD_MIN_WIDTH", 0)
    monkeypatch.setattr(kernels, "_compiled", {})
    monkeypatch.setattr(kernels, "_failure", [])
    monkeypatch.setattr(kernels, "_tried", {})
    attempts: list[object] = []

    def no_compiler(function: object, **_: object) -> object:
        attempts.append(function)
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    monkeypatch.setattr(torch, "compile", no_compiler)
    want_out, want_x, want_weight = _norm_step(feeds_matmul=False)
    for _ in range(2):
        out, grad_x, grad_weight = _norm_step(feeds_matmul=True)
        assert torch.equal(out, want_out) and torch.equal(grad_x, want_x)
        assert torch.equal(grad_weight, want_weight)
    assert len(attempts) == 1  # tried once, then eager without trying again
    assert kernels.unavailable_reason() == (
        "RuntimeError: InvalidCxxCompiler: No working C++ compiler found"
    )
    assert kernels.note(0.1) == (
        "no torch.compile kernels for RMSNorm: eager code instead "
        "(RuntimeError: InvalidCxxCompiler: No working C++ compiler found)"
    )


def test_pytorchs_rms_norm_forward_is_bitwise_ours(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """fp32 norms run PyTorch's own forward (`_fused_rms_norm`) and a backward rebuilt from the
    saved input: outputs and gradients must be bitwise those of our composite path."""
    from minigpt_cli.engine.model import layers

    if not layers._FUSED_RMS_NORM:
        pytest.skip("this PyTorch has no _fused_rms_norm")
    norm = layers.RMSNorm(24, 1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    data = torch.randn(3, 7, 24) * 3
    upstream = torch.randn(3, 7, 24)

    def run() -> tuple[torch.Tensor, ...]:
        x = data.clone().requires_grad_()
        norm.weight.grad = None
        out = norm(x)
        out.backward(upstream)
        with torch.no_grad():
            plain = norm(data)
        return out.detach(), plain, x.grad, norm.weight.grad

    assert layers.fused_rms_norm_applies(data.dtype, norm.weight)
    fused = run()
    monkeypatch.setattr(layers, "_FUSED_RMS_NORM", False)
    assert not layers.fused_rms_norm_applies(data.dtype, norm.weight)
    composite = run()
    names = ("forward", "no-grad forward", "x grad", "weight grad")
    for name, a, b in zip(names, fused, composite, strict=True):
        assert torch.equal(a, b), name


def test_grouped_query_attention_without_enable_gqa(monkeypatch: pytest.MonkeyPatch) -> None:
    """PyTorch before 2.5 lacks SDPA's enable_gqa: repeating keys/values must give the same."""
    import minigpt_cli.engine.model.attention as attention_module

    model = make_model(n_kv_head=2).eval()
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        native = model(ids)
        monkeypatch.setattr(attention_module, "_SDPA_GQA", False)
        repeated = model(ids)
    torch.testing.assert_close(native, repeated, atol=1e-6, rtol=1e-5)


def _attention_gradients(
    dtype: torch.dtype, shape: tuple[int, ...], seed: int
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """attend's output and gradients for random causal inputs, beside fp32's and PyTorch's own
    half kernel's gradients on the same inputs."""
    from minigpt_cli.engine.model import attention

    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(shape, generator=generator).to(dtype).requires_grad_() for _ in "qkv")
    grad_out = torch.randn(shape, generator=generator).to(dtype)
    out = attention.attend(q, k, v, shape[1], shape[1], causal=True)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    mine = list(torch.autograd.grad(out, (q, k, v), grad_out))
    fp32 = [t.detach().float().requires_grad_() for t in (q, k, v)]
    exact = torch.autograd.grad(
        F.scaled_dot_product_attention(*fp32, is_causal=True), fp32, grad_out.float()
    )
    plain = torch.autograd.grad(
        F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), grad_out
    )
    return out, mine, list(exact), list(plain)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_attention_backward_runs_in_fp32(dtype: torch.dtype) -> None:
    """The bf16/fp16 attention whose backward is PyTorch's fp32 kernel: the forward is the half
    kernel's own output, bit for bit; the gradients are the fp32 kernel's on the same inputs (so
    closer to fp32 than the half kernel's); other calls keep the plain kernel."""
    from minigpt_cli.engine.model import attention

    shape = (2, 4, 24, 16)
    q = torch.zeros(shape, dtype=dtype, requires_grad=True)
    assert attention._backward_path(q, True, None) == "fp32"
    out, grads, want, half = _attention_gradients(dtype, shape, seed=12)
    assert "HalfAttentionFp32" in type(out.grad_fn).__name__
    for mine, exact, plain in zip(grads, want, half, strict=True):
        assert mine.dtype == dtype
        error = (mine.float() - exact).abs().max()
        assert error <= 2 * (plain.float() - exact).abs().max() and error < 0.05
    # fp32, no gradient, a mask, wide heads over long sequences: the plain kernel.
    assert attention._backward_path(q.detach().float().requires_grad_(), True, None) == "kernel"
    assert attention._backward_path(q.detach(), True, None) == "kernel"
    assert attention._backward_path(q, True, torch.ones(24, 24, dtype=torch.bool)) == "kernel"
    wide = torch.zeros(1, 1, 512, 64, dtype=dtype, requires_grad=True)
    assert attention._backward_path(wide, True, None) == "kernel"


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("positions", [256, 200])
def test_bf16_attention_backward_over_whole_squares_is_as_close_to_fp32_as_the_kernels(
    positions: int, compiled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """64-dim heads over 129-256 positions in bf16 (`small`'s shape) take the square backward,
    or by key blocks where compiled kernels are unavailable: the forward is the kernel's own
    output, bit for bit, and every gradient is within twice the bf16 kernel's own distance from
    fp32's (relative, over the whole tensor; measured 0.6-1.45x); fp16 keeps the kernel. A wrong
    mask, scale or block boundary is off by far more than that. The squares' scores product
    borrows the "medium" fp32 matmul precision and gives it back."""
    from minigpt_cli.engine.model import attention, kernels

    if not compiled:
        monkeypatch.setattr(kernels, "_failure", ["compiling switched off by the test"])
    monkeypatch.setattr(kernels, "_used", {})
    monkeypatch.setattr(kernels, "_tried", {})
    shape = (2, 3, positions, 64)
    half = torch.zeros(shape, dtype=torch.float16, requires_grad=True)
    assert attention._backward_path(half, True, None) == "kernel"
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        out, grads, want, plain = _attention_gradients(torch.bfloat16, shape, seed=13)
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(previous)
    assert "HalfAttentionSquare" in type(out.grad_fn).__name__
    ran_compiled = "attention" in kernels._used
    assert ran_compiled == (compiled and kernels.unavailable_reason() is None)
    note = str(kernels.note(1.0))  # the run's log says which backward it runs
    assert "attention's backward" in note and note.startswith("no ") != ran_compiled
    for mine, exact, kernel in zip(grads, want, plain, strict=True):
        assert mine.dtype == torch.bfloat16 and mine.shape == exact.shape
        error = (mine.float() - exact).norm() / exact.norm()
        assert error <= 2 * (kernel.float() - exact).norm() / exact.norm() and error < 0.01


def test_frozen_head_gets_no_gradient_but_the_body_does() -> None:
    """LoRA-style training freezes the embedding/head: the fused loss must skip their gradient."""
    model = make_model()
    model.model.embed_tokens.weight.requires_grad_(False)
    reference = make_model()
    reference.model.embed_tokens.weight.requires_grad_(False)
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(12))
    _, loss = model(ids, targets=ids.roll(-1, 1))
    loss.backward()
    _reference_loss(reference, ids, ids.roll(-1, 1), "mean").backward()
    assert model.lm_head.weight.grad is None
    layer, ref_layer = model.model.layers[1].mlp.down_proj, reference.model.layers[1].mlp.down_proj
    torch.testing.assert_close(layer.weight.grad, ref_layer.weight.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_hand_written_backwards_match_autograds(dtype: torch.dtype) -> None:
    """`layers._RotaryQKV` and `layers._SwiGLU` (wide models' backwards): the forward is
    autograd's, bitwise; SwiGLU's gradient is too, the rotary's within the sum's rounding."""
    from minigpt_cli.engine.model import layers

    generator = torch.Generator().manual_seed(3)
    heads, kv, dim = 4, 2, 8
    qkv = torch.randn(2, 5, heads + 2 * kv, dim, generator=generator).to(dtype)
    cos = torch.randn(5, 1, dim, generator=generator).to(dtype)
    sin = torch.randn(5, 1, dim, generator=generator).to(dtype)
    upstream = [torch.randn(2, 5, n, dim, generator=generator).to(dtype) for n in (heads, kv, kv)]

    def rotary(fused: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
        x = qkv.clone().requires_grad_()
        if fused:
            outs = list(layers._RotaryQKV.apply(x, cos, sin, heads))
        else:
            qk, v = x.split((heads + kv, kv), 2)
            outs = [*layers._apply_rotary(qk, cos, sin).split((heads, kv), 2), v]
        sum((out * grad).sum() for out, grad in zip(outs, upstream, strict=True)).backward()
        assert x.grad is not None
        return [out.detach() for out in outs], x.grad

    (outs, grad), (want_outs, want_grad) = rotary(True), rotary(False)
    assert all(torch.equal(a, b) for a, b in zip(outs, want_outs, strict=True))
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(grad.float(), want_grad.float(), rtol=tolerance, atol=tolerance)

    gate_up = torch.randn(2, 5, 12, generator=generator).to(dtype)
    upstream_mlp = torch.randn(2, 5, 6, generator=generator).to(dtype)

    def swiglu(fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
        x = gate_up.clone().requires_grad_()
        if fused:
            out = layers._SwiGLU.apply(x)
        else:
            gate, up = x.chunk(2, dim=-1)
            out = F.silu(gate) * up
        out.backward(upstream_mlp)
        assert x.grad is not None
        return out.detach(), x.grad

    (out, grad), (want_out, want_grad) = swiglu(True), swiglu(False)
    assert torch.equal(out, want_out) and torch.equal(grad, want_grad)


def test_wide_models_train_through_the_hand_written_backwards(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With every model counted wide, a training step (rotary, SwiGLU, RMSNorm's row sums
    by matrix-vector product) gives autograd's loss and gradients to float rounding, and really
    runs the hand-written functions."""
    from minigpt_cli.engine.model import layers

    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(4))

    def gradients() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model = make_model(seed=8, n_kv_head=2)
        _, loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    want_loss, want = gradients()
    calls: list[str] = []
    for function in (layers._RotaryQKV, layers._SwiGLU):
        original = function.backward
        monkeypatch.setattr(
            function,
            "backward",
            staticmethod(
                lambda ctx, *g, _f=original, _n=function.__name__: calls.append(_n) or _f(ctx, *g)
            ),
        )
    monkeypatch.setattr(layers, "FUSED_BACKWARD_MIN_WIDTH", 0)
    loss, got = gradients()
    assert sorted(set(calls)) == ["_RotaryQKV", "_SwiGLU"]
    torch.testing.assert_close(loss, want_loss, rtol=0, atol=0)  # forwards are bitwise
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_rms_norm_row_sums_by_matrix_vector_product_are_exact(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from minigpt_cli.engine.model import layers

    monkeypatch.setattr(layers, "FUSED_BACKWARD_MIN_WIDTH", 0)
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, w: layers._RMSNormFunction.apply(a, w, 1e-5, False), (x, weight)
    )
