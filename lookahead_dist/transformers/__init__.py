"""``LookaheadTrainerCallback``: Lookahead for ``transformers.Trainer``, one line, no change to the model code.

    from lookahead_dist.transformers import LookaheadTrainerCallback

    trainer = Trainer(model=model, args=args, train_dataset=ds)
    LookaheadTrainerCallback(k=5, alpha=0.5).attach(trainer)
    trainer.train()                       # also trainer.train(resume_from_checkpoint=...)

Where Lookahead goes (:mod:`.install`), decided when training starts, after the Trainer has built the
optimizer and set up DeepSpeed:

* one process and DDP: ``trainer.optimizer`` is accelerate's ``AcceleratedOptimizer``; the torch optimizer
  inside it is wrapped in :class:`~lookahead_dist.Lookahead` in place, so the LR scheduler, gradient
  clipping and ``optimizer.pt`` checkpoints keep working unchanged (φ and the cycle counters are in the
  torch optimizer's state);
* DeepSpeed (``TrainingArguments(deepspeed=...)``, ZeRO 0-3, CPU offload): the engine's inner optimizer is
  wrapped by :func:`lookahead_dist.deepspeed.install` as soon as the engine exists, before a resume loads
  its checkpoint: φ sharded like the fp32 master weights, no extra collective, φ in each rank's
  ``*_optim_states.pt``;
* FSDP through accelerate and tensor-parallel (DTensor) parameters: refused with an error.

Why ``attach(trainer)`` and not ``Trainer(callbacks=[...])``: a Trainer callback is handed the model and the
optimizer but never the Trainer, and three things need it (:mod:`.trainer_patches`): the DeepSpeed engine,
which must get Lookahead between its creation in ``accelerator.prepare`` and the checkpoint load that follows;
evaluation on the slow weights (the Trainer has no "evaluation starts" event, so ``Trainer.evaluation_loop``
is wrapped); and logging into the Trainer's own logs before the reporting integrations see them
(``Trainer.log`` is wrapped). ``attach`` is the one place the Trainer is handed over; a callback given only
through ``callbacks=[...]`` raises an error that says so.

The DeepSpeed config's ``"lookahead"`` section: a callback created without Lookahead options takes its settings
from it; with options too it raises. Without the callback nothing of this package runs inside the Trainer, and
DeepSpeed ignores the unknown key without a word: the section alone does not turn Lookahead on.
"""

from __future__ import annotations

try:
    import transformers  # noqa: F401 - the import error below names the extra to install
except ImportError as _error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "lookahead_dist.transformers needs transformers and accelerate: pip install 'lookahead-dist[hf]'"
    ) from _error

from .callback import LookaheadTrainerCallback
from .install import wrap_accelerated

__all__ = ["LookaheadTrainerCallback", "wrap_accelerated"]
