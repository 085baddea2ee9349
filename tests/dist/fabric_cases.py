"""Lookahead in Lightning Fabric loops on 2 CPU ranks (gloo), one process group for every case. Launched by
tests/test_fabric.py:

    torchrun --nproc_per_node 2 -m tests.dist.fabric_cases --out R.json --tmp DIR [--cases ddp,zero2,...]

Every case trains the tiny MLP of tests/dist/fsdp_common.py (uneven shards 17/16 and 1/0 rows) with AdamW,
k=3, α=0.5, on per-rank slices of the same global batches as the single-process reference, and records:

* full θ and φ after ``STEPS`` steps (φ read through ``use_slow_weights``, gathered the strategy's way), and
  θ right after the swap (restored bit-exactly?);
* the collectives of every whole step (forward, backward, ``optimizer.step()``), with and without Lookahead;
* a mid-cycle resume: ``fabric.save`` after ``SAVE_AT`` steps, fresh model and optimizer, ``fabric.load``,
  the remaining steps, compared with the straight run (the same computation replayed: bit-identical).

The functions that read full weights per engine are shared with tests/dist/accelerate_cases.py.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tests.dist.fsdp_common import ALPHA, LR, Comms, K, make_inner, make_net, rank_batch
from tests.helpers import run_cases

warnings.filterwarnings("ignore")
STEPS, SAVE_AT, PER_RANK = 8, 4, 4
STAGES = {"zero1": 1, "zero2": 2, "zero3": 3}


# ------------------------------------------------------------------ reading full weights, any engine
def inner_module(model: nn.Module) -> nn.Module:
    """The module under Fabric's / accelerate's / DDP's / FSDP's / DeepSpeed's wrappers (one level each)."""
    for attr in ("_forward_module", "module"):
        while hasattr(model, attr) and isinstance(getattr(model, attr), nn.Module):
            model = getattr(model, attr)
    return model


def full_params(model: nn.Module) -> list[torch.Tensor]:
    """Every parameter of ``model`` as a full fp32 tensor (collectives where the engine shards)."""
    from torch.distributed.tensor import DTensor

    module = model
    while hasattr(module, "_forward_module"):
        module = module._forward_module
    kind = type(module).__name__
    if kind == "FullyShardedDataParallel":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(module, writeback=False):
            return [p.detach().clone().float() for p in module.parameters()]
    params = list(inner_module(model).parameters())
    if params and hasattr(params[0], "ds_id"):  # ZeRO-3 partitioned parameters
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return [p.detach().clone().float() for p in params]
    return [(p.full_tensor() if isinstance(p, DTensor) else p).detach().clone().float() for p in params]


def local_params(model: nn.Module) -> list[torch.Tensor]:
    """This rank's own piece of every parameter (no collective), to check a restore bit for bit."""
    from torch.distributed.tensor import DTensor

    params = list(inner_module(model).parameters()) or list(model.parameters())
    out = []
    for p in params:
        if isinstance(p, DTensor):
            out.append(p.to_local().detach().clone())
        elif hasattr(p, "ds_tensor"):
            out.append(p.ds_tensor.detach().clone())
        else:
            out.append(p.detach().clone())
    return out


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((float((x - y).abs().max()) if x.numel() else 0.0) for x, y in zip(a, b))


def phi_layout(lookahead: Any) -> dict[str, Any]:
    """This rank's φ: element count held locally, and whether every φ tensor is a DTensor shard."""
    from torch.distributed.tensor import DTensor

    from lookahead_dist.core.keys import SLOW_KEY

    slows = [st[SLOW_KEY] for st in lookahead.state.values() if SLOW_KEY in st]
    return {
        "numel": sum((t.to_local() if isinstance(t, DTensor) else t).numel() for t in slows),
        "dtensor": bool(slows) and all(isinstance(t, DTensor) for t in slows),
    }


def gather_per_rank(value: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def train_steps(
    model: Any, optimizer: Any, backward: Callable[..., None], start: int, stop: int
) -> list[list[tuple[str, int]]]:
    """Steps ``start..stop-1`` on this rank's slice of each global batch; the collectives of each step."""
    rank, world = dist.get_rank(), dist.get_world_size()
    logs = []
    for step in range(start, stop):
        x, y = rank_batch(step, PER_RANK, rank, world)
        with Comms() as comms:
            loss = nn.functional.mse_loss(model(x), y)
            backward(loss, model=model)
            optimizer.step()
            optimizer.zero_grad()
        logs.append(comms.log)
    return logs


def eval_losses(model: Any, swap: Callable[[], AbstractContextManager]) -> list[float]:
    """Loss on a fixed batch computed by the model's forward: on θ, inside the swap (φ), on θ again.

    A forward on θ first: engines that keep gathered weights after a no-grad forward (FSDP2's root) must
    not evaluate "φ" on those stale copies.
    """
    x, y = rank_batch(999, PER_RANK, 0, 1)  # the same batch on every rank
    with torch.no_grad():
        losses = [float(nn.functional.mse_loss(model(x), y))]
        with swap():
            losses.append(float(nn.functional.mse_loss(model(x), y)))
        losses.append(float(nn.functional.mse_loss(model(x), y)))
    return losses


def slow_and_restore(model: Any, swap: Callable[[], AbstractContextManager]) -> dict[str, Any]:
    """Full φ read inside the swap, and whether θ came back bit for bit (this rank's pieces)."""
    before = local_params(model)
    with swap():
        phi = full_params(model)
    after = local_params(model)
    return {"phi": phi, "restored": all(torch.equal(a, b) for a, b in zip(before, after))}


# ------------------------------------------------------------------ Fabric
def ds_config(case: str) -> dict[str, Any]:
    """ZeRO stage of ``case``; no gradient clipping (DeepSpeed would clip at 1.0, the reference does not)."""
    zero: dict[str, Any] = {"stage": STAGES[case]}
    if case == "zero3":
        zero["stage3_param_persistence_threshold"] = 0  # every parameter partitioned, even the tiny ones
    return {"zero_optimization": zero, "train_micro_batch_size_per_gpu": PER_RANK, "gradient_clipping": 0.0}


def make_fabric(case: str, tmp: str) -> Any:
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import ModelParallelStrategy

    from lookahead_dist.lightning.fabric import CPUFabricDeepSpeedStrategy, CPUFabricFSDPStrategy

    strategy: Any
    if case == "ddp":
        strategy = "ddp"
    elif case in STAGES:
        config = ds_config(case)
        strategy = CPUFabricDeepSpeedStrategy(config=config)
    elif case == "fsdp1":
        strategy = CPUFabricFSDPStrategy()
    elif case == "fsdp2":
        strategy = ModelParallelStrategy(parallelize_fn=shard, data_parallel_size=2, tensor_parallel_size=1)
    else:
        raise ValueError(case)
    fabric = Fabric(accelerator="cpu", devices=dist.get_world_size(), strategy=strategy)
    fabric.launch()
    return fabric


def shard(module: nn.Module, mesh: Any) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    fully_shard(module[0], mesh=mesh["data_parallel"])
    fully_shard(module, mesh=mesh["data_parallel"])
    return module


def fabric_build(fabric: Any, case: str, lookahead: bool, section: bool) -> tuple[Any, Any]:
    from lookahead_dist.lightning.fabric import setup

    strategy = fabric.strategy
    if case in STAGES:
        config = strategy.config
        config.pop("lookahead", None)
        if lookahead and section:
            config["lookahead"] = {"k": K, "alpha": ALPHA}  # honoured like lookahead_dist.deepspeed.initialize's
    net = make_net()
    factory = lambda params: make_inner(params, "adamw", LR)
    if not lookahead:
        if case == "fsdp2":
            model = fabric.setup_module(net)
            return model, fabric.setup_optimizers(factory(model.parameters()))
        return fabric.setup(net, factory(net.parameters()))
    options = {} if section else {"k": K, "alpha": ALPHA}
    return setup(fabric, net, factory, **options)


def fabric_case(case: str, tmp: str, section: bool = False) -> dict[str, Any]:
    from lookahead_dist.lightning.fabric import find_lookahead, use_slow_weights

    fabric = make_fabric(case, tmp)
    out: dict[str, Any] = {"strategy": type(fabric.strategy).__name__}
    model, optimizer = fabric_build(fabric, case, True, section)
    out["dtensor_params"] = all(type(p).__name__ == "DTensor" for p in model.parameters())
    logs = train_steps(model, optimizer, fabric.backward, 0, STEPS)
    out["theta"] = full_params(model)
    swap = slow_and_restore(model, slow_weights(case, optimizer))
    out.update(phi=swap["phi"], restored=swap["restored"], sync_count=find_lookahead(optimizer).sync_count)
    out["phi_layout"] = gather_per_rank(phi_layout(find_lookahead(optimizer)))
    if case == "fsdp1":  # refused by the adapter: record the message
        try:
            with use_slow_weights(optimizer):
                pass
        except RuntimeError as exc:
            out["swap_refused"] = str(exc)
    else:
        out["eval"] = eval_losses(model, lambda: use_slow_weights(optimizer))
    out["theta_after_swap"] = full_params(model)
    base_model, base_opt = fabric_build(fabric, case, False, section)
    base_logs = train_steps(base_model, base_opt, fabric.backward, 0, STEPS)
    out["base_theta"] = full_params(base_model)
    out["comms"], out["base_comms"] = gather_per_rank(logs), gather_per_rank(base_logs)
    out.update(fabric_resume(fabric, case, tmp, section, out["theta"], swap["phi"]))
    return out


def fabric_resume(fabric: Any, case: str, tmp: str, section: bool, theta: list, phi: list) -> dict[str, Any]:
    from lookahead_dist.core.keys import COUNT_KEY
    from lookahead_dist.lightning.fabric import find_lookahead

    path = Path(tmp) / f"fabric_{case}"
    model, optimizer = fabric_build(fabric, case, True, section)
    train_steps(model, optimizer, fabric.backward, 0, SAVE_AT)
    counts_saved = sorted({st[COUNT_KEY] for st in find_lookahead(optimizer).state.values() if COUNT_KEY in st})
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": SAVE_AT})
    model2, optimizer2 = fabric_build(fabric, case, True, section)
    state = {"model": model2, "optimizer": optimizer2, "step": 0}
    fabric.load(path, state)
    lookahead = find_lookahead(optimizer2)
    counts_loaded = sorted({st[COUNT_KEY] for st in lookahead.state.values() if COUNT_KEY in st})
    train_steps(model2, optimizer2, fabric.backward, state["step"], STEPS)
    resumed_phi = slow_and_restore(model2, slow_weights(case, optimizer2))["phi"]
    resumed_theta = full_params(model2)
    return {
        "step_loaded": state["step"],
        "counts_saved": counts_saved,
        "counts_loaded": counts_loaded,
        "resume_equal": all(torch.equal(a, b) for a, b in zip(resumed_theta + resumed_phi, theta + phi)),
        "resume_diff": max_diff(resumed_theta + resumed_phi, theta + phi),
    }


def slow_weights(case: str, optimizer: Any) -> Callable[[], AbstractContextManager]:
    """The adapter's swap; under FSDP1 (refused there) the core swap of the shards, read by summon_full_params."""
    from lookahead_dist.lightning.fabric import find_lookahead, use_slow_weights

    if case == "fsdp1":
        return lambda: find_lookahead(optimizer).use_slow_weights()
    return lambda: use_slow_weights(optimizer)


def fabric_refuse(tmp: str) -> dict[str, Any]:
    """ModelParallelStrategy with an optimizer built on the parameters before sharding."""
    from lookahead_dist.lightning.fabric import setup

    fabric = make_fabric("fsdp2", tmp)
    net = make_net()
    try:
        setup(fabric, net, make_inner(net.parameters(), "adamw", LR), k=K, alpha=ALPHA)
    except ValueError as exc:
        return {"error_message": str(exc)}
    return {"error_message": None}


def tensors_to_lists(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.flatten().tolist()
    if isinstance(value, dict):
        return {k: tensors_to_lists(v) for k, v in value.items()}
    if isinstance(value, list):
        return [tensors_to_lists(v) for v in value]
    return value


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--tmp", required=True)
    parser.add_argument("--cases", default="ddp,zero1,zero2,zero3,fsdp1,fsdp2,refuse")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    cases: dict[str, Callable[[], Any]] = {
        name: (lambda name=name: fabric_case(name, args.tmp, section=name == "zero2"))
        for name in ("ddp", "zero1", "zero2", "zero3", "fsdp1", "fsdp2")
    }
    cases["refuse"] = lambda: fabric_refuse(args.tmp)
    run_cases(args.cases.split(","), lambda case: tensors_to_lists(cases[case]()), args.out)


if __name__ == "__main__":
    main()
