"""Adaptive slow-weights step size: the quadratic-model rule of Zhang et al. 2019 (arXiv 1907.08610).

The paper (Section 3, "Selecting the slow weights step size", Proposition 1) takes a quadratic model
``L(x) = ½ xᵀAx − bᵀx`` with minimiser ``θ* = A⁻¹b`` and picks the point on the segment from the slow
weights ``φ`` to the last fast weights ``θ_k`` that minimises it::

    α* = argmin_α L(φ + α(θ_k − φ)) = (φ − θ*)ᵀ A (φ − θ_k) / (φ − θ_k)ᵀ A (φ − θ_k)

and, for a real network, replaces ``A`` by a cheap curvature estimate (the diagonal empirical Fisher
that Adam keeps) and clips α to ``[α_low, 1]``.

What this module implements, exactly:

* ``θ*`` is estimated by one Newton step from the fast weights, ``θ* ≈ θ_k − A⁻¹ g``. Substituting it,
  ``A⁻¹`` cancels and, with ``d = φ − θ_k``::

      α = 1 + gᵀd / dᵀAd

  so only two sums per param group are needed, ``gᵀd`` and ``dᵀAd`` (no division by ``A``; coordinates
  where the estimate of ``A`` is zero are handled as the limit of the formula).
* ``g`` is the gradient the inner optimizer just used (``p.grad`` at sync time). That is the gradient
  at ``θ_{k−1}``, not at ``θ_k``: the gradient at ``θ_k`` would cost an extra forward/backward. Decoupled
  weight decay (AdamW) and torch's ``weight_decay`` are not in ``p.grad`` and not in the model.
* ``A = diag(a)`` per tensor, first match wins:

  1. ``state[p]["lookahead_curvature"]`` (:data:`CURVATURE_KEY`) if the user stored a tensor there
     (e.g. a Hessian-diagonal estimate);
  2. Adam-like optimizers (``exp_avg_sq`` in state: torch Adam/AdamW, DeepSpeed CPU/Fused Adam): the
     bias-corrected second moment ``exp_avg_sq / (1 − β₂^step)`` (no correction when the group has
     ``bias_correction=False``), i.e. the diagonal empirical Fisher;
  3. RMSprop-like (``square_avg``): that running average as is;
  4. otherwise (SGD, ...): the squared last gradient ``g ⊙ g``, a one-sample empirical Fisher.
* The result is clipped to ``bounds = (α_low, α_high)`` (``Lookahead(alpha_bounds=...)``, default
  ``(0.5, 1.0)``). If a sum is not finite (NaN/inf gradients or weights) or ``dᵀAd`` is not positive
  (a zero step, or a zero curvature estimate), the ``fallback`` α is used
  (``Lookahead(alpha_fallback=...)``, default ``α_low``).

Distributed use. α is one number per param group; every process must use the same one.

* Replicated data parallel (DDP): every process holds the full, identical tensors, so the local sums
  are already global: no ``reduce_fn``, no communication.
* Sharded (DeepSpeed ZeRO-1/2/3): each process holds a shard, so the two sums are partial. ``reduce_fn``
  sums them across shards: one all-reduce of a 2-element fp64 tensor per group per sync, the only
  collective this mode adds. A fixed α adds none (this module is then never imported by the core).
  ZeRO-1/2 step the inner optimizer once per param group, so α is per param group.
* ZeRO-3 with ``sub_group_size`` smaller than a param group steps that group in several pieces, each
  syncing (and lerping) before the next one's sums exist, so one α per group cannot be formed.
  The DeepSpeed adapter refuses that configuration with a clear error; use a fixed α or a
  ``sub_group_size`` at least as large as the largest param group.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from .keys import CURVATURE_KEY, SLOW_KEY
from .sync import local

__all__ = ["CURVATURE_KEY", "adaptive_alpha", "alpha_from_sums", "line_sums"]

# Elements processed per fp64 chunk: bounds the temporary memory on a large ZeRO partition.
_CHUNK = 1 << 22


def _step_count(step: Any) -> float:
    if isinstance(step, Tensor):
        return float(step.item())
    return float(step)


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


def line_sums(params: Iterable[Tensor], state: Mapping[Tensor, Any], group: Mapping[str, Any]) -> Tensor:
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


def alpha_from_sums(grad_dot_d: float, d_a_d: float, bounds: tuple[float, float], fallback: float) -> float:
    """α = 1 + gᵀd / dᵀAd clipped to ``bounds``; ``fallback`` when that is undefined."""
    low, high = bounds
    if not (math.isfinite(grad_dot_d) and math.isfinite(d_a_d)) or d_a_d <= 0.0:
        return float(fallback)
    alpha = 1.0 + grad_dot_d / d_a_d
    if not math.isfinite(alpha):
        return float(fallback)
    return float(min(max(alpha, low), high))


def adaptive_alpha(
    params: list[Tensor],
    state: Mapping[Tensor, Any],
    group: Mapping[str, Any],
    *,
    bounds: tuple[float, float],
    fallback: float,
    reduce_fn: Callable[[Tensor], None] | None = None,
) -> float:
    """The α for one param group at a sync (called by ``Lookahead`` after the inner step).

    ``params`` are the group's tensors syncing now; ``state[p]`` holds φ and the inner optimizer's
    state. ``reduce_fn``, when given, sums the fp64 partial sums across shards in place; every process
    then derives the same α from the same global sums.
    """
    with torch.no_grad():
        sums = line_sums(params, state, group)
        if reduce_fn is not None:
            reduce_fn(sums)
        grad_dot_d, d_a_d = (float(x) for x in sums.tolist())
    return alpha_from_sums(grad_dot_d, d_a_d, bounds, fallback)
