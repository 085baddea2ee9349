"""Tolerances for comparing two *different* computations of the same fp32 quantity, derived once here.

Two computations that are mathematically equal (our sync against the reference loop, a sharded run against
one process, one kernel path against another) round differently: another summation order, an FMA where the
other side multiplies then adds, a vector body where the other side runs a scalar tail. Which of those
happens depends on the CPU (AVX-512, AVX2, none) and the thread count, so such comparisons get a tolerance
from fp32 rounding and never ``torch.equal``. Bit-exact checks stay where the *same* computation is replayed
(a resume against an uninterrupted run, a restore after ``use_slow_weights``, a value copied into state).

fp32 has a 24-bit significand: one rounding moves a value ``x`` by at most ``u·|x|`` with the unit roundoff
``u = EPS32 / 2 = 2⁻²⁴``; ``ulp(x) ≤ EPS32·|x|``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

EPS32 = torch.finfo(torch.float32).eps  # 2⁻²³ ≈ 1.19e-7: the spacing of fp32 values in [1, 2)
EPS64 = torch.finfo(torch.float64).eps

# Weights of the tests' small models (|w| ≲ 2) compared after ≲ 30 inner steps and ≲ 10 syncs against the
# reference loop: the inner steps are the same torch kernels on both sides, fed inputs that differ by the
# sync's rounding; a sync rounds in ≤ 2 operations per element on each side (our lerp against the reference's
# φ + α(θ − φ)), ≤ 2 ulp per sync, and those differences are damped, not amplified, by the contractive
# steps of these runs. Eight ulp of a value of magnitude one bounds that with room for the summation order of
# a gradient split over 2 ranks (one extra rounding per element per step).
WEIGHT_TOL = 1e-6  # ≈ 8.4·EPS32


def elementwise_tol(reference: torch.Tensor, roundings: int) -> float:
    """|a − b| bound for two kernels that each round ``roundings`` times per element of values like ``reference``.

    Each rounding moves an element by ≤ u·|x| on each side, so the two differ by ≤ 2·roundings·u·max|x| =
    roundings·EPS32·max|x| (first order).
    """
    return roundings * EPS32 * float(reference.detach().abs().max())


def perturbed_dot_tol(weights_tol: float, abs_sum: float, n_terms: int, abs_products: float) -> float:
    """Bound on |Σ dᵢ·pᵢ − Σ d̃ᵢ·p̃ᵢ| when every d̃ᵢ, p̃ᵢ is within ``2·weights_tol`` of dᵢ, pᵢ.

    ``d = φ − θ`` (and ``p``, the previous ``d``) is a difference of two weights, each within
    ``weights_tol`` of the other computation's, so ``|δd|, |δp| ≤ 2·weights_tol`` per element and, to first
    order, ``|Σ d·p − Σ d̃·p̃| ≤ 2·weights_tol·Σ(|dᵢ| + |pᵢ|)`` — ``abs_sum`` is that ``Σ(|dᵢ| + |pᵢ|)``.
    The products are then summed in fp64 in another order on each side (one partial sum per shard): recursive
    summation errs by ≤ (n − 1)·u₆₄·Σ|dᵢpᵢ| on each side (Higham, *Accuracy and Stability*, §4.2).
    """
    return 2 * weights_tol * abs_sum + (n_terms - 1) * EPS64 * abs_products


def clipped_ramp_tol(rel_err: float, low: float, high: float, z_start: float, z_span: float) -> float:
    """|Δα| for α = low + (high − low)·clip((z − z_start)/z_span, 0, 1) when z carries a relative error ``rel_err``.

    The clip is continuous with slope (high − low)/z_span inside the ramp and 0 outside it, so
    |Δα| ≤ (high − low)/z_span·|Δz| with |Δz| ≤ rel_err·|z| and |z| ≤ max(|z_start|, |z_start + z_span|) where
    the slope is non-zero. For z = m̂/σ from running moments of r = h/‖d_prev‖², a relative error ε in every
    h gives |Δz| ≲ 2ε·|z| (first order, away from σ = 0).
    """
    z_max = max(abs(z_start), abs(z_start + z_span))
    return (high - low) / z_span * rel_err * z_max


def scale_of_h(params: Iterable[torch.Tensor], state: Mapping[torch.Tensor, Any]) -> tuple[float, float, int]:
    """(Σ(|d| + |d_prev|), Σ|d·d_prev|, terms) over the tensors with a previous displacement: the scale of
    the adaptive rule's sum h = Σ d·d_prev for :func:`perturbed_dot_tol`, read from one process's state."""
    from lookahead_dist.core.keys import PREV_KEY, SLOW_KEY

    abs_sum, abs_products, terms = 0.0, 0.0, 0
    for p in params:
        prev = state[p].get(PREV_KEY)
        if not isinstance(prev, torch.Tensor):
            continue
        d = (state[p][SLOW_KEY].double() - p.detach().double()).flatten()
        d_prev = prev.double().flatten()
        abs_sum += float(d.abs().sum() + d_prev.abs().sum())
        abs_products += float((d * d_prev).abs().sum())
        terms += d.numel()
    return abs_sum, abs_products, terms
