"""Lookahead in a plain PyTorch training loop: a small character-level GPT on Tiny Shakespeare.

Everything is in this file: the configuration (next block), the data, the model, the loop. Run from anywhere
with lookahead-dist installed:

    python examples/torch/train.py                                    # the defaults below
    python examples/torch/train.py --lookahead=False                  # plain AdamW, to compare
    python examples/torch/train.py --n_layer=6 --n_embd=384 --block_size=256 --max_iters=5000   # on a GPU

Any name of the configuration block can be set with ``--name=value`` (value written as a Python literal).
Every ``eval_interval`` iterations it reports the validation loss on the fast weights θ (what the inner
optimizer trains) and on the slow weights φ (Lookahead's weights, used for evaluation), and at the end saves
``out_dir/ckpt.pt``: the model (θ), the slow weights φ as a model state dict, and the optimizer state (φ and
the cycle counters are inside it: ``load_state_dict`` on a fresh ``Lookahead`` resumes mid-cycle).
"""

from __future__ import annotations

import ast
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lookahead_dist import Lookahead

# ----------------------------------------------------------------------------- configuration
data_dir = os.environ.get("LOOKAHEAD_DATA_DIR", str(Path(__file__).resolve().parents[3] / "shared" / "data"))
data_file = "tinyshakespeare/input.txt"  # relative to data_dir; any UTF-8 text file works
out_dir = "out/torch"
seed = 1337
device = "cuda" if torch.cuda.is_available() else "cpu"
# model
block_size = 64  # context length in characters
n_layer = 2
n_head = 4
n_embd = 128
dropout = 0.0
# optimisation
batch_size = 32
max_iters = 500
lr = 2e-3
min_lr = 2e-4
warmup_iters = 50
weight_decay = 0.1
grad_clip = 1.0
# Lookahead: every k inner (AdamW) steps, φ ← φ + α(θ − φ) and θ ← φ
lookahead = True
k = 5
alpha = 0.5
# evaluation
eval_interval = 100
eval_iters = 20
# -----------------------------------------------------------------------------
config = {name: value for name, value in globals().items() if not name.startswith("_") and
          isinstance(value, (int, float, bool, str))}  # fmt: skip
for arg in sys.argv[1:]:  # --name=value overrides
    name, _, text = arg.removeprefix("--").partition("=")
    if name not in config:
        sys.exit(f"unknown option {arg!r}; the options are: {', '.join(config)}")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # a bare string such as --device=cpu
    if type(value) is not type(config[name]) and not (isinstance(config[name], float) and type(value) is int):
        sys.exit(f"--{name}={text}: expected a {type(config[name]).__name__} like {config[name]!r}")
    config[name] = value
globals().update(config)
# -----------------------------------------------------------------------------

torch.manual_seed(seed)
os.makedirs(out_dir, exist_ok=True)

# ---- data: characters of one text file, first 90% for training, the rest for validation
text = Path(data_dir, data_file).read_text(encoding="utf-8")
chars = sorted(set(text))
stoi = {ch: i for i, ch in enumerate(chars)}
data = torch.tensor([stoi[ch] for ch in text], dtype=torch.long)
n_train = int(0.9 * len(data))
splits = {"train": data[:n_train], "val": data[n_train:]}
print(f"{data_file}: {len(data):,} characters, vocabulary of {len(chars)}")


def get_batch(split: str, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    part = splits[split]
    starts = torch.randint(len(part) - block_size - 1, (batch_size,), generator=generator)
    x = torch.stack([part[i : i + block_size] for i in starts])
    y = torch.stack([part[i + 1 : i + 1 + block_size] for i in starts])
    return x.to(device), y.to(device)


# ---- model: a decoder-only Transformer (pre-norm blocks, causal self-attention, tied embeddings)
class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k_, v = self.qkv(self.ln1(x)).view(b, t, 3, n_head, c // n_head).transpose(1, 3).unbind(2)
        p_drop = dropout if self.training else 0.0
        att = F.scaled_dot_product_attention(q, k_, v, dropout_p=p_drop, is_causal=True)
        x = x + self.drop(self.proj(att.transpose(1, 2).reshape(b, t, c)))
        return x + self.drop(self.mlp(self.ln2(x)))


class GPT(nn.Module):
    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab_size, n_embd)
        self.pos = nn.Embedding(block_size, n_embd)
        self.blocks = nn.Sequential(*[Block() for _ in range(n_layer)])
        self.ln = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        self.head.weight = self.tok.weight
        # GPT-2's initialisation: small weights, so the first loss is about ln(vocabulary size)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        logits = self.head(self.ln(self.blocks(x)))
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


model = GPT(len(chars)).to(device)
print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")

# ---- optimizer: AdamW (no weight decay on biases, norms), wrapped in Lookahead
decay = [p for p in model.parameters() if p.dim() >= 2]
no_decay = [p for p in model.parameters() if p.dim() < 2]
groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
optimizer: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99))
if lookahead:
    optimizer = Lookahead(optimizer, k=k, alpha=alpha)  # a torch.optim.Optimizer itself


def lr_at(it: int) -> float:  # linear warm-up, then cosine decay to min_lr
    if it < warmup_iters:
        return lr * (it + 1) / warmup_iters
    progress = min(1.0, (it - warmup_iters) / max(1, max_iters - warmup_iters))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def estimate_loss(split: str) -> float:
    model.eval()
    g = torch.Generator().manual_seed(0)  # the same batches at every evaluation, for fast and slow alike
    loss = sum(model(*get_batch(split, g)).item() for _ in range(eval_iters)) / eval_iters
    model.train()
    return loss


def evaluate() -> dict[str, float]:
    result = {"val_loss": estimate_loss("val")}
    if lookahead:
        with optimizer.use_slow_weights():  # φ in the model for the block; θ restored bit-exactly after
            result["val_loss_slow"] = estimate_loss("val")
    return result


# ---- training loop
history = []
t0 = time.time()
for it in range(max_iters + 1):
    if it % eval_interval == 0 or it == max_iters:
        row = {"iter": it, **evaluate()}
        history.append(row)
        slow = f", on slow weights {row['val_loss_slow']:.4f}" if lookahead else ""
        print(f"iter {it}: val loss {row['val_loss']:.4f}{slow} ({time.time() - t0:.1f} s)")
    if it == max_iters:
        break
    for group in optimizer.param_groups:  # Lookahead's param_groups are AdamW's: schedules work unchanged
        group["lr"] = lr_at(it)
    x, y = get_batch("train")
    loss = model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()  # every k-th call also syncs the slow weights
    optimizer.zero_grad(set_to_none=True)
    if it % 50 == 0:
        print(f"iter {it}: train loss {loss.item():.4f}")

# ---- checkpoint: θ, φ (as a ready-to-use state dict) and the optimizer state (φ and counters inside it)
checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "config": config}
if lookahead:
    with optimizer.use_slow_weights():
        checkpoint["slow_model"] = {name: t.clone() for name, t in model.state_dict().items()}
    print(f"Lookahead synced {optimizer.sync_count} times (k={k}, alpha={alpha})")
torch.save(checkpoint, Path(out_dir, "ckpt.pt"))
Path(out_dir, "history.json").write_text(json.dumps(history, indent=1))
print(f"saved {Path(out_dir, 'ckpt.pt')}")
