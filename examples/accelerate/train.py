"""Lookahead in a 🤗 Accelerate loop: a small character-level GPT on Tiny Shakespeare, DDP, FSDP2 or DeepSpeed.

The loop is the plain PyTorch one (examples/torch/train.py) with accelerate's changes: ``prepare``,
``accelerator.backward``, ``save_state``/``load_state``. Lookahead is ``lookahead_dist.accelerate.prepare`` in place
of ``accelerator.prepare``, which puts the slow weights φ where the engine steps (FSDP2's DTensor shards, inside
the DeepSpeed engine on this rank's fp32 partition):

    python examples/accelerate/train.py                                             # one process
    torchrun --nproc_per_node 2 examples/accelerate/train.py                        # DDP
    torchrun --nproc_per_node 2 examples/accelerate/train.py --parallel=fsdp2       # FullyShardedDataParallelPlugin(fsdp_version=2)
    torchrun --nproc_per_node 2 examples/accelerate/train.py --parallel=deepspeed --zero_stage=3
    torchrun --nproc_per_node 2 examples/accelerate/train.py --parallel=deepspeed --resume=True   # from out_dir/state
    accelerate launch --num_processes 2 examples/accelerate/train.py --parallel=fsdp2             # or accelerate's launcher

Under DeepSpeed, k and α go into the DeepSpeed config as a ``"lookahead"`` section (as with
``lookahead_dist.deepspeed.initialize``); elsewhere they are keywords of ``prepare``. Without GPUs the processes run
on CPU (gloo): DeepSpeed with ``PartialState(cpu=True)`` created first, FSDP2 through
``lookahead_dist.accelerate.use_fsdp_on_cpu`` (accelerate alone would silently train DDP). Any name of the
configuration block can be set with ``--name=value`` (a Python literal). Every ``eval_interval`` iterations the
validation loss is computed on θ and, inside ``use_slow_weights(optimizer)``, on φ; at the end
``accelerator.save_state`` writes ``out_dir/state`` (φ and the cycle counters inside the optimizer state).
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
from accelerate import Accelerator, PartialState
from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin, set_seed
from torch import nn

import lookahead_dist.accelerate as la_acc

# ----------------------------------------------------------------------------- configuration
data_dir = os.environ.get("LOOKAHEAD_DATA_DIR", str(Path(__file__).resolve().parents[3] / "shared" / "data"))
data_file = "tinyshakespeare/input.txt"  # relative to data_dir; any UTF-8 text file works
out_dir = "out/accelerate"
seed = 1337
parallel = "ddp"  # ddp (also one process) | fsdp2 | deepspeed
zero_stage = 2  # with parallel=deepspeed
resume = False  # load out_dir/state first and continue from its iteration
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


def make_accelerator() -> Accelerator:
    cpu = not torch.cuda.is_available()
    if parallel == "deepspeed":
        if cpu:
            PartialState(cpu=True)  # gloo processes; Accelerator(cpu=True) would drop DeepSpeed
        ds = {"zero_optimization": {"stage": zero_stage}, "train_micro_batch_size_per_gpu": batch_size,
              "gradient_accumulation_steps": 1, "gradient_clipping": grad_clip,
              "lookahead": {"k": k, "alpha": alpha}}  # fmt: skip
        return Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds))
    if parallel == "fsdp2":
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
        accelerator = Accelerator(cpu=cpu, fsdp_plugin=plugin)
        if cpu and accelerator.num_processes > 1:
            la_acc.use_fsdp_on_cpu(accelerator, plugin)
        return accelerator
    return Accelerator(cpu=cpu)


accelerator = make_accelerator()
set_seed(seed)  # the same initial weights on every process
os.makedirs(out_dir, exist_ok=True)

# ---- data: characters of one text file, first 90% for training, the rest for validation
text = Path(data_dir, data_file).read_text(encoding="utf-8")
chars = sorted(set(text))
stoi = {ch: i for i, ch in enumerate(chars)}
data = torch.tensor([stoi[ch] for ch in text], dtype=torch.long)
n_train = int(0.9 * len(data))
splits = {"train": data[:n_train], "val": data[n_train:]}
accelerator.print(f"{data_file}: {len(data):,} characters, vocabulary of {len(chars)}")
train_gen = torch.Generator().manual_seed(seed + accelerator.process_index)  # each process its own batches


def get_batch(split: str, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    part = splits[split]
    starts = torch.randint(len(part) - block_size - 1, (batch_size,), generator=generator)
    x = torch.stack([part[i : i + block_size] for i in starts])
    y = torch.stack([part[i + 1 : i + 1 + block_size] for i in starts])
    return x.to(accelerator.device), y.to(accelerator.device)


# ---- model and optimizer: AdamW (no weight decay on biases, norms) with Lookahead
net = GPT(len(chars))
decay = [p for p in net.parameters() if p.dim() >= 2]
no_decay = [p for p in net.parameters() if p.dim() < 2]
groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
inner = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99))
options = {} if parallel == "deepspeed" else {"k": k, "alpha": alpha}  # DeepSpeed: the config's section
model, optimizer = la_acc.prepare(accelerator, net, inner, **options)
accelerator.print(f"model: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters, {accelerator.distributed_type}, "
                  f"parameters are DTensors: {all(type(p).__name__ == 'DTensor' for p in model.parameters())}")  # fmt: skip


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
    with la_acc.use_slow_weights(optimizer):  # φ in the model for the block; θ restored bit-exactly after
        result["val_loss_slow"] = estimate_loss("val")
    return result


# ---- training loop
state_dir = Path(out_dir, "state")
start = 0
if resume:
    accelerator.load_state(str(state_dir))  # θ, optimizer state with φ and the counters: mid-cycle exact
    start = json.loads(Path(state_dir, "iter.json").read_text())["iter"]
    accelerator.print(f"resumed at iter {start}")
history = []
t0 = time.time()
for it in range(start, max_iters + 1):
    if it % eval_interval == 0 or it == max_iters:
        row = {"iter": it, **evaluate()}
        history.append(row)
        accelerator.print(f"iter {it}: val loss {row['val_loss']:.4f}, on slow weights {row['val_loss_slow']:.4f} "
                          f"({time.time() - t0:.1f} s)")  # fmt: skip
    if it == max_iters:
        break
    for group in optimizer.param_groups:
        group["lr"] = lr_at(it)
    loss = model(*get_batch("train", train_gen))
    accelerator.backward(loss)  # under DeepSpeed this also steps the engine (and clips, from the config)
    if parallel != "deepspeed":
        accelerator.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()  # every k-th step also syncs the slow weights
    optimizer.zero_grad(set_to_none=True)
    if it % 50 == 0:
        accelerator.print(f"iter {it}: train loss {loss.item():.4f}")

# ---- checkpoint: θ and the optimizer state (φ and the counters inside it), per rank where the engine shards
accelerator.save_state(str(state_dir))
lookahead = la_acc.find_lookahead(optimizer)
accelerator.print(f"Lookahead synced {lookahead.sync_count if lookahead else 0} times (k={k}, alpha={alpha})")
if accelerator.is_main_process:
    Path(state_dir, "iter.json").write_text(json.dumps({"iter": max_iters}))
    Path(out_dir, "history.json").write_text(json.dumps(history, indent=1))
accelerator.print(f"saved {state_dir}")
