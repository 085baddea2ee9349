"""Shared pieces of the LookaheadCallback tests: a tiny LightningModule, per-rank deterministic data, and
the single-process reference run (tests/reference.py's ReferenceLookahead in a plain loop).

Data layout: global batch j is rows [j*G, (j+1)*G) of a fixed tensor, G = world_size * B; rank r gets
rows [j*G + r*B, j*G + (r+1)*B). With mean losses, DDP/ZeRO's averaged gradient equals the gradient of
the full global batch, which is what the reference computes in one process.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from tests.reference import ReferenceLookahead

IN, HIDDEN = 6, 12
N_ROWS = 512


def make_data(n_rows: int = N_ROWS, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_rows, IN, generator=g)
    y = torch.sin(x.sum(dim=1, keepdim=True)) + 0.1 * torch.randn(n_rows, 1, generator=g)
    return x, y


def make_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 1))


class Rows(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


class RankSlices(Sampler[int]):
    """Rank ``rank``'s slice of each global batch, in order, starting at global batch ``start``."""

    def __init__(self, n_rows: int, per_rank: int, rank: int, world: int, start: int = 0) -> None:
        self.n_rows, self.per_rank, self.rank, self.world, self.start = n_rows, per_rank, rank, world, start

    def _batches(self) -> int:
        return self.n_rows // (self.per_rank * self.world)

    def __iter__(self):  # type: ignore[no-untyped-def]
        g = self.per_rank * self.world
        start, self.start = self.start, 0  # the offset (for resuming) applies to the first epoch only
        for j in range(start, self._batches()):
            base = j * g + self.rank * self.per_rank
            yield from range(base, base + self.per_rank)

    def __len__(self) -> int:
        return (self._batches() - self.start) * self.per_rank


def loader(per_rank: int, rank: int, world: int, start: int = 0, n_rows: int = N_ROWS) -> DataLoader:
    x, y = make_data(n_rows)
    return DataLoader(Rows(x, y), batch_size=per_rank, sampler=RankSlices(n_rows, per_rank, rank, world, start))


def global_batch(j: int, size: int, n_rows: int = N_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = make_data(n_rows)
    j %= n_rows // size  # later epochs repeat the same batches in the same order
    return x[j * size : (j + 1) * size], y[j * size : (j + 1) * size]


def make_inner(params: Any, opt: str, lr: float) -> torch.optim.Optimizer:
    if opt == "adam":
        return torch.optim.Adam(params, lr=lr)
    if opt == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    raise ValueError(opt)


def make_scheduler(inner: torch.optim.Optimizer, scheduler: str | None) -> Any:
    if scheduler is None:
        return None
    # Multiplicative decay; "step" steps it after every optimizer step, "epoch" after every epoch.
    return torch.optim.lr_scheduler.LambdaLR(inner, lambda t: 0.8**t)


class TinyModule(pl.LightningModule):
    """Regression MLP. ``opt``: "adam" | "sgd"; ``scheduler``: None | "step" | "epoch"."""

    def __init__(
        self, opt: str = "adam", lr: float = 0.05, scheduler: str | None = None, val_rows: int = 64
    ) -> None:
        super().__init__()
        self.net = make_net()
        self.opt, self.lr, self.scheduler = opt, lr, scheduler
        self.val_rows = val_rows
        self.val_losses: list[float] = []
        self.lr_seen: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x).float(), y)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.lr_seen.append(self.trainer.optimizers[0].param_groups[0]["lr"])

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x).float(), y, reduction="sum")
        self.val_losses.append(float(loss))
        return loss

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.validation_step(batch, batch_idx)

    def val_dataloader(self) -> DataLoader:
        x, y = make_data()
        return DataLoader(Rows(x[: self.val_rows], y[: self.val_rows]), batch_size=self.val_rows)

    def configure_optimizers(self) -> Any:
        inner = make_inner(self.parameters(), self.opt, self.lr)
        sched = make_scheduler(inner, self.scheduler)
        if sched is None:
            return inner
        return {"optimizer": inner, "lr_scheduler": {"scheduler": sched, "interval": self.scheduler}}


def reference_run(
    steps: int,
    global_size: int,
    k: int,
    alpha: float,
    opt: str = "adam",
    lr: float = 0.05,
    pullback: str = "none",
    accumulate: int = 1,
    clip: float | None = None,
    scheduler: str | None = None,
    n_rows: int = N_ROWS,
    bf16: bool = False,
) -> tuple[nn.Module, ReferenceLookahead, list[float]]:
    """The trajectory Lightning + LookaheadCallback must reproduce; returns (net, ref, lr per step)."""
    net = make_net()
    inner = make_inner(net.parameters(), opt, lr)
    sched = make_scheduler(inner, scheduler)
    ref = ReferenceLookahead(inner, k, alpha, pullback=pullback)
    lrs = []
    micro = 0
    batches_per_epoch = n_rows // global_size
    for step in range(steps):
        lrs.append(inner.param_groups[0]["lr"])
        inner.zero_grad()
        for _ in range(accumulate):
            x, y = global_batch(micro, global_size, n_rows)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = net(x)
            loss = nn.functional.mse_loss(out.float(), y) / accumulate
            loss.backward()
            micro += 1
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        ref.step()
        if scheduler == "step" or scheduler == "epoch" and micro % batches_per_epoch == 0:
            sched.step()
    return net, ref, lrs


def slow_of(ref: ReferenceLookahead, net: nn.Module) -> list[torch.Tensor]:
    return [ref.slow[p] for p in net.parameters()]


def val_loss(params: list[torch.Tensor], val_rows: int = 64) -> float:
    """Summed MSE of the fixed validation rows for the given parameter values."""
    net = make_net()
    with torch.no_grad():
        for p, v in zip(net.parameters(), params):
            p.copy_(v)
        x, y = make_data()
        return float(nn.functional.mse_loss(net(x[:val_rows]), y[:val_rows], reduction="sum"))


class Capture(Logger):
    """Keeps logged metrics in memory: {step: {name: value}}."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[int, dict[str, float]] = {}

    @property
    def name(self) -> str:
        return "capture"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.setdefault(int(step or 0), {}).update(metrics)

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass
