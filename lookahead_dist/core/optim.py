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

from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
from .plan import StepPlan, advance_counters, claim, set_counts
from .pull import Pull, raise_if_nonfinite, sync
from .settings import AlphaSpec, LookaheadConfigError, LookaheadSettings, check_alpha, check_k
from .state_check import check_pullback_keys, check_state_dict
from .sync import local, make_slow

__all__ = ["COUNT_KEY", "PULLBACK_MODES", "SLOW_KEY", "Lookahead", "ReduceFn", "slow_key_for"]

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

def _check_inner(optimizer: Any, allow_empty: bool) -> None:
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
        raise ValueError("Lookahead: the optimizer has no parameters to step; create it with the model's parameters.")


def _check_scope(settings: Any, rule: Pull) -> None:
    """Refuse settings that ``rule`` cannot carry out: above all ``outer.scope="nodes"`` on plain Lookahead."""
    if not isinstance(settings, LookaheadSettings):
        raise TypeError(f"Lookahead: settings must be a LookaheadSettings, got {type(settings).__name__}.")
    scope = settings.outer.scope
    if scope == rule.scope:
        return
    if scope == "nodes":
        raise LookaheadConfigError(
            "Lookahead: outer.scope='nodes' (the cross-node outer step) cannot be carried out here: this "
            "Lookahead syncs each process's weights locally and would train plain Lookahead. The outer step "
            "needs every node to be its own data-parallel group before the engine is built; it works with "
            "lookahead_dist.deepspeed.initialize and a \"lookahead\": {\"outer\": {\"scope\": \"nodes\", ...}} "
            "section in the DeepSpeed config (or Lightning's LookaheadDeepSpeedStrategy(outer=...)). Remove "
            "outer= here, or use outer.scope='global'."
        )
    raise LookaheadConfigError(
        f"Lookahead: outer.scope={scope!r} does not match this Lookahead's sync ({type(rule).__name__} carries "
        f"out outer.scope={rule.scope!r}); build the optimizer through the entry point for that scope."
    )


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
            ``outer.scope="nodes"`` is refused here (see :mod:`lookahead_dist.deepspeed.outer`).
        reduce_fn: for sharded engines, sums the adaptive-α partial sums across shards in place.
            Not used for a fixed α, which needs no communication.
        allow_empty: accept an inner optimizer whose param groups are empty now; for engines that
            fill them only while stepping (DeepSpeed ZeRO-3 sub-groups).
        pull: how a sync pulls θ and φ together (:class:`~lookahead_dist.core.pull.Pull`, the extension
            point of engine adapters); default: Lookahead's own local rule.
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
        pull: Pull | None = None,
    ) -> None:
        _check_inner(optimizer, allow_empty)
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
        if reduce_fn is not None and not callable(reduce_fn):
            raise TypeError(
                f"Lookahead: reduce_fn={reduce_fn!r} is not callable; pass a function that sums a small tensor "
                f"across shards in place (e.g. a torch.distributed.all_reduce), or None."
            )
        if pull is not None and not isinstance(pull, Pull):
            raise TypeError(f"Lookahead: pull must be a lookahead_dist.core.pull.Pull, got {type(pull).__name__}.")
        self._pull = pull if pull is not None else Pull()
        _check_scope(settings, self._pull)
        claim(optimizer, self)
        self._settings = settings
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
        self._plan: StepPlan | None = None
        self._keys_checked: tuple[str, ...] | None = None

    # ------------------------------------------------------------------ settings
    @property
    def settings(self) -> LookaheadSettings:
        """What this Lookahead does; change it with ``opt.settings = opt.settings.replace(k=3)``."""
        return self._settings

    @settings.setter
    def settings(self, value: LookaheadSettings) -> None:
        _check_scope(value, self._pull)
        self._settings = value

    # Read-only views of the settings (validated when the settings were built).
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
        self.__dict__.setdefault("_pull", Pull())
        claim(self.optimizer, self)
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

    def _current_plan(self) -> StepPlan:
        groups = self.optimizer.param_groups
        plan = self._plan
        if plan is None or not plan.valid(self.optimizer.state, groups):
            self._drop_plan()
            plan = self._plan = StepPlan(self.optimizer.state, groups, self._syncs_of)
        return plan

    def _drop_plan(self) -> None:
        """Forget the cached plan, keeping the per-tensor sync counts it held."""
        plan = self.__dict__.get("_plan")
        if plan is not None:
            plan.fold(self._syncs_of)
            self._plan = None

    def _step(self) -> None:
        """One inner step, then the counters; the tensors whose cycle completes sync (see core.pull.sync)."""
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

        if fresh:
            plan.add_slow(fresh, snapshots, self.optimizer.state, self._syncs_of)
        keys = self.pullback_keys
        if self.pullback == "pullback" and self._keys_checked != keys and check_pullback_keys(self.optimizer, keys):
            self._keys_checked = keys
        if probe:
            return  # a state initialisation: the keys exist now, nothing counts

        defer = self.settings.nonfinite == "raise"  # then nothing may change before the check
        due, synced, pending = advance_counters(plan, group_k, defer)
        if due and defer:
            raise_if_nonfinite(self, due)
        for states, count in pending:
            set_counts(states, count)
        if due:
            sync(self, due, self._pull)
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

    @torch._disable_dynamo
    def _record_syncs(self, plan: StepPlan, synced: dict[int, list[int] | None]) -> None:
        # Under torch.compile, dynamo drops attribute updates on an Optimizer; run this eagerly.
        most = self.sync_count
        for gi, indices in synced.items():
            most = max(most, plan.record(gi, indices))
        self.sync_count = most

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
