"""The paper's adaptive α (Zhang et al. 2019, Section 3, Proposition 1), for tests that need a rule with a
closed form: routed into ``alpha="adaptive"`` by monkeypatching ``lookahead_dist.core.adaptive.adaptive_alpha``
(the core looks that function up at every sync), it lets a test check the adaptive machinery (per-group α,
bounds, fallback, ``reduce_fn``, logged α) against a formula. Not part of the library: the library's rule is
the sign test of :mod:`lookahead_dist.core.adaptive`, which explains why the paper's rule is not used.

``α = 1 + gᵀd / dᵀAd`` with ``d = φ − θ_k``, ``g`` the last gradient and ``A`` diagonal:
``state[p][CURVATURE_KEY]`` if a tensor, else Adam's bias-corrected ``exp_avg_sq``, else RMSprop's
``square_avg``, else ``g ⊙ g``; clipped to ``bounds``, ``fallback`` where undefined.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from lookahead_dist.core.keys import SLOW_KEY
from lookahead_dist.core.sync import local

__all__ = ["CURVATURE_KEY", "quadratic_alpha", "quadratic_alpha_from_sums", "quadratic_line_sums"]

#: Optional diagonal curvature estimate a test stores in ``state[p]`` for this rule.
CURVATURE_KEY = "lookahead_curvature"

_CHUNK = 1 << 22


def _step_count(step: Any) -> float:
    return float(step.item()) if isinstance(step, Tensor) else float(step)


def _curvature(p: Tensor, st: Mapping[str, Any], group: Mapping[str, Any]) -> tuple[Tensor | None, float]:
    """(tensor holding diag(A), scale to multiply it by); ``None`` means "use g ⊙ g"."""
    user = st.get(CURVATURE_KEY)
    if isinstance(user, Tensor):
        return user, 1.0
    second_moment = st.get("exp_avg_sq")
    if isinstance(second_moment, Tensor):
        scale = 1.0
        betas = group.get("betas")
        step = st.get("step")
        if betas is not None and step is not None and group.get("bias_correction", True):
            steps = _step_count(step)
            if steps > 0:
                scale = 1.0 / (1.0 - float(betas[1]) ** steps)
        return second_moment, scale
    square_avg = st.get("square_avg")
    if isinstance(square_avg, Tensor):
        return square_avg, 1.0
    return None, 1.0


def quadratic_line_sums(
    params: Iterable[Tensor], state: Mapping[Tensor, Any], group: Mapping[str, Any]
) -> Tensor:
    """This process's fp64 ``[gᵀd, dᵀAd]`` with ``d = φ − θ`` over ``params`` (partial under sharding)."""
    # Accumulate on each tensor's device and move to the CPU once: no device sync per tensor.
    per_device: dict[torch.device, Tensor] = {}
    for p in params:
        st = state[p]
        slow = st[SLOW_KEY]
        grad = p.grad
        curv, scale = _curvature(p, st, group)
        dev = local(p).device
        acc = per_device.setdefault(dev, torch.zeros(2, dtype=torch.float64, device=dev))
        # Local shards of DTensors (FSDP2): the sums are this process's partial sums, reduced once by
        # the caller; a reshape of the DTensor itself would redistribute it.
        fast_flat = local(p.detach()).reshape(-1)
        slow_flat = local(slow).reshape(-1)
        grad_flat = local(grad.detach()).reshape(-1) if grad is not None else None
        curv_flat = local(curv.detach()).reshape(-1) if curv is not None else None
        for start in range(0, fast_flat.numel(), _CHUNK):
            part = slice(start, start + _CHUNK)
            d = slow_flat[part].double() - fast_flat[part].double()
            g = grad_flat[part].double() if grad_flat is not None else None
            if curv_flat is not None:
                a = curv_flat[part].double() * scale
            elif g is not None:
                a = g * g
            else:
                continue  # no gradient and no curvature: contributes nothing to either sum
            if g is not None:
                acc[0] += torch.dot(g, d)
            acc[1] += torch.dot(a, d * d)
    sums = torch.zeros(2, dtype=torch.float64)
    for acc in per_device.values():
        sums += acc.cpu()
    return sums


def quadratic_alpha_from_sums(
    grad_dot_d: float, d_a_d: float, bounds: tuple[float, float], fallback: float
) -> float:
    """α = 1 + gᵀd / dᵀAd clipped to ``bounds``; ``fallback`` when that is undefined."""
    low, high = bounds
    if not (math.isfinite(grad_dot_d) and math.isfinite(d_a_d)) or d_a_d <= 0.0:
        return float(fallback)
    alpha = 1.0 + grad_dot_d / d_a_d
    if not math.isfinite(alpha):
        return float(fallback)
    return float(min(max(alpha, low), high))


def quadratic_alpha(
    params: list[Tensor],
    state: Mapping[Tensor, Any],
    group: Mapping[str, Any],
    *,
    bounds: tuple[float, float],
    fallback: float,
    reduce_fn: Callable[[Tensor], None] | None = None,
) -> float:
    """The paper's rule: α = 1 + gᵀd / dᵀAd.

    A = diag: ``state[p][CURVATURE_KEY]`` if a tensor, else Adam's bias-corrected ``exp_avg_sq``, else
    RMSprop's ``square_avg``, else ``g ⊙ g``; ``g`` the last gradient; clipped to ``bounds``.

    ``params`` are the group's tensors syncing now; ``state[p]`` holds φ and the inner optimizer's
    state. ``reduce_fn``, when given, sums the fp64 partial sums across shards in place; every process
    then derives the same α from the same global sums.
    """
    with torch.no_grad():
        sums = quadratic_line_sums(params, state, group)
        if reduce_fn is not None:
            reduce_fn(sums)
        grad_dot_d, d_a_d = (float(x) for x in sums.tolist())
    return quadratic_alpha_from_sums(grad_dot_d, d_a_d, bounds, fallback)
