"""Model, data and the single-process reference for the Hugging Face Trainer tests (tests/test_hf.py).

Every optimizer step is a full-batch step: the 8 training samples make one global batch (8 on one process,
4 per rank on two), so the gradient does not depend on how the samples are split across ranks; LR constant,
no clipping, no dropout. The reference is a plain loop of the same torch AdamW (same two param groups the
Trainer builds: weights with weight decay, biases without) and tests/reference.py's Algorithm 1.
"""

from __future__ import annotations

import torch
from torch import nn

N_TRAIN, N_EVAL = 8, 8
IN, HID, OUT = 6, 12, 3
K, ALPHA = 3, 0.5
STEPS = 8  # two syncs (after steps 3 and 6), then two steps into the third cycle
SAVE_AT = 4  # mid-cycle checkpoint: one step after the first sync
LR, WD = 1e-2, 0.1
SECTION = {"k": 2, "alpha": 0.25}  # a DeepSpeed config's "lookahead" section, read by an option-less callback


class TinyRegressor(nn.Module):
    """Linear - tanh - Linear with an MSE loss, in the Trainer's calling convention (``labels`` -> loss)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(IN, HID)
        self.fc2 = nn.Linear(HID, OUT)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out = self.fc2(torch.tanh(self.fc1(x)))
        if labels is None:
            return {"logits": out}
        return {"loss": ((out - labels) ** 2).mean(), "logits": out}


def make_model() -> TinyRegressor:
    torch.manual_seed(0)
    return TinyRegressor()


def samples(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, IN, generator=g), torch.randn(n, OUT, generator=g)
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def train_set() -> list[dict[str, torch.Tensor]]:
    return samples(N_TRAIN, 1)


def eval_set() -> list[dict[str, torch.Tensor]]:
    return samples(N_EVAL, 2)


def batch(data: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([d["x"] for d in data]), torch.stack([d["labels"] for d in data])


def reference(steps: int, k: int = K, alpha: float = ALPHA) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(θ, φ) after ``steps`` full-batch steps of Lookahead(AdamW), computed by the plain reference loop."""
    from tests.reference import ReferenceLookahead

    model = make_model()
    weights = [p for n, p in model.named_parameters() if not n.endswith("bias")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    inner = torch.optim.AdamW([{"params": weights, "weight_decay": WD}, {"params": biases, "weight_decay": 0.0}],
                              lr=LR)
    ref = ReferenceLookahead(inner, k=k, alpha=alpha)
    x, y = batch(train_set())
    for _ in range(steps):
        inner.zero_grad()
        model(x, y)["loss"].backward()
        ref.step()
    theta = [p.detach().clone() for p in model.parameters()]
    phi = [ref.slow[p].clone() for p in model.parameters()]
    return theta, phi


def eval_loss(params: list[torch.Tensor]) -> float:
    """The model's MSE on the whole evaluation set at the given weights."""
    model = make_model()
    with torch.no_grad():
        for p, value in zip(model.parameters(), params):
            p.copy_(value)
        x, y = batch(eval_set())
        return float(model(x, y)["loss"])
