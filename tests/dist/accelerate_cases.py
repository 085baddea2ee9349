"""Lookahead in 🤗 Accelerate loops on 2 CPU ranks (gloo), every case in one process group. Launched by
tests/test_accelerate.py:

    torchrun --nproc_per_node 2 -m tests.dist.accelerate_cases --out R.json --tmp DIR [--cases ddp,fsdp2,...]

The cases: DDP (``Accelerator(cpu=True)``), FSDP2 (``FullyShardedDataParallelPlugin(fsdp_version=2)`` made to
shard on CPU by ``lookahead_dist.accelerate.use_fsdp_on_cpu``; the parameters are checked to be DTensors) and
the DeepSpeed plugin, ZeRO-1/2/3 (``PartialState(cpu=True)`` first, as the HF Trainer's ``use_cpu=True``; ZeRO-2
reads its settings from a "lookahead" section of the plugin's JSON file). What each case records is what
tests/dist/fabric_cases.py records for Fabric (trajectory, collectives with and without Lookahead, the
slow-weight swap, a mid-cycle ``save_state``/``load_state`` resume). accelerate keeps one state per process, so
every run gets a fresh ``Accelerator`` (the state is reset in between).
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tests.dist.fabric_cases import (
    PER_RANK,
    SAVE_AT,
    STAGES,
    STEPS,
    ds_config,
    eval_losses,
    full_params,
    gather_per_rank,
    max_diff,
    phi_layout,
    slow_and_restore,
    tensors_to_lists,
    train_steps,
)
from tests.dist.fsdp_common import ALPHA, LR, K, make_inner, make_net
from tests.helpers import run_cases

warnings.filterwarnings("ignore")


def make_accelerator(case: str, tmp: str, section: bool) -> Any:
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin

    from lookahead_dist.accelerate import use_fsdp_on_cpu

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    for var in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):  # set by an earlier case's Accelerator
        os.environ.pop(var, None)
    if case == "ddp":
        return Accelerator(cpu=True)
    if case == "fsdp2":
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
        accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
        use_fsdp_on_cpu(accelerator, plugin)
        return accelerator
    config: Any = {**ds_config(case), "gradient_accumulation_steps": 1}
    if section:  # a JSON file with the section, as users write it
        config["lookahead"] = {"k": K, "alpha": ALPHA}
        path = Path(tmp) / f"{case}.json"
        if dist.get_rank() == 0:
            path.write_text(json.dumps(config))
        dist.barrier()
        config = str(path)
    PartialState(cpu=True)
    return Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config))


def build(case: str, tmp: str, lookahead: bool, section: bool) -> tuple[Any, Any, Any]:
    import lookahead_dist.accelerate as la_acc

    accelerator = make_accelerator(case, tmp, section and lookahead)
    net = make_net()
    inner = make_inner(net.parameters(), "adamw", LR)
    if not lookahead:
        model, optimizer = accelerator.prepare(net, inner)
    else:
        model, optimizer = la_acc.prepare(accelerator, net, inner, **({} if section else {"k": K, "alpha": ALPHA}))
    return accelerator, model, optimizer


def accelerate_case(case: str, tmp: str, section: bool = False) -> dict[str, Any]:
    from lookahead_dist.accelerate import find_lookahead, use_slow_weights

    accelerator, model, optimizer = build(case, tmp, True, section)
    out: dict[str, Any] = {"distributed_type": str(accelerator.distributed_type.name)}
    out["dtensor_params"] = all(type(p).__name__ == "DTensor" for p in model.parameters())
    logs = train_steps(model, optimizer, lambda loss, model: accelerator.backward(loss), 0, STEPS)
    out["theta"] = full_params(model)
    swap = slow_and_restore(model, lambda: use_slow_weights(optimizer))
    out.update(phi=swap["phi"], restored=swap["restored"], sync_count=find_lookahead(optimizer).sync_count)
    out["phi_layout"] = gather_per_rank(phi_layout(find_lookahead(optimizer)))
    out["eval"] = eval_losses(model, lambda: use_slow_weights(optimizer))
    out["theta_after_swap"] = full_params(model)
    base_acc, base_model, base_opt = build(case, tmp, False, section)
    base_logs = train_steps(base_model, base_opt, lambda loss, model: base_acc.backward(loss), 0, STEPS)
    out["base_theta"] = full_params(base_model)
    out["comms"], out["base_comms"] = gather_per_rank(logs), gather_per_rank(base_logs)
    out.update(accelerate_resume(case, tmp, section, out["theta"] + swap["phi"]))
    return out


def accelerate_resume(case: str, tmp: str, section: bool, straight: list[torch.Tensor]) -> dict[str, Any]:
    from lookahead_dist.accelerate import find_lookahead, use_slow_weights
    from lookahead_dist.core.keys import COUNT_KEY

    def counts(optimizer: Any) -> list[int]:
        return sorted({st[COUNT_KEY] for st in find_lookahead(optimizer).state.values() if COUNT_KEY in st})

    path = str(Path(tmp) / f"accelerate_{case}")
    accelerator, model, optimizer = build(case, tmp, True, section)
    train_steps(model, optimizer, lambda loss, model: accelerator.backward(loss), 0, SAVE_AT)
    counts_saved = counts(optimizer)
    accelerator.save_state(path)
    accelerator, model, optimizer = build(case, tmp, True, section)
    accelerator.load_state(path)
    counts_loaded = counts(optimizer)
    train_steps(model, optimizer, lambda loss, model: accelerator.backward(loss), SAVE_AT, STEPS)
    phi = slow_and_restore(model, lambda: use_slow_weights(optimizer))["phi"]
    resumed = full_params(model) + phi
    return {
        "counts_saved": counts_saved,
        "counts_loaded": counts_loaded,
        "resume_equal": all(torch.equal(a, b) for a, b in zip(resumed, straight)),
        "resume_diff": max_diff(resumed, straight),
    }


def refusals(tmp: str) -> dict[str, Any]:
    """What accelerate would silently drop, refused with the fix; a ready Lookahead under DeepSpeed."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import FullyShardedDataParallelPlugin

    import lookahead_dist.accelerate as la_acc
    from lookahead_dist import Lookahead

    out: dict[str, Any] = {}
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True, fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))
    out["dropped_fsdp_type"] = accelerator.distributed_type.name  # what accelerate does on its own: DDP
    net = make_net()
    try:
        la_acc.prepare(accelerator, net, make_inner(net.parameters(), "adamw", LR), k=K)
        out["dropped_fsdp"] = None
    except RuntimeError as exc:
        out["dropped_fsdp"] = str(exc)
    accelerator = make_accelerator("zero2", tmp, section=False)
    try:
        la_acc.prepare(accelerator, net, Lookahead(make_inner(net.parameters(), "adamw", LR), k=K))
        out["ready_lookahead_under_deepspeed"] = None
    except TypeError as exc:
        out["ready_lookahead_under_deepspeed"] = str(exc)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--tmp", required=True)
    parser.add_argument("--cases", default="ddp,fsdp2,zero1,zero2,zero3,refuse")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    cases: dict[str, Callable[[], Any]] = {
        name: (lambda name=name: accelerate_case(name, args.tmp, section=name == "zero2"))
        for name in ("ddp", "fsdp2", *STAGES)
    }
    cases["refuse"] = lambda: refusals(args.tmp)
    assert PER_RANK  # the per-rank batch the DeepSpeed configs name
    run_cases(args.cases.split(","), lambda case: tensors_to_lists(cases[case]()), args.out)


if __name__ == "__main__":
    main()
