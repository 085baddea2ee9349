"""The core Lookahead optimizer (Zhang, Lucas, Hinton, Ba 2019, Algorithm 1). Torch only.

Fast weights θ take ``k`` steps of the wrapped (inner) optimizer; then the slow weights move
``φ ← φ + α(θ − φ)`` and the fast weights restart from them, ``θ ← φ``. ``φ₀ = θ₀``.

Everything Lookahead keeps lives in the inner optimizer's per-tensor state (``state[p]``):

* ``"lookahead_slow"``  φ, same dtype/device as the tensor the inner optimizer steps;
* ``"lookahead_count"`` a Python int, inner steps taken by this tensor since its last sync;
* ``"lookahead_slow_<key>"`` the slow copy of a momentum buffer (``pullback="pullback"`` only).

That layout is what lets engines that hand the inner optimizer a *shard* of the weights (DeepSpeed
ZeRO) hold φ for that shard only and checkpoint it through the inner ``state_dict`` unchanged.
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
from .settings import AlphaSpec, LookaheadSettings, check_alpha, check_k

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
        #: Number of step() calls in which at least one tensor synced (this process, not persisted).
        self.sync_count = 0

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
        return {
            k: v
            for k, v in self.__dict__.items()
            if k not in ("_spare", "step") and not k.startswith("_optimizer_")
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        for name in _HOOK_DICTS:
            self.__dict__.setdefault(name, OrderedDict())
        self._spare = {}
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

    # state_dict is the inner's: φ and the counters are per-tensor inner state, so every engine path
    # that saves optimizer.state generically (per-rank ZeRO files, NVMe swapping) carries them.
    # Hooks registered here run there.
    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        __import__("lookahead_dist.core.state_check").core.state_check.check_state_dict(self, state_dict)
        self.optimizer.load_state_dict(state_dict)
        self._spare.clear()

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
        # The closure (forward/backward under Lightning's non-DeepSpeed strategies) runs first: the
        # gradients it produces decide which tensors step, and φ₀ must be θ before this step.
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            self._step()
        return loss

    def _step(self) -> None:
        inner_state = self.optimizer.state
        if self._is_state_probe():
            # torch.distributed.checkpoint initialises optimizer state with a synthetic lr=0 step on
            # zero grads; let the inner optimizer create its state but do not count it.
            self.optimizer.step()
            return

        groups = self.param_groups
        # Overrides may be edited after construction: check them before anything moves.
        group_k = [g.get(GROUP_K, self.k) for g in groups]
        for group in groups:
            self._check_group(group)
        # (group index, param, its inner state) of every tensor the inner optimizer is about to step.
        tracked: list[tuple[int, Tensor, dict[str, Any]]] = []
        fresh: list[tuple[int, Tensor]] = []
        for gi, group in enumerate(groups):
            for p in group["params"]:
                st = inner_state.get(p)
                if st is not None and SLOW_KEY in st:
                    tracked.append((gi, p, st))
                elif p.grad is not None:
                    fresh.append((gi, p))
        # φ₀ = θ before this step, inserted only after the inner step: torch Adam and DeepSpeedCPUAdam
        # initialise their own state only when a tensor's state is empty.
        snapshots = [self._snapshot(p) for _, p in fresh]

        self.optimizer.step()

        for (gi, p), snap in zip(fresh, snapshots):
            st = inner_state[p]
            st[SLOW_KEY] = snap
            tracked.append((gi, p, st))
        due: dict[int, list[Tensor]] = {}
        for gi, p, st in tracked:
            count = st.get(COUNT_KEY, 0) + 1
            if count >= group_k[gi]:
                count = 0
                due.setdefault(gi, []).append(p)
            st[COUNT_KEY] = count
        if due:
            self._sync(due)

    def _snapshot(self, p: Tensor) -> Tensor:
        spare = self._spare.pop(p, None)
        if spare is not None:
            return spare.copy_(p)
        return p.detach().clone(memory_format=torch.preserve_format)

    def _is_state_probe(self) -> bool:
        # torch.distributed.checkpoint probes only an optimizer whose state dict has no entry at all
        # (after a "reset" sync the entries are empty but present: a real step then).
        if self.optimizer.state:
            return False
        lrs = [g["lr"] for g in self.param_groups if "lr" in g]
        if not lrs or any(float(lr) != 0.0 for lr in lrs):
            return False
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        return bool(grads) and all(not bool(g.any()) for g in grads)

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
        )

    def _sync(self, due: dict[int, list[Tensor]]) -> None:
        state = self.optimizer.state
        buckets: dict[tuple[torch.device, torch.dtype, float], list[Tensor]] = defaultdict(list)
        for gi, params in due.items():
            alpha = self._group_alpha(gi, params)
            # Kept in the group dict: ZeRO-1/2 shows the inner optimizer one group at a time.
            self.param_groups[gi][LAST_ALPHA] = alpha
            for p in params:
                buckets[(p.device, p.dtype, alpha)].append(p)
        for (_, _, alpha), fast in buckets.items():
            slow = [state[p][SLOW_KEY] for p in fast]
            torch._foreach_lerp_(slow, fast, alpha)  # φ ← φ + α(θ − φ)
            torch._foreach_copy_(fast, slow)  # θ ← φ
            if self.pullback == "pullback":
                self._pull_back_buffers(fast, alpha)
            elif self.pullback == "reset":
                for p in fast:
                    st = state[p]
                    self._spare[p] = st[SLOW_KEY]
                    st.clear()
        self._count_sync()

    @torch._disable_dynamo
    def _count_sync(self) -> None:
        # Under torch.compile, dynamo drops this attribute update on an Optimizer; run it eagerly.
        self.sync_count += 1

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
                    have_slow.append(state[p][slow_name])
                    live.append(buf)
                else:
                    first.append((p, buf))
            if live:
                torch._foreach_lerp_(have_slow, live, alpha)
                torch._foreach_copy_(live, have_slow)
            if first:
                # The momentum at φ₀ is zero: m ← 0 + α(m − 0); its slow copy must not alias m.
                bufs = [b for _, b in first]
                torch._foreach_mul_(bufs, alpha)
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
        """Put φ into the parameters for the body (e.g. evaluation); restore θ bit-exactly on exit."""
        params = self.tracked_params()
        if not params:
            yield
            return
        with torch.no_grad():
            fast_backup = [p.detach().clone() for p in params]
            torch._foreach_copy_(params, [self.optimizer.state[p][SLOW_KEY] for p in params])
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, fast_backup)

    def fast_slow_distance_sq(self) -> Tensor:
        """Σ‖θ − φ‖² over the tensors this process steps, fp64 on CPU.

        Under ZeRO this is the partial sum over this rank's shard; the caller reduces it.
        """
        params = self.tracked_params()
        if not params:
            return torch.zeros((), dtype=torch.float64)
        with torch.no_grad():
            diffs = torch._foreach_sub(params, [self.optimizer.state[p][SLOW_KEY] for p in params])
            squares = [torch.linalg.vector_norm(d, dtype=torch.float64).square().cpu() for d in diffs]
            return torch.stack(squares).sum()
