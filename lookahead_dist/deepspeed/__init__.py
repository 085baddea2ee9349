"""Lookahead under DeepSpeed: slow weights sharded like ZeRO's fp32 master weights, no extra collectives.

DeepSpeed steps the optimizer you give it (the *inner* optimizer) on this rank's flat fp32 partition(s)
and afterwards copies them into the bit16 model weights and all-gathers (ZeRO-1/2) or leaves them in
the bit16 partitions that the next forward gathers (ZeRO-3). :func:`install` wraps that inner
optimizer in :class:`~lookahead_dist.Lookahead`, so φ lives in the inner optimizer's per-tensor state
for this rank's shard only, the sync rides DeepSpeed's own copy + all-gather, and φ is saved in the
per-rank ``*_optim_states.pt`` checkpoint files.

Two entry points::

    engine, optimizer, loader, scheduler = lookahead_dist.deepspeed.initialize(
        model=model, optimizer=opt, config="configs/zero2.json")   # reads the "lookahead" section

    engine, *_ = deepspeed.initialize(...)
    lookahead = lookahead_dist.deepspeed.install(engine, k=5, alpha=0.5)

The config section (all keys optional)::

    "lookahead": {"k": 5, "alpha": 0.5, "pullback": "none",
                  "alpha_bounds": [0.5, 1.0], "alpha_fallback": null,
                  "pullback_keys": ["momentum_buffer", "exp_avg"]}

Supported: stage 0 (fp32, and fp16/bf16 through FP16_Optimizer), ZeRO-1/2 (also bf16, CPU optimizer
offload), BF16_Optimizer (ZeRO-1 + bf16 + fp32 gradient accumulation), ZeRO-3 (also sub-groups,
persistent parameters, bf16, CPU optimizer offload). Refused at install: pipeline parallelism,
ZenFlow, SuperOffload, ZeRO-3 partial optimizer offload (``offload_optimizer.ratio`` < 1), NVMe
offload, and any optimizer wrapper this module does not know.

DeepSpeed itself does not accept ``"auto"`` batch sizes: the JSON files in ``configs/`` leave
``train_micro_batch_size_per_gpu`` and ``gradient_accumulation_steps`` out (Lightning fills them in;
with plain DeepSpeed add them to the dict before calling :func:`initialize`).
"""

from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .._versions import check_versions
from ..core.collectives import sum_over
from ..core.keys import CONFIG_KEY, GROUP_ALPHA
from ..core.optim import Lookahead
from ..core.settings import AlphaSpec, LookaheadConfigError, LookaheadSettings
from .checkpoint import (
    RESTORES_UNIVERSAL,
    IncompleteCheckpointError,
    check_checkpoint,
    load_checkpoint,
    resolve_load_tag,
    restore_if_universal,
    save_checkpoint,
)
from .config import parse_lookahead_config, settings_from_section, split_config
from .holders import (
    UnsupportedDeepSpeedModeError,
    data_parallel_group,
    find_lookahead,
    holder_for,
    refuse_unsupported,
)

__all__ = [
    "CONFIG_KEY",
    "IncompleteCheckpointError",
    "LookaheadConfigError",
    "UnsupportedDeepSpeedModeError",
    "check_checkpoint",
    "find_lookahead",
    "initialize",
    "install",
    "load_checkpoint",
    "parse_lookahead_config",
    "save_checkpoint",
    "settings_from_section",
    "split_config",
    "use_slow_weights",
]


# ---------------------------------------------------------------------------------------- engine
def initialize(*args: Any, **kwargs: Any) -> tuple[Any, Any, Any, Any]:
    """``deepspeed.initialize`` (same arguments and return value) plus Lookahead from the config.

    The ``"lookahead"`` section is removed before DeepSpeed sees the config; without one this is plain
    ``deepspeed.initialize``. The returned optimizer is DeepSpeed's (its inner optimizer is now wrapped);
    use :func:`find_lookahead` to reach the :class:`Lookahead`.
    """
    import deepspeed

    check_versions("deepspeed")
    bound = inspect.signature(deepspeed.initialize).bind(*args, **kwargs)
    arguments = bound.arguments
    ds_args: Any = arguments.get("args")
    if arguments.get("config") is not None:
        source = arguments["config"]
    elif arguments.get("config_params") is not None:
        source = arguments.pop("config_params")
    elif getattr(ds_args, "deepspeed_config", None) is not None:
        source = ds_args.deepspeed_config
        ds_args = copy.copy(ds_args)
        ds_args.deepspeed_config = None  # DeepSpeed refuses a config given both ways
        arguments["args"] = ds_args
    else:
        source = None
    if source is None:
        return deepspeed.initialize(*bound.args, **bound.kwargs)
    ds_config, lookahead_kwargs = split_config(source)
    arguments["config"] = ds_config
    settings = None if lookahead_kwargs is None else LookaheadSettings(**lookahead_kwargs)
    if settings is not None and settings.outer.scope == "nodes":
        # Cross-node Lookahead: the node-local data-parallel groups must exist before the engine does.
        from .outer import prepare_nodes

        prepare_nodes(arguments, settings)  # sets arguments["mpu"]
    engine, optimizer, loader, scheduler = deepspeed.initialize(*bound.args, **bound.kwargs)
    if settings is not None:
        install(engine, settings=settings)
    return engine, optimizer, loader, scheduler


def install(
    engine: Any,
    k: int = 5,
    alpha: AlphaSpec = 0.5,
    pullback: str = "none",
    *,
    settings: LookaheadSettings | None = None,
    **options: Any,
) -> Lookahead:
    """Wrap the engine's inner optimizer in :class:`Lookahead` and return it.

    ``options`` are the other :class:`~lookahead_dist.LookaheadSettings` fields (``alpha_bounds``,
    ``alpha_fallback``, ``pullback_keys``, ``nonfinite``); or pass ``settings`` instead of all of them.
    Under ZeRO every rank's Lookahead holds φ for that rank's fp32 partition only; adaptive-α partial
    sums are reduced over the data-parallel group (a fixed α adds no communication). Call it after
    ``deepspeed.initialize`` and before training or ``engine.load_checkpoint``.
    """
    check_versions("deepspeed")
    settings = _install_settings(k, alpha, pullback, settings, options)
    _check_installable(engine)
    refuse_unsupported(engine)
    holder = holder_for(engine)
    adaptive_groups = [
        index
        for index, group in enumerate(holder.inner.param_groups)
        if group.get(GROUP_ALPHA, settings.alpha) == "adaptive"
    ]
    if adaptive_groups:
        holder.check_adaptive(adaptive_groups)
    holder.prepare()
    if settings.outer.scope == "nodes":
        from .outer import OuterLookahead, check_engine, per_node_checkpoints

        topology = check_engine(engine)
        lookahead: Lookahead = OuterLookahead(
            holder.inner, settings=settings, topology=topology, allow_empty=holder.fills_groups_while_stepping
        )
    else:
        lookahead = Lookahead(
            holder.inner,
            settings=settings,
            reduce_fn=sum_over(data_parallel_group(engine)) if holder.sharded else None,
            allow_empty=holder.fills_groups_while_stepping,
        )
    holder.inner = lookahead
    _complete_universal_loads(engine)
    if settings.outer.scope == "nodes":
        per_node_checkpoints(engine, topology)
    return lookahead


def _install_settings(
    k: int, alpha: AlphaSpec, pullback: str, settings: LookaheadSettings | None, options: dict[str, Any]
) -> LookaheadSettings:
    if settings is None:
        unknown = sorted(set(options) - set(LookaheadSettings.names()))
        if unknown:
            raise TypeError(
                f"lookahead_dist.deepspeed.install: unknown option(s) {unknown}; the options are "
                f"{', '.join(LookaheadSettings.names())} (reduce_fn is set by install itself)."
            )
        settings = LookaheadSettings(k=k, alpha=alpha, pullback=pullback, **options)
    elif options or (k, alpha, pullback) != (5, 0.5, "none"):
        raise TypeError("lookahead_dist.deepspeed.install: pass either settings=... or keyword options, not both.")
    return settings


def _check_installable(engine: Any) -> None:
    if engine is None or not hasattr(engine, "optimizer"):
        raise TypeError(
            f"lookahead_dist.deepspeed.install: expected a DeepSpeed engine (the first value returned by "
            f"deepspeed.initialize), got {type(engine).__name__}."
        )
    if find_lookahead(engine) is not None:
        raise RuntimeError(
            "lookahead_dist.deepspeed.install: this engine already has a Lookahead; change its settings via "
            "find_lookahead(engine).settings instead of installing twice."
        )
    if getattr(engine, "loaded_checkpoint_dp_world_size", None) is not None:
        # Set by DeepSpeed at every completed engine.load_checkpoint. The loaded optimizer state then
        # lacks what only an installed Lookahead restores (universal checkpoints: the cycle position),
        # and it was loaded without the checks Lookahead.load_state_dict runs.
        raise RuntimeError(
            "lookahead_dist.deepspeed.install: this engine has already loaded a checkpoint; install "
            "Lookahead first, then call engine.load_checkpoint (or lookahead_dist.deepspeed.initialize with "
            'a "lookahead" config section, which installs before you load).'
        )


def _complete_universal_loads(engine: Any) -> None:
    """Make ``engine.load_checkpoint`` restore Lookahead's state from universal checkpoints too.

    Replaces ``load_checkpoint`` on this engine instance. The package's other patches of another library's
    objects: ``deepspeed/outer.py`` (``save_checkpoint``/``load_checkpoint`` of an engine under
    ``outer.scope="nodes"``, into per-node folders) and ``transformers/trainer_patches.py`` (``log``,
    ``evaluation_loop`` and ``accelerator.prepare`` of one Trainer); docs/architecture.md lists them all.
    Why this one cannot be an explicit call: users and Lightning's DeepSpeedStrategy call
    ``engine.load_checkpoint`` themselves, DeepSpeed has no hook after
    a load, and its universal loader restores only the optimizer-state keys it knows (ZeRO-3) and never
    the cycle counters, so a resume at another world size would silently restart the cycle. Regular
    checkpoints need nothing: φ and the counters are in the per-rank optimizer state.
    """
    original = engine.load_checkpoint
    # Version guard for the patch: it forwards (load_dir, tag, **kwargs); a DeepSpeed whose
    # load_checkpoint takes other arguments would silently lose them.
    parameters = list(inspect.signature(original).parameters)
    if parameters[:2] != ["load_dir", "tag"]:
        raise UnsupportedDeepSpeedModeError(
            f"lookahead_dist.deepspeed: engine.load_checkpoint{inspect.signature(original)} is not the "
            f"(load_dir, tag, ...) this adapter was written for; use the tested DeepSpeed 0.19.x."
        )

    def load_checkpoint(load_dir: Any, tag: Any = None, **kwargs: Any) -> Any:
        if not engine.load_universal_checkpoint() and (
            tag is not None or os.path.isfile(os.path.join(load_dir, "latest"))
        ):
            # Refuse a tag whose rank files are missing or truncated (a save cut short), on every rank
            # alike and before DeepSpeed half-loads it; lookahead_dist.deepspeed.load_checkpoint(...,
            # fallback=True) loads the last complete tag instead.
            tag = resolve_load_tag(load_dir, tag)
        result = original(load_dir, tag=tag, **kwargs)
        restore_if_universal(engine, load_dir, tag, kwargs, result)
        return result

    engine.load_checkpoint = load_checkpoint
    setattr(engine, RESTORES_UNIVERSAL, True)


# ---------------------------------------------------------------------------------------- slow weights
@contextmanager
def use_slow_weights(engine: Any) -> Iterator[None]:
    """Make the model compute with the slow weights φ inside the block; restore θ bit-exactly on exit.

    Call it between optimizer steps (e.g. for evaluation). Cost, per call:

    * stage 0: a local copy of the weights (fp32; fp16/bf16 masters are cast into the model weights);
    * ZeRO-1/2 and BF16_Optimizer: φ is cast into this rank's bit16 slice, then one all-gather of the
      bit16 weights (exactly the one DeepSpeed runs after every step); θ is restored from a local copy
      of the full bit16 weights (memory: one bit16 model copy), no gather;
    * ZeRO-3: φ is cast into this rank's bit16 partitions, which the forward gathers as usual; no
      extra gather, except that persistent parameters (``stage3_param_persistence_threshold``, small
      by definition) are re-gathered on entry and on exit, as DeepSpeed does after every step.
      Gathered copies left by earlier no-grad forwards are released on entry and exit (locally).

    Without a Lookahead on the engine this is a no-op. Before the first step φ = θ.
    """
    lookahead = find_lookahead(engine)
    if lookahead is None:
        yield
        return
    with torch.no_grad():
        restore = holder_for(engine).swap_in_slow(lookahead)
    try:
        yield
    finally:
        with torch.no_grad():
            restore()
