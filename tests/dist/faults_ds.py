"""Launched by tests/test_faults.py under ``torchrun --nproc_per_node 2``: DeepSpeed ZeRO-2 + Lookahead training
with real faults.

    python -m tests.dist.faults_ds OUT CKPT RUN --steps N --save-at 4,8 [--save-with ds|safe]
        [--kill-in-save STEP] [--kill-after STEP] [--resume none|plain|fallback]

* ``--kill-in-save S``: rank 1 is SIGKILLed half-way through writing its ``*_optim_states.pt`` of the save at
  step S (the bytes written so far stay on disk, as after a real crash);
* ``--kill-after S``: rank 1 is SIGKILLed right after step S (mid-training, between collectives);
* ``--save-with ds``: ``engine.save_checkpoint`` (DeepSpeed writes ``latest`` from rank 0 without waiting);
  ``safe``: ``lookahead_dist.deepspeed.save_checkpoint`` (``latest`` only after every rank has written);
* ``--resume plain``: ``engine.load_checkpoint(CKPT)``; ``fallback``: ``lookahead_dist.deepspeed.load_checkpoint(
  engine, CKPT, fallback=True)``.

Every rank appends one JSON line per step to ``OUT/RUN_rank{r}.jsonl`` (the full fp32 master weights, this
rank's φ and cycle counter), flushed at once, so a killed run leaves its record up to the fault. The killed
rank writes ``OUT/RUN_killed`` (the ``time.time()`` just before the kill); a surviving rank that sees the
failure writes ``OUT/RUN_rank{r}_error``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

warnings.filterwarnings("ignore")

import torch

REPO = Path(__file__).resolve().parents[2]


def kill_self(out: Path, run: str, where: str) -> None:
    (out / f"{run}_killed").write_text(json.dumps({"time": time.time(), "where": where}))
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("ckpt", type=Path)
    parser.add_argument("run")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--save-at", default="")
    parser.add_argument("--save-with", choices=("ds", "safe"), default="ds")
    parser.add_argument("--kill-in-save", type=int, default=None)
    parser.add_argument("--kill-after", type=int, default=None)
    parser.add_argument("--resume", choices=("none", "plain", "fallback"), default="none")
    args = parser.parse_args()
    save_at = {int(s) for s in args.save_at.split(",") if s}

    import deepspeed
    import deepspeed.comm as dscomm
    from deepspeed.utils import safe_get_full_fp32_param

    import lookahead_dist.deepspeed as lads
    from lookahead_dist.core.keys import COUNT_KEY, SLOW_KEY
    from tests.dist.ds_common import (
        GAS,
        MICRO,
        loss_fn,
        make_model,
        make_optimizer,
        micro_batch,
        param_groups,
    )

    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=60))
    rank = dscomm.get_rank()

    if rank == 1 and args.kill_in_save is not None:
        real_save = torch.save
        tag = f"global_step{args.kill_in_save}"

        def dying_save(obj: Any, f: Any, *a: Any, **kw: Any) -> None:
            path = str(f)
            if path.endswith("_optim_states.pt") and f"{os.sep}{tag}{os.sep}" in path:
                buffer = io.BytesIO()
                real_save(obj, buffer)
                data = buffer.getvalue()
                with open(path, "wb") as handle:  # half the archive, then the process dies mid-write
                    handle.write(data[: len(data) // 2])
                    handle.flush()
                    os.fsync(handle.fileno())
                kill_self(args.out, args.run, f"writing {os.path.basename(path)} of {tag}")
            real_save(obj, f, *a, **kw)

        torch.save = dying_save  # type: ignore[assignment]

    config = json.loads((REPO / "configs" / "zero2.json").read_text())
    config.update(train_micro_batch_size_per_gpu=MICRO, gradient_accumulation_steps=GAS, steps_per_print=10**9)
    model = make_model("mlp")
    optimizer = make_optimizer("adamw", param_groups(model))
    engine, _, _, _ = lads.initialize(model=model, optimizer=optimizer, config=config)
    la = lads.find_lookahead(engine)
    assert la is not None, "the config's lookahead section must install Lookahead"

    first = 1
    loaded: dict[str, Any] = {}
    refused: str | None = None
    if args.resume != "none":
        # The signal install() uses to refuse installing after a load: None until a load completes.
        signal_before = engine.loaded_checkpoint_dp_world_size
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if args.resume == "plain":
                path, _ = engine.load_checkpoint(str(args.ckpt))
            else:
                try:  # the plain call first: it must refuse an incomplete 'latest' on every rank alike
                    engine.load_checkpoint(str(args.ckpt))
                except lads.IncompleteCheckpointError as exc:
                    refused = str(exc)
                path, _ = lads.load_checkpoint(engine, str(args.ckpt), fallback=True)
        loaded = {
            "path": path,
            "refused": refused if args.resume == "fallback" else None,
            "warnings": [str(w.message) for w in caught if "Lookahead checkpoint" in str(w.message)],
            "loaded_dp_world_size": [signal_before, engine.loaded_checkpoint_dp_world_size],
        }
        first = engine.global_steps + 1
    log = open(args.out / f"{args.run}_rank{rank}.jsonl", "a")  # noqa: SIM115 - kept open across the loop
    log.write(json.dumps({"loaded": loaded, "first": first}) + "\n")
    log.flush()
    try:
        for step in range(first, args.steps + 1):
            for micro in range(GAS):
                x, y = micro_batch("mlp", step, rank, micro)
                engine.backward(loss_fn("mlp", engine(x), y))
                engine.step()
            masters = {n: safe_get_full_fp32_param(p).flatten().tolist() for n, p in engine.module.named_parameters()}
            states = [la.state[p] for g in la.param_groups for p in g["params"]]
            record = {
                "step": step,
                "global_steps": engine.global_steps,
                "masters": masters,
                "phi": [st[SLOW_KEY].flatten().tolist() if SLOW_KEY in st else None for st in states],
                "count": [st.get(COUNT_KEY) for st in states],
                "sync_count": la.sync_count,
            }
            log.write(json.dumps(record) + "\n")
            log.flush()
            if rank == 1 and step == args.kill_after:
                kill_self(args.out, args.run, f"after step {step}")
            if step in save_at:
                if args.save_with == "ds":
                    engine.save_checkpoint(str(args.ckpt))
                else:
                    lads.save_checkpoint(engine, str(args.ckpt))
    except Exception as exc:  # noqa: BLE001 - the survivor records what it saw, then fails like any crash
        (args.out / f"{args.run}_rank{rank}_error").write_text(
            json.dumps({"time": time.time(), "error": f"{type(exc).__name__}: {exc}"[:500]})
        )
        log.close()
        sys.exit(1)
    log.close()
    dscomm.barrier()


if __name__ == "__main__":
    main()
