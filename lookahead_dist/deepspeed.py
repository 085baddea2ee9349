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
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from ._versions import check_versions
from .optim import PULLBACK_MODES, SLOW_KEY, AlphaSpec, Lookahead, _check_alpha, _check_k

__all__ = [
    "CONFIG_KEY",
    "LookaheadConfigError",
    "UnsupportedDeepSpeedModeError",
    "find_lookahead",
    "initialize",
    "install",
    "parse_lookahead_config",
    "split_config",
    "use_slow_weights",
]

#: Top-level key of the Lookahead section in a DeepSpeed config.
CONFIG_KEY = "lookahead"
_SECTION_DEFAULTS: dict[str, Any] = {
    "k": 5,
    "alpha": 0.5,
    "pullback": "none",
    "alpha_bounds": (0.5, 1.0),
    "alpha_fallback": None,
    "pullback_keys": ("momentum_buffer", "exp_avg"),
}


class LookaheadConfigError(ValueError):
    """The ``"lookahead"`` section of a DeepSpeed config is invalid."""


class UnsupportedDeepSpeedModeError(RuntimeError):
    """The engine runs a DeepSpeed mode in which Lookahead's slow weights would be wrong or lost."""


# ---------------------------------------------------------------------------------------- config
def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _config_error(path: str, value: Any, allowed: str) -> LookaheadConfigError:
    return LookaheadConfigError(f"DeepSpeed config: {path}={value!r} is invalid; {allowed}.")


def parse_lookahead_config(section: Any) -> dict[str, Any]:
    """Validate a ``"lookahead"`` section and return keyword arguments for :func:`install`."""
    where = CONFIG_KEY
    if not isinstance(section, dict):
        raise _config_error(where, section, 'it must be an object such as {"k": 5, "alpha": 0.5}')
    unknown = sorted(set(section) - set(_SECTION_DEFAULTS))
    if unknown:
        raise LookaheadConfigError(
            f"DeepSpeed config: unknown key(s) {', '.join(f'{where}.{key}' for key in unknown)}; "
            f"allowed keys are {', '.join(_SECTION_DEFAULTS)}."
        )
    out = {key: section.get(key, default) for key, default in _SECTION_DEFAULTS.items()}

    k = out["k"]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise _config_error(f"{where}.k", k, "it must be a positive integer (inner steps per cycle), e.g. 5")
    alpha = out["alpha"]
    if alpha != "adaptive" and not (_is_number(alpha) and 0.0 < alpha <= 1.0):
        raise _config_error(f"{where}.alpha", alpha, 'it must be a number in (0, 1] or "adaptive", e.g. 0.5')
    if out["pullback"] not in PULLBACK_MODES:
        raise _config_error(f"{where}.pullback", out["pullback"], f"it must be one of {list(PULLBACK_MODES)}")
    bounds = out["alpha_bounds"]
    if (
        not isinstance(bounds, (list, tuple))
        or len(bounds) != 2
        or not all(_is_number(b) and 0.0 < b <= 1.0 for b in bounds)
        or bounds[0] > bounds[1]
    ):
        raise _config_error(
            f"{where}.alpha_bounds", bounds, "it must be [low, high] with 0 < low <= high <= 1, e.g. [0.5, 1.0]"
        )
    out["alpha_bounds"] = (float(bounds[0]), float(bounds[1]))
    fallback = out["alpha_fallback"]
    if fallback is not None and not (_is_number(fallback) and 0.0 < fallback <= 1.0):
        raise _config_error(f"{where}.alpha_fallback", fallback, "it must be null or a number in (0, 1]")
    keys = out["pullback_keys"]
    if not isinstance(keys, (list, tuple)) or not all(isinstance(key, str) and key for key in keys):
        raise _config_error(
            f"{where}.pullback_keys", keys, 'it must be a list of optimizer-state names, e.g. ["exp_avg"]'
        )
    out["pullback_keys"] = tuple(keys)
    return out


def _load_config(config: Any) -> dict[str, Any]:
    if isinstance(config, dict):
        return copy.deepcopy(config)
    if isinstance(config, (str, os.PathLike)):
        with open(config) as f:
            loaded = json.load(f)
        if not isinstance(loaded, dict):
            raise LookaheadConfigError(f"DeepSpeed config file {os.fspath(config)!r} must hold a JSON object.")
        return loaded
    raise LookaheadConfigError(
        f"DeepSpeed config must be a dict or a path to a JSON file, got {type(config).__name__}."
    )


def split_config(config: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``(DeepSpeed config without the lookahead section, install kwargs or None)``."""
    ds_config = _load_config(config)
    section = ds_config.pop(CONFIG_KEY, None)
    return ds_config, (None if section is None else parse_lookahead_config(section))


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
    engine, optimizer, loader, scheduler = deepspeed.initialize(*bound.args, **bound.kwargs)
    if lookahead_kwargs is not None:
        install(engine, **lookahead_kwargs)
    return engine, optimizer, loader, scheduler


def _refuse_unsupported(engine: Any) -> None:
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum

    def refuse(what: str, fix: str) -> None:
        raise UnsupportedDeepSpeedModeError(
            f"lookahead_dist.deepspeed: {what} is not supported; {fix}. Lookahead would train with wrong or "
            f"lost slow weights there, so it is refused instead."
        )

    if getattr(engine, "pipeline_parallelism", False) or type(engine).__name__ == "PipelineEngine":
        refuse("pipeline parallelism (PipelineModule / PipelineEngine)", "train without pipeline stages")
    if getattr(engine, "zenflow", False):
        refuse("ZenFlow (zero_optimization.zenflow)", "remove the zenflow section")
    zero_config = engine._config.zero_config
    offload_opt = zero_config.offload_optimizer
    offload_param = zero_config.offload_param
    if offload_opt is not None and getattr(offload_opt, "super_offload", False):
        refuse("SuperOffload (offload_optimizer.super_offload)", "set super_offload to false")
    if offload_opt is not None and offload_opt.device == OffloadDeviceEnum.nvme:
        refuse('NVMe optimizer offload (offload_optimizer.device="nvme")', 'use device "cpu" or "none"')
    if offload_param is not None and offload_param.device == OffloadDeviceEnum.nvme:
        refuse('NVMe parameter offload (offload_param.device="nvme")', 'use device "cpu" or "none"')
    if (
        engine.zero_optimization_stage() == 3
        and offload_opt is not None
        and offload_opt.device != OffloadDeviceEnum.none
        and float(getattr(offload_opt, "ratio", 1.0)) != 1.0
    ):
        refuse(
            f"ZeRO-3 partial optimizer offload (offload_optimizer.ratio={offload_opt.ratio})",
            "set offload_optimizer.ratio to 1.0 or disable offload_optimizer",
        )


def _holder_kind(engine: Any) -> str:
    """Which DeepSpeed object holds the inner optimizer: "zero12", "zero3", "bf16", "fp16", "plain"."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    holder = engine.optimizer
    if holder is None:
        raise UnsupportedDeepSpeedModeError(
            "lookahead_dist.deepspeed: the engine has no optimizer; pass optimizer=... or an "
            '"optimizer" section to deepspeed.initialize.'
        )
    kinds = [
        (DeepSpeedZeroOptimizer_Stage3, "zero3"),
        (DeepSpeedZeroOptimizer, "zero12"),
        (BF16_Optimizer, "bf16"),
        (FP16_Optimizer, "fp16"),
        (FP16_UnfusedOptimizer, "fp16"),
    ]
    for cls, kind in kinds:
        if type(holder) is cls:
            return kind
    if type(holder).__module__.startswith("deepspeed."):
        raise UnsupportedDeepSpeedModeError(
            f"lookahead_dist.deepspeed: DeepSpeed optimizer wrapper {type(holder).__name__} is not supported "
            f"(supported: stage 0, ZeRO-1/2, BF16_Optimizer, FP16_Optimizer, ZeRO-3)."
        )
    if not isinstance(holder, torch.optim.Optimizer) or engine.zero_optimization_stage() != 0:
        raise UnsupportedDeepSpeedModeError(
            f"lookahead_dist.deepspeed: unexpected engine.optimizer of type {type(holder).__name__}; "
            f"expected a DeepSpeed ZeRO/FP16/BF16 wrapper or, for stage 0 fp32, a torch optimizer."
        )
    return "plain"


def find_lookahead(engine: Any) -> Lookahead | None:
    """The :class:`Lookahead` installed on ``engine``, or ``None``."""
    holder = getattr(engine, "optimizer", None)
    if isinstance(holder, Lookahead):
        return holder
    inner = getattr(holder, "optimizer", None)
    return inner if isinstance(inner, Lookahead) else None


def _dp_all_reduce(engine: Any) -> Any:
    """In-place SUM over the engine's data-parallel group (for alpha="adaptive" partial sums only)."""
    import deepspeed.comm as dist
    from deepspeed.accelerator import get_accelerator

    group = engine.seq_data_parallel_group

    def all_reduce_sum(t: Tensor) -> None:
        if torch.distributed.get_backend(group) == "gloo":
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
            return
        buf = t.to(get_accelerator().current_device_name())
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
        t.copy_(buf)

    return all_reduce_sum


def install(
    engine: Any, k: int = 5, alpha: AlphaSpec = 0.5, pullback: str = "none", **kwargs: Any
) -> Lookahead:
    """Wrap the engine's inner optimizer in :class:`Lookahead` and return it.

    ``kwargs`` go to :class:`Lookahead` (``alpha_bounds``, ``alpha_fallback``, ``pullback_keys``).
    Under ZeRO every rank's Lookahead holds φ for that rank's fp32 partition only; ``reduce_fn`` is
    set to an all-reduce over the data-parallel group, used only by ``alpha="adaptive"`` (a fixed α
    adds no communication). Call it after ``deepspeed.initialize`` and before training or
    ``engine.load_checkpoint``.
    """
    check_versions("deepspeed")
    _check_k(k)
    _check_alpha(alpha)
    if "reduce_fn" in kwargs or "_allow_empty" in kwargs:
        raise TypeError("lookahead_dist.deepspeed.install sets reduce_fn and _allow_empty itself; drop them.")
    if find_lookahead(engine) is not None:
        raise RuntimeError(
            "lookahead_dist.deepspeed.install: this engine already has a Lookahead; change its k/alpha via "
            "find_lookahead(engine) instead of installing twice."
        )
    _refuse_unsupported(engine)
    kind = _holder_kind(engine)
    if kind == "zero3" and alpha == "adaptive":
        from .adaptive import check_zero3_sub_groups

        check_zero3_sub_groups(engine.optimizer)
    sharded = kind in ("zero12", "zero3", "bf16")
    make = lambda inner: Lookahead(
        inner,
        k,
        alpha,
        pullback,
        reduce_fn=_dp_all_reduce(engine) if sharded else None,
        _allow_empty=kind == "zero3",
        **kwargs,
    )
    if kind == "plain":
        lookahead = make(engine.optimizer)
        engine.optimizer = lookahead  # the LR scheduler keeps the inner: same param_groups dicts
    else:
        lookahead = make(engine.optimizer.optimizer)
        engine.optimizer.optimizer = lookahead
    _complete_universal_loads(engine)
    return lookahead


def _complete_universal_loads(engine: Any) -> None:
    """Make ``engine.load_checkpoint`` restore Lookahead's state from universal checkpoints too.

    DeepSpeed's universal loader restores only the optimizer-state keys it knows (ZeRO-3) and never the
    cycle counters; without this, a resume at another world size would silently restart the cycle.
    Regular checkpoints need nothing: φ and the counters are in the per-rank optimizer state.
    """
    from .checkpoint import restore_if_universal

    original = engine.load_checkpoint

    def load_checkpoint(load_dir: Any, tag: Any = None, **kwargs: Any) -> Any:
        result = original(load_dir, tag=tag, **kwargs)
        restore_if_universal(engine, load_dir, tag, kwargs, result)
        return result

    load_checkpoint.lookahead_restores_universal = True  # type: ignore[attr-defined]
    engine.load_checkpoint = load_checkpoint


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
    kind = _holder_kind(engine)
    with torch.no_grad():
        if kind == "plain":
            with lookahead.use_slow_weights():
                yield
            return
        restore = {
            "zero12": _swap_in_zero12,
            "bf16": _swap_in_bf16,
            "zero3": _swap_in_zero3,
            "fp16": _swap_in_fp16,
        }[kind](engine.optimizer, lookahead)
    try:
        yield
    finally:
        with torch.no_grad():
            restore()


def _slow_or_fast(lookahead: Lookahead, p: Tensor) -> Tensor:
    return lookahead.state.get(p, {}).get(SLOW_KEY, p)


def _swap_into_partitions(
    opt: Any, lookahead: Lookahead, flats: list[Tensor], partitions: list[list[Tensor]], masters: list[Tensor]
) -> Any:
    """ZeRO-1/2 and BF16_Optimizer: write φ into this rank's bit16 slice and all-gather once."""
    import deepspeed.comm as dist
    from deepspeed.runtime.utils import all_gather_dp_groups

    backups = [flat.detach().clone() for flat in flats]
    for i, master in enumerate(masters):
        partition_id = dist.get_rank(group=opt.real_dp_process_group[i])
        partitions[i][partition_id].data.copy_(_slow_or_fast(lookahead, master))
    all_gather_dp_groups(
        groups_flat=flats,
        partitioned_param_groups=partitions,
        dp_process_group=opt.real_dp_process_group,
        start_alignment_factor=opt.nccl_start_alignment_factor,
        allgather_bucket_size=opt.allgather_bucket_size,
    )

    def restore() -> None:
        for flat, backup in zip(flats, backups):
            flat.data.copy_(backup)

    return restore


def _swap_in_zero12(opt: Any, lookahead: Lookahead) -> Any:
    return _swap_into_partitions(
        opt, lookahead, opt.bit16_groups_flat, opt.parallel_partitioned_bit16_groups, opt.single_partition_of_fp32_groups
    )


def _swap_in_bf16(opt: Any, lookahead: Lookahead) -> Any:
    return _swap_into_partitions(
        opt, lookahead, opt.bf16_groups_flat, opt.bf16_partitioned_groups, opt.fp32_groups_flat_partition
    )


def _swap_in_zero3(opt: Any, lookahead: Lookahead) -> Any:
    flats = opt.fp16_partitioned_groups_flat
    if any(flat is None for flat in flats):
        raise UnsupportedDeepSpeedModeError(
            "lookahead_dist.deepspeed.use_slow_weights: ZeRO-3 parameter partitions are swapped out (NVMe)."
        )
    persistent = list(opt.persistent_parameters)

    def refresh_gathered() -> None:
        # Drop every gathered copy (an earlier no-grad forward leaves them gathered), as DeepSpeed does
        # at the start of each step, then re-gather the persistent ones, as its _post_step does.
        opt._partition_all_parameters()
        if persistent:
            persistent[0].all_gather(persistent)

    # fp32 without offload: the fp32 flat *is* the bit16 flat, so back it up before writing φ.
    backups = [flat.detach().clone() for flat in flats]
    for flat, master in zip(flats, opt.fp32_partitioned_groups_flat):
        flat.data.copy_(_slow_or_fast(lookahead, master))
    refresh_gathered()

    def restore() -> None:
        for flat, backup in zip(flats, backups):
            flat.data.copy_(backup)
        refresh_gathered()

    return restore


def _swap_in_fp16(opt: Any, lookahead: Lookahead) -> Any:
    """Stage 0 fp16/bf16: cast φ of the fp32 masters into the model's low-precision weights."""
    from torch._utils import _unflatten_dense_tensors

    model_groups: list[list[Tensor]] = opt.fp16_groups
    if hasattr(opt, "fp32_groups_flat"):  # FP16_Optimizer: one flat master per group
        slow_groups = [
            _unflatten_dense_tensors(_slow_or_fast(lookahead, flat), group)
            for flat, group in zip(opt.fp32_groups_flat, model_groups)
        ]
    else:  # FP16_UnfusedOptimizer: one master per parameter
        slow_groups = [[_slow_or_fast(lookahead, m) for m in group] for group in opt.fp32_groups]
    params = [p for group in model_groups for p in group]
    backups = [p.detach().clone() for p in params]
    for p, slow in zip(params, (s for group in slow_groups for s in group)):
        p.data.copy_(slow)

    def restore() -> None:
        for p, backup in zip(params, backups):
            p.data.copy_(backup)

    return restore
