"""nanoGPT's CPU recipe for tinyshakespeare: the peer that `benchmarks/shakespeare.py` runs.

A faithful re-implementation of what `python train.py config/train_shakespeare_char.py
--device=cpu --compile=False --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12
--n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0` runs in
Karpathy's nanoGPT (its README's "I only have a laptop" recipe): characters as tokens, learned
positions, LayerNorm without bias, GELU MLP four times wide, tied head, the residual projections'
init scaled by 1/sqrt(2 n_layer), AdamW (lr 1e-3, betas 0.9/0.99, weight decay 0.1 on matrices,
fused where torch has it), 100 warmup steps, cosine to 1e-4 at 2,000, clipping at 1.0, random
windows of the training text. It evaluates on the same held-out last 10 % as minigpt (not
nanoGPT's own split, which cuts at exactly 90 % of the characters) and on all of it rather than 20
random batches, so the figures compare; a character is a byte in this ASCII text, so its loss in
bits is bits per byte.

    python benchmarks/nanogpt_char.py --data tinyshakespeare.txt --max-time 100

Prints the curve (step, training time, wall time since start, val bits per byte) as markdown and
returns it as JSON lines with `--json`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


class Block(nn.Module):
    """nanoGPT's block: x + attn(ln(x)), then + mlp(ln(x)); biases off (its `bias=False`)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width, bias=False)
        self.c_attn = nn.Linear(width, 3 * width, bias=False)
        self.attn_proj = nn.Linear(width, width, bias=False)
        self.ln_2 = nn.LayerNorm(width, bias=False)
        self.c_fc = nn.Linear(width, 4 * width, bias=False)
        self.mlp_proj = nn.Linear(4 * width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(width, dim=2)
        q, k, v = (t.view(batch, seq, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).reshape(batch, seq, width))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class CharGPT(nn.Module):
    """nanoGPT's GPT at the CPU recipe's shape."""

    def __init__(self, vocab: int, block: int, layers: int, heads: int, width: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(block, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width, bias=False)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.wte.weight
        for name, param in self.named_parameters():
            if param.dim() == 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(param, mean=0.0, std=std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(idx.shape[1])
        x = self.wte(idx) + self.wpe(positions)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def learning_rate(step: int, warmup: int = 100, decay: int = 2000) -> float:
    """nanoGPT's get_lr: linear warmup, cosine from 1e-3 to 1e-4."""
    peak, floor = 1e-3, 1e-4
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    if step > decay:
        return floor
    ratio = (step - warmup) / (decay - warmup)
    return floor + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (peak - floor)


@torch.no_grad()
def val_bits(model: CharGPT, val: torch.Tensor, block: int, batch: int) -> float:
    """Mean loss in bits over every non-overlapping window of the held-out text."""
    model.eval()
    windows = (len(val) - 1) // block
    inputs = val[: windows * block].view(windows, block)
    targets = val[1 : windows * block + 1].view(windows, block)
    total = 0.0
    for start in range(0, windows, batch * 8):
        rows = slice(start, start + batch * 8)
        total += model(inputs[rows], targets[rows]).item() * inputs[rows].shape[0]
    model.train()
    return total / windows / math.log(2)


def run(
    text: str, max_time: float, max_iters: int = 2000, eval_every: int = 250, seed: int = 1337
) -> list[dict]:
    """Train nanoGPT's CPU recipe on the first 90 % (cut at a line end) until its 2,000 steps or
    `max_time` seconds of training (evaluations not counted: a full pass over the held-out text
    costs more than nanoGPT's 20 batches, and the peer should not pay for it); the curve."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([index[c] for c in text], dtype=torch.long)
    cut = text.rfind("\n", 0, int(len(text) * 0.9)) + 1
    train, val = data[:cut], data[cut:]
    block, batch = 64, 12
    model = CharGPT(len(chars), block, layers=4, heads=4, width=128)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.99), fused=True)
    curve = []
    training = 0.0
    for step in range(max_iters + 1):
        if step % eval_every == 0 or step == max_iters:
            bits = val_bits(model, val, block, batch)
            curve.append(
                {
                    "step": step,
                    "time": training,
                    "wall": time.perf_counter() - start,
                    "val_bpb": bits,
                }
            )
        if step == max_iters or training > max_time:
            break
        tick = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step)
        starts = torch.randint(len(train) - block, (batch,))
        x = torch.stack([train[i : i + block] for i in starts])
        y = torch.stack([train[i + 1 : i + 1 + block] for i in starts])
        loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        training += time.perf_counter() - tick
    if curve[-1]["step"] != step:
        bits = val_bits(model, val, block, batch)
        curve.append(
            {"step": step, "time": training, "wall": time.perf_counter() - start, "val_bpb": bits}
        )
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--max-time", type=float, default=100.0, help="seconds of training")
    parser.add_argument("--json", action="store_true", help="one JSON line per evaluation")
    args = parser.parse_args()
    curve = run(args.data.read_text(encoding="utf-8"), args.max_time)
    if args.json:
        for row in curve:
            print(json.dumps(row))
        return
    print("| step | training time (s) | wall time (s) | val bits/byte |")
    print("|---|---|---|---|")
    for row in curve:
        print(f"| {row['step']} | {row['time']:.0f} | {row['wall']:.0f} | {row['val_bpb']:.3f} |")


if __name__ == "__main__":
    main()
