"""alpha="adaptive": the α used equals the paper's closed form, computed here independently in fp64."""

from __future__ import annotations

import math
import threading
from types import SimpleNamespace

import pytest
import torch

from lookahead_dist import Lookahead
from lookahead_dist.core.adaptive import CURVATURE_KEY, alpha_from_sums
from lookahead_dist.deepspeed.holders import check_zero3_sub_groups


def paper_alpha(phi, theta_k, theta_star, a):
    """Proposition 1: (φ − θ*)ᵀA(φ − θ_k) / (φ − θ_k)ᵀA(φ − θ_k), A = diag(a); all fp64 vectors."""
    d = phi - theta_k
    return float(((phi - theta_star) * a * d).sum() / (d * a * d).sum())


def quadratic_loss(x, a, x_star):
    return 0.5 * float((a * (x - x_star) ** 2).sum())


def test_exact_quadratic_alpha_is_line_minimiser():
    # L(x) = ½ Σ a_i (x_i − x*_i)²: A = diag(a), θ* = x*. With the exact curvature supplied and the
    # last inner step of the cycle taken with lr=0 (so the gradient used is ∇L(θ_k)), the α applied
    # must be the exact minimiser of L on the segment φ → θ_k.
    a = torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0, 14.0], dtype=torch.float64)
    x_star = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 2.0], dtype=torch.float64)
    x0 = torch.zeros(6, dtype=torch.float64)
    k, lr = 4, 0.13

    x = torch.nn.Parameter(x0.float().clone())
    opt = Lookahead(torch.optim.SGD([x], lr=lr), k=k, alpha="adaptive", alpha_bounds=(0.01, 1.0))
    ref = x0.clone()  # independent fp64 SGD trajectory
    for step in range(1, k + 1):
        opt.param_groups[0]["lr"] = 0.0 if step == k else lr
        x.grad = (a * (x.detach().double() - x_star)).float()
        opt.step()
        opt.state[x][CURVATURE_KEY] = a.float()  # state exists after the first inner step
        if step < k:
            ref = ref - lr * a * (ref - x_star)
    expected = paper_alpha(x0, ref, x_star, a)
    assert 0.01 < expected < 1.0, expected  # the setup really exercises an interior optimum
    assert opt.last_alpha[0] == pytest.approx(expected, rel=1e-5)
    # It is the line minimiser: nudging α either way raises the loss.
    line = lambda t: quadratic_loss(x0 + t * (ref - x0), a, x_star)
    assert line(expected) < line(expected - 1e-3) and line(expected) < line(expected + 1e-3)
    # And the weights moved to φ + α(θ_k − φ).
    assert torch.allclose(x.detach().double(), x0 + expected * (ref - x0), rtol=1e-5, atol=1e-6)


def _curvature_of(inner_name, opt, p, grad):
    """diag(A) the documented rule prescribes, read from a plain torch optimizer's own state."""
    st = opt.state[p]
    if inner_name in ("adam", "adamw"):
        beta2 = opt.param_groups[0]["betas"][1]
        step = float(st["step"])
        return st["exp_avg_sq"].double() / (1 - beta2**step)
    return grad.double() ** 2  # no second moment: squared last gradient


def _make_inner(name, groups):
    if name == "adam":
        return torch.optim.Adam(groups, betas=(0.9, 0.99))
    if name == "adamw":
        return torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.1)
    return torch.optim.SGD(groups, momentum=0.9)


def _model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


@pytest.mark.parametrize(
    "inner_name,lrs,bounds",
    [
        ("adam", (0.3, 0.1), (0.05, 1.0)),
        ("adamw", (0.3, 0.1), (0.05, 1.0)),
        ("sgd", (0.5, 0.2), (0.05, 1.0)),
        ("adam", (0.05, 0.01), (0.5, 0.6)),  # narrow bounds: clipping on both sides
    ],
)
def test_alpha_per_group_matches_paper_formula(inner_name, lrs, bounds):
    k, steps = 3, 30
    model, ref_model = _model(0), _model(0)

    def groups(m):
        return [
            {"params": list(m[0].parameters()), "lr": lrs[0]},
            {"params": list(m[2].parameters()), "lr": lrs[1]},
        ]

    opt = Lookahead(_make_inner(inner_name, groups(model)), k=k, alpha="adaptive", alpha_bounds=bounds)
    ref_inner = _make_inner(inner_name, groups(ref_model))
    ref_slow = [p.detach().double().clone() for p in ref_model.parameters()]
    torch.manual_seed(1)
    data = [(torch.randn(16, 5), torch.randn(16, 1)) for _ in range(steps)]
    used, expected, unclipped = [], [], 0
    for t, (xb, yb) in enumerate(data, start=1):
        for m in (model, ref_model):
            m.zero_grad()
            torch.nn.functional.mse_loss(m(xb), yb).backward()
        opt.step()
        ref_inner.step()
        if t % k:
            continue
        slow_iter = iter(ref_slow)
        for gi, group in enumerate(ref_inner.param_groups):
            ps = group["params"]
            slows = [next(slow_iter) for _ in ps]
            phi = torch.cat([s.reshape(-1) for s in slows])
            theta = torch.cat([p.detach().double().reshape(-1) for p in ps])
            grad = torch.cat([p.grad.double().reshape(-1) for p in ps])
            a = torch.cat([_curvature_of(inner_name, ref_inner, p, p.grad).reshape(-1) for p in ps])
            theta_star = theta - grad / a  # one Newton step from θ_k with the last gradient
            alpha = paper_alpha(phi, theta, theta_star, a)
            unclipped += bounds[0] < alpha < bounds[1]
            alpha = min(max(alpha, bounds[0]), bounds[1])
            expected.append(alpha)
            used.append(opt.last_alpha[gi])
            with torch.no_grad():
                for s, p in zip(slows, ps):
                    s.add_(alpha * (p.double() - s))
                    p.copy_(s)
    assert len(used) == 2 * (steps // k)
    assert used == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert all(bounds[0] <= u <= bounds[1] for u in used)
    if bounds[1] - bounds[0] > 0.5:
        assert unclipped > 0  # the comparison covered α strictly inside the bounds
    else:
        assert {bounds[0], bounds[1]} <= set(used)  # both clips were exercised


@pytest.mark.parametrize("bad", ["nan_grad", "inf_grad", "zero_step"])
def test_non_finite_or_degenerate_falls_back(bad):
    x = torch.nn.Parameter(torch.ones(4))
    opt = Lookahead(torch.optim.SGD([x], lr=0.1), k=2, alpha="adaptive", alpha_fallback=0.7)
    for step in range(2):
        if bad == "zero_step":
            x.grad = torch.zeros(4)
        elif step == 1:
            x.grad = torch.tensor([1.0, float("nan") if bad == "nan_grad" else float("inf"), 1.0, 1.0])
        else:
            x.grad = torch.ones(4)
        opt.step()
    assert opt.last_alpha[0] == 0.7


def test_fallback_defaults_to_lower_bound():
    x = torch.nn.Parameter(torch.ones(3))
    opt = Lookahead(torch.optim.Adam([x]), k=1, alpha="adaptive", alpha_bounds=(0.3, 0.9))
    x.grad = torch.zeros(3)
    opt.step()
    assert opt.last_alpha[0] == 0.3


def test_alpha_from_sums_clips_and_falls_back():
    bounds = (0.5, 1.0)
    assert alpha_from_sums(-0.2, 1.0, bounds, 0.6) == pytest.approx(0.8)
    assert alpha_from_sums(-5.0, 1.0, bounds, 0.6) == 0.5
    assert alpha_from_sums(3.0, 1.0, bounds, 0.6) == 1.0
    assert alpha_from_sums(1.0, 0.0, bounds, 0.6) == 0.6
    assert alpha_from_sums(math.nan, 1.0, bounds, 0.6) == 0.6
    assert alpha_from_sums(1.0, math.inf, bounds, 0.6) == 0.6
    assert alpha_from_sums(1e308, 1e-308, bounds, 0.6) == 0.6  # overflowing ratio


def test_one_reduce_per_group_per_sync_and_none_for_fixed_alpha():
    calls: list[int] = []

    def reduce_fn(t):
        calls.append(t.numel())

    model = _model(0)
    groups = [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters())}]
    for alpha, expected_calls in (("adaptive", 2 * 3), (0.5, 0)):
        calls.clear()
        opt = Lookahead(torch.optim.Adam(groups, lr=1e-2), k=2, alpha=alpha, reduce_fn=reduce_fn)
        for _ in range(6):
            model.zero_grad()
            model(torch.randn(4, 5)).sum().backward()
            opt.step()
        assert len(calls) == expected_calls
        assert all(n == 2 for n in calls)  # two scalars each
        groups = [{"params": g["params"]} for g in groups]


def test_reduce_fn_sums_make_alpha_global():
    # Two "shards" of one tensor stepped in two threads whose reduce_fn sums their partial sums
    # (an in-process all-reduce): both shards must apply the α of the whole tensor.
    torch.manual_seed(3)
    full = torch.nn.Parameter(torch.randn(10))
    shards = [torch.nn.Parameter(full.detach()[:4].clone()), torch.nn.Parameter(full.detach()[4:].clone())]
    grads = [torch.randn(10) for _ in range(4)]
    bounds = (0.01, 1.0)
    whole = Lookahead(torch.optim.Adam([full], lr=0.3), k=2, alpha="adaptive", alpha_bounds=bounds)
    barrier = threading.Barrier(2)
    posted: list[torch.Tensor | None] = [None, None]

    def make_reduce(rank):
        def reduce_fn(t):
            posted[rank] = t.clone()
            barrier.wait()
            t.copy_(posted[0] + posted[1])
            barrier.wait()

        return reduce_fn

    opts = [
        Lookahead(
            torch.optim.Adam([s], lr=0.3), k=2, alpha="adaptive", alpha_bounds=bounds, reduce_fn=make_reduce(r)
        )
        for r, s in enumerate(shards)
    ]
    sliced = [slice(0, 4), slice(4, 10)]
    alphas: list[list[float]] = [[], []]

    def run(rank):
        for g in grads:
            shards[rank].grad = g[sliced[rank]].clone()
            opts[rank].step()
            alphas[rank].append(opts[rank].last_alpha.get(0, -1.0))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for th in threads:
        th.start()
    whole_alphas = []
    for g in grads:
        full.grad = g.clone()
        whole.step()
        whole_alphas.append(whole.last_alpha.get(0, -1.0))
    for th in threads:
        th.join(timeout=60)
    assert whole.sync_count == 2 and 0.01 < whole_alphas[1] < 1.0
    assert alphas[0] == pytest.approx(whole_alphas, rel=1e-6)
    assert alphas[1] == pytest.approx(whole_alphas, rel=1e-6)
    assert torch.allclose(torch.cat([s.detach() for s in shards]), full.detach(), rtol=1e-6, atol=1e-7)


def test_zero3_sub_group_check():
    split = SimpleNamespace(sub_group_to_group_id={0: 0, 1: 0, 2: 1}, sub_group_size=100)
    with pytest.raises(ValueError, match=r"sub_group_size=100.*group 0: 2 sub-groups"):
        check_zero3_sub_groups(split)
    check_zero3_sub_groups(split, adaptive_groups=[1])  # only the unsplit group is adaptive
    check_zero3_sub_groups(SimpleNamespace(sub_group_to_group_id={0: 0, 1: 1}))
    check_zero3_sub_groups(object())  # not ZeRO-3: nothing to check
