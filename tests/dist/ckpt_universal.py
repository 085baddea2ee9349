"""Run under torchrun: Lookahead + DeepSpeed ZeRO checkpoints across world sizes (CPU, gloo). From the repository
root: ``torchrun --nproc_per_node N -m tests.dist.ckpt_universal --phase save|resume --workdir DIR --out FILE``.

``--phase save`` (2 ranks): train SAVE_AT steps per case, save a regular checkpoint, then rank 0 converts it
with ``lookahead_dist.deepspeed.checkpoint.to_universal`` and consolidates φ (ours) and θ (DeepSpeed's zero_to_fp32).
``--phase resume`` (any world size): load the universal checkpoint, train to TOTAL steps on the same global
batches, save, and consolidate φ and θ again.
Every number is compared with tests/reference.py's ReferenceLookahead run in this process on the full
global batches; results (max abs differences) go to ``--out`` as JSON, one entry per case.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tests.reference import ReferenceLookahead

GLOBAL_BATCH = 4
SAVE_AT = 7  # mid-cycle for K=3: the cycle position saved is 1
TOTAL = 11  # crosses the syncs at steps 9 (after resume); ends mid-cycle again
K, ALPHA = 3, 0.5
LRS = (0.05, 0.02)  # two param groups: weights, biases

CASES = {
    "z1": {"stage": 1, "pullback": "none"},
    "z2_pullback": {"stage": 2, "pullback": "pullback"},
    "z3_pullback_subgroups": {"stage": 3, "pullback": "pullback", "sub_group_size": 16},
}


class Net(nn.Module):
    # Odd sizes, so ZeRO pads the flat partitions at world sizes 2 and 4.
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))


def make_model() -> Net:
    torch.manual_seed(0)
    return Net()


def param_groups(model: nn.Module) -> list[dict]:
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [{"params": weights, "lr": LRS[0]}, {"params": biases, "lr": LRS[1]}]


def make_inner(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(param_groups(model), eps=1e-6)


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(GLOBAL_BATCH, 6, generator=gen), torch.randn(GLOBAL_BATCH, 3, generator=gen)


def reference(pullback: str) -> dict[int, dict[str, dict[str, torch.Tensor]]]:
    """θ and φ by parameter name after SAVE_AT and TOTAL steps of the single-process reference."""
    model = make_model()
    inner = make_inner(model)
    ref = ReferenceLookahead(inner, K, ALPHA, pullback=pullback)
    snaps = {}
    for step in range(TOTAL):
        x, y = global_batch(step)
        inner.zero_grad(set_to_none=True)
        F.mse_loss(model(x), y).backward()
        ref.step()
        if step + 1 in (SAVE_AT, TOTAL):
            snaps[step + 1] = {
                "fast": {n: p.detach().clone() for n, p in model.named_parameters()},
                "slow": {n: ref.slow[p].clone() for n, p in model.named_parameters()},
            }
    return snaps


def ds_config(case: dict, world: int, load_universal: bool) -> dict:
    zero = {"stage": case["stage"]}
    if "sub_group_size" in case:
        zero["sub_group_size"] = case["sub_group_size"]
    return {
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "checkpoint": {"load_universal": load_universal},
        "gradient_clipping": 0.0,  # DeepSpeed clips at 1.0 by default; the reference does not clip
        "steps_per_print": 10**9,
    }


def train(engine, start: int, stop: int, rank: int, world: int) -> None:
    per_rank = GLOBAL_BATCH // world
    for step in range(start, stop):
        x, y = global_batch(step)
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        loss = F.mse_loss(engine(x[rows]), y[rows])
        engine.backward(loss)
        engine.step()


def max_diff(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    missing = set(want) - set(got)
    if missing:
        raise KeyError(f"consolidated state lacks {sorted(missing)}")
    return max((got[n].float() - want[n].float()).abs().max().item() for n in want)


def consolidated(tag_dir: Path) -> tuple[dict, dict]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from lookahead_dist.deepspeed.checkpoint import consolidated_slow_state_dict

    fast = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    slow = consolidated_slow_state_dict(tag_dir.parent, tag=tag_dir.name)
    return fast, slow


def run_case(name: str, case: dict, phase: str, workdir: Path, rank: int, world: int) -> dict:
    import deepspeed
    import deepspeed.comm as dist

    from lookahead_dist.deepspeed.checkpoint import to_universal
    from lookahead_dist.deepspeed import install

    ref = reference(case["pullback"])
    model = make_model()
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=make_inner(model), config=ds_config(case, world, phase == "resume")
    )
    lookahead = install(engine, k=K, alpha=ALPHA, pullback=case["pullback"])
    save_dir = workdir / name
    result: dict = {"world": world}
    if phase == "save":
        train(engine, 0, SAVE_AT, rank, world)
        engine.save_checkpoint(str(save_dir), tag=f"step{SAVE_AT}")
        dist.barrier()
        if rank == 0:
            fast, slow = consolidated(save_dir / f"step{SAVE_AT}")
            result["fast_vs_ref"] = max_diff(fast, ref[SAVE_AT]["fast"])
            result["slow_vs_ref"] = max_diff(slow, ref[SAVE_AT]["slow"])
            # φ ≠ θ mid-cycle: shows the two comparisons are not the same check.
            result["slow_vs_ref_fast"] = max_diff(slow, ref[SAVE_AT]["fast"])
            out = to_universal(save_dir, tag=f"step{SAVE_AT}")
            result["universal_files"] = sorted(p.name for p in (out / "zero" / "body.weight").iterdir())
            result["meta"] = json.loads((out / "lookahead_universal.json").read_text())
        dist.barrier()
        return result

    # install() makes the bare engine.load_checkpoint complete universal loads (φ, counters).
    engine.load_checkpoint(str(save_dir), tag=f"step{SAVE_AT}_universal")
    counts = sorted({st.get("lookahead_count") for st in engine.optimizer.optimizer.state.values()})
    result["counts_after_load"] = counts
    train(engine, SAVE_AT, TOTAL, rank, world)
    result["sync_count"] = lookahead.sync_count
    tag = f"resumed_w{world}_step{TOTAL}"
    engine.save_checkpoint(str(save_dir), tag=tag)
    dist.barrier()
    if rank == 0:
        fast, slow = consolidated(save_dir / tag)
        result["fast_vs_ref"] = max_diff(fast, ref[TOTAL]["fast"])
        result["slow_vs_ref"] = max_diff(slow, ref[TOTAL]["slow"])
        result["slow_vs_ref_fast"] = max_diff(slow, ref[TOTAL]["fast"])
    dist.barrier()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", choices=["save", "resume"], required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args()

    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    results = {}
    for name in args.cases.split(","):
        try:
            results[name] = run_case(name, CASES[name], args.phase, args.workdir, rank, world)
        except Exception:  # noqa: BLE001 -- recorded per case, so one failure does not hide the others
            results[name] = {"error": traceback.format_exc()}
            print(results[name]["error"], file=sys.stderr, flush=True)
    if rank == 0:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
