"""``make demo``: Adam vs Lookahead(Adam) on real text, 2-process DeepSpeed ZeRO-2 on this CPU.

Trains the small GPT-2 of ``configs/lm_base.yaml`` on WikiText-2 (offline copy: valid.txt for training, test.txt
for validation) twice with the same seed, data order and optimizer; the only difference is
``configs/lm_lookahead.yaml`` (the ``LookaheadCallback``). Prints a table and writes ``out/demo/``:
``val_ppl.png`` (both validation curves), ``results.md`` and each run's logs and checkpoints.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from examples.common.paths import REPO_ROOT
from examples.common.runs import read_metrics, run_cli, series

RUNS = {"adam": [], "lookahead_adam": ["--config", "configs/lm_lookahead.yaml"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", default="configs/lm_zero2.yaml", help="the trainer/strategy config")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per run")
    parser.add_argument("--val-every", type=int, default=50, help="validate every this many steps")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "out" / "demo")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per run")
    parser.add_argument(
        "extra", nargs="*", help="more CLI arguments for both runs, e.g. --optimizer.init_args.lr=3e-3"
    )
    args = parser.parse_args(argv)

    results = {}
    for name, lookahead_args in RUNS.items():
        run_dir = args.out / name
        cli_args = [
            "fit", "--config", args.setup, *lookahead_args,
            f"--trainer.default_root_dir={run_dir}", f"--trainer.max_steps={args.steps}",
            f"--trainer.val_check_interval={args.val_every}", "--trainer.enable_progress_bar=false",
            "--data.batch_size=8", "--data.max_val_blocks=32", *args.extra,
        ]  # fmt: skip
        print(f"[demo] {name}: python -m examples.lm.cli {' '.join(cli_args)}", flush=True)
        started = time.perf_counter()
        proc = run_cli("lm", cli_args, run_dir / "run.log", timeout=args.timeout)
        seconds = time.perf_counter() - started
        if proc.returncode != 0:
            print((run_dir / "run.log").read_text()[-4000:], file=sys.stderr)
            print(
                f"[demo] {name} failed (exit {proc.returncode}); full log: {run_dir / 'run.log'}",
                file=sys.stderr,
            )
            return 1
        rows = read_metrics(run_dir)
        results[name] = {
            "val_ppl": series(rows, "val_ppl"),
            "tokens_per_s": series(rows, "train_tokens_per_s")[-1][1],
            "seconds": seconds,
        }
        print(f"[demo] {name}: done in {seconds:.0f} s", flush=True)

    table = format_table(results)
    print("\n" + table)
    args.out.mkdir(parents=True, exist_ok=True)
    plot_path = plot(results, args.out / "val_ppl.png")
    (args.out / "results.md").write_text(table + f"\n\nPlot: {plot_path.name}\n")
    print(f"\n[demo] plot: {plot_path}\n[demo] table: {args.out / 'results.md'}")
    return 0


def format_table(results: dict[str, dict]) -> str:
    lines = [
        "| run | final val ppl | best val ppl | train tokens/s (2 processes) | wall time (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, res in results.items():
        ppl = [value for _, value in res["val_ppl"]]
        lines.append(
            f"| {name} | {ppl[-1]:.1f} | {min(ppl):.1f} | {res['tokens_per_s']:.0f} | {res['seconds']:.0f} |"
        )
    return "\n".join(lines)


def plot(results: dict[str, dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, res in results.items():
        steps, ppl = zip(*res["val_ppl"])
        ax.plot([s + 1 for s in steps], ppl, marker="o", label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation perplexity (WikiText-2 test)")
    ax.set_yscale("log")
    ax.set_title("tiny GPT-2 (configs/lm_base.yaml), DeepSpeed ZeRO-2, 2 CPU processes")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
