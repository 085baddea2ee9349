"""Installing Lookahead into a ``transformers.Trainer``'s optimizer, one function per engine.

Every private attribute of accelerate the package touches is in :func:`wrap_accelerated`.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer

from .._versions import check_versions
from ..core.keys import CONFIG_KEY
from ..core.optim import Lookahead
from ..core.settings import LookaheadSettings

__all__ = [
    "SUPPORTED",
    "deepspeed_section",
    "install_deepspeed",
    "install_plain",
    "refuse_unsupported",
    "wrap_accelerated",
]

SUPPORTED = "one process, DDP (torchrun / accelerate launch) and DeepSpeed ZeRO 0-3 (incl. CPU offload)"
WHERE = "LookaheadTrainerCallback"


def refuse_unsupported(trainer: Trainer) -> None:
    """Refuse the Trainer set-ups the callback cannot serve (FSDP through accelerate)."""
    if getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_fsdp_xla_enabled", False):
        raise RuntimeError(
            f"{WHERE} does not support FSDP (TrainingArguments(fsdp=...) / accelerate's FSDP plugin) yet; it works "
            f"with {SUPPORTED}. For sharded training use DeepSpeed ZeRO-3: "
            "TrainingArguments(deepspeed='configs/hf/zero3.json')."
        )


def deepspeed_section(trainer: Trainer) -> Any:
    """The DeepSpeed config's ``"lookahead"`` section, or ``None`` (also without DeepSpeed)."""
    if not trainer.is_deepspeed_enabled:
        return None
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    config = getattr(plugin, "deepspeed_config", None) or {}
    return config.get(CONFIG_KEY)


def install_deepspeed(engine: Any, settings: LookaheadSettings, mine: Lookahead | None) -> Lookahead:
    """``lookahead_dist.deepspeed.install`` on the Trainer's engine; ``mine`` again on a second ``train()``."""
    from ..deepspeed import find_lookahead, install

    check_versions("deepspeed")
    if not hasattr(engine, "optimizer") or not hasattr(engine, "zero_optimization_stage"):
        raise RuntimeError(
            f"{WHERE}: DeepSpeed is enabled but trainer.model_wrapped is a {type(engine).__name__}, not a "
            f"DeepSpeed engine; this Trainer set-up is not supported."
        )
    existing = find_lookahead(engine)
    if existing is not None:
        if existing is mine:  # another train() call on the same engine
            return existing
        raise ValueError(
            f"{WHERE}: the DeepSpeed engine's optimizer is already a Lookahead (installed by another "
            f"{WHERE} or lookahead_dist.deepspeed.install); remove one of them."
        )
    if getattr(engine, "loaded_checkpoint_dp_world_size", None) is not None:
        raise RuntimeError(
            f"{WHERE}: the DeepSpeed engine loaded a checkpoint before Lookahead was installed; attach the "
            f"callback with {WHERE}(...).attach(trainer) before trainer.train(): it then installs right after "
            f"DeepSpeed is set up, before the checkpoint is loaded."
        )
    return install(engine, settings=settings)


def install_plain(holder: Any, settings: LookaheadSettings, mine: Lookahead | None) -> Lookahead:
    """Lookahead inside accelerate's ``AcceleratedOptimizer`` ``holder`` (one process, DDP)."""
    from accelerate.optimizer import AcceleratedOptimizer

    if not isinstance(holder, AcceleratedOptimizer):
        raise RuntimeError(  # noqa: TRY004 - a Trainer set-up the callback cannot serve, not a bad argument
            f"{WHERE}: trainer.optimizer is a {type(holder).__name__}, not accelerate's AcceleratedOptimizer; "
            f"this Trainer set-up is not supported (it works with {SUPPORTED})."
        )
    # A later train() call prepares the already prepared optimizer again: wrappers nest.
    while isinstance(holder.optimizer, AcceleratedOptimizer):
        holder = holder.optimizer
    inner = holder.optimizer
    if isinstance(inner, Lookahead):
        if inner is mine:  # another train() call: keep the state, counters and φ
            return inner
        raise ValueError(
            f"{WHERE}: the Trainer's optimizer is already a Lookahead (e.g. passed through "
            f"Trainer(optimizers=(Lookahead(...), scheduler))); remove the callback or that Lookahead."
        )
    _refuse_dtensors(inner)
    # A resume has already loaded optimizer.pt into `inner`: φ and the counters are picked up as they are.
    return wrap_accelerated(holder, settings)


def wrap_accelerated(holder: Any, settings: LookaheadSettings) -> Lookahead:
    """Replace the torch optimizer inside accelerate's ``AcceleratedOptimizer`` by ``Lookahead`` of it, in place.

    Everything holding the ``AcceleratedOptimizer`` (the Trainer, its LR scheduler) keeps working: its
    ``param_groups``/``state``/``state_dict`` now reach the inner optimizer through Lookahead.
    """
    lookahead = Lookahead(holder.optimizer, settings=settings)
    holder.optimizer = lookahead
    if getattr(holder, "scaler", None) is not None:
        # fp16 with a GradScaler: around scaler.step accelerate swaps in a patched copy of the optimizer's step
        # (to see whether the step ran); those copies were made from the torch optimizer's step and would
        # bypass Lookahead, so make them again from Lookahead's. Private attributes of accelerate, read
        # only here; tests/test_hf.py's GradScaler test fails if accelerate renames them.
        from accelerate.optimizer import patch_optimizer_step

        holder._optimizer_original_step_method = lookahead.step
        holder._optimizer_patched_step_method = patch_optimizer_step(holder, lookahead.step)
    return lookahead


def _refuse_dtensors(optimizer: torch.optim.Optimizer) -> None:
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for group in optimizer.param_groups for p in group["params"]):
        raise RuntimeError(
            f"{WHERE}: the model's parameters are DTensors (tensor parallelism or FSDP2), which this callback "
            f"does not support yet; it works with {SUPPORTED}."
        )
