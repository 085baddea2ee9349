"""The sync of a Lookahead cycle: one loop, and the rule it calls to pull θ and φ together. Torch only.

:func:`sync` runs when tensors complete their cycle (``Lookahead.step`` decides which, see
:mod:`lookahead_dist.core.plan`). It owns what every sync does alike: the non-finite policy
(``nonfinite``, see :mod:`lookahead_dist.core.optim`), the α of each group (kept in the group dict as the
last α), the momentum pullback, the ``"reset"`` of the inner state and the warning naming the tensors kept.
What moves the weights is a :class:`Pull`: Lookahead's own rule ``φ ← φ + α(θ − φ)``, ``θ ← φ``, local to each
process, is the default; an engine adapter that moves φ otherwise supplies its own (the cross-node outer step
of :mod:`lookahead_dist.deepspeed.outer` reduces θ − φ over nodes first) and the rest of the sync stays the
core's.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from .keys import GROUP_ALPHA, GROUP_K, LAST_ALPHA, SLOW_KEY, slow_key_for
from .plan import uncached_buckets
from .sync import CHUNK, local, nonfinite_tensors, sync_

if TYPE_CHECKING:
    from .optim import Lookahead

__all__ = ["Due", "Kept", "Pull", "describe", "raise_if_nonfinite", "sync"]

#: Per param-group index, the tensors whose cycle completes at this step.
Due = dict[int, list[Tensor]]


class Kept(NamedTuple):
    """A tensor whose θ was not finite at a sync: its φ was kept and θ reset to it."""

    group: int
    tensor: Tensor
    #: Blocks of ``sync.CHUNK`` elements kept, of ``blocks`` (1 of 1: the whole tensor).
    blocks_kept: int
    blocks: int


class Pull:
    """How a sync pulls θ and φ together: Lookahead's own rule, on each process's local tensors.

    Subclass it to move φ otherwise; :func:`sync` calls :meth:`alpha` once per group due, then :meth:`pull`
    once for all of them, then pulls back momentum buffers with :meth:`pullback_alpha` and applies
    ``pullback="reset"`` itself. ``scope`` is the ``outer.scope`` the rule carries out: ``Lookahead``
    refuses settings whose scope its rule does not carry out.
    """

    scope = "global"

    def alpha(self, la: Lookahead, gi: int, params: list[Tensor]) -> float:
        """The step size of group ``gi`` at this sync (``alpha``, a group's ``lookahead_alpha``, or adaptive)."""
        spec = la.param_groups[gi].get(GROUP_ALPHA, la.alpha)
        if spec != "adaptive":
            return float(spec)
        from . import adaptive  # looked up per sync: keeps the fixed-α path light

        return adaptive.adaptive_alpha(
            params,
            la.optimizer.state,
            la.param_groups[gi],
            bounds=la.alpha_bounds,
            fallback=la.alpha_fallback,
            reduce_fn=la.reduce_fn,
            k=la.param_groups[gi].get(GROUP_K, la.k),
        )

    def pullback_alpha(self, la: Lookahead, gi: int, alpha: float) -> float:
        """The α that ``pullback="pullback"`` interpolates group ``gi``'s momentum buffers with."""
        return alpha

    def pull(self, la: Lookahead, due: Due, alphas: dict[int, float], check: bool) -> list[Kept]:
        """φ ← φ + α(θ − φ), θ ← φ for every tensor due; with ``check``, non-finite θ keeps φ (θ ← φ).

        Returns the tensors (or blocks) kept. Without ``check`` the caller has decided already.
        """
        kept: list[Kept] = []
        plan, state = la._plan, la.optimizer.state
        for gi, params in due.items():
            buckets = plan.buckets(gi, params) if plan is not None else uncached_buckets(params, state)
            for bucket in buckets:
                for i, blocks_kept, blocks in bucket.plan.run(alphas[gi], check):
                    kept.append(Kept(gi, bucket.params[i], blocks_kept, blocks))
        return kept


def sync(la: Lookahead, due: Due, rule: Pull) -> None:
    """One sync of the tensors ``due``: non-finite policy, α per group, ``rule.pull``, pullback, reset, warning.

    ``nonfinite="raise"`` was checked by the caller before anything changed. With ``"skip"`` the rule
    checks while it pulls; groups with adaptive α are decided per whole tensor first, so that α's line
    sums see no NaN either.
    """
    check = la.settings.nonfinite == "skip"
    kept: list[Kept] = []
    pulled = due
    if check and any(la.param_groups[gi].get(GROUP_ALPHA, la.alpha) == "adaptive" for gi in due):
        pulled, kept = _keep_nonfinite_tensors(la, due)
        check = False
    # Even with every tensor of a group kept: under ZeRO/FSDP adaptive α reduces its sums across
    # processes, so every process must take part (no finite tensor: the fallback α).
    alphas = {gi: rule.alpha(la, gi, params) for gi, params in pulled.items()}
    for gi, alpha in alphas.items():
        la.param_groups[gi][LAST_ALPHA] = alpha  # in the group dict: ZeRO-1/2 shows one group at a time
    kept += rule.pull(la, pulled, alphas, check)
    if la.pullback == "pullback":
        skipped = {id(k.tensor) for k in kept}
        for gi, params in pulled.items():
            good = [p for p in params if id(p) not in skipped] if skipped else params
            if good:
                pull_back_buffers(la, good, rule.pullback_alpha(la, gi, alphas[gi]))
    elif la.pullback == "reset":
        _reset(la, due)
    if kept:
        _warn_kept(la, kept)


def _keep_nonfinite_tensors(la: Lookahead, due: Due) -> tuple[Due, list[Kept]]:
    """θ ← φ for each whole tensor with a non-finite θ; returns (the rest, those kept)."""
    state = la.optimizer.state
    rest: Due = {}
    kept: list[Kept] = []
    for gi, params in due.items():
        bad = set(nonfinite_tensors([local(p) for p in params]))
        for i in sorted(bad):
            p = params[i]
            local(p).copy_(local(state[p][SLOW_KEY]))
            kept.append(Kept(gi, p, 1, 1))
        rest[gi] = [p for i, p in enumerate(params) if i not in bad] if bad else params
    return rest, kept


def _reset(la: Lookahead, due: Due) -> None:
    """``pullback="reset"``: clear the inner state of every tensor due; its φ is reused at its next step."""
    state = la.optimizer.state
    for params in due.values():
        for p in params:
            st = state[p]
            la._spare[p] = st[SLOW_KEY]
            st.clear()


def pull_back_buffers(la: Lookahead, fast: list[Tensor], alpha: float) -> None:
    """``pullback="pullback"``: interpolate each momentum buffer toward its slow copy, as φ toward θ."""
    state = la.optimizer.state
    for key in la.pullback_keys:
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


def raise_if_nonfinite(la: Lookahead, due: Due) -> None:
    """``nonfinite="raise"``: one extra read of θ for the tensors due, before anything is written."""
    who = [(gi, p) for gi, params in due.items() for p in params]
    bad = nonfinite_tensors([local(p) for _, p in who])
    if bad:
        names = "; ".join(describe(la, *who[i]) for i in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise FloatingPointError(
            f"Lookahead: step {la._steps_taken} (this process): the fast weights are not finite (NaN/inf) "
            f"at a sync in {len(bad)} tensor(s): {names}{more}. Nothing of this sync was applied "
            f"(nonfinite='raise'); use nonfinite='skip' to keep their slow weights and continue, and look "
            f"for the cause (learning rate, loss scaling, gradient clipping)."
        )


def describe(la: Lookahead, gi: int, p: Tensor) -> str:
    """``param group 0 tensor 3 'head.bias' (shape (2,))``, for messages."""
    group = la.param_groups[gi] if gi < len(la.param_groups) else {}
    params = group.get("params", [])
    index = next((i for i, q in enumerate(params) if q is p), None)
    names = group.get("param_names")
    name = f" {names[index]!r}" if index is not None and isinstance(names, list) and index < len(names) else ""
    return f"param group {gi} tensor {index}{name} (shape {tuple(p.shape)})"


def _warn_kept(la: Lookahead, kept: list[Kept]) -> None:
    parts = []
    for k in kept[:5]:
        what = describe(la, k.group, k.tensor)
        if k.blocks_kept < k.blocks:
            what += f": {k.blocks_kept} of its {k.blocks} blocks of {CHUNK} elements"
        parts.append(what)
    more = f" and {len(kept) - 5} more" if len(kept) > 5 else ""
    warnings.warn(
        f"Lookahead: step {la._steps_taken} (this process): non-finite fast weights (NaN/inf) at a sync in "
        f"{'; '.join(parts)}{more}. Their slow weights were kept and the fast weights reset to them "
        f"(nonfinite='skip'); training continues from the slow weights. Use nonfinite='raise' to stop "
        f"instead, and look for the cause (learning rate, loss scaling, gradient clipping).",
        RuntimeWarning,
        stacklevel=6,  # the caller of Lookahead.step (through step, _step, sync and this function)
    )
