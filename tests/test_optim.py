"""Tests of the core `Lookahead` against `tests/reference.py` (a plain loop of Algorithm 1)."""

from __future__ import annotations

import copy
import io
import math
import pickle
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from lookahead_dist.core.optim import COUNT_KEY, SLOW_KEY, Lookahead, slow_key_for
from tests.reference import ReferenceLookahead, max_abs_diff
from tests.tolerances import WEIGHT_TOL, elementwise_tol

# Ours against the reference loop: two different computations, equal to fp32 rounding (derived in
# tests/tolerances.py). Bit-exact checks below are kept only where the same computation is replayed
# (resume, deepcopy, a state round trip, a restore after use_slow_weights) or a value is copied (φ₀ = θ₀,
# θ = φ right after a sync, a kept φ).
TOL = WEIGHT_TOL


class Net(nn.Module):
    """Two layers plus a parameter the forward never uses (it never gets a gradient)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.head = nn.Linear(8, 2)
        self.unused = nn.Parameter(torch.randn(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> Net:
    torch.manual_seed(seed)
    return Net().to(dtype)


def make_batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 4, generator=gen), torch.randn(8, 2, generator=gen)) for _ in range(n)]


def loss_of(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    dtype = next(model.parameters()).dtype
    return F.mse_loss(model(x.to(dtype)).float(), y)


def backward(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    model.zero_grad(set_to_none=True)
    loss_of(model, batch).backward()


InnerFactory = Callable[[object], torch.optim.Optimizer]
INNERS: dict[str, InnerFactory] = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "sgd_nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    "adam": lambda p: torch.optim.Adam(p, lr=0.02),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.02, weight_decay=0.1),
}


def param_groups(model: Net, layout: str, overrides: list[dict] | None = None) -> list[dict]:
    if layout == "one":
        groups = [{"params": list(model.parameters())}]
    else:  # two groups with different hyper-parameters; the unused parameter sits in the second
        groups = [
            {"params": list(model.body.parameters()), "lr": 0.03},
            {"params": [*model.head.parameters(), model.unused], "weight_decay": 0.05},
        ]
    for group, extra in zip(groups, overrides or []):
        group.update(extra)
    return groups


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_bit_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y), f"max diff {(x.float() - y.float()).abs().max().item()}"


def run_against_reference(
    inner: str,
    k: int,
    alpha: float,
    steps: int,
    *,
    layout: str = "one",
    pullback: str = "none",
    overrides: list[dict] | None = None,
) -> tuple[Net, Lookahead, Net, list[float]]:
    """Train the same model with Lookahead and with the reference loop; return per-step max diffs."""
    model, ref_model = make_model(), make_model()
    inner_opt = INNERS[inner](param_groups(model, layout, overrides))
    opt = Lookahead(inner_opt, k=k, alpha=alpha, pullback=pullback)
    ref_inner = INNERS[inner](param_groups(ref_model, layout, overrides))
    per_group = None
    if overrides:
        per_group = [(o.get("lookahead_k", k), o.get("lookahead_alpha", alpha)) for o in overrides]
    ref = ReferenceLookahead(ref_inner, k, alpha, pullback=pullback, k_alpha_per_group=per_group)
    diffs = []
    for batch in make_batches(steps):
        backward(model, batch)
        opt.step()
        backward(ref_model, batch)
        ref.step()
        diffs.append(max_abs_diff(model.parameters(), ref_model.parameters()))
    return model, opt, ref_model, diffs


def run_bare(inner: str, steps: int, layout: str = "one") -> Net:
    model = make_model()
    opt = INNERS[inner](param_groups(model, layout))
    for batch in make_batches(steps):
        backward(model, batch)
        opt.step()
    return model


# ---------------------------------------------------------------------------------- trajectories
@pytest.mark.parametrize("layout", ["one", "two"])
@pytest.mark.parametrize(("inner", "k"), [("sgd", 3), ("sgd_momentum", 4), ("sgd_nesterov", 5), ("adam", 4),
                                          ("adamw", 3)])
def test_trajectory_matches_reference(inner: str, k: int, layout: str) -> None:
    steps = 3 * k + 2  # three full cycles, ending mid-cycle
    model, opt, _, diffs = run_against_reference(inner, k, 0.5, steps, layout=layout)
    assert max(diffs) <= TOL, diffs  # every step, so mid-cycle steps too
    assert opt.sync_count == 3
    bare = run_bare(inner, steps, layout)
    assert max_abs_diff(model.parameters(), bare.parameters()) > 1e-3
    # The parameter that never had a gradient is neither tracked nor moved.
    assert not any(t is model.unused for t in opt.tracked_params())
    assert len(opt.state[model.unused]) == 0
    assert torch.equal(model.unused, make_model().unused)


def test_first_sync_after_k_inner_steps() -> None:
    k, alpha = 4, 0.5
    model = make_model()
    theta0 = params_of(model)
    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1), k=k, alpha=alpha)
    bare = make_model()
    bare_opt = torch.optim.SGD(bare.parameters(), lr=0.1)
    used = [p for p in model.parameters() if p is not model.unused]
    used_theta0 = [t for t, p in zip(theta0, model.parameters()) if p is not model.unused]
    for step, batch in enumerate(make_batches(k), start=1):
        backward(model, batch)
        opt.step()
        backward(bare, batch)
        bare_opt.step()
        if step < k:
            assert opt.sync_count == 0
            assert_bit_equal(params_of(model), params_of(bare))  # no sync yet, not after step 1
            for p, t0 in zip(used, used_theta0):
                assert torch.equal(opt.state[p][SLOW_KEY], t0)  # φ₀ = θ₀, not θ₁
                assert opt.state[p][COUNT_KEY] == step
    assert opt.sync_count == 1
    theta_k = [p for p in bare.parameters() if p is not bare.unused]
    for p, t0, tk in zip(used, used_theta0, theta_k):
        expected = t0 + alpha * (tk - t0)
        assert (opt.state[p][SLOW_KEY] - expected).abs().max().item() <= TOL
        assert torch.equal(p, opt.state[p][SLOW_KEY])
        assert opt.state[p][COUNT_KEY] == 0
        assert (p - tk).abs().max().item() > 1e-4  # the first sync really moved the weights


def test_per_group_k_and_alpha_overrides() -> None:
    overrides = [{"lookahead_k": 2, "lookahead_alpha": 0.8}, {"lookahead_k": 5}]
    model, opt, _, diffs = run_against_reference("adam", 3, 0.3, 16, layout="two", overrides=overrides)
    assert max(diffs) <= TOL, diffs
    assert opt.last_alpha == {0: 0.8, 1: 0.3}
    assert opt.state[model.body.weight][COUNT_KEY] == 16 % 2
    assert opt.state[model.head.weight][COUNT_KEY] == 16 % 5


@pytest.mark.parametrize("inner", ["sgd_momentum", "adam"])
@pytest.mark.parametrize("pullback", ["none", "reset", "pullback"])
def test_pullback_modes_match_reference(pullback: str, inner: str) -> None:
    k, steps = 3, 3 * 3 + 2
    model, opt, _, diffs = run_against_reference(inner, k, 0.5, steps, pullback=pullback)
    assert max(diffs) <= TOL, diffs
    if pullback != "none":
        plain, *_ = run_against_reference(inner, k, 0.5, steps, pullback="none")
        assert max_abs_diff(model.parameters(), plain.parameters()) > 1e-4
    buffer_key = "momentum_buffer" if inner == "sgd_momentum" else "exp_avg"
    state = opt.state[model.body.weight]
    if pullback == "pullback":
        slow_buf = state[slow_key_for(buffer_key)]
        assert slow_buf.data_ptr() != state[buffer_key].data_ptr()
        assert not torch.equal(slow_buf, state[buffer_key])  # 2 steps after the last sync they differ


def test_reset_clears_inner_state_at_sync() -> None:
    model = make_model()
    opt = Lookahead(INNERS["adam"](model.parameters()), k=2, pullback="reset")
    batches = make_batches(4)
    for step, batch in enumerate(batches, start=1):
        backward(model, batch)
        opt.step()
        if step % 2 == 0:
            assert all(len(opt.state[p]) == 0 for p in model.parameters())
        else:
            assert opt.state[model.body.weight]["step"].item() == 1  # Adam restarted after the sync


# ---------------------------------------------------------------------------------- checkpoints
def lr_lambda(epoch: int) -> float:
    return 0.9**epoch


@pytest.mark.parametrize("pullback", ["none", "reset", "pullback"])
@pytest.mark.parametrize("scheduler_at", ["before_wrap", "before_load", "after_load"])
def test_resume_at_every_offset_is_bit_identical(pullback: str, scheduler_at: str) -> None:
    k, total = 3, 11
    batches = make_batches(total)

    def build(sched_before_wrap: bool) -> tuple[Net, torch.optim.Optimizer, Lookahead, object]:
        model = make_model(seed=5)  # a different init than the fresh-model seed below would give
        inner = INNERS["adam"](model.parameters())
        sched = torch.optim.lr_scheduler.LambdaLR(inner, lr_lambda) if sched_before_wrap else None
        opt = Lookahead(inner, k=k, alpha=0.5, pullback=pullback)
        return model, inner, opt, sched

    def train(model: Net, opt: Lookahead, sched: object, inner: torch.optim.Optimizer, first: int, last: int):
        for step in range(first, last):
            backward(model, batches[step])
            opt.step()
            sched.step()
            assert inner.param_groups[0]["lr"] == pytest.approx(0.02 * lr_lambda(step + 1))

    model, inner, opt, sched = build(scheduler_at == "before_wrap")
    sched = sched or torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    train(model, opt, sched, inner, 0, total)
    expected = params_of(model)

    for offset in range(k):
        stop = k + offset  # at least one sync happened before the save
        model, inner, opt, sched = build(scheduler_at == "before_wrap")
        sched = sched or torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
        train(model, opt, sched, inner, 0, stop)
        buffer = io.BytesIO()
        checkpoint = {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}
        torch.save(checkpoint, buffer)
        buffer.seek(0)
        saved = torch.load(buffer, weights_only=True)

        torch.manual_seed(123)
        new_model = Net()
        new_inner = INNERS["adam"](new_model.parameters())
        new_sched = None
        if scheduler_at == "before_wrap":
            new_sched = torch.optim.lr_scheduler.LambdaLR(new_inner, lr_lambda)
        new_opt = Lookahead(new_inner, k=k, alpha=0.5, pullback=pullback)
        if scheduler_at == "before_load":
            new_sched = torch.optim.lr_scheduler.LambdaLR(new_opt, lr_lambda)
        new_model.load_state_dict(saved["model"])
        new_opt.load_state_dict(saved["opt"])
        assert new_opt.param_groups is new_inner.param_groups
        if scheduler_at == "after_load":
            new_sched = torch.optim.lr_scheduler.LambdaLR(new_opt, lr_lambda, last_epoch=stop - 1)
        else:
            new_sched.load_state_dict(saved["sched"])
        assert new_inner.param_groups[0]["lr"] == pytest.approx(0.02 * lr_lambda(stop))
        if offset:
            assert new_opt.state[new_model.body.weight][COUNT_KEY] == offset
        train(new_model, new_opt, new_sched, new_inner, stop, total)
        assert_bit_equal(params_of(new_model), expected)


def test_dcp_state_dict_calls_are_noops() -> None:
    k = 3
    for inner in ["sgd", "adam"]:
        batches = make_batches(3 * k + 1)
        model, ref_model = make_model(), make_model()
        # Without the unused parameter: its missing state would make torch's strict load fail.
        opt = Lookahead(INNERS[inner]([*model.body.parameters(), *model.head.parameters()]), k=k)
        ref_inner = INNERS[inner]([*ref_model.body.parameters(), *ref_model.head.parameters()])
        # Fresh optimizer: torch runs a synthetic lr=0 step on zero grads to create the state.
        before = params_of(model)
        saved = get_optimizer_state_dict(model, opt)
        assert_bit_equal(params_of(model), before)
        # The probe creates Lookahead's keys with the inner state (so a load template has them): φ = θ,
        # count 0; it never counts as a step.
        assert opt.sync_count == 0 and len(opt.tracked_params()) == 4
        for p in [*model.body.parameters(), *model.head.parameters()]:
            assert torch.equal(opt.state[p][SLOW_KEY], p) and opt.state[p][COUNT_KEY] == 0
        set_optimizer_state_dict(model, opt, saved)
        assert all(opt.state[p][COUNT_KEY] == 0 for p in opt.tracked_params())
        get_optimizer_state_dict(ref_model, ref_inner)  # the reference's inner state sees the same probe
        ref = ReferenceLookahead(ref_inner, k, 0.5)

        for step, batch in enumerate(batches, start=1):
            backward(model, batch)
            opt.step()
            backward(ref_model, batch)
            ref.step()
            assert max_abs_diff(model.parameters(), ref_model.parameters()) <= TOL
            if step in (k + 1, 2 * k + 2):  # mid-cycle: a round trip must not change anything
                before = params_of(model)
                slow = {
                    p: (opt.state[p][SLOW_KEY].clone(), opt.state[p][COUNT_KEY]) for p in opt.tracked_params()
                }
                saved = get_optimizer_state_dict(model, opt)
                set_optimizer_state_dict(model, opt, saved)
                assert_bit_equal(params_of(model), before)
                for p, (phi, count) in slow.items():
                    assert torch.equal(opt.state[p][SLOW_KEY], phi)
                    assert opt.state[p][COUNT_KEY] == count
        assert opt.sync_count == 3


def test_state_probe_detection() -> None:
    # The state initialisation (a load template's synthetic step) is recognised by what it is: no state
    # yet, every lr 0, every trainable parameter holding an all-zero gradient. It creates the keys
    # (φ = θ, count 0) and does not count; anything else is a real step and counts.
    def fresh(lr: float = 0.0, grads: Callable[[torch.Tensor], torch.Tensor | None] = torch.zeros_like):
        model = make_model()
        opt = Lookahead(INNERS["sgd"](model.parameters()), k=2)
        for p in model.parameters():
            p.grad = grads(p)
        opt.param_groups[0]["lr"] = lr
        return model, opt

    model, opt = fresh()
    opt.step()
    w = model.body.weight
    assert opt.state[w][COUNT_KEY] == 0 and torch.equal(opt.state[w][SLOW_KEY], w) and opt.sync_count == 0
    opt.step()  # the same step again: the state exists now, so it is a real step
    assert opt.state[w][COUNT_KEY] == 1
    one_nonzero = [False]

    def all_but_one_zero(p: torch.Tensor) -> torch.Tensor:
        g = torch.zeros_like(p)
        if not one_nonzero[0]:
            g.view(-1)[0] = 1e-30
            one_nonzero[0] = True
        return g

    for lr, grads in [(0.1, torch.zeros_like), (0.0, torch.ones_like), (0.0, all_but_one_zero)]:
        model, opt = fresh(lr, grads)
        opt.step()
        assert opt.state[model.body.weight][COUNT_KEY] == 1, (lr, grads)
    model, opt = fresh()
    model.body.bias.grad = None  # one trainable parameter without a gradient
    opt.step()
    assert opt.tracked_params() and all(opt.state[p][COUNT_KEY] == 1 for p in opt.tracked_params())
    # torch.distributed.checkpoint's template step on a fresh optimizer is one of them.
    fresh_model = make_model()
    fresh_opt = Lookahead(INNERS["sgd"](fresh_model.parameters()), k=2)
    get_optimizer_state_dict(fresh_model, fresh_opt)
    assert fresh_opt.param_groups[0]["lr"] == 0.1
    assert all(fresh_opt.state[p][COUNT_KEY] == 0 for p in fresh_opt.tracked_params()) and fresh_opt.tracked_params()


# ---------------------------------------------------------------------------------- step protocol
def test_grad_scaler_skipped_step_does_not_count() -> None:
    k, steps, skipped = 3, 11, {2, 7}  # one skip inside the first cycle, one inside the third
    batches = make_batches(steps)
    model, ref_model = make_model(), make_model()
    opt = Lookahead(INNERS["adam"](model.parameters()), k=k)
    ref = ReferenceLookahead(INNERS["adam"](ref_model.parameters()), k, 0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for step, batch in enumerate(batches):
        model.zero_grad(set_to_none=True)
        scaler.scale(loss_of(model, batch)).backward()
        if step in skipped:
            model.head.bias.grad[0] = float("inf")
        counts = {p: opt.state[p].get(COUNT_KEY) for p in model.parameters()}
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        if step in skipped:
            assert scaler.get_scale() == scale / 2  # the scaler really skipped this step
            assert {p: opt.state[p].get(COUNT_KEY) for p in model.parameters()} == counts
            continue
        backward(ref_model, batch)  # powers-of-two scaling is exact, so unscaled grads match
        ref.step()
        assert max_abs_diff(model.parameters(), ref_model.parameters()) <= TOL
    assert opt.sync_count == (steps - len(skipped)) // k


def test_closure_runs_first_and_its_loss_is_returned() -> None:
    k = 3
    model, ref_model = make_model(), make_model()
    ref = ReferenceLookahead(INNERS["adam"](ref_model.parameters()), k, 0.5)
    opt = Lookahead(INNERS["adam"](model.parameters()), k=k)
    for batch in make_batches(3 * k + 1):
        model.zero_grad(set_to_none=True)  # grads are None until the closure runs

        def closure(batch=batch) -> torch.Tensor:
            model.zero_grad(set_to_none=True)
            loss = loss_of(model, batch)
            loss.backward()
            return loss

        expected_loss = loss_of(model, batch).item()
        returned = opt.step(closure)
        assert returned.item() == expected_loss
        backward(ref_model, batch)
        ref.step()
        assert max_abs_diff(model.parameters(), ref_model.parameters()) <= TOL
    assert len(opt.tracked_params()) == 4 and opt.sync_count == 3


def test_step_hooks_fire_once_per_step() -> None:
    model = make_model()
    opt = Lookahead(INNERS["sgd"](model.parameters()), k=2)
    calls: list[str] = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    for batch in make_batches(4):
        backward(model, batch)
        opt.step()
    assert calls == ["pre", "post"] * 4


# ---------------------------------------------------------------------------------- param groups
def test_add_param_group_before_training_matches_reference() -> None:
    k, alpha, steps = 3, 0.5, 13
    model, ref_model = make_model(), make_model()
    opt = Lookahead(INNERS["sgd_momentum"](model.body.parameters()), k=k, alpha=alpha)
    opt.add_param_group({"params": list(model.head.parameters()), "lookahead_k": 2, "lookahead_alpha": 0.7})
    ref_inner = INNERS["sgd_momentum"](ref_model.body.parameters())
    ref_inner.add_param_group({"params": list(ref_model.head.parameters())})
    ref = ReferenceLookahead(ref_inner, k, alpha, k_alpha_per_group=[(k, alpha), (2, 0.7)])
    for batch in make_batches(steps):
        backward(model, batch)
        opt.step()
        backward(ref_model, batch)
        ref.step()
        assert max_abs_diff(model.parameters(), ref_model.parameters()) <= TOL
    assert opt.last_alpha == {0: alpha, 1: 0.7}
    assert opt.param_groups[1]["momentum"] == 0.9  # inner defaults filled in


def test_add_param_group_mid_training_is_tracked_with_its_own_k() -> None:
    model = make_model()
    opt = Lookahead(INNERS["sgd"](model.body.parameters()), k=3)
    batches = make_batches(9)
    for batch in batches[:2]:
        backward(model, batch)
        opt.step()
    opt.add_param_group({"params": list(model.head.parameters()), "lookahead_k": 2})
    for step, batch in enumerate(batches[2:], start=1):
        before = model.head.weight.detach().clone()
        backward(model, batch)
        opt.step()
        assert opt.state[model.head.weight][COUNT_KEY] == step % 2
        if step == 1:
            assert torch.equal(opt.state[model.head.weight][SLOW_KEY], before)
    assert any(p is model.head.weight for p in opt.tracked_params())


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"lookahead_k": 0}, r"lookahead_k.*=0"),
        ({"lookahead_k": 1.5}, r"lookahead_k.*=1\.5"),
        ({"lookahead_alpha": 2.0}, r"lookahead_alpha.*=2\.0"),
        ({"lookahead_alpha": float("nan")}, r"lookahead_alpha.*=nan"),
    ],
)
def test_add_param_group_rejects_bad_overrides(extra: dict, match: str) -> None:
    model = make_model()
    opt = Lookahead(INNERS["sgd"](model.body.parameters()))
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": list(model.head.parameters()), **extra})
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match=match):
        Lookahead(INNERS["sgd"]([{"params": list(model.head.parameters()), **extra}]))


# ---------------------------------------------------------------------------------- slow weights
def test_use_slow_weights_swaps_and_restores_bit_exactly() -> None:
    k = 4
    batches = make_batches(2 * k + 3)

    def train(peek_at: set[int]) -> list[torch.Tensor]:
        model = make_model()
        opt = Lookahead(INNERS["adam"](model.parameters()), k=k)
        for step, batch in enumerate(batches, start=1):
            backward(model, batch)
            opt.step()
            if step in peek_at:
                fast = params_of(model)
                with opt.use_slow_weights():
                    for p in opt.tracked_params():
                        assert torch.equal(p, opt.state[p][SLOW_KEY])
                    assert not torch.equal(model.body.weight, fast[0])
                    loss_of(model, batch)  # an evaluation forward on φ
                assert_bit_equal(params_of(model), fast)
        return params_of(model)

    assert_bit_equal(train(peek_at={2, k + 1, k + 3}), train(peek_at=set()))


# ---------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, r"k=0"),
        ({"k": -1}, r"k=-1"),
        ({"k": 2.5}, r"k=2\.5"),
        ({"k": True}, r"k=True"),
        ({"alpha": 0}, r"alpha=0\b"),
        ({"alpha": 1.5}, r"alpha=1\.5"),
        ({"alpha": float("nan")}, r"alpha=nan"),
        ({"alpha": math.inf}, r"alpha=inf"),
        ({"alpha": "0.5"}, r"alpha='0\.5'"),
        ({"pullback": "momentum"}, r"pullback='momentum'.*none.*reset.*pullback"),
    ],
)
def test_bad_arguments_are_rejected_with_the_value_named(kwargs: dict, match: str) -> None:
    model = make_model()
    with pytest.raises(ValueError, match=match):
        Lookahead(INNERS["sgd"](model.parameters()), **kwargs)


def test_bad_optimizers_are_rejected() -> None:
    model = make_model()
    wrapped = Lookahead(INNERS["sgd"](model.parameters()))
    with pytest.raises(TypeError, match=r"already a Lookahead.*optimizer\.optimizer"):
        Lookahead(wrapped)
    with pytest.raises(TypeError, match=r"got list"):
        Lookahead(list(model.parameters()))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"got Net"):
        Lookahead(model)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"LBFGS is not supported.*first-order"):
        Lookahead(torch.optim.LBFGS(model.parameters()))
    empty = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    empty.param_groups[0]["params"] = []
    with pytest.raises(ValueError, match=r"no parameters"):
        Lookahead(empty)
    Lookahead(empty, allow_empty=True)  # the ZeRO-3 inner optimizer outside its step


# ---------------------------------------------------------------------------------- integration
def test_is_an_optimizer_and_forwards_param_groups() -> None:
    model = make_model()
    inner = INNERS["adam"](model.parameters())
    opt = Lookahead(inner)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is inner.param_groups and opt.state is inner.state
    assert opt.defaults is inner.defaults
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt.param_groups is inner.param_groups
    opt.param_groups[0]["lr"] = 0.123
    assert inner.param_groups[0]["lr"] == 0.123


def test_zero_grad_both_modes() -> None:
    model = make_model()
    opt = Lookahead(INNERS["sgd"](model.parameters()))
    backward(model, make_batches(1)[0])
    opt.zero_grad(set_to_none=False)
    assert model.body.weight.grad is not None and not model.body.weight.grad.any()
    backward(model, make_batches(1)[0])
    opt.zero_grad(set_to_none=True)
    assert model.body.weight.grad is None


def test_scheduler_created_before_wrapping_reaches_inner() -> None:
    k = 3
    model, ref_model = make_model(), make_model()
    inner = INNERS["sgd_momentum"](model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(inner, step_size=2, gamma=0.5)
    opt = Lookahead(inner, k=k)
    ref_inner = INNERS["sgd_momentum"](ref_model.parameters())
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_inner, step_size=2, gamma=0.5)
    ref = ReferenceLookahead(ref_inner, k, 0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for batch in make_batches(3 * k + 1):
            backward(model, batch)
            opt.step()
            sched.step()
            backward(ref_model, batch)
            ref.step()
            ref_sched.step()
            assert max_abs_diff(model.parameters(), ref_model.parameters()) <= TOL
    # The scheduler saw the inner optimizer step (no "lr_scheduler.step() before optimizer.step()").
    assert not [w for w in caught if "optimizer.step()" in str(w.message)]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5**5)


@pytest.mark.parametrize("pullback", ["none", "reset", "pullback"])
def test_slow_tensors_are_allocated_once(pullback: str) -> None:
    model = make_model()
    opt = Lookahead(INNERS["sgd_momentum"](model.parameters()), k=2, pullback=pullback)
    seen: dict[int, set[int]] = {}
    for step, batch in enumerate(make_batches(9), start=1):
        backward(model, batch)
        opt.step()
        for i, p in enumerate(opt.tracked_params()):
            seen.setdefault(i, set()).add(opt.state[p][SLOW_KEY].data_ptr())
            if pullback == "pullback" and step >= 2:
                seen.setdefault(100 + i, set()).add(opt.state[p][slow_key_for("momentum_buffer")].data_ptr())
    assert seen and all(len(ptrs) == 1 for ptrs in seen.values()), seen


def test_bf16_params_keep_bf16_slow_weights() -> None:
    k = 2
    model = make_model(dtype=torch.bfloat16)
    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1), k=k)
    for batch in make_batches(2 * k + 1):
        backward(model, batch)
        opt.step()
    for p in opt.tracked_params():
        assert opt.state[p][SLOW_KEY].dtype == torch.bfloat16
    # One more step completes the third cycle; φ moves halfway to the bf16 fast weights.
    phi_before = {p: opt.state[p][SLOW_KEY].clone() for p in opt.tracked_params()}
    theta_before_sync: dict[torch.Tensor, torch.Tensor] = {}
    opt.optimizer.register_step_post_hook(
        lambda o, args, kwargs: theta_before_sync.update({p: p.detach().clone() for p in phi_before})
    )
    backward(model, make_batches(1, seed=9)[0])
    opt.step()
    for p, phi in phi_before.items():
        expected = (phi.float() + 0.5 * (theta_before_sync[p].float() - phi.float())).to(torch.bfloat16)
        torch.testing.assert_close(opt.state[p][SLOW_KEY], expected, rtol=2**-7, atol=1e-3)
        assert torch.equal(opt.state[p][SLOW_KEY], p)
        assert not torch.equal(opt.state[p][SLOW_KEY], phi)


def test_deepcopy_and_pickle_continue_identically() -> None:
    k = 3
    batches = make_batches(3 * k + 1)
    model = make_model()
    opt = Lookahead(INNERS["adam"](model.parameters()), k=k, pullback="pullback")
    for batch in batches[:4]:
        backward(model, batch)
        opt.step()
    copied_model, copied_opt = copy.deepcopy((model, opt))
    pickled_model, pickled_opt = pickle.loads(pickle.dumps((model, opt)))
    for m, o in [(model, opt), (copied_model, copied_opt), (pickled_model, pickled_opt)]:
        assert isinstance(o, Lookahead)
        for batch in batches[4:]:
            backward(m, batch)
            o.step()
    assert opt.sync_count == copied_opt.sync_count == pickled_opt.sync_count == 3
    assert_bit_equal(params_of(copied_model), params_of(model))
    assert_bit_equal(params_of(pickled_model), params_of(model))
    assert copied_opt.optimizer is not opt.optimizer


def test_torch_compile_model_trains_like_reference() -> None:
    k = 2
    model, ref_model = make_model(), make_model()
    compiled = torch.compile(model, backend="eager")
    opt = Lookahead(INNERS["adam"](model.parameters()), k=k)
    ref = ReferenceLookahead(INNERS["adam"](ref_model.parameters()), k, 0.5)
    for batch in make_batches(2 * k + 1):
        backward(compiled, batch)
        opt.step()
        backward(ref_model, batch)
        ref.step()
    assert max_abs_diff(model.parameters(), ref_model.parameters()) <= TOL
    assert opt.sync_count == 2


def test_torch_compile_of_the_step_matches_reference() -> None:
    # Compiling the step traces into the inner optimizer (as torch.compile(adam.step) does); the compiled
    # AdamW is a different kernel path from the reference's eager one, hence a few-ulp tolerance.
    k = 3
    model, ref_model = make_model(), make_model()
    opt = Lookahead(INNERS["adamw"](model.parameters()), k=k)
    ref = ReferenceLookahead(INNERS["adamw"](ref_model.parameters()), k, 0.5)
    compiled_step = torch.compile(opt.step, backend="eager")
    for batch in make_batches(3 * k + 1):
        backward(model, batch)
        compiled_step()
        backward(ref_model, batch)
        ref.step()
    assert max_abs_diff(model.parameters(), ref_model.parameters()) <= 1e-5
    assert opt.sync_count == 3


def test_pickle_after_scheduler_and_hooks_like_torch() -> None:
    model = make_model()
    opt = Lookahead(INNERS["sgd"](model.parameters()), k=2)
    torch.optim.lr_scheduler.StepLR(opt, step_size=1)  # patches `opt.step` on the instance
    opt.register_step_pre_hook(lambda o, args, kwargs: None)  # a lambda: not picklable
    restored = pickle.loads(pickle.dumps(opt))
    assert isinstance(restored, Lookahead) and len(restored._optimizer_step_pre_hooks) == 0
    plain = torch.optim.SGD(make_model().parameters(), lr=0.1)
    plain.register_step_pre_hook(lambda o, args, kwargs: None)
    assert len(pickle.loads(pickle.dumps(plain))._optimizer_step_pre_hooks) == 0  # torch drops hooks too
    restored.step()  # usable: nothing has a gradient, so nothing moves


def test_real_lr0_zero_grad_step_after_reset_is_counted() -> None:
    k = 2
    model = make_model()
    opt = Lookahead(INNERS["sgd"](model.parameters()), k=k, pullback="reset")
    for batch in make_batches(k):
        backward(model, batch)
        opt.step()
    assert opt.sync_count == 1 and all(len(opt.state[p]) == 0 for p in model.parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.param_groups[0]["lr"] = 0.0  # e.g. a schedule at 0; not torch's checkpoint probe
    opt.step()
    assert opt.state[model.body.weight][COUNT_KEY] == 1


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [("lookahead_k", 0, r"lookahead_k.*=0"), ("lookahead_alpha", 1.5, r"lookahead_alpha.*=1\.5")],
)
def test_overrides_edited_after_construction_are_checked_before_the_step(
    key: str, value: object, match: str
) -> None:
    model = make_model()
    opt = Lookahead(INNERS["sgd"](model.parameters()), k=2)
    backward(model, make_batches(1)[0])
    before = params_of(model)
    opt.param_groups[0][key] = value
    with pytest.raises(ValueError, match=match):
        opt.step()
    assert_bit_equal(params_of(model), before)


# ---------------------------------------------------------------------------------- issue #14: DCP keeps φ
@pytest.mark.parametrize("flatten", [False, True])
def test_dcp_save_load_into_fresh_optimizer_restores_slow_weights(flatten: bool, tmp_path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    k, stop, total = 3, 4, 11  # save mid-cycle (one step after the first sync)
    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    batches = make_batches(total)

    def build() -> tuple[nn.Module, Lookahead]:
        model = make_model()
        model.unused.requires_grad_(False)  # a parameter without state would fail torch's strict load
        return model, Lookahead(INNERS["adamw"]([p for p in model.parameters() if p.requires_grad]), k=k)

    def train(model: nn.Module, opt: Lookahead, part: list) -> None:
        for batch in part:
            backward(model, batch)
            opt.step()

    model, opt = build()
    train(model, opt, batches[:stop])
    msd, osd = get_state_dict(model, opt, options=options)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp_path))
    train(model, opt, batches[stop:])
    expected = params_of(model)

    fresh_model, fresh_opt = build()
    msd, osd = get_state_dict(fresh_model, fresh_opt, options=options)  # the template, from the live state
    dcp.load({"model": msd, "optim": osd}, checkpoint_id=str(tmp_path))
    set_state_dict(fresh_model, fresh_opt, model_state_dict=msd, optim_state_dict=osd, options=options)
    assert fresh_opt.state[fresh_model.body.weight][COUNT_KEY] == stop % k
    assert not torch.equal(fresh_opt.state[fresh_model.body.weight][SLOW_KEY], fresh_model.body.weight)
    train(fresh_model, fresh_opt, batches[stop:])
    assert_bit_equal(params_of(fresh_model), expected)


# ---------------------------------------------------------------------------------- issue #10: non-finite θ
def _poison_at(opt: Lookahead, steps: set[int], where: Callable[[], torch.Tensor]) -> list[int]:
    """After the inner step of each listed step() call, write NaN into where() (before the sync)."""
    calls = [0]

    def hook(o: object, args: object, kwargs: object) -> None:
        calls[0] += 1
        if calls[0] in steps:
            with torch.no_grad():
                where().view(-1)[1] = float("nan")

    opt.optimizer.register_step_post_hook(hook)
    return calls


def test_nonfinite_theta_at_a_sync_keeps_phi_and_resets_theta() -> None:
    k = 3
    model, ref_model = make_model(), make_model()
    opt = Lookahead(INNERS["sgd_momentum"](model.parameters()), k=k)
    ref = ReferenceLookahead(INNERS["sgd_momentum"](ref_model.parameters()), k, 0.5)
    _poison_at(opt, {3 * k}, lambda: model.body.weight)
    batches = make_batches(3 * k)
    for step, batch in enumerate(batches, start=1):
        backward(model, batch)
        if step < 3 * k:
            opt.step()
            backward(ref_model, batch)
            ref.step()
            assert max_abs_diff(model.parameters(), ref_model.parameters()) <= TOL
            continue
        # This optimizer's own φ after the 2nd sync (kept bit for bit: the same tensor, untouched), and the
        # reference's (another computation of it: equal to rounding).
        phi_before = opt.state[model.body.weight][SLOW_KEY].clone()
        ref_phi_before = ref.slow[ref_model.body.weight].clone()
        with pytest.warns(RuntimeWarning, match=rf"step {3 * k} .*param group 0 tensor 1 \(shape \(8, 4\)\)"):
            opt.step()
        backward(ref_model, batch)
        ref.step()
    w = model.body.weight
    assert torch.equal(opt.state[w][SLOW_KEY], phi_before)  # φ kept
    assert torch.equal(w.detach(), phi_before)  # θ reset to φ (a copy of it)
    assert max_abs_diff([phi_before], [ref_phi_before]) <= TOL
    assert opt.state[w][COUNT_KEY] == 0 and opt.sync_count == 3
    # Every other tensor synced as in the reference.
    for p, q in [(model.body.bias, ref_model.body.bias), (model.head.weight, ref_model.head.weight)]:
        assert max_abs_diff([opt.state[p][SLOW_KEY]], [ref.slow[q]]) <= TOL
        assert max_abs_diff([p], [q]) <= TOL


def test_nonfinite_block_of_a_large_tensor_is_kept_and_the_rest_syncs() -> None:
    from lookahead_dist.core.sync import CHUNK

    n = 3 * CHUNK + 5
    x = nn.Parameter(torch.randn(n))
    ref_x = nn.Parameter(x.detach().clone())
    opt = Lookahead(torch.optim.SGD([x], lr=0.1), k=2)
    ref = ReferenceLookahead(torch.optim.SGD([ref_x], lr=0.1), 2, 0.5)
    theta0 = x.detach().clone()
    _poison_at(opt, {2}, lambda: x)  # element 1: in the first block
    target = torch.randn(n)
    for step in range(2):
        x.grad = x.detach() - target
        ref_x.grad = ref_x.detach() - target
        if step == 1:
            with pytest.warns(RuntimeWarning, match=rf"1 of its 4 blocks of {CHUNK} elements"):
                opt.step()
        else:
            opt.step()
        ref.step()
    phi = opt.state[x][SLOW_KEY]
    # The poisoned block: φ is still φ₀ = θ₀ there; the other blocks synced as in the reference.
    assert torch.equal(phi[:CHUNK], theta0[:CHUNK])  # φ₀ is a copy of θ₀, and that block never synced
    # Values up to |x| ≈ 5: two kernels rounding ≤ 3 times each per element (the SGD step, then our lerp
    # against the reference's φ + α(θ − φ)), not a fixed 1e-6 (2 ulp there).
    ref_phi = ref.slow[ref_x][CHUNK:]
    torch.testing.assert_close(phi[CHUNK:], ref_phi, rtol=0, atol=elementwise_tol(ref_phi, roundings=3))
    assert not torch.equal(phi[CHUNK:], theta0[CHUNK:])
    assert torch.equal(x.detach(), phi)  # θ reset to φ everywhere


def test_nonfinite_raise_changes_nothing() -> None:
    k = 2
    model = make_model()
    opt = Lookahead(INNERS["adam"](model.parameters()), k=k, nonfinite="raise")
    _poison_at(opt, {k}, lambda: model.head.weight)
    batches = make_batches(k)
    backward(model, batches[0])
    opt.step()
    backward(model, batches[1])
    slow = {p: opt.state[p][SLOW_KEY].clone() for p in opt.tracked_params()}
    counts = {p: opt.state[p][COUNT_KEY] for p in opt.tracked_params()}
    theta_after_inner: dict[torch.Tensor, torch.Tensor] = {}
    opt.optimizer.register_step_post_hook(
        lambda o, a, kw: theta_after_inner.update({p: p.detach().clone() for p in slow})
    )
    with pytest.raises(FloatingPointError, match=r"step 2 .*param group 0 tensor 3 \(shape \(2, 8\)\)"):
        opt.step()
    for p, phi in slow.items():
        assert torch.equal(opt.state[p][SLOW_KEY], phi) and opt.state[p][COUNT_KEY] == counts[p]
        assert torch.allclose(p.detach(), theta_after_inner[p], equal_nan=True)
    assert opt.sync_count == 0


def test_nonfinite_with_adaptive_alpha_is_not_blended_in() -> None:
    a, b = nn.Parameter(torch.ones(4)), nn.Parameter(torch.full((3,), 2.0))
    opt = Lookahead(torch.optim.SGD([a, b], lr=0.1), k=2, alpha="adaptive", alpha_bounds=(0.2, 1.0))
    # The same run without the poisoned tensor: the α the finite tensor alone gives.
    b_alone = nn.Parameter(b.detach().clone())
    alone = Lookahead(torch.optim.SGD([b_alone], lr=0.1), k=2, alpha="adaptive", alpha_bounds=(0.2, 1.0))
    _poison_at(opt, {2}, lambda: a)
    for step in range(2):
        a.grad = torch.full((4,), 0.5)
        b.grad = torch.tensor([1.0, -2.0, 0.5]) * (step + 1)
        b_alone.grad = b.grad.clone()
        if step == 1:
            with pytest.warns(RuntimeWarning, match="non-finite"):
                opt.step()
        else:
            opt.step()
        alone.step()
    assert torch.equal(opt.state[a][SLOW_KEY], torch.ones(4)) and torch.equal(a.detach(), torch.ones(4))
    # b alone and b beside a are the same arithmetic but another layout (b's elements sit at other offsets of
    # the flat and foreach kernels: vector body or scalar tail), so they agree to rounding, not to the bit.
    phi_b = opt.state[b][SLOW_KEY]
    assert opt.last_alpha[0] == alone.last_alpha[0]  # the first sync: both the fallback α, no arithmetic
    torch.testing.assert_close(phi_b, alone.state[b_alone][SLOW_KEY], rtol=0, atol=elementwise_tol(phi_b, 4))


# ---------------------------------------------------------------------------------- issue #10: what counts
def test_steps_without_gradients_do_not_count() -> None:
    k, steps, skipped = 3, 10, {1, 4, 5}
    batches = make_batches(steps)
    model, ref_model = make_model(), make_model()
    opt = Lookahead(INNERS["adam"](model.parameters()), k=k)
    ref = ReferenceLookahead(INNERS["adam"](ref_model.parameters()), k, 0.5)
    for step, batch in enumerate(batches):
        if step in skipped:
            model.zero_grad(set_to_none=True)  # e.g. Lightning skipping a training_step
            assert opt.step(closure=lambda: None) is None
            continue
        backward(model, batch)
        opt.step()
        backward(ref_model, batch)
        ref.step()
        assert max_abs_diff(model.parameters(), ref_model.parameters()) <= TOL
    assert opt.sync_count == (steps - len(skipped)) // k == 2
    assert opt.state[model.body.weight][COUNT_KEY] == (steps - len(skipped)) % k


def test_zero_style_group_by_group_steps_count_one_sync_per_cycle() -> None:
    # ZeRO-1/2 shows the inner optimizer one param group at a time and steps it once per group.
    k, steps = 2, 6
    model, ref_model = make_model(), make_model()
    opt = Lookahead(INNERS["sgd_momentum"](param_groups(model, "two")), k=k)
    ref = ReferenceLookahead(INNERS["sgd_momentum"](param_groups(ref_model, "two")), k, 0.5)
    all_groups = opt.param_groups
    for batch in make_batches(steps):
        backward(model, batch)
        for group in all_groups:
            opt.param_groups = [group]
            opt.step()
        opt.param_groups = all_groups
        backward(ref_model, batch)
        ref.step()
    assert max_abs_diff(model.parameters(), ref_model.parameters()) <= TOL
    assert opt.sync_count == steps // k == 3


# ---------------------------------------------------------------------------------- issue #10: misuse
def test_second_wrapper_on_the_same_inner_optimizer_is_refused() -> None:
    model = make_model()
    inner = INNERS["sgd"](model.parameters())
    first = Lookahead(inner, k=2)
    with pytest.raises(ValueError, match="already wrapped by another Lookahead"):
        Lookahead(inner, k=3)
    del first
    import gc

    gc.collect()
    Lookahead(inner, k=3)  # the first wrapper is gone: wrapping again is fine


def test_step_inside_use_slow_weights_is_refused() -> None:
    model = make_model()
    opt = Lookahead(INNERS["sgd"](model.parameters()), k=2)
    backward(model, make_batches(1)[0])
    opt.step()
    backward(model, make_batches(1, seed=3)[0])
    with opt.use_slow_weights(), pytest.raises(RuntimeError, match="inside use_slow_weights"):
        opt.step()
    opt.step()  # fine again after the block


@pytest.mark.parametrize(
    ("inner", "keys", "match"),
    [
        ("adam", ("step",), r"'step' is a torch.float32 tensor of shape \(\).*\['exp_avg', 'exp_avg_sq'\]"),
        ("adam", ("exp_avg", "momentum"), r"'momentum' is not in the optimizer state.*\['exp_avg', 'exp_avg_sq'\]"),
        ("sgd", ("momentum_buffer", "exp_avg"), r"nothing to pull back.*are \[\]"),
    ],
)
def test_pullback_keys_that_are_not_momentum_buffers_are_refused(inner: str, keys: tuple, match: str) -> None:
    model = make_model()
    opt = Lookahead(INNERS[inner](model.parameters()), k=2, pullback="pullback", pullback_keys=keys)
    backward(model, make_batches(1)[0])
    with pytest.raises(ValueError, match=match):
        opt.step()


def test_load_state_dict_invalidates_the_cached_plan() -> None:
    k = 3
    batches = make_batches(8)
    model = make_model()
    opt = Lookahead(INNERS["adam"](model.parameters()), k=k)
    for batch in batches[:2]:
        backward(model, batch)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    params_at_2 = params_of(model)
    for batch in batches[2:5]:
        backward(model, batch)
        opt.step()
    # Back to step 2 in the same objects: the next sync must use the loaded φ and counters.
    opt.load_state_dict(saved)
    with torch.no_grad():
        for p, v in zip(model.parameters(), params_at_2):
            p.copy_(v)
    for batch in batches[2:]:
        backward(model, batch)
        opt.step()
    _, _, ref_model, _ = run_against_reference("adam", k, 0.5, 8)
    assert max_abs_diff(model.parameters(), ref_model.parameters()) <= TOL


def test_flat_slow_weights_for_small_tensors_match_reference() -> None:
    # The flat layout of φ for tiny CPU tensors (sync.make_slow): same trajectory, and a non-finite
    # tensor inside a flat run is still kept alone.
    k = 3
    model, ref_model = make_model(), make_model()
    opt = Lookahead(INNERS["adam"](model.parameters()), k=k)
    ref = ReferenceLookahead(INNERS["adam"](ref_model.parameters()), k, 0.5)
    _poison_at(opt, {2 * k}, lambda: model.head.bias)
    for step, batch in enumerate(make_batches(2 * k), start=1):
        backward(model, batch)
        if step == 2 * k:
            phi_before = opt.state[model.head.bias][SLOW_KEY].clone()
            with pytest.warns(RuntimeWarning, match=r"tensor 4 \(shape \(2,\)\)"):
                opt.step()
        else:
            opt.step()
        backward(ref_model, batch)
        ref.step()
    slow = [opt.state[p][SLOW_KEY] for p in (model.body.weight, model.body.bias, model.head.weight)]
    bases = {s.untyped_storage().data_ptr() for s in slow}
    assert len(bases) == 1  # really one flat buffer
    for p, q in [(model.body.weight, ref_model.body.weight), (model.head.weight, ref_model.head.weight)]:
        assert max_abs_diff([p, opt.state[p][SLOW_KEY]], [q, ref.slow[q]]) <= TOL
    assert torch.equal(opt.state[model.head.bias][SLOW_KEY], phi_before)
    assert torch.equal(model.head.bias.detach(), phi_before)


def test_counters_and_sync_count_per_tensor_across_plan_rebuilds() -> None:
    # Tensors that step on different steps (one has no gradient every third step) leave the group's
    # fast path; a state_dict round trip and a new param group rebuild the cached plan mid-cycle.
    # Counters and sync_count are checked against a plain per-tensor count kept here.
    gen = torch.Generator().manual_seed(0)
    a, b = nn.Parameter(torch.randn(3, generator=gen)), nn.Parameter(torch.randn(4, generator=gen))
    c = nn.Parameter(torch.randn(2, generator=gen))
    k = 3
    opt = Lookahead(torch.optim.SGD([a, b], lr=0.1), k=k)
    counts: dict[nn.Parameter, int] = {a: 0, b: 0}
    syncs: dict[nn.Parameter, int] = {a: 0, b: 0}
    for step in range(1, 19):
        if step == 7:
            opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        if step == 11:
            opt.add_param_group({"params": [c]})
            counts[c] = syncs[c] = 0
        for p in counts:
            p.grad = None if (p is b and step % 3 == 0) else torch.randn(p.shape, generator=gen)
        opt.step()
        for p in counts:
            if p.grad is None:
                continue
            counts[p] += 1
            if counts[p] == k:
                counts[p] = 0
                syncs[p] += 1
        for p in counts:
            assert opt.state[p][COUNT_KEY] == counts[p], (step, p.shape)
        assert opt.sync_count == max(syncs.values()), step
    assert syncs[a] == 6 and 0 < syncs[b] < syncs[a] and syncs[c] == 2  # the test really mixed the paths
