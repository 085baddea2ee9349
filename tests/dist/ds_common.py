"""Model, data and single-process reference shared by tests/dist/ds_cases.py and tests/test_deepspeed.py.

Two tiny models:
* ``mlp``   (fp32 cases): Linear(8,16) - tanh - Linear(16,4), MSE loss.
* ``probe`` (bf16 cases): two independent linear maps whose loss is linear in the weights, with inputs
  and loss weights in {-1, 0, 1}. Its gradient does not depend on the weights and is exactly
  representable in bf16 (small sums of ±1 divided by powers of two), so DeepSpeed's bf16
  forward/backward/reduction produce the same fp32 gradients as the fp32 reference: any difference
  left between DeepSpeed's fp32 master weights and the reference is the optimizer path itself.
"""

from __future__ import annotations

import torch
from torch import nn

WORLD = 2
MICRO = 2  # per-rank micro-batch (a power of two keeps the probe's gradients exact in bf16)
GAS = 2
GLOBAL = WORLD * MICRO * GAS
IN, HID, OUT = 8, 16, 4


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(IN, HID)
        self.fc2 = nn.Linear(HID, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


class Probe(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(IN, HID)
        self.b = nn.Linear(IN, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x[:, :IN]), self.b(x[:, IN:])], dim=1)


def make_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return MLP() if kind == "mlp" else Probe()


def param_groups(model: nn.Module, wd: float = 0.1) -> list[dict]:
    """Two groups with different lr and weight decay: weights, biases."""
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [
        {"params": weights, "lr": 2e-2, "weight_decay": wd},
        {"params": biases, "lr": 5e-3, "weight_decay": 0.0},
    ]


def lr_lambda(step: int) -> float:
    return 0.25 + 0.75 * min(1.0, (step + 1) / 6)


def global_batch(kind: str, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    if kind == "mlp":
        return torch.randn(GLOBAL, IN, generator=g), torch.randn(GLOBAL, OUT, generator=g)
    x = torch.randint(-1, 2, (GLOBAL, 2 * IN), generator=g).float()
    w = torch.randint(-1, 2, (GLOBAL, HID + OUT), generator=g).float()
    return x, w


def micro_batch(kind: str, step: int, rank: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = global_batch(kind, step)
    start = (micro * WORLD + rank) * MICRO
    return x[start : start + MICRO], y[start : start + MICRO]


def loss_fn(kind: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over the batch: the mean of micro-batch losses equals the global-batch loss."""
    if kind == "mlp":
        return ((out.float() - y) ** 2).mean()
    return (out * y.to(out.dtype)).sum() / out.shape[0]


def eval_batch(kind: str) -> torch.Tensor:
    return global_batch(kind, 999)[0][:4]


K = 5  # every configs/*.json uses k=5, alpha=0.5 (the test checks this)
ALPHA = 0.5
STEPS = 3 * K + 2  # three full cycles, then two steps into the fourth
SAVE_AT = K + 2  # checkpoint mid-cycle

# name -> how the case is built. "config": file in configs/ ; "override": merged into it;
# "model": mlp|probe ; "optim": adamw|cpuadam ; "sched": LambdaLR ; "nan": step whose first
# micro-batch gets a NaN loss (the whole step must be skipped by DeepSpeed and by Lookahead).
CASES: dict[str, dict] = {
    "stage0": {"config": "zero1.json", "override": {"zero_optimization": {"stage": 0}}, "model": "mlp",
               "optim": "adamw", "sched": True, "nan": None},
    "zero1": {"config": "zero1.json", "model": "mlp", "optim": "adamw", "sched": False, "nan": 4},
    "zero2": {"config": "zero2.json", "model": "mlp", "optim": "adamw", "sched": True, "nan": None},
    "zero3": {"config": "zero3.json", "override": {"zero_optimization": {"stage3_param_persistence_threshold": 0}},
              "model": "mlp", "optim": "adamw", "sched": False, "nan": 4},
    "zero3_subgroups": {"config": "zero3.json", "override": {"zero_optimization": {
        "stage3_param_persistence_threshold": 0, "sub_group_size": 40}},
        "model": "mlp", "optim": "adamw", "sched": True, "nan": None},
    "zero3_persist": {"config": "zero3.json", "override": {"zero_optimization": {
        "stage3_param_persistence_threshold": 20, "sub_group_size": 100}},
        "model": "mlp", "optim": "adamw", "sched": False, "nan": 9},
    "stage0_bf16": {"config": "zero1_bf16.json", "override": {"zero_optimization": {"stage": 0},
                                                          "data_types": {"grad_accum_dtype": "bf16"}},
                    "model": "probe", "optim": "adamw", "sched": False, "nan": None},
    "zero1_bf16": {"config": "zero1_bf16.json", "model": "probe", "optim": "adamw", "sched": True, "nan": None},
    "zero2_bf16": {"config": "zero2_bf16.json", "model": "probe", "optim": "adamw", "sched": False, "nan": None},
    "zero3_bf16": {"config": "zero3_bf16.json", "override": {"zero_optimization": {
        "stage3_param_persistence_threshold": 0}}, "model": "probe", "optim": "adamw", "sched": False, "nan": None},
    "zero2_offload": {"config": "zero2_offload.json", "model": "mlp", "optim": "cpuadam", "sched": False, "nan": 4},
    "zero3_offload": {"config": "zero3_offload.json", "override": {"zero_optimization": {
        "stage3_param_persistence_threshold": 0}}, "model": "mlp", "optim": "cpuadam", "sched": True, "nan": None},
}


def merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def make_optimizer(kind: str, groups: list[dict]) -> torch.optim.Optimizer:
    if kind == "adamw":
        return torch.optim.AdamW(groups, betas=(0.9, 0.99), eps=1e-8)
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam(groups, betas=(0.9, 0.99), eps=1e-8, adamw_mode=True)
