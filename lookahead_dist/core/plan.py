"""Lookahead's bookkeeping: which tensors have slow weights, their cycle counters, their syncs. Torch only.

:class:`StepPlan` caches, across steps, what a step needs to know about the inner optimizer's param groups
(the tensors with slow weights and their state dicts, grouped by device and dtype for the sync) and keeps
each tensor's number of syncs for ``Lookahead.sync_count``. :func:`advance_counters` is the per-step
counting. Both read and write the counters with C-level ``map`` calls over a group's lists: the usual step
(every tensor of a group has a gradient and the same count) runs no Python code per tensor. :func:`claim`
keeps one live Lookahead per inner optimizer (two would share and double-advance the counters).
"""

from __future__ import annotations

import operator
import weakref
from collections import deque
from itertools import repeat
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .keys import COUNT_KEY, SLOW_KEY
from .sync import SyncPlan, local

__all__ = ["Bucket", "Counted", "StepPlan", "advance_counters", "claim", "maybe_dtensor", "set_counts", "uncached_buckets"]

_GRAD = operator.attrgetter("grad")
_COUNT = operator.itemgetter(COUNT_KEY)
_SLOW = operator.itemgetter(SLOW_KEY)

#: Per tensor state dict of the inner optimizer.
State = dict[str, Any]


# Inner optimizer -> its live Lookahead: a second wrapper on the same inner optimizer would share (and
# double-advance) the counters. Weak on both sides, so a dropped wrapper frees the inner optimizer.
_OWNERS: weakref.WeakKeyDictionary[Any, weakref.ref[Any]] = weakref.WeakKeyDictionary()


def claim(optimizer: Any, wrapper: Any) -> None:
    """Record ``wrapper`` as the one Lookahead of ``optimizer``; refuse a second live one."""
    ref = _OWNERS.get(optimizer)
    owner = ref() if ref is not None else None
    if owner is not None and owner is not wrapper:
        raise ValueError(
            f"Lookahead: this {type(optimizer).__name__} is already wrapped by another Lookahead "
            f"(k={owner.k}, alpha={owner.alpha!r}); two wrappers would share and double-advance its cycle "
            f"counters. Use the existing wrapper (change its k/alpha with `opt.settings = "
            f"opt.settings.replace(...)`), or build a new inner optimizer."
        )
    _OWNERS[optimizer] = weakref.ref(wrapper)


def set_counts(states: list[State], count: int) -> None:
    """``state[COUNT_KEY] = count`` for every state dict, iterated in C (map + a zero-length deque)."""
    deque(map(operator.setitem, states, repeat(COUNT_KEY), repeat(count)), maxlen=0)


def maybe_dtensor(p: Tensor) -> bool:
    """Anything but a plain tensor/Parameter goes through ``sync.local()`` (DTensor: its local shard)."""
    return type(p) is not Tensor and type(p) is not torch.nn.Parameter


class Bucket(NamedTuple):
    """Tensors of one group with one (device, dtype): what one :class:`SyncPlan` syncs."""

    params: list[Tensor]
    plan: SyncPlan


class StepPlan:
    """What a step needs, cached across steps while the param groups and the state dict are the same.

    Holds the group dicts and their ``params`` lists themselves (so their ids cannot be reused while
    cached) and, per group, the tensors that have slow weights with their state dicts. It is rebuilt
    when the inner optimizer's ``state`` object, a group, a ``params`` list or its length changes
    (``load_state_dict``, ``add_param_group``, ZeRO swapping the groups it shows), and after a
    ``"reset"`` sync.

    It also keeps each tracked tensor's number of syncs (for ``Lookahead.sync_count``): a sync of a
    whole group adds one to the group's ``bonus`` instead of to every tensor, and :meth:`fold` writes
    the totals back to the wrapper's per-tensor dict when the plan is dropped.
    """

    __slots__ = (
        "bonus",
        "by_kind",
        "fresh",
        "groups",
        "has_dtensor",
        "lens",
        "lists",
        "most",
        "params",
        "state",
        "states",
        "syncs",
    )

    def __init__(self, state: Any, groups: list[dict[str, Any]], syncs_of: dict[Tensor, int]) -> None:
        self.state = state
        self.groups = list(groups)
        self.lists = [g["params"] for g in groups]
        self.lens = [len(params) for params in self.lists]
        self.params: list[list[Tensor]] = []  # per group, the tensors with slow weights
        self.states: list[list[State]] = []  # ... and their state dicts
        self.syncs: list[list[int]] = []  # ... and their syncs, not counting ``bonus``
        self.bonus: list[int] = []  # per group, whole-group syncs since this plan was built
        self.most: list[int] = []  # per group, the most syncs of one of its tensors
        self.fresh: list[tuple[int, Tensor]] = []  # no slow weights yet
        for gi, params in enumerate(self.lists):
            tracked: list[Tensor] = []
            states: list[State] = []
            for p in params:
                st = state.get(p)
                if st is not None and SLOW_KEY in st:
                    tracked.append(p)
                    states.append(st)
                else:
                    self.fresh.append((gi, p))
            counts = [syncs_of.get(p, 0) for p in tracked] if syncs_of else [0] * len(tracked)
            self.params.append(tracked)
            self.states.append(states)
            self.syncs.append(counts)
            self.bonus.append(0)
            self.most.append(max(counts, default=0))
        # Per group, the tracked tensors by (device, dtype) with their sync plans; built at the first sync.
        self.by_kind: dict[int, list[_Kind]] = {}
        self.has_dtensor = any(maybe_dtensor(p) for params in self.lists for p in params)

    def valid(self, state: Any, groups: list[dict[str, Any]]) -> bool:
        if state is not self.state or len(groups) != len(self.groups):
            return False
        for group, cached, params, n in zip(groups, self.groups, self.lists, self.lens):
            if group is not cached or group["params"] is not params or len(params) != n:
                return False
        return True

    def track(self, gi: int, p: Tensor, st: State, syncs: int) -> None:
        """``p`` (of group ``gi``) just got slow weights; it had synced ``syncs`` times before."""
        self.params[gi].append(p)
        self.states[gi].append(st)
        self.syncs[gi].append(syncs - self.bonus[gi])
        self.most[gi] = max(self.most[gi], syncs)
        self.by_kind.pop(gi, None)

    def add_slow(
        self, fresh: list[tuple[int, Tensor]], slow: list[Tensor], state: Any, syncs_of: dict[Tensor, int]
    ) -> None:
        """Give the ``fresh`` (group, tensor) pairs their slow weights ``slow`` and a counter at 0."""
        for (gi, p), phi in zip(fresh, slow):
            st = state[p]
            st[SLOW_KEY] = phi
            st[COUNT_KEY] = 0
            self.track(gi, p, st, syncs_of.get(p, 0))
        self.fresh = [(gi, p) for gi, p in self.fresh if p.grad is None]
        self.has_dtensor = self.has_dtensor or any(maybe_dtensor(p) for _, p in fresh)

    def record(self, gi: int, indices: list[int] | None) -> int:
        """One sync of group ``gi``'s tensors ``indices`` (None: all); returns the group's most syncs."""
        if indices is None:
            self.bonus[gi] += 1
            self.most[gi] += 1
        else:
            counts, bonus = self.syncs[gi], self.bonus[gi]
            for i in indices:
                counts[i] += 1
                self.most[gi] = max(self.most[gi], counts[i] + bonus)
        return self.most[gi]

    def fold(self, syncs_of: dict[Tensor, int]) -> None:
        for params, counts, bonus in zip(self.params, self.syncs, self.bonus):
            for p, n in zip(params, counts):
                if n + bonus:
                    syncs_of[p] = n + bonus

    def buckets(self, gi: int, params: list[Tensor]) -> list[Bucket]:
        """``params`` of group ``gi`` by (device, dtype), each with the plan that syncs it with its φ.

        When the whole group syncs (the usual case) the grouping and the sync plans are cached here; φ is
        still looked up, and a sync plan is rebuilt if a φ object changed (e.g. a checkpoint load).
        """
        if not self.has_dtensor and gi < len(self.params) and len(params) == len(self.params[gi]):
            kinds = self.by_kind.get(gi)
            if kinds is None:
                kinds = self.by_kind[gi] = _kinds(self.params[gi], self.states[gi])
            out = []
            for kind in kinds:
                slow = list(map(_SLOW, kind.states))
                if kind.plan is None or not kind.plan.valid(slow):
                    kind.plan = SyncPlan(kind.params, slow)
                out.append(Bucket(kind.params, kind.plan))
            return out
        return uncached_buckets(params, self.state)


def uncached_buckets(params: list[Tensor], state: Any) -> list[Bucket]:
    """:meth:`StepPlan.buckets` built afresh: for a part of a group, or tensors that may be DTensors."""
    grouped: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor], list[Tensor]]] = {}
    for p in params:
        fast = local(p)
        entry = grouped.setdefault((fast.device, fast.dtype), ([], [], []))
        entry[0].append(fast)
        entry[1].append(local(state[p][SLOW_KEY]))
        entry[2].append(p)
    return [Bucket(members, SyncPlan(fast_list, slow_list)) for fast_list, slow_list, members in grouped.values()]


class _Kind:
    """The tracked tensors of one group with one (device, dtype), their state dicts and cached sync plan."""

    __slots__ = ("params", "plan", "states")

    def __init__(self) -> None:
        self.params: list[Tensor] = []
        self.states: list[State] = []
        self.plan: SyncPlan | None = None


def _kinds(params: list[Tensor], states: list[State]) -> list[_Kind]:
    by_key: dict[tuple[torch.device, torch.dtype], _Kind] = {}
    for p, st in zip(params, states):
        kind = by_key.get((p.device, p.dtype))
        if kind is None:
            kind = by_key[(p.device, p.dtype)] = _Kind()
        kind.params.append(p)
        kind.states.append(st)
    return list(by_key.values())


class Counted(NamedTuple):
    """What one step's counting decided."""

    #: Per group index, the tensors whose cycle completes now.
    due: dict[int, list[Tensor]]
    #: Per group index, the indices (into ``StepPlan.params[gi]``) that sync; None: the whole group.
    synced: dict[int, list[int] | None]
    #: (state dicts, new count) not yet written (``defer``): written after the non-finite check.
    pending: list[tuple[list[State], int]]


def advance_counters(plan: StepPlan, group_k: list[int], defer: bool) -> Counted:
    """Advance the counter of every tensor with a gradient; those reaching their group's ``k`` are due.

    Per tensor and only with a gradient: a tensor the inner optimizer did not update this step (no
    gradient: a skipped training_step, a closure returning None) does not advance its cycle. The usual
    case, every tensor of a group with a gradient and the same count, is decided for the group at once:
    the counters and gradients are read with C-level map() calls and the new count written back, no
    per-tensor Python logic. Anything else takes the per-tensor path. With ``defer`` nothing is written
    (the new counts are returned in ``pending``).
    """
    pending: list[tuple[list[State], int]] = []
    due: dict[int, list[Tensor]] = {}
    synced: dict[int, list[int] | None] = {}
    for gi, (params, states) in enumerate(zip(plan.params, plan.states)):
        if not params:
            continue
        k = group_k[gi]
        try:
            counts = list(map(_COUNT, states))
        except KeyError:
            counts = [st.get(COUNT_KEY, 0) for st in states]
        first = counts[0]
        # (``x in`` would compare tensors with ``==``; ``is_not`` is an identity test.)
        if all(map(operator.is_not, map(_GRAD, params), repeat(None))) and min(counts) == first == max(counts):
            count = first + 1
            if count >= k:
                due[gi] = params
                synced[gi] = None
                count = 0
            if defer:
                pending.append((states, count))
            else:
                set_counts(states, count)
            continue
        group_due, group_idx = _advance_one_by_one(params, states, counts, k, pending if defer else None)
        if group_due:
            due[gi] = group_due
            synced[gi] = group_idx
    return Counted(due, synced, pending)


def _advance_one_by_one(
    params: list[Tensor], states: list[State], counts: list[int], k: int, pending: list[Any] | None
) -> tuple[list[Tensor], list[int]]:
    """The per-tensor path of :func:`advance_counters` for one group: (tensors due, their indices)."""
    group_due: list[Tensor] = []
    group_idx: list[int] = []
    for i, (p, st, count) in enumerate(zip(params, states, counts)):
        if p.grad is None:
            continue
        count += 1
        if count >= k:
            group_due.append(p)
            group_idx.append(i)
            count = 0
        if pending is not None:
            pending.append(([st], count))
        else:
            st[COUNT_KEY] = count
    return group_due, group_idx
