"""Launched by tests/test_hf.py: ``python -m tests.dist.hf_cases OUT MODE[,MODE...]`` with MODE single, or
ddp | zero2 | zero3 under ``torchrun --nproc_per_node 2`` (several modes run one after the other in one launch). Runs, in this process group, several ``transformers.Trainer`` trainings of
tests/dist/hf_common.py's model with ``LookaheadTrainerCallback`` and writes ``OUT/MODE_rank{r}.pt``:

* ``full``   STEPS steps, a checkpoint at SAVE_AT (mid-cycle); θ, φ, cycle counters, logs, collectives per step;
* ``resume`` a new model and Trainer, ``train(resume_from_checkpoint=<full's checkpoint>)`` to STEPS;
* ``eval``   like ``full`` with evaluation every 2 steps, then ``trainer.evaluate()`` (slow weights);
* ``gas``    (not zero3) the same global batch as 2 accumulated micro-batches per optimizer step;
* ``plain``  (ZeRO modes) no callback: the collectives per step without Lookahead;
* ``again``  (single, ddp) ``trainer.train()`` twice on the same Trainer;
* ``section``, ``conflict`` (zero2) the DeepSpeed config's "lookahead" section, without and with callback options.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from tests.helpers import CollectiveLog

warnings.filterwarnings("ignore")

REPO = Path(__file__).resolve().parents[2]
MODES = sys.argv[2].split(",")
MODE = MODES[0]  # the mode being run (set by main)
LOG = CollectiveLog()
LOG.install(torch.distributed)  # before DeepSpeed is imported: it keeps references to these functions
if any(mode.startswith("zero") for mode in MODES):
    import deepspeed.comm

    LOG.install(deepspeed.comm, prefix="ds.")

from transformers import Trainer, TrainerCallback, TrainingArguments

from lookahead_dist.core.keys import COUNT_KEY, SLOW_KEY
from lookahead_dist.core.settings import LookaheadConfigError
from lookahead_dist.transformers import LookaheadTrainerCallback
from tests.dist.hf_common import (
    ALPHA,
    LR,
    N_TRAIN,
    SAVE_AT,
    SECTION,
    STEPS,
    WD,
    K,
    eval_set,
    make_model,
    train_set,
)  # fmt: skip

OUT = Path(sys.argv[1])
WORLD = int(os.environ.get("WORLD_SIZE", "1"))
RANK = int(os.environ.get("RANK", "0"))


COMM: list[list[tuple[str, int]]] = []  # per optimizer step of the current run


class StepCollectives(TrainerCallback):
    """Records the collectives issued between the start and the end of each optimizer step."""

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.start = len(LOG.calls)
        LOG.active = True

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        LOG.active = False
        COMM.append(LOG.calls[self.start :])
        del LOG.calls[self.start :]


def ds_config(stage: int, section: dict | None = None) -> dict:
    config = json.loads((REPO / "configs" / "hf" / f"zero{stage}.json").read_text())
    if stage == 3:
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition every tensor
    if section is not None:
        config["lookahead"] = section
    return config


def make_args(name: str, *, ds: dict | None = None, **overrides: Any) -> TrainingArguments:
    values: dict[str, Any] = {
        "output_dir": str(OUT / MODE / name), "max_steps": STEPS, "per_device_train_batch_size": N_TRAIN // WORLD,
        "per_device_eval_batch_size": N_TRAIN // WORLD, "learning_rate": LR, "weight_decay": WD,
        "lr_scheduler_type": "constant", "warmup_steps": 0, "max_grad_norm": 0.0, "optim": "adamw_torch",
        "train_sampling_strategy": "sequential", "logging_steps": 1, "save_strategy": "no", "report_to": [],
        "use_cpu": True, "seed": 0, "disable_tqdm": True, "dataloader_num_workers": 0, "deepspeed": ds,
    }  # fmt: skip
    values.update(overrides)
    return TrainingArguments(**values)


def default_ds() -> dict | None:
    return ds_config(int(MODE[-1])) if MODE.startswith("zero") else None


def gathered(trainer: Trainer, engine: Any, slow: bool) -> list[torch.Tensor]:
    """Full θ (fp32 masters under DeepSpeed) or, with ``slow``, full φ as the model computes with it."""
    params = list(trainer.model.parameters())
    if engine is None:
        return [p.detach().clone() for p in params]
    from deepspeed.utils import safe_get_full_fp32_param

    if not slow:
        return [safe_get_full_fp32_param(p).detach().clone() for p in params]
    import deepspeed

    from lookahead_dist.deepspeed import use_slow_weights

    with use_slow_weights(engine):
        if engine.zero_optimization_stage() == 3:
            with deepspeed.zero.GatheredParameters(params):
                return [p.detach().clone() for p in params]
        return [p.detach().clone() for p in params]


def record(trainer: Trainer, cb: LookaheadTrainerCallback | None) -> dict[str, Any]:
    engine = trainer.model_wrapped if trainer.is_deepspeed_enabled else None
    out: dict[str, Any] = {"theta": gathered(trainer, engine, slow=False), "logs": trainer.state.log_history}
    if cb is not None:
        assert cb.lookahead is not None
        la = cb.lookahead
        if engine is None:
            out["phi"] = [la.state[p][SLOW_KEY].clone() for p in trainer.model.parameters()]
        else:
            out["phi"] = gathered(trainer, engine, slow=True)
        # This rank's raw Lookahead state (its shard under ZeRO), for bitwise resume checks.
        out["shard_phi"] = [st[SLOW_KEY].clone() for st in la.state.values() if SLOW_KEY in st]
        out["counts"] = [st[COUNT_KEY] for st in la.state.values() if SLOW_KEY in st]
        out["sync_count"] = la.sync_count
        out["syncs_done"] = cb.syncs_done
        out["k"], out["alpha"] = la.settings.k, la.settings.alpha
    return out


def train(name: str, cb: LookaheadTrainerCallback | None, args: TrainingArguments, resume: str | None = None,
          evaluate: bool = False) -> tuple[Trainer, dict[str, Any]]:
    COMM.clear()
    trainer = Trainer(model=make_model(), args=args, train_dataset=train_set(), eval_dataset=eval_set(),
                      callbacks=[StepCollectives()])
    if cb is not None:
        cb.attach(trainer)
    trainer.train(resume_from_checkpoint=resume)
    result = record(trainer, cb)
    result["comm"] = copy.deepcopy(COMM)
    if evaluate:
        result["eval_loss"] = trainer.evaluate()["eval_loss"]
        after = record(trainer, cb)
        result["theta_after_eval"] = after["theta"]
        assert cb is not None
        cb.eval_weights = "fast"
        result["eval_loss_fast"] = trainer.evaluate()["eval_loss"]
    return trainer, result


def main() -> None:
    global MODE
    for MODE in MODES:
        run_mode()


def run_mode() -> None:
    results: dict[str, Any] = {}
    ds = default_ds()
    cb = LookaheadTrainerCallback(k=K, alpha=ALPHA)
    _, results["full"] = train("full", cb, make_args("full", ds=ds, save_strategy="steps", save_steps=SAVE_AT))
    checkpoint = str(OUT / MODE / "full" / f"checkpoint-{SAVE_AT}")
    _, results["resume"] = train("resume", LookaheadTrainerCallback(k=K, alpha=ALPHA), make_args("resume", ds=ds),
                                 resume=checkpoint)
    _, results["eval"] = train("eval", LookaheadTrainerCallback(k=K, alpha=ALPHA),
                               make_args("eval", ds=ds, eval_strategy="steps", eval_steps=2), evaluate=True)
    if MODE != "zero3":  # k counts optimizer steps: 2 accumulated micro-batches are one step
        _, results["gas"] = train("gas", LookaheadTrainerCallback(k=K, alpha=ALPHA), make_args(
            "gas", ds=ds, per_device_train_batch_size=N_TRAIN // WORLD // 2, gradient_accumulation_steps=2))
    if MODE.startswith("zero"):
        _, results["plain"] = train("plain", None, make_args("plain", ds=ds))
    else:
        cb = LookaheadTrainerCallback(k=K, alpha=ALPHA)
        trainer, _ = train("again", cb, make_args("again"))
        trainer.train()
        results["again"] = record(trainer, cb)
    if MODE == "zero2":
        _, results["section"] = train("section", LookaheadTrainerCallback(log_distance=True),
                                      make_args("section", ds=ds_config(2, SECTION)))
        try:
            LookaheadTrainerCallback(k=3).attach(Trainer(model=make_model(), train_dataset=train_set(),
                                                         args=make_args("conflict", ds=ds_config(2, SECTION))))
            results["conflict"] = "no error"
        except LookaheadConfigError as e:
            results["conflict"] = str(e)
    if MODE == "single":
        results["example"] = run_example()
    torch.save(results, OUT / f"{MODE}_rank{RANK}.pt")


def run_example() -> dict[str, Any]:
    """examples/hf/run_clm.py, a few steps of a 1-layer GPT-2 from a config on the offline WikiText-2 copy."""
    from examples.common.paths import data_dir
    from examples.hf import run_clm

    os.environ["LOOKAHEAD_CACHE_DIR"] = str(OUT / "cache")  # the trained BPE
    wikitext = data_dir() / "wikitext-2"
    out = OUT / "example"
    metrics = run_clm.main([
        "--model_type", "gpt2", "--config_overrides", "n_embd=32,n_layer=1,n_head=2", "--bpe_vocab_size", "300",
        "--train_file", str(wikitext / "valid.txt"), "--validation_file", str(wikitext / "test.txt"),
        "--block_size", "32", "--max_train_samples", "16", "--max_eval_samples", "8",
        "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--max_steps", "4", "--logging_steps", "1",
        "--lookahead_k", "2", "--lookahead_alpha", "0.5", "--use_cpu", "--save_strategy", "no", "--report_to", "none",
        "--disable_tqdm", "true", "--output_dir", str(out),
    ])  # fmt: skip
    state = json.loads((out / "trainer_state.json").read_text())
    return {"metrics": metrics, "logs": state["log_history"]}


if __name__ == "__main__":
    main()
