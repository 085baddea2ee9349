"""The three methods of one ``transformers.Trainer`` instance that ``LookaheadTrainerCallback.attach`` wraps.

* ``trainer.log``: Lookahead's values join the training-step logs before ``log_history`` and the
  reporting integrations see them (``on_log`` comes after both);
* ``trainer.evaluation_loop``: evaluation and prediction run on the slow weights (the Trainer has no
  "evaluation starts" event). Both are the methods the Trainer documents for subclasses to override;
* ``trainer.accelerator.prepare``: the DeepSpeed engine is created there, and a resume loads its checkpoint
  right after it returns and before any callback event, so Lookahead is installed on the way out.

Only this instance changes, once (the wrappers are marked). Each wrapper asks the Trainer's callback
handler for the attached callback when it runs, so a callback that the Trainer rebuilt from a checkpoint
(``restore_callback_states_from_checkpoint=True`` replaces the instance) is the one served.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, Protocol

from transformers import Trainer

__all__ = ["TrainerSide", "patch_trainer"]

_MARK = "_lookahead_dist_wrapper"  # set on each wrapper: the methods of a Trainer are wrapped once


class TrainerSide(Protocol):
    """What the wrappers call on the attached callback."""

    def bind(self, trainer: Trainer) -> None: ...
    def add_log_values(self, logs: dict[str, float]) -> None: ...
    def evaluation_weights(self) -> Any: ...
    def after_prepare(self, trainer: Trainer) -> None: ...


def patch_trainer(trainer: Trainer, callback_type: type) -> None:
    """Wrap ``trainer.log``, ``trainer.evaluation_loop`` and ``trainer.accelerator.prepare`` (once)."""
    if getattr(trainer.log, _MARK, False):
        return
    owner = weakref.ref(trainer)

    def attached() -> TrainerSide | None:
        live = owner()
        if live is None:
            return None
        found: Any = next((cb for cb in live.callback_handler.callbacks if isinstance(cb, callback_type)), None)
        if found is not None:
            found.bind(live)
        return found

    original_log = trainer.log
    original_loop = trainer.evaluation_loop
    accelerator = trainer.accelerator
    original_prepare = accelerator.prepare

    def log(logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        callback = attached()
        if callback is not None:
            callback.add_log_values(logs)
        return original_log(logs, *args, **kwargs)

    def evaluation_loop(*args: Any, **kwargs: Any) -> Any:
        callback = attached()
        with callback.evaluation_weights() if callback is not None else nullcontext():
            return original_loop(*args, **kwargs)

    def prepare(*args: Any, **kwargs: Any) -> Any:
        result = original_prepare(*args, **kwargs)
        callback, live = attached(), owner()
        if callback is not None and live is not None:
            callback.after_prepare(live)
        return result

    wrappers: list[tuple[Any, str, Callable[..., Any]]] = [
        (trainer, "log", log),
        (trainer, "evaluation_loop", evaluation_loop),
        (accelerator, "prepare", prepare),
    ]
    for target, name, wrapper in wrappers:
        setattr(wrapper, _MARK, True)
        setattr(target, name, wrapper)
