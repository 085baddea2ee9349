"""Launched by tests/test_deepspeed.py with ``torchrun --nproc_per_node 2``: runs many DeepSpeed cases in one
process group and writes one JSON per rank.

    torchrun --nproc_per_node 2 -m tests.dist.ds_cases OUT_DIR train  CASE[,CASE...]
    torchrun --nproc_per_node 2 -m tests.dist.ds_cases OUT_DIR resume CASE[,CASE...]

(from the repository root). ``train`` runs each case with and without Lookahead and saves a mid-cycle
checkpoint; ``resume``, in fresh processes, loads that checkpoint and continues.

Per case and run it records, per step: every collective (op, element count) issued inside the engine's
forward/backward/step, the full fp32 master weights, and this rank's φ flats with their layout.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
warnings.filterwarnings("ignore")

import torch
import torch.distributed as tdist

from tests.helpers import CollectiveLog

# ---------------------------------------------------------------- collective counting (before DeepSpeed,
# which keeps references to the torch.distributed functions it calls)
COMM = CollectiveLog()
COMM.install(tdist, prefix="torch.")
COMM.install(tdist.distributed_c10d, prefix="c10d.")

import deepspeed
import deepspeed.comm as dscomm
from deepspeed.utils import safe_get_full_fp32_param

COMM.install(dscomm, prefix="ds.")

import lookahead_dist.deepspeed as lads
from lookahead_dist.core.optim import COUNT_KEY, SLOW_KEY
from tests.dist.ds_common import (
    CASES,
    GAS,
    MICRO,
    SAVE_AT,
    STEPS,
    eval_batch,
    loss_fn,
    lr_lambda,
    make_model,
    make_optimizer,
    merge,
    micro_batch,
    param_groups,
)


def build(case: dict, with_lookahead: bool) -> tuple[Any, Any]:
    config = json.loads((REPO / "configs" / case["config"]).read_text())
    config = merge(config, case.get("override", {}))
    if not with_lookahead:
        config.pop("lookahead")
    # "auto" batch sizes resolved by this harness.
    config.update(train_micro_batch_size_per_gpu=MICRO, gradient_accumulation_steps=GAS, steps_per_print=10**9)
    model = make_model(case["model"])
    optimizer = make_optimizer(case["optim"], param_groups(model))
    scheduler = (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)) if case["sched"] else None
    engine, _, _, _ = lads.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    return engine, model


def counted(fn: Any) -> list[tuple[str, int]]:
    return COMM.record(fn)


def _unfused_masters(engine: Any) -> dict[Any, Any]:
    """Stage 0 + bf16/fp16 (FP16_UnfusedOptimizer): bit16 parameter -> its fp32 master copy."""
    opt = engine.optimizer
    if type(opt).__name__ != "FP16_UnfusedOptimizer":
        return {}
    return {p: m for g16, g32 in zip(opt.fp16_groups, opt.fp32_groups) for p, m in zip(g16, g32)}


def masters(engine: Any) -> dict[str, list[float]]:
    out = {}
    unfused = _unfused_masters(engine)
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)
        if full is None:  # stage 0: the fp32 copies of FP16_UnfusedOptimizer, or the fp32 weights
            full = unfused.get(p, p)
        out[name] = full.detach().float().flatten().tolist()
    return out


def phi_record(engine: Any) -> dict[str, Any]:
    """This rank's φ flats and, for each, which slice of which parameter it holds."""
    la = lads.find_lookahead(engine)
    opt = engine.optimizer
    rank = dscomm.get_rank()
    names = {p: n for n, p in engine.module.named_parameters()}
    pieces: list[dict] = []
    if hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3: each param is split into WORLD chunks
        for sg, master in enumerate(opt.fp32_partitioned_groups_flat):
            flat = opt.fp16_partitioned_groups_flat[sg]
            layout = []
            for p in opt.fp16_groups[sg]:
                offset = (p.ds_tensor.data_ptr() - flat.data_ptr()) // flat.element_size()
                pn = p.partition_numel()
                layout.append({"name": names[p], "flat_offset": offset, "param_start": rank * pn, "len": pn})
            pieces.append({"master": master, "layout": layout})
    else:
        if hasattr(opt, "single_partition_of_fp32_groups"):
            flats, parts, masters_ = opt.bit16_groups_flat, opt.parallel_partitioned_bit16_groups, opt.single_partition_of_fp32_groups
            groups = opt.bit16_groups
        elif hasattr(opt, "fp32_groups_flat_partition"):
            flats, parts, masters_ = opt.bf16_groups_flat, opt.bf16_partitioned_groups, opt.fp32_groups_flat_partition
            groups = opt.bf16_groups
        else:  # stage 0: one tensor per parameter (its fp32 master under bf16)
            unfused = _unfused_masters(engine)
            for p in engine.module.parameters():
                pieces.append({"master": unfused.get(p, p), "layout": [{"name": names[p], "flat_offset": 0, "param_start": 0,
                                                        "len": p.numel()}]})
            flats = []
        for i, flat in enumerate(flats):
            part_start = (parts[i][rank].data_ptr() - flat.data_ptr()) // flat.element_size()
            part_len = parts[i][rank].numel()
            layout = []
            for p in groups[i]:
                start = (p.data_ptr() - flat.data_ptr()) // flat.element_size()
                lo, hi = max(start, part_start), min(start + p.numel(), part_start + part_len)
                if lo < hi:
                    layout.append({"name": names[p], "flat_offset": lo - part_start, "param_start": lo - start,
                                   "len": hi - lo})
            pieces.append({"master": masters_[i], "layout": layout, "flat_numel": flat.numel()})
    out = []
    for piece in pieces:
        master = piece.pop("master")
        state = la.state.get(master, {}) if la is not None else {}
        slow = state.get(SLOW_KEY)
        piece.update(
            numel=master.numel(),
            slow=None if slow is None else slow.detach().float().flatten().tolist(),
            slow_numel=None if slow is None else slow.numel(),
            slow_bytes=None if slow is None else slow.numel() * slow.element_size(),
            slow_is_master=slow is master if slow is not None else None,
            count=state.get(COUNT_KEY),
        )
        out.append(piece)
    return {"pieces": out}


def train_step(engine: Any, case: dict, step: int, rank: int) -> None:
    dtype = next(engine.module.parameters()).dtype
    for micro in range(GAS):
        x, y = micro_batch(case["model"], step, rank, micro)
        loss = loss_fn(case["model"], engine(x.to(dtype)), y)
        if case["nan"] == step and micro == 0:
            loss = loss * float("nan")
        engine.backward(loss)
        engine.step()


def eval_out(engine: Any, case: dict) -> list[float]:
    dtype = next(engine.module.parameters()).dtype
    with torch.no_grad():
        return engine(eval_batch(case["model"]).to(dtype)).float().flatten().tolist()


def run(name: str, with_lookahead: bool, phase: str, out_dir: Path) -> dict[str, Any]:
    case = CASES[name]
    rank = dscomm.get_rank()
    engine, _ = build(case, with_lookahead)
    ckpt = out_dir / (f"ckpt_{name}" if with_lookahead else f"ckpt_{name}_plain")
    first = 1
    rec: dict[str, Any] = {"steps": {}, "holder": type(engine.optimizer).__name__}
    la = lads.find_lookahead(engine)
    if la is not None:
        rec.update(k=la.k, alpha=la.alpha, inner=type(la.optimizer).__name__)
    if phase == "resume":
        engine.load_checkpoint(str(ckpt), tag="mid")
        first = SAVE_AT + 1
    for step in range(first, STEPS + 1):
        comm = counted(lambda step=step: train_step(engine, case, step, rank))
        rec["steps"][step] = {"comm": comm, "masters": masters(engine),
                              "phi": phi_record(engine) if with_lookahead else None,
                              "lr": [g["lr"] for g in engine.optimizer.param_groups]}
        if phase == "train" and step == SAVE_AT:
            engine.save_checkpoint(str(ckpt), tag="mid")
    rec["skipped_steps"] = int(getattr(engine, "skipped_steps", 0))
    if with_lookahead:
        rec["sync_count"] = la.sync_count
        fast_out: list[list[float]] = []
        rec["comm_eval_fast"] = counted(lambda: fast_out.append(eval_out(engine, case)))
        before = fast_out[0]
        masters_before = masters(engine)
        cm = lads.use_slow_weights(engine)
        rec["comm_enter"] = counted(cm.__enter__)
        slow_out: list[list[float]] = []
        rec["comm_eval_slow"] = counted(lambda: slow_out.append(eval_out(engine, case)))
        rec["comm_exit"] = counted(lambda: cm.__exit__(None, None, None))
        rec["eval_fast"], rec["eval_slow"], rec["eval_after"] = before, slow_out[0], eval_out(engine, case)
        rec["masters_restored"] = masters(engine) == masters_before
    engine.destroy() if hasattr(engine, "destroy") else None
    return rec


def main() -> None:
    out_dir, phase, names = Path(sys.argv[1]), sys.argv[2], sys.argv[3].split(",")
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dscomm.get_rank()
    results: dict[str, Any] = {}
    for name in names:
        try:
            runs = [True, False]
            results[name] = {("lookahead" if la else "plain"): run(name, la, phase, out_dir) for la in runs}
        except Exception as exc:  # noqa: BLE001 - recorded per case so one failure does not hide the others
            import traceback

            results[name] = {"error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"}
    (out_dir / f"{phase}_rank{rank}.json").write_text(json.dumps(results))
    dscomm.barrier()


if __name__ == "__main__":
    main()
