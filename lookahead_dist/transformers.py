"""``LookaheadTrainerCallback``: Lookahead for ``transformers.Trainer``, one line, no change to the model code.

    from lookahead_dist.transformers import LookaheadTrainerCallback

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[LookaheadTrainerCallback(k=5, alpha=0.5)])
    trainer.train()                       # also trainer.train(resume_from_checkpoint=...)

Where Lookahead goes, decided in ``on_train_begin`` (after the Trainer has built the optimizer, set up
DeepSpeed and loaded a checkpoint's optimizer state):

* one process and DDP: ``trainer.optimizer`` is accelerate's ``AcceleratedOptimizer``; the torch optimizer
  inside it is wrapped in :class:`~lookahead_dist.Lookahead` in place, so the LR scheduler, gradient
  clipping and ``optimizer.pt`` checkpoints keep working unchanged (φ and the cycle counters are in the
  torch optimizer's state);
* DeepSpeed (``TrainingArguments(deepspeed=...)``, ZeRO 0-3, CPU offload): the engine's inner optimizer is
  wrapped by :func:`lookahead_dist.deepspeed.install`: φ sharded like the fp32 master weights, no extra
  collective, φ saved in each rank's ``*_optim_states.pt``;
* FSDP through accelerate and tensor-parallel (DTensor) parameters: refused with an error.

The DeepSpeed config's ``"lookahead"`` section: a callback created without Lookahead options takes its settings
from it; with options too it raises. Without the callback nothing of this package runs inside the Trainer, and
DeepSpeed ignores the unknown key without a word: the section alone does not turn Lookahead on, so always add the
callback (the README says so where it documents the section).

A Trainer callback is handed the model and the optimizer but not the Trainer, and three things need the
Trainer: the DeepSpeed engine (``trainer.model_wrapped``), evaluation on the slow weights (the Trainer has
no "evaluation starts" event, so :meth:`Trainer.evaluation_loop` is wrapped) and logging into the Trainer's
own logs before the reporting integrations see them (:meth:`Trainer.log` is wrapped; both are the methods
the Trainer documents for subclasses to override). The callback finds the Trainer that calls its events
(``on_init_end`` or ``on_train_begin``) on the call stack and wraps those two methods of that instance only.
"""

from __future__ import annotations

import math
import sys
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

import torch

try:
    from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_callback import ExportableState
except ImportError as _error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "lookahead_dist.transformers needs transformers and accelerate: pip install 'lookahead-dist[hf]'"
    ) from _error

from ._versions import check_versions
from .core.keys import CONFIG_KEY, EVAL_WEIGHTS
from .core.optim import Lookahead
from .core.settings import LookaheadConfigError, LookaheadSettings, OuterSettings

__all__ = ["LookaheadTrainerCallback"]

_WRAPPED = "_lookahead_wrapped_by"  # marks the Trainer methods this callback wrapped (idempotence)
SUPPORTED = "one process, DDP (torchrun / accelerate launch) and DeepSpeed ZeRO 0-3 (incl. CPU offload)"


class LookaheadTrainerCallback(TrainerCallback, ExportableState):
    """Wrap the Trainer's optimizer in :class:`~lookahead_dist.Lookahead` when training starts.

    Args:
        k, alpha, pullback, alpha_bounds, alpha_fallback, pullback_keys, nonfinite, outer: the
            :class:`~lookahead_dist.LookaheadSettings` options (validated there, same messages as everywhere;
            ``outer`` as a mapping of :class:`~lookahead_dist.core.settings.OuterSettings` fields).
            Left out (``None``) they take the settings' defaults (``k=5, alpha=0.5``), or, under DeepSpeed,
            the ``"lookahead"`` section of the DeepSpeed config when it has one. Giving any of them (or
            ``settings``) *and* having a section raises: there would be two answers to one question.
        settings: a ready :class:`~lookahead_dist.LookaheadSettings` instead of the keywords above.
        eval_weights: ``"slow"`` (default) runs ``trainer.evaluate()``, evaluation during training and
            ``trainer.predict()`` on the slow weights φ and restores θ bit-exactly afterwards; ``"fast"`` on θ.
        log_distance: also log ‖θ − φ‖ on logging steps (under ZeRO one scalar all-reduce per logging step).
        log_prefix: prefix of the logged names ``syncs``, ``alpha`` and ``distance``.

    ``k`` counts optimizer steps, so ``gradient_accumulation_steps`` micro-batches count once. The logs of the
    Trainer's training steps get ``lookahead/syncs`` (slow-weight syncs so far, carried over a resume through
    ``trainer_state.json``), ``lookahead/alpha`` (the α of the last sync; before it, a fixed α as set; one
    ``lookahead/alpha_group{i}`` per param group when they differ) and, with ``log_distance``,
    ``lookahead/distance``.
    """

    def __init__(
        self,
        k: int | None = None,
        alpha: float | str | None = None,
        pullback: str | None = None,
        alpha_bounds: tuple[float, float] | list[float] | None = None,
        alpha_fallback: float | None = None,
        pullback_keys: list[str] | tuple[str, ...] | None = None,
        nonfinite: str | None = None,
        outer: dict[str, Any] | None = None,
        *,
        settings: LookaheadSettings | None = None,
        eval_weights: str = "slow",
        log_distance: bool = False,
        log_prefix: str = "lookahead/",
    ) -> None:
        given: dict[str, Any] = {
            name: value
            for name, value in (
                ("k", k),
                ("alpha", alpha),
                ("pullback", pullback),
                ("alpha_bounds", tuple(alpha_bounds) if isinstance(alpha_bounds, list) else alpha_bounds),
                ("alpha_fallback", alpha_fallback),
                ("pullback_keys", tuple(pullback_keys) if isinstance(pullback_keys, list) else pullback_keys),
                ("nonfinite", nonfinite),
                ("outer", outer),
            )
            if value is not None
        }
        if settings is not None:
            if given:
                raise TypeError(
                    f"LookaheadTrainerCallback: pass either settings=... or the options {sorted(given)}, not both."
                )
            if not isinstance(settings, LookaheadSettings):
                raise TypeError(
                    f"LookaheadTrainerCallback: settings must be a LookaheadSettings, got {type(settings).__name__}."
                )
            given = settings.to_dict()
        outer_given = given.get("outer")
        if isinstance(outer_given, OuterSettings):  # kept as plain values: trainer_state.json is JSON
            given["outer"] = asdict(outer_given)
        #: The Lookahead options given here (validated now, so a bad value fails before any training).
        self.settings = LookaheadSettings.from_mapping(given, where="LookaheadTrainerCallback")
        self._given = given
        if eval_weights not in EVAL_WEIGHTS:
            raise ValueError(
                f"LookaheadTrainerCallback: eval_weights={eval_weights!r} is unknown; use 'slow' (evaluate the "
                f"slow weights φ) or 'fast' (evaluate the fast weights θ)."
            )
        if not isinstance(log_distance, bool):
            raise TypeError(f"LookaheadTrainerCallback: log_distance={log_distance!r} must be True or False.")
        if not isinstance(log_prefix, str):
            raise TypeError(
                f"LookaheadTrainerCallback: log_prefix={log_prefix!r} must be a string such as 'lookahead/' "
                f"('' for none)."
            )
        self.eval_weights = eval_weights
        self.log_distance = log_distance
        self.log_prefix = log_prefix

        #: Slow-weight syncs done (completed cycles), carried over resumes in trainer_state.json.
        self.syncs_done = 0
        #: The installed Lookahead (this process), ``None`` before training starts.
        self.lookahead: Lookahead | None = None
        self._engine: Any = None  # the DeepSpeed engine, when installed there
        self._trainer_ref: Callable[[], Trainer | None] = lambda: None
        self._seen_sync_count = 0
        self._training = False
        self._warned_no_slow = False

    # ------------------------------------------------------------------ checkpoint (ExportableState)
    def state(self) -> dict[str, Any]:
        """What ``trainer_state.json`` keeps: the options given here (plain JSON values) and the sync count.

        Settings read from a DeepSpeed ``"lookahead"`` section are not repeated here, so a callback rebuilt
        from this state (``restore_callback_states_from_checkpoint=True``) reads the section again.
        """
        args: dict[str, Any] = {
            key: list(value) if isinstance(value, tuple) else value for key, value in self._given.items()
        }
        args.update(eval_weights=self.eval_weights, log_distance=self.log_distance, log_prefix=self.log_prefix)
        return {"args": args, "attributes": {"syncs_done": self.syncs_done}}

    # ------------------------------------------------------------------ the Trainer
    def _bind(self) -> Trainer:
        trainer = self._trainer_ref()
        if trainer is None:
            trainer = _calling_trainer()
            self._trainer_ref = weakref.ref(trainer)
        self._wrap_trainer_methods(trainer)
        return trainer

    def _wrap_trainer_methods(self, trainer: Trainer) -> None:
        if getattr(trainer.log, _WRAPPED, None) is self:
            return
        callback = self
        original_log = trainer.log
        original_loop = trainer.evaluation_loop

        def log(logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
            # Only the Trainer's training-step logs (they carry "loss"), not evaluation metrics or the
            # end-of-training summary; called on every rank, so the distance's all-reduce is matched.
            if callback._training and "loss" in logs:
                logs.update(callback._log_values())
            return original_log(logs, *args, **kwargs)

        def evaluation_loop(*args: Any, **kwargs: Any) -> Any:
            with callback._evaluation_weights():
                return original_loop(*args, **kwargs)

        for wrapper in (log, evaluation_loop):
            setattr(wrapper, _WRAPPED, self)
        trainer.log = log  # type: ignore[method-assign]
        trainer.evaluation_loop = evaluation_loop  # type: ignore[method-assign]

        accelerator = trainer.accelerator
        if trainer.is_deepspeed_enabled and getattr(accelerator.prepare, _WRAPPED, None) is not self:
            original_prepare = accelerator.prepare
            trainer_ref = weakref.ref(trainer)

            def prepare(*args: Any, **kwargs: Any) -> Any:
                # The engine is created here, and a resume loads its checkpoint right after this returns and
                # before on_train_begin: install now so that the load goes through Lookahead (the adapter
                # refuses an install after engine.load_checkpoint).
                result = original_prepare(*args, **kwargs)
                owner = trainer_ref()
                wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)
                if owner is not None and owner.is_in_train and wrapped is not None:
                    callback._install_deepspeed(owner, wrapped.engine)
                return result

            setattr(prepare, _WRAPPED, self)
            accelerator.prepare = prepare  # type: ignore[method-assign]

    # ------------------------------------------------------------------ events
    def on_init_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        trainer = self._bind()
        _refuse_unsupported(trainer)
        self._resolve_settings(trainer)  # a section + explicit options fails at Trainer(...), not later

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        trainer = self._bind()
        _refuse_unsupported(trainer)
        if trainer.is_deepspeed_enabled:
            self._install_deepspeed(trainer, trainer.model_wrapped)
        else:
            self._install_plain(trainer)
        assert self.lookahead is not None
        self._seen_sync_count = self.lookahead.sync_count
        stored: Any = state.stateful_callbacks or {}
        saved = stored.get(type(self).__name__) if isinstance(stored, dict) else None
        if isinstance(saved, list):  # several callbacks of this class: HF keeps them in order
            saved = next((s for s in saved if s.get("args") == self.state()["args"]), None)
        if isinstance(saved, dict):  # a resume (or our own state, on a fresh TrainerState)
            self.syncs_done = int(saved.get("attributes", {}).get("syncs_done", self.syncs_done))
        self._training = True

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # A change of Lookahead.sync_count in this optimizer step is one sync, however many inner step()
        # calls the engine made (ZeRO-1/2 steps each param group separately).
        lookahead = self.lookahead
        if lookahead is not None and lookahead.sync_count != self._seen_sync_count:
            self.syncs_done += 1
            self._seen_sync_count = lookahead.sync_count

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._training = False

    # ------------------------------------------------------------------ installing
    def _resolve_settings(self, trainer: Trainer) -> LookaheadSettings:
        section = _deepspeed_section(trainer)
        if section is None:
            return self.settings
        if self._given:
            raise LookaheadConfigError(
                f"LookaheadTrainerCallback: the DeepSpeed config has a {CONFIG_KEY!r} section and the callback was "
                f"given its own options {sorted(self._given)}; that is two settings for one Lookahead. Keep the "
                f"section and create the callback without Lookahead options (LookaheadTrainerCallback()), or "
                f"remove the section from the DeepSpeed config."
            )
        from .deepspeed.config import settings_from_section

        return settings_from_section(section)

    def _install_deepspeed(self, trainer: Trainer, engine: Any) -> None:
        from .deepspeed import find_lookahead, install

        check_versions("deepspeed")
        if not hasattr(engine, "optimizer") or not hasattr(engine, "zero_optimization_stage"):
            raise RuntimeError(
                f"LookaheadTrainerCallback: DeepSpeed is enabled but trainer.model_wrapped is a "
                f"{type(engine).__name__}, not a DeepSpeed engine; this Trainer set-up is not supported."
            )
        existing = find_lookahead(engine)
        if existing is not None:
            if existing is self.lookahead:  # another train() call on the same engine
                return
            raise ValueError(
                "LookaheadTrainerCallback: the DeepSpeed engine's optimizer is already a Lookahead (installed by "
                "another LookaheadTrainerCallback or lookahead_dist.deepspeed.install); remove one of them."
            )
        try:
            self.lookahead = install(engine, settings=self._resolve_settings(trainer))
        except RuntimeError as error:
            if getattr(engine, "loaded_checkpoint_dp_world_size", None) is None:
                raise
            raise RuntimeError(
                "LookaheadTrainerCallback: the Trainer loaded the DeepSpeed checkpoint before the callback could "
                "install Lookahead (was it added with trainer.add_callback after the Trainer was created?). Pass "
                "it as Trainer(..., callbacks=[LookaheadTrainerCallback(...)]): it then installs right after "
                "DeepSpeed is set up, before the checkpoint is loaded."
            ) from error
        self._engine = engine

    def _install_plain(self, trainer: Trainer) -> None:
        from accelerate.optimizer import AcceleratedOptimizer

        holder = trainer.optimizer
        if not isinstance(holder, AcceleratedOptimizer):
            raise RuntimeError(  # noqa: TRY004 - a Trainer set-up the callback cannot serve, not a bad argument
                f"LookaheadTrainerCallback: trainer.optimizer is a {type(holder).__name__}, not accelerate's "
                f"AcceleratedOptimizer; this Trainer set-up is not supported (it works with {SUPPORTED})."
            )
        # A later train() call prepares the already prepared optimizer again: wrappers nest.
        while isinstance(holder.optimizer, AcceleratedOptimizer):
            holder = holder.optimizer
        inner = holder.optimizer
        if isinstance(inner, Lookahead):
            if inner is self.lookahead:  # another train() call: keep the state, counters and φ
                return
            raise ValueError(
                "LookaheadTrainerCallback: the Trainer's optimizer is already a Lookahead (e.g. passed through "
                "Trainer(optimizers=(Lookahead(...), scheduler))); remove the callback or that Lookahead."
            )
        _refuse_dtensors(inner)
        # A resume has already loaded optimizer.pt into `inner`: φ and the counters are picked up as they are.
        self.lookahead = wrap_accelerated(holder, self._resolve_settings(trainer))

    # ------------------------------------------------------------------ evaluation on slow weights
    @contextmanager
    def _evaluation_weights(self) -> Iterator[None]:
        if self.eval_weights != "slow":
            yield
            return
        if self.lookahead is None:
            if not self._warned_no_slow:
                self._warned_no_slow = True
                warnings.warn(
                    "LookaheadTrainerCallback: eval_weights='slow' but train() has not run in this Trainer, so "
                    "there are no slow weights yet and evaluation uses the model's weights. Evaluate after "
                    "train() (a checkpoint's slow weights are loaded by train(resume_from_checkpoint=...)).",
                    stacklevel=4,
                )
            yield
            return
        if self._engine is not None:
            from .deepspeed import use_slow_weights

            with use_slow_weights(self._engine):
                yield
        else:
            with self.lookahead.use_slow_weights():
                yield

    # ------------------------------------------------------------------ logging
    def _log_values(self) -> dict[str, float]:
        lookahead = self.lookahead
        if lookahead is None:
            return {}
        prefix = self.log_prefix
        values: dict[str, float] = {f"{prefix}syncs": float(self.syncs_done)}
        groups = lookahead.param_groups
        last = lookahead.last_alpha
        alphas: dict[int, float] = {}
        for gi, group in enumerate(groups):
            if gi in last:
                alphas[gi] = float(last[gi])
            else:
                spec = group.get("lookahead_alpha", lookahead.alpha)
                if spec != "adaptive":
                    alphas[gi] = float(spec)
        if len(set(alphas.values())) == 1 and (len(alphas) == len(groups) or len(groups) == 1):
            values[f"{prefix}alpha"] = next(iter(alphas.values()))
        else:
            for gi, alpha in sorted(alphas.items()):
                values[f"{prefix}alpha_group{gi}"] = alpha
        if self.log_distance:
            values[f"{prefix}distance"] = self._distance()
        return values

    def _distance(self) -> float:
        """‖θ − φ‖; under ZeRO the local shard sums are summed over the data-parallel group (one scalar)."""
        assert self.lookahead is not None
        partial = self.lookahead.fast_slow_distance_sq()
        if self._engine is not None and self._engine.zero_optimization_stage() > 0:
            from .deepspeed.holders import dp_all_reduce

            dp_all_reduce(self._engine)(partial)
        # One process and DDP: every replica holds all of θ and φ, the local sum is the total.
        return math.sqrt(max(float(partial), 0.0))


# ---------------------------------------------------------------------------------------- helpers
def wrap_accelerated(holder: Any, settings: LookaheadSettings) -> Lookahead:
    """Replace the torch optimizer inside accelerate's ``AcceleratedOptimizer`` by ``Lookahead`` of it, in place.

    Everything holding the ``AcceleratedOptimizer`` (the Trainer, its LR scheduler) keeps working: its
    ``param_groups``/``state``/``state_dict`` now reach the inner optimizer through Lookahead.
    """
    lookahead = Lookahead(holder.optimizer, settings=settings)
    holder.optimizer = lookahead
    if getattr(holder, "scaler", None) is not None:
        # fp16 with a GradScaler: around scaler.step accelerate swaps in a patched copy of the optimizer's step
        # (to see whether the step ran); those copies were made from the torch optimizer's step and would
        # bypass Lookahead, so make them again from Lookahead's.
        from accelerate.optimizer import patch_optimizer_step

        holder._optimizer_original_step_method = lookahead.step
        holder._optimizer_patched_step_method = patch_optimizer_step(holder, lookahead.step)
    return lookahead


def _calling_trainer() -> Trainer:
    """The ``transformers.Trainer`` (or subclass) whose method is running this callback event."""
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back  # type: ignore[assignment]
    raise RuntimeError(
        "LookaheadTrainerCallback: no transformers.Trainer is calling this callback; add it with "
        "Trainer(..., callbacks=[LookaheadTrainerCallback(...)]) or trainer.add_callback(...)."
    )


def _deepspeed_section(trainer: Trainer) -> Any:
    if not trainer.is_deepspeed_enabled:
        return None
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    config = getattr(plugin, "deepspeed_config", None) or {}
    return config.get(CONFIG_KEY)


def _refuse_unsupported(trainer: Trainer) -> None:
    if getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_fsdp_xla_enabled", False):
        raise RuntimeError(
            "LookaheadTrainerCallback does not support FSDP (TrainingArguments(fsdp=...) / accelerate's FSDP "
            f"plugin) yet; it works with {SUPPORTED}. For sharded training use DeepSpeed ZeRO-3: "
            "TrainingArguments(deepspeed='configs/hf/zero3.json')."
        )


def _refuse_dtensors(optimizer: torch.optim.Optimizer) -> None:
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for group in optimizer.param_groups for p in group["params"]):
        raise RuntimeError(
            "LookaheadTrainerCallback: the model's parameters are DTensors (tensor parallelism or FSDP2), which "
            f"this callback does not support yet; it works with {SUPPORTED}."
        )
