"""Lookahead under PyTorch FSDP: slow weights sharded like the parameters, no extra collectives.

FSDP2 (``torch.distributed.fsdp.fully_shard``) turns every parameter into a DTensor holding this rank's
shard, and an optimizer built on ``model.parameters()`` afterwards steps those shards. FSDP1
(``FullyShardedDataParallel(use_orig_params=True)``) hands the optimizer each parameter's local slice
of the flat shard. Either way :class:`~lookahead_dist.Lookahead` keeps φ in the inner optimizer's
per-tensor state, so φ has the parameter's placement (``Shard(0)``, uneven splits included) and takes
``1/N`` of a full copy per rank; the sync and :meth:`~lookahead_dist.Lookahead.use_slow_weights` work on
the local shards only, so they add no collective::

    fully_shard(layer) for each layer; fully_shard(model)
    opt = lookahead_dist.fsdp.wrap(torch.optim.AdamW(model.parameters()), k=5, alpha=0.5)

``wrap`` is ``Lookahead(...)`` plus the one thing FSDP needs beyond it: a ``reduce_fn`` that sums
``alpha="adaptive"``'s local partial sums over the ranks (one small all_reduce per sync; a fixed α needs
none). :func:`fast_slow_distance` does the same for ‖θ − φ‖.

Checkpoints: φ and the cycle counters are ordinary optimizer state, so torch.distributed.checkpoint's
recipe (``get_state_dict`` → ``dcp.save``; fresh model and optimizer → ``get_state_dict`` → ``dcp.load`` →
``set_state_dict``) keeps them, with either ``flatten_optimizer_state_dict`` setting.
:mod:`lookahead_dist.fsdp.checkpoint` writes the consolidated slow weights of such a checkpoint
(``python -m lookahead_dist.checkpoint slow-weights-dcp DIR OUT``).

Scope: the sums assume every stepped tensor is sharded over the group (FSDP2 on a 1-D mesh, FSDP1
FULL_SHARD / SHARD_GRAD_OP). Under HSDP pass the shard group as ``group``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..core.collectives import all_reduce_sum_, sum_over
from ..core.optim import Lookahead
from ..core.settings import LookaheadSettings
from ..core.sync import local

__all__ = ["fast_slow_distance", "is_dtensor", "local_tensor", "wrap"]


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a DTensor (an FSDP2 parameter or state tensor)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(t, DTensor)


def local_tensor(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (a view, no communication); any other tensor as it is."""
    return local(t)


def wrap(
    optimizer: torch.optim.Optimizer,
    *,
    settings: LookaheadSettings | None = None,
    group: Any = None,
    **keywords: Any,
) -> Lookahead:
    """``Lookahead(optimizer, ...)`` for an optimizer over FSDP-sharded parameters.

    Args:
        optimizer: the inner optimizer, built on the parameters *after* ``fully_shard`` / FSDP wrapping
            (so that it steps the shards).
        settings: a :class:`~lookahead_dist.LookaheadSettings`, or the same options as keywords
            (``k``, ``alpha``, ``pullback``, ...).
        group: the process group the parameters are sharded over (default: the world).
    """
    _check_sharded(optimizer)
    return Lookahead(optimizer, settings=settings, reduce_fn=sum_over(group), **keywords)


def _check_sharded(optimizer: torch.optim.Optimizer) -> None:
    params = [p for g in optimizer.param_groups for p in g["params"]]
    dtensors = [is_dtensor(p) for p in params]
    if any(dtensors) and not all(dtensors):
        raise ValueError(
            f"lookahead_dist.fsdp.wrap: {dtensors.count(False)} of the optimizer's {len(params)} parameters are "
            f"plain tensors next to FSDP2 DTensors, so the cross-rank sums would count them once per rank. "
            f"Apply fully_shard to the root module too (it shards every parameter left over), then build the "
            f"optimizer from model.parameters()."
        )


def fast_slow_distance(optimizer: Lookahead, group: Any = None) -> float:
    """‖θ − φ‖ over the whole model: this rank's shard sum, reduced once (one scalar all_reduce)."""
    partial = optimizer.fast_slow_distance_sq()
    all_reduce_sum_(partial, group)
    return math.sqrt(max(float(partial), 0.0))
