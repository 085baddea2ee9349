"""Launched by tests/test_outer.py as two torchrun invocations (``--nnodes 2 --node_rank 0|1``), one per
simulated node; runs the cases of tests/dist/outer_common.py in one process group, one JSON per rank.

    outer_cases.py OUT_DIR train  CASE[,CASE...]   # saves a mid-cycle checkpoint where a case has save_at
    outer_cases.py OUT_DIR resume CASE[,CASE...]   # fresh processes: load it (shared folder), continue

Per case and step it records: every collective issued inside forward/backward/step with its group's global
ranks, element count and dtype; the full fp32 master weights of this rank's node; whether a sync happened.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

warnings.filterwarnings("ignore")

import torch
import torch.distributed as tdist

# ---------------------------------------------------------------- collective log (before DeepSpeed imports)
LOG: list[dict[str, Any]] = []
ACTIVE = [False]
_OPS = (
    "all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_into_tensor", "_all_gather_base",
    "all_gather_coalesced", "all_gather_object", "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base",
    "broadcast", "broadcast_object_list", "reduce", "gather", "scatter", "all_to_all", "all_to_all_single",
    "barrier", "send", "recv", "isend", "irecv", "batch_isend_irecv", "monitored_barrier",
)  # fmt: skip


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _wrap(module: Any, name: str) -> None:
    fn = getattr(module, name, None)
    if fn is None or getattr(fn, "_outer_logged", False):
        return
    sig = inspect.signature(fn)

    def logged(*args: Any, **kwargs: Any) -> Any:
        if ACTIVE[0]:
            bound = sig.bind(*args, **kwargs).arguments
            group = bound.get("group")
            ranks = tdist.get_process_group_ranks(group) if group is not None else list(range(tdist.get_world_size()))
            ts = [t for k, v in bound.items() if k != "group" for t in _tensors(v)]
            # The payload: the input tensor (the last tensor argument for *_into_tensor / reduce_scatter).
            payload = ts[-1] if ts else None
            LOG.append({"op": name, "ranks": sorted(ranks), "numel": sum(t.numel() for t in ts),
                        "payload": 0 if payload is None else payload.numel(),
                        "bytes": 0 if payload is None else payload.numel() * payload.element_size(),
                        "dtype": None if payload is None else str(payload.dtype)})
        return fn(*args, **kwargs)

    logged._outer_logged = True  # type: ignore[attr-defined]
    setattr(module, name, logged)


for _op in _OPS:
    _wrap(tdist, _op)
    _wrap(tdist.distributed_c10d, _op)

import deepspeed
from deepspeed.utils import groups as ds_groups
from deepspeed.utils import safe_get_full_fp32_param

import lookahead_dist.deepspeed as lads
from lookahead_dist.deepspeed.holders import holder_for
from tests.dist.outer_common import (
    CASES,
    GAS,
    MICRO,
    loss_fn,
    make_model,
    make_optimizer,
    micro_batch,
    param_groups,
)


def ds_config(case: dict[str, Any], world: int) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": case["stage"]}
    if case["stage"] == 3:
        zero.update(overlap_comm=False, contiguous_gradients=True)
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": GAS,
        "zero_optimization": zero,
        "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "lookahead": {"k": case["k"], "alpha": case["alpha"]},
    }
    if case["outer"] is not None:
        outer = dict(case["outer"])
        if outer.get("local_world_size") == "world":
            outer["local_world_size"] = world
        cfg["lookahead"]["outer"] = outer
    return cfg


def partition_sizes(engine: Any) -> list[int]:
    holder = holder_for(engine)
    return [int(t.numel()) for t in holder.fp32_partitions()]


def run_case(name: str, phase: str, out: Path) -> dict[str, Any]:
    case = CASES[name]
    world, rank = tdist.get_world_size(), tdist.get_rank()
    ds_groups.mpu = None  # DeepSpeed keeps the last engine's mpu in a module global
    model = make_model()
    optimizer = make_optimizer(case["optim"], param_groups(model, case["optim"]))
    engine, *_ = lads.initialize(model=model, optimizer=optimizer, config=ds_config(case, world))
    lookahead = lads.find_lookahead(engine)
    assert lookahead is not None
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    ckpt = out / f"ckpt_{name}"
    start = 0
    if phase == "resume":
        engine.load_checkpoint(str(ckpt))  # tag from each node's own "latest"
        start = case["save_at"]
    steps: list[dict[str, Any]] = []
    for step in range(start, case["steps"]):
        syncs = lookahead.sync_count
        del LOG[:]
        ACTIVE[0] = True
        for micro in range(GAS):
            x, y = micro_batch(step, world, rank, micro)
            loss = loss_fn(engine(x), y)
            engine.backward(loss)
            engine.step()
        ACTIVE[0] = False
        comm = list(LOG)
        full = {n: safe_get_full_fp32_param(params[n]).detach().double().flatten().tolist() for n in names}
        steps.append({"step": step + 1, "synced": lookahead.sync_count > syncs, "comm": comm, "params": full})
        if phase == "train" and case.get("save_at") == step + 1:
            engine.save_checkpoint(str(ckpt), tag="mid")
    tdist.barrier()
    files = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file()) if ckpt.exists() else []
    topo = getattr(lookahead, "topology", None)
    return {
        "steps": steps,
        "partitions": partition_sizes(engine),
        "dp_ranks": sorted(tdist.get_process_group_ranks(engine.data_parallel_group)),
        "node": None if topo is None else topo.node,
        "local_world_size": None if topo is None else topo.local_world_size,
        "outer_bytes": getattr(lookahead, "outer_bytes", 0),
        "ckpt_files": files,
        "lookahead_type": type(lookahead).__name__,
    }


def main() -> None:
    out, phase, names = Path(sys.argv[1]), sys.argv[2], sys.argv[3].split(",")
    deepspeed.init_distributed(dist_backend="gloo")
    result: dict[str, Any] = {"world": tdist.get_world_size(), "local_world_size": int(os.environ["LOCAL_WORLD_SIZE"])}
    for name in names:
        try:
            result[name] = run_case(name, phase, out)
        except Exception:  # noqa: BLE001 - recorded per case so one failure does not hide the others
            result[name] = {"error": traceback.format_exc()}
        tdist.barrier()
    (out / f"{phase}_rank{tdist.get_rank()}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
