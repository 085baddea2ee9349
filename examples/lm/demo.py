"""``make demo``: AdamW vs Lookahead(AdamW) at a low and a high learning rate, 2-process DeepSpeed ZeRO-2 on CPU.

Trains the small GPT-2 of ``configs/lm_base.yaml`` on WikiText-2 (offline copy: valid.txt for training, test.txt
for validation) four times with the same seed and data order: AdamW and Lookahead(AdamW) (``configs/lm_lookahead.yaml``,
k=5, α=0.5) at each of two learning rates. What it shows is the paper's robustness claim as measured by
``benchmarks/bench_paper.py``: at a good learning rate the two are close; at a high one AdamW stalls while
Lookahead keeps improving. Prints progress at every validation, then a table, and writes ``out/demo/``:
``val_ppl.png`` (validation curves, final values annotated), ``results.md`` and each run's logs.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from examples.common.paths import REPO_ROOT
from examples.common.runs import read_metrics, run_env, series

try:  # the callback below is loaded by the training processes through the command line
    import lightning as L
except ImportError:  # pragma: no cover - the examples need lightning anyway
    L = None  # type: ignore[assignment]

PROGRESS = "[progress]"
LABEL_ENV = "LOOKAHEAD_DEMO_LABEL"  # names the run in the progress lines of its training processes
OPTIMIZERS = {"adamw": [], "lookahead": ["--config", "configs/lm_lookahead.yaml"]}

EPILOG = """\
examples (each works as written from the repository root):
  .venv/bin/python -m examples.lm.demo                                  # the default: lr 0.002 and 0.02
  .venv/bin/python -m examples.lm.demo --lrs 0.003 0.03 --steps 200     # other learning rates, shorter
  .venv/bin/python -m examples.lm.demo --optimizer.init_args.weight_decay=0.1   # any CLI option, for every run
  .venv/bin/python -m examples.lm.demo --setup configs/lm_cpu.yaml      # one process instead of ZeRO-2

Options the demo does not know (like --optimizer.init_args.weight_decay=0.1 above) are passed to every run of
`python -m examples.lm.cli fit`; put them anywhere on the line. The learning rate of each run is set with --lrs.
"""


if L is not None:

    class DemoProgress(L.Callback):
        """Prints one line per validation (rank 0): step, last training loss, validation loss and perplexity."""

        def __init__(self) -> None:
            self.label = os.environ.get(LABEL_ENV, "")

        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            if trainer.sanity_checking or not trainer.is_global_zero:
                return
            metrics = trainer.callback_metrics

            def value(name: str) -> str:
                v = metrics.get(name)
                return "—" if v is None else f"{float(v):.3f}" if name.endswith("loss") else f"{float(v):.1f}"

            print(
                f"{PROGRESS} {self.label} step {trainer.global_step:>4}: train loss {value('train_loss')}, "
                f"val loss {value('val_loss')}, val ppl {value('val_ppl')}",
                flush=True,
            )


def run_streaming(args: list[str], log_file: Path, timeout: float, label: str) -> int:
    """``python -m examples.lm.cli <args>``: everything into ``log_file``, progress lines also to stdout."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open(log_file, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "examples.lm.cli", *args],
            cwd=REPO_ROOT, env={**run_env(), LABEL_ENV: label}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,  # its own process group: a timeout also ends DeepSpeed's workers
        )  # fmt: skip
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                log.write(line)
                if line.startswith(PROGRESS):
                    print("[demo]" + line[len(PROGRESS) :].rstrip(), flush=True)
                if time.monotonic() - started > timeout:
                    raise subprocess.TimeoutExpired(proc.args, timeout)
            return proc.wait(timeout=max(1.0, timeout - (time.monotonic() - started)))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            print(f"[demo] timed out after {timeout:.0f} s; log: {log_file}", file=sys.stderr)
            return 124


def metrics_folder(run_dir: Path) -> Path:
    """The folder holding the newest ``metrics.csv`` under ``run_dir`` (the CLI may add a version folder)."""
    found = sorted(run_dir.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no metrics.csv under {run_dir}")
    folder = found[-1].parent
    return folder.parent if folder.name == "logs" else folder


def read_run(run_dir: Path) -> list[dict[str, float]]:
    folder = metrics_folder(run_dir)
    if (folder / "logs" / "metrics.csv").exists():
        return read_metrics(folder)
    import csv

    with open(folder / "metrics.csv") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m examples.lm.demo",
        description="The demo behind `make demo`: AdamW vs Lookahead(AdamW) at a low and a high learning rate, "
        "same seed and data, 2-process DeepSpeed ZeRO-2 on CPU (minutes; README.md gives the measured time).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.002, 0.02], help="AdamW learning rates")
    parser.add_argument("--steps", type=int, default=250, help="optimizer steps per run (default 250)")
    parser.add_argument("--val-every", type=int, default=25, help="validate every this many steps")
    parser.add_argument("--setup", default="configs/lm_zero2.yaml", help="the trainer/strategy config")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "out" / "demo", help="where results go")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per run")
    parser.add_argument(
        "--plot-only", action="store_true", help="no training: table and plot from the runs in --out"
    )
    args, extra = parser.parse_known_args(argv)
    if extra and extra[0] == "--":
        extra = extra[1:]
    if extra and not extra[0].startswith("--"):
        parser.error(
            f"unexpected {extra[0]!r}: options for the CLI look like --optimizer.init_args.weight_decay=0.1"
        )

    results: dict[str, dict] = {}
    started_all = time.perf_counter()
    for lr in args.lrs:
        for name, lookahead_args in OPTIMIZERS.items():
            label = f"{name} lr={lr:g}"
            run_dir = args.out / f"{name}_lr{lr:g}"
            cli_args = [
                "fit", "--config", args.setup, *lookahead_args,
                f"--trainer.default_root_dir={run_dir}", f"--trainer.max_steps={args.steps}",
                f"--trainer.val_check_interval={args.val_every}", "--trainer.enable_progress_bar=false",
                "--trainer.enable_model_summary=false", "--trainer.log_every_n_steps=5",
                "--data.batch_size=8", "--data.max_val_blocks=32", f"--optimizer.init_args.lr={lr}",
                "--trainer.callbacks+=examples.lm.demo.DemoProgress", *extra,
            ]  # fmt: skip
            started = time.perf_counter()
            code = 0
            if not args.plot_only:
                print(f"[demo] {label}: python -m examples.lm.cli {' '.join(cli_args)}", flush=True)
                code = run_streaming(cli_args, run_dir / "run.log", args.timeout, label)
            seconds = time.perf_counter() - started if not args.plot_only else math.nan
            if code != 0:
                print((run_dir / "run.log").read_text()[-4000:], file=sys.stderr)
                print(
                    f"[demo] {label} failed (exit {code}); full log: {run_dir / 'run.log'}", file=sys.stderr
                )
                return 1
            rows = read_run(run_dir)
            results[label] = {
                "lr": lr, "optimizer": name, "val_ppl": series(rows, "val_ppl"), "seconds": seconds,
                "tokens_per_s": (series(rows, "train_tokens_per_s") or [(0, math.nan)])[-1][1],
            }  # fmt: skip
            if not args.plot_only:
                print(f"[demo] {label}: done in {seconds:.0f} s", flush=True)

    table = format_table(results)
    print("\n" + table)
    finding = summary(results)
    print("\n" + finding)
    args.out.mkdir(parents=True, exist_ok=True)
    plot_path = plot(results, args.out / "val_ppl.png", args.steps, Path(args.setup).stem)
    total = time.perf_counter() - started_all
    (args.out / "results.md").write_text(
        f"{table}\n\n{finding}\n\nPlot: {plot_path.name} ({total:.0f} s in all)\n"
    )
    print(f"\n[demo] plot: {plot_path}\n[demo] table: {args.out / 'results.md'} ({total:.0f} s in all)")
    return 0


def format_table(results: dict[str, dict]) -> str:
    lines = [
        "| run | final val ppl | best val ppl | train tokens/s | wall time (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, res in results.items():
        ppl = [value for _, value in res["val_ppl"]]
        lines.append(
            f"| {label} | {ppl[-1]:.1f} | {min(ppl):.1f} | {res['tokens_per_s']:.0f} | {res['seconds']:.0f} |"
        )
    return "\n".join(lines)


def summary(results: dict[str, dict]) -> str:
    """One sentence per learning rate: final validation perplexity, AdamW vs Lookahead(AdamW)."""
    parts = []
    for lr in dict.fromkeys(r["lr"] for r in results.values()):
        final = {r["optimizer"]: r["val_ppl"][-1][1] for r in results.values() if r["lr"] == lr}
        if {"adamw", "lookahead"} <= set(final):
            a, la = final["adamw"], final["lookahead"]
            parts.append(f"lr {lr:g}: AdamW {a:.1f}, Lookahead(AdamW) {la:.1f} ({(la - a) / a:+.0%}).")
    return "Final validation perplexity (lower is better) — " + " ".join(parts)


def plot(results: dict[str, dict], path: Path, steps: int, setup: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    lrs = list(dict.fromkeys(r["lr"] for r in results.values()))
    fig, axes = plt.subplots(1, len(lrs), figsize=(5.2 * len(lrs), 4.3), squeeze=False)
    colors = {"adamw": "C0", "lookahead": "C1"}
    names = {"adamw": "AdamW", "lookahead": "Lookahead(AdamW) k=5 α=0.5"}
    for ax, lr in zip(axes[0], lrs):
        for res in (r for r in results.values() if r["lr"] == lr):
            steps_, ppl = zip(*res["val_ppl"])
            xs = [s + 1 for s in steps_]
            color = colors[res["optimizer"]]
            ax.plot(xs, ppl, marker="o", ms=3, color=color, label=names[res["optimizer"]])
            ax.annotate(
                f"{ppl[-1]:.0f}", (xs[-1], ppl[-1]), textcoords="offset points", xytext=(4, 0),
                va="center", color=color, fontsize=9, fontweight="bold",
            )  # fmt: skip
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(
            LogLocator(base=10, subs=(1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0))
        )
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlim(0, steps * 1.12)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("validation perplexity")
        ax.set_title(f"AdamW lr = {lr:g}", fontsize=11)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=9)
    where = "2-process DeepSpeed ZeRO-2 on CPU" if setup == "lm_zero2" else setup
    fig.suptitle(f"Tiny GPT-2 on WikiText-2, {where}\nLookahead evaluated on its slow weights φ", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
