"""Lookahead under DeepSpeed ZeRO-1/2/3 on 2 CPU processes (gloo): memory, collectives, step time.

Launches ``benchmarks.dist_zero_worker`` once with ``torchrun --nproc_per_node 2 -m``. For each stage the worker
trains a small Transformer-like MLP stack (pre-LayerNorm residual MLP blocks) with plain AdamW and with
Lookahead(AdamW) installed by ``lookahead_dist.deepspeed.install``, and records per rank:

* optimizer-state bytes: φ (``lookahead_slow``) against Adam's moments, against ``4·P/N`` (the ideal shard) and
  ``4·P`` (a full fp32 copy, what a wrapper outside DeepSpeed's partitioned optimizer would keep per rank);
* every collective of each step (counted by wrapping ``torch.distributed`` before DeepSpeed is imported), as
  a count and a volume (bytes of the larger of a call's output and input buffers);
* step time (forward + backward + step), plain and Lookahead blocks alternating, repeated.

    .venv/bin/python -m benchmarks.bench_zero             # ZeRO-1/2/3, 5 repeats
    .venv/bin/python -m benchmarks.bench_zero --quick     # fewer repeats

Prints tables, writes ``bench_zero.json`` / ``bench_zero.png`` and the "bench_zero" section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    BENCH_DIR,
    RESULTS_MD,
    command_line,
    environment_lines,
    free_port,
    pyplot,
    run_workers,
    spread,
    torchrun_cmd,
    update_section,
    worker_env,
)

WORKER = "benchmarks.dist_zero_worker"


def launch(worker_args: list[str], out_prefix: Path, timeout: int) -> list[dict]:
    """One ``torchrun --nproc_per_node 2 -m benchmarks.dist_zero_worker`` job; each rank's JSON record."""
    port = free_port()
    cmd = torchrun_cmd(WORKER, ["--out", str(out_prefix), *worker_args], nproc=2, port=port)
    run_workers([cmd], worker_env(port), timeout)
    return [json.loads(Path(f"{out_prefix}.rank{r}.json").read_text()) for r in range(2)]


def summarize(ranks: list[dict], stage: str) -> dict:
    recs = [r[stage] for r in ranks]
    for r in recs:
        if "error" in r:
            sys.exit(f"{stage} failed on a rank:\n{r['error']}")
    world = ranks[0]["world_size"]
    n_params = recs[0]["n_params"]
    per_rank = []
    for rank, rec in enumerate(recs):
        la, plain = rec["state_bytes_lookahead"], rec["state_bytes_plain"]
        per_rank.append(
            {
                "rank": rank,
                "fp32_partition": la.get("fp32_partition", 0),
                "adam_moments": la.get("exp_avg", 0) + la.get("exp_avg_sq", 0),
                "phi": la.get("lookahead_slow", 0),
                "phi_in_plain_run": plain.get("lookahead_slow", 0),
                "plain_total": sum(plain.values()),
                "lookahead_total": sum(la.values()),
            }
        )
    identical = all(rec["comm_plain"] == rec["comm_lookahead"] for rec in recs)
    comm = recs[0]
    steps = len(comm["comm_plain"])
    calls = {name: sum(len(s) for s in comm[f"comm_{name}"]) / steps for name in ("plain", "lookahead")}
    volume = {
        name: sum(b for s in comm[f"comm_{name}"] for _, b in s) / steps for name in ("plain", "lookahead")
    }
    ops: dict[str, int] = {}
    for s in comm["comm_plain"]:
        for op, _ in s:
            ops[op] = ops.get(op, 0) + 1
    # Both ranks time the same barrier-delimited blocks; rank 0's numbers stand for the step.
    times = recs[0]["step_time_s"]
    ratios = [la / pl for la, pl in zip(times["lookahead"], times["plain"])]
    return {
        "stage": stage,
        "world_size": world,
        "n_params": n_params,
        "ideal_phi_bytes": 4 * n_params / world,
        "full_copy_bytes": 4 * n_params,
        "per_rank": per_rank,
        "collectives_identical_all_ranks": identical,
        "counted_steps": steps,
        "calls_per_step": calls,
        "bytes_per_step": volume,
        "ops_per_step": {op: n / steps for op, n in sorted(ops.items())},
        "step_time_s": {name: spread(v) for name, v in times.items()},
        "step_time_ratio": spread(ratios),
        "sync_count_rank0": recs[0]["sync_count"],
    }


def mib(n: float) -> str:
    return f"{n / 2**20:.3f}"


def tables(summaries: list[dict]) -> list[str]:
    lines = [
        (
            "Optimizer state per rank (MiB; P = parameters, N = 2 ranks; `full copy` = 4·P, what a Lookahead kept "
            "outside ZeRO's partitioned optimizer holds on every rank):"
        ),
        "",
        (
            "| stage | P | rank | fp32 partition | Adam moments | φ | 4·P/N | φ − 4·P/N (padding) | full copy 4·P | "
            "φ / full copy | state total plain → Lookahead |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        for r in s["per_rank"]:
            lines.append(
                f"| {s['stage']} | {s['n_params']:,} | {r['rank']} | {mib(r['fp32_partition'])} | "
                f"{mib(r['adam_moments'])} | {mib(r['phi'])} | {mib(s['ideal_phi_bytes'])} | "
                f"{r['phi'] - s['ideal_phi_bytes']:+,.0f} B | {mib(s['full_copy_bytes'])} | "
                f"{r['phi'] / s['full_copy_bytes']:.3f} | {mib(r['plain_total'])} → {mib(r['lookahead_total'])} |"
            )
    lines += [
        "",
        (
            "Collectives per training step (forward + backward + step), rank 0, averaged over k counted steps "
            "(one of which syncs); `identical` compares the full per-step list of (op, bytes) on every rank:"
        ),
        "",
        (
            "| stage | calls/step plain | calls/step Lookahead | MiB/step plain | MiB/step Lookahead | identical | "
            "ops per step (plain) |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        ops = ", ".join(f"{op} {n:g}" for op, n in s["ops_per_step"].items())
        lines.append(
            f"| {s['stage']} | {s['calls_per_step']['plain']:g} | {s['calls_per_step']['lookahead']:g} | "
            f"{mib(s['bytes_per_step']['plain'])} | {mib(s['bytes_per_step']['lookahead'])} | "
            f"{'yes' if s['collectives_identical_all_ranks'] else 'NO'} | {ops} |"
        )
    syncs = ", ".join(f"{s['stage']} {s['sync_count_rank0']}" for s in summaries)
    lines += ["", f"Lookahead syncs on rank 0 over the whole run (the counted steps include one): {syncs}."]
    lines += [
        "",
        "Step time (ms, median [min-max] over repeats; a repeat = mean over a block of 2 Lookahead cycles):",
        "",
        "| stage | plain AdamW | Lookahead(AdamW) | Lookahead / plain |",
        "|---|---|---|---|",
    ]
    for s in summaries:
        t, r = s["step_time_s"], s["step_time_ratio"]
        lines.append(
            f"| {s['stage']} | {t['plain']['median'] * 1e3:.1f} [{t['plain']['min'] * 1e3:.1f}-"
            f"{t['plain']['max'] * 1e3:.1f}] | {t['lookahead']['median'] * 1e3:.1f} "
            f"[{t['lookahead']['min'] * 1e3:.1f}-{t['lookahead']['max'] * 1e3:.1f}] | "
            f"{r['median']:.3f} [{r['min']:.3f}-{r['max']:.3f}] |"
        )
    return lines


def plot(summaries: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    names = [s["stage"] for s in summaries]
    xs = range(len(names))
    width = 0.38

    ax = axes[0]
    moments = [s["per_rank"][0]["adam_moments"] / 2**20 for s in summaries]
    phi = [s["per_rank"][0]["phi"] / 2**20 for s in summaries]
    ax.bar([x - width / 2 for x in xs], moments, width, label="Adam moments (rank 0)")
    ax.bar([x + width / 2 for x in xs], phi, width, label="φ (rank 0)")
    ax.axhline(summaries[0]["full_copy_bytes"] / 2**20, color="red", ls="--", label="full fp32 copy 4·P")
    ax.set_ylim(0, 1.35 * summaries[0]["full_copy_bytes"] / 2**20)
    ax.set_ylabel("MiB per rank")
    ax.set_title("optimizer state per rank (N=2)")

    ax = axes[1]
    ax.bar(
        [x - width / 2 for x in xs], [s["calls_per_step"]["plain"] for s in summaries], width, label="plain"
    )
    ax.bar(
        [x + width / 2 for x in xs],
        [s["calls_per_step"]["lookahead"] for s in summaries],
        width,
        label="Lookahead",
    )
    ax.set_ylabel("collective calls per step")
    ax.set_title("collectives per step (identical lists)")

    ax = axes[2]
    for offset, name in ((-width / 2, "plain"), (width / 2, "lookahead")):
        med = [s["step_time_s"][name]["median"] * 1e3 for s in summaries]
        lo = [m - s["step_time_s"][name]["min"] * 1e3 for m, s in zip(med, summaries)]
        hi = [s["step_time_s"][name]["max"] * 1e3 - m for m, s in zip(med, summaries)]
        ax.bar([x + offset for x in xs], med, width, yerr=[lo, hi], capsize=3, label=name)
    ax.set_ylabel("ms per training step")
    ax.set_title("step time (2 CPU ranks, gloo)")
    for ax in axes:
        ax.set_xticks(list(xs), names)
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stages", default="1,2,3")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bf16", action="store_true", help="bf16 weights (DeepSpeed bf16 section)")
    parser.add_argument("--quick", action="store_true", help="2 repeats")
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--out", type=Path, default=BENCH_DIR, help="folder for bench_zero.json/.png")
    parser.add_argument("--no-results-md", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.repeats = 2
    worker_args = [
        "--stages",
        args.stages,
        "--dim",
        str(args.dim),
        "--layers",
        str(args.layers),
        "--k",
        str(args.k),
        "--repeats",
        str(args.repeats),
        *(["--bf16"] if args.bf16 else []),
    ]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        ranks = launch(worker_args, Path(tmp) / "zero", args.timeout)
    elapsed = time.perf_counter() - started
    summaries = [summarize(ranks, f"zero{s}") for s in args.stages.split(",")]
    lines = tables(summaries)
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_zero.json").write_text(
        json.dumps({"args": vars(args) | {"out": str(args.out)}, "summaries": summaries}, indent=1)
    )
    plot(summaries, args.out / "bench_zero.png")
    print(f"\nwrote {args.out / 'bench_zero.json'} and {args.out / 'bench_zero.png'} ({elapsed:.0f} s)")
    if not args.no_results_md:
        command = command_line("benchmarks.bench_zero", sys.argv[1:])
        body = [
            *environment_lines("cpu"),
            f"- command: `{command}` ({elapsed:.0f} s, including process start-up)",
            (
                f"- model: {args.layers} pre-LayerNorm residual MLP blocks (d={args.dim}, hidden {4 * args.dim}) + "
                f"LayerNorm + Linear head, {'bf16' if args.bf16 else 'fp32'}; torch AdamW; Lookahead k={args.k}, "
                "α=0.5 via `lookahead_dist.deepspeed.install`; 2 processes, gloo, micro-batch 4×16 tokens."
            ),
            "",
            *lines,
            "",
            "![ZeRO benchmark](bench_zero.png)",
        ]
        update_section(RESULTS_MD, "bench_zero", "\n".join(body))


if __name__ == "__main__":
    main()
