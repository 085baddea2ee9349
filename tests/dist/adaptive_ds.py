"""alpha="adaptive" under DeepSpeed ZeRO-2 / ZeRO-3 (CPU, gloo). From the repository root:

    torchrun --nproc_per_node 2 -m tests.dist.adaptive_ds --out results.json


For each stage, three engines train the same steps: no Lookahead, fixed α, adaptive α. Every
torch.distributed collective is logged per step (name, element count). Results (rank 0 writes JSON):

* ``alphas``: the α of every (sync, param group) on each rank under ZeRO, and ``ref_alphas`` from a
  single-process ``Lookahead(alpha="adaptive")`` on the full global batches in this process, each with the
  scale of its sum's rounding; ``weights_vs_ref``: max |θ_ZeRO − θ_reference| after the last step;
* ``extra_fixed`` / ``extra_adaptive``: per step, collectives of the fixed / adaptive run minus those of the
  run without Lookahead (as multisets), and the reverse (``missing_*``);
* ``subgroup_error``: the message of ``check_zero3_sub_groups`` on a ZeRO-3 engine whose sub_group_size
  splits the param groups.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import nn

from tests.helpers import CollectiveLog

# Every torch.distributed collective, logged while counting; installed before DeepSpeed is imported, since it
# keeps references to some of these functions.
COMM = CollectiveLog()
COMM.install(tdist)

from lookahead_dist import Lookahead
from lookahead_dist.core import adaptive
from tests.tolerances import scale_of_h

# Per sync and group: (group lr, α applied, global h = Σ d·d_prev − carry, this rank's partial h before the
# reduce, Σ(|d| + |d_prev|), Σ|d·d_prev| and the number of terms over the elements with history). The last
# three are the scale of h's rounding (tests/tolerances.py), taken from the single-process reference only.
ALPHA_LOG: list[tuple[float, float, float, float, float, float, int]] = []
_original_adaptive_alpha = adaptive.adaptive_alpha


def _recording_adaptive_alpha(params, state, group, *, reduce_fn=None, **kwargs):
    # Records the sums without adding a collective: the global ones are read after the reduce_fn the
    # engine passed (or computed locally when there is none, as in the single-process reference).
    params = list(params)
    sums: list[torch.Tensor] = []
    if reduce_fn is None:
        sums += [adaptive.line_sums(params, state, group)] * 2
        scale = scale_of_h(params, state)
        recording_reduce = None
    else:
        scale = (0.0, 0.0, 0)

        def recording_reduce(t: torch.Tensor) -> None:
            partial = t.clone()
            reduce_fn(t)
            sums.extend([t.clone(), partial])

    alpha = _original_adaptive_alpha(params, state, group, reduce_fn=recording_reduce, **kwargs)
    ALPHA_LOG.append((float(group["lr"]), alpha, float(sums[0][0]), float(sums[1][0]), *scale))
    return alpha


adaptive.adaptive_alpha = _recording_adaptive_alpha  # the core imports it from the module at each sync

K, STEPS, GLOBAL_BATCH = 3, 12, 8
LRS = (0.3, 0.1)  # weights, biases: distinct, so the α log identifies the group
BOUNDS = (0.05, 1.0)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(5, 7)  # odd sizes: ZeRO pads the partitions
        self.head = nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))


def make_model() -> Net:
    torch.manual_seed(0)
    return Net()


def make_inner(model: nn.Module) -> torch.optim.Optimizer:
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    groups = [{"params": weights, "lr": LRS[0]}, {"params": biases, "lr": LRS[1]}]
    return torch.optim.AdamW(groups, betas=(0.9, 0.99), weight_decay=0.01)


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(500 + step)
    return torch.randn(GLOBAL_BATCH, 5, generator=gen), torch.randn(GLOBAL_BATCH, 3, generator=gen)


def reference_run() -> tuple[list, dict[str, list[float]]]:
    """The α log of one process on the full global batches, and its final weights (the last step syncs: θ = φ)."""
    model = make_model()
    opt = Lookahead(make_inner(model), k=K, alpha="adaptive", alpha_bounds=BOUNDS)
    start = len(ALPHA_LOG)
    for step in range(STEPS):
        x, y = global_batch(step)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    out = ALPHA_LOG[start:]
    del ALPHA_LOG[start:]
    return out, {n: p.detach().flatten().tolist() for n, p in model.named_parameters()}


def ds_config(stage: int, lookahead: dict | None, world: int, sub_group_size: int | None = None) -> dict:
    zero: dict = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0
    if sub_group_size is not None:
        zero["sub_group_size"] = sub_group_size
    config = {
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
    }
    if lookahead is not None:
        config["lookahead"] = lookahead
    return config


def train(stage: int, lookahead: dict | None, rank: int, world: int) -> tuple[list[Counter], list, dict]:
    from deepspeed.utils import safe_get_full_fp32_param

    from lookahead_dist.deepspeed import initialize

    model = make_model()
    config = ds_config(stage, lookahead, world)
    engine, *_ = initialize(model=model, optimizer=make_inner(model), config=config)
    per_rank = GLOBAL_BATCH // world
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    per_step: list[Counter] = []
    start = len(ALPHA_LOG)
    for step in range(STEPS):
        x, y = global_batch(step)
        with COMM.counting() as calls:
            engine.backward(F.mse_loss(engine(x[rows]), y[rows]))
            engine.step()
        per_step.append(Counter(calls))
    alphas = ALPHA_LOG[start:]
    del ALPHA_LOG[start:]
    # After the counted steps: gathering the fp32 masters is a collective of its own (under ZeRO-3).
    masters = {n: safe_get_full_fp32_param(p).flatten().tolist() for n, p in engine.module.named_parameters()}
    engine.destroy()
    return per_step, alphas, masters


def diff(a: list[Counter], b: list[Counter]) -> list[list]:
    return [sorted([list(key), n] for key, n in (x - y).items()) for x, y in zip(a, b)]


def run_stage(stage: int, rank: int, world: int) -> dict:
    bare, _, _ = train(stage, None, rank, world)
    fixed, _, _ = train(stage, {"k": K, "alpha": 0.5}, rank, world)
    adaptive_cfg = {"k": K, "alpha": "adaptive", "alpha_bounds": list(BOUNDS)}
    adapt, alphas, masters = train(stage, adaptive_cfg, rank, world)
    gathered: list = [None] * world
    tdist.all_gather_object(gathered, alphas)
    ref_alphas, ref_weights = reference_run()
    return {
        "alphas": gathered,
        "ref_alphas": ref_alphas,
        "weights_vs_ref": max(max(abs(a - b) for a, b in zip(masters[n], w)) for n, w in ref_weights.items()),
        "extra_fixed": diff(fixed, bare),
        "missing_fixed": diff(bare, fixed),
        "extra_adaptive": diff(adapt, bare),
        "missing_adaptive": diff(bare, adapt),
        "bare_total": sum(sum(c.values()) for c in bare),
    }


def run_subgroups(rank: int, world: int) -> dict:
    import deepspeed

    from lookahead_dist.deepspeed.holders import check_zero3_sub_groups

    model = make_model()
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=make_inner(model), config=ds_config(3, None, world, sub_group_size=4)
    )
    try:
        check_zero3_sub_groups(engine.optimizer)
        message = None
    except ValueError as exc:
        message = str(exc)
    pieces = Counter(engine.optimizer.sub_group_to_group_id.values())
    engine.destroy()
    return {"subgroup_error": message, "pieces": dict(pieces)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    results: dict = {}
    cases = {"zero2": lambda: run_stage(2, rank, world), "zero3": lambda: run_stage(3, rank, world),
             "zero3_subgroups": lambda: run_subgroups(rank, world)}
    for name, case in cases.items():
        try:
            results[name] = case()
        except Exception:  # noqa: BLE001 - recorded per case, so one failure does not hide the others
            results[name] = {"error": traceback.format_exc()}
            print(results[name]["error"], file=sys.stderr, flush=True)
    if rank == 0:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
