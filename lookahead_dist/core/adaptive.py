"""Adaptive slow-weights step size ``alpha="adaptive"``: a sign test on consecutive cycles. Torch only.

The rule
--------
At each sync of a param group, with ``d_t = φ_t − θ_k`` the displacement of this cycle (what the fast
weights travelled, reversed) and ``d_{t−1}`` the one of the group's previous sync::

    h_t = d_tᵀ d_{t−1} − q_{t−1}          (summed over the group's tensors; q: momentum carry, below)
    r_t = h_t / ‖d_{t−1}‖²               (free of the scale; steady while a descent slows down geometrically)
    m, s = EMAs (β = 0.9, bias-corrected, over syncs) of r_t and r_t²
    z    = m / sqrt((s − m²) · (1 − β) / (1 + β))          (t-statistic of the mean of r)
    α    = α_low + (α_high − α_low) · clip((z − 1) / 2, 0, 1)

so α sits at its lower bound unless consecutive cycles agree (z > 1), and reaches the upper bound when they
agree clearly (z ≥ 3). The first sync of a group (no ``d_{t−1}`` yet), a zero ``d_{t−1}`` and a non-finite
``h`` use the ``fallback`` α (default ``α_low``) and leave the statistics of r unchanged.

Derivation
----------
After a sync the slow weights are ``φ_{t+1} = φ_t − α d_t``. The derivative of the loss there with respect to
the α just applied is ``−∇L(φ_{t+1})ᵀ d_t`` (a hypergradient): positive inner products of the *next* gradients
with ``d_t`` mean the slow weights stopped short and a larger α would have been better, negative ones mean
they overshot. The next cycle's displacement ``d_{t+1}`` is the inner optimizer's (preconditioned) sum of the
gradients of that cycle, so ``d_{t+1}ᵀ d_t`` measures the same thing with the whole cycle's gradients instead of
one minibatch's. Its minibatch noise is fresh, independent of ``d_t``, so it is unbiased; the paper's estimate is
not (below). One part of ``d_{t+1}`` is not new information: the inner optimizer's momentum, kept across the
sync, carries the previous cycle's direction into the next one. That part is known at sync time and is
subtracted: with momentum ``m`` at the sync, the next ``k`` steps move by about ``q = lr · Σ_{j=1..k} β₁ʲ · u``,
``u = m̂ / (√v̂ + ε)`` for Adam-like state (``exp_avg``/``exp_avg_sq``) and ``u = m`` (``momentum_buffer``,
times μ more under Nesterov) for SGD with momentum; ``q_t = qᵀ d_t`` is kept as a number per tensor.

On a quadratic with noisy gradients (the paper's noisy quadratic model, NQM) this sign has a simple
meaning. For one coordinate with curvature ``a`` and noise of variance ``σ²`` per cycle, the steady state of
Lookahead with any fixed α in (0, 1] gives ``E[hypergradient] ∝ −α σ² / (2 − α m) < 0`` (``m = 1 − (1 − η a)ᵏ``
for SGD; the steady-state variance of φ is ``α σ² / (m (2 − α m))``, which grows with α, cf. the paper's
Proposition 2): in the noise-dominated steady state a smaller α is always better, while far from the minimum,
where the drift dominates, the sign is positive and α = 1 (the inner optimizer alone) is best. A gradient step on α with this signal is too noisy to
settle (on the NQM it hovers well above the best fixed α and loses to it), so α is set by the
significance of the sign instead, as written above; r and z are free of the scale of the loss and the weights
and of the learning rate. Dividing by ``‖d_{t−1}‖²`` matters on a clean descent: there ``h`` shrinks
geometrically from sync to sync, which a t-statistic of h itself would read as noise, while r stays steady.

Why not the paper's rule
------------------------
Zhang et al. 2019 (arXiv 1907.08610, Section 3, Proposition 1) pick the minimiser of a quadratic model
``½ xᵀAx − bᵀx`` on the segment φ → θ_k, ``α* = 1 + gᵀd / dᵀAd`` after a Newton step from θ_k with the last
minibatch gradient ``g`` and a diagonal empirical Fisher for A. Two things go wrong with noisy gradients:
``g`` is part of ``d`` (the last inner step was taken along it), so ``gᵀd`` carries ``+lr·‖noise‖²`` and α is
pushed up to its upper bound; and the empirical Fisher has the units of g², not of a Hessian (on the NQM it
scales like ``A³``), so ``dᵀAd`` is off by orders of magnitude and any bias decides α. On the NQM the paper's
rule ends no better than the inner optimizer alone with SGD and worse than α = 0.5 with Adam, while this rule
matches α = 0.5 in the steady state (it sits at the lower bound there) and beats the inner optimizer alone
at every learning rate: ``benchmarks/bench_nqm.py`` (which carries the paper's rule for the comparison),
numbers in ``benchmarks/RESULTS.md``.

State (checkpointed with the optimizer, per tensor)
---------------------------------------------------
``lookahead_adaptive_prev`` (a tensor like φ: the last displacement ``d``; this doubles Lookahead's extra
memory for the groups using ``alpha="adaptive"``), ``lookahead_adaptive_carry`` (a float, this tensor's share of
``q``), ``lookahead_adaptive_step`` (a float: the inner step count at the last sync), ``lookahead_adaptive_mean`` / ``_sq`` / ``_n`` / ``_dd`` (floats: the group's statistics and its last global
``‖d‖²``, the same in every tensor
of the group and on every process). A universal-checkpoint conversion keeps φ but not these: the statistics
then restart (first sync: the fallback α). ``pullback="reset"`` clears the inner state, these entries with it,
at every sync: every sync is then a first one and uses the fallback α; use ``"none"`` or ``"pullback"``.

Distributed use. α is one number per param group; every process must use the same one.

* Replicated data parallel (DDP): every process holds the full, identical tensors, so the local sums
  are already global: no ``reduce_fn``, no communication.
* Sharded (DeepSpeed ZeRO-1/2/3, FSDP2): each process holds a shard (and its share of the state above), so
  the sums are partial. ``reduce_fn`` sums them across shards: one all-reduce of a 3-element fp64 tensor
  ``[h, elements with history, ‖d‖²]`` per group per sync, the only collective this mode adds. Every process then
  updates the same statistics from the same global sums. A fixed α adds none (this module is then never
  imported by the core). ZeRO-1/2 step the inner optimizer once per param group, so α is per param group.
* ZeRO-3 with ``sub_group_size`` smaller than a param group steps that group in several pieces, each
  syncing (and lerping) before the next one's sums exist, so one α per group cannot be formed.
  The DeepSpeed adapter refuses that configuration with a clear error; use a fixed α or a
  ``sub_group_size`` at least as large as the largest param group.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from .keys import CARRY_KEY, GROUP_K, PREV_KEY, SLOW_KEY, STAT_KEYS, STEP_KEY
from .settings import LookaheadSettings
from .sync import local

__all__ = [
    "CARRY_KEY",
    "PREV_KEY",
    "STAT_KEYS",
    "AlphaStats",
    "adaptive_alpha",
    "alpha_from_sums",
    "line_sums",
]

#: Smoothing of the statistics of h over syncs.
BETA = 0.9
#: α leaves its lower bound above this t-statistic ...
Z_START = 1.0
#: ... and reaches its upper bound this much higher.
Z_SPAN = 2.0

# Elements processed per fp64 chunk: bounds the temporary memory on a large ZeRO partition.
_CHUNK = 1 << 22
_DEFAULT_K: int = LookaheadSettings().k


@dataclass(frozen=True)
class AlphaStats:
    """EMAs (not bias-corrected) of r = h / ‖d_prev‖² and r² over ``n`` syncs, and the last global ‖d‖²."""

    mean: float = 0.0
    sq: float = 0.0
    n: int = 0
    dd: float = 0.0


def _step_count(step: Any) -> float:
    if isinstance(step, Tensor):
        return float(step.item())
    return float(step)


def line_sums(params: Iterable[Tensor], state: Mapping[Tensor, Any], group: Mapping[str, Any]) -> Tensor:
    """This process's fp64 ``[h, elements with history, ‖d‖²]`` over ``params`` (partial under sharding).

    ``h = Σ (d ⊙ d_prev) − Σ carry`` with ``d = φ − θ`` now and ``d_prev`` from the previous sync; tensors
    without a previous displacement contribute nothing to ``h``. Reads state only (see :func:`remember`).
    """
    per_device: dict[torch.device, Tensor] = {}
    carry = 0.0
    for p in params:
        st = state[p]
        prev = st.get(PREV_KEY)
        has_prev = isinstance(prev, Tensor)
        if has_prev:
            carry += float(st.get(CARRY_KEY, 0.0))
        dev = local(p).device
        acc = per_device.setdefault(dev, torch.zeros(3, dtype=torch.float64, device=dev))
        # Local shards of DTensors (FSDP2): partial sums, reduced once by the caller.
        fast_flat = local(p.detach()).reshape(-1)
        slow_flat = local(st[SLOW_KEY]).reshape(-1)
        prev_flat = local(prev).reshape(-1) if has_prev else None
        for start in range(0, fast_flat.numel(), _CHUNK):
            part = slice(start, start + _CHUNK)
            d = slow_flat[part].double() - fast_flat[part].double()
            if prev_flat is not None:
                acc[0] += torch.dot(d, prev_flat[part].double())
            acc[2] += torch.dot(d, d)
        if has_prev:
            acc[1] += fast_flat.numel()
    sums = torch.tensor([-carry, 0.0, 0.0], dtype=torch.float64)
    for acc in per_device.values():
        sums += acc.cpu()
    return sums


def _momentum_direction(
    st: Mapping[str, Any], group: Mapping[str, Any], k: int
) -> tuple[Callable[[slice], Tensor], float] | None:
    """(u, c): the next ``k`` inner steps move θ by about ``−c·u`` through the momentum kept at the sync.

    ``u(part)`` gives a flat fp64 chunk of u (chunks bound the temporary memory on a large partition).
    """
    lr = float(group.get("lr", 0.0))
    m = st.get("exp_avg")
    v = st.get("max_exp_avg_sq") if group.get("amsgrad") else None
    v = v if isinstance(v, Tensor) else st.get("exp_avg_sq")
    betas = group.get("betas")
    if isinstance(m, Tensor) and isinstance(v, Tensor) and betas is not None:
        beta1, beta2 = float(betas[0]), float(betas[1])
        steps = _step_count(st.get("step", 0))
        bc1 = bc2 = 1.0
        if group.get("bias_correction", True) and steps > 0:
            bc1, bc2 = 1.0 - beta1**steps, 1.0 - beta2**steps
        eps = float(group.get("eps", 1e-8))
        m_flat, v_flat = local(m).reshape(-1), local(v).reshape(-1)

        def adam_u(part: slice) -> Tensor:
            return (m_flat[part].double() / bc1) / ((v_flat[part].double() / bc2).sqrt() + eps)

        return adam_u, lr * sum(beta1**j for j in range(1, k + 1))
    buf = st.get("momentum_buffer")
    mu = float(group.get("momentum", 0.0) or 0.0)
    if isinstance(buf, Tensor) and mu > 0.0:
        buf_flat = local(buf).reshape(-1)
        extra = mu if group.get("nesterov") else 1.0
        return (lambda part: buf_flat[part].double()), lr * extra * sum(mu**j for j in range(1, k + 1))
    return None


def _cycle_length(st: MutableMapping[str, Any], group: Mapping[str, Any], k: int | None) -> int:
    """Inner steps per cycle: the caller's ``k``, else the group's ``lookahead_k``, else the inner optimizer's
    step count since the tensor's previous sync (Adam-like state has one), else Lookahead's default."""
    steps = st.get("step")
    counted = None
    if steps is not None:
        now = _step_count(steps)
        counted = round(now - float(st.get(STEP_KEY, 0.0)))
        st[STEP_KEY] = now
    if k is not None:
        return int(k)
    if GROUP_K in group:
        return int(group[GROUP_K])
    return counted if counted is not None and counted > 0 else _DEFAULT_K


def remember(
    params: Iterable[Tensor],
    state: MutableMapping[Tensor, Any],
    group: Mapping[str, Any],
    k: int | None = None,
) -> None:
    """Store this sync's ``d = φ − θ`` and the momentum carry ``qᵀd`` for the next sync (call before the lerp)."""
    for p in params:
        st = state[p]
        cycle = _cycle_length(st, group, k)
        slow = st[SLOW_KEY]
        prev = st.get(PREV_KEY)
        if not isinstance(prev, Tensor) or prev.shape != slow.shape or prev.dtype != slow.dtype:
            prev = st[PREV_KEY] = torch.empty_like(slow)  # like φ: a DTensor stays one
        torch.sub(local(slow), local(p.detach()), out=local(prev))
        carry = 0.0
        moved = _momentum_direction(st, group, cycle)
        if moved is not None:
            u, factor = moved
            prev_flat = local(prev).reshape(-1)
            dot = torch.zeros((), dtype=torch.float64, device=prev_flat.device)
            for start in range(0, prev_flat.numel(), _CHUNK):
                part = slice(start, start + _CHUNK)
                dot += torch.dot(u(part), prev_flat[part].double())
            carry = factor * float(dot)
        st[CARRY_KEY] = carry if math.isfinite(carry) else 0.0


def alpha_from_sums(
    h: float, with_history: float, dd: float, stats: AlphaStats, bounds: tuple[float, float], fallback: float
) -> tuple[float, AlphaStats]:
    """(α, updated statistics) from the global sums ``[h, elements with history, ‖d‖²]``.

    ``r = h / ‖d_prev‖²`` (scale-free, and steady while a descent slows down geometrically) feeds the
    statistics; the fallback α, statistics unchanged but for ‖d‖², when r is undefined.
    """
    dd = float(dd) if math.isfinite(dd) else 0.0
    if with_history <= 0 or not math.isfinite(h) or stats.dd <= 0.0:
        return float(fallback), replace(stats, dd=dd)
    r = h / stats.dd
    if not math.isfinite(r):
        return float(fallback), replace(stats, dd=dd)
    h = r
    n = stats.n + 1
    mean = BETA * stats.mean + (1.0 - BETA) * h
    sq = BETA * stats.sq + (1.0 - BETA) * h * h
    new = AlphaStats(mean, sq, n, dd)
    if not (math.isfinite(mean) and math.isfinite(sq)):
        return float(fallback), replace(stats, dd=dd)
    correction = 1.0 - BETA**n
    m_hat, s_hat = mean / correction, sq / correction
    var_of_mean = max(s_hat - m_hat * m_hat, 0.0) * (1.0 - BETA) / (1.0 + BETA)
    if var_of_mean > 0.0:
        z = m_hat / math.sqrt(var_of_mean)
    else:  # one sample (or identical ones): only the sign is known
        z = math.copysign(math.inf, m_hat) if m_hat != 0.0 else 0.0
    low, high = bounds
    share = min(max((z - Z_START) / Z_SPAN, 0.0), 1.0)
    return float(low + (high - low) * share), new


def _read_stats(params: Iterable[Tensor], state: Mapping[Tensor, Any]) -> AlphaStats:
    for p in params:
        st = state[p]
        if all(key in st for key in STAT_KEYS):
            mean, sq, n, dd = (st[key] for key in STAT_KEYS)
            return AlphaStats(float(mean), float(sq), int(n), float(dd))
    return AlphaStats()


def _write_stats(params: Iterable[Tensor], state: MutableMapping[Tensor, Any], stats: AlphaStats) -> None:
    for p in params:
        st = state[p]
        st[STAT_KEYS[0]], st[STAT_KEYS[1]], st[STAT_KEYS[2]], st[STAT_KEYS[3]] = (
            stats.mean,
            stats.sq,
            stats.n,
            stats.dd,
        )


def adaptive_alpha(
    params: list[Tensor],
    state: MutableMapping[Tensor, Any],
    group: Mapping[str, Any],
    *,
    bounds: tuple[float, float],
    fallback: float,
    reduce_fn: Callable[[Tensor], None] | None = None,
    k: int | None = None,
) -> float:
    """The α for one param group at a sync (called by ``Lookahead`` after the inner step, before the lerp).

    ``params`` are the group's tensors syncing now; ``state[p]`` holds φ, the inner optimizer's state and
    this rule's state. ``reduce_fn``, when given, sums the fp64 partial sums across shards in place; every
    process then derives the same α and statistics from the same global sums. ``k`` is the group's cycle
    length (for the momentum carry; default: the group's ``lookahead_k``, else the inner optimizer's step
    count between syncs when its state has one (Adam), else Lookahead's default 5).
    """
    with torch.no_grad():
        sums = line_sums(params, state, group)
        if reduce_fn is not None:
            reduce_fn(sums)
        h, with_history, dd = (float(x) for x in sums.tolist())
        alpha, stats = alpha_from_sums(h, with_history, dd, _read_stats(params, state), bounds, fallback)
        _write_stats(params, state, stats)
        remember(params, state, group, k)
    return alpha
