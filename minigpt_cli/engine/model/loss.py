"""The language-model loss: the ignored target id, and the output head fused with cross entropy.

Why fused: the plain path materialises (tokens x vocabulary) logits, the largest tensor of a small
model's training step; `FusedLinearCrossEntropy` runs the head and the loss chunk by chunk and
never holds them all (the full reasoning is on the class). `GPT._loss` picks it whenever the head
is a plain `nn.Linear` and no logits were asked for.
"""

from __future__ import annotations

from typing import Any

import torch

from minigpt_cli.engine.resources.activations import (
    LOSS_CHUNK_ROWS,
    LOSS_GRAD_GROUP_ROWS,
    loss_grad_grouped,
)

IGNORE_INDEX = -100
"""Target id that contributes no loss (padding, prompt tokens in SFT): PyTorch's and HF's value."""


# Rows of logits the fused loss holds at once. The softmax and casts over a chunk are passes over
# memory, fastest while the chunk stays near the CPU caches; the matmuls want enough rows to run
# well. Measured on an AMX CPU (head + loss forward and backward, torch 2.13): `tiny` (5,000 words)
# over 1,024 rows took 15 ms in 256-row chunks against 24 ms in 838-row ones (bf16; fp32 23 vs 22),
# over 4,608 rows 52 vs 75 ms (fp32 87 vs 119); `small` (10,000 words, 2,048 rows) 111 ms against
# 150 ms in 128-row chunks and 110 ms in 419-row ones. The rows are split evenly over the chunks.
_LOSS_CHUNK_ROWS = LOSS_CHUNK_ROWS  # the memory estimate counts the same chunk


def loss_chunk_rows(rows: int) -> int:
    """Rows per chunk for `rows` rows: at most `_LOSS_CHUNK_ROWS`, the chunks equal in size."""
    chunks = max(1, -(-rows // _LOSS_CHUNK_ROWS))
    return max(1, -(-rows // chunks))


def loss_grad_group_rows(rows: int, chunk: int) -> int:
    """Rows of logit gradients gathered for one product of the head's gradient (autocast only):
    whole chunks, as many as fit in `LOSS_GRAD_GROUP_ROWS`, never more than `rows` needs."""
    per_group = max(1, LOSS_GRAD_GROUP_ROWS // chunk)
    return min(chunk * per_group, chunk * max(1, -(-rows // chunk)))


# Rows of the head's gradient per addition of a lower-precision group product (see _add_in_blocks).
_ADD_BLOCK_ROWS = 256


def _add_in_blocks(total: torch.Tensor, part: torch.Tensor) -> None:
    """total += part for an fp32 `total` and a bf16/fp16 `part`, a block of rows at a time.

    PyTorch adds a tensor of another dtype by first converting all of it: a (vocabulary x width)
    fp32 temporary written and read back through memory. Block by block the converted rows stay
    in the cache. Bitwise the same sum (the conversion is exact); measured 1.55-1.80 -> 0.88-0.91
    ms warm at small's 10,000 x 512, and in small's profiled step the whole addition (conversion
    and sum, three a step) took 9.3-9.8 ms.
    """
    for start in range(0, total.shape[0], _ADD_BLOCK_ROWS):
        total[start : start + _ADD_BLOCK_ROWS] += part[start : start + _ADD_BLOCK_ROWS]


# A target probability below this has lost precision (fp32 denormals) or underflowed to zero; such
# rows (a loss above ~69 nats: only a diverging model) get their loss from an exact logsumexp.
_TINY_PROBABILITY = 1e-30


def _softmax_and_losses(
    logits: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax of fp32 `logits` (rows x vocab) and each row's cross entropy (0 where not valid).

    `out`, a buffer shaped like `logits`, receives the softmax on the CPU (see
    `FusedLinearCrossEntropy` for why buffers are reused).

    On the CPU, PyTorch's softmax kernel is 2-3x faster than log_softmax (measured: 7 vs 19 ms on
    1024 x 5000), so the loss is read off the softmax as -log p(target), falling back to an exact
    logsumexp only when some target probability is too small for that to be accurate (checking is
    free on the CPU). Elsewhere log_softmax is as fast and exact, and needs no check (which would
    synchronise a GPU, or break a torch.compile graph; compiled kernels are fused anyway).
    """
    if logits.device.type == "cpu" and not torch.compiler.is_compiling():
        if out is None:
            probs = torch.softmax(logits, dim=-1)
        else:
            probs = torch.ops.aten._softmax.out(logits, -1, False, out=out)
        picked = probs.gather(1, target).squeeze(1)
        picked = torch.where(valid, picked, 1.0)
        if bool((picked < _TINY_PROBABILITY).any()):
            exact = torch.logsumexp(logits, dim=-1) - logits.gather(1, target).squeeze(1)
            return probs, torch.where(valid, exact, 0.0)
        return probs, -picked.log()
    logprobs = torch.log_softmax(logits, dim=-1)
    losses = torch.where(valid, -logprobs.gather(1, target).squeeze(1), 0.0)
    return logprobs.exp_(), losses


class _ChunkBuffers:
    """The fused loss's per-chunk tensors, allocated once per call and reused by every chunk.

    Each chunk's logits (compute dtype), their fp32 copy and softmax; under autocast the logit
    gradients of a group of chunks back in the compute dtype, and the group's product for the
    head's gradient. A shorter last chunk or group uses the first rows. Allocated on first use, so
    a call that needs no gradient never holds the gradient's buffers.
    """

    def __init__(
        self, rows: int, vocab: int, compute_dtype: torch.dtype, device: torch.device
    ) -> None:
        self.shape = (rows, vocab)
        self.compute_dtype = compute_dtype
        self.device = device
        self._held: dict[str, torch.Tensor] = {}

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        held = self._held.get(name)
        if held is None:
            held = self._held[name] = torch.empty(shape, dtype=dtype, device=self.device)
        return held

    def logits(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """fp32 logits of `hidden` (F.linear's values, bitwise), computed in the compute dtype."""
        rows = hidden.shape[0]
        raw = self._buffer("logits", self.shape, self.compute_dtype)[:rows]
        torch.mm(hidden, weight.t(), out=raw)
        if self.compute_dtype == torch.float32:
            return raw
        return self._buffer("float", self.shape, torch.float32)[:rows].copy_(raw)

    def probs(self, rows: int) -> torch.Tensor:
        return self._buffer("probs", self.shape, torch.float32)[:rows]

    def gradient_rows(self, group_rows: int) -> torch.Tensor:
        """The (group_rows x vocab) buffer the chunks' logit gradients are gathered into."""
        return self._buffer("grad", (group_rows, self.shape[1]), self.compute_dtype)

    def weight_product(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """left @ right into a reused (vocab x n_embd) buffer."""
        shape = (left.shape[0], right.shape[1])
        return torch.mm(left, right, out=self._buffer("weight", shape, self.compute_dtype))


class FusedLinearCrossEntropy(torch.autograd.Function):
    """Output head + summed cross entropy over row chunks, gradients computed in the forward pass.

    The plain path materialises (tokens x vocabulary) logits, a float copy, log-softmax and its
    gradient: several passes over the largest tensor of a small model's step. Here each chunk's
    logits are used for the loss and immediately turned into the chunk's gradient (softmax minus
    one-hot), so only the (small) gradients of the inputs are kept for backward. The result is one
    scalar, the summed loss, so the upstream gradient is a single number that scales both saved
    gradients exactly. Softmax and losses are fp32; the matmuls run in `compute_dtype` (the
    autocast dtype when autocast is on).
    """

    # `ctx` is autograd's context (Any in torch too): forward hangs on it what backward needs.
    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        compute_dtype: torch.dtype,
        need_hidden_grad: bool,
        need_weight_grad: bool,
    ) -> torch.Tensor:
        want_grad = need_hidden_grad or need_weight_grad
        rows = hidden.shape[0]
        chunk = loss_chunk_rows(rows)
        h = hidden.to(compute_dtype)
        w = weight.to(compute_dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(h) if need_hidden_grad else None
        low_precision = compute_dtype != torch.float32
        grad_weight = None
        if need_weight_grad:  # under autocast the first group's product is copied in whole
            make = torch.empty if low_precision else torch.zeros
            grad_weight = make(weight.shape, dtype=torch.float32, device=weight.device)
        # One set of chunk-sized buffers for the whole call, rather than fresh tensors per chunk:
        # a fresh multi-megabyte tensor is fresh pages, and on the CPU the page faults of first
        # touching them cost as much as the softmax itself. Results are bitwise the same.
        buffers = _ChunkBuffers(chunk, weight.shape[0], compute_dtype, hidden.device)
        # Under autocast a large head's gradient is one low-precision product per group of chunks
        # (their logit gradients gathered into one buffer), added into the fp32 sum: per chunk,
        # the (vocab x n_embd) product and its conversion cost as much as the chunk's matmuls.
        grouped = low_precision and need_weight_grad and loss_grad_grouped(*weight.shape)
        group = loss_grad_group_rows(rows, chunk) if grouped else chunk
        keep_all = (targets != IGNORE_INDEX).unsqueeze(1).to(compute_dtype)
        for group_start in range(0, rows, group):
            group_stop = min(group_start + group, rows)
            gathered = None  # the group's logit gradients in the compute dtype
            if want_grad and low_precision:
                gathered = buffers.gradient_rows(group)[: group_stop - group_start]
            for start in range(group_start, group_stop, chunk):
                stop = min(start + chunk, group_stop)
                h_chunk = h[start:stop]
                logits = buffers.logits(h_chunk, w)
                target = targets[start:stop]
                valid = target != IGNORE_INDEX
                safe_target = torch.where(valid, target, 0).unsqueeze(1)
                probs, token_losses = _softmax_and_losses(
                    logits, safe_target, valid, out=buffers.probs(stop - start)
                )
                total += token_losses.sum()
                if not want_grad:
                    continue
                # d loss_i / d logits_i = softmax_i - onehot(target_i); zero for ignored rows.
                minus_one = torch.full_like(safe_target, -1, dtype=probs.dtype)
                probs.scatter_add_(1, safe_target, minus_one)
                if gathered is None:
                    grad_logits = probs
                else:
                    grad_logits = gathered[start - group_start : stop - group_start].copy_(probs)
                # Ignored rows must contribute nothing: zero them on the narrow (rows x n_embd)
                # side rather than on the wide (rows x vocabulary) gradient.
                if grad_hidden is not None:
                    torch.mm(grad_logits, w, out=grad_hidden[start:stop]).mul_(keep_all[start:stop])
                if grad_weight is not None and gathered is None:
                    grad_weight.addmm_(grad_logits.t(), h_chunk * keep_all[start:stop])
            if grad_weight is not None and gathered is not None:
                masked_hidden = h[group_start:group_stop] * keep_all[group_start:group_stop]
                product = buffers.weight_product(gathered.t(), masked_hidden)
                if group_start == 0:
                    grad_weight.copy_(product)
                else:
                    _add_in_blocks(grad_weight, product)
        ctx.save_for_backward(grad_hidden, grad_weight)  # None where not needed
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if getattr(ctx, "consumed", False):
            raise RuntimeError("FusedLinearCrossEntropy's backward runs once per forward")
        ctx.consumed = True
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        scale = grad_total.float()
        # Scaled in place (the saved gradients serve this one backward): a fresh (vocab x n_embd)
        # result is a fresh allocation to fill (small's profiled step: 4.1 ms for that product;
        # 0.8 against 0.4 ms warm, out of place against in place).
        g_hidden = None if grad_hidden is None else grad_hidden.float().mul_(scale).to(hidden_dtype)
        g_weight = None if grad_weight is None else grad_weight.mul_(scale).to(weight_dtype)
        return g_hidden, g_weight, None, None, None, None
