"""Lookahead with raw DeepSpeed: a small word-level GPT on WikiText-2 under ZeRO, from one JSON-style config.

Lookahead is one more section of the DeepSpeed config, ``"lookahead": {"k": 5, "alpha": 0.5}``, and
``lookahead_dist.deepspeed.initialize`` replaces ``deepspeed.initialize`` (same arguments, same return value).
Each rank keeps the slow weights φ only for its own ZeRO partition; the sync adds no communication.

    torchrun --nproc_per_node 2 examples/deepspeed/train.py             # 2 processes (CPU: gloo, GPU: nccl)
    deepspeed --num_gpus 2 examples/deepspeed/train.py --zero_stage=3   # the DeepSpeed launcher works too
    torchrun --nproc_per_node 2 examples/deepspeed/train.py --ds_config_file=configs/zero2.json
    torchrun --nproc_per_node 2 examples/deepspeed/train.py --resume=True   # continue from the last checkpoint

Any name of the configuration block can be set with ``--name=value`` (a Python literal). Every
``eval_interval`` iterations the validation perplexity is computed on the fast weights θ and, inside
``lookahead_dist.deepspeed.use_slow_weights(engine)``, on the slow weights φ; every ``save_interval`` iterations
(and at the end) a DeepSpeed checkpoint is written to ``out_dir/checkpoints``, with φ and the cycle counters in
each rank's ``*_optim_states.pt``, so ``--resume=True`` continues mid-cycle exactly.
"""

from __future__ import annotations

import ast
import json
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path

import deepspeed
import deepspeed.comm as dist
import torch
import torch.nn.functional as F
from torch import nn

import lookahead_dist.deepspeed as la_ds

# ----------------------------------------------------------------------------- configuration
data_dir = os.environ.get("LOOKAHEAD_DATA_DIR", str(Path(__file__).resolve().parents[3] / "shared" / "data"))
train_file = "wikitext-2/valid.txt"  # WikiText-2's train split is not in the offline copy: train on valid,
val_file = "wikitext-2/test.txt"  # evaluate on test
out_dir = "out/deepspeed"
seed = 1337
# model
block_size = 64  # context length in words
n_layer = 2
n_head = 4
n_embd = 128
# optimisation
micro_batch = 16  # sequences per rank and step
max_iters = 400
lr = 3e-3
warmup_iters = 50
weight_decay = 0.1
grad_clip = 1.0
zero_stage = 2
bf16 = torch.cuda.is_available()
# Lookahead: every k inner (AdamW) steps, φ ← φ + α(θ − φ) and θ ← φ
k = 5
alpha = 0.5
# evaluation and checkpoints
eval_interval = 100
eval_iters = 10  # batches per rank
save_interval = 200  # 0: only at the end
resume = False  # continue from the latest checkpoint in out_dir/checkpoints
ds_config_file = ""  # a DeepSpeed JSON with a "lookahead" section (configs/zero2.json) instead of the dict
# -----------------------------------------------------------------------------
config = {name: value for name, value in globals().items() if not name.startswith("_") and
          isinstance(value, (int, float, bool, str))}  # fmt: skip
for arg in sys.argv[1:]:  # --name=value overrides
    if arg.startswith("--local_rank"):  # added by the deepspeed launcher; the rank comes from the environment
        continue
    name, _, text = arg.removeprefix("--").partition("=")
    if name not in config:
        sys.exit(f"unknown option {arg!r}; the options are: {', '.join(config)}")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # a bare string such as --out_dir=out/x
    if type(value) is not type(config[name]) and not (isinstance(config[name], float) and type(value) is int):
        sys.exit(f"--{name}={text}: expected a {type(config[name]).__name__} like {config[name]!r}")
    config[name] = value
globals().update(config)

ds_config = {
    "train_micro_batch_size_per_gpu": micro_batch,
    "gradient_accumulation_steps": 1,
    "gradient_clipping": grad_clip,
    "zero_optimization": {"stage": zero_stage},
    "bf16": {"enabled": bf16},
    # torch's AdamW: runs on CPU and GPU alike (DeepSpeed's FusedAdam needs CUDA)
    "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": [0.9, 0.99], "torch_adam": True}},
    "scheduler": {
        "type": "WarmupCosineLR",
        "params": {
            "total_num_steps": max_iters,
            "warmup_num_steps": warmup_iters,
            "warmup_type": "linear",
            "warmup_min_ratio": 0.1,
        },
    },
    "steps_per_print": 10**9,
    "lookahead": {"k": k, "alpha": alpha, "pullback": "none"},
}
if ds_config_file:  # a JSON file instead; it has no batch size (Lightning fills those in), so add ours
    ds_config = {**json.loads(Path(ds_config_file).read_text()), "train_micro_batch_size_per_gpu": micro_batch,
                 "gradient_accumulation_steps": 1}  # fmt: skip
    ds_config.setdefault("optimizer", {"type": "AdamW", "params": {"lr": lr, "torch_adam": True}})
# -----------------------------------------------------------------------------

device = "cuda" if torch.cuda.is_available() else "cpu"
deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")
rank, world = dist.get_rank(), dist.get_world_size()
if device == "cuda":
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    device = f"cuda:{torch.cuda.current_device()}"


def log(*args: object) -> None:
    if rank == 0:
        print(*args, flush=True)


# ---- data: WikiText-2 words (already tokenized, rare words are <unk>); the vocabulary is the training split's
def words(name: str) -> list[str]:
    lines = Path(data_dir, name).read_text(encoding="utf-8").splitlines()
    return [w for line in lines for w in [*line.split(), "<eos>"]]


train_words, val_words = words(train_file), words(val_file)
vocab = ["<unk>"] + sorted(w for w in Counter(train_words) if w != "<unk>")
stoi = {w: i for i, w in enumerate(vocab)}
splits = {
    "train": torch.tensor([stoi[w] for w in train_words]),
    "val": torch.tensor([stoi.get(w, 0) for w in val_words]),  # words unseen in training are <unk>
}
log(f"words: {len(train_words):,} to train on, {len(val_words):,} to validate on, vocabulary {len(vocab):,}")


def get_batch(split: str, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    # A function of (rank, step) only, so a resumed run sees the same batches as an uninterrupted one.
    g = torch.Generator().manual_seed(seed + 1_000_003 * rank + step if split == "train" else 7 * rank + step)
    part = splits[split]
    starts = torch.randint(len(part) - block_size - 1, (micro_batch,), generator=g)
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
        # GPT-2's initialisation: small weights, so the first loss is about ln(vocabulary size)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        logits = self.head(self.ln(self.blocks(x)))
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1))


torch.manual_seed(seed)  # the same initial weights on every rank
model = GPT(len(vocab))
log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, ZeRO stage "
    f"{ds_config['zero_optimization']['stage']}, {world} processes")  # fmt: skip
decay = [p for p in model.parameters() if p.dim() >= 2]
no_decay = [p for p in model.parameters() if p.dim() < 2]
groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

# ---- the engine: deepspeed.initialize, plus Lookahead from the config's "lookahead" section
engine, _, _, _ = la_ds.initialize(model=model, model_parameters=groups, config=ds_config)
lookahead = la_ds.find_lookahead(engine)  # the Lookahead around DeepSpeed's inner optimizer (None without)
ckpt_dir = Path(out_dir, "checkpoints")
start = 0
if resume:
    # φ and the per-tensor cycle counters come back with each rank's optimizer state.
    path, client_state = la_ds.load_checkpoint(engine, ckpt_dir)
    if path is None:
        sys.exit(f"--resume=True but {ckpt_dir} has no checkpoint")
    start = client_state["iter"]
    log(f"resumed from {path} at iter {start}")


@torch.no_grad()
def estimate_loss(step: int) -> float:
    engine.eval()
    losses = [engine(*get_batch("val", step * eval_iters + i)).item() for i in range(eval_iters)]
    engine.train()
    total = torch.tensor(sum(losses) / eval_iters, device=device)
    dist.all_reduce(total)  # each rank evaluated its own batches: average over ranks
    return total.item() / world


def evaluate(step: int) -> dict[str, float]:
    result = {"val_loss": estimate_loss(step)}
    if lookahead is not None:
        with la_ds.use_slow_weights(engine):  # φ in the model for the block; θ restored bit-exactly after
            result["val_loss_slow"] = estimate_loss(step)
    return result


def save(it: int) -> None:
    # engine.save_checkpoint, with "latest" written only once every rank's files are complete.
    la_ds.save_checkpoint(engine, ckpt_dir, tag=f"iter{it}", client_state={"iter": it})
    log(f"saved {ckpt_dir / f'iter{it}'}")


# ---- training loop
history = []
t0 = time.time()
for it in range(start, max_iters + 1):
    if it % eval_interval == 0 or it == max_iters:
        row = {"iter": it, **evaluate(it)}
        history.append(row)
        slow = f", on slow weights {math.exp(row['val_loss_slow']):.1f}" if lookahead is not None else ""
        log(f"iter {it}: val ppl {math.exp(row['val_loss']):.1f}{slow} ({time.time() - t0:.1f} s)")
    if it > start and (it == max_iters or save_interval and it % save_interval == 0):
        save(it)
    if it == max_iters:
        break
    loss = engine(*get_batch("train", it))
    engine.backward(loss)
    engine.step()  # AdamW on this rank's partition, then Lookahead's sync every k-th step, then the all-gather
    if it % 50 == 0:
        log(f"iter {it}: train loss {loss.item():.4f}, lr {engine.get_lr()[0]:.2e}")

if lookahead is not None:
    log(f"Lookahead synced {lookahead.sync_count} times (k={lookahead.k}, alpha={lookahead.alpha})")
if rank == 0:
    Path(out_dir, "history.json").write_text(json.dumps(history, indent=1))
engine.destroy()
