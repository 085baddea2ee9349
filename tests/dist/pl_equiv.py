"""LookaheadCallback under multi-process strategies vs. the single-process reference. Launched by torchrun:

    torchrun --nproc_per_node 2 -m tests.dist.pl_equiv --out R.json --cases ddp,zero1,zero2,zero3,zero2_bf16
    torchrun --nnodes 2 --node_rank {0,1} --nproc_per_node 1 ... -m tests.dist.pl_equiv --num-nodes 2 ...

(from the repository root). Lightning sees torchrun's environment and starts no processes itself, so one launch runs every case in
sequence. Per case (k=3, α=0.5, Adam, 8 optimizer steps, validation after steps 4 and 8):
  * the fast weights θ, the slow weights φ and ‖θ − φ‖ (logged) vs. the reference;
  * the validation losses (slow weights) vs. the reference's φ at steps 4 and 8, which also shows that a
    validation run does not move the training trajectory (the reference has none);
  * resume: fit to step s, save, fit to 8 from the checkpoint -> θ and φ bit-identical to the straight run.
Rank 0 writes JSON: {case: {"theta": err, "phi": err, "val": err, "distance": err, "resume_<s>": err, ...}}.

VARIANTS (SGD with momentum, accumulate_grad_batches=2, gradient_clip_val, an LR scheduler; no validation or
resume) run the same comparison with those Trainer settings; the reference accumulates over the same global
micro-batches and clips the global gradient norm as torch.nn.utils.clip_grad_norm_ does. "zero2_bf16" runs
ZeRO-2 with precision="bf16-mixed" (see run_variant for how it is compared).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import DDPStrategy

from lookahead_dist import LookaheadCallback
from lookahead_dist.core.optim import SLOW_KEY
from lookahead_dist.lightning import CPUDeepSpeedStrategy
from tests.dist.pl_common import (
    N_ROWS,
    Capture,
    TinyModule,
    loader,
    make_net,
    reference_run,
    slow_of,
    val_loss,
)
from tests.reference import max_abs_diff

warnings.filterwarnings("ignore")
K, ALPHA, STEPS, PER_RANK, VAL_EVERY = 3, 0.5, 8, 4, 4
CLIP = 0.05  # below the gradient norm on most steps, so clipping changes the trajectory
# 64 rows = 8 global micro-batches = 4 optimizer steps per epoch: STEPS=8 spans 2 epochs for "epoch".
VARIANTS: dict[str, dict[str, Any]] = {
    "ddp_accum_clip_steplr": {"base": "ddp", "accumulate": 2, "clip": CLIP, "scheduler": "step"},
    "zero2_accum_clip_steplr": {"base": "zero2", "accumulate": 2, "clip": CLIP, "scheduler": "step"},
    "ddp_accum_clip_epochlr": {"base": "ddp", "accumulate": 2, "clip": CLIP, "scheduler": "epoch",
                               "n_rows": 64},
    "zero2_accum_clip_epochlr": {"base": "zero2", "accumulate": 2, "clip": CLIP, "scheduler": "epoch",
                                 "n_rows": 64},
    # 6 steps: the run ends on a sync (k=3), where the fp32 masters must equal φ bit for bit.
    "zero2_bf16": {"base": "zero2", "precision": "bf16-mixed", "steps": 6},
}


def make_strategy(case: str) -> Any:
    case = VARIANTS.get(case, {}).get("base", case)
    if case == "ddp":
        return DDPStrategy(process_group_backend="gloo")
    stage = int(case[4])
    config = {
        "zero_optimization": {"stage": stage, "overlap_comm": False},
        "train_micro_batch_size_per_gpu": PER_RANK,
        "zero_allow_untested_optimizer": True,
    }
    if case.endswith("_section"):  # no callback: CPUDeepSpeedStrategy installs Lookahead from the config
        config["lookahead"] = {"k": K, "alpha": ALPHA}
    if case == "zero3_nopersist":  # every parameter partitioned between steps (none kept gathered)
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return CPUDeepSpeedStrategy(config=config)


def fit(case: str, num_nodes: int, steps: int, ckpt: str | None = None, start: int = 0) -> tuple:
    rank, world = dist.get_rank(), dist.get_world_size()
    variant = VARIANTS.get(case)
    module = TinyModule(opt="sgd", scheduler=variant.get("scheduler")) if variant else TinyModule()
    extra: dict[str, Any] = {}
    if variant:
        extra = {
            "accumulate_grad_batches": variant.get("accumulate", 1),
            "gradient_clip_val": variant.get("clip"),
            "precision": variant.get("precision", "32-true"),
            "limit_val_batches": 0,
        }
    callback = LookaheadCallback(k=K, alpha=ALPHA, log_distance=True)
    callbacks = [] if case.endswith("_section") else [callback]
    logger = Capture()
    trainer = Trainer(
        accelerator="cpu",
        devices=world // num_nodes,
        num_nodes=num_nodes,
        strategy=make_strategy(case),
        max_steps=steps,
        callbacks=callbacks,
        logger=logger,
        log_every_n_steps=STEPS,
        val_check_interval=VAL_EVERY,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        **extra,
    )
    n_rows = variant.get("n_rows", N_ROWS) if variant else N_ROWS
    data = loader(PER_RANK, rank, world, start=start, n_rows=n_rows)
    trainer.fit(module, train_dataloaders=data, ckpt_path=ckpt)
    return trainer, module, callback, logger


def full_weights(trainer: Trainer, module: TinyModule, callback: LookaheadCallback, case: str) -> tuple:
    """(θ, φ) as full tensors on every rank."""
    if VARIANTS.get(case, {}).get("base", case) == "ddp":
        params = list(module.net.parameters())
        wrapper = callback.wrappers[0]
        return [p.detach().clone() for p in params], [wrapper.state[p][SLOW_KEY].clone() for p in params]
    import deepspeed

    from lookahead_dist.deepspeed import use_slow_weights

    engine = trainer.strategy.deepspeed_engine
    params = list(module.net.parameters())
    gather = deepspeed.zero.GatheredParameters(params) if case.startswith("zero3") else nullcontext()
    with gather:
        theta = [p.detach().float().clone() for p in params]
    with use_slow_weights(engine):
        with (deepspeed.zero.GatheredParameters(params) if case.startswith("zero3") else nullcontext()):
            phi = [p.detach().float().clone() for p in params]
    return theta, phi


def run_variant(case: str, num_nodes: int) -> dict[str, Any]:
    variant = VARIANTS[case]
    world, steps = dist.get_world_size(), variant.get("steps", STEPS)
    accumulate, clip, scheduler = variant.get("accumulate", 1), variant.get("clip"), variant.get("scheduler")
    t0 = time.time()
    trainer, module, callback, _ = fit(case, num_nodes, steps)
    theta, phi = full_weights(trainer, module, callback, case)
    common = {"opt": "sgd", "accumulate": accumulate, "scheduler": scheduler, "n_rows": variant.get("n_rows", N_ROWS)}
    net, ref, lrs = reference_run(steps, PER_RANK * world, K, ALPHA, clip=clip, **common)
    ref_theta, ref_phi = list(net.parameters()), slow_of(ref, net)
    out: dict[str, Any] = {
        "theta": max_abs_diff(theta, ref_theta),
        "phi": max_abs_diff(phi, ref_phi),
        "syncs_done": callback.syncs_done,
        "optimizer_steps": trainer.global_step,
        # the LR in force at each optimizer step (seen at its first micro-batch) vs. the reference's
        "lr": max(abs(a - b) for a, b in zip(module.lr_seen[::accumulate], lrs, strict=True)),
    }
    if clip is not None:  # the same run without clipping must be far off, or clipping was not exercised
        net_nc, ref_nc, _ = reference_run(steps, PER_RANK * world, K, ALPHA, **common)
        theta_gap = max_abs_diff(list(net_nc.parameters()), ref_theta)
        out["clip_effect"] = max(theta_gap, max_abs_diff(slow_of(ref_nc, net_nc), ref_phi))
    if variant.get("precision") == "bf16-mixed":
        # The model computes in bf16, so the trajectory differs from the fp32 reference by rounding (not
        # comparable at 1e-6); the test bounds it relative to how far the weights moved. Exact checks:
        # φ is kept on this rank's fp32 master partition, and at the last step (a sync) masters == φ.
        wrapper = callback.wrappers[0]
        tracked = list(wrapper.tracked_params())
        masters_vs_phi = max(float((p - wrapper.state[p][SLOW_KEY]).abs().max()) for p in tracked)
        fp32 = all(p.dtype == torch.float32 and wrapper.state[p][SLOW_KEY].dtype == torch.float32 for p in tracked)
        stats = torch.tensor([masters_vs_phi, float(not fp32), float(not tracked)], dtype=torch.float64)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        out["masters_vs_phi"], out["non_fp32_masters"], out["rank_without_shard"] = stats.tolist()
        out["model_dtype"] = str(next(module.net.parameters()).dtype)
        out["theta_vs_phi"] = max_abs_diff(theta, phi)  # bf16 model weights after the sync vs. bf16(φ)
        start = list(make_net().parameters())
        out["moved"] = max(max_abs_diff(ref_theta, start), max_abs_diff(ref_phi, start))
        # How far a nearby wrong setting (α=0.6) lands from the reference: the tolerance must stay below it.
        net_wrong, ref_wrong, _ = reference_run(steps, PER_RANK * world, K, 0.6, **common)
        out["wrong_alpha_gap"] = max_abs_diff(slow_of(ref_wrong, net_wrong), ref_phi)
    out["seconds"] = round(time.time() - t0, 1)
    return out


def run_case(case: str, num_nodes: int, offsets: list[int], tmp: str) -> dict[str, Any]:
    if case in VARIANTS:
        return run_variant(case, num_nodes)
    world = dist.get_world_size()
    t0 = time.time()
    trainer, module, callback, logger = fit(case, num_nodes, STEPS)
    theta, phi = full_weights(trainer, module, callback, case)
    net, ref, _ = reference_run(STEPS, PER_RANK * world, K, ALPHA)
    ref_theta, ref_phi = list(net.parameters()), slow_of(ref, net)
    # Validation after 4 and 8 steps, on the slow weights: rerun the reference to step 4 for φ_4.
    net4, ref4, _ = reference_run(VAL_EVERY, PER_RANK * world, K, ALPHA)
    expected_val = [val_loss(slow_of(ref4, net4)), val_loss(ref_phi)]
    if case.endswith("_section"):
        return {"theta": max_abs_diff(theta, ref_theta), "phi": max_abs_diff(phi, ref_phi)}
    logged = logger.metrics.get(STEPS - 1, {})
    ref_distance = sum(float(((a - b).double() ** 2).sum()) for a, b in zip(ref_theta, ref_phi)) ** 0.5
    out: dict[str, Any] = {
        "theta": max_abs_diff(theta, ref_theta),
        "phi": max_abs_diff(phi, ref_phi),
        "val": max(abs(a - b) for a, b in zip(module.val_losses, expected_val)) if module.val_losses else None,
        "val_count": len(module.val_losses),
        "distance": abs(logged.get("lookahead/distance", float("nan")) - ref_distance),
        "syncs_logged": logged.get("lookahead/syncs"),
        "alpha_logged": logged.get("lookahead/alpha"),
        "syncs_done": callback.syncs_done,
    }
    for s in offsets:
        path = os.path.join(tmp, f"{case}_{s}.ckpt")
        first, *_ = fit(case, num_nodes, s)
        first.save_checkpoint(path)
        trainer2, module2, callback2, _ = fit(case, num_nodes, STEPS, ckpt=path, start=s)
        theta2, phi2 = full_weights(trainer2, module2, callback2, case)
        out[f"resume_{s}"] = max(max_abs_diff(theta2, theta), max_abs_diff(phi2, phi))
        out[f"resume_{s}_syncs"] = callback2.syncs_done
    out["seconds"] = round(time.time() - t0, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", default="ddp,zero1,zero2,zero3")
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--offsets", default="4,5")
    parser.add_argument("--tmp", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    # One checkpoint folder shared by all ranks (ZeRO writes per-rank files into it).
    tmp = [args.tmp or tempfile.mkdtemp(prefix="pl_equiv_")]
    dist.broadcast_object_list(tmp, src=0)
    offsets = [int(s) for s in args.offsets.split(",") if s]
    results: dict[str, Any] = {}
    for case in args.cases.split(","):
        try:
            results[case] = run_case(case, args.num_nodes, offsets, tmp[0])
        except Exception as exc:  # recorded per case so one failure does not hide the others
            import traceback

            results[case] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-3000:]}
            break  # ranks may be out of step after an exception
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
