"""Lookahead in a Lightning Fabric loop: a small character-level GPT on Tiny Shakespeare, any Fabric strategy.

The loop is the plain PyTorch one (examples/torch/train.py) with Fabric's three changes: ``fabric.setup``,
``fabric.backward``, ``fabric.save``/``fabric.load``. Lookahead is one call, ``lookahead_dist.lightning.fabric.setup``,
which puts the slow weights φ where the strategy steps (inside the DeepSpeed engine, on FSDP's shards):

    python examples/fabric/train.py                                        # one process
    python examples/fabric/train.py --strategy=ddp --devices=2             # Fabric starts the 2 processes
    python examples/fabric/train.py --strategy=deepspeed --devices=2 --zero_stage=3
    python examples/fabric/train.py --strategy=fsdp2 --devices=2           # ModelParallelStrategy (fully_shard)
    python examples/fabric/train.py --strategy=fsdp --devices=2            # FSDPStrategy (FSDP1; evaluates θ only)
    python examples/fabric/train.py --strategy=deepspeed --devices=2 --resume=True   # continue from out_dir/ckpt
    torchrun --nproc_per_node 2 examples/fabric/train.py --strategy=ddp --devices=2  # or under torchrun

On a machine without GPUs the DeepSpeed and FSDP strategies are the CPU variants of
``lookahead_dist.lightning.fabric`` (gloo); on GPUs Fabric's own classes. Any name of the configuration block can
be set with ``--name=value`` (a Python literal). Every ``eval_interval`` iterations the validation loss is computed
on the fast weights θ and, inside ``use_slow_weights(optimizer)``, on φ; at the end ``fabric.save`` writes
``out_dir/ckpt`` (φ and the cycle counters inside the optimizer state) and ``out_dir/history.json``.
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
from lightning.fabric import Fabric
from torch import nn

from lookahead_dist.lightning.fabric import find_lookahead, setup, use_slow_weights

# ----------------------------------------------------------------------------- configuration
data_dir = os.environ.get("LOOKAHEAD_DATA_DIR", str(Path(__file__).resolve().parents[3] / "shared" / "data"))
data_file = "tinyshakespeare/input.txt"  # relative to data_dir; any UTF-8 text file works
out_dir = "out/fabric"
seed = 1337
# Fabric
strategy = "auto"  # auto | ddp | deepspeed | fsdp | fsdp2
devices = 1
zero_stage = 2  # with strategy=deepspeed
resume = False  # load out_dir/ckpt first and continue from its iteration
# model
block_size = 64
n_layer = 2
n_head = 4
n_embd = 128
# optimisation
batch_size = 32  # per process
max_iters = 300
lr = 2e-3
min_lr = 2e-4
warmup_iters = 30
weight_decay = 0.1
grad_clip = 1.0
# Lookahead: every k inner (AdamW) steps, φ ← φ + α(θ − φ) and θ ← φ
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
        value = text
    if type(value) is not type(config[name]) and not (isinstance(config[name], float) and type(value) is int):
        sys.exit(f"--{name}={text}: expected a {type(config[name]).__name__} like {config[name]!r}")
    config[name] = value
globals().update(config)
# -----------------------------------------------------------------------------


# ---- model: a decoder-only Transformer (pre-norm blocks, causal self-attention, tied embeddings)
class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k_, v = self.qkv(self.ln1(x)).view(b, t, 3, n_head, c // n_head).transpose(1, 3).unbind(2)
        att = F.scaled_dot_product_attention(q, k_, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab_size, n_embd)
        self.pos = nn.Embedding(block_size, n_embd)
        self.blocks = nn.Sequential(*[Block() for _ in range(n_layer)])
        self.ln = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        self.head.weight = self.tok.weight
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        logits = self.head(self.ln(self.blocks(x)))
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


def shard(model: nn.Module, mesh: object) -> nn.Module:  # ModelParallelStrategy's parallelize_fn (FSDP2)
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block, mesh=mesh["data_parallel"])
    return fully_shard(model, mesh=mesh["data_parallel"])


def make_strategy() -> object:
    gpu = torch.cuda.is_available()
    if strategy == "deepspeed":  # gradient clipping is DeepSpeed's own there
        from lightning.fabric.strategies import DeepSpeedStrategy

        from lookahead_dist.lightning.fabric import CPUFabricDeepSpeedStrategy

        ds = {"zero_optimization": {"stage": zero_stage}, "train_micro_batch_size_per_gpu": batch_size,
              "gradient_clipping": grad_clip}  # fmt: skip
        return (DeepSpeedStrategy if gpu else CPUFabricDeepSpeedStrategy)(config=ds)
    if strategy == "fsdp":
        from lightning.fabric.strategies import FSDPStrategy

        from lookahead_dist.lightning.fabric import CPUFabricFSDPStrategy

        return (FSDPStrategy if gpu else CPUFabricFSDPStrategy)()
    if strategy == "fsdp2":
        from lightning.fabric.strategies import ModelParallelStrategy

        return ModelParallelStrategy(parallelize_fn=shard, data_parallel_size=devices, tensor_parallel_size=1)
    return strategy


fabric = Fabric(accelerator="auto", devices=devices, strategy=make_strategy())  # type: ignore[arg-type]
fabric.launch()
fabric.seed_everything(seed)  # the same initial weights on every process
os.makedirs(out_dir, exist_ok=True)

# ---- data: characters of one text file, first 90% for training, the rest for validation
text = Path(data_dir, data_file).read_text(encoding="utf-8")
chars = sorted(set(text))
stoi = {ch: i for i, ch in enumerate(chars)}
data = torch.tensor([stoi[ch] for ch in text], dtype=torch.long)
n_train = int(0.9 * len(data))
splits = {"train": data[:n_train], "val": data[n_train:]}
fabric.print(f"{data_file}: {len(data):,} characters, vocabulary of {len(chars)}")
train_gen = torch.Generator().manual_seed(seed + fabric.global_rank)  # each process its own batches


def get_batch(split: str, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    part = splits[split]
    starts = torch.randint(len(part) - block_size - 1, (batch_size,), generator=generator)
    x = torch.stack([part[i : i + block_size] for i in starts])
    y = torch.stack([part[i + 1 : i + 1 + block_size] for i in starts])
    return fabric.to_device(x), fabric.to_device(y)


# ---- model and optimizer: AdamW (no weight decay on biases, norms) with Lookahead, set up by the strategy
net = GPT(len(chars))
fabric.print(f"model: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters, strategy {strategy}")


def adamw(params: object) -> torch.optim.Optimizer:  # a function: FSDP2 builds it on the sharded parameters
    params = list(params)  # type: ignore[call-overload]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]  # fmt: skip
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99))


model, optimizer = setup(fabric, net, adamw, k=k, alpha=alpha)


def lr_at(it: int) -> float:  # linear warm-up, then cosine decay to min_lr
    if it < warmup_iters:
        return lr * (it + 1) / warmup_iters
    progress = min(1.0, (it - warmup_iters) / max(1, max_iters - warmup_iters))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def estimate_loss(split: str) -> float:
    model.eval()
    g = torch.Generator().manual_seed(0)  # the same batches on every process and at every evaluation
    loss = sum(model(*get_batch(split, g)).item() for _ in range(eval_iters)) / eval_iters
    model.train()
    return loss


def evaluate() -> dict[str, float]:
    result = {"val_loss": estimate_loss("val")}
    if strategy == "fsdp":  # refused under FSDP1 (it keeps the root's gathered weights after a no-grad forward)
        return result
    with use_slow_weights(optimizer):  # φ in the model for the block; θ restored bit-exactly after
        result["val_loss_slow"] = estimate_loss("val")
    return result


# ---- training loop
checkpoint = Path(out_dir, "ckpt")
start = 0
if resume:
    state = {"model": model, "optimizer": optimizer, "iter": 0}
    fabric.load(checkpoint, state)  # fast weights, optimizer state with φ and the counters: mid-cycle exact
    start = state["iter"]
    fabric.print(f"resumed at iter {start}")
history = []
t0 = time.time()
for it in range(start, max_iters + 1):
    if it % eval_interval == 0 or it == max_iters:
        row = {"iter": it, **evaluate()}
        history.append(row)
        slow = f", on slow weights {row['val_loss_slow']:.4f}" if "val_loss_slow" in row else ""
        fabric.print(f"iter {it}: val loss {row['val_loss']:.4f}{slow} ({time.time() - t0:.1f} s)")
    if it == max_iters:
        break
    for group in optimizer.param_groups:
        group["lr"] = lr_at(it)
    loss = model(*get_batch("train", train_gen))
    fabric.backward(loss)
    if strategy != "deepspeed":
        fabric.clip_gradients(model, optimizer, max_norm=grad_clip)
    optimizer.step()  # every k-th call also syncs the slow weights
    optimizer.zero_grad(set_to_none=True)
    if it % 50 == 0:
        fabric.print(f"iter {it}: train loss {loss.item():.4f}")

# ---- checkpoint: θ and the optimizer state (φ and the counters inside it), per rank where the strategy shards
fabric.save(checkpoint, {"model": model, "optimizer": optimizer, "iter": max_iters})
fabric.print(f"Lookahead synced {find_lookahead(optimizer).sync_count} times (k={k}, alpha={alpha})")  # type: ignore[union-attr]
if fabric.global_rank == 0:
    Path(out_dir, "history.json").write_text(json.dumps(history, indent=1))
fabric.print(f"saved {checkpoint}")
