"""The bad-input matrix of docs/bad-inputs.md: one test per row, the row's id as the test id.

Each row is a bad or edge input to one entry point (the constructor, param-group overrides, ``load_state_dict``,
``LookaheadCallback``, the DeepSpeed config section and files, ``install``, the checkpoint CLI, universal
resumes at another world size) and what it gets: an error whose message names the bad value and the fix, or a
documented behaviour asserted here against what the paper's algorithm or the file format says. All run in this
process in well under a second each; the multi-process faults are in tests/test_faults.py.

``test_doc_lists_every_row`` keeps the document and this table in step (same ids, same order).
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from lookahead_dist import Lookahead, LookaheadSettings
from lookahead_dist.core.keys import COUNT_KEY, SLOW_KEY
from lookahead_dist.core.settings import LookaheadConfigError
from lookahead_dist.core.state_check import LookaheadStateError, reset_counters

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "bad-inputs.md"
ROWS: dict[str, tuple[Callable[[Path], Any], Any, str]] = {}


def row(row_id: str, raises: Any = None, match: str = "") -> Callable[[Callable[[Path], Any]], Callable[[Path], Any]]:
    """Register a matrix row: ``fn(tmp_path)`` must raise ``raises`` matching ``match`` (or, with
    ``raises=None``, run its own assertions of the documented behaviour)."""

    def register(fn: Callable[[Path], Any]) -> Callable[[Path], Any]:
        assert row_id not in ROWS, row_id
        ROWS[row_id] = (fn, raises, match)
        return fn

    return register


def model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def first_weight(m: nn.Module) -> torch.Tensor:
    return next(m.parameters())


def adam(m: nn.Module | None = None) -> torch.optim.Optimizer:
    return torch.optim.Adam((m or model()).parameters(), lr=0.1)


def take_steps(opt: torch.optim.Optimizer, m: nn.Module, n: int) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        opt.zero_grad()
        m(torch.randn(5, 3, generator=g)).square().mean().backward()
        opt.step()


def saved_state(n_steps: int = 3, k: int = 5) -> tuple[nn.Module, Lookahead, dict[str, Any]]:
    m = model()
    la = Lookahead(adam(m), k=k)
    take_steps(la, m, n_steps)
    return m, la, la.state_dict()


def fresh(k: int = 5) -> Lookahead:
    return Lookahead(adam(), k=k)


# ====================================================================== constructor
@row("ctor-k-zero", LookaheadConfigError, r"k=0 is invalid; it must be a positive int")
def _(tmp: Path) -> Any:
    return fresh(k=0)


@row("ctor-k-float", LookaheadConfigError, r"k=2\.0 is invalid")
def _(tmp: Path) -> Any:
    return Lookahead(adam(), k=2.0)  # type: ignore[arg-type]


@row("ctor-k-bool", LookaheadConfigError, r"k=True is invalid")
def _(tmp: Path) -> Any:
    return Lookahead(adam(), k=True)


@row("ctor-alpha-above-one", LookaheadConfigError, r"alpha=1\.5 is invalid; it must be a finite number in \(0, 1\]")
def _(tmp: Path) -> Any:
    return Lookahead(adam(), alpha=1.5)


@row("ctor-alpha-zero", LookaheadConfigError, r"alpha=0 is invalid")
def _(tmp: Path) -> Any:
    return Lookahead(adam(), alpha=0)


@row("ctor-alpha-nan", LookaheadConfigError, r"alpha=nan is invalid")
def _(tmp: Path) -> Any:
    return Lookahead(adam(), alpha=math.nan)


@row("ctor-alpha-word", LookaheadConfigError, r"alpha='fast' is invalid.*or \"adaptive\"")
def _(tmp: Path) -> Any:
    return Lookahead(adam(), alpha="fast")  # type: ignore[arg-type]


@row("ctor-pullback-unknown", LookaheadConfigError, r"pullback='momentum' is invalid; it must be one of 'none', 'reset'")
def _(tmp: Path) -> Any:
    return Lookahead(adam(), pullback="momentum")


@row("ctor-bounds-one-value", LookaheadConfigError, r"alpha_bounds=\(0\.5,\) is invalid; it must be a pair")
def _(tmp: Path) -> Any:
    return Lookahead(adam(), alpha="adaptive", alpha_bounds=(0.5,))  # type: ignore[arg-type]


@row("ctor-bounds-none", LookaheadConfigError, r"alpha_bounds=None is invalid; it must be a pair")
def _(tmp: Path) -> Any:
    return Lookahead(adam(), alpha="adaptive", alpha_bounds=None)  # type: ignore[arg-type]


@row("ctor-bounds-reversed", LookaheadConfigError, r"alpha_bounds=\(0\.9, 0\.5\) is invalid.*low <= high")
def _(tmp: Path) -> Any:
    return Lookahead(adam(), alpha="adaptive", alpha_bounds=(0.9, 0.5))


@row("ctor-fallback-out-of-range", LookaheadConfigError, r"alpha_fallback=2 is invalid")
def _(tmp: Path) -> Any:
    return Lookahead(adam(), alpha="adaptive", alpha_fallback=2)


@row("ctor-pullback-keys-string", LookaheadConfigError, r"pullback_keys='exp_avg' is invalid.*not a bare string")
def _(tmp: Path) -> Any:
    return Lookahead(adam(), pullback="pullback", pullback_keys="exp_avg")  # type: ignore[arg-type]


@row("ctor-pullback-keys-int", LookaheadConfigError, r"pullback_keys=5 is invalid")
def _(tmp: Path) -> Any:
    return Lookahead(adam(), pullback="pullback", pullback_keys=5)  # type: ignore[arg-type]


@row("ctor-nonfinite-unknown", LookaheadConfigError, r"nonfinite='ignore' is invalid; it must be one of 'skip', 'raise'")
def _(tmp: Path) -> Any:
    return Lookahead(adam(), nonfinite="ignore")


@row("ctor-not-an-optimizer", TypeError, r"expected a torch\.optim\.Optimizer to wrap, got Sequential")
def _(tmp: Path) -> Any:
    return Lookahead(model())  # type: ignore[arg-type]


@row("ctor-wrap-a-lookahead", TypeError, r"already a Lookahead; wrap the inner optimizer once")
def _(tmp: Path) -> Any:
    return Lookahead(fresh())  # type: ignore[arg-type]


@row("ctor-two-wrappers-one-inner", ValueError, r"already wrapped by another Lookahead")
def _(tmp: Path) -> Any:
    inner = adam()
    first = Lookahead(inner)  # kept alive: the registry is weak, a dropped wrapper frees the inner optimizer
    return first, Lookahead(inner)


@row("ctor-lbfgs", TypeError, r"LBFGS is not supported")
def _(tmp: Path) -> Any:
    return Lookahead(torch.optim.LBFGS(model().parameters()))


@row("ctor-no-parameters", ValueError, r"has no parameters to step")
def _(tmp: Path) -> Any:
    return Lookahead(torch.optim.SGD([{"params": []}], lr=0.1))


@row("ctor-reduce-fn-not-callable", TypeError, r"reduce_fn=5 is not callable")
def _(tmp: Path) -> Any:
    return Lookahead(adam(), alpha="adaptive", reduce_fn=5)  # type: ignore[arg-type]


@row("ctor-settings-not-settings", TypeError, r"settings must be a LookaheadSettings, got dict")
def _(tmp: Path) -> Any:
    return Lookahead(adam(), settings={"k": 5})  # type: ignore[arg-type]


# ====================================================================== param-group overrides
@row("group-k-zero", LookaheadConfigError, r"param_group\['lookahead_k'\]=0 is invalid")
def _(tmp: Path) -> Any:
    m = model()
    return Lookahead(torch.optim.SGD([{"params": m.parameters(), "lookahead_k": 0}], lr=0.1))


@row("group-alpha-above-one", LookaheadConfigError, r"param_group\['lookahead_alpha'\]=2\.0 is invalid")
def _(tmp: Path) -> Any:
    m = model()
    return Lookahead(torch.optim.SGD([{"params": m.parameters(), "lookahead_alpha": 2.0}], lr=0.1))


@row("group-k-string-added-later", LookaheadConfigError, r"param_group\['lookahead_k'\]='5' is invalid")
def _(tmp: Path) -> Any:
    m = model()
    la = Lookahead(torch.optim.SGD(m[0].parameters(), lr=0.1))
    la.add_param_group({"params": m[2].parameters(), "lookahead_k": "5"})


@row("group-k-edited-to-zero", None)
def _(tmp: Path) -> Any:
    # Overrides edited after construction are checked at the next step, before anything moves.
    m = model()
    la = Lookahead(torch.optim.SGD(m.parameters(), lr=0.1))
    take_steps(la, m, 2)
    before = [p.detach().clone() for p in m.parameters()]
    la.param_groups[0]["lookahead_k"] = 0
    m(torch.ones(1, 3)).sum().backward()
    with pytest.raises(LookaheadConfigError, match=r"param_group\['lookahead_k'\]=0"):
        la.step()
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))


# ====================================================================== load_state_dict
@row("load-none", TypeError, r"expected the dict returned by optimizer\.state_dict\(\), got NoneType")
def _(tmp: Path) -> Any:
    fresh().load_state_dict(None)  # type: ignore[arg-type]


@row("load-not-a-state-dict", TypeError, r"no 'state' mapping and 'param_groups' list")
def _(tmp: Path) -> Any:
    fresh().load_state_dict({"weights": 1})


@row("load-slow-wrong-shape", LookaheadStateError, r"\['lookahead_slow'\] has shape \(2, 2\), the parameter \(4, 3\)")
def _(tmp: Path) -> Any:
    _, _, sd = saved_state()
    sd["state"][0][SLOW_KEY] = torch.zeros(2, 2)
    fresh().load_state_dict(sd)


@row("load-slow-nan", LookaheadStateError, r"holds 1 non-finite value\(s\).*Resume from an earlier checkpoint")
def _(tmp: Path) -> Any:
    _, _, sd = saved_state()
    sd["state"][1][SLOW_KEY][0] = math.nan
    fresh().load_state_dict(sd)


@row("load-slow-integer-dtype", LookaheadStateError, r"has dtype torch\.int64; slow weights are floating point")
def _(tmp: Path) -> Any:
    _, _, sd = saved_state()
    sd["state"][0][SLOW_KEY] = torch.zeros(4, 3, dtype=torch.int64)
    fresh().load_state_dict(sd)


@row("load-slow-not-a-tensor", LookaheadStateError, r"\['lookahead_slow'\] is a list, not a tensor")
def _(tmp: Path) -> Any:
    _, _, sd = saved_state()
    sd["state"][0][SLOW_KEY] = sd["state"][0][SLOW_KEY].tolist()
    fresh().load_state_dict(sd)


@row("load-count-negative", LookaheadStateError, r"\['lookahead_count'\]=-1 is outside 0\.\.k-1 for k=5")
def _(tmp: Path) -> Any:
    _, _, sd = saved_state()
    sd["state"][0][COUNT_KEY] = -1
    fresh().load_state_dict(sd)


@row("load-count-float", LookaheadStateError, r"\['lookahead_count'\]=3\.0 must be a Python int \(a float")
def _(tmp: Path) -> Any:
    _, _, sd = saved_state()
    sd["state"][0][COUNT_KEY] = 3.0
    fresh().load_state_dict(sd)


@row("load-k-changed-on-resume", LookaheadStateError, r"=4 is outside 0\.\.k-1 for k=3.*resume with that k")
def _(tmp: Path) -> Any:
    _, _, sd = saved_state(n_steps=4, k=5)  # counters at 4
    fresh(k=3).load_state_dict(sd)


@row("load-k-changed-reset-counters", None)
def _(tmp: Path) -> Any:
    # The deliberate way out: a fresh cycle from the saved φ; the next sync is k=3 steps away.
    m, _, sd = saved_state(n_steps=4, k=5)
    slow = [sd["state"][i][SLOW_KEY].clone() for i in range(4)]
    la = Lookahead(adam(m), k=3)
    la.load_state_dict(reset_counters(sd))
    take_steps(la, m, 2)
    assert la.sync_count == 0
    assert all(torch.equal(la.state[p][SLOW_KEY], s) for p, s in zip(m.parameters(), slow))
    take_steps(la, m, 1)
    assert la.sync_count == 1


@row("load-count-without-slow", LookaheadStateError, r"has a cycle counter but no slow weights")
def _(tmp: Path) -> Any:
    _, _, sd = saved_state()
    del sd["state"][0][SLOW_KEY]
    fresh().load_state_dict(sd)


@row("load-slow-other-dtype-is-cast", None)
def _(tmp: Path) -> Any:
    # Like Adam's exp_avg, φ is cast to the parameter's dtype (and moved to its device) by torch at load.
    m, _, sd = saved_state()
    expected = sd["state"][0][SLOW_KEY].clone()
    sd["state"][0][SLOW_KEY] = expected.double()
    la = Lookahead(adam(m))
    la.load_state_dict(sd)
    got = la.state[next(m.parameters())][SLOW_KEY]
    assert got.dtype == torch.float32 and torch.equal(got, expected)


@row("load-plain-optimizer-state", None)
def _(tmp: Path) -> Any:
    # A state dict of the bare inner optimizer (no Lookahead keys) starts a fresh cycle: φ₀ = θ at the next step.
    m = model()
    inner = adam(m)
    take_steps(inner, m, 2)
    la = Lookahead(adam(m))
    la.load_state_dict(inner.state_dict())
    theta = [p.detach().clone() for p in m.parameters()]
    take_steps(la, m, 1)
    assert all(torch.equal(la.state[p][SLOW_KEY], t) for p, t in zip(m.parameters(), theta))


# ====================================================================== values met while training (core)
def step_on(m: nn.Module, la: Lookahead) -> None:
    la.zero_grad()
    m(torch.ones(2, 3)).sum().backward()
    la.step()


@row("train-nonfinite-fast-weights-skip", None)
def _(tmp: Path) -> Any:
    # Default nonfinite="skip": a sync whose θ holds NaN keeps φ of that tensor (finite) and warns with the step.
    m = model()
    la = Lookahead(adam(m), k=2)
    step_on(m, la)
    weight = first_weight(m)
    phi_before = la.state[weight][SLOW_KEY].clone()
    with torch.no_grad():
        weight[0, 0] = math.nan
    with pytest.warns(RuntimeWarning, match=r"step 2.*non-finite.*param group 0 tensor 0"):
        step_on(m, la)
    assert torch.equal(la.state[weight][SLOW_KEY], phi_before)


@row("train-nonfinite-fast-weights-raise", FloatingPointError, r"not finite \(NaN/inf\) at a sync.*nonfinite='raise'")
def _(tmp: Path) -> Any:
    m = model()
    la = Lookahead(adam(m), k=2, nonfinite="raise")
    step_on(m, la)
    with torch.no_grad():
        first_weight(m)[0, 0] = math.inf
    step_on(m, la)


@row("train-step-without-gradients", None)
def _(tmp: Path) -> Any:
    # A step that updates nothing (every gradient None) does not advance the cycle.
    m = model()
    la = Lookahead(adam(m), k=2)
    step_on(m, la)
    la.zero_grad()
    la.step()
    assert la.state[first_weight(m)][COUNT_KEY] == 1 and la.sync_count == 0
    step_on(m, la)
    assert la.sync_count == 1


@row("train-pullback-keys-not-momentum", ValueError, r"pullback_keys entry 'step' is a .* not a momentum-like buffer")
def _(tmp: Path) -> Any:
    m = model()
    la = Lookahead(adam(m), k=1, pullback="pullback", pullback_keys=("step",))
    step_on(m, la)


@row("train-step-inside-use-slow-weights", RuntimeError, r"step\(\) called inside use_slow_weights\(\)")
def _(tmp: Path) -> Any:
    m = model()
    la = Lookahead(adam(m), k=3)
    step_on(m, la)
    with la.use_slow_weights():
        step_on(m, la)


# ====================================================================== LookaheadCallback
def callback(**kwargs: Any) -> Any:
    pytest.importorskip("lightning")
    from lookahead_dist.callbacks import LookaheadCallback

    return LookaheadCallback(**kwargs)


@row("callback-k-zero", LookaheadConfigError, r"k=0 is invalid")
def _(tmp: Path) -> Any:
    return callback(k=0)


@row("callback-pullback-keys-string", LookaheadConfigError, r"pullback_keys='exp_avg' is invalid")
def _(tmp: Path) -> Any:
    return callback(pullback="pullback", pullback_keys="exp_avg")


@row("callback-optimizer-indices-empty", ValueError, r"optimizer_indices=\[\] is invalid; give a non-empty list")
def _(tmp: Path) -> Any:
    return callback(optimizer_indices=[])


@row("callback-optimizer-indices-int", ValueError, r"optimizer_indices=0 is invalid")
def _(tmp: Path) -> Any:
    return callback(optimizer_indices=0)


PENDING: dict[str, str] = {}


@row("callback-eval-weights-unknown", ValueError, r"eval_weights='ema' is unknown; use 'slow'")
def _(tmp: Path) -> Any:
    return callback(eval_weights="ema")


@row("callback-log-prefix-none", ValueError, r"log_prefix=None must be a string")
def _(tmp: Path) -> Any:
    return callback(log_prefix=None)


@row("callback-log-distance-string", ValueError, r"log_distance='yes' must be True or False")
def _(tmp: Path) -> Any:
    return callback(log_distance="yes")


# ====================================================================== DeepSpeed section and files
def split(config: Any) -> Any:
    pytest.importorskip("deepspeed")
    from lookahead_dist.deepspeed import split_config

    return split_config(config)


def write(tmp: Path, text: str, name: str = "ds.json") -> Path:
    path = tmp / name
    path.write_text(text)
    return path


@row("ds-section-misspelled-underscore", LookaheadConfigError, r"top-level key \"look_ahead\" is not \"lookahead\"")
def _(tmp: Path) -> Any:
    return split({"train_batch_size": 4, "look_ahead": {"k": 5}})


@row("ds-section-capitalised", LookaheadConfigError, r"ds\.json'.*top-level key \"Lookahead\".*Rename it")
def _(tmp: Path) -> Any:
    return split(write(tmp, '{"Lookahead": {"k": 5}}'))


@row("ds-section-camel-case", LookaheadConfigError, r"top-level key \"lookAhead\"")
def _(tmp: Path) -> Any:
    return split({"lookAhead": {"k": 5}})


@row("ds-section-typo", LookaheadConfigError, r"top-level key \"lookahed\".*without Lookahead")
def _(tmp: Path) -> Any:
    return split({"lookahed": {"k": 5}})


@row("ds-section-null", LookaheadConfigError, r"\"lookahead\": null is invalid.*remove the key")
def _(tmp: Path) -> Any:
    return split(write(tmp, '{"lookahead": null}'))


@row("ds-section-not-an-object", LookaheadConfigError, r"lookahead=5 is invalid; it must be an object")
def _(tmp: Path) -> Any:
    return split({"lookahead": 5})


@row("ds-section-unknown-key", LookaheadConfigError, r"unknown key\(s\) lookahead\.K \(did you mean 'k'\?\)")
def _(tmp: Path) -> Any:
    return split({"lookahead": {"K": 5}})


@row("ds-section-bad-value-in-file", LookaheadConfigError, r"ds\.json': Lookahead: lookahead\.k=0 is invalid")
def _(tmp: Path) -> Any:
    return split(write(tmp, '{"lookahead": {"k": 0}}'))


@row("ds-pullback-keys-string", LookaheadConfigError, r"lookahead\.pullback_keys='exp_avg' is invalid")
def _(tmp: Path) -> Any:
    return split({"lookahead": {"pullback": "pullback", "pullback_keys": "exp_avg"}})


@row("ds-alpha-bounds-string", LookaheadConfigError, r"lookahead\.alpha_bounds='0\.5,1\.0' is invalid")
def _(tmp: Path) -> Any:
    return split({"lookahead": {"alpha": "adaptive", "alpha_bounds": "0.5,1.0"}})


@row("ds-duplicate-top-level-key", LookaheadConfigError, r"ds\.json': duplicate key\(s\) \['lookahead'\]")
def _(tmp: Path) -> Any:
    return split(write(tmp, '{"lookahead": {"k": 5}, "lookahead": {"k": 3}}'))


@row("ds-duplicate-key-in-section", LookaheadConfigError, r"duplicate key\(s\) \['k'\]")
def _(tmp: Path) -> Any:
    return split(write(tmp, '{"lookahead": {"k": 5, "k": 3}}'))


@row("ds-hjson-file-with-comments", None)
def _(tmp: Path) -> Any:
    path = write(tmp, "{\n  // DeepSpeed reads hjson\n  train_batch_size: 4\n  lookahead: {k: 3}  # comment\n}\n", "c.hjson")
    ds_config, kwargs = split(path)
    assert ds_config == {"train_batch_size": 4} and kwargs is not None and kwargs["k"] == 3


@row("ds-base64-config-string", None)
def _(tmp: Path) -> Any:
    text = json.dumps({"train_batch_size": 4, "lookahead": {"k": 4, "alpha": 0.8}})
    ds_config, kwargs = split(base64.urlsafe_b64encode(text.encode()).decode())
    assert ds_config == {"train_batch_size": 4} and kwargs is not None and (kwargs["k"], kwargs["alpha"]) == (4, 0.8)


@row("ds-bad-json-names-the-file", LookaheadConfigError, r"DeepSpeed config file '.*broken\.json': not valid JSON/hjson")
def _(tmp: Path) -> Any:
    return split(write(tmp, '{"lookahead": {"k": 5,, }}', "broken.json"))


@row("ds-missing-file", LookaheadConfigError, r"DeepSpeed config file 'configs/zero9\.json' does not exist")
def _(tmp: Path) -> Any:
    return split("configs/zero9.json")


@row("ds-top-level-list", LookaheadConfigError, r"list\.json': a DeepSpeed config must be a JSON object")
def _(tmp: Path) -> Any:
    return split(write(tmp, "[1, 2]", "list.json"))


@row("ds-config-wrong-type", LookaheadConfigError, r"must be a dict, a path to a JSON/hjson file or a base64 string, got int")
def _(tmp: Path) -> Any:
    return split(5)


@row("ds-lightning-strategy-misspelled", LookaheadConfigError, r"top-level key \"look_ahead\"")
def _(tmp: Path) -> Any:
    pytest.importorskip("deepspeed")
    pytest.importorskip("lightning")
    from lookahead_dist.lightning import LookaheadDeepSpeedStrategy

    return LookaheadDeepSpeedStrategy(config={"look_ahead": {"k": 5}})


@row("ds-lightning-strategy-hjson-file", None)
def _(tmp: Path) -> Any:
    pytest.importorskip("deepspeed")
    pytest.importorskip("lightning")
    from lookahead_dist.lightning import LookaheadDeepSpeedStrategy

    path = write(tmp, "{\n // comment\n zero_optimization: {stage: 2}\n lookahead: {k: 3}\n}\n", "c.hjson")
    strategy = LookaheadDeepSpeedStrategy(config=str(path))
    assert strategy.config is not None
    assert strategy.config["lookahead"] == {"k": 3} and strategy.config["zero_optimization"]["stage"] == 2
    with pytest.raises(LookaheadConfigError, match=r"c2\.json'.*lookahead\.k=0"):
        LookaheadDeepSpeedStrategy(config=str(write(tmp, '{"lookahead": {"k": 0}}', "c2.json")))


# ====================================================================== install
def fake_engine(**attrs: Any) -> Any:
    """A stage-0 fp32 engine: its optimizer is the torch optimizer itself."""
    pytest.importorskip("deepspeed")
    zero = SimpleNamespace(offload_optimizer=None, offload_param=None)

    def load_checkpoint(load_dir: Any, tag: Any = None, **kwargs: Any) -> Any:
        return None, None

    engine = SimpleNamespace(_config=SimpleNamespace(zero_config=zero), zero_optimization_stage=lambda: 0,
                             optimizer=adam(), load_checkpoint=load_checkpoint,
                             load_universal_checkpoint=lambda: False, loaded_checkpoint_dp_world_size=None)  # fmt: skip
    for key, value in attrs.items():
        setattr(engine, key, value)
    return engine


def install(*args: Any, **kwargs: Any) -> Any:
    pytest.importorskip("deepspeed")
    from lookahead_dist.deepspeed import install as install_

    return install_(*args, **kwargs)


@row("install-none", TypeError, r"expected a DeepSpeed engine \(the first value returned by deepspeed\.initialize\), got NoneType")
def _(tmp: Path) -> Any:
    return install(None)


@row("install-not-an-engine", TypeError, r"expected a DeepSpeed engine.*got Sequential")
def _(tmp: Path) -> Any:
    return install(model())


@row("install-twice", RuntimeError, r"already has a Lookahead")
def _(tmp: Path) -> Any:
    engine = fake_engine()
    install(engine)
    return install(engine)


@row("install-after-load-checkpoint", RuntimeError, r"already loaded a checkpoint; install Lookahead first")
def _(tmp: Path) -> Any:
    return install(fake_engine(loaded_checkpoint_dp_world_size=2))


@row("install-unknown-option", TypeError, r"unknown option\(s\) \['kk'\]")
def _(tmp: Path) -> Any:
    return install(fake_engine(), kk=5)


@row("install-settings-and-keywords", TypeError, r"pass either settings=\.\.\. or keyword options, not both")
def _(tmp: Path) -> Any:
    return install(fake_engine(), k=3, settings=LookaheadSettings())


@row("install-pullback-keys-string", LookaheadConfigError, r"pullback_keys='exp_avg' is invalid")
def _(tmp: Path) -> Any:
    return install(fake_engine(), pullback="pullback", pullback_keys="exp_avg")


# ====================================================================== checkpoint CLI and loads
def cli(*argv: str) -> tuple[int, str, str]:
    pytest.importorskip("deepspeed")
    import contextlib
    import io

    from lookahead_dist.checkpoint import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def fake_ckpt(tmp: Path, **tags: str) -> Path:
    from tests.test_checkpoint_tools import fake_checkpoint

    latest = tags.pop("latest", None)
    return fake_checkpoint(tmp / "ckpt", tags, latest=latest)


def one_line(code: int, err: str, expected_code: int = 2) -> str:
    assert code == expected_code, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@row("cli-not-a-directory", None)
def _(tmp: Path) -> Any:
    err = one_line(*cli("slow-weights", str(tmp / "nope"), str(tmp / "o.pt"))[::2])
    assert "is not a directory; pass the folder given to engine.save_checkpoint" in err


@row("cli-missing-highest-rank-file", None)
def _(tmp: Path) -> Any:
    root = fake_ckpt(tmp, global_step4="ok", global_step8="missing_last", latest="global_step8")
    err = one_line(*cli("slow-weights", str(root), str(tmp / "o.pt"))[::2])
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt is missing" in err and "pass --tag 'global_step4'" in err


@row("cli-truncated-rank-file", None)
def _(tmp: Path) -> Any:
    root = fake_ckpt(tmp, global_step4="truncated_rank1")
    err = one_line(*cli("to-universal", str(root), "--tag", "global_step4")[::2])
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt is truncated or corrupt" in err


@row("cli-no-latest-no-tag", None)
def _(tmp: Path) -> Any:
    root = fake_ckpt(tmp, global_step4="ok")
    err = one_line(*cli("slow-weights", str(root), str(tmp / "o.pt"))[::2])
    assert "no *_optim_states.pt files and no 'latest' file; pass tag=" in err


@row("cli-unknown-tag", None)
def _(tmp: Path) -> Any:
    root = fake_ckpt(tmp, global_step4="ok")
    err = one_line(*cli("slow-weights", str(root), str(tmp / "o.pt"), "--tag", "global_step5")[::2])
    assert "tag 'global_step5' not found" in err


@row("cli-check-incomplete-latest", None)
def _(tmp: Path) -> Any:
    root = fake_ckpt(tmp, global_step4="ok", global_step8="truncated_rank1", latest="global_step8")
    code, out, _ = cli("check", str(root))
    assert code == 1 and "global_step8 (latest): INCOMPLETE" in out and "'global_step4'" in out


@row("cli-slow-weights-non-lightning-file", None)
def _(tmp: Path) -> Any:
    torch.save({"w": torch.zeros(1)}, tmp / "w.pt")
    err = one_line(*cli("slow-weights", str(tmp / "w.pt"), str(tmp / "o.pt"))[::2])
    assert "is not a Lightning checkpoint with optimizer state" in err


@row("load-incomplete-latest", None)
def _(tmp: Path) -> Any:
    pytest.importorskip("deepspeed")
    from lookahead_dist.deepspeed import IncompleteCheckpointError, load_checkpoint

    root = fake_ckpt(tmp, global_step4="ok", global_step8="missing_last", latest="global_step8")
    calls: list[Any] = []

    def engine_load(load_dir: Any, tag: Any = None, **kwargs: Any) -> tuple[None, None]:
        calls.append(tag)
        return None, None

    engine = SimpleNamespace(load_universal_checkpoint=lambda: False, load_checkpoint=engine_load)
    with pytest.raises(IncompleteCheckpointError, match=r"'global_step8'.*is missing.*'global_step4'.*fallback=True"):
        load_checkpoint(engine, root)
    assert calls == []  # refused before DeepSpeed reads anything
    with pytest.warns(RuntimeWarning, match="loading the last complete tag 'global_step4'"):
        load_checkpoint(engine, root, fallback=True)
    assert calls == ["global_step4"]


# ====================================================================== resumes at another world size
def universal_folder(tmp: Path, meta: dict[str, Any] | None) -> Path:
    folder = tmp / "uni" / "global_step4_universal"
    (folder / "zero").mkdir(parents=True)
    if meta is not None:
        (folder / "lookahead_universal.json").write_text(json.dumps(meta))
    return folder


@row("world-universal-without-lookahead-meta", FileNotFoundError, r"lookahead_universal\.json' is missing.*to-universal")
def _(tmp: Path) -> Any:
    pytest.importorskip("deepspeed")
    from lookahead_dist.deepspeed.checkpoint import restore_after_universal_load

    folder = universal_folder(tmp, None)
    restore_after_universal_load(SimpleNamespace(), folder.parent, folder.name)


@row("world-universal-unknown-format", ValueError, r"has format 99; this version reads format 1")
def _(tmp: Path) -> Any:
    pytest.importorskip("deepspeed")
    from lookahead_dist.deepspeed.checkpoint import restore_after_universal_load

    folder = universal_folder(tmp, {"format": 99})
    restore_after_universal_load(SimpleNamespace(), folder.parent, folder.name)


@row("world-universal-k-changed", ValueError, r"saved cycle position 4 does not fit k=3.*resume with the k")
def _(tmp: Path) -> Any:
    pytest.importorskip("deepspeed")
    from lookahead_dist.deepspeed.checkpoint import restore_after_universal_load

    folder = universal_folder(tmp, {"format": 1, "slow_keys": ["lookahead_slow"], "count": 4})
    engine = fake_engine(zero_optimization_stage=lambda: 2)
    engine.optimizer = fresh(k=3)  # what find_lookahead reaches for a stage-0 engine
    restore_after_universal_load(engine, folder.parent, folder.name)


@row("world-universal-latest-missing", FileNotFoundError, r"latest_universal' does not exist; pass tag=")
def _(tmp: Path) -> Any:
    pytest.importorskip("deepspeed")
    from lookahead_dist.deepspeed.checkpoint import restore_after_universal_load

    (tmp / "uni").mkdir()
    restore_after_universal_load(SimpleNamespace(), tmp / "uni")


@row("world-universal-save-mid-cycle-mixed-k", ValueError, r"cycle counters \('lookahead_count'\) differ between tensors")
def _(tmp: Path) -> Any:
    pytest.importorskip("deepspeed")
    from lookahead_dist.deepspeed.checkpoint import _lookahead_layout

    slow = torch.zeros(4)
    rank_state = {"single_partition_of_fp32_groups": [slow, slow],
                  "base_optimizer_state": [{SLOW_KEY: slow, COUNT_KEY: 1}, {SLOW_KEY: slow, COUNT_KEY: 3}]}  # fmt: skip
    _lookahead_layout([rank_state], stage=2)


@row("ctor-outer-scope-nodes", LookaheadConfigError, r"outer\.scope='nodes' .*cannot be carried out here.*lookahead_dist\.deepspeed\.initialize")
def _(tmp: Path) -> Any:
    nodes = LookaheadSettings(outer={"scope": "nodes", "momentum": 0.9})  # type: ignore[arg-type]
    la = fresh()
    with pytest.raises(LookaheadConfigError, match=r"outer\.scope='nodes'"):
        la.settings = nodes  # a settings change on a live Lookahead is refused alike
    assert la.settings.outer.scope == "global"
    return Lookahead(adam(), settings=nodes)


# ====================================================================== the tests
@pytest.mark.parametrize("row_id", list(ROWS))
def test_row(row_id: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if row_id in PENDING:
        request.applymarker(pytest.mark.xfail(reason=PENDING[row_id], strict=True))
    fn, raises, match = ROWS[row_id]
    if raises is None:
        fn(tmp_path)
        return
    with pytest.raises(raises, match=match) as info:
        fn(tmp_path)
    assert type(info.value) is not AssertionError


def test_doc_lists_every_row() -> None:
    doc_ids = re.findall(r"^\| `([a-z0-9-]+)` \|", DOC.read_text(), flags=re.MULTILINE)
    assert doc_ids == list(ROWS), set(doc_ids) ^ set(ROWS)
    assert len(ROWS) >= 45
