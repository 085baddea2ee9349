"""Fixed vs adaptive Lookahead α on the LM example (examples/lm), one CPU process.

Four runs of ``python -m examples.lm.cli fit --config configs/lm_cpu.yaml [--config <lookahead yaml>]``, each in
its own subprocess, same seed (``seed_everything`` in configs/lm_base.yaml), data and AdamW settings:

* ``adamw``: AdamW alone;
* ``lookahead α=0.5``: ``configs/lm_lookahead.yaml`` (k=5, α=0.5);
* ``adaptive [0.5, 1]``: ``configs/lm_lookahead_adaptive.yaml`` (k=5, α="adaptive", bounds [0.5, 1]);
* ``adaptive [0.1, 1]``: the same with ``--trainer.callbacks.init_args.alpha_bounds=[0.1,1.0]``.

Reads each run's ``logs/metrics.csv`` (``val_ppl``, ``lookahead/alpha``, ``lookahead/syncs``), prints a table (final
and best validation perplexity, mean α over syncs and how often it sat at a bound, wall time), writes
``bench_adaptive.png`` (validation perplexity and α over steps) and the "bench_adaptive" section of RESULTS.md.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.bench_adaptive             # 300 steps, val every 50
    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.bench_adaptive --steps 20 --val-every 10 --out /tmp/ba --results-dir /tmp/ba
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from benchmarks.common import BENCH_DIR, REPO, RESULTS_MD, command_line, pyplot, read_section, update_section
from examples.common.runs import read_metrics, run_cli, series

SECTION = "bench_adaptive"

SETUP = "configs/lm_cpu.yaml"
MARKER = "<!-- hand-written reading below -->"
DEFAULT_READING = "\n\nOne seed, one short run: read differences of a few percent in perplexity as noise.\n"
RUNS: dict[str, dict] = {
    "adamw": {"dir": "adamw", "args": []},
    "lookahead α=0.5": {"dir": "fixed_0.5", "args": ["--config", "configs/lm_lookahead.yaml"]},
    "adaptive [0.5, 1]": {
        "dir": "adaptive_0.5_1",
        "args": ["--config", "configs/lm_lookahead_adaptive.yaml"],
        "bounds": (0.5, 1.0),
    },
    "adaptive [0.1, 1]": {
        "dir": "adaptive_0.1_1",
        "args": [
            "--config",
            "configs/lm_lookahead_adaptive.yaml",
            "--trainer.callbacks.init_args.alpha_bounds=[0.1,1]",
        ],
        "bounds": (0.1, 1.0),
    },
}


def cli_args(run_args: list[str], run_dir: Path, steps: int, val_every: int) -> list[str]:
    return [
        "fit", "--config", SETUP, *run_args,
        f"--trainer.default_root_dir={run_dir}", f"--trainer.max_steps={steps}",
        f"--trainer.val_check_interval={val_every}", "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
    ]  # fmt: skip


def alphas_per_sync(rows: list[dict[str, float]]) -> list[tuple[int, float]]:
    """(step, α) once per sync: the α on the first logged row after ``lookahead/syncs`` went up."""
    out, seen = [], 0.0
    for row in rows:
        syncs = row.get("lookahead/syncs")
        if syncs is not None and syncs > seen and "lookahead/alpha" in row:
            out.append((int(row["step"]), row["lookahead/alpha"]))
            seen = syncs
    return out


def run(name: str, spec: dict, out_dir: Path, steps: int, val_every: int, timeout: float) -> dict:
    run_dir = out_dir / spec["dir"]
    # The CLI runs from the repository root: a relative folder keeps the printed commands portable.
    shown_dir = run_dir.relative_to(REPO) if run_dir.is_relative_to(REPO) else run_dir
    args = cli_args(spec["args"], shown_dir, steps, val_every)
    print(f"[bench] {name}: python -m examples.lm.cli {' '.join(args)}", flush=True)
    started = time.perf_counter()
    proc = run_cli("lm", args, run_dir / "run.log", timeout=timeout)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        print((run_dir / "run.log").read_text()[-4000:], file=sys.stderr)
        raise SystemExit(f"[bench] {name} failed (exit {proc.returncode}); log: {run_dir / 'run.log'}")
    rows = read_metrics(run_dir)
    result = {
        "name": name,
        "command": "python -m examples.lm.cli " + " ".join(args),
        "val_ppl": series(rows, "val_ppl"),
        "tokens_per_s": series(rows, "train_tokens_per_s")[-1][1],
        "seconds": seconds,
        "alphas": alphas_per_sync(rows),
        "syncs": max((v for _, v in series(rows, "lookahead/syncs")), default=0.0),
    }
    values = [a for _, a in result["alphas"]]
    result["mean_alpha"] = statistics.fmean(values) if values else None
    bounds = spec.get("bounds")
    if bounds and values:
        result["at_low"] = sum(abs(v - bounds[0]) < 1e-6 for v in values) / len(values)
        result["at_high"] = sum(abs(v - bounds[1]) < 1e-6 for v in values) / len(values)
    print(f"[bench] {name}: final val ppl {result['val_ppl'][-1][1]:.2f}, {seconds:.0f} s", flush=True)
    return result


def table(results: list[dict]) -> str:
    lines = [
        "| run | final val ppl | best val ppl | syncs | mean α | α at low / high bound | train tokens/s | wall time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        ppl = [v for _, v in r["val_ppl"]]
        mean = "—" if r["mean_alpha"] is None else f"{r['mean_alpha']:.3f}"
        clip = f"{r['at_low']:.0%} / {r['at_high']:.0%}" if "at_low" in r else "—"
        lines.append(
            f"| {r['name']} | {ppl[-1]:.2f} | {min(ppl):.2f} | {r['syncs']:.0f} | {mean} | {clip} | "
            f"{r['tokens_per_s']:.0f} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, (ax_ppl, ax_alpha) = plt.subplots(1, 2, figsize=(11, 4))
    for i, r in enumerate(results):
        color = f"C{i}"  # same colour for a run in both panels
        steps, ppl = zip(*r["val_ppl"])
        # metrics.csv's step for a validation row is the number of optimizer steps done minus one.
        ax_ppl.plot([s + 1 for s in steps], ppl, marker="o", color=color, label=r["name"])
        if r["alphas"]:
            xs, ys = zip(*r["alphas"])
            ax_alpha.plot([x + 1 for x in xs], ys, marker=".", lw=0.8, color=color, label=r["name"])
    ax_ppl.set(xlabel="optimizer step", ylabel="validation perplexity (slow weights)", yscale="log",
               title="LM example (GPT-2 2x128, WikiText-2), 1 CPU process")  # fmt: skip
    ax_alpha.set(
        xlabel="optimizer step", ylabel="α applied at each sync", ylim=(0, 1.05), title="Lookahead α"
    )
    for ax in (ax_ppl, ax_alpha):
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def versions() -> str:
    import lightning
    import torch
    import transformers

    return (
        f"Python {platform.python_version()}, torch {torch.__version__}, lightning {lightning.__version__}, "
        f"transformers {transformers.__version__}"
    )


def interpretation(results: list[dict]) -> str:
    by_name = {r["name"]: r for r in results}
    final = {name: r["val_ppl"][-1][1] for name, r in by_name.items()}
    best = min(final, key=final.get)
    adaptive = [r for r in results if "at_low" in r]
    parts = [
        f"Lowest final validation perplexity: **{best}** ({final[best]:.2f}); AdamW alone {final['adamw']:.2f}, "
        + f"fixed α=0.5 {final['lookahead α=0.5']:.2f}."
    ]
    for r in adaptive:
        inside = 1.0 - r["at_low"] - r["at_high"]
        parts.append(
            f"{r['name']}: mean α {r['mean_alpha']:.3f} over {len(r['alphas'])} syncs; {r['at_low']:.0%} at the low "
            f"bound, {r['at_high']:.0%} at the high bound, {inside:.0%} strictly inside."
        )
    return " ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    parser.add_argument("--val-every", type=int, default=50, help="validate every this many steps")
    parser.add_argument("--out", type=Path, default=REPO / "out" / "bench_adaptive", help="run folders")
    parser.add_argument("--results-dir", type=Path, default=BENCH_DIR, help="where the PNG and the .md go")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per run")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    started = time.perf_counter()
    results = [
        run(name, spec, args.out, args.steps, args.val_every, args.timeout) for name, spec in RUNS.items()
    ]
    total = time.perf_counter() - started
    text = table(results)
    print("\n" + text)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    png = args.results_dir / "bench_adaptive.png"
    plot(results, png)
    commands = "\n".join(r["command"] for r in results)
    md = args.results_dir / RESULTS_MD.name
    argv = ["--steps", str(args.steps), "--val-every", str(args.val_every)]
    # The hand-written reading below the marker survives a re-run (update it when the numbers change).
    kept = read_section(md, SECTION).partition(MARKER)[2]
    update_section(
        md,
        SECTION,
        "## Adaptive α on the LM example (bench_adaptive)\n\n"
        f"Produced by `{command_line('benchmarks.bench_adaptive', argv, prefix='OMP_NUM_THREADS=1')}` "
        f"({total:.0f} s in all) on {platform.machine()} Linux, "
        f"{os.cpu_count()} CPU cores, no GPU, one training process with 1 thread; {versions()}. "
        "The machine may be shared with other jobs, so times are rough.\n\n"
        "Setup: the LM example's defaults (`configs/lm_base.yaml`: GPT-2 config 2 layers x 128 wide, 4 heads, "
        "BPE vocabulary 4096, 128-token blocks, batch 16, trained on WikiText-2 valid.txt, validated on 64 blocks of "
        "test.txt, AdamW lr 0.002 weight decay 0.01 on one param group, seed 1234) plus `configs/lm_cpu.yaml`. "
        "Every run sees the same batches. Lookahead runs validate on the slow weights φ (the callback's default). "
        "The adaptive rule is the sign test of `lookahead_dist/core/adaptive.py`: α leaves its lower bound only "
        "while consecutive cycle displacements agree (t-statistic of d_tᵀd_{t−1}/‖d_{t−1}‖², momentum carry "
        "removed), reaching the upper bound at z ≥ 3.\n\n"
        f"Commands (one subprocess each):\n\n```\n{commands}\n```\n\n"
        f"{text}\n\n![validation perplexity and α]({png.name})\n\n"
        f"{interpretation(results)}\n\n{MARKER}{kept or DEFAULT_READING}",
    )
    print(f"[bench] wrote {png} and {md} ({total:.0f} s)")


if __name__ == "__main__":
    main()
