"""End to end: the LM example's training throughput under DeepSpeed ZeRO-2 on 2 processes, with and without Lookahead.

One ``torchrun --nproc_per_node 2`` job (gloo, CPU) builds, from the same seed, one DeepSpeed ZeRO-2 engine per
contender around the LM example's model (``examples/lm/model.py``, the ``configs/lm_base.yaml`` size: GPT-2
2 layers x 128, vocabulary 4096, 128-token blocks, 16 blocks per rank per step) and its WikiText-2 data
(``examples/lm/data.py``), all with the same client ``torch.optim.AdamW``:

* ``AdamW``                plain DeepSpeed;
* ``ours``                 ``lookahead_dist.deepspeed.initialize`` with ``"lookahead": {"k": 5, "alpha": 0.5}``;
* ``timm``, ``pytorch_optimizer``, ``torch_optimizer``  the peers' Lookahead around the AdamW, handed to DeepSpeed
  as the client optimizer (``zero_allow_untested_optimizer``), where they run at all.

Rounds are interleaved: every round runs each contender for ``--steps`` training steps (forward, backward,
``engine.step()``; 10 steps = 2 Lookahead cycles), in a rotating order, between barriers; tokens/s of a block =
tokens of both ranks / wall time of the block. Reported: median tokens/s [min-max] over rounds and the median of
the per-round ratio to AdamW. Also, per rank, the bytes of optimizer state beyond AdamW's moments (φ) after the
run, against ``4·P/N`` (a shard) and ``4·P`` (a full fp32 copy).

    .venv/bin/pip install --no-deps --target /tmp/la_peers timm pytorch_optimizer torch-optimizer   # optional
    .venv/bin/python -m benchmarks.bench_e2e --peers /tmp/la_peers
    .venv/bin/python -m benchmarks.bench_e2e --rounds 1 --steps 5 --results-dir /tmp/e2e   # a smoke run

Writes ``bench_e2e.json`` and the "bench_e2e" section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

from benchmarks.common import (
    BENCH_DIR,
    RESULTS_MD,
    command_line,
    environment_lines,
    free_port,
    load_peers,
    run_workers,
    torchrun_cmd,
    update_section,
    worker_env,
)

K, ALPHA = 5, 0.5
MODEL: dict[str, Any] = {"n_layer": 2, "n_head": 4, "n_embd": 128, "dropout": 0.0}  # configs/lm_base.yaml
DATA: dict[str, Any] = {"vocab_size": 4096, "seq_len": 128, "batch_size": 16, "max_val_blocks": 8}
ADAMW_KEYS = {"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"}


# ----------------------------------------------------------------------------------------------- worker
def state_extra_bytes(optimizer: Any) -> int:
    """Bytes of tensors in the optimizer's state (and any optimizer it wraps) other than AdamW's own."""
    import torch

    seen: set[tuple[int, int]] = set()
    total = 0
    todo = [optimizer] + [v for v in vars(optimizer).values() if isinstance(v, torch.optim.Optimizer)]
    for opt in todo:
        for st in getattr(opt, "state", {}).values():
            if not isinstance(st, dict):
                continue
            for key, value in st.items():
                if key in ADAMW_KEYS or not isinstance(value, torch.Tensor):
                    continue
                where = (value.untyped_storage().data_ptr(), value.storage_offset())
                if where not in seen:
                    seen.add(where)
                    total += value.numel() * value.element_size()
    return total


def worker(args: argparse.Namespace) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings("ignore")
    import logging

    import deepspeed
    import torch
    import torch.distributed as tdist

    import lookahead_dist.deepspeed as la_ds
    from examples.lm.data import LMDataModule
    from examples.lm.model import build_causal_lm
    from lookahead_dist.deepspeed.holders import find_lookahead

    def sync_count(engine: Any) -> int | None:
        wrapper = find_lookahead(engine) if engine is not None else None
        return None if wrapper is None else int(wrapper.sync_count)

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = tdist.get_rank(), tdist.get_world_size()

    dm = LMDataModule(
        dataset_name=None,
        data_files={"train": "{data}/wikitext-2/valid.txt", "validation": "{data}/wikitext-2/test.txt"},
        **DATA,
    )
    if rank == 0:
        dm.prepare_data()
    tdist.barrier()
    dm.prepare_data()
    dm.setup()
    assert dm.train_set is not None
    blocks = dm.train_set.tensors[0]
    batch = DATA["batch_size"]

    def batch_at(i: int) -> Any:
        start = ((i * world + rank) * batch) % (len(blocks) - batch)
        return blocks[start : start + batch]

    peers, versions = load_peers(Path(args.peers) if args.peers else None)
    names = ["AdamW", "ours", *peers]
    engines: dict[str, Any] = {}
    clients: dict[str, Any] = {}
    errors: dict[str, str] = {}
    n_params = 0
    for name in names:
        torch.manual_seed(0)
        model = build_causal_lm(DATA["vocab_size"], DATA["seq_len"], pretrained=None, gguf_file=None, **MODEL)
        n_params = sum(p.numel() for p in model.parameters())
        inner = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
        config: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": batch,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True},
            "gradient_clipping": 0.0,
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
        }
        try:
            if name == "ours":
                config["lookahead"] = {"k": K, "alpha": ALPHA}
                engine, client, _, _ = la_ds.initialize(model=model, optimizer=inner, config=config)
            else:
                client = inner if name == "AdamW" else peers[name](inner, K, ALPHA)
                engine, _, _, _ = deepspeed.initialize(model=model, optimizer=client, config=config)
            for i in range(2 * K):  # warm-up: state, φ, allocator
                loss = engine(input_ids=batch_at(i), labels=batch_at(i)).loss
                engine.backward(loss)
                engine.step()
        except Exception as exc:  # a peer that does not run under ZeRO-2 is reported, not fatal
            errors[name] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            if rank == 0:
                traceback.print_exc()
            continue
        engines[name] = engine
        clients[name] = client

    # Inside "ours": the time of Lookahead.step beyond the inner AdamW step (bookkeeping + sync), per step.
    inside = {"wrapper_s": 0.0, "inner_s": 0.0, "calls": 0, "on": False}
    wrapper = find_lookahead(engines["ours"]) if "ours" in engines else None
    if wrapper is not None:

        def timed(fn: Any, key: str) -> Any:
            def call(*a: Any, **kw: Any) -> Any:
                t = time.perf_counter()
                try:
                    return fn(*a, **kw)
                finally:
                    if inside["on"]:
                        inside[key] += time.perf_counter() - t
                        if key == "wrapper_s":
                            inside["calls"] += 1

            return call

        wrapper.optimizer.step = timed(wrapper.optimizer.step, "inner_s")
        wrapper.step = timed(wrapper.step, "wrapper_s")

    times: dict[str, list[float]] = {name: [] for name in engines}
    cpu: dict[str, list[float]] = {name: [] for name in engines}
    losses: dict[str, list[float]] = {name: [] for name in engines}
    order = list(engines)
    step_index = 2 * K
    for r in range(args.rounds):
        rotated = order[r % len(order) :] + order[: r % len(order)]
        for name in rotated:
            engine = engines[name]
            inside["on"] = name == "ours"
            tdist.barrier()
            started, cpu_started = time.perf_counter(), time.process_time()
            for i in range(args.steps):
                ids = batch_at(step_index + i)
                loss = engine(input_ids=ids, labels=ids).loss
                engine.backward(loss)
                engine.step()
            cpu[name].append(time.process_time() - cpu_started)
            tdist.barrier()
            times[name].append(time.perf_counter() - started)
            losses[name].append(float(loss))
        step_index += args.steps

    record = {
        "rank": rank,
        "world_size": world,
        "n_params": n_params,
        "versions": versions,
        "errors": errors,
        "block_s": times,
        "block_cpu_s": cpu,
        "ours_inside": inside,
        "last_loss": losses,
        "extra_state_bytes": {name: state_extra_bytes(clients[name]) for name in engines},
        "sync_count_ours": sync_count(engines.get("ours")),
    }
    Path(f"{args.out}.rank{rank}.json").write_text(json.dumps(record))


# --------------------------------------------------------------------------------------------- launcher
def launch(args: argparse.Namespace, out_prefix: Path, hf_home: Path) -> list[dict]:
    """This module again under ``torchrun --nproc_per_node 2 -m`` with ``--worker``; each rank's JSON record."""
    worker_args = ["--worker", "--out", str(out_prefix), "--rounds", str(args.rounds), "--steps", str(args.steps)]
    if args.peers:
        worker_args += ["--peers", str(args.peers)]
    port = free_port()
    cmd = torchrun_cmd("benchmarks.bench_e2e", worker_args, nproc=2, port=port)
    env = worker_env(port, {"HF_HOME": os.environ.get("HF_HOME", str(hf_home))})
    run_workers([cmd], env, args.timeout)
    return [json.loads(Path(f"{out_prefix}.rank{r}.json").read_text()) for r in range(2)]


def summarize(ranks: list[dict], steps: int) -> dict:
    r0 = ranks[0]
    tokens = r0["world_size"] * DATA["batch_size"] * DATA["seq_len"] * steps
    rows = {}
    base = r0["block_s"]["AdamW"]
    # CPU seconds of both processes per block (what the step costs, unaffected by time spent preempted)
    cpu = {name: [sum(vals) for vals in zip(*(r["block_cpu_s"][name] for r in ranks))] for name in r0["block_cpu_s"]}
    for name, blocks in r0["block_s"].items():
        tps = [tokens / t for t in blocks]
        ratios = [b / t for b, t in zip(base, blocks)]  # tokens/s ratio to AdamW, per round
        cpu_ratios = [c / b for b, c in zip(cpu["AdamW"], cpu[name])]
        rows[name] = {
            "cpu_ratio_to_adamw": {"median": statistics.median(cpu_ratios), "min": min(cpu_ratios), "max": max(cpu_ratios)},
            "tokens_per_s": {"median": statistics.median(tps), "min": min(tps), "max": max(tps)},
            "ratio_to_adamw": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
            "ms_per_step": 1e3 * statistics.median(blocks) / steps,
            "extra_state_bytes_per_rank": [r["extra_state_bytes"][name] for r in ranks],
            "last_loss": r0["last_loss"][name][-1],
        }
    inside = r0["ours_inside"]
    ours_steps = len(r0["block_s"].get("ours", [])) * steps
    return {
        "ours_overhead_ms_per_step": 1e3 * (inside["wrapper_s"] - inside["inner_s"]) / max(ours_steps, 1),
        "ours_wrapper_calls": inside["calls"],
        "n_params": r0["n_params"],
        "world_size": r0["world_size"],
        "rows": rows,
        "errors": r0["errors"],
        "versions": r0["versions"],
        "sync_count_ours": r0["sync_count_ours"],
    }


def report(summary: dict, args: argparse.Namespace, seconds: float) -> str:
    p, n = summary["n_params"], summary["world_size"]
    lines = environment_lines("cpu")
    argv = [*(["--peers", str(args.peers)] if args.peers else []), "--rounds", str(args.rounds), "--steps", str(args.steps)]
    lines.append(
        f"- command: `{command_line('benchmarks.bench_e2e', argv)}` ({seconds:.0f} s); torchrun --nproc_per_node 2, "
        "gloo, 1 torch thread per process"
    )
    if summary["versions"]:
        lines.append("- peers (pip install --no-deps --target, benchmark only): "
                     + ", ".join(f"{k} {v}" for k, v in summary["versions"].items()))  # fmt: skip
    lines += [
        "",
        f"LM example model ({p / 1e6:.2f} M parameters; 2 layers x 128, vocabulary 4096), 128-token blocks, "
        f"{DATA['batch_size']} blocks per rank per step, DeepSpeed ZeRO-2 on {n} CPU processes, client "
        f"torch AdamW; Lookahead k={K}, α={ALPHA}. {args.rounds} interleaved rounds of {args.steps} steps per "
        "contender (rotating order, barriers around each block); tokens/s median [min-max] over rounds; ratio = "
        "median over rounds of (tokens/s of the contender / tokens/s of AdamW in the same round); CPU-time ratio = "
        "the same for the CPU seconds both processes spent in the block (the work, without time spent preempted). "
        f"Extra state = optimizer-state bytes beyond AdamW's moments per rank; a shard is 4·P/N = "
        f"{4 * p / n / 1e6:.2f} MB, a full fp32 copy 4·P = {4 * p / 1e6:.2f} MB.",
        "",
        "| contender | tokens/s | ms/step | tokens/s ratio to AdamW | CPU-time ratio to AdamW | extra state per rank (MB) | × shard |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in summary["rows"].items():
        t, r, c = row["tokens_per_s"], row["ratio_to_adamw"], row["cpu_ratio_to_adamw"]
        extra = row["extra_state_bytes_per_rank"]
        shard = 4 * p / n
        lines.append(
            f"| {name} | {t['median']:.0f} [{t['min']:.0f}-{t['max']:.0f}] | {row['ms_per_step']:.1f} | "
            f"{r['median']:.3f} [{r['min']:.3f}-{r['max']:.3f}] | {c['median']:.3f} [{c['min']:.3f}-{c['max']:.3f}] | "
            f"{' / '.join(f'{b / 1e6:.2f}' for b in extra)} | {' / '.join(f'{b / shard:.2f}' for b in extra)} |"
        )
    for name, err in summary["errors"].items():
        lines.append(f"| {name} | does not run under ZeRO-2: `{err}` | | | | | |")
    if "ours" in summary["rows"]:
        over = summary["ours_overhead_ms_per_step"]
        step_ms = summary["rows"]["ours"]["ms_per_step"]
        lines += [
            "",
            f"Inside the timed blocks of `ours` (rank 0), `Lookahead.step` took {over:.3f} ms per training step "
            f"more than the inner AdamW step it wraps (bookkeeping and the sync, over "
            f"{summary['ours_wrapper_calls']} calls): {100 * over / step_ms:.3f} % of the {step_ms:.0f} ms step, "
            f"i.e. a throughput ratio of at least {1 - over / step_ms:.4f} from Lookahead's own work.",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", default=None, help="folder the peers were pip-installed into (optional)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=10, help="steps per block (a multiple of k=5)")
    parser.add_argument("--timeout", type=int, default=1800)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)  # the worker's file prefix
    parser.add_argument("--results-dir", type=Path, default=BENCH_DIR, help="where bench_e2e.json and RESULTS.md go")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-results-md", action="store_true")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    import tempfile

    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        ranks = launch(args, Path(tmp) / "e2e", Path(tmp) / "hf")
    summary = summarize(ranks, args.steps)
    seconds = time.time() - started
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "bench_e2e.json").write_text(json.dumps({"summary": summary, "ranks": ranks}, indent=1))
    body = report(summary, args, seconds)
    print(body)
    if not args.no_results_md:
        update_section(args.results_dir / RESULTS_MD.name, "bench_e2e", "## End to end: LM example under ZeRO-2 (bench_e2e)\n\n" + body)


if __name__ == "__main__":
    main()
