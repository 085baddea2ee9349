"""The only collectives the package issues: sum a small tensor over a group, broadcast tensors from one rank.

Every adapter reduces through these two functions, so the rule for backends lives in one place: gloo
moves CPU tensors, NCCL (and the other accelerator backends) only device tensors, so a CPU tensor over a
non-gloo group travels through the current accelerator device and back. Outside an initialised process
group, or in a group of one, both do nothing: one process already holds every shard.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["all_reduce_sum_", "broadcast_", "sum_over"]


def _active(group: Any) -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _via_device(t: Tensor, group: Any) -> bool:
    """Whether ``t`` must be copied to the accelerator before a collective over ``group``."""
    return t.device.type == "cpu" and torch.distributed.get_backend(group) != "gloo"


def _device() -> torch.device:
    accelerator = torch.accelerator.current_accelerator()
    if accelerator is None:
        raise RuntimeError("a non-gloo process group needs an accelerator, and torch sees none")
    return torch.device(accelerator.type, torch.accelerator.current_device_index())


def all_reduce_sum_(t: Tensor, group: Any = None) -> Tensor:
    """Sum ``t`` over ``group`` in place (the default group when None) and return it."""
    if not _active(group):
        return t
    if _via_device(t, group):
        moved = t.to(_device())
        torch.distributed.all_reduce(moved, op=torch.distributed.ReduceOp.SUM, group=group)
        t.copy_(moved)
    else:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM, group=group)
    return t


def broadcast_(tensors: Sequence[Tensor], src: int = 0, group: Any = None) -> None:
    """Overwrite each tensor with global rank ``src``'s copy, in place, one broadcast per tensor."""
    if not _active(group):
        return
    for t in tensors:
        if _via_device(t, group):
            moved = t.to(_device())
            torch.distributed.broadcast(moved, src=src, group=group)
            t.copy_(moved)
        else:
            torch.distributed.broadcast(t, src=src, group=group)


def sum_over(group: Any = None) -> Callable[[Tensor], None]:
    """A ``reduce_fn`` for :class:`~lookahead_dist.Lookahead`: in-place sum of its partial sums over ``group``."""

    def reduce(t: Tensor) -> None:
        all_reduce_sum_(t, group)

    return reduce
