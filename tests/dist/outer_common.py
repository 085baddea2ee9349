"""Cases, model and data shared by tests/dist/outer_cases.py (the launched script) and tests/test_outer.py.

Every case runs on 2 simulated nodes (two separate torchrun invocations on 127.0.0.1). Each global step
draws one global batch of ``world * MICRO * GAS`` samples; rank ``r`` takes micro-batch ``m`` at
``(m * world + r) * MICRO``, so node ``n`` trains on the samples of its ranks only.
"""

from __future__ import annotations

from typing import Any

import torch

from tests.dist.ds_common import MLP

MICRO = 2
GAS = 2

#: name -> stage, inner optimizer, k, alpha, "outer" section (None: plain Lookahead), steps, save_at.
CASES: dict[str, dict[str, Any]] = {
    # k = 1, inner SGD, alpha = 1, no momentum: must equal global data-parallel SGD (a global ZeRO run).
    "sgd_s1": {"stage": 1, "optim": "sgd", "k": 1, "alpha": 1.0, "outer": {"scope": "nodes"}, "steps": 4},
    "sgd_s2": {"stage": 2, "optim": "sgd", "k": 1, "alpha": 1.0, "outer": {"scope": "nodes"}, "steps": 4},
    "sgd_s3": {"stage": 3, "optim": "sgd", "k": 1, "alpha": 1.0, "outer": {"scope": "nodes"}, "steps": 4},
    # DiLoCo-like: AdamW inside the nodes, outer Nesterov momentum; checkpoint mid-cycle (step 5 of k=3).
    "nesterov_s2": {"stage": 2, "optim": "adamw", "k": 3, "alpha": 0.8, "steps": 11, "save_at": 5,
                    "outer": {"scope": "nodes", "momentum": 0.9, "nesterov": True, "lr": 0.7}},
    "nesterov_s3": {"stage": 3, "optim": "adamw", "k": 3, "alpha": 0.8, "steps": 8, "save_at": 4,
                    "outer": {"scope": "nodes", "momentum": 0.8, "nesterov": False}},
    # Lookahead's rule across nodes, delta all-reduced in bf16.
    "bf16comm_s1": {"stage": 1, "optim": "adamw", "k": 3, "alpha": 0.5, "steps": 7,
                    "outer": {"scope": "nodes", "comm_dtype": "bf16"}},
    # All ranks declared one node: must be plain Lookahead ("plain_s2"), bit for bit.
    "onenode_s2": {"stage": 2, "optim": "adamw", "k": 3, "alpha": 0.5, "steps": 7,
                   "outer": {"scope": "nodes", "local_world_size": "world"}},
    "plain_s2": {"stage": 2, "optim": "adamw", "k": 3, "alpha": 0.5, "steps": 7, "outer": None},
}  # fmt: skip


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return MLP()


def param_groups(model: torch.nn.Module, optim: str) -> list[dict[str, Any]]:
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    if optim == "sgd":
        return [{"params": weights, "lr": 0.1}, {"params": biases, "lr": 0.05}]
    return [{"params": weights, "lr": 2e-2, "weight_decay": 0.1}, {"params": biases, "lr": 5e-3, "weight_decay": 0.0}]


def make_optimizer(optim: str, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    if optim == "sgd":
        return torch.optim.SGD(groups)
    return torch.optim.AdamW(groups, betas=(0.9, 0.99), eps=1e-8)


def global_batch(step: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2000 + step)
    n = world * MICRO * GAS
    return torch.randn(n, 8, generator=g), torch.randn(n, 4, generator=g)


def micro_batch(step: int, world: int, rank: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = global_batch(step, world)
    start = (micro * world + rank) * MICRO
    return x[start : start + MICRO], y[start : start + MICRO]


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out.float() - y) ** 2).mean()
