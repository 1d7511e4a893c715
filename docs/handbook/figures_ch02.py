"""Chapter 2 (the Transformer): parameter and FLOP counts per preset, what grouped-query attention
saves, and the attention pattern of the quickstart's pretrained tiny model."""

from __future__ import annotations

import math
from typing import Any

from figkit import Kit, markdown_table

FIGURES = ["ch02-attention.png", "ch02-attention-head.png"]
TABLES = ["ch02-presets", "ch02-gqa", "ch02-heads"]

PRESETS = ("tiny", "small", "medium", "large")
# An addition from the built-in pretraining text's quiz format: the answer's digits have to be
# read off the question's, so the heads have something to look back for.
PROMPT = "Q:\nWhat is 38 plus 45?\nA:\n8+5=13, 3+4+1=8, so 83"


def make(kit: Kit) -> None:
    _presets(kit)
    _gqa(kit)
    _attention(kit)


def _presets(kit: Kit) -> None:
    from minigpt_cli.config import params
    from minigpt_cli.config.loader import load_config

    rows = []
    for name in PRESETS:
        config = load_config(preset=name)
        model, vocab = config.model, config.tokenizer.vocab_size
        total = params.count_parameters(model, vocab)
        flops = params.flops_per_token(model, vocab)
        attention = 12 * model.n_layer * model.n_embd * model.context_length
        rows.append(
            [
                name,
                model.n_layer,
                model.n_embd,
                f"{model.n_head} / {model.kv_heads}",
                model.head_dim,
                model.ffn_dim,
                model.context_length,
                f"{vocab:,}",
                f"{total:,}",
                f"{params.count_non_embedding_parameters(model):,}",
                f"{flops / 1e6:,.1f} M",
                f"{100 * attention / flops:.1f} %",
            ]
        )
    header = [
        "preset",
        "layers",
        "d_model",
        "heads (q / kv)",
        "head dim",
        "SwiGLU width",
        "context",
        "vocab",
        "parameters",
        "non-embedding",
        "training FLOPs / token",
        "attention share",
    ]
    kit.table("ch02-presets", markdown_table(header, rows))


def _gqa(kit: Kit) -> None:
    import torch

    from minigpt_cli.config import params
    from minigpt_cli.config.loader import load_config
    from minigpt_cli.engine.model.layers import KVCache

    rows = []
    for kv_heads in (8, 4, 2, 1):
        config = load_config(preset="small", sets=[f"model.n_kv_head={kv_heads}"])
        model, vocab = config.model, config.tokenizer.vocab_size
        cache = KVCache(
            model.n_layer,
            1,
            model.kv_heads,
            model.context_length,
            model.head_dim,
            dtype=torch.float32,
            device="meta",
        )
        cache_bytes = sum(t.numel() * t.element_size() for t in cache.keys + cache.values)
        rows.append(
            [
                f"{model.n_head} / {kv_heads}",
                f"{params.count_parameters(model, vocab):,}",
                f"{params.flops_per_token(model, vocab) / 1e6:,.1f} M",
                f"{cache_bytes / model.context_length / 1024:.0f} KiB",
                f"{cache_bytes / 2**20:.1f} MiB",
            ]
        )
    header = [
        "small: heads (q / kv)",
        "parameters",
        "training FLOPs / token",
        "KV cache per token (fp32)",
        f"KV cache, full {load_config(preset='small').model.context_length}-token context",
    ]
    kit.table("ch02-gqa", markdown_table(header, rows))


def _label(tokenizer: Any, token_id: int) -> str:
    if tokenizer.is_byte(token_id):
        value = int(tokenizer.piece(token_id)[3:5], 16)
        return "\\n" if value == 10 else f"x{value:02x}"
    return tokenizer.piece(token_id).replace("\u2581", "\u2423")  # a visible space


def _span(text: str, part: str) -> list[tuple[int, int]]:
    start = text.index(part)
    return [(start, start + len(part))]


def _attention(kit: Kit) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from minigpt_cli.engine.runs.load import load_run

    run = load_run(kit.quickstart() / "pretrain")
    model, tokenizer = run.model, run.tokenizer
    ids = [tokenizer.eos_id, *tokenizer.encode(PROMPT)]
    captured: list[tuple[Any, ...]] = []
    outputs: list[torch.Tensor] = []
    handles = []
    for layer in model.model.layers:
        attention = layer.self_attn
        handles.append(
            attention.register_forward_pre_hook(lambda _m, args: captured.append(args[:3]))
        )
        handles.append(attention.register_forward_hook(lambda _m, _a, out: outputs.append(out)))
    with torch.no_grad():
        model(torch.tensor([ids]))
    for handle in handles:
        handle.remove()

    maps = []
    with torch.no_grad():
        for layer, (x, cos, sin), out in zip(model.model.layers, captured, outputs, strict=True):
            attention = layer.self_attn
            q, k, v = (t.transpose(1, 2) for t in attention._project(x, cos, sin))
            repeat = attention.n_head // attention.n_kv_head
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
            scores = q @ k.transpose(-1, -2) / math.sqrt(attention.head_dim)
            length = len(ids)
            causal = torch.ones(length, length, dtype=torch.bool).tril()
            weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
            mixed = (weights @ v).transpose(1, 2).reshape(1, length, -1)
            # The weights drawn are the ones the model used: they rebuild its attention output.
            assert torch.allclose(attention.o_proj(mixed), out, atol=1e-5)
            maps.append(weights[0])

    labels = [_label(tokenizer, token_id) for token_id in ids]
    n_layer, n_head = len(maps), maps[0].shape[0]
    figure, axes = plt.subplots(n_layer, n_head, figsize=(2.4 * n_head, 2.4 * n_layer))
    for row in range(n_layer):
        for col in range(n_head):
            axis = axes[row][col]
            axis.imshow(maps[row][col].numpy(), cmap="viridis", vmin=0, vmax=1)
            axis.set_title(f"layer {row} head {col}", fontsize=9)
            axis.set_xticks([])
            axis.set_yticks([])
    figure.suptitle("Attention weights, every layer and head (rows: queries, columns: keys)")
    figure.tight_layout()
    kit.save_figure(figure, "ch02-attention.png")
    plt.close(figure)

    # The head that reads the question's digits most while the answer is written: the one whose
    # pattern an addition needs, chosen by this rule rather than by eye.
    ends = [len(tokenizer.decode(ids[1 : i + 1])) for i in range(len(ids))]
    starts = [0, *ends[:-1]]
    digits = [span for number in ("38", "45") for span in _span(PROMPT, number)]
    answer_start = PROMPT.index("A:\n") + 3
    question = [i for i in range(1, len(ids)) if any(a <= starts[i] < b for a, b in digits)]
    answer = [i for i in range(1, len(ids)) if starts[i] >= answer_start]
    scores = {
        (layer, head): float(weights[head][answer][:, question].sum(-1).mean())
        for layer, weights in enumerate(maps)
        for head in range(n_head)
    }
    digits_head = max(scores, key=lambda key: scores[key])
    previous = {
        (layer, head): float(weights[head][1:].diagonal().mean())
        for layer, weights in enumerate(maps)
        for head in range(n_head)
    }
    previous_head = max(previous, key=lambda key: previous[key])
    figure, panels = plt.subplots(1, 2, figsize=(16, 8.5))
    titles = {
        previous_head: f"{100 * previous[previous_head]:.0f} % of each token's attention on the "
        "token before it",
        digits_head: f"{100 * scores[digits_head]:.0f} % of each answer token's attention on "
        "the question's digits",
    }
    for axis, (layer, head) in zip(panels, (previous_head, digits_head), strict=True):
        axis.imshow(maps[layer][head].numpy(), cmap="viridis", vmin=0, vmax=1)
        axis.set_xticks(range(len(labels)), labels, rotation=90, fontsize=8)
        axis.set_yticks(range(len(labels)), labels, fontsize=8)
        axis.set(xlabel="key (looked at)", ylabel="query (looking)")
        axis.set_title(f"layer {layer} head {head}:\n{titles[layer, head]}", fontsize=10)
    figure.tight_layout()
    kit.save_figure(figure, "ch02-attention-head.png")
    plt.close(figure)

    rows = []
    positions = torch.arange(len(ids), dtype=torch.float32)
    distance = (positions.unsqueeze(1) - positions.unsqueeze(0)).clamp(min=0)
    queries = slice(1, None)  # the first position can only look at itself
    for layer, weights in enumerate(maps):
        for head in range(n_head):
            w = weights[head][queries]
            rows.append(
                [
                    layer,
                    head,
                    f"{float((w * distance[queries]).sum(-1).mean()):.1f}",
                    # Row i of `w` is query i + 1: key i is its previous token, key i + 1 itself.
                    f"{float(w.diagonal(offset=0).mean()):.2f}",
                    f"{float(w[:, 0].mean()):.2f}",
                    f"{float(w.diagonal(offset=1).mean()):.2f}",
                ]
            )
    header = [
        "layer",
        "head",
        "mean distance looked back (tokens)",
        "weight on the previous token",
        "weight on the first token",
        "weight on itself",
    ]
    kit.table("ch02-heads", markdown_table(header, rows))
