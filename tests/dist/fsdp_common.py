"""Shared pieces of the FSDP tests: a tiny regression MLP whose shapes split unevenly over 2 ranks, per-rank
deterministic data, a collective counter, and the single-process reference (tests/reference.py's loop).

Shapes: Linear(6, 33) shards its 33 rows 17/16; Linear(33, 1) has one row, so rank 1 holds an empty shard.
Data: global batch j is rows [j*G, (j+1)*G) of a fixed tensor (G = world * B); rank r takes rows
[j*G + r*B, j*G + (r+1)*B). With mean losses the averaged (reduce-scattered) gradient equals the
gradient of the full global batch, which the reference computes in one process.

Collectives are counted at the dispatcher (a TorchDispatchMode), where every torch.distributed collective
passes: the c10d ops behind ``torch.distributed.*`` (FSDP's all-gather / reduce-scatter, all_reduce, ...)
and the functional collectives DTensor uses to redistribute. A Python-level wrapper of
``torch.distributed`` functions would miss the latter.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from tests.reference import ReferenceLookahead

IN, HIDDEN = 6, 33
N_ROWS = 512
K, ALPHA, LR = 3, 0.5, 0.05
COMM_NAMESPACES = ("c10d", "_c10d_functional", "c10d_functional", "_c10d_functional_autograd")


def make_data(n_rows: int = N_ROWS, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_rows, IN, generator=g)
    y = torch.sin(x.sum(dim=1, keepdim=True)) + 0.1 * torch.randn(n_rows, 1, generator=g)
    return x, y


def make_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 1))


def global_batch(j: int, size: int, n_rows: int = N_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = make_data(n_rows)
    j %= n_rows // size
    return x[j * size : (j + 1) * size], y[j * size : (j + 1) * size]


def rank_batch(j: int, per_rank: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = global_batch(j, per_rank * world)
    return x[rank * per_rank : (rank + 1) * per_rank], y[rank * per_rank : (rank + 1) * per_rank]


def make_inner(params: Any, opt: str, lr: float = LR) -> torch.optim.Optimizer:
    if opt == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    if opt == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    raise ValueError(opt)


def reference_run(steps: int, global_size: int, opt: str, k: int = K, alpha: float = ALPHA) -> tuple:
    """(θ, φ) after ``steps`` steps of the paper's loop on full global batches in one process."""
    net = make_net()
    ref = ReferenceLookahead(make_inner(net.parameters(), opt), k, alpha)
    for step in range(steps):
        ref.inner.zero_grad()
        x, y = global_batch(step, global_size)
        nn.functional.mse_loss(net(x), y).backward()
        ref.step()
    params = list(net.parameters())
    return [p.detach().clone() for p in params], [ref.slow[p].clone() for p in params]


class Comms(TorchDispatchMode):
    """Records (op name, element count) of every collective dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func.namespace in COMM_NAMESPACES:
            numel = 0
            for value in list(args) + list((kwargs or {}).values()):
                if isinstance(value, torch.Tensor):
                    numel += value.numel()
                elif isinstance(value, (list, tuple)):
                    numel += sum(v.numel() for v in value if isinstance(v, torch.Tensor))
            self.log.append((str(func.overloadpacket.__name__), numel))
        return func(*args, **(kwargs or {}))
