"""Cross-node Lookahead on 2 simulated nodes: inter-node bytes per step, and LM validation perplexity.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python -m benchmarks.bench_outer [--steps 100] [--runs a,b,...]
    .venv/bin/python -m benchmarks.bench_outer --steps 4 --eval-every 2 --runs adamw,nodes_k5 --results-dir /tmp/o

launches two torchrun invocations on this machine (``--nnodes 2 --node_rank 0|1``, one process each) that train
the LM example's model (GPT-2 config, examples/lm) with DeepSpeed ZeRO-2 and AdamW under every run below, in
turn, on the same global batches (each rank draws its own half of a global batch). Every collective issued
during the training steps is counted with the global ranks of its process group; one whose group spans both
nodes is inter-node traffic. Writes bench_outer.json and the "bench_outer" section of RESULTS.md (in
``--results-dir``, default benchmarks/).

Runs: ``adamw`` (global ZeRO-2, one data-parallel group of both nodes), ``lookahead`` (the same plus
Lookahead k=5 α=0.5, local syncs), and the cross-node mode ``nodes_k{5,20,50}`` (every node its own ZeRO-2
group; the sync all-reduces each rank's partition of θ − φ across nodes). Cross-node runs use DiLoCo's outer
optimiser (lr 0.7, Nesterov momentum 0.9) unless named ``..._plain`` (Lookahead's own rule, α=0.5).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    BENCH_DIR,
    RESULTS_MD,
    command_line,
    free_port,
    run_workers,
    torchrun_cmd,
    update_section,
    worker_env,
)

RUNS: dict[str, dict[str, Any] | None] = {
    "adamw": None,
    "lookahead": {"k": 5, "alpha": 0.5},
    "nodes_k5": {"k": 5, "alpha": 0.7, "outer": {"scope": "nodes", "momentum": 0.9, "nesterov": True}},
    "nodes_k20": {"k": 20, "alpha": 0.7, "outer": {"scope": "nodes", "momentum": 0.9, "nesterov": True}},
    "nodes_k50": {"k": 50, "alpha": 0.7, "outer": {"scope": "nodes", "momentum": 0.9, "nesterov": True}},
    "nodes_k5_plain": {"k": 5, "alpha": 0.5, "outer": {"scope": "nodes"}},
    "nodes_k20_plain": {"k": 20, "alpha": 0.5, "outer": {"scope": "nodes"}},
    "nodes_k50_plain": {"k": 50, "alpha": 0.5, "outer": {"scope": "nodes"}},
}
DEFAULT_RUNS = ["adamw", "lookahead", "nodes_k5", "nodes_k20", "nodes_k50", "nodes_k5_plain", "nodes_k20_plain",
                "nodes_k50_plain"]  # fmt: skip
SEQ_LEN, BATCH, VOCAB, VAL_BLOCKS, LR, WD = 64, 8, 4096, 48, 2e-3, 0.01


# ============================================================== worker (one process per node)
def worker(out: Path, steps: int, eval_every: int, names: list[str]) -> None:
    import torch
    import torch.distributed as tdist

    log: list[tuple[list[int], int]] = []
    active = [False]
    ops = ("all_reduce", "all_gather", "all_gather_into_tensor", "_all_gather_base", "reduce_scatter",
           "reduce_scatter_tensor", "_reduce_scatter_base", "broadcast", "reduce", "all_to_all_single", "barrier",
           "all_gather_object", "broadcast_object_list")  # fmt: skip

    def wrap(module: Any, name: str) -> None:
        fn = getattr(module, name, None)
        if fn is None or getattr(fn, "_bench", False):
            return
        sig = inspect.signature(fn)

        def counted(*args: Any, **kwargs: Any) -> Any:
            if active[0]:
                bound = sig.bind(*args, **kwargs).arguments
                group = bound.get("group")
                ranks = tdist.get_process_group_ranks(group) if group is not None else list(range(tdist.get_world_size()))
                tensors = [v for k, v in bound.items() if k != "group" and isinstance(v, torch.Tensor)]
                payload = tensors[-1] if tensors else None  # the input (last tensor of *_into_tensor)
                log.append((sorted(ranks), 0 if payload is None else payload.numel() * payload.element_size()))
            return fn(*args, **kwargs)

        counted._bench = True  # type: ignore[attr-defined]
        setattr(module, name, counted)

    for op in ops:
        wrap(tdist, op)
        wrap(tdist.distributed_c10d, op)

    import deepspeed
    from deepspeed.utils import groups as ds_groups

    import lookahead_dist.deepspeed as lads
    from examples.lm.data import LMDataModule
    from examples.lm.model import build_causal_lm

    deepspeed.init_distributed(dist_backend="gloo")
    world, rank = tdist.get_world_size(), tdist.get_rank()
    local = int(os.environ["LOCAL_WORLD_SIZE"])
    data = LMDataModule(
        data_files={"train": "{data}/wikitext-2/valid.txt", "validation": "{data}/wikitext-2/test.txt"},
        vocab_size=VOCAB, seq_len=SEQ_LEN, batch_size=BATCH, max_val_blocks=VAL_BLOCKS,
    )  # fmt: skip
    if rank == 0:
        data.prepare_data()  # trains and caches the BPE tokenizer once
    tdist.barrier()
    data.setup()
    train, val = data.train_set.tensors[0], data.val_set.tensors[0]  # type: ignore[union-attr]

    def batch(step: int) -> torch.Tensor:
        # The same global batch for every run: a seeded permutation per pass, this rank's slice of it.
        per_pass = len(train) // (world * BATCH)
        epoch, i = divmod(step, per_pass)
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(100 + epoch))
        start = (i * world + rank) * BATCH
        return train[order[start : start + BATCH]]

    results: dict[str, Any] = {}
    for name in names:
        ds_groups.mpu = None  # DeepSpeed keeps the previous engine's groups in a module global
        torch.manual_seed(1234)
        model = build_causal_lm(VOCAB, SEQ_LEN, 2, 4, 128, 0.0, None, None)
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
        config: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True},
            "gradient_clipping": 0.0, "steps_per_print": 10**9,
        }  # fmt: skip
        if RUNS[name] is not None:
            config["lookahead"] = RUNS[name]
        engine, *_ = lads.initialize(model=model, optimizer=opt, config=config)
        per_step: list[int] = []
        curve: list[tuple[int, float]] = []
        started = time.perf_counter()
        for step in range(steps):
            engine.train()
            del log[:]
            active[0] = True
            ids = batch(step)
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            active[0] = False
            per_step.append(sum(b for ranks, b in log if len({r // local for r in ranks}) > 1))
            if (step + 1) % eval_every == 0:
                engine.eval()
                with torch.no_grad():
                    losses = [engine(input_ids=val[i : i + BATCH], labels=val[i : i + BATCH]).loss.item()
                              for i in range(0, len(val), BATCH)]  # fmt: skip
                curve.append((step + 1, math.exp(sum(losses) / len(losses))))
        results[name] = {
            "internode_bytes_per_step": per_step,
            "val_ppl": curve,
            "seconds": time.perf_counter() - started,
            "params": sum(p.numel() for p in model.parameters()),
        }
        del engine
        tdist.barrier()
    (out / f"rank{rank}.json").write_text(json.dumps(results))


# ============================================================== driver
def section(res: dict[str, Any], meta: dict[str, Any]) -> str:
    names = list(res)
    base = res["adamw"]
    base_bytes = sum(base["internode_bytes_per_step"]) / len(base["internode_bytes_per_step"])
    lines = [
        "## Cross-node Lookahead on 2 simulated nodes (bench_outer)",
        "",
        (f"Produced by `{meta['command']}` ({meta['seconds']:.0f} s in all) on {meta['machine']}; "
        f"{meta['versions']}. Both \"nodes\" are processes on this one machine (gloo over loopback), so times say "
        f"nothing about a network; the byte counts are what would cross it."),
        "",
        (f"Setup: the LM example's model (GPT-2 config, 2 layers x 128, 4 heads, BPE vocabulary {VOCAB}, "
        f"{base['params']:,} parameters), {SEQ_LEN}-token blocks of WikiText-2 valid.txt, {BATCH} blocks per rank "
        f"per step (global batch {2 * BATCH}), AdamW lr {LR} weight decay {WD}, DeepSpeed ZeRO-2, fp32, "
        f"{meta['steps']} steps, every run on the same global batches; validation perplexity on {VAL_BLOCKS} blocks "
        f"of test.txt at steps that are sync points of every run (θ = φ on every node there). "
        f"`adamw`/`lookahead`: one data-parallel group spanning both nodes (today's behaviour). "
        f"`nodes_k*`: `\"outer\": {{\"scope\": \"nodes\", \"momentum\": 0.9, \"nesterov\": true}}`, α = 0.7 "
        f"(DiLoCo's outer optimiser); `*_plain`: no outer momentum, Lookahead's rule with α = 0.5."),
        "",
        ("Inter-node bytes: the payload (input tensor) of every collective whose process group spans both nodes, "
        "summed over the training steps and divided by their number (rank 0's count; ring algorithms move about "
        "that much per rank again for an all-reduce)."),
        "",
        "| run | k | inter-node bytes / step | vs global ZeRO-2 | "
        + " | ".join(f"val ppl @ {s}" for s, _ in base["val_ppl"])
        + " | train s |",
        "|---|---|---|---|" + "---|" * len(base["val_ppl"]) + "---|",
    ]
    for name in names:
        r = res[name]
        per = sum(r["internode_bytes_per_step"]) / len(r["internode_bytes_per_step"])
        k = (RUNS[name] or {}).get("k", "-")
        ratio = f"1/{base_bytes / per:.1f}" if per else "0"
        ppl = " | ".join(f"{p:.2f}" for _, p in r["val_ppl"])
        lines.append(f"| `{name}` | {k} | {per:,.0f} | {ratio} | {ppl} | {r['seconds']:.0f} |")
    lines += ["", meta.get("reading", "")]
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--runs", default=",".join(DEFAULT_RUNS))
    parser.add_argument("--results-dir", type=Path, default=BENCH_DIR, help="where bench_outer.json and RESULTS.md go")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    names = args.runs.split(",")
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"unknown run(s) {unknown}; choose from {', '.join(RUNS)}")
    if args.worker is not None:
        worker(args.worker, args.steps, args.eval_every, names)
        return
    if "adamw" not in names:
        parser.error("--runs must include adamw (the baseline of the traffic ratio)")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-outer-") as tmp:
        out = Path(tmp)
        port = free_port()
        wargs = ["--worker", str(out), "--steps", str(args.steps), "--eval-every", str(args.eval_every),
                 "--runs", ",".join(names)]  # fmt: skip
        cmds = [torchrun_cmd("benchmarks.bench_outer", wargs, nproc=1, port=port, nnodes=2, node_rank=n)
                for n in (0, 1)]  # fmt: skip
        env = worker_env(port, {"HF_HOME": str(out / "hf"), "LOOKAHEAD_CACHE_DIR": str(out / "cache")})
        run_workers(cmds, env, timeout=3000)
        res = json.loads((out / "rank0.json").read_text())
    import deepspeed
    import torch

    meta = {
        "command": command_line("benchmarks.bench_outer", sys.argv[1:], prefix="OMP_NUM_THREADS=1 nice -n 10"),
        "seconds": time.perf_counter() - started,
        "steps": args.steps,
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores, no GPU",
        "versions": f"Python {platform.python_version()}, torch {torch.__version__}, deepspeed {deepspeed.__version__}",
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "bench_outer.json").write_text(json.dumps({"meta": meta, "runs": res}, indent=1))
    update_section(args.results_dir / RESULTS_MD.name, "bench_outer", section(res, meta))
    print(section(res, meta))


if __name__ == "__main__":
    main()
