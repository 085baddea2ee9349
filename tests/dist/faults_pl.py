"""Launched by tests/test_faults.py under ``torchrun --nproc_per_node 2``: Lightning + CPUDeepSpeedStrategy (ZeRO-2)
+ LookaheadCallback (k=3) with a real fault.

    python -m tests.dist.faults_pl OUT CKPT RUN --steps 8 [--save-at 4] [--kill-after 6] [--resume-from 4]

* ``--save-at S``: ``trainer.save_checkpoint(CKPT/step{S}.ckpt)`` after optimizer step S (on every rank);
* ``--kill-after S``: rank 1 SIGKILLs itself right after optimizer step S;
* ``--resume-from S``: ``fit(ckpt_path=CKPT/step{S}.ckpt)`` with the data sampler started at global batch S
  (tests/dist/pl_common.py's ``RankSlices``): Lightning does not restore a map-style sampler's position inside an
  epoch, so the data order is made resumable by the sampler itself.

Every rank appends one JSON line per optimizer step to ``OUT/RUN_rank{r}.jsonl``: the full fp32 weights θ
(``safe_get_full_fp32_param``) and the cycle counter. The killed rank writes ``OUT/RUN_killed``; a surviving rank
that sees the failure writes ``OUT/RUN_rank{r}_error``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

warnings.filterwarnings("ignore")

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, Trainer

from lookahead_dist import LookaheadCallback
from lookahead_dist.core.keys import COUNT_KEY
from lookahead_dist.lightning import CPUDeepSpeedStrategy
from tests.dist.pl_common import TinyModule, loader

K, ALPHA, PER_RANK = 3, 0.5, 4


class Faults(Callback):
    def __init__(self, args: argparse.Namespace, rank: int) -> None:
        self.args, self.rank = args, rank
        self.records = open(args.out / f"{args.run}_rank{rank}.jsonl", "a")  # noqa: SIM115 - open for the whole fit

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        from deepspeed.utils import safe_get_full_fp32_param

        step = trainer.global_step
        engine = trainer.strategy.deepspeed_engine  # type: ignore[attr-defined]
        theta = {n: safe_get_full_fp32_param(p).flatten().tolist() for n, p in engine.module.named_parameters()}
        inner = engine.optimizer.optimizer
        counts = [inner.state[p].get(COUNT_KEY) for g in inner.param_groups for p in g["params"]]
        self.records.write(json.dumps({"step": step, "theta": theta, "count": counts}) + "\n")
        self.records.flush()
        if self.rank == 1 and step == self.args.kill_after:
            (self.args.out / f"{self.args.run}_killed").write_text(json.dumps({"time": time.time(),
                                                                              "where": f"after step {step}"}))  # fmt: skip
            os.kill(os.getpid(), signal.SIGKILL)
        if step == self.args.save_at:
            trainer.save_checkpoint(str(self.args.ckpt / f"step{step}.ckpt"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("ckpt", type=Path)
    parser.add_argument("run")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--save-at", type=int, default=None)
    parser.add_argument("--kill-after", type=int, default=None)
    parser.add_argument("--resume-from", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    config = {"zero_optimization": {"stage": 2, "overlap_comm": False}, "train_micro_batch_size_per_gpu": PER_RANK,
              "zero_allow_untested_optimizer": True}  # fmt: skip
    trainer = Trainer(
        accelerator="cpu", devices=world, strategy=CPUDeepSpeedStrategy(config=config), max_steps=args.steps,
        callbacks=[LookaheadCallback(k=K, alpha=ALPHA), Faults(args, rank)], logger=False, limit_val_batches=0,
        num_sanity_val_steps=0, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False,
    )  # fmt: skip
    start = args.resume_from or 0
    ckpt = None if args.resume_from is None else str(args.ckpt / f"step{args.resume_from}.ckpt")
    try:
        trainer.fit(TinyModule(), train_dataloaders=loader(PER_RANK, rank, world, start=start), ckpt_path=ckpt)
    except Exception as exc:  # noqa: BLE001 - the survivor records what it saw, then fails like any crash
        (args.out / f"{args.run}_rank{rank}_error").write_text(
            json.dumps({"time": time.time(), "error": f"{type(exc).__name__}: {exc}"[:500]})
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
