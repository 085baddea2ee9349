"""Lookahead on an FSDP2 (``fully_shard``) model, 2 CPU ranks (gloo). Launched by torchrun:

    torchrun --nproc_per_node 2 tests/dist/fsdp2_cases.py --out R.json --tmp DIR

Per inner optimizer (AdamW, SGD with momentum), k=3, α=0.5, 8 steps on per-rank slices of global batches:
  * θ and φ gathered to full tensors vs. the single-process reference (tests/reference.py) on full batches;
  * φ is a DTensor with the parameter's mesh, placements and local shape; its local bytes per rank;
  * collectives (fsdp_common.Comms) inside every ``opt.step()`` and over whole steps (forward, backward,
    step), with Lookahead and without, as ordered lists of (op, element count);
  * ``fast_slow_distance_sq()`` is a local (non-DTensor) partial sum with no collective, and
    ``lookahead_dist.fsdp.fast_slow_distance`` matches the reference's ‖θ − φ‖;
  * ``use_slow_weights()``: no collective on entry or exit, the parameters hold φ inside and θ after.
DCP (AdamW): 4 steps (one step into a cycle), ``get_state_dict`` → ``dcp.save``; a fresh model and
optimizer → ``get_state_dict`` → ``dcp.load`` → ``set_state_dict``; 4 more steps; θ and φ vs. the straight
8-step run, for both ``flatten_optimizer_state_dict`` layouts. The unflattened checkpoint is left in
``--tmp`` for the consolidation test. Mixed precision: ``MixedPrecisionPolicy(param_dtype=bf16)``, 6 steps
(the last one syncs). "adaptive": ``alpha="adaptive"`` vs. one process stepping
the full tensors (α per sync, trajectory, collectives in the step). "refuse": ``wrap`` on a model with plain
and DTensor parameters. Rank 0 writes JSON.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from lookahead_dist import fsdp as la_fsdp
from lookahead_dist.core.keys import COUNT_KEY, SLOW_KEY
from tests.dist.fsdp_common import (
    ALPHA,
    Comms,
    K,
    make_inner,
    make_net,
    rank_batch,
    reference_run,
)
from tests.helpers import run_cases
from tests.reference import max_abs_diff

STEPS, PER_RANK = 8, 4


def sharded_net(mp: bool = False) -> nn.Module:
    net = make_net()
    kwargs: dict[str, Any] = {}
    if mp:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in (net[0], net[2]):
        fully_shard(layer, **kwargs)
    fully_shard(net, **kwargs)
    return net


def build(opt: str, lookahead: bool = True, mp: bool = False) -> tuple[nn.Module, torch.optim.Optimizer]:
    net = sharded_net(mp)
    inner = make_inner(net.parameters(), opt)
    return net, (la_fsdp.wrap(inner, k=K, alpha=ALPHA) if lookahead else inner)


def train(net: nn.Module, opt: torch.optim.Optimizer, start: int, stop: int) -> dict[str, list]:
    rank, world = dist.get_rank(), dist.get_world_size()
    in_step, whole = [], []
    for step in range(start, stop):
        x, y = rank_batch(step, PER_RANK, rank, world)
        with Comms() as all_comms:
            loss = nn.functional.mse_loss(net(x).float(), y)
            loss.backward()
            with Comms() as step_comms:
                opt.step()
            opt.zero_grad()
        in_step.append(step_comms.log)
        whole.append(all_comms.log)
    return {"in_step": in_step, "whole": whole}


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def theta_phi(net: nn.Module, opt: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    params = list(net.parameters())
    return [full(p.detach()).float() for p in params], [full(opt.state[p][SLOW_KEY]) for p in params]


def placement_report(net: nn.Module, opt: Any) -> dict[str, Any]:
    rank_info = []
    same, phi_bytes, param_numel = True, 0, 0
    for name, p in net.named_parameters():
        phi = opt.state[p][SLOW_KEY]
        ok = (
            isinstance(phi, DTensor)
            and phi.placements == p.placements
            and phi.device_mesh == p.device_mesh
            and phi.to_local().shape == p.to_local().shape
            and phi.shape == p.shape
            and phi.dtype == torch.float32
            and phi.to_local().untyped_storage().data_ptr() != p.to_local().untyped_storage().data_ptr()
        )
        same = same and ok
        local = phi.to_local() if isinstance(phi, DTensor) else phi
        phi_bytes += local.numel() * local.element_size()
        param_numel += p.numel()
        rank_info.append([name, str(getattr(phi, "placements", None)), list(local.shape)])
    return {"same_placement": same, "phi_bytes": phi_bytes, "P": param_numel, "shards": rank_info}


def gather_per_rank(value: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def case_trajectory(opt_name: str) -> dict[str, Any]:
    world = dist.get_world_size()
    net, opt = build(opt_name)
    logs = train(net, opt, 0, STEPS)
    report = placement_report(net, opt)
    # ‖θ − φ‖: the local partial sum must involve no collective and be a plain tensor.
    with Comms() as dist_comms:
        partial = opt.fast_slow_distance_sq()
    distance = la_fsdp.fast_slow_distance(opt)
    theta, phi = theta_phi(net, opt)
    # Slow-weight swap: collectives on entry/exit, values inside, restore afterwards.
    before = [p.to_local().clone() for p in net.parameters()]
    with Comms() as swap_comms, opt.use_slow_weights():
        inside_local = [p.to_local().clone() for p in net.parameters()]
        still_dtensor = all(isinstance(p, DTensor) for p in net.parameters())
    inside_vs_phi = max(
        float((a - opt.state[p][SLOW_KEY].to_local()).abs().max()) if a.numel() else 0.0
        for a, p in zip(inside_local, net.parameters())
    )
    after_vs_before = max(
        float((p.to_local() - b).abs().max()) if b.numel() else 0.0 for p, b in zip(net.parameters(), before)
    )
    ref_theta, ref_phi = reference_run(STEPS, PER_RANK * world, opt_name)
    ref_distance = sum(float(((a - b).double() ** 2).sum()) for a, b in zip(ref_theta, ref_phi)) ** 0.5

    # The counter sees DTensor's own collectives too (a gather of φ): an empty log above means none ran.
    with Comms() as gather_comms:
        full(opt.state[next(net.parameters())][SLOW_KEY])

    base_net, base_opt = build(opt_name, lookahead=False)
    base_logs = train(base_net, base_opt, 0, STEPS)
    base_theta = [full(p.detach()) for p in base_net.parameters()]
    return {
        "theta": max_abs_diff(theta, ref_theta),
        "phi": max_abs_diff(phi, ref_phi),
        # how far a run without Lookahead lands: the tolerance must be far below it
        "no_lookahead_gap": max_abs_diff(base_theta, ref_theta),
        "sync_count": opt.sync_count,
        "counts": sorted({opt.state[p][COUNT_KEY] for p in net.parameters()}),
        "placements": gather_per_rank(report),
        "in_step": gather_per_rank(logs["in_step"]),
        "whole": gather_per_rank(logs["whole"]),
        "base_in_step": gather_per_rank(base_logs["in_step"]),
        "base_whole": gather_per_rank(base_logs["whole"]),
        "distance_partial_is_dtensor": isinstance(partial, DTensor),
        "distance_comms": gather_per_rank(dist_comms.log),
        "distance": abs(distance - ref_distance),
        "ref_distance": ref_distance,
        "swap_comms": gather_per_rank(swap_comms.log),
        "swap_still_dtensor": still_dtensor,
        "swap_inside_vs_phi": max(gather_per_rank(inside_vs_phi)),
        "swap_restore": max(gather_per_rank(after_vs_before)),
        "gather_comms": gather_comms.log,
    }


def save_dcp(net: nn.Module, opt: Any, path: str, flatten: bool) -> None:
    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    model_sd, optim_sd = get_state_dict(net, opt, options=options)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)


def load_dcp(net: nn.Module, opt: Any, path: str, flatten: bool) -> None:
    # torch's recipe: the template comes from the live (fresh) objects.
    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    model_sd, optim_sd = get_state_dict(net, opt, options=options)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(net, opt, model_state_dict=state["model"], optim_state_dict=state["optim"], options=options)


def case_dcp(tmp: str, mid: int = 4) -> dict[str, Any]:
    out: dict[str, Any] = {}
    net, opt = build("adamw")
    train(net, opt, 0, STEPS)
    straight = theta_phi(net, opt)
    for flatten in (False, True):
        name = "flat" if flatten else "nested"
        path = str(Path(tmp) / f"dcp_{name}_step{mid}")
        net1, opt1 = build("adamw")
        train(net1, opt1, 0, mid)
        counts_saved = [opt1.state[p][COUNT_KEY] for p in net1.parameters()]
        save_dcp(net1, opt1, path, flatten)
        saved_after = theta_phi(net1, opt1)
        net2, opt2 = build("adamw")
        load_dcp(net2, opt2, path, flatten)
        loaded = theta_phi(net2, opt2)
        counts_loaded = [opt2.state[p][COUNT_KEY] for p in net2.parameters()]
        phi_types = all(
            isinstance(opt2.state[p][SLOW_KEY], DTensor) and opt2.state[p][SLOW_KEY].placements == p.placements
            for p in net2.parameters()
        )
        probe_syncs = opt2.sync_count
        train(net2, opt2, mid, STEPS)
        resumed = theta_phi(net2, opt2)
        out[name] = {
            "loaded_vs_saved": max(max_abs_diff(a, b) for a, b in zip(loaded, saved_after)),
            "counts_saved": counts_saved,
            "counts_loaded": counts_loaded,
            "phi_dtensor_after_load": phi_types,
            "probe_syncs": probe_syncs,
            "resume": max(max_abs_diff(resumed[0], straight[0]), max_abs_diff(resumed[1], straight[1])),
            "syncs_after_resume": opt2.sync_count,
        }
    # A checkpoint at the end of the run for the consolidated-slow-weights test (at step 8: φ ≠ θ).
    save_dcp(net, opt, str(Path(tmp) / f"dcp_nested_step{STEPS}"), flatten=False)
    return out


def case_mixed_precision() -> dict[str, Any]:
    steps = 6  # k=3: the last step syncs, after which the fp32 sharded params equal φ exactly
    world = dist.get_world_size()
    net, opt = build("adamw", mp=True)
    logs = train(net, opt, 0, steps)
    report = placement_report(net, opt)
    params_fp32 = all(p.dtype == torch.float32 for p in net.parameters())
    params_vs_phi = max(
        float((p.to_local() - opt.state[p][SLOW_KEY].to_local()).abs().max()) if p.to_local().numel() else 0.0
        for p in net.parameters()
    )
    _, phi = theta_phi(net, opt)
    _, ref_phi = reference_run(steps, PER_RANK * world, "adamw")
    start = [p.detach() for p in make_net().parameters()]
    return {
        "placements": gather_per_rank(report),
        "params_fp32": params_fp32,
        "params_vs_phi": max(gather_per_rank(params_vs_phi)),
        "phi_vs_ref": max_abs_diff(phi, ref_phi),
        "moved": max_abs_diff(ref_phi, start),
        "in_step": gather_per_rank(logs["in_step"]),
        "sync_count": opt.sync_count,
    }


def case_adaptive() -> dict[str, Any]:
    """alpha="adaptive": the α of every sync and the trajectory vs. one process stepping the full tensors."""
    from lookahead_dist import Lookahead
    from lookahead_dist.core import adaptive
    from tests.dist.fsdp_common import global_batch
    from tests.tolerances import scale_of_h

    # α is clipped to its bounds on most syncs of so short a run, so the sums it is computed from are
    # compared too: recorded where the rule receives them (after the reduce_fn, if any).
    sums: list[tuple[float, float, float]] = []
    original, original_alpha = adaptive.alpha_from_sums, adaptive.adaptive_alpha

    def recording(h, with_history, dd, *args, **kwargs):  # type: ignore[no-untyped-def]
        sums.append((h, with_history, dd))
        return original(h, with_history, dd, *args, **kwargs)

    adaptive.alpha_from_sums = recording
    try:
        world = dist.get_world_size()
        net = sharded_net()
        opt = la_fsdp.wrap(make_inner(net.parameters(), "adamw"), k=K, alpha="adaptive")
        logs = train(net, opt, 0, STEPS)
        theta, phi = theta_phi(net, opt)
        alphas, sharded_sums = opt.last_alpha, list(sums)
        sums.clear()
        ref_net = make_net()
        ref = Lookahead(make_inner(ref_net.parameters(), "adamw"), k=K, alpha="adaptive")
        scales = []  # the scale of each reference sum's rounding (tests/tolerances.py)

        def scaled(params, state, group, **kwargs):  # type: ignore[no-untyped-def]
            params = list(params)
            scales.append(scale_of_h(params, state))
            return original_alpha(params, state, group, **kwargs)

        adaptive.adaptive_alpha = scaled
        for step in range(STEPS):
            ref.zero_grad()
            x, y = global_batch(step, PER_RANK * world)
            nn.functional.mse_loss(ref_net(x), y).backward()
            ref.step()
    finally:
        adaptive.alpha_from_sums = original
        adaptive.adaptive_alpha = original_alpha
    params = list(ref_net.parameters())
    return {
        "theta": max_abs_diff(theta, [p.detach() for p in params]),
        "phi": max_abs_diff(phi, [ref.state[p][SLOW_KEY] for p in params]),
        "alpha": abs(alphas[0] - ref.last_alpha[0]),
        "sums": gather_per_rank(sharded_sums),
        "ref_sums": list(sums),
        "ref_scales": scales,
        "in_step": gather_per_rank(logs["in_step"]),
    }


def case_refuse() -> dict[str, Any]:
    """wrap() on a model whose root was not fully_shard-ed: some parameters stay plain (replicated) tensors."""
    net = make_net()
    fully_shard(net[0])
    try:
        la_fsdp.wrap(make_inner(net.parameters(), "adamw"), k=K, alpha=ALPHA)
    except ValueError as exc:
        return {"error_message": str(exc)}
    return {"error_message": None}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--tmp", required=True)
    parser.add_argument("--cases", default="adamw,sgd,dcp,mp,adaptive,refuse")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    cases: dict[str, Any] = {
        "adamw": lambda: case_trajectory("adamw"),
        "sgd": lambda: case_trajectory("sgd"),
        "dcp": lambda: case_dcp(args.tmp),
        "mp": case_mixed_precision,
        "adaptive": case_adaptive,
        "refuse": case_refuse,
    }
    run_cases(args.cases.split(","), lambda case: cases[case](), args.out)


if __name__ == "__main__":
    main()
