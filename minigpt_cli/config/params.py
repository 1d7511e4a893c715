"""Parameter counts and FLOPs from a model's shape, without building it.

`doctor`, the governor, the MFU figure and the README all need to know how big a model is before
(or without) allocating it, and they must agree exactly with the network `model/gpt.py` builds:
a test checks `count_parameters` against the real module for every preset. Counting from the shape
also keeps torch out of `minigpt --help` and the config commands, so this module imports no torch.
"""

from __future__ import annotations

from minigpt_cli.config.schema import ModelConfig


def _block_parameters(model_cfg: ModelConfig) -> int:
    """One decoder block: attention (q, k, v, o), SwiGLU MLP (gate, up, down), two RMSNorms."""
    d = model_cfg.n_embd
    head_dim = model_cfg.head_dim
    q = d * model_cfg.n_head * head_dim
    kv = 2 * d * model_cfg.kv_heads * head_dim
    o = model_cfg.n_head * head_dim * d
    mlp = 3 * d * model_cfg.ffn_dim
    norms = 2 * d
    return q + kv + o + mlp + norms


def count_non_embedding_parameters(model_cfg: ModelConfig) -> int:
    """Parameters outside the token embedding and the output head: the blocks and the final norm.

    This is the `N` of the Kaplan/Chinchilla scaling laws, which leave embeddings out because they
    cost no matmul FLOPs per token.
    """
    return model_cfg.n_layer * _block_parameters(model_cfg) + model_cfg.n_embd


def count_parameters(model_cfg: ModelConfig, vocab_size: int) -> int:
    """Every trainable parameter of `GPT(model_cfg, vocab_size)`; tied embeddings counted once.

    Equals `sum(p.numel() for p in model.parameters())` of the real module (PyTorch deduplicates
    the shared embedding/output matrix the same way).
    """
    embedding = vocab_size * model_cfg.n_embd
    head = 0 if model_cfg.tie_embeddings else vocab_size * model_cfg.n_embd
    return count_non_embedding_parameters(model_cfg) + embedding + head


def flops_per_token(model_cfg: ModelConfig, vocab_size: int, seq_len: int | None = None) -> float:
    """Training FLOPs (forward + backward) per token: `6·N_matmul + 12·L·d·T`, as nanoGPT and PaLM.

    `N_matmul` counts the weights that take part in a matrix multiply for every token: the blocks
    plus the output head (`vocab_size · n_embd`, whether or not it is tied to the embedding). The
    input embedding is a table lookup, not a matmul, so an untied model's input table is left out;
    for a tied model `N_matmul` is exactly the parameter count minus the norms' few weights, which
    are kept for simplicity. `12·L·d·T` is the attention score and weighted-sum work at sequence
    length `T` (default: the context length), counted over the full square as PaLM does.
    """
    seq = model_cfg.context_length if seq_len is None else seq_len
    matmul_params = count_non_embedding_parameters(model_cfg) + vocab_size * model_cfg.n_embd
    attention = 12 * model_cfg.n_layer * model_cfg.n_embd * seq
    return float(6 * matmul_params + attention)


def format_count(n: int | float) -> str:
    """A human-sized count with three significant digits: 987, 12.3K, 1.23M, 4.56B."""
    value = float(n)
    sign = "-" if value < 0 else ""
    value = abs(value)
    if value < 1000:
        return f"{sign}{value:.0f}"
    units = ("K", "M", "B", "T")
    index = 0
    scaled = value / 1e3
    while scaled >= 1000 and index < len(units) - 1:
        scaled /= 1000
        index += 1
    digits = 2 if scaled < 10 else 1 if scaled < 100 else 0
    # Rounding can carry into the next unit (999.96K would print as "1000K"): show 1.00M instead.
    if round(scaled, digits) >= 1000 and index < len(units) - 1:
        scaled /= 1000
        index += 1
        digits = 2
    elif round(scaled, digits) >= 10 ** (3 - digits) and digits > 0:
        digits -= 1  # 9.996K rounds to 10.00K: keep three significant digits, 10.0K
    return f"{sign}{scaled:.{digits}f}{units[index]}"
