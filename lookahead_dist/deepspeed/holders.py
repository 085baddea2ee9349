"""The DeepSpeed objects that hold the inner optimizer, one small class per kind.

DeepSpeed wraps the optimizer you give it in a *holder* (the ZeRO optimizer, BF16_Optimizer, ...) whose
``.optimizer`` is the inner optimizer, stepped on this rank's fp32 partition(s). Each class here knows
one holder's private layout and exposes three things: the inner optimizer (to wrap it), a swap of φ into
the weights the model computes with (evaluation on slow weights), and how its fp32 partitions are laid
out (for checkpoints). Every DeepSpeed private attribute the package touches is read in this module or
in :mod:`lookahead_dist.deepspeed.checkpoint`, so a DeepSpeed upgrade is a review of this folder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..core.keys import SLOW_KEY
from ..core.optim import Lookahead

__all__ = ["Holder", "UnsupportedDeepSpeedModeError", "find_lookahead", "holder_for"]

Restore = Callable[[], None]


class UnsupportedDeepSpeedModeError(RuntimeError):
    """The engine runs a DeepSpeed mode in which Lookahead's slow weights would be wrong or lost."""


def _slow_or_fast(lookahead: Lookahead, p: Tensor) -> Tensor:
    return lookahead.state.get(p, {}).get(SLOW_KEY, p)


class Holder:
    """Stage 0 fp32: ``engine.optimizer`` is the user's torch optimizer itself."""

    #: Whether each rank steps only its shard of the weights (then adaptive-α sums need a reduction).
    sharded: ClassVar[bool] = False
    #: Whether the inner param groups are filled only while a sub-group steps (ZeRO-3).
    fills_groups_while_stepping: ClassVar[bool] = False

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.zero = engine.optimizer  # the holder object (for stage 0 fp32: the torch optimizer)

    @property
    def inner(self) -> Optimizer:
        return self.zero

    @inner.setter
    def inner(self, optimizer: Optimizer) -> None:
        # The LR scheduler keeps the old object: same param_groups dicts, so it keeps working.
        self.engine.optimizer = optimizer

    def check_adaptive(self, adaptive_groups: list[int]) -> None:
        """Refuse configurations in which one α per param group cannot be formed for these groups."""

    def prepare(self) -> None:
        """Bring the holder's partitions into the state Lookahead assumes, before the first step."""

    def swap_in_slow(self, lookahead: Lookahead) -> Restore:
        """Make the model compute with φ; the returned function restores θ bit-exactly."""
        swap = lookahead.use_slow_weights()  # stage 0 fp32: φ lives beside the model's own weights
        swap.__enter__()

        def restore() -> None:
            swap.__exit__(None, None, None)

        return restore


class _WrappingHolder(Holder):
    """Holders whose ``.optimizer`` is the inner optimizer."""

    @property
    def inner(self) -> Optimizer:
        return self.zero.optimizer

    @inner.setter
    def inner(self, optimizer: Optimizer) -> None:
        self.zero.optimizer = optimizer


class _PartitionedHolder(_WrappingHolder):
    """ZeRO-1/2 and BF16_Optimizer: flat bit16 groups, one fp32 partition per group on each rank."""

    sharded = True

    def bit16_flats(self) -> list[Tensor]:
        raise NotImplementedError

    def bit16_partitions(self) -> list[list[Tensor]]:
        raise NotImplementedError

    def fp32_partitions(self) -> list[Tensor]:
        raise NotImplementedError

    def swap_in_slow(self, lookahead: Lookahead) -> Restore:
        # Cast φ into this rank's bit16 slice and all-gather once: the same gather DeepSpeed runs
        # after every step. θ comes back from a local copy of the full bit16 weights, with no gather.
        import deepspeed.comm as dist
        from deepspeed.runtime.utils import all_gather_dp_groups

        zero = self.zero
        flats, partitions = self.bit16_flats(), self.bit16_partitions()
        backups = [flat.detach().clone() for flat in flats]
        for i, master in enumerate(self.fp32_partitions()):
            partition_id = dist.get_rank(group=zero.real_dp_process_group[i])
            partitions[i][partition_id].data.copy_(_slow_or_fast(lookahead, master))
        all_gather_dp_groups(
            groups_flat=flats,
            partitioned_param_groups=partitions,
            dp_process_group=zero.real_dp_process_group,
            start_alignment_factor=zero.nccl_start_alignment_factor,
            allgather_bucket_size=zero.allgather_bucket_size,
        )

        def restore() -> None:
            for flat, backup in zip(flats, backups):
                flat.data.copy_(backup)

        return restore


class Zero12Holder(_PartitionedHolder):
    """``DeepSpeedZeroOptimizer`` (ZeRO-1/2): steps the inner optimizer once per param group."""

    def bit16_flats(self) -> list[Tensor]:
        return self.zero.bit16_groups_flat

    def bit16_partitions(self) -> list[list[Tensor]]:
        return self.zero.parallel_partitioned_bit16_groups

    def fp32_partitions(self) -> list[Tensor]:
        return self.zero.single_partition_of_fp32_groups


class BF16Holder(_PartitionedHolder):
    """``BF16_Optimizer`` (ZeRO-1 + bf16 + fp32 gradient accumulation): steps once per step."""

    def bit16_flats(self) -> list[Tensor]:
        return self.zero.bf16_groups_flat

    def bit16_partitions(self) -> list[list[Tensor]]:
        return self.zero.bf16_partitioned_groups

    def fp32_partitions(self) -> list[Tensor]:
        return self.zero.fp32_groups_flat_partition


class Zero3Holder(_WrappingHolder):
    """``DeepSpeedZeroOptimizer_Stage3``: the inner groups hold one sub-group's fp32 flat while it steps."""

    sharded = True
    fills_groups_while_stepping = True

    def fp32_partitions(self) -> list[Tensor]:
        return self.zero.fp32_partitioned_groups_flat

    def check_adaptive(self, adaptive_groups: list[int]) -> None:
        check_zero3_sub_groups(self.zero, adaptive_groups)

    def prepare(self) -> None:
        # Each parameter's partition is padded to the same size on every rank, and DeepSpeed allocates the
        # padding without initialising it. Zero it in the fp32 partitions: otherwise φ − θ carries garbage
        # there (decoupled weight decay scales it every step), which reaches the adaptive-α sums, the
        # distance and the non-finite check.
        import deepspeed.comm as dist

        rank = dist.get_rank(group=self.zero.dp_process_group)
        with torch.no_grad():
            for params, flat in zip(self.zero.fp16_groups, self.fp32_partitions()):
                if flat is None or flat.numel() == 0:  # swapped out (NVMe): refused elsewhere
                    continue
                offset = 0
                for param in params:
                    size = param.ds_tensor.ds_numel
                    valid = max(0, min(size, param.ds_numel - rank * size))
                    if valid < size:
                        flat.narrow(0, offset + valid, size - valid).zero_()
                    offset += size

    def swap_in_slow(self, lookahead: Lookahead) -> Restore:
        # φ goes into this rank's bit16 partitions, which the next forward gathers as usual.
        zero = self.zero
        flats = zero.fp16_partitioned_groups_flat
        if any(flat is None for flat in flats):
            raise UnsupportedDeepSpeedModeError(
                "lookahead_dist.deepspeed.use_slow_weights: ZeRO-3 parameter partitions are swapped out (NVMe)."
            )
        persistent = list(zero.persistent_parameters)

        def refresh_gathered() -> None:
            # Drop every gathered copy (an earlier no-grad forward leaves them gathered), as DeepSpeed does
            # at the start of each step, then re-gather the persistent ones, as it does after each step.
            zero._partition_all_parameters()
            if persistent:
                persistent[0].all_gather(persistent)

        # fp32 without offload: the fp32 flat *is* the bit16 flat, so back it up before writing φ.
        backups = [flat.detach().clone() for flat in flats]
        for flat, master in zip(flats, self.fp32_partitions()):
            flat.data.copy_(_slow_or_fast(lookahead, master))
        refresh_gathered()

        def restore() -> None:
            for flat, backup in zip(flats, backups):
                flat.data.copy_(backup)
            refresh_gathered()

        return restore


class FP16Holder(_WrappingHolder):
    """Stage 0 with fp16/bf16: ``FP16_Optimizer`` (flat masters) or ``FP16_UnfusedOptimizer``."""

    def swap_in_slow(self, lookahead: Lookahead) -> Restore:
        from torch._utils import _unflatten_dense_tensors

        zero = self.zero
        model_groups: list[list[Tensor]] = zero.fp16_groups
        if hasattr(zero, "fp32_groups_flat"):  # FP16_Optimizer: one flat master per group
            slow_groups = [
                _unflatten_dense_tensors(_slow_or_fast(lookahead, flat), group)
                for flat, group in zip(zero.fp32_groups_flat, model_groups)
            ]
        else:  # FP16_UnfusedOptimizer: one master per parameter
            slow_groups = [[_slow_or_fast(lookahead, m) for m in group] for group in zero.fp32_groups]
        params = [p for group in model_groups for p in group]
        backups = [p.detach().clone() for p in params]
        for p, slow in zip(params, (s for group in slow_groups for s in group)):
            p.data.copy_(slow)

        def restore() -> None:
            for p, backup in zip(params, backups):
                p.data.copy_(backup)

        return restore


def find_lookahead(engine: Any) -> Lookahead | None:
    """The :class:`Lookahead` installed on ``engine``, or ``None``."""
    zero = getattr(engine, "optimizer", None)
    if isinstance(zero, Lookahead):
        return zero
    inner = getattr(zero, "optimizer", None)
    return inner if isinstance(inner, Lookahead) else None


def holder_for(engine: Any) -> Holder:
    """The :class:`Holder` for ``engine.optimizer``, or :class:`UnsupportedDeepSpeedModeError`."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    zero = engine.optimizer
    if zero is None:
        raise UnsupportedDeepSpeedModeError(
            "lookahead_dist.deepspeed: the engine has no optimizer; pass optimizer=... or an "
            '"optimizer" section to deepspeed.initialize.'
        )
    kinds: list[tuple[type, type[Holder]]] = [
        (DeepSpeedZeroOptimizer_Stage3, Zero3Holder),
        (DeepSpeedZeroOptimizer, Zero12Holder),
        (BF16_Optimizer, BF16Holder),
        (FP16_Optimizer, FP16Holder),
        (FP16_UnfusedOptimizer, FP16Holder),
    ]
    for cls, holder in kinds:
        if type(zero) is cls:  # exact: subclasses (SuperOffload, ...) change the layout
            return holder(engine)
    if type(zero).__module__.startswith("deepspeed."):
        raise UnsupportedDeepSpeedModeError(
            f"lookahead_dist.deepspeed: DeepSpeed optimizer wrapper {type(zero).__name__} is not supported "
            f"(supported: stage 0, ZeRO-1/2, BF16_Optimizer, FP16_Optimizer, ZeRO-3)."
        )
    if not isinstance(zero, torch.optim.Optimizer) or engine.zero_optimization_stage() != 0:
        raise UnsupportedDeepSpeedModeError(
            f"lookahead_dist.deepspeed: unexpected engine.optimizer of type {type(zero).__name__}; "
            f"expected a DeepSpeed ZeRO/FP16/BF16 wrapper or, for stage 0 fp32, a torch optimizer."
        )
    return Holder(engine)


def check_zero3_sub_groups(zero: Any, adaptive_groups: Iterable[int] | None = None) -> None:
    """Refuse ZeRO-3 sub-grouping that splits a param group using ``alpha="adaptive"``.

    ``adaptive_groups``: the param-group indices whose α is adaptive (``None``: every group).
    """
    # Several sub-groups of one param group each sync (and lerp) before the next one's sums exist,
    # so one α for the group cannot be formed.
    mapping = getattr(zero, "sub_group_to_group_id", None)
    if not isinstance(mapping, Mapping) or not mapping:
        return
    pieces: dict[int, int] = {}
    for group_id in mapping.values():
        pieces[group_id] = pieces.get(group_id, 0) + 1
    wanted = set(pieces) if adaptive_groups is None else set(adaptive_groups)
    split = sorted(g for g, n in pieces.items() if n > 1 and g in wanted)
    if split:
        sizes = ", ".join(f"group {g}: {pieces[g]} sub-groups" for g in split)
        raise ValueError(
            f"Lookahead: alpha='adaptive' needs each param group stepped in one piece under ZeRO-3, but "
            f"zero_optimization.sub_group_size={getattr(zero, 'sub_group_size', '?')} splits "
            f"param groups ({sizes}). Raise sub_group_size to at least the largest param group's "
            f"number of elements, or use a fixed alpha (e.g. alpha=0.5)."
        )


def refuse_unsupported(engine: Any) -> None:
    """Refuse engine modes the design does not cover (they would train with wrong or lost φ)."""
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


def data_parallel_group(engine: Any) -> Any:
    """The process group ZeRO partitions over (data x sequence parallel): where shard sums are reduced."""
    return engine.seq_data_parallel_group
