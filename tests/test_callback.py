"""LookaheadCallback on one device (in this process) against tests/reference.py, plus its argument
checks, strategy checks and a LightningCLI round trip. Multi-process cases: test_callback_dist.py."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

from lookahead_dist import Lookahead, LookaheadCallback
from lookahead_dist.core.optim import SLOW_KEY
from tests.dist.pl_common import (
    Capture,
    TinyModule,
    global_batch,
    loader,
    make_net,
    reference_run,
    slow_of,
    val_loss,
)
from tests.reference import ReferenceLookahead, max_abs_diff

ROOT = Path(__file__).resolve().parents[1]
B = 8  # rows per batch (one process)
os.environ.setdefault("OMP_NUM_THREADS", "1")
warnings.filterwarnings("ignore", ".*does not have many workers.*")


def fit(
    steps: int,
    callback: LookaheadCallback | None = None,
    module: pl.LightningModule | None = None,
    start: int = 0,
    n_rows: int = 512,
    ckpt: str | None = None,
    **trainer_kw: Any,
) -> tuple[Any, Any, LookaheadCallback]:
    callback = callback or LookaheadCallback(k=3, alpha=0.5)
    module = module or TinyModule()
    kw: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": steps,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
        "use_distributed_sampler": False,
    }
    kw.update(trainer_kw)
    trainer = pl.Trainer(callbacks=[callback], **kw)
    trainer.fit(module, train_dataloaders=loader(B, 0, 1, start=start, n_rows=n_rows), ckpt_path=ckpt)
    return trainer, module, callback


def slow_weights(callback: LookaheadCallback, params: list[torch.Tensor], index: int = 0) -> list[torch.Tensor]:
    state = callback.wrappers[index].state
    return [state[p][SLOW_KEY] for p in params]


# ---------------------------------------------------------------------------------------- equivalence
CASES = {
    "adam": {"opt": "adam"},
    "sgd-pullback-accum-clip-step_lr": {
        "opt": "sgd", "pullback": "pullback", "accumulate": 2, "clip": 0.05, "scheduler": "step"
    },
    "adam-reset-epoch_lr-bf16": {"opt": "adam", "pullback": "reset", "scheduler": "epoch", "bf16": True, "n_rows": 64},
}


@pytest.mark.parametrize("name", list(CASES))
def test_single_device_matches_reference(name: str) -> None:
    case = dict(CASES[name])
    steps, k = 14, 3
    pullback = case.pop("pullback", "none")
    n_rows = case.get("n_rows", 512)
    module = TinyModule(opt=case["opt"], scheduler=case.get("scheduler"))
    callback = LookaheadCallback(k=k, alpha=0.5, pullback=pullback)
    trainer, module, callback = fit(
        steps,
        callback,
        module,
        n_rows=n_rows,
        accumulate_grad_batches=case.get("accumulate", 1),
        gradient_clip_val=case.get("clip"),
        precision="bf16-mixed" if case.get("bf16") else "32-true",
    )
    net, ref, lrs = reference_run(
        steps,
        B,
        k,
        0.5,
        opt=case["opt"],
        pullback=pullback,
        accumulate=case.get("accumulate", 1),
        clip=case.get("clip"),
        scheduler=case.get("scheduler"),
        n_rows=n_rows,
        bf16=case.get("bf16", False),
    )
    params = list(module.net.parameters())
    tol = 1e-3 if case.get("bf16") else 1e-5
    assert max_abs_diff(params, list(net.parameters())) < tol
    assert max_abs_diff(slow_weights(callback, params), slow_of(ref, net)) < tol
    assert callback.syncs_done == steps // k
    wrapper = callback.wrappers[0]
    assert isinstance(trainer.optimizers[0], Lookahead) and trainer.optimizers[0] is wrapper
    if case.get("scheduler"):
        # The scheduler still drives the inner optimizer, whose param_groups the wrapper shares.
        assert trainer.lr_scheduler_configs[0].scheduler.optimizer is wrapper.optimizer
        assert module.lr_seen[:: case.get("accumulate", 1)] == pytest.approx(lrs)
        assert lrs[-1] < lrs[0]


class TwoNets(pl.LightningModule):
    """Manual optimization with two optimizers; only the second one gets Lookahead in the test."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.a, self.b = make_net(0), make_net(1)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        for net, opt in zip((self.a, self.b), self.optimizers()):
            opt.zero_grad()
            self.manual_backward(nn.functional.mse_loss(net(x), y))
            opt.step()

    def configure_optimizers(self) -> Any:
        return [torch.optim.Adam(self.a.parameters(), lr=0.05), torch.optim.SGD(self.b.parameters(), lr=0.1)]


def test_optimizer_indices_wraps_only_the_chosen_optimizer() -> None:
    steps = 7  # batches; in manual optimization every optimizer.step() counts as a global step
    trainer, module, callback = fit(2 * steps, LookaheadCallback(k=2, alpha=0.3, optimizer_indices=[1]), TwoNets())
    assert not isinstance(trainer.optimizers[0], Lookahead)
    assert isinstance(trainer.optimizers[1], Lookahead)
    a, b = make_net(0), make_net(1)
    opt_a = torch.optim.Adam(a.parameters(), lr=0.05)
    ref_b = ReferenceLookahead(torch.optim.SGD(b.parameters(), lr=0.1), 2, 0.3)
    for j in range(steps):
        x, y = global_batch(j, B)
        for net, step, zero in ((a, opt_a.step, opt_a.zero_grad), (b, ref_b.step, ref_b.inner.zero_grad)):
            zero()
            nn.functional.mse_loss(net(x), y).backward()
            step()
    assert max_abs_diff(list(module.a.parameters()), list(a.parameters())) < 1e-5
    assert max_abs_diff(list(module.b.parameters()), list(b.parameters())) < 1e-5
    assert max_abs_diff(slow_weights(callback, list(module.b.parameters()), 1), slow_of(ref_b, b)) < 1e-5


# ---------------------------------------------------------------------------------------- evaluation
@pytest.mark.parametrize("eval_weights", ["slow", "fast"])
def test_validation_uses_chosen_weights_and_leaves_training_bit_identical(eval_weights: str) -> None:
    steps, every = 10, 4
    _plain_trainer, plain, plain_cb = fit(steps)
    callback = LookaheadCallback(k=3, alpha=0.5, eval_weights=eval_weights)
    trainer, module, callback = fit(
        steps, callback, limit_val_batches=1.0, val_check_interval=every, check_val_every_n_epoch=None
    )
    params = list(module.net.parameters())
    assert max_abs_diff(params, list(plain.net.parameters())) == 0.0
    assert max_abs_diff(slow_weights(callback, params), slow_weights(plain_cb, list(plain.net.parameters()))) == 0
    expected = []
    for s in range(every, steps + 1, every):
        net, ref, _ = reference_run(s, B, 3, 0.5)
        expected.append(val_loss(slow_of(ref, net) if eval_weights == "slow" else list(net.parameters())))
    assert module.val_losses == pytest.approx(expected, rel=1e-5)

    # trainer.test after fit evaluates the same way and gives θ back untouched.
    before = [p.detach().clone() for p in params]
    module.val_losses.clear()
    trainer.test(module, dataloaders=module.val_dataloader(), verbose=False)
    net, ref, _ = reference_run(steps, B, 3, 0.5)
    final = slow_of(ref, net) if eval_weights == "slow" else list(net.parameters())
    assert module.val_losses == pytest.approx([val_loss(final)], rel=1e-5)
    assert max_abs_diff(params, before) == 0.0


# ---------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("offset", [2, 3, 5])
def test_resume_mid_cycle_is_bit_identical(tmp_path: Path, offset: int) -> None:
    steps = 8

    def run(n: int, start: int = 0, ckpt: str | None = None) -> tuple:
        module = TinyModule(opt="sgd")
        return fit(n, LookaheadCallback(k=3, alpha=0.5, pullback="pullback"), module, start=start, ckpt=ckpt)

    _, straight, straight_cb = run(steps)
    first, _, _ = run(offset)
    path = str(tmp_path / "part.ckpt")
    first.save_checkpoint(path)
    _, resumed, resumed_cb = run(steps, start=offset, ckpt=path)
    p_straight, p_resumed = list(straight.net.parameters()), list(resumed.net.parameters())
    assert max_abs_diff(p_resumed, p_straight) == 0.0
    assert max_abs_diff(slow_weights(resumed_cb, p_resumed), slow_weights(straight_cb, p_straight)) == 0.0
    state_r, state_s = resumed_cb.wrappers[0].state, straight_cb.wrappers[0].state
    assert [state_r[p]["lookahead_count"] for p in p_resumed] == [state_s[p]["lookahead_count"] for p in p_straight]
    assert resumed_cb.state_dict() == straight_cb.state_dict() == {
        "k": 3, "alpha": 0.5, "pullback": "pullback", "syncs_done": steps // 3
    }


# ---------------------------------------------------------------------------------------- logging
def test_logs_syncs_alpha_and_distance_on_logging_steps_only(monkeypatch: pytest.MonkeyPatch) -> None:
    steps, k, every = 9, 4, 3
    callback = LookaheadCallback(k=k, alpha=0.5, log_distance=True)
    calls = []
    real = callback._distances
    monkeypatch.setattr(callback, "_distances", lambda: calls.append(1) or real())
    logger = Capture()
    fit(steps, callback, logger=logger, log_every_n_steps=every)
    assert sorted(logger.metrics) == [2, 5, 8]
    assert len(calls) == 3
    last = logger.metrics[8]
    net, ref, _ = reference_run(steps, B, k, 0.5)
    distance = sum(float(((a - b).double() ** 2).sum()) for a, b in zip(net.parameters(), slow_of(ref, net))) ** 0.5
    assert distance > 0
    assert last["lookahead/distance"] == pytest.approx(distance, rel=1e-4)
    assert last["lookahead/syncs"] == steps // k
    assert last["lookahead/alpha"] == 0.5
    # No sync yet at step 3: a fixed α is logged as set, like the HF callback (one naming rule for both).
    assert logger.metrics[2]["lookahead/alpha"] == 0.5 and logger.metrics[2]["lookahead/syncs"] == 0


# ---------------------------------------------------------------------------------------- LightningCLI
def test_lightning_cli_yaml_round_trip() -> None:
    from lightning.pytorch.cli import LightningCLI

    cli = LightningCLI(
        TinyModule, run=False, save_config_callback=None, args=["--config", str(ROOT / "configs/cli_lookahead.yaml")]
    )
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, LookaheadCallback)]
    assert (callback.k, callback.alpha, callback.pullback) == (4, 0.6, "pullback")
    assert callback.alpha_bounds == (0.4, 0.9)
    assert callback.optimizer_indices == [0]
    assert (callback.eval_weights, callback.log_distance, callback.log_prefix) == ("fast", True, "la/")
    cli.trainer.fit(cli.model, train_dataloaders=loader(B, 0, 1))
    wrapper = callback.wrappers[0]
    assert (wrapper.k, wrapper.alpha, wrapper.pullback) == (4, 0.6, "pullback")
    assert callback.syncs_done == 6 // 4

    cli = LightningCLI(
        TinyModule,
        run=False,
        save_config_callback=None,
        args=["--config", str(ROOT / "configs/cli_lookahead_adaptive.yaml"), "--trainer.logger=false"],
    )
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, LookaheadCallback)]
    assert (callback.k, callback.alpha, callback.eval_weights, callback.optimizer_indices) == (
        5, "adaptive", "slow", None
    )


# ---------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"k": 0}, "k=0"),
        ({"k": 2.5}, "k=2.5"),
        ({"alpha": 2}, "alpha=2"),
        ({"alpha": "fast"}, "alpha='fast'"),
        ({"eval_weights": "x"}, "eval_weights='x'"),
        ({"pullback": "x"}, "pullback='x'"),
        ({"optimizer_indices": [-1]}, r"optimizer_indices=\[-1\]"),
        ({"optimizer_indices": []}, r"optimizer_indices=\[\]"),
        ({"alpha_bounds": (0.5, 0.0)}, r"alpha_bounds\[1\]=0.0"),
    ],
)
def test_bad_arguments_name_the_value(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LookaheadCallback(**kwargs)


def _strategy_error(strategy: Any, callback: LookaheadCallback | None = None) -> str:
    callback = callback or LookaheadCallback()
    with pytest.raises((RuntimeError, ValueError)) as info:
        callback.setup(SimpleNamespace(strategy=strategy), None, "fit")  # type: ignore[arg-type]
    return str(info.value)


def test_unsupported_strategies_are_refused_with_what_works() -> None:
    # Lightning itself refuses FSDP on CPU at Trainer(...), so the check is called as Trainer.fit calls it.
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    class PipelineStrategy:  # any strategy the callback does not know
        pass

    message = _strategy_error(PipelineStrategy())
    assert "PipelineStrategy" in message
    assert "DDP" in message and "DeepSpeed" in message and "single device" in message and "FSDP" in message
    # FSDP1 with flat parameters (use_orig_params=False) is refused with the fix; FSDP2 is served.
    assert "use_orig_params" in _strategy_error(FSDPStrategy(use_orig_params=False))
    LookaheadCallback().setup(SimpleNamespace(strategy=ModelParallelStrategy()), None, "fit")  # type: ignore[arg-type]


def test_deepspeed_config_with_lookahead_section_and_callback_is_refused() -> None:
    from lookahead_dist.lightning import CPUDeepSpeedStrategy

    strategy = CPUDeepSpeedStrategy(config={"zero_optimization": {"stage": 2}, "lookahead": {"k": 5}})
    assert "'lookahead' section" in _strategy_error(strategy)
    plain = CPUDeepSpeedStrategy(config={"zero_optimization": {"stage": 2}})
    assert "exactly one" in _strategy_error(plain, LookaheadCallback(optimizer_indices=[1]))


def test_optimizer_index_out_of_range_and_double_wrapping_are_refused() -> None:
    with pytest.raises(ValueError, match=r"optimizer_indices=\[3\].*1 optimizer"):
        fit(2, LookaheadCallback(optimizer_indices=[3]))

    class Wrapped(TinyModule):
        def configure_optimizers(self) -> Any:
            return Lookahead(torch.optim.SGD(self.parameters(), lr=0.1))

    with pytest.raises(ValueError, match="already a Lookahead"):
        fit(2, module=Wrapped())


def test_cpu_deepspeed_strategy_registry_and_config_names() -> None:
    from lightning.pytorch.strategies import StrategyRegistry

    from lookahead_dist.lightning import CONFIG_DIR, CPUDeepSpeedStrategy

    assert StrategyRegistry["deepspeed_cpu"]["strategy"] is CPUDeepSpeedStrategy
    assert StrategyRegistry["deepspeed_cpu_stage_3"]["init_params"] == {"stage": 3}
    strategy = CPUDeepSpeedStrategy(config=str(ROOT / "configs" / "zero2.json"))
    assert strategy.config["zero_optimization"]["stage"] == 2
    assert CPUDeepSpeedStrategy(config="zero3").config["zero_optimization"]["stage"] == 3
    assert CPUDeepSpeedStrategy(stage=1).root_device == torch.device("cpu", 0)
    with pytest.raises(FileNotFoundError, match="no_such_config"):
        CPUDeepSpeedStrategy(config="no_such_config")
    assert CONFIG_DIR == ROOT / "configs"


# ---------------------------------------------------------------------------------------- one layer for both callbacks
def test_settings_keyword_and_outer_nodes_refused_with_where_it_works() -> None:
    from lookahead_dist.core.settings import LookaheadConfigError, LookaheadSettings

    callback = LookaheadCallback(settings=LookaheadSettings(k=3, alpha=0.25))
    assert (callback.k, callback.alpha) == (3, 0.25)
    with pytest.raises(TypeError, match=r"LookaheadCallback: pass either settings=\.\.\. or the options \['k'\]"):
        LookaheadCallback(k=3, settings=LookaheadSettings())
    nodes = LookaheadSettings(outer={"scope": "nodes", "momentum": 0.9})  # type: ignore[arg-type]
    with pytest.raises(LookaheadConfigError, match=r"outer.scope='nodes'.*LookaheadDeepSpeedStrategy\(outer=\.\.\.\)"):
        LookaheadCallback(settings=nodes)


@pytest.mark.parametrize(
    "kwargs", [{"eval_weights": "ema"}, {"log_distance": "yes"}, {"log_prefix": None}, {"k": 0}, {"alpha": 2.0}]
)
def test_both_callbacks_give_the_same_error_for_the_same_bad_value(kwargs: dict[str, Any]) -> None:
    pytest.importorskip("transformers")
    from lookahead_dist.transformers import LookaheadTrainerCallback

    errors = []
    for make in (LookaheadCallback, LookaheadTrainerCallback):
        with pytest.raises(ValueError) as info:
            make(**kwargs)
        errors.append((type(info.value), str(info.value).replace(make.__name__, "<callback>")))
    assert errors[0] == errors[1]
