"""Every entry point builds the same ``LookaheadSettings``: the cases where the three copies of the validation
used to drift apart (issue #11).

* reversed ``alpha_bounds`` is refused by ``Lookahead(...)``, the DeepSpeed ``"lookahead"`` section and
  ``LookaheadCallback(...)`` with one message (the section's names the key path ``lookahead.alpha_bounds``),
  for fixed and adaptive α alike (the callback used to accept it, and then fail or not depending on the engine);
* the callback's ``alpha_fallback`` and ``pullback_keys`` reach the Lookahead it installs, shown by what
  training does (single device, CPU), against tests/reference.py.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

from lookahead_dist import Lookahead, LookaheadConfigError

REVERSED = (1.0, 0.5)


def _message(fn: Any) -> str:
    with pytest.raises(LookaheadConfigError) as info:
        fn()
    return str(info.value)


@pytest.mark.parametrize("alpha", [0.5, "adaptive"])
def test_reversed_alpha_bounds_refused_by_every_entry_point_with_one_message(alpha: Any) -> None:
    ds = pytest.importorskip("lookahead_dist.deepspeed")
    pytest.importorskip("lightning")
    from lookahead_dist import LookaheadCallback

    param = torch.nn.Parameter(torch.zeros(2))
    direct = _message(
        lambda: Lookahead(torch.optim.SGD([param], lr=0.1), k=5, alpha=alpha, alpha_bounds=REVERSED)
    )
    section = {"k": 5, "alpha": alpha, "alpha_bounds": list(REVERSED)}  # JSON has lists
    config = {"train_micro_batch_size_per_gpu": 1, "lookahead": section}
    from_config = _message(lambda: ds.split_config(config))
    callback = _message(lambda: LookaheadCallback(k=5, alpha=alpha, alpha_bounds=REVERSED))

    assert direct == (
        "Lookahead: alpha_bounds=(1.0, 0.5) is invalid; it must be (low, high) with low <= high, e.g. (0.5, 1.0)."
    )
    assert callback == direct
    assert from_config == direct.replace("alpha_bounds=", "lookahead.alpha_bounds=")


def test_reversed_alpha_bounds_in_a_config_file_names_the_file(tmp_path: Any) -> None:
    ds = pytest.importorskip("lookahead_dist.deepspeed")
    path = tmp_path / "ds.json"  # 0.9, not 1.0: hjson (how DeepSpeed reads files) reads 1.0 as the int 1
    path.write_text('{"train_micro_batch_size_per_gpu": 1, "lookahead": {"alpha_bounds": [0.9, 0.5]}}')
    message = _message(lambda: ds.split_config(str(path)))
    assert message.startswith(
        f"DeepSpeed config file {str(path)!r}: Lookahead: lookahead.alpha_bounds=(0.9, 0.5) is invalid"
    )


# ------------------------------------------------------------------ the callback's other options, by behaviour
def _fit(callback: Any, module: Any, steps: int) -> None:
    pl = pytest.importorskip("lightning.pytorch")
    from tests.dist.pl_common import loader

    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(module, train_dataloaders=loader(8, 0, 1))


def test_callback_alpha_fallback_reaches_the_installed_lookahead() -> None:
    pytest.importorskip("lightning")
    from lookahead_dist import LookaheadCallback
    from tests.dist.pl_common import TinyModule

    # lr=0: the fast weights never move, so the adaptive estimate 1 + gᵀd / dᵀAd is 0/0 at every sync and
    # α is the fallback: 0.7 when given, else the lower bound 0.2. Both differ, so a dropped option shows.
    applied = {}
    for fallback in (0.7, None):
        callback = LookaheadCallback(k=2, alpha="adaptive", alpha_bounds=(0.2, 0.9), alpha_fallback=fallback)
        _fit(callback, TinyModule(opt="sgd", lr=0.0), steps=4)
        wrapper = callback.wrappers[0]
        assert wrapper.sync_count == 2
        applied[fallback] = wrapper.last_alpha
    assert applied == {0.7: {0: 0.7}, None: {0: 0.2}}


def test_callback_pullback_keys_reach_the_installed_lookahead(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("lightning")
    import tests.reference
    from lookahead_dist import LookaheadCallback
    from tests.dist.pl_common import TinyModule, reference_run
    from tests.reference import max_abs_diff

    # Adam keeps "exp_avg" and "exp_avg_sq". pullback="pullback" interpolates exp_avg by default; with
    # pullback_keys=["exp_avg_sq"] it must interpolate the second moment instead. The reference loop pulls
    # back the buffers named by its MOMENTUM_KEYS; the two references differ, so a dropped option shows.
    steps, k = 9, 3
    runs = {}
    for keys in (["exp_avg_sq"], None):
        kwargs = {} if keys is None else {"pullback_keys": keys}
        callback = LookaheadCallback(k=k, alpha=0.5, pullback="pullback", **kwargs)
        module = TinyModule(opt="adam", lr=0.05)
        _fit(callback, module, steps)
        assert callback.wrappers[0].pullback_keys == (
            ("exp_avg_sq",) if keys else ("momentum_buffer", "exp_avg")
        )
        runs["custom" if keys else "default"] = list(module.net.parameters())
    default, _, _ = reference_run(steps, 8, k, 0.5, opt="adam", pullback="pullback")
    monkeypatch.setattr(tests.reference, "MOMENTUM_KEYS", ("exp_avg_sq",))
    custom, _, _ = reference_run(steps, 8, k, 0.5, opt="adam", pullback="pullback")
    assert max_abs_diff(list(default.parameters()), list(custom.parameters())) > 1e-3
    assert max_abs_diff(runs["custom"], list(custom.parameters())) < 1e-5
    assert max_abs_diff(runs["default"], list(default.parameters())) < 1e-5
