"""LookaheadCallback under Lightning's ModelParallelStrategy (FSDP2) and FSDPStrategy (FSDP1, CPUFSDPStrategy),
2 CPU ranks, vs. the single-process reference. Launched by torchrun:

    torchrun --nproc_per_node 2 tests/dist/fsdp_pl.py --out R.json --tmp DIR --cases fsdp2,fsdp1

Lightning sees torchrun's environment and starts no processes itself. Per case (k=3, α=0.5, AdamW, 8 steps
of 4 rows per rank, validation after steps 4 and 8; the MLP of fsdp_common with uneven shards):
  * θ and φ (gathered to full tensors) vs. the reference; φ's local size per rank; collectives inside
    every inner step + sync (fsdp_common.Comms);
  * the validation losses (on φ) vs. the reference's φ at steps 4 and 8 (validation must not move training);
  * the logged ‖θ − φ‖ vs. the reference's;
  * ``trainer.test`` after fit in the same Trainer: the test loss (on φ) vs. the reference's, θ unchanged;
  * resume: fit to step 4 (one step into a cycle), save, fit to 8 from the checkpoint in a new Trainer,
    from a sharded checkpoint and from a full one -> θ and φ bit-identical to the straight run.
Rank 0 writes JSON.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

from lookahead_dist import LookaheadCallback
from lookahead_dist.core.keys import SLOW_KEY
from lookahead_dist.lightning import CPUFSDPStrategy
from tests.dist.fsdp_common import ALPHA, Comms, K, make_data, make_inner, make_net, reference_run
from tests.dist.pl_common import Capture, Rows, loader
from tests.helpers import run_cases
from tests.reference import max_abs_diff

warnings.filterwarnings("ignore")
STEPS, PER_RANK, VAL_EVERY, VAL_ROWS, MID = 8, 4, 4, 64, 4


class ShardedModule(LightningModule):
    """The fsdp_common MLP; ``fsdp2=True`` applies fully_shard per layer and to the root in configure_model."""

    def __init__(self, fsdp2: bool) -> None:
        super().__init__()
        self.net = make_net()
        self.fsdp2 = fsdp2
        self.val_losses: list[float] = []
        self.test_losses: list[float] = []
        self.step_comms: list[Any] = []

    def configure_model(self) -> None:
        # Lightning calls this again for trainer.test after fit: shard once.
        if not self.fsdp2 or isinstance(self.net[0].weight, DTensor):
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in (self.net[0], self.net[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y, reduction="sum")
        self.val_losses.append(float(loss))
        return loss

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.test_losses.append(float(nn.functional.mse_loss(self.net(x), y, reduction="sum")))

    def val_dataloader(self) -> DataLoader:
        x, y = make_data()
        return DataLoader(Rows(x[:VAL_ROWS], y[:VAL_ROWS]), batch_size=VAL_ROWS)

    def configure_optimizers(self) -> Any:
        return make_inner(self.parameters(), "adamw")


class CountStepComms(Callback):
    """Counts collectives inside each inner step + sync of the installed Lookahead (after the closure ran
    forward and backward, which hold FSDP's own collectives)."""

    def __init__(self, lookahead: LookaheadCallback) -> None:
        self.lookahead = lookahead
        self.per_step: list[list[tuple[str, int]]] = []

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        wrapper = self.lookahead.wrappers[0]
        original = wrapper._step

        def counted() -> None:
            with Comms() as comms:
                original()
            self.per_step.append(comms.log)

        wrapper._step = counted  # type: ignore[method-assign]


def make_strategy(case: str, full: bool) -> Any:
    if case == "fsdp2":
        return ModelParallelStrategy(
            data_parallel_size=dist.get_world_size(), tensor_parallel_size=1, save_distributed_checkpoint=not full
        )
    # FSDP1: one unit per Linear plus the root, so parameters are split over several flat parameters.
    return CPUFSDPStrategy(auto_wrap_policy={nn.Linear}, state_dict_type="full" if full else "sharded")


def fit(case: str, steps: int, full: bool = False, ckpt: str | None = None, start: int = 0) -> tuple:
    module = ShardedModule(fsdp2=case == "fsdp2")
    callback = LookaheadCallback(k=K, alpha=ALPHA, log_distance=True)
    counter = CountStepComms(callback)
    logger = Capture()
    trainer = Trainer(
        accelerator="cpu",
        devices=dist.get_world_size(),
        strategy=make_strategy(case, full),
        max_steps=steps,
        callbacks=[callback, counter],
        logger=logger,
        log_every_n_steps=STEPS,
        val_check_interval=VAL_EVERY,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    data = loader(PER_RANK, dist.get_rank(), dist.get_world_size(), start=start)
    trainer.fit(module, train_dataloaders=data, ckpt_path=ckpt)
    module.step_comms = counter.per_step
    return trainer, module, callback, logger


def full_weights(trainer: Trainer, module: ShardedModule, callback: LookaheadCallback, case: str) -> tuple:
    """(θ, φ) as full tensors on every rank, and φ's bytes on this rank."""
    wrapper = callback.wrappers[0]
    params = list(module.net.parameters())
    local_phi = [wrapper.state[p][SLOW_KEY] for p in params if SLOW_KEY in wrapper.state[p]]
    phi_bytes = sum(
        (t.to_local() if isinstance(t, DTensor) else t).numel() * t.element_size() for t in local_phi
    )
    if case == "fsdp2":
        theta = [p.detach().full_tensor() for p in params]
        phi = [wrapper.state[p][SLOW_KEY].full_tensor() for p in params]
        return theta, phi, phi_bytes
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(trainer.strategy.model, writeback=False):
        theta = [p.detach().clone() for p in module.net.parameters()]
    with wrapper.use_slow_weights(), FSDP.summon_full_params(trainer.strategy.model, writeback=False):
        phi = [p.detach().clone() for p in module.net.parameters()]
    return theta, phi, phi_bytes


def val_loss(params: list[torch.Tensor]) -> float:
    net = make_net()
    with torch.no_grad():
        for p, v in zip(net.parameters(), params):
            p.copy_(v)
        x, y = make_data()
        return float(nn.functional.mse_loss(net(x[:VAL_ROWS]), y[:VAL_ROWS], reduction="sum"))


def run_case(case: str, tmp: str) -> dict[str, Any]:
    world = dist.get_world_size()
    t0 = time.time()
    trainer, module, callback, logger = fit(case, STEPS)
    theta, phi, phi_bytes = full_weights(trainer, module, callback, case)
    # Lightning's sharded checkpoint (a DCP folder) at step 8, for the consolidated-slow-weights test.
    trainer.save_checkpoint(os.path.join(tmp, f"{case}_final.ckpt"))
    # trainer.test in the same Trainer after fit (on φ, like validation); θ must be unchanged afterwards.
    trainer.test(module, dataloaders=module.val_dataloader(), verbose=False)
    theta_after_test, _, _ = full_weights(trainer, module, callback, case)
    ref_theta, ref_phi = reference_run(STEPS, PER_RANK * world, "adamw")
    ref_theta4, ref_phi4 = reference_run(VAL_EVERY, PER_RANK * world, "adamw")
    expected_val = [val_loss(ref_phi4), val_loss(ref_phi)]
    fast_val = [val_loss(ref_theta4), val_loss(ref_theta)]  # what validation on θ would give
    ref_distance = sum(float(((a - b).double() ** 2).sum()) for a, b in zip(ref_theta, ref_phi)) ** 0.5
    logged = logger.metrics.get(STEPS - 1, {})
    per_rank: list[Any] = [None] * world
    dist.all_gather_object(per_rank, phi_bytes)
    step_comms: list[Any] = [None] * world
    dist.all_gather_object(step_comms, module.step_comms)
    out: dict[str, Any] = {
        "theta": max_abs_diff(theta, ref_theta),
        "phi": max_abs_diff(phi, ref_phi),
        "phi_bytes_per_rank": per_rank,
        "step_comms": step_comms,  # per rank, per optimizer step: collectives in the inner step + sync
        "P": sum(p.numel() for p in make_net().parameters()),
        "strategy": type(trainer.strategy).__name__,
        "val": max(abs(a - b) for a, b in zip(module.val_losses, expected_val, strict=True)),
        "val_count": len(module.val_losses),
        "test": abs(module.test_losses[0] - expected_val[1]) if module.test_losses else None,
        "theta_after_test": max_abs_diff(theta_after_test, theta),
        "val_fast_gap": min(abs(a - b) for a, b in zip(expected_val, fast_val, strict=True)),
        "distance": abs(logged.get("lookahead/distance", float("nan")) - ref_distance),
        "syncs_done": callback.syncs_done,
    }
    for full in (False, True):
        name = "full" if full else "sharded"
        path = os.path.join(tmp, f"{case}_{name}_{MID}.ckpt")
        first, *_ = fit(case, MID, full=full)
        first.save_checkpoint(path)
        trainer2, module2, callback2, _ = fit(case, STEPS, full=full, ckpt=path, start=MID)
        theta2, phi2, _ = full_weights(trainer2, module2, callback2, case)
        out[f"resume_{name}"] = max(max_abs_diff(theta2, theta), max_abs_diff(phi2, phi))
        out[f"resume_{name}_syncs"] = callback2.syncs_done
        out[f"resume_{name}_is_dir"] = Path(path).is_dir()
    out["seconds"] = round(time.time() - t0, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--tmp", required=True)
    parser.add_argument("--cases", default="fsdp2,fsdp1")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    run_cases(args.cases.split(","), lambda case: run_case(case, args.tmp), args.out)


if __name__ == "__main__":
    main()
