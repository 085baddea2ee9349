"""The event class: ``LookaheadTrainerCallback`` (its options, checkpointed state and Trainer events)."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from ..callback_common import (
    SyncTally,
    check_view_options,
    fast_slow_distance,
    logged_values,
    refuse_outer_nodes,
    settings_from_options,
    slow_weights,
)
from ..core.keys import CONFIG_KEY
from ..core.optim import Lookahead
from ..core.settings import LookaheadConfigError, LookaheadSettings
from .install import WHERE, deepspeed_section, install_deepspeed, install_plain, refuse_unsupported
from .trainer_patches import patch_trainer

__all__ = ["LookaheadTrainerCallback"]


class LookaheadTrainerCallback(TrainerCallback, ExportableState):
    """Wrap the Trainer's optimizer in :class:`~lookahead_dist.Lookahead` when training starts.

    Attach it to its Trainer: ``LookaheadTrainerCallback(k=5).attach(trainer)`` (see the package docstring).

    Args:
        k, alpha, pullback, alpha_bounds, alpha_fallback, pullback_keys, nonfinite, outer: the
            :class:`~lookahead_dist.LookaheadSettings` options (validated there, same messages as everywhere;
            ``outer`` as a mapping of :class:`~lookahead_dist.core.settings.OuterSettings` fields, whose
            ``scope="nodes"`` is refused: it needs node groups before the engine exists).
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
    ``lookahead/alpha_group{i}`` per param group when they differ or are adaptive) and, with
    ``log_distance``, ``lookahead/distance``: the names :mod:`lookahead_dist.callback_common` gives both callbacks.
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
        options = {
            "k": k,
            "alpha": alpha,
            "pullback": pullback,
            "alpha_bounds": alpha_bounds,
            "alpha_fallback": alpha_fallback,
            "pullback_keys": pullback_keys,
            "nonfinite": nonfinite,
            "outer": outer,
        }
        #: The Lookahead options given here (validated now, so a bad value fails before any training).
        self.settings, self._given = settings_from_options(WHERE, options, settings)
        refuse_outer_nodes(WHERE, self.settings)
        check_view_options(WHERE, eval_weights, log_distance, log_prefix)
        self.eval_weights = eval_weights
        self.log_distance = log_distance
        self.log_prefix = log_prefix

        self._tally = SyncTally()
        #: The installed Lookahead (this process), ``None`` before training starts.
        self.lookahead: Lookahead | None = None
        self._engine: Any = None  # the DeepSpeed engine, when installed there
        self._trainer_ref: Callable[[], Trainer | None] = lambda: None
        self._training = False
        self._warned_no_slow = False

    @property
    def syncs_done(self) -> int:
        """Slow-weight syncs done (completed cycles), carried over resumes in trainer_state.json."""
        return self._tally.done

    @syncs_done.setter
    def syncs_done(self, value: int) -> None:  # the Trainer sets it when it rebuilds the callback
        self._tally.done = int(value)

    # ------------------------------------------------------------------ the Trainer
    def attach(self, trainer: Trainer) -> LookaheadTrainerCallback:
        """Add this callback to ``trainer`` and hand it the Trainer; returns the callback.

        Checks what can be checked before training (FSDP refused, a DeepSpeed section together with options
        here refused) and wraps the three Trainer methods of :mod:`.trainer_patches`.
        """
        if not isinstance(trainer, Trainer):
            raise TypeError(f"{WHERE}.attach: expected a transformers.Trainer, got {type(trainer).__name__}.")
        others = [c for c in trainer.callback_handler.callbacks if isinstance(c, type(self)) and c is not self]
        if others:
            raise ValueError(f"{WHERE}.attach: this Trainer already has a {WHERE}; attach one per Trainer.")
        refuse_unsupported(trainer)
        self._resolve_settings(trainer)  # a section + explicit options fails here, not in train()
        self._trainer_ref = weakref.ref(trainer)
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        patch_trainer(trainer, LookaheadTrainerCallback)
        return self

    def bind(self, trainer: Trainer) -> None:
        """Called by the wrapped Trainer methods: a callback the Trainer rebuilt learns its Trainer here."""
        if self._trainer_ref() is None:
            self._trainer_ref = weakref.ref(trainer)

    def _trainer(self) -> Trainer:
        trainer = self._trainer_ref()
        if trainer is None:
            raise RuntimeError(
                f"{WHERE} was not attached to its Trainer, which it needs (for the DeepSpeed engine, evaluation "
                f"on the slow weights and logging). Create the Trainer without it and call "
                f"{WHERE}(...).attach(trainer) instead of passing it in callbacks=[...] or add_callback."
            )
        return trainer

    def after_prepare(self, trainer: Trainer) -> None:
        """Under DeepSpeed, install as soon as the engine exists (before a resume loads its checkpoint)."""
        wrapped = getattr(trainer.accelerator, "deepspeed_engine_wrapped", None)
        if trainer.is_deepspeed_enabled and trainer.is_in_train and wrapped is not None:
            self._install_deepspeed(wrapped.engine)

    # ------------------------------------------------------------------ checkpoint (ExportableState)
    def state(self) -> dict[str, Any]:
        """What ``trainer_state.json`` keeps: the options given here (plain JSON values) and the sync count.

        Settings read from a DeepSpeed ``"lookahead"`` section are not repeated here, so a callback rebuilt
        from this state (``restore_callback_states_from_checkpoint=True``) reads the section again.
        """
        args = dict(self._given)
        args.update(eval_weights=self.eval_weights, log_distance=self.log_distance, log_prefix=self.log_prefix)
        return {"args": args, "attributes": {"syncs_done": self.syncs_done}}

    def _restore_syncs(self, state: TrainerState) -> None:
        stored: Any = state.stateful_callbacks or {}
        saved = stored.get(type(self).__name__) if isinstance(stored, dict) else None
        if isinstance(saved, list):  # several callbacks of this class: HF keeps them in order
            saved = next((s for s in saved if s.get("args") == self.state()["args"]), None)
        if isinstance(saved, dict):  # a resume (or our own state, on a fresh TrainerState)
            self.syncs_done = int(saved.get("attributes", {}).get("syncs_done", self.syncs_done))

    # ------------------------------------------------------------------ events
    def on_init_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._trainer()  # passed in Trainer(callbacks=[...]): say how to attach it

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        trainer = self._trainer()
        refuse_unsupported(trainer)
        if trainer.is_deepspeed_enabled:
            self._install_deepspeed(trainer.model_wrapped)
        else:
            self.lookahead = install_plain(kwargs["optimizer"], self._resolve_settings(trainer), self.lookahead)
        self._tally.start(self._wrappers())
        self._restore_syncs(state)
        self._training = True

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._tally.update(self._wrappers())

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._training = False

    # ------------------------------------------------------------------ installing
    def _wrappers(self) -> dict[int, Lookahead]:
        return {} if self.lookahead is None else {0: self.lookahead}

    def _resolve_settings(self, trainer: Trainer) -> LookaheadSettings:
        section = deepspeed_section(trainer)
        if section is None:
            return self.settings
        if self._given:
            raise LookaheadConfigError(
                f"{WHERE}: the DeepSpeed config has a {CONFIG_KEY!r} section and the callback was given its own "
                f"options {sorted(self._given)}; that is two settings for one Lookahead. Keep the section and "
                f"create the callback without Lookahead options ({WHERE}()), or remove the section from the "
                f"DeepSpeed config."
            )
        from ..deepspeed.config import settings_from_section

        settings = settings_from_section(section)
        refuse_outer_nodes(f"{WHERE} (the DeepSpeed config's {CONFIG_KEY!r} section)", settings)
        return settings

    def _install_deepspeed(self, engine: Any) -> None:
        trainer = self._trainer()
        self.lookahead = install_deepspeed(engine, self._resolve_settings(trainer), self.lookahead)
        self._engine = engine

    # ------------------------------------------------------------------ evaluation and logging
    @contextmanager
    def evaluation_weights(self) -> Iterator[None]:
        """The weights ``eval_weights`` asks for, inside the wrapped ``evaluation_loop``."""
        if self.eval_weights != "slow":
            yield
            return
        if self.lookahead is None:
            if not self._warned_no_slow:
                self._warned_no_slow = True
                warnings.warn(
                    f"{WHERE}: eval_weights='slow' but train() has not run in this Trainer, so there are no slow "
                    f"weights yet and evaluation uses the model's weights. Evaluate after train() (a "
                    f"checkpoint's slow weights are loaded by train(resume_from_checkpoint=...)).",
                    stacklevel=5,
                )
            yield
            return
        with slow_weights(self._engine, [self.lookahead]):
            yield

    def add_log_values(self, logs: dict[str, float]) -> None:
        """Lookahead's values into a training-step log (those carry "loss"; evaluation metrics do not).

        ``Trainer.log`` runs on every rank, so the distance's all-reduce is matched across ranks.
        """
        if not (self._training and "loss" in logs and self.lookahead is not None):
            return
        distances = {0: self._distance()} if self.log_distance else None
        logs.update(logged_values(self.log_prefix, self.syncs_done, self._wrappers(), distances))

    def _distance(self) -> float:
        assert self.lookahead is not None
        if self._engine is None:  # one process and DDP: every replica holds all of θ and φ
            return fast_slow_distance(self.lookahead, sharded=False)
        from ..deepspeed.holders import data_parallel_group, holder_for

        return fast_slow_distance(
            self.lookahead, sharded=holder_for(self._engine).sharded, group=data_parallel_group(self._engine)
        )
