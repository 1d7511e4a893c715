"""The measuring tools under benchmarks/ whose figures the README quotes: they must count what they
say they count (their timings themselves are never asserted)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.train_throughput import time_calls


def test_throughput_split_files_each_call_once_under_matmul_attention_or_other() -> None:
    """`train_throughput.py --split`: one matmul, one addition and one attention call a step are
    three calls, each kind timed; a step of only a matmul puts nothing under the other kinds."""
    matrix = torch.randn(8, 8)
    heads = torch.randn(1, 1, 4, 8)

    def step() -> None:
        (matrix @ matrix) + matrix
        F.scaled_dot_product_attention(heads, heads, heads, is_causal=True)

    split = time_calls(step, steps=3)
    assert split["calls"] == 3
    assert split["matmul_ms"] > 0 and split["attention_ms"] > 0 and split["other_ms"] > 0

    only_matmul = time_calls(lambda: matrix @ matrix, steps=2)
    assert only_matmul["calls"] == 1
    assert only_matmul["attention_ms"] == 0 and only_matmul["other_ms"] == 0


def test_throughput_split_sees_the_backward_autograd_runs() -> None:
    """The backward's calls (run by autograd, not by the step's own code) are in the split, so two
    implementations are compared over the whole step."""
    weight = torch.randn(8, 8, requires_grad=True)
    inputs = torch.randn(8, 8)
    forward_only = time_calls(lambda: (weight @ inputs).sum(), steps=1)
    whole_step = time_calls(lambda: (weight @ inputs).sum().backward(), steps=1)
    assert forward_only["calls"] == 2  # the product and the sum
    assert whole_step["calls"] > forward_only["calls"]
    assert weight.grad is not None
