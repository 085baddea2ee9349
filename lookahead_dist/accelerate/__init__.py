"""Lookahead in a 🤗 Accelerate loop: ``prepare`` instead of ``accelerator.prepare``, φ sharded as everywhere else.

    import lookahead_dist.accelerate as la_acc

    model, optimizer, loader = la_acc.prepare(accelerator, model, torch.optim.AdamW(model.parameters()), loader,
                                              k=5, alpha=0.5)
    ...                                   # the usual loop: accelerator.backward(loss); optimizer.step()
    with la_acc.use_slow_weights(optimizer):   # evaluate on φ; θ restored bit-exactly on exit
        evaluate(model)
    accelerator.save_state(path)          # φ and the counters are in the optimizer state; load_state restores them

Where Lookahead goes depends on the distributed type:

* one process, DDP (``MULTI_CPU`` / ``MULTI_GPU``): ``Lookahead(inner)`` inside accelerate's
  ``AcceleratedOptimizer`` (``accelerator.prepare(model, Lookahead(inner))`` does the same);
* FSDP2 (``FullyShardedDataParallelPlugin(fsdp_version=2)``): ``accelerator.prepare`` swaps the optimizer's
  parameters for the sharded DTensors, so φ (created at the first step) is a DTensor shard; adaptive α's sums
  are added up over the ranks (``alpha="adaptive"``). A ready ``Lookahead`` works here too;
* DeepSpeed plugin (ZeRO 0-3): DeepSpeed steps the inner optimizer on this rank's fp32 partitions, so Lookahead is
  installed inside the engine after ``accelerator.prepare`` (:func:`lookahead_dist.deepspeed.install`). A
  ``"lookahead"`` section of the plugin's config is honoured as by :func:`lookahead_dist.deepspeed.initialize`
  (hidden from DeepSpeed, validated, used for the settings).

Refused with an error naming the fix: FSDP1 (``fsdp_version=1``), Megatron-LM, XLA; a ready ``Lookahead`` under
DeepSpeed; and a plugin accelerate silently dropped (``Accelerator(cpu=True, fsdp_plugin=...)`` or
``cpu=True`` with a DeepSpeed plugin train plain DDP). On CPU (laptops, CI): DeepSpeed works when
``PartialState(cpu=True)`` is created before ``Accelerator(deepspeed_plugin=...)`` (what the HF Trainer's
``use_cpu=True`` does); FSDP2 needs :func:`use_fsdp_on_cpu`.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..core.collectives import sum_over
from ..core.keys import CONFIG_KEY
from ..core.optim import Lookahead
from ..core.settings import LookaheadConfigError, LookaheadSettings

__all__ = ["find_lookahead", "prepare", "use_fsdp_on_cpu", "use_slow_weights"]

SUPPORTED = "one process, DDP, FSDP2 (FullyShardedDataParallelPlugin(fsdp_version=2)) and the DeepSpeed plugin (ZeRO 0-3)"

# The optimizer objects prepare() returned under DeepSpeed -> their engine (weakly): the slow-weight swap goes
# through the engine's partitions there.
_ENGINES: weakref.WeakKeyDictionary[Any, weakref.ref[Any]] = weakref.WeakKeyDictionary()
# The optimizer objects returned for sharded models -> the model (weakly), for the swap's reshard.
_MODELS: weakref.WeakKeyDictionary[Any, weakref.ref[Any]] = weakref.WeakKeyDictionary()


def prepare(accelerator: Any, *objects: Any, settings: LookaheadSettings | None = None, **options: Any) -> Any:
    """``accelerator.prepare(*objects)`` with Lookahead on the one optimizer among ``objects``; same return value.

    ``settings`` or the :class:`~lookahead_dist.LookaheadSettings` fields as keywords (``k``, ``alpha``, ...).
    Left out: the DeepSpeed config's ``"lookahead"`` section, a given ``Lookahead``'s settings, else the
    defaults (k=5, alpha=0.5). Two of these at once raise. ``device_placement`` is passed on.
    """
    kind = _distributed_type(accelerator)
    device_placement = options.pop("device_placement", None)
    index = _optimizer_index(objects)
    optimizer = objects[index]
    if kind == "DEEPSPEED":
        return _prepare_deepspeed(accelerator, list(objects), index, settings, options, device_placement)
    resolved = _settings(optimizer, settings, options, section=None)
    if not isinstance(optimizer, Lookahead):
        optimizer = Lookahead(optimizer, settings=resolved, reduce_fn=sum_over() if kind == "FSDP" else None)
    elif kind == "FSDP" and optimizer.settings.alpha == "adaptive" and optimizer.reduce_fn is None:
        optimizer.reduce_fn = sum_over()  # adaptive α's sums are shard sums: add them up over the ranks
    prepared = accelerator.prepare(*objects[:index], optimizer, *objects[index + 1 :], device_placement=device_placement)
    if kind == "FSDP":
        _check_sharded(optimizer)
        results = prepared if isinstance(prepared, (tuple, list)) else (prepared,)
        model = next(obj for obj in results if isinstance(obj, torch.nn.Module))
        _MODELS[results[index]] = weakref.ref(model)
    return prepared


def _distributed_type(accelerator: Any) -> str:
    """The distributed type's name, after refusing what cannot work (with the fix)."""
    kind = str(getattr(accelerator.distributed_type, "name", accelerator.distributed_type))
    wanted_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    wanted_ds = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if wanted_fsdp and kind not in ("FSDP", "DEEPSPEED"):
        raise RuntimeError(
            f"lookahead_dist.accelerate.prepare: a FullyShardedDataParallelPlugin was given but accelerate runs "
            f"{kind} (it drops FSDP with cpu=True or without accelerators), so nothing would be sharded. On GPUs "
            f"launch one process per GPU without cpu=True; on CPU processes call "
            f"lookahead_dist.accelerate.use_fsdp_on_cpu(accelerator, fsdp_plugin) before prepare."
        )
    if wanted_ds and kind != "DEEPSPEED":
        raise RuntimeError(
            f"lookahead_dist.accelerate.prepare: a DeepSpeed plugin was given but accelerate runs {kind} (it drops "
            f"DeepSpeed with cpu=True). On CPU processes create accelerate.PartialState(cpu=True) first and then "
            f"Accelerator(deepspeed_plugin=...) without cpu=True, as the HF Trainer's use_cpu=True does."
        )
    if kind == "FSDP" and getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1) != 2:
        raise ValueError(
            "lookahead_dist.accelerate.prepare: FSDP1 through accelerate (fsdp_version=1) is not supported; use "
            "FullyShardedDataParallelPlugin(fsdp_version=2), whose DTensor shards keep φ sharded."
        )
    if kind not in ("NO", "MULTI_CPU", "MULTI_GPU", "FSDP", "DEEPSPEED"):
        raise ValueError(f"lookahead_dist.accelerate.prepare: distributed type {kind} is not supported; supported are {SUPPORTED}.")
    return kind


def _optimizer_index(objects: tuple[Any, ...]) -> int:
    found = [i for i, obj in enumerate(objects) if isinstance(obj, torch.optim.Optimizer)]
    if len(found) != 1:
        raise TypeError(
            f"lookahead_dist.accelerate.prepare: expected exactly one torch optimizer among the objects to "
            f"prepare, got {len(found)}; pass the model and its optimizer together (prepare others with "
            f"accelerator.prepare)."
        )
    return found[0]


def _settings(optimizer: Any, settings: LookaheadSettings | None, options: dict[str, Any], section: Any) -> LookaheadSettings:
    """One answer to "which Lookahead": keywords/settings, a given Lookahead's, or the config section."""
    if settings is not None and options:
        raise TypeError("lookahead_dist.accelerate.prepare: pass either settings=... or keyword options, not both.")
    given = settings if settings is not None else (LookaheadSettings(**options) if options else None)
    sources = [
        name
        for name, present in (
            ("keyword options / settings=", given is not None),
            ("a Lookahead optimizer", isinstance(optimizer, Lookahead)),
            ('the DeepSpeed config\'s "lookahead" section', section is not None),
        )
        if present
    ]
    if len(sources) > 1:
        raise LookaheadConfigError(
            f"lookahead_dist.accelerate.prepare: Lookahead is configured twice ({' and '.join(sources)}); keep one of them."
        )
    if isinstance(optimizer, Lookahead):
        return optimizer.settings
    if section is not None:
        return LookaheadSettings(**section)
    return given if given is not None else LookaheadSettings()


def _check_sharded(lookahead: Lookahead) -> None:
    from torch.distributed.tensor import DTensor

    params = [p for group in lookahead.param_groups for p in group["params"]]
    if not all(isinstance(p, DTensor) for p in params):
        raise RuntimeError(
            "lookahead_dist.accelerate.prepare: after accelerate's FSDP2 set-up the optimizer still steps plain "
            "tensors, so φ would not be sharded; prepare the model and the optimizer in the same call."
        )


def _prepare_deepspeed(
    accelerator: Any, objects: list[Any], index: int, settings: Any, options: dict, device_placement: Any
) -> Any:
    from ..deepspeed import install, split_config

    optimizer = objects[index]
    if isinstance(optimizer, Lookahead):
        raise TypeError(
            "lookahead_dist.accelerate.prepare: under DeepSpeed the engine steps the inner optimizer on this rank's "
            "fp32 partitions, so Lookahead is installed inside the engine: pass the inner optimizer and the "
            "options, prepare(accelerator, model, torch.optim.AdamW(...), k=5, alpha=0.5), or put a "
            '"lookahead" section in the DeepSpeed config.'
        )
    config = accelerator.state.deepspeed_plugin.deepspeed_config  # the dict accelerate hands to DeepSpeed
    section = split_config(config)[1]  # validated, misspelled section names refused
    resolved = _settings(optimizer, settings, options, section)
    if resolved.outer.scope == "nodes":
        raise LookaheadConfigError(
            'lookahead_dist.accelerate.prepare: "outer": {"scope": "nodes"} needs its node groups before DeepSpeed '
            "builds the engine, which accelerate does not allow; use lookahead_dist.deepspeed.initialize."
        )
    raw = config.pop(CONFIG_KEY, None)  # DeepSpeed ignores unknown keys: it never sees the section
    try:
        prepared = accelerator.prepare(*objects, device_placement=device_placement)
    finally:
        if raw is not None:
            config[CONFIG_KEY] = raw
    results = prepared if isinstance(prepared, (tuple, list)) else (prepared,)
    engine = next(obj for obj in results if type(obj).__name__ == "DeepSpeedEngine")
    install(engine, settings=resolved)
    _ENGINES[results[index]] = weakref.ref(engine)
    return prepared


def use_fsdp_on_cpu(accelerator: Any, fsdp_plugin: Any) -> None:
    """Make ``accelerator`` use ``fsdp_plugin`` (FSDP2) on CPU processes (gloo), for laptops and CI.

    accelerate applies an FSDP plugin only with accelerators; with ``cpu=True`` it trains plain DDP without a
    word. Call this after ``Accelerator(cpu=True, fsdp_plugin=fsdp_plugin)`` and before :func:`prepare`.
    """
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    if getattr(fsdp_plugin, "fsdp_version", None) != 2:
        raise ValueError("lookahead_dist.accelerate.use_fsdp_on_cpu: pass FullyShardedDataParallelPlugin(fsdp_version=2).")
    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        raise ValueError(
            f"lookahead_dist.accelerate.use_fsdp_on_cpu: the accelerator runs {accelerator.distributed_type}, not "
            f"MULTI_CPU; create it with Accelerator(cpu=True, ...) in processes started by torchrun / accelerate launch."
        )
    # Both shared states: every AcceleratorState() built later (accelerate builds them internally) copies the
    # distributed type from PartialState's.
    PartialState().distributed_type = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = fsdp_plugin


def find_lookahead(optimizer: Any) -> Lookahead | None:
    """The :class:`~lookahead_dist.Lookahead` behind what :func:`prepare` returned (or any wrapper of one)."""
    for _ in range(8):
        if optimizer is None or isinstance(optimizer, Lookahead):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None


@contextmanager
def use_slow_weights(optimizer: Any) -> Iterator[None]:
    """The model computes with φ inside the block (e.g. evaluation); θ is restored bit-exactly on exit.

    ``optimizer`` is the one :func:`prepare` returned. Local swaps under DDP and FSDP2 (no collective); under
    DeepSpeed :func:`lookahead_dist.deepspeed.use_slow_weights` (ZeRO-1/2: one all-gather on entry).
    """
    ref = _ENGINES.get(optimizer)
    engine = ref() if ref is not None else None
    if engine is not None:
        from ..deepspeed import use_slow_weights as engine_slow_weights

        with engine_slow_weights(engine):
            yield
        return
    model_ref = _MODELS.get(optimizer)
    model = model_ref() if model_ref is not None else None
    lookahead = find_lookahead(optimizer)
    if lookahead is None:
        raise TypeError(
            f"lookahead_dist.accelerate.use_slow_weights: {type(optimizer).__name__} holds no Lookahead; pass the "
            f"optimizer returned by lookahead_dist.accelerate.prepare."
        )
    _reshard(model)
    try:
        with lookahead.use_slow_weights():
            _reshard(model)
            yield
    finally:
        _reshard(model)


def _reshard(model: Any) -> None:
    """Drop the gathered weights FSDP keeps after a no-grad forward (the root's), so the next forward gathers
    the shards that were just written (φ on entry, θ on exit). Local: frees memory, no collective."""
    if model is None:
        return
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    modules = list(model.modules())
    if any(isinstance(m, FullyShardedDataParallel) for m in modules):
        raise RuntimeError(
            "lookahead_dist.accelerate.use_slow_weights: FSDP1 keeps the root's gathered weights after a no-grad forward "
            "and has no public way to drop them, so the forward would not see φ (and after the block training "
            "would compute with stale weights). Use FSDP2 (fully_shard), or evaluate φ through "
            "lookahead_dist.fsdp.checkpoint's consolidated slow weights."
        )
    for m in modules:
        if isinstance(m, FSDPModule):
            m.reshard()
