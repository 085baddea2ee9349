"""``LookaheadCallback``: Lookahead for any LightningModule, without touching ``configure_optimizers``.

    Trainer(callbacks=[LookaheadCallback(k=5, alpha=0.5)], strategy="ddp")

or in a LightningCLI YAML::

    trainer:
      callbacks:
        - class_path: lookahead_dist.callbacks.LookaheadCallback
          init_args: {k: 5, alpha: 0.5}
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    SingleDeviceXLAStrategy,
    XLAStrategy,
)
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lookahead_dist._versions import check_versions
from lookahead_dist.callback_common import (
    SyncTally,
    check_view_options,
    fast_slow_distance,
    logged_values,
    refuse_outer_nodes,
    settings_from_options,
    slow_weights,
)
from lookahead_dist.core.keys import CONFIG_KEY
from lookahead_dist.core.optim import Lookahead
from lookahead_dist.core.settings import LookaheadConfigError, LookaheadSettings
from lookahead_dist.lightning.private import is_logging_step

__all__ = ["LookaheadCallback"]

WHERE = "LookaheadCallback"
SUPPORTED = (
    "single device, DDP (ddp, ddp_spawn, ddp_fork, multi-node), DeepSpeed (ZeRO 0-3, incl. CPUDeepSpeedStrategy), "
    "ModelParallelStrategy (FSDP2) and FSDPStrategy (use_orig_params=True, incl. CPUFSDPStrategy)"
)
#: Strategies whose optimizer steps this rank's shard of each parameter (φ is sharded the same way).
_SHARDED = (FSDPStrategy, ModelParallelStrategy)


class LookaheadCallback(Callback):
    """Wrap the LightningModule's optimizer(s) in :class:`~lookahead_dist.Lookahead` when fitting starts.

    Args:
        k: inner optimizer steps per cycle (optimizer steps, so ``accumulate_grad_batches`` batches count once).
        alpha: slow-weights step size in (0, 1], or ``"adaptive"``.
        pullback: ``"none"`` | ``"reset"`` | ``"pullback"`` (what happens to the inner optimizer's momentum at a sync).
        alpha_bounds: ``[low, high]`` clip for ``alpha="adaptive"``.
        alpha_fallback: α of ``alpha="adaptive"`` when its estimate is undefined (default ``alpha_bounds[0]``).
        pullback_keys: optimizer-state buffers interpolated by ``pullback="pullback"``.
        nonfinite: ``"skip"`` or ``"raise"``: what a sync does when the fast weights are not finite.
            These seven are :class:`~lookahead_dist.LookaheadSettings`, checked there; left out (``None``)
            they take its defaults (``k=5, alpha=0.5``).
        settings: a ready :class:`~lookahead_dist.LookaheadSettings` instead of those seven. Its
            ``outer.scope="nodes"`` is refused (it needs node groups before the engine exists; it works
            with ``LookaheadDeepSpeedStrategy(outer=...)``).
        optimizer_indices: which of ``configure_optimizers``' optimizers to wrap; ``None`` wraps all.
            DeepSpeed has exactly one optimizer.
        eval_weights: ``"slow"`` runs validation/test/predict on the slow weights φ, ``"fast"`` on θ.
        log_distance: also log ‖θ − φ‖ on logging steps (``Trainer(log_every_n_steps=...)``).
        log_prefix: prefix of the logged names (``syncs``, ``alpha``, ``distance``): the names
            :mod:`lookahead_dist.callback_common` gives both callbacks (``alpha_group{g}`` per param group
            when the groups' α differ or are adaptive, ``_opt{i}`` per optimizer when several are wrapped).

    Strategies: single device, DDP (all launchers, several nodes), DeepSpeed ZeRO 0-3 (the engine's inner
    optimizer is wrapped, so φ is sharded like the fp32 master weights and the sync adds no collective).
    ModelParallelStrategy (FSDP2 applied in ``configure_model``; φ is a DTensor shard like the parameter) and
    FSDPStrategy (FSDP1 with ``use_orig_params=True``; φ is this rank's slice of each parameter): the sync and
    the slow-weight swap work on the local shards, no collective. Anything else (XLA, FSDP1 with
    ``use_orig_params=False``) raises an error in ``setup``.

    Costs. Training: one extra copy of the weights the inner optimizer steps (φ; under ZeRO only this
    rank's shard), a fused lerp + copy every ``k`` steps, no communication. Evaluation on slow weights:
    a copy of θ is kept while φ is swapped in and θ is restored bit-exactly afterwards, so training after
    a validation run is bit-identical to training without it; under ZeRO-3 swapping φ into the partitioned
    parameters may cost one parameter gather per evaluation run (not per batch). ``log_distance``: local
    partial sums of ‖θ − φ‖², plus one scalar all_reduce under ZeRO (shards) on logging steps only.

    Checkpoints: φ and the per-tensor cycle counters live in the optimizer state (per rank under ZeRO), so
    ``trainer.fit(ckpt_path=...)`` resumes mid-cycle exactly. The callback's own state is only what every
    rank shares: ``k``, ``alpha``, ``pullback`` and the number of syncs done.
    """

    def __init__(
        self,
        k: int | None = None,
        alpha: float | Literal["adaptive"] | None = None,
        pullback: str | None = None,
        alpha_bounds: tuple[float, float] | None = None,
        alpha_fallback: float | None = None,
        pullback_keys: list[str] | None = None,
        nonfinite: str | None = None,
        optimizer_indices: list[int] | None = None,
        eval_weights: str = "slow",
        log_distance: bool = False,
        log_prefix: str = "lookahead/",
        *,
        settings: LookaheadSettings | None = None,
    ) -> None:
        super().__init__()
        check_versions("lightning")
        options = {
            "k": k,
            "alpha": alpha,
            "pullback": pullback,
            "alpha_bounds": alpha_bounds,
            "alpha_fallback": alpha_fallback,
            "pullback_keys": pullback_keys,
            "nonfinite": nonfinite,
        }
        #: Every Lookahead option, validated once (the same checks and messages as ``Lookahead``, the
        #: DeepSpeed config section and the HF callback).
        self.settings, _ = settings_from_options(WHERE, options, settings)
        refuse_outer_nodes(WHERE, self.settings)
        self.optimizer_indices = _checked_indices(optimizer_indices)
        check_view_options(WHERE, eval_weights, log_distance, log_prefix)
        self.eval_weights = eval_weights
        self.log_distance = log_distance
        self.log_prefix = log_prefix

        self._tally = SyncTally()
        #: optimizer index -> installed wrapper (this process).
        self.wrappers: dict[int, Lookahead] = {}
        self._engine: Any = None  # the DeepSpeed engine, when installed there
        self._sharded = False  # FSDP / ModelParallel: each rank steps its own shard
        self._eval_stack: ExitStack | None = None
        #: (module, name -> φ, ZeRO-3) read by on_load_checkpoint outside fit, for evaluation.
        self._restored_slow: tuple[pl.LightningModule, dict[str, torch.Tensor], bool] | None = None

    @property
    def syncs_done(self) -> int:
        """Slow-weight syncs done (one per wrapped optimizer per sync), persisted in checkpoints."""
        return self._tally.done

    @syncs_done.setter
    def syncs_done(self, value: int) -> None:
        self._tally.done = int(value)

    k = property(lambda self: self.settings.k)
    alpha = property(lambda self: self.settings.alpha)
    pullback = property(lambda self: self.settings.pullback)
    alpha_bounds = property(lambda self: self.settings.alpha_bounds)

    # ------------------------------------------------------------------ set-up
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        if isinstance(strategy, (XLAStrategy, SingleDeviceXLAStrategy)) or not isinstance(
            strategy, (SingleDeviceStrategy, DDPStrategy, *_SHARDED)
        ):
            raise RuntimeError(  # noqa: TRY004 - a configuration the callback cannot serve, not a bad argument type
                f"LookaheadCallback does not support the {type(strategy).__name__} strategy; it works with "
                f"{SUPPORTED}."
            )
        if isinstance(strategy, FSDPStrategy) and not strategy.kwargs.get("use_orig_params", False):
            raise ValueError(
                "LookaheadCallback: FSDPStrategy(use_orig_params=False) steps FSDP's flat parameters, whose "
                "checkpoint layout the callback does not support; use FSDPStrategy(use_orig_params=True) "
                "(Lightning's default) or ModelParallelStrategy (FSDP2)."
            )
        if isinstance(strategy, DeepSpeedStrategy):
            config = strategy.config or {}
            if CONFIG_KEY in config:
                raise ValueError(
                    "LookaheadCallback: the DeepSpeed config already has a 'lookahead' section (CPUDeepSpeedStrategy "
                    "and lookahead_dist.deepspeed.initialize install Lookahead from it), so Lookahead would be "
                    "installed twice. Remove the 'lookahead' section from the config or remove the callback."
                )
            if self.optimizer_indices not in (None, [0]):
                raise ValueError(
                    f"LookaheadCallback: optimizer_indices={self.optimizer_indices} but DeepSpeed has exactly one "
                    f"optimizer; use None or [0]."
                )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        strategy = trainer.strategy
        if isinstance(strategy, DeepSpeedStrategy):
            self._install_deepspeed(strategy)
        else:
            self._sharded = isinstance(strategy, _SHARDED)
            self._install_plain(trainer)
        self._tally.start(self.wrappers)

    def _install_deepspeed(self, strategy: DeepSpeedStrategy) -> None:
        from lookahead_dist.deepspeed import find_lookahead, install

        engine = strategy.deepspeed_engine
        existing = find_lookahead(engine)
        if existing is not None:
            if self.wrappers.get(0) is existing:  # a second fit() with the same trainer
                return
            raise ValueError(
                "LookaheadCallback: the DeepSpeed engine's optimizer is already a Lookahead (installed by "
                "lookahead_dist.deepspeed.install/initialize or a 'lookahead' config section); remove one of them."
            )
        self.wrappers = {0: install(engine, settings=self.settings)}
        self._engine = engine

    def _install_plain(self, trainer: pl.Trainer) -> None:
        optimizers = list(trainer.strategy.optimizers)
        if not optimizers:
            raise RuntimeError(
                "LookaheadCallback: the LightningModule has no optimizer (configure_optimizers returned None); "
                "remove the callback or return an optimizer."
            )
        indices = self.optimizer_indices if self.optimizer_indices is not None else range(len(optimizers))
        out_of_range = [i for i in indices if i >= len(optimizers)]
        if out_of_range:
            raise ValueError(
                f"LookaheadCallback: optimizer_indices={self.optimizer_indices} but configure_optimizers returned "
                f"{len(optimizers)} optimizer(s); use indices in 0..{len(optimizers) - 1}."
            )
        for i in indices:
            opt = optimizers[i]
            if isinstance(opt, Lookahead):
                if self.wrappers.get(i) is opt:  # a second fit() with the same trainer
                    continue
                raise ValueError(
                    f"LookaheadCallback: optimizer {i} is already a Lookahead; remove the callback or the "
                    f"Lookahead in configure_optimizers."
                )
            # LR schedulers keep pointing at the inner optimizer; its param_groups are the wrapper's.
            if self._sharded:
                from lookahead_dist.fsdp import wrap

                # wrap() adds the reduce_fn that sums adaptive α's local partial sums over the shards.
                self.wrappers[i] = wrap(opt, settings=self.settings)
            else:
                self.wrappers[i] = Lookahead(opt, settings=self.settings)
            optimizers[i] = self.wrappers[i]
        # The setter rebuilds the LightningOptimizers that training_step / optimizer_step use.
        trainer.strategy.optimizers = optimizers

    # ------------------------------------------------------------------ evaluation on slow weights
    def _enter_eval(self) -> None:
        if self.eval_weights != "slow" or self._eval_stack is not None:
            return
        if not self.wrappers:
            restored = self._restored_slow
            if restored is not None:
                # validate/test/predict(ckpt_path=...): φ read from the checkpoint's optimizer state
                stack = ExitStack()
                stack.enter_context(_SwappedIn(*restored))
                self._eval_stack = stack
                return
            # e.g. trainer.test() in a new Trainer without ckpt_path, or a checkpoint without slow weights.
            rank_zero_warn(
                "LookaheadCallback: eval_weights='slow' but Lookahead was not installed in this Trainer "
                "(no fit ran) and no checkpoint with slow weights was loaded, so evaluation uses the model's "
                "(fast) weights. Pass ckpt_path= (a checkpoint saved with LookaheadCallback) or evaluate after fit."
            )
            return
        stack = ExitStack()
        stack.enter_context(slow_weights(self._engine, self.wrappers.values()))
        self._eval_stack = stack

    def _exit_eval(self) -> None:
        stack, self._eval_stack = self._eval_stack, None
        if stack is not None:
            stack.close()

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._enter_eval()

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._exit_eval()

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._enter_eval()

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._exit_eval()

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._enter_eval()

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._exit_eval()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._exit_eval()

    # ------------------------------------------------------------------ slow weights from a checkpoint
    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Outside fit, read φ from the checkpoint so that validate/test/predict(ckpt_path=...) can use it.

        Lightning restores optimizer state only when fitting; a Lightning ``.ckpt`` (single device, DDP)
        still holds it under ``optimizer_states``, a DeepSpeed checkpoint folder in its per-rank optimizer
        files (consolidated here into one state dict, as ``slow-weights`` does).
        """
        self._restored_slow = None
        if trainer.state.fn == "fit" or self.eval_weights != "slow":
            return
        if isinstance(trainer.strategy, DeepSpeedStrategy):
            slow = _slow_from_deepspeed(trainer.ckpt_path, pl_module)
        else:
            slow = _slow_from_lightning(checkpoint, pl_module, self.optimizer_indices)
        if isinstance(slow, str):
            rank_zero_warn(f"LookaheadCallback: {slow}; evaluation uses the checkpoint's (fast) weights.")
            return
        zero3 = isinstance(trainer.strategy, DeepSpeedStrategy) and trainer.strategy.zero_stage_3
        self._restored_slow = (pl_module, slow, zero3)

    # ------------------------------------------------------------------ logging
    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._tally.update(self.wrappers)
        if not trainer.loggers:
            return
        distances = self._distances() if self.log_distance and is_logging_step(trainer) else None
        for name, value in logged_values(self.log_prefix, self.syncs_done, self.wrappers, distances).items():
            pl_module.log(name, value, on_step=True, on_epoch=False, batch_size=1)

    def _distances(self) -> dict[int, float]:
        """‖θ − φ‖ per wrapped optimizer; shards (ZeRO, FSDP) add one scalar all_reduce each."""
        if self._engine is not None:
            from lookahead_dist.deepspeed.holders import data_parallel_group, holder_for

            sharded, group = holder_for(self._engine).sharded, data_parallel_group(self._engine)
        else:  # FSDP / ModelParallel shard over the world; DDP replicas hold all of θ and φ
            sharded, group = self._sharded, None
        return {i: fast_slow_distance(w, sharded, group) for i, w in self.wrappers.items()}

    # ------------------------------------------------------------------ checkpoint (rank-independent state)
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"k": self.k, "alpha": self.alpha, "pullback": self.pullback, "syncs_done": self.syncs_done}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.syncs_done = int(state_dict.get("syncs_done", 0))
        saved = {key: state_dict.get(key) for key in ("k", "alpha", "pullback")}
        now = {"k": self.k, "alpha": self.alpha, "pullback": self.pullback}
        if saved != now:
            rank_zero_warn(
                f"LookaheadCallback: the checkpoint was trained with {saved}, this run uses {now}; "
                f"the new settings apply from the resumed step on."
            )


# ---------------------------------------------------------------------- slow weights of a saved checkpoint
def _checked_indices(optimizer_indices: Any) -> list[int] | None:
    if optimizer_indices is None:
        return None
    if not isinstance(optimizer_indices, (list, tuple)):
        raise LookaheadConfigError(
            f"{WHERE}: optimizer_indices={optimizer_indices!r} is invalid; give a list of optimizer positions in "
            f"configure_optimizers' output, e.g. [0], or None for all."
        )
    bad = [i for i in optimizer_indices if isinstance(i, bool) or not isinstance(i, int) or i < 0]
    if bad or not optimizer_indices:
        raise LookaheadConfigError(
            f"{WHERE}: optimizer_indices={optimizer_indices!r} is invalid; give a non-empty list of optimizer "
            f"positions in configure_optimizers' output, e.g. [0], or None for all."
        )
    return sorted(set(optimizer_indices))


def _slow_from_lightning(
    checkpoint: dict[str, Any], pl_module: pl.LightningModule, indices: list[int] | None
) -> dict[str, torch.Tensor] | str:
    """Module parameter name -> φ from a Lightning checkpoint dict, or why there is none.

    The optimizer's parameters are matched to the module's parameters (definition order, what
    ``self.parameters()`` gives ``configure_optimizers``) by the one rule of
    :func:`lookahead_dist.lightning.checkpoint.slow_by_name`, which the ``slow-weights`` tool uses too.
    """
    from lookahead_dist.lightning.checkpoint import slow_by_name

    states = checkpoint.get("optimizer_states") or []
    chosen = indices if indices is not None else list(range(len(states)))
    if states and (len(chosen) != 1 or chosen[0] >= len(states)):
        return f"slow weights are read for exactly one optimizer; the checkpoint has {len(states)}"
    candidates = [(name, tuple(p.shape)) for name, p in pl_module.named_parameters()]
    try:
        return slow_by_name(checkpoint, candidates, optimizer_index=chosen[0] if states else 0)
    except ValueError as err:
        return str(err)


def _slow_from_deepspeed(ckpt_path: Any, pl_module: pl.LightningModule) -> dict[str, torch.Tensor] | str:
    if ckpt_path is None:
        return "no checkpoint path"
    from lookahead_dist.deepspeed.checkpoint import consolidated_slow_state_dict

    try:
        full = consolidated_slow_state_dict(ckpt_path)
    except (ValueError, FileNotFoundError) as err:
        return str(err)
    names = {name for name, _ in pl_module.named_parameters()}
    slow: dict[str, torch.Tensor] = {}
    for key, value in full.items():
        # The engine's module wraps the LightningModule: strip the wrapper's prefixes.
        name = key
        for prefix in ("_forward_module.", "module."):
            name = name.removeprefix(prefix)
        if name in names:
            slow[name] = value
    if not slow:
        return f"no slow weight in {ckpt_path} matches a parameter name of {type(pl_module).__name__}"
    return slow


class _SwappedIn:
    """Copy φ into the parameters on enter and θ back, bit-exactly, on exit (ZeRO-3: gathered first)."""

    def __init__(self, pl_module: pl.LightningModule, slow: dict[str, torch.Tensor], zero3: bool) -> None:
        self.params = {name: p for name, p in pl_module.named_parameters() if name in slow}
        self.slow, self.zero3 = slow, zero3
        self.fast: dict[str, torch.Tensor] = {}

    def _copy(self, values: dict[str, torch.Tensor], keep: bool) -> None:
        params = list(self.params.values())
        if self.zero3:
            import deepspeed

            context: Any = deepspeed.zero.GatheredParameters(params, modifier_rank=0)
        else:
            from contextlib import nullcontext

            context = nullcontext()
        with context, torch.no_grad():
            for name, p in self.params.items():
                if keep:
                    self.fast[name] = p.detach().clone()
                p.copy_(values[name].to(device=p.device, dtype=p.dtype))

    def __enter__(self) -> None:
        self._copy(self.slow, keep=True)

    def __exit__(self, *exc: object) -> None:
        self._copy(self.fast, keep=False)
        self.fast = {}
