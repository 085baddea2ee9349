"""The core Lookahead optimizer (Zhang, Lucas, Hinton, Ba 2019, Algorithm 1). Torch only.

Fast weights θ take ``k`` steps of the wrapped (inner) optimizer; then the slow weights move
``φ ← φ + α(θ − φ)`` and the fast weights restart from them, ``θ ← φ``. ``φ₀ = θ₀``.

Everything Lookahead keeps lives in the inner optimizer's per-tensor state (``state[p]``):

* ``"lookahead_slow"``  φ, same dtype/device as the tensor the inner optimizer steps;
* ``"lookahead_count"`` a Python int, inner steps taken by this tensor since its last sync;
* ``"lookahead_slow_<key>"`` the slow copy of a momentum buffer (``pullback="pullback"`` only).

That layout is what lets engines that hand the inner optimizer a *shard* of the weights (DeepSpeed
ZeRO) hold φ for that shard only and checkpoint it through the inner ``state_dict`` unchanged.

When the keys exist. φ and the counter are inserted right after the inner step that created the
tensor's inner state (φ = θ before that step), so whenever a tensor has inner state it has Lookahead
state too. That includes the synthetic step torch.distributed.checkpoint runs on an optimizer with no
state (lr 0, zero gradients) to build its load template: the keys appear there (φ = θ, count 0) and a
resume into a fresh optimizer restores them; that step itself never counts. It is recognised by what it
is (see ``Lookahead._is_state_probe``), not by who calls.

What counts. A tensor's counter advances only in a step in which it has a gradient (``p.grad`` is not
None): a step where nothing has a gradient (a skipped Lightning ``training_step``, a closure that
returns None) updates nothing and does not count. GradScaler skips never reach the inner step.

Non-finite fast weights at a sync (``nonfinite``):

* ``"skip"`` (default): θ is checked while it is synced (the check rides the same pass over memory,
  see :mod:`lookahead_dist.core.sync`). Where θ holds a NaN or an infinity, φ is kept and **θ is reset
  to φ**, the counter restarts, and a ``RuntimeWarning`` names the tensor (param group, index, shape,
  name when the group has ``param_names``) and the step. θ is reset rather than left because a
  non-finite θ is a dead end (every later step and sync would see it) while φ is the last good point:
  training continues from there, which is what Lookahead's slow weights are for. The inner optimizer's
  own state is not touched (if its moments are non-finite too, the next sync warns again; fix the cause:
  loss scaling, clipping, a lower lr). The decision is per tensor, or per block of ``sync.CHUNK``
  elements for larger tensors. Momentum pullback is skipped for those tensors; ``pullback="reset"``
  still clears their inner state (the cycle restarts).
* ``"raise"``: every tensor due is checked first; a non-finite one raises ``FloatingPointError``
  before anything of this sync changes (counters, φ, θ).
* ``alpha="adaptive"``: the non-finite tensors are left out of the line sums as well, so α comes from
  the finite ones and no NaN is blended in.

Under ZeRO, FSDP and DDP no collective is needed for this: each process owns the partition it steps
and decides for it alone (under DDP the replicas are identical, so they decide alike).
"""

from __future__ import annotations

import operator
import warnings
import weakref
from collections import OrderedDict, defaultdict, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import repeat
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .keys import (
    COUNT_KEY,
    DEFAULT_PULLBACK_KEYS,
    GROUP_ALPHA,
    GROUP_K,
    LAST_ALPHA,
    PULLBACK_MODES,
    SLOW_KEY,
    slow_key_for,
)
from .settings import AlphaSpec, LookaheadSettings, check_alpha, check_k
from .state_check import check_state_dict
from .sync import CHUNK, SyncPlan, local, make_slow, nonfinite_tensors, sync_

__all__ = ["COUNT_KEY", "PULLBACK_MODES", "SLOW_KEY", "Lookahead", "ReduceFn", "slow_key_for"]

# C-level getters: the per-step bookkeeping reads one attribute or key of every tensor, never in a
# Python-level loop body (see ``_step``).
_GRAD = operator.attrgetter("grad")
_COUNT = operator.itemgetter(COUNT_KEY)
_SLOW = operator.itemgetter(SLOW_KEY)


def _set_counts(states: list[dict[str, Any]], count: int) -> None:
    # state[COUNT_KEY] = count for every state dict, iterated in C (map + a zero-length deque).
    deque(map(operator.setitem, states, repeat(COUNT_KEY), repeat(count)), maxlen=0)

_HOOK_DICTS = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)

#: Sums a small fp64 tensor across the processes that each hold a shard of the weights, in place.
ReduceFn = Callable[[Tensor], None]

# Inner optimizer -> its live Lookahead: a second wrapper on the same inner optimizer would share (and
# double-advance) the counters. Weak on both sides, so a dropped wrapper frees the inner optimizer.
_OWNERS: weakref.WeakKeyDictionary[Optimizer, weakref.ref[Any]] = weakref.WeakKeyDictionary()


def _claim(optimizer: Optimizer, wrapper: Any) -> None:
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


class Lookahead(Optimizer):
    """Wrap ``optimizer`` so that every ``k`` of its steps the weights are pulled toward slow weights.

    Args:
        optimizer: any ``torch.optim.Optimizer`` (the *inner* optimizer). ``param_groups``, ``state``
            and ``defaults`` of this object *are* the inner optimizer's, so LR schedulers, gradient
            scalers and checkpointing code see one optimizer.
        k, alpha, pullback, alpha_bounds, alpha_fallback, pullback_keys, nonfinite: see
            :class:`~lookahead_dist.LookaheadSettings` (validated there, with the same messages as the
            DeepSpeed config section and the callbacks).
        settings: a ready :class:`~lookahead_dist.LookaheadSettings` instead of the keywords above.
        reduce_fn: for sharded engines, sums the adaptive-α partial sums across shards in place.
            Not used for a fixed α, which needs no communication.
        allow_empty: accept an inner optimizer whose param groups are empty now; for engines that
            fill them only while stepping (DeepSpeed ZeRO-3 sub-groups).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        k: int = 5,
        alpha: AlphaSpec = 0.5,
        pullback: str = "none",
        *,
        alpha_bounds: tuple[float, float] = (0.5, 1.0),
        alpha_fallback: float | None = None,
        pullback_keys: tuple[str, ...] = DEFAULT_PULLBACK_KEYS,
        nonfinite: str = "skip",
        settings: LookaheadSettings | None = None,
        reduce_fn: ReduceFn | None = None,
        allow_empty: bool = False,
    ) -> None:
        if isinstance(optimizer, Lookahead):
            raise TypeError(
                "Lookahead: the optimizer is already a Lookahead; wrap the inner optimizer once "
                "(use `optimizer.optimizer` to reach it), or change k/alpha on the existing wrapper."
            )
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"Lookahead: expected a torch.optim.Optimizer to wrap, got {type(optimizer).__name__}; "
                f"build the inner optimizer first, e.g. Lookahead(torch.optim.AdamW(model.parameters())) ."
            )
        if isinstance(optimizer, torch.optim.LBFGS):
            raise TypeError(
                "Lookahead: torch.optim.LBFGS is not supported: it re-evaluates the closure inside its step, "
                "while Lookahead runs the closure once before the inner step. Use a first-order optimizer "
                "(SGD, Adam, AdamW, ...) as the inner optimizer."
            )
        if not allow_empty and not any(len(g["params"]) > 0 for g in optimizer.param_groups):
            raise ValueError(
                "Lookahead: the optimizer has no parameters to step; create it with the model's parameters."
            )
        if settings is None:
            settings = LookaheadSettings(
                k=k,
                alpha=alpha,
                pullback=pullback,
                alpha_bounds=alpha_bounds,
                alpha_fallback=alpha_fallback,
                pullback_keys=pullback_keys,
                nonfinite=nonfinite,
            )
        elif not isinstance(settings, LookaheadSettings):
            raise TypeError(f"Lookahead: settings must be a LookaheadSettings, got {type(settings).__name__}.")
        if reduce_fn is not None and not callable(reduce_fn):
            raise TypeError(
                f"Lookahead: reduce_fn={reduce_fn!r} is not callable; pass a function that sums a small tensor "
                f"across shards in place (e.g. a torch.distributed.all_reduce), or None."
            )
        _claim(optimizer, self)
        self.settings = settings
        self.reduce_fn = reduce_fn
        self.optimizer = optimizer
        for group in optimizer.param_groups:
            self._check_group(group)

        # What torch.optim.Optimizer.__init__ sets up, minus param_groups/state (they are the inner's).
        for name in _HOOK_DICTS:
            setattr(self, name, OrderedDict())
        self._patch_step_function()

        # Slow tensors released by pullback="reset", reused at the next cycle's first step.
        self._spare: dict[Tensor, Tensor] = {}
        #: Completed cycles: the most syncs any tensor of this process has done (this process, not
        #: persisted). Counted per tensor, so ZeRO stepping the inner optimizer once per param group or
        #: sub-group does not count one cycle several times.
        self.sync_count = 0
        self._syncs_of: dict[Tensor, int] = {}
        self._steps_taken = 0  # step() calls in this process, for messages
        self._in_slow_weights = False
        self._plan: _Plan | None = None
        self._keys_checked: tuple[str, ...] | None = None

    # ------------------------------------------------------------------ settings
    # Read-only views of the settings; change them with ``opt.settings = opt.settings.replace(k=3)``,
    # which validates the new values.
    k = property(lambda self: self.settings.k)
    alpha = property(lambda self: self.settings.alpha)
    pullback = property(lambda self: self.settings.pullback)
    alpha_bounds = property(lambda self: self.settings.alpha_bounds)
    alpha_fallback = property(lambda self: self.settings.fallback_alpha)
    pullback_keys = property(lambda self: self.settings.pullback_keys)

    # ------------------------------------------------------------------ forwarding
    # param_groups, state and defaults are the inner optimizer's, with setters: ZeRO-1/2 assigns
    # ``optimizer.param_groups = [one group]`` around each group's step and ZeRO-3 edits groups in
    # place, so a copy would go stale (and LR schedulers would stop reaching the inner optimizer).
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> defaultdict[Tensor, Any]:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: defaultdict[Tensor, Any]) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def __getstate__(self) -> dict[str, Any]:
        # Like torch.optim.Optimizer: hooks are not pickled, nor the per-instance `step` wrapper an
        # LR scheduler installs (a local function, which made pickling fail once a scheduler existed).
        self._drop_plan()
        return {
            k: v
            for k, v in self.__dict__.items()
            if k not in ("_spare", "step", "_plan") and not k.startswith("_optimizer_")
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        for name in _HOOK_DICTS:
            self.__dict__.setdefault(name, OrderedDict())
        self._spare = {}
        self._plan = None
        self.__dict__.setdefault("_syncs_of", {})
        self.__dict__.setdefault("_steps_taken", 0)
        self.__dict__.setdefault("_in_slow_weights", False)
        self.__dict__.setdefault("_keys_checked", None)
        _claim(self.optimizer, self)
        self._patch_step_function()

    def __repr__(self) -> str:
        return (
            f"Lookahead(k={self.k}, alpha={self.alpha!r}, pullback={self.pullback!r}, "
            f"optimizer={self.optimizer!r})"
        )

    def _check_group(self, group: dict[str, Any]) -> None:
        if GROUP_K in group:
            check_k(group[GROUP_K], f"param_group[{GROUP_K!r}]")
        if GROUP_ALPHA in group:
            check_alpha(group[GROUP_ALPHA], f"param_group[{GROUP_ALPHA!r}]")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self._check_group(param_group)
        self.optimizer.add_param_group(param_group)
        self._drop_plan()

    # state_dict is the inner's: φ and the counters are per-tensor inner state, so every engine path
    # that saves optimizer.state generically (per-rank ZeRO files, NVMe swapping) carries them.
    # Hooks registered here run there.
    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_state_dict(self, state_dict)  # before the inner load: a bad file changes nothing
        self.optimizer.load_state_dict(state_dict)
        self._spare.clear()
        self._drop_plan()  # the state dicts (and the tensors in them) are new objects
        self._keys_checked = None

    def register_state_dict_pre_hook(self, hook, prepend: bool = False):  # type: ignore[no-untyped-def]
        return self.optimizer.register_state_dict_pre_hook(hook, prepend=prepend)

    def register_state_dict_post_hook(self, hook, prepend: bool = False):  # type: ignore[no-untyped-def]
        return self.optimizer.register_state_dict_post_hook(hook, prepend=prepend)

    def register_load_state_dict_pre_hook(self, hook, prepend: bool = False):  # type: ignore[no-untyped-def]
        return self.optimizer.register_load_state_dict_pre_hook(hook, prepend=prepend)

    def register_load_state_dict_post_hook(self, hook, prepend: bool = False):  # type: ignore[no-untyped-def]
        return self.optimizer.register_load_state_dict_post_hook(hook, prepend=prepend)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------------ step
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        if self._in_slow_weights:
            raise RuntimeError(
                "Lookahead: step() called inside use_slow_weights(): the parameters hold the slow weights "
                "there and the fast weights are restored on exit, so this update would be thrown away while "
                "the counters and the inner optimizer's state advance. Step after the `with` block."
            )
        # The closure (forward/backward under Lightning's non-DeepSpeed strategies) runs first: the
        # gradients it produces decide which tensors step, and φ₀ must be θ before this step.
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            self._step()
        return loss

    def _current_plan(self) -> _Plan:
        groups = self.optimizer.param_groups
        plan = self._plan
        if plan is None or not plan.valid(self.optimizer.state, groups):
            self._drop_plan()
            plan = self._plan = _Plan(self.optimizer.state, groups, self._syncs_of)
        return plan

    def _drop_plan(self) -> None:
        """Forget the cached plan, keeping the per-tensor sync counts it held."""
        plan = self.__dict__.get("_plan")
        if plan is not None:
            plan.fold(self._syncs_of)
            self._plan = None

    def _step(self) -> None:
        self._steps_taken += 1
        groups = self.param_groups
        # Overrides may be edited after construction: check them before anything moves.
        group_k = [g.get(GROUP_K, self.k) for g in groups]
        for group in groups:
            self._check_group(group)
        plan = self._current_plan()
        probe = not self.optimizer.state and self._is_state_probe()
        # φ₀ = θ before this step, inserted only after the inner step: torch Adam and DeepSpeedCPUAdam
        # initialise their own state only when a tensor's state is empty.
        fresh = [(gi, p) for gi, p in plan.fresh if p.grad is not None]
        snapshots = self._snapshots([p for _, p in fresh]) if fresh else []

        self.optimizer.step()

        inner_state = self.optimizer.state
        if fresh:
            for (gi, p), snap in zip(fresh, snapshots):
                st = inner_state[p]
                st[SLOW_KEY] = snap
                st[COUNT_KEY] = 0
                plan.track(gi, p, st, self._syncs_of.get(p, 0))
            plan.fresh = [(gi, p) for gi, p in plan.fresh if p.grad is None]
            plan.has_dtensor = plan.has_dtensor or any(_maybe_dtensor(p) for _, p in fresh)
        if self.pullback == "pullback" and self._keys_checked != self.pullback_keys:
            self._check_pullback_keys()
        if probe:
            return  # torch's synthetic state initialisation: the keys exist now, nothing counts

        # Per tensor and only with a gradient: a tensor the inner optimizer did not update this step
        # (no gradient: a skipped training_step, a closure returning None) does not advance its cycle.
        # The usual case, every tensor of a group with a gradient and the same count, is decided for
        # the group at once: the counters and gradients are read with C-level map() calls and the new
        # count written back, no per-tensor Python logic. Anything else takes the per-tensor path.
        defer = self.settings.nonfinite == "raise"  # then nothing may change before the check
        pending: list[tuple[list[dict[str, Any]], int]] = []
        due: dict[int, list[Tensor]] = {}
        synced: dict[int, list[int] | None] = {}  # per group: indices that sync (None: all of them)
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
                    _set_counts(states, count)
                continue
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
                if defer:
                    pending.append(([st], count))
                else:
                    st[COUNT_KEY] = count
            if group_due:
                due[gi] = group_due
                synced[gi] = group_idx
        if due and defer:
            self._raise_if_nonfinite(due)
        for states, count in pending:
            _set_counts(states, count)
        if due:
            self._sync(due)
            self._record_syncs(plan, synced)
            if self.pullback == "reset":
                self._drop_plan()  # the synced tensors' state was cleared: they start fresh

    def _snapshots(self, params: list[Tensor]) -> list[Tensor]:
        """φ₀ = θ for tensors about to get slow weights: the slow tensors released by a "reset" sync are
        reused; new ones for small CPU tensors are views of one flat buffer (see ``sync.make_slow``)."""
        out: list[Tensor | None] = []
        new: list[int] = []
        for i, p in enumerate(params):
            spare = self._spare.pop(p, None)
            if spare is not None:
                local(spare).copy_(local(p))
            else:
                new.append(i)
            out.append(spare)
        for i, slow in zip(new, make_slow([params[i] for i in new])):
            out[i] = slow
        return out  # type: ignore[return-value]

    def _is_state_probe(self) -> bool:
        """Whether the coming inner step is a state initialisation: it creates the state, it never counts.

        torch.distributed.checkpoint builds the state of an optimizer that has none (its load template)
        by one step on a fresh zero gradient for every trainable parameter with every lr set to 0. That
        is what is recognised here: no state entry at all, every lr 0, and every trainable parameter
        holding a gradient that is all zeros. Such a step moves no weight; a genuine first step that
        looks exactly like it (lr 0 everywhere *and* every gradient exactly zero) is taken for one too
        and does not advance the cycle. After a ``"reset"`` sync the entries are empty but present: a
        real step then. The zero test reads the gradients only in that rare case (empty state, lr 0).
        """
        if self.optimizer.state:
            return False
        lrs = [g["lr"] for g in self.param_groups if "lr" in g]
        if not lrs or any(float(lr) != 0.0 for lr in lrs):
            return False
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.requires_grad]
        if not grads or any(grad is None for grad in grads):
            return False
        return not any(bool(local(grad).any()) for grad in grads)  # type: ignore[arg-type]

    def _check_pullback_keys(self) -> None:
        """Refuse ``pullback_keys`` that do not name momentum-like tensors of this optimizer's state.

        Runs once the inner optimizer has created its state (its first step); checked again after
        ``load_state_dict`` or a settings change.
        """
        keys = self.pullback_keys
        stepped = [(p, st) for p, st in self.optimizer.state.items() if SLOW_KEY in st]
        if not stepped:
            return
        available = sorted(
            {
                key
                for p, st in stepped
                for key, value in st.items()
                if isinstance(key, str) and not key.startswith("lookahead_") and _is_buffer_like(value, p)
            }
        )
        hint = f"the momentum-like tensor buffers of this {type(self.optimizer).__name__} are {available}"
        any_present = False
        for key in keys:
            present = [(p, st[key]) for p, st in stepped if key in st]
            for p, value in present:
                if key == "step" or not _is_buffer_like(value, p):
                    what = (
                        f"a {type(value).__name__}"
                        if not isinstance(value, Tensor)
                        else f"a {value.dtype} tensor of shape {tuple(value.shape)} for a parameter of shape "
                        f"{tuple(p.shape)}"
                    )
                    raise ValueError(
                        f"Lookahead: pullback_keys entry {key!r} is {what} in the optimizer state, not a "
                        f"momentum-like buffer; pulling it back would corrupt it. {hint}; pass those "
                        f"(e.g. pullback_keys={tuple(available[:1])!r}) or pullback='none'."
                    )
            if not present and key not in DEFAULT_PULLBACK_KEYS:
                raise ValueError(
                    f"Lookahead: pullback_keys entry {key!r} is not in the optimizer state of any tensor after "
                    f"its first step, so it would silently not be pulled back; {hint}."
                )
            any_present = any_present or bool(present)
        if not any_present:
            raise ValueError(
                f"Lookahead: pullback='pullback' has nothing to pull back: none of pullback_keys={keys!r} is "
                f"in the optimizer state; {hint}. Name those buffers, or use pullback='none' (an optimizer "
                f"without momentum has nothing to pull back)."
            )
        self._keys_checked = keys

    def _raise_if_nonfinite(self, due: dict[int, list[Tensor]]) -> None:
        # nonfinite="raise": one extra read of θ for the tensors due, before anything is written.
        who = [(gi, p) for gi, params in due.items() for p in params]
        bad = nonfinite_tensors([local(p) for _, p in who])
        if bad:
            names = "; ".join(self._describe(*who[i]) for i in bad[:5])
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            raise FloatingPointError(
                f"Lookahead: step {self._steps_taken} (this process): the fast weights are not finite (NaN/inf) "
                f"at a sync in {len(bad)} tensor(s): {names}{more}. Nothing of this sync was applied "
                f"(nonfinite='raise'); use nonfinite='skip' to keep their slow weights and continue, and look "
                f"for the cause (learning rate, loss scaling, gradient clipping)."
            )

    def _describe(self, gi: int, p: Tensor) -> str:
        group = self.param_groups[gi] if gi < len(self.param_groups) else {}
        params = group.get("params", [])
        index = next((i for i, q in enumerate(params) if q is p), None)
        names = group.get("param_names")
        name = f" {names[index]!r}" if index is not None and isinstance(names, list) and index < len(names) else ""
        return f"param group {gi} tensor {index}{name} (shape {tuple(p.shape)})"

    def _group_alpha(self, gi: int, params: list[Tensor]) -> float:
        spec = self.param_groups[gi].get(GROUP_ALPHA, self.alpha)
        if spec != "adaptive":
            return float(spec)
        from .adaptive import adaptive_alpha  # local import: keeps the fixed-α path light

        return adaptive_alpha(
            params,
            self.optimizer.state,
            self.param_groups[gi],
            bounds=self.alpha_bounds,
            fallback=self.alpha_fallback,
            reduce_fn=self.reduce_fn,
            k=self.param_groups[gi].get(GROUP_K, self.k),
        )

    def _sync(self, due: dict[int, list[Tensor]]) -> None:
        state = self.optimizer.state
        # (param group, tensor, blocks kept, blocks) where θ was not finite.
        kept: list[tuple[int, Tensor, int, int]] = []
        check = self.settings.nonfinite == "skip"  # "raise" checked everything before this call
        adaptive = check and any(self.param_groups[gi].get(GROUP_ALPHA, self.alpha) == "adaptive" for gi in due)
        if adaptive:
            # The line sums of adaptive α must not see NaN either: decide per whole tensor first.
            due = dict(due)
            for gi, params in list(due.items()):
                bad = set(nonfinite_tensors([local(p) for p in params]))
                for i in sorted(bad):
                    p = params[i]
                    local(p).copy_(local(state[p][SLOW_KEY]))
                    kept.append((gi, p, 1, 1))
                due[gi] = [p for i, p in enumerate(params) if i not in bad]
            check = False
        for gi, params in due.items():
            # Even with every tensor of the group skipped: under ZeRO/FSDP adaptive α reduces its sums
            # across processes, so every process must take part (no finite tensor: the fallback α).
            alpha = self._group_alpha(gi, params)
            # Kept in the group dict: ZeRO-1/2 shows the inner optimizer one group at a time.
            self.param_groups[gi][LAST_ALPHA] = alpha
            for members, runner in self._buckets(gi, params):
                skipped: set[int] = set()
                for i, blocks_kept, blocks in runner.run(alpha, check):
                    kept.append((gi, members[i], blocks_kept, blocks))
                    skipped.add(i)
                if self.pullback == "pullback":
                    good = [p for i, p in enumerate(members) if i not in skipped] if skipped else members
                    if good:
                        self._pull_back_buffers(good, alpha)
        if self.pullback == "reset":
            for gi, params in due.items():
                for p in params:
                    st = state[p]
                    self._spare[p] = st[SLOW_KEY]
                    st.clear()
            for gi, p, _, _ in kept:
                if p not in self._spare:
                    st = state[p]
                    self._spare[p] = st[SLOW_KEY]
                    st.clear()
        if kept:
            self._warn_kept(kept)

    def _buckets(self, gi: int, params: list[Tensor]) -> list[tuple[list[Tensor], SyncPlan]]:
        """``params`` of group ``gi`` by (device, dtype): (the params, how to sync them with their φ).

        When the whole group syncs (the usual case) the grouping and the sync plans come from the cached
        plan; φ is still looked up, and a plan is rebuilt if a φ object changed (e.g. a checkpoint load).
        """
        state = self.optimizer.state
        plan = self._plan
        if (
            plan is not None
            and not plan.has_dtensor
            and gi < len(plan.params)
            and len(params) == len(plan.params[gi])
        ):
            cached = plan.buckets.get(gi)
            if cached is None:
                by_key: dict[tuple[torch.device, torch.dtype], list[Any]] = {}
                for p, st in zip(plan.params[gi], plan.states[gi]):
                    entry = by_key.setdefault((p.device, p.dtype), [[], [], None])
                    entry[0].append(p)
                    entry[1].append(st)
                cached = plan.buckets[gi] = list(by_key.values())
            out = []
            for entry in cached:
                fast, sts, runner = entry
                slow = list(map(_SLOW, sts))
                if runner is None or not runner.valid(slow):
                    runner = entry[2] = SyncPlan(fast, slow)
                out.append((fast, runner))
            return out
        grouped: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor], list[Tensor]]] = {}
        for p in params:
            fast = local(p)
            entry2 = grouped.setdefault((fast.device, fast.dtype), ([], [], []))
            entry2[0].append(fast)
            entry2[1].append(local(state[p][SLOW_KEY]))
            entry2[2].append(p)
        return [(members, SyncPlan(fast_list, slow_list)) for fast_list, slow_list, members in grouped.values()]

    def _warn_kept(self, kept: list[tuple[int, Tensor, int, int]]) -> None:
        parts = []
        for gi, p, blocks_kept, blocks in kept[:5]:
            what = self._describe(gi, p)
            if blocks_kept < blocks:
                what += f": {blocks_kept} of its {blocks} blocks of {CHUNK} elements"
            parts.append(what)
        more = f" and {len(kept) - 5} more" if len(kept) > 5 else ""
        warnings.warn(
            f"Lookahead: step {self._steps_taken} (this process): non-finite fast weights (NaN/inf) at a sync in "
            f"{'; '.join(parts)}{more}. Their slow weights were kept and the fast weights reset to them "
            f"(nonfinite='skip'); training continues from the slow weights. Use nonfinite='raise' to stop "
            f"instead, and look for the cause (learning rate, loss scaling, gradient clipping).",
            RuntimeWarning,
            stacklevel=5,
        )

    @torch._disable_dynamo
    def _record_syncs(self, plan: _Plan, synced: dict[int, list[int] | None]) -> None:
        # Under torch.compile, dynamo drops attribute updates on an Optimizer; run this eagerly.
        most = self.sync_count
        for gi, indices in synced.items():
            most = max(most, plan.record(gi, indices))
        self.sync_count = most

    def _pull_back_buffers(self, fast: list[Tensor], alpha: float) -> None:
        state = self.optimizer.state
        for key in self.pullback_keys:
            slow_name = slow_key_for(key)
            have_slow: list[Tensor] = []
            live: list[Tensor] = []
            first: list[tuple[Tensor, Tensor]] = []
            for p in fast:
                buf = state[p].get(key)
                if not isinstance(buf, Tensor):
                    continue
                if slow_name in state[p]:
                    have_slow.append(local(state[p][slow_name]))
                    live.append(local(buf))
                else:
                    first.append((p, buf))
            if live:
                sync_(live, have_slow, alpha, check=False)
            if first:
                # The momentum at φ₀ is zero: m ← 0 + α(m − 0); its slow copy must not alias m.
                torch._foreach_mul_([local(b) for _, b in first], alpha)
                for p, buf in first:
                    state[p][slow_name] = buf.clone()

    @property
    def last_alpha(self) -> dict[int, float]:
        """α applied at the most recent sync, per param-group index (groups not yet synced are absent)."""
        return {i: g[LAST_ALPHA] for i, g in enumerate(self.param_groups) if LAST_ALPHA in g}

    # ------------------------------------------------------------------ slow weights
    def tracked_params(self) -> list[Tensor]:
        """Tensors that have slow weights, in the order they got them.

        Read from the inner optimizer's state, not its param_groups: DeepSpeed ZeRO-3 fills those only
        while it steps a sub-group.
        """
        return [p for p, st in self.optimizer.state.items() if SLOW_KEY in st]

    @contextmanager
    def use_slow_weights(self) -> Iterator[None]:
        """Put φ into the parameters for the body (e.g. evaluation); restore θ bit-exactly on exit.

        A local swap: under FSDP2 each process copies its own shard (no gather). ``step()`` inside the
        body is refused (the update would be lost when θ is restored).
        """
        params = self.tracked_params()
        if not params:
            yield
            return
        state = self.optimizer.state
        with torch.no_grad():
            fast_backup = [local(p).clone() for p in params]
            torch._foreach_copy_([local(p) for p in params], [local(state[p][SLOW_KEY]) for p in params])
        outer = self._in_slow_weights
        self._in_slow_weights = True
        try:
            yield
        finally:
            self._in_slow_weights = outer
            with torch.no_grad():
                torch._foreach_copy_([local(p) for p in params], fast_backup)

    def fast_slow_distance_sq(self) -> Tensor:
        """Σ‖θ − φ‖² over the tensors this process steps, a plain fp64 CPU scalar.

        Under ZeRO and FSDP this is the partial sum over this process's shards (computed on the local
        tensors, no collective); the caller reduces it once.
        """
        params = self.tracked_params()
        if not params:
            return torch.zeros((), dtype=torch.float64)
        state = self.optimizer.state
        per_device: dict[torch.device, Tensor] = {}
        with torch.no_grad():
            fast = [local(p) for p in params]
            diffs = torch._foreach_sub(fast, [local(state[p][SLOW_KEY]) for p in params])
            for d in diffs:
                sq = torch.linalg.vector_norm(d, dtype=torch.float64).square()
                acc = per_device.get(d.device)
                per_device[d.device] = sq if acc is None else acc + sq
        total = torch.zeros((), dtype=torch.float64)
        for acc in per_device.values():
            total += acc.cpu()
        return total


class _Plan:
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
        "buckets",
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
        self.states: list[list[dict[str, Any]]] = []  # ... and their state dicts
        self.syncs: list[list[int]] = []  # ... and their syncs, not counting ``bonus``
        self.bonus: list[int] = []  # per group, whole-group syncs since this plan was built
        self.most: list[int] = []  # per group, the most syncs of one of its tensors
        self.fresh: list[tuple[int, Tensor]] = []  # no slow weights yet
        for gi, params in enumerate(self.lists):
            tracked: list[Tensor] = []
            states: list[dict[str, Any]] = []
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
        # Per group, the tracked tensors by (device, dtype) for the sync; built at the first sync.
        self.buckets: dict[int, list[list[Any]]] = {}
        self.has_dtensor = any(_maybe_dtensor(p) for params in self.lists for p in params)

    def valid(self, state: Any, groups: list[dict[str, Any]]) -> bool:
        if state is not self.state or len(groups) != len(self.groups):
            return False
        for group, cached, params, n in zip(groups, self.groups, self.lists, self.lens):
            if group is not cached or group["params"] is not params or len(params) != n:
                return False
        return True

    def track(self, gi: int, p: Tensor, st: dict[str, Any], syncs: int) -> None:
        """``p`` (of group ``gi``) just got slow weights; it had synced ``syncs`` times before."""
        self.params[gi].append(p)
        self.states[gi].append(st)
        self.syncs[gi].append(syncs - self.bonus[gi])
        self.most[gi] = max(self.most[gi], syncs)
        self.buckets.pop(gi, None)

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


def _maybe_dtensor(p: Tensor) -> bool:
    # Anything but a plain tensor/Parameter goes through sync.local() (DTensor -> its local shard).
    return type(p) is not Tensor and type(p) is not torch.nn.Parameter


def _is_buffer_like(value: Any, p: Tensor) -> bool:
    return isinstance(value, Tensor) and value.is_floating_point() and tuple(value.shape) == tuple(p.shape)
