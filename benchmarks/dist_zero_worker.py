"""One rank of ``benchmarks.bench_zero``, launched from the repository root as
``torchrun --nproc_per_node 2 -m benchmarks.dist_zero_worker --out PREFIX``.

For each ZeRO stage it builds two engines from identical models (plain AdamW, and AdamW with Lookahead installed
by ``lookahead_dist.deepspeed.install``) and records on this rank:

* optimizer-state bytes per state key (``exp_avg``, ``exp_avg_sq``, ``lookahead_slow``...) and the fp32
  partition the inner optimizer steps;
* every collective issued during forward/backward/step of each counted step: (op, bytes), where bytes is the
  larger of the call's output and input buffers;
* step time, plain and Lookahead blocks alternating, repeated.

Writes ``<out>.rank<r>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")
warnings.filterwarnings("ignore")

import torch
import torch.distributed as tdist
from torch import Tensor, nn

# ------------------------------------------------- collective counting, installed before DeepSpeed is imported
COLLECTIVES = (
    "all_reduce",
    "all_reduce_coalesced",
    "all_gather",
    "all_gather_into_tensor",
    "_all_gather_base",
    "all_gather_coalesced",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "_reduce_scatter_base",
    "broadcast",
    "reduce",
    "all_to_all",
    "all_to_all_single",
    "gather",
    "scatter",
    "all_gather_object",
    "broadcast_object_list",
    "barrier",
    "send",
    "recv",
    "isend",
    "irecv",
    "batch_isend_irecv",
)
calls: list[tuple[str, int]] = []
counting = [False]


def buffer_bytes(x: Any) -> int:
    if isinstance(x, Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(buffer_bytes(v) for v in x)
    return 0


def counting_wrapper(name: str, fn: Any) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        # Only the outermost call counts: torch.distributed functions may call each other.
        if counting[0]:
            counting[0] = False
            try:
                calls.append((name, max([buffer_bytes(a) for a in (*args, *kwargs.values())] or [0])))
                return fn(*args, **kwargs)
            finally:
                counting[0] = True
        return fn(*args, **kwargs)

    wrapper.counted = True  # type: ignore[attr-defined]
    return wrapper


for module in (tdist, tdist.distributed_c10d):
    for op in COLLECTIVES:
        fn = getattr(module, op, None)
        if fn is not None and not getattr(fn, "counted", False):
            setattr(module, op, counting_wrapper(op, fn))

import deepspeed
import deepspeed.comm as dscomm

from lookahead_dist.core.keys import SLOW_KEY
from lookahead_dist.deepspeed import install


class Block(nn.Module):
    """Pre-LayerNorm residual MLP block, the feed-forward half of a Transformer layer."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.down(nn.functional.gelu(self.up(self.norm(x))))


def make_model(dim: int, layers: int) -> nn.Module:
    torch.manual_seed(0)
    # The head's odd width makes P odd, so ZeRO has to pad the partitions (shows up as φ padding).
    return nn.Sequential(*[Block(dim) for _ in range(layers)], nn.LayerNorm(dim), nn.Linear(dim, dim + 3))


def ds_config(stage: int, micro_batch: int, bf16: bool) -> dict:
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage, "overlap_comm": False, "contiguous_gradients": True},
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if bf16:
        config["bf16"] = {"enabled": True}
    return config


def build(stage: int, args: argparse.Namespace, with_lookahead: bool) -> Any:
    model = make_model(args.dim, args.layers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config(stage, args.micro, args.bf16)
    )
    if with_lookahead:
        install(engine, k=args.k, alpha=0.5)
    return engine


def train_step(engine: Any, step: int, args: argparse.Namespace) -> None:
    gen = torch.Generator().manual_seed(step * 100 + dscomm.get_rank())
    x = torch.randn(args.micro, args.seq, args.dim, generator=gen)
    y = torch.randn(args.micro, args.seq, args.dim + 3, generator=gen)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    loss = nn.functional.mse_loss(engine(x.to(dtype)).float(), y)
    engine.backward(loss)
    engine.step()


def state_bytes(engine: Any) -> dict[str, int]:
    """Bytes of each optimizer-state key on this rank, plus the fp32 partition(s) the inner optimizer steps."""
    inner = engine.optimizer.optimizer
    out: dict[str, int] = {}
    for st in inner.state.values():
        for key, value in st.items():
            if isinstance(value, Tensor):
                out[key] = out.get(key, 0) + buffer_bytes(value)
    holder = engine.optimizer
    if hasattr(holder, "fp32_partitioned_groups_flat"):  # ZeRO-3
        out["fp32_partition"] = buffer_bytes(list(holder.fp32_partitioned_groups_flat))
    elif hasattr(holder, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        out["fp32_partition"] = buffer_bytes(list(holder.single_partition_of_fp32_groups))
    return out


def counted_steps(
    engine: Any, first_step: int, n: int, args: argparse.Namespace
) -> list[list[tuple[str, int]]]:
    per_step = []
    for step in range(first_step, first_step + n):
        calls.clear()
        counting[0] = True
        try:
            train_step(engine, step, args)
        finally:
            counting[0] = False
        per_step.append(list(calls))
    return per_step


def timed_block(engine: Any, first_step: int, n: int, args: argparse.Namespace) -> float:
    dscomm.barrier()
    start = time.perf_counter()
    for step in range(first_step, first_step + n):
        train_step(engine, step, args)
    dscomm.barrier()
    return (time.perf_counter() - start) / n


def run_stage(stage: int, args: argparse.Namespace) -> dict:
    engines = {"plain": build(stage, args, False), "lookahead": build(stage, args, True)}
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in engines["plain"].module.parameters())
    record: dict[str, Any] = {"stage": stage, "n_params": n_params}
    for name, engine in engines.items():  # warm-up: optimizer state, φ, first sync, JIT paths
        for i in range(args.k + 1):
            train_step(engine, i, args)
    step = args.k + 1
    for name, engine in engines.items():
        record[f"comm_{name}"] = counted_steps(engine, step, args.k, args)
        record[f"state_bytes_{name}"] = state_bytes(engine)
    step += args.k
    times: dict[str, list[float]] = {"plain": [], "lookahead": []}
    for r in range(args.repeats):
        for name in ["plain", "lookahead"] if r % 2 == 0 else ["lookahead", "plain"]:
            times[name].append(timed_block(engines[name], step, args.k * args.cycles, args))
        step += args.k * args.cycles
    record["step_time_s"] = times
    la = engines["lookahead"].optimizer.optimizer
    record["sync_count"] = la.sync_count
    record["tracked_slow_numel"] = sum(
        la.state[p][SLOW_KEY].numel() for p in la.state if SLOW_KEY in la.state[p]
    )
    for engine in engines.values():
        engine.destroy() if hasattr(engine, "destroy") else None
    return record


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stages", default="1,2,3")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--cycles", type=int, default=2, help="Lookahead cycles per timed block")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dscomm.get_rank(), dscomm.get_world_size()
    results: dict[str, Any] = {
        "rank": rank,
        "world_size": world,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    for stage in (int(s) for s in args.stages.split(",")):
        try:
            results[f"zero{stage}"] = run_stage(stage, args)
        except Exception as exc:  # noqa: BLE001 - one stage's failure is reported, the others still run
            import traceback

            results[f"zero{stage}"] = {"error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"}
    Path(f"{args.out}.rank{rank}.json").write_text(json.dumps(results))
    dscomm.barrier()


if __name__ == "__main__":
    main()
