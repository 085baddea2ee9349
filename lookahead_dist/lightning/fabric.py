"""Lookahead in a Lightning Fabric loop: one call instead of ``fabric.setup``, φ sharded as everywhere else.

    from lookahead_dist.lightning.fabric import setup, use_slow_weights

    model, optimizer = setup(fabric, model, torch.optim.AdamW(model.parameters()), k=5, alpha=0.5)
    ...                                     # the usual loop: fabric.backward(loss); optimizer.step()
    with use_slow_weights(optimizer):       # evaluate on φ; θ restored bit-exactly on exit
        evaluate(model)
    fabric.save(path, {"model": model, "optimizer": optimizer})   # φ and the counters inside

Where Lookahead goes depends on the strategy, which is why this is a function and not only
``fabric.setup(model, Lookahead(...))`` (that works too for DDP, single device and ``FSDPStrategy``):

* DDP / single device: ``Lookahead(inner)`` set up by Fabric as any optimizer (φ replicated, like Adam's moments);
* ``DeepSpeedStrategy`` (ZeRO 0-3): DeepSpeed steps the inner optimizer on this rank's fp32 partitions, so
  Lookahead is installed inside the engine after ``fabric.setup`` (:func:`lookahead_dist.deepspeed.install`).
  A ``"lookahead"`` section of the strategy's config is honoured as by
  :func:`lookahead_dist.deepspeed.initialize`: hidden from DeepSpeed, validated, used for the settings;
* ``FSDPStrategy`` (FSDP1, ``use_orig_params=True``) and ``ModelParallelStrategy`` (FSDP2): the inner optimizer
  steps the shards and :func:`lookahead_dist.fsdp.wrap` wraps it. Under ``ModelParallelStrategy`` the
  parameters become DTensors when the module is set up, so pass the optimizer as a function of the parameters
  (``lambda params: torch.optim.AdamW(params)``) or build it on a module set up with ``fabric.setup_module``.

``CPUFabricDeepSpeedStrategy`` and ``CPUFabricFSDPStrategy`` are Fabric's DeepSpeed and FSDP strategies for CPU
processes (gloo), for laptops and CI, as :mod:`lookahead_dist.lightning.strategies` has for the Trainer: the
Trainer's classes are ``lightning.pytorch`` strategies, which Fabric does not accept.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning.fabric.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
)
from torch import nn
from typing_extensions import override

from .._versions import check_versions
from ..core.optim import Lookahead
from ..core.settings import LookaheadConfigError, LookaheadSettings

__all__ = ["CPUFabricDeepSpeedStrategy", "CPUFabricFSDPStrategy", "find_lookahead", "setup", "use_slow_weights"]

check_versions("lightning")
_CPU = torch.device("cpu")
SUPPORTED = "DDP, single device, DeepSpeedStrategy (ZeRO 0-3), FSDPStrategy (use_orig_params=True), ModelParallelStrategy"
OptimizerArg = torch.optim.Optimizer | Callable[[Any], torch.optim.Optimizer]

# The optimizer objects setup() returned under DeepSpeed -> their engine (weakly): the slow-weight swap
# goes through the engine's partitions there, not through the Lookahead alone.
_ENGINES: weakref.WeakKeyDictionary[Any, weakref.ref[Any]] = weakref.WeakKeyDictionary()
# The optimizer objects returned for sharded models -> the model (weakly), for the swap's reshard.
_MODELS: weakref.WeakKeyDictionary[Any, weakref.ref[Any]] = weakref.WeakKeyDictionary()


def setup(
    fabric: Any,
    model: nn.Module,
    optimizer: OptimizerArg,
    *,
    settings: LookaheadSettings | None = None,
    **options: Any,
) -> tuple[Any, Any]:
    """``fabric.setup(model, optimizer)`` with Lookahead on the optimizer the strategy steps; returns the same pair.

    Args:
        fabric: a launched ``lightning.fabric.Fabric``.
        model: the module (not yet set up); under ``ModelParallelStrategy`` also one set up with
            ``fabric.setup_module``.
        optimizer: the inner optimizer, a function ``params -> optimizer`` (called on the parameters the
            strategy steps), or a ready :class:`~lookahead_dist.Lookahead` (not under DeepSpeed).
        settings, options: :class:`~lookahead_dist.LookaheadSettings` or its fields as keywords (``k``,
            ``alpha``, ...). Left out: the DeepSpeed config's ``"lookahead"`` section, a given Lookahead's
            settings, else the defaults (k=5, alpha=0.5). Two of these at once raise.
    """
    strategy = fabric.strategy
    if isinstance(strategy, DeepSpeedStrategy):
        return _setup_deepspeed(fabric, model, optimizer, settings, options)
    resolved = _settings(optimizer, settings, options, section=None)
    if isinstance(strategy, ModelParallelStrategy):
        return _setup_fsdp2(fabric, model, optimizer, resolved)
    if isinstance(strategy, FSDPStrategy):  # joint set-up: Fabric itself refuses use_orig_params=False
        fsdp_model, fsdp_optimizer = fabric.setup(model, _wrapped(optimizer, model.parameters(), resolved, sharded=True))
        _MODELS[fsdp_optimizer] = weakref.ref(fsdp_model)
        return fsdp_model, fsdp_optimizer
    if isinstance(strategy, (DDPStrategy, SingleDeviceStrategy)):
        return fabric.setup(model, _wrapped(optimizer, model.parameters(), resolved, sharded=False))
    raise TypeError(
        f"lookahead_dist.lightning.fabric.setup: {type(strategy).__name__} is not supported; supported are "
        f"{SUPPORTED}."
    )


def _settings(
    optimizer: Any, settings: LookaheadSettings | None, options: dict[str, Any], section: Any
) -> LookaheadSettings:
    """One answer to "which Lookahead": keywords/settings, a given Lookahead's, or a config section."""
    if settings is not None and options:
        raise TypeError("lookahead_dist.lightning.fabric.setup: pass either settings=... or keyword options, not both.")
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
            f"lookahead_dist.lightning.fabric.setup: Lookahead is configured twice ({' and '.join(sources)}); "
            f"keep one of them."
        )
    if isinstance(optimizer, Lookahead):
        return optimizer.settings
    if section is not None:
        return LookaheadSettings(**section)
    return given if given is not None else LookaheadSettings()


def _wrapped(optimizer: OptimizerArg, params: Any, settings: LookaheadSettings, sharded: bool) -> Lookahead:
    if isinstance(optimizer, Lookahead):
        if sharded and optimizer.settings.alpha == "adaptive" and optimizer.reduce_fn is None:
            from ..core.collectives import sum_over

            optimizer.reduce_fn = sum_over()  # adaptive α's sums are shard sums: add them up over the ranks
        return optimizer
    inner = _inner(optimizer, params)
    if sharded:
        from ..fsdp import wrap

        return wrap(inner, settings=settings)
    return Lookahead(inner, settings=settings)


def _inner(optimizer: OptimizerArg, params: Any) -> torch.optim.Optimizer:
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    if callable(optimizer):
        return optimizer(params)
    raise TypeError(
        f"lookahead_dist.lightning.fabric.setup: optimizer must be a torch.optim.Optimizer or a function of the "
        f"parameters returning one, got {type(optimizer).__name__}."
    )


def _setup_fsdp2(fabric: Any, model: nn.Module, optimizer: OptimizerArg, settings: LookaheadSettings) -> tuple:
    from lightning.fabric.wrappers import _FabricModule

    module = model if isinstance(model, _FabricModule) else fabric.setup_module(model)
    if isinstance(optimizer, torch.optim.Optimizer):
        live = {id(p) for p in module.parameters()}
        stale = [p for g in optimizer.param_groups for p in g["params"] if id(p) not in live]
        if stale:
            raise ValueError(
                f"lookahead_dist.lightning.fabric.setup: {len(stale)} of the optimizer's parameters are not the "
                f"model's: ModelParallelStrategy's parallelize_fn replaced them with sharded DTensors. Pass the "
                f"optimizer as a function of the parameters (lambda params: torch.optim.AdamW(params, ...)), or "
                f"build it on the parameters of fabric.setup_module(model)."
            )
    fabric_optimizer = fabric.setup_optimizers(_wrapped(optimizer, module.parameters(), settings, sharded=True))
    _MODELS[fabric_optimizer] = weakref.ref(module)
    return module, fabric_optimizer


def _setup_deepspeed(
    fabric: Any, model: nn.Module, optimizer: OptimizerArg, settings: LookaheadSettings | None, options: dict
) -> tuple[Any, Any]:
    from ..deepspeed import install, split_config

    strategy = fabric.strategy
    if isinstance(optimizer, Lookahead):
        raise TypeError(
            "lookahead_dist.lightning.fabric.setup: under DeepSpeedStrategy DeepSpeed steps the inner optimizer on "
            "this rank's fp32 partitions, so Lookahead is installed inside the engine: pass the inner optimizer "
            "and the options, setup(fabric, model, torch.optim.AdamW(...), k=5, alpha=0.5), or put a "
            '"lookahead" section in the DeepSpeed config.'
        )
    original = strategy.config
    ds_config, section = split_config(original) if original is not None else (None, None)
    resolved = _settings(optimizer, settings, options, section)
    if resolved.outer.scope == "nodes":
        raise LookaheadConfigError(
            'lookahead_dist.lightning.fabric.setup: "outer": {"scope": "nodes"} needs its node groups before '
            "DeepSpeed builds the engine, which Fabric's strategy does not allow; use lookahead_dist.deepspeed."
            "initialize, or the Trainer with LookaheadDeepSpeedStrategy."
        )
    strategy.config = ds_config  # DeepSpeed ignores unknown keys: it never sees the section
    try:
        fabric_model, fabric_optimizer = fabric.setup(model, _inner(optimizer, model.parameters()))
    finally:
        strategy.config = original
    engine = strategy.model
    install(engine, settings=resolved)
    _ENGINES[fabric_optimizer] = weakref.ref(engine)
    return fabric_model, fabric_optimizer


def find_lookahead(optimizer: Any) -> Lookahead | None:
    """The :class:`~lookahead_dist.Lookahead` behind what :func:`setup` returned (or any wrapper of one)."""
    seen = 0
    while optimizer is not None and seen < 8:
        if isinstance(optimizer, Lookahead):
            return optimizer
        optimizer, seen = getattr(optimizer, "optimizer", None), seen + 1
    return None


@contextmanager
def use_slow_weights(optimizer: Any) -> Iterator[None]:
    """The model computes with φ inside the block (e.g. evaluation); θ is restored bit-exactly on exit.

    ``optimizer`` is the one :func:`setup` returned. Local swaps under DDP and FSDP (no collective); under
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
            f"lookahead_dist.lightning.fabric.use_slow_weights: {type(optimizer).__name__} holds no Lookahead; "
            f"pass the optimizer returned by lookahead_dist.lightning.fabric.setup."
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
            "lookahead_dist.lightning.fabric.use_slow_weights: FSDP1 keeps the root's gathered weights after a no-grad forward "
            "and has no public way to drop them, so the forward would not see φ (and after the block training "
            "would compute with stale weights). Use FSDP2 (fully_shard), or evaluate φ through "
            "lookahead_dist.fsdp.checkpoint's consolidated slow weights."
        )
    for m in modules:
        if isinstance(m, FSDPModule):
            m.reshard()


class CPUFabricDeepSpeedStrategy(DeepSpeedStrategy):
    """Fabric's ``DeepSpeedStrategy`` on CPU processes (gloo); takes every argument of the stock class.

    The stock class refuses any accelerator but CUDA and checks CUDA device indices; DeepSpeed itself runs on
    CPU. Those two checks are skipped and the root device is ``cpu:<local rank>``. fp16 is refused by DeepSpeed on CPU: use 32-bit or bf16.
    """

    @override
    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # DDP's set-up without the stock CUDA-only check

    @override
    def _setup_distributed(self) -> None:
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()  # the stock method minus its CUDA device-index validation
        self._set_world_ranks()
        self._init_deepspeed_distributed()
        if not self._config_initialized:
            self._format_config()
            self._config_initialized = True

    @property
    @override
    def root_device(self) -> torch.device:
        # DeepSpeed reads the index as this process's device rank; a plain "cpu" device has none.
        return torch.device("cpu", self.local_rank)


class CPUFabricFSDPStrategy(FSDPStrategy):
    """Fabric's ``FSDPStrategy`` (FSDP1) on CPU processes (gloo); takes every argument of the stock class.

    Fabric refuses FSDP unless the accelerator is a GPU, and wraps with ``device_id`` = the CUDA index, which
    FSDP needs for CPU parameters too. This class wraps with ``device_id=torch.device("cpu")``. Use
    ``state_dict_type="sharded"`` (the default): full checkpoints gather with ``offload_to_cpu=True``, which
    crashes inside FSDP on CPU parameters.
    """

    @override
    def setup_module(self, module: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if any(isinstance(m, FullyShardedDataParallel) for m in module.modules()):
            return super().setup_module(module)
        wrapped = FullyShardedDataParallel(
            module=module,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=_CPU,
            **self._fsdp_kwargs,
        )
        # The stock method sees a wrapped module and does the rest; hide the (applied) auto-wrap policy so
        # that it does not drop it with a warning that it was ignored.
        policy = self._fsdp_kwargs.pop("auto_wrap_policy", None)
        try:
            return super().setup_module(wrapped)
        finally:
            if policy is not None:
                self._fsdp_kwargs["auto_wrap_policy"] = policy
