"""The paper's claims at our scale: Lookahead vs its inner optimizer on the LM example, across learning rates.

Zhang et al. 2019 (arXiv 1907.08610) claim that Lookahead makes training more robust to the inner optimizer's
learning rate and lowers the variance between runs. This measures that on the LM example (``examples/lm``:
its GPT-2 model and its WikiText-2 data code, imported), one process, one thread, no Lightning:

* AdamW vs Lookahead(AdamW) and SGD with momentum 0.9 vs Lookahead(SGD), k=5, α=0.5, at equal steps and
  data (a seed fixes the initial weights and the batch order for every optimizer);
* a learning-rate sweep of 5 values spanning 100× for each inner optimizer, from below its best to where it
  degrades or diverges; 3 seeds each (mean ± std);
* at the default learning rate (AdamW: the LM example's 0.002; SGD: 0.1): k ∈ {5, 10} × α ∈ {0.5, 0.8} and
  ``alpha="adaptive"``.

The score is the validation perplexity of the weights one would keep (φ for Lookahead) at the end; learning
curves are recorded every ``--val-every`` steps. Runs are resumable: every finished run is stored in
``--store`` (JSON) and skipped next time, so the sweep can run in pieces; ``--only`` picks a subset.

    nice -n 10 .venv/bin/python benchmarks/bench_paper.py            # the whole sweep (~25 min CPU), resumable
    .venv/bin/python benchmarks/bench_paper.py --report              # only the table, plots and RESULTS.md
    .venv/bin/python benchmarks/bench_paper.py --steps 20 --seeds 1 --store /tmp/p.json --only adamw  # smoke

Writes ``bench_paper_lr.png`` (final perplexity against the learning rate), ``bench_paper_curves.png``
(learning curves with seed bands), ``bench_paper.json`` (the runs) and the "bench_paper" section of RESULTS.md.
The NMT half of the issue is not here: its BLEU is being reworked elsewhere and no fast configuration exists yet.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from examples.lm.data import LMDataModule
from examples.lm.model import build_causal_lm
from lookahead_dist import Lookahead

sys.path.insert(0, str(HERE))
from bench_sync import update_section

SECTION = "bench_paper"
# A model small enough for ~80 runs on one core, trained past its first fast descent.
MODEL: dict[str, Any] = {"n_layer": 1, "n_head": 2, "n_embd": 64, "dropout": 0.0}
DATA: dict[str, Any] = {"vocab_size": 2048, "seq_len": 64, "batch_size": 16, "max_val_blocks": 64}
FAMILIES: dict[str, dict[str, Any]] = {
    # default: where the k/α variants run; AdamW's is the LM example's (configs/lm_base.yaml), SGD's its best.
    "adamw": {"lrs": (6e-4, 2e-3, 6e-3, 2e-2, 6e-2), "default": 2e-3},
    "sgd": {"lrs": (0.03, 0.1, 0.3, 1.0, 3.0), "default": 0.1},
}
VARIANTS: dict[str, dict[str, Any] | None] = {  # name -> Lookahead keywords (None: the inner optimizer alone)
    "inner": None,
    "la k5 a0.5": {"k": 5, "alpha": 0.5},
    "la k10 a0.5": {"k": 10, "alpha": 0.5},
    "la k5 a0.8": {"k": 5, "alpha": 0.8},
    "la k10 a0.8": {"k": 10, "alpha": 0.8},
    "la k5 adaptive": {"k": 5, "alpha": "adaptive"},
}
SWEPT = ("inner", "la k5 a0.5")  # run at every lr; the others only at the default lr
DIVERGED = float("inf")


def load_data() -> tuple[torch.Tensor, torch.Tensor]:
    dm = LMDataModule(
        dataset_name=None,
        data_files={"train": "{data}/wikitext-2/valid.txt", "validation": "{data}/wikitext-2/test.txt"},
        **DATA,
    )
    dm.prepare_data()
    dm.setup()
    assert dm.train_set is not None and dm.val_set is not None
    return dm.train_set.tensors[0], dm.val_set.tensors[0]


def make_optimizer(family: str, lr: float, params: Any, variant: str) -> torch.optim.Optimizer:
    if family == "adamw":
        inner: torch.optim.Optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    else:
        inner = torch.optim.SGD(params, lr=lr, momentum=0.9)
    spec = VARIANTS[variant]
    return inner if spec is None else Lookahead(inner, **spec)


@torch.no_grad()
def evaluate(model: torch.nn.Module, val: torch.Tensor, batch: int) -> float:
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(val), batch):
        ids = val[start : start + batch]
        total += float(model(input_ids=ids, labels=ids).loss) * len(ids)
        count += len(ids)
    model.train()
    mean = total / count
    return math.exp(mean) if mean < 50 else DIVERGED


def train(family: str, lr: float, variant: str, seed: int, steps: int, val_every: int, data: Any) -> dict:
    train_ids, val_ids = data
    torch.manual_seed(seed)
    model = build_causal_lm(DATA["vocab_size"], DATA["seq_len"], pretrained=None, gguf_file=None, **MODEL)
    model.train()
    opt = make_optimizer(family, lr, model.parameters(), variant)
    order = torch.Generator().manual_seed(10_000 + seed)  # the same batches for every optimizer
    batch = DATA["batch_size"]
    curve: list[tuple[int, float]] = []
    losses: list[float] = []
    alphas: list[float] = []
    started = time.process_time()
    perm = torch.randperm(len(train_ids), generator=order)
    cursor = 0
    for step in range(1, steps + 1):
        if cursor + batch > len(perm):
            perm, cursor = torch.randperm(len(train_ids), generator=order), 0
        ids = train_ids[perm[cursor : cursor + batch]]
        cursor += batch
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = float(loss)
        losses.append(value)
        if isinstance(opt, Lookahead) and opt.last_alpha and step % opt.k == 0:
            alphas.append(opt.last_alpha[0])
        if not math.isfinite(value) or value > 20:
            curve.append((step, DIVERGED))
            break
        if step % val_every == 0 or step == steps:
            if isinstance(opt, Lookahead):
                with opt.use_slow_weights():
                    curve.append((step, evaluate(model, val_ids, batch)))
            else:
                curve.append((step, evaluate(model, val_ids, batch)))
    return {
        "family": family,
        "lr": lr,
        "variant": variant,
        "seed": seed,
        "steps": steps,
        "curve": curve,
        "final": curve[-1][1],
        "train_loss_last50": statistics.fmean(losses[-50:]),
        "mean_alpha": statistics.fmean(alphas) if alphas else None,
        "cpu_s": time.process_time() - started,
    }


def load_all(store: Path) -> list[dict]:
    """Runs from ``store`` and every ``bench_paper*.json`` beside it, each (setting, seed, steps) once."""
    files = {store, *store.parent.glob("bench_paper*.json")}
    seen: dict[str, dict] = {}
    for path in sorted(files):
        if path.exists():
            for r in json.loads(path.read_text()):
                seen.setdefault(run_key(r["family"], r["lr"], r["variant"], r["seed"], r["steps"]), r)
    return list(seen.values())


def run_key(family: str, lr: float, variant: str, seed: int, steps: int) -> str:
    return f"{family}|{lr:g}|{variant}|{seed}|{steps}"


def plan(seeds: list[int], only: set[str] | None) -> list[tuple[str, float, str, int]]:
    """Every run, seed-major: a partial sweep already covers every learning rate."""
    out = []
    for seed in seeds:
        for family, spec in FAMILIES.items():
            if only and family not in only:
                continue
            for lr in spec["lrs"]:
                for variant in SWEPT:
                    out.append((family, lr, variant, seed))
    for seed in seeds:  # the k/α variants after every seed's sweep
        for family, spec in FAMILIES.items():
            if only and family not in only:
                continue
            for variant in VARIANTS:
                if variant not in SWEPT:
                    out.append((family, spec["default"], variant, seed))
    return out


def fmt(values: list[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not values:
        return "—"
    if not finite:
        return "diverged" if len(values) == 1 else f"diverged ({len(values)}/{len(values)})"
    text = f"{statistics.fmean(finite):.1f}"
    if len(finite) > 1:
        text += f" ± {statistics.stdev(finite):.1f}"
    if len(finite) < len(values):
        text += f" ({len(values) - len(finite)} diverged)"
    return text


def group(runs: list[dict], steps: int) -> dict[tuple[str, float, str], list[dict]]:
    out: dict[tuple[str, float, str], list[dict]] = {}
    for r in runs:
        if r["steps"] == steps:
            out.setdefault((r["family"], r["lr"], r["variant"]), []).append(r)
    return out


def sweep_table(groups: dict, seeds_wanted: int) -> str:
    lines = []
    for family, spec in FAMILIES.items():
        names = {"adamw": ("AdamW", "Lookahead(AdamW)"), "sgd": ("SGD-m", "Lookahead(SGD-m)")}[family]
        lines.append(f"| lr | {names[0]} | {names[1]} | seeds | std ratio (LA / inner) |")
        lines.append("|---:|---:|---:|---:|---:|")
        for lr in spec["lrs"]:
            inner = [r["final"] for r in groups.get((family, lr, "inner"), [])]
            la = [r["final"] for r in groups.get((family, lr, "la k5 a0.5"), [])]
            ratio = "—"
            fi, fl = [v for v in inner if math.isfinite(v)], [v for v in la if math.isfinite(v)]
            if len(fi) > 1 and len(fl) > 1 and statistics.stdev(fi) > 0:
                ratio = f"{statistics.stdev(fl) / statistics.stdev(fi):.2f}"
            lines.append(
                f"| {lr:g} | {fmt(inner)} | {fmt(la)} | {min(len(inner), len(la))}/{seeds_wanted} | {ratio} |"
            )
        lines.append("")
    return "\n".join(lines)


def variant_table(groups: dict) -> str:
    lines = ["| inner (default lr) | " + " | ".join(VARIANTS) + " |", "|---|" + "---:|" * len(VARIANTS)]
    for family, spec in FAMILIES.items():
        cells = [fmt([r["final"] for r in groups.get((family, spec["default"], v), [])]) for v in VARIANTS]
        lines.append(f"| {family} lr={spec['default']:g} | " + " | ".join(cells) + " |")
    alphas = [
        r["mean_alpha"]
        for (f, lr, v), rs in groups.items()
        for r in rs
        if v == "la k5 adaptive" and r["mean_alpha"]
    ]
    if alphas:
        lines.append(
            f'\nMean α applied by `alpha="adaptive"` over all its runs: {statistics.fmean(alphas):.3f}.'
        )
    return "\n".join(lines)


def plots(groups: dict) -> list[str]:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (family, spec) in zip(axes, FAMILIES.items()):
        for variant, label, color in (("inner", family, "C0"), ("la k5 a0.5", f"Lookahead({family})", "C1")):
            xs, ys, lo, hi = [], [], [], []
            for lr in spec["lrs"]:
                vals = [
                    r["final"] for r in groups.get((family, lr, variant), []) if math.isfinite(r["final"])
                ]
                if vals:
                    xs.append(lr)
                    ys.append(statistics.fmean(vals))
                    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                    lo.append(ys[-1] - sd)
                    hi.append(ys[-1] + sd)
            if xs:
                ax.errorbar(xs, ys, yerr=[[y - v for y, v in zip(ys, lo)], [v - y for y, v in zip(ys, hi)]],
                            marker="o", capsize=3, color=color, label=label)  # fmt: skip
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="inner learning rate",
            ylabel="final val perplexity (φ for Lookahead)",
        )
        ax.set_xticks(list(spec["lrs"]), [f"{lr:g}" for lr in spec["lrs"]])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        gone = [
            f"{lr:g}"
            for lr in spec["lrs"]
            if all(
                not math.isfinite(r["final"])
                for v in SWEPT
                for r in groups.get((family, lr, v), [{"final": 0}])
            )
        ]
        if gone:
            ax.text(0.02, 0.02, "diverged (both): lr " + ", ".join(gone), transform=ax.transAxes, fontsize=8)
        ax.set_title(f"{family}: mean ± std over seeds", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=9)
    fig.suptitle("LM example (1x64 GPT-2, WikiText-2): robustness to the learning rate", fontsize=11)
    fig.tight_layout()
    fig.savefig(HERE / "bench_paper_lr.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(2, 5, figsize=(17, 6.5), sharex=True)
    for row, (family, spec) in zip(axes, FAMILIES.items()):
        for ax, lr in zip(row, spec["lrs"]):
            for variant, color in (("inner", "C0"), ("la k5 a0.5", "C1")):
                rs = [r for r in groups.get((family, lr, variant), []) if r["curve"][-1][1] != DIVERGED]
                if not rs:
                    if groups.get((family, lr, variant)):
                        y = 0.55 if variant == "inner" else 0.45
                        ax.text(0.5, y, f"{'inner' if variant == 'inner' else 'Lookahead'}: diverged",
                                transform=ax.transAxes, ha="center", color=color)  # fmt: skip
                    continue
                length = min(len(r["curve"]) for r in rs)
                steps = [r["curve"][i][0] for i in range(length) for r in rs[:1]]
                mat = [[r["curve"][i][1] for r in rs] for i in range(length)]
                mean = [statistics.fmean(v) for v in mat]
                lo, hi = [min(v) for v in mat], [max(v) for v in mat]
                ax.plot(steps, mean, color=color, label="inner" if variant == "inner" else "Lookahead")
                ax.fill_between(steps, lo, hi, color=color, alpha=0.25)
            ax.set_yscale("log")
            ax.set_title(f"{family} lr={lr:g}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
        row[0].set_ylabel("val perplexity")
        row[0].legend(fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    fig.suptitle("Learning curves: mean over seeds, band = min..max", fontsize=11)
    fig.tight_layout()
    fig.savefig(HERE / "bench_paper_curves.png", dpi=100)
    plt.close(fig)
    return ["bench_paper_lr.png", "bench_paper_curves.png"]


def report(runs: list[dict], steps: int, val_every: int, seeds: int, command: str) -> None:
    groups = group(runs, steps)
    cpu = sum(r["cpu_s"] for r in runs if r["steps"] == steps)
    names = plots(groups)
    import transformers

    body = (
        "## The paper's claims on the LM example (bench_paper)\n\n"
        f"Produced by `{command}` (runs stored in `benchmarks/bench_paper.json`; {len(groups)} settings, "
        f"{sum(len(v) for v in groups.values())} runs, {cpu / 60:.0f} min of CPU in all) on {platform.machine()} "
        f"Linux, {os.cpu_count()} shared CPU cores, one process with 1 thread; Python {platform.python_version()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}; {time.strftime('%Y-%m-%d')}.\n\n"
        f"Setup: GPT-2 {MODEL['n_layer']} layer x {MODEL['n_embd']} wide ({MODEL['n_head']} heads) from "
        f"`examples/lm/model.py`, BPE vocabulary {DATA['vocab_size']}, {DATA['seq_len']}-token blocks, batch "
        f"{DATA['batch_size']}, trained on WikiText-2 valid.txt for {steps} steps (about "
        f"{steps * DATA['batch_size'] * DATA['seq_len'] / 1e3:.0f}k tokens), validated every {val_every} steps on "
        f"{DATA['max_val_blocks']} blocks of test.txt (`examples/lm/data.py`). AdamW weight decay 0.01; SGD momentum "
        "0.9; no clipping, no schedule. Lookahead k=5, α=0.5 unless named; it is evaluated on φ. A seed fixes the "
        "initial weights and the batch order for every optimizer. 'diverged': the loss went non-finite or above 20.\n\n"
        "Final validation perplexity, mean ± std over seeds:\n\n"
        f"{sweep_table(groups, seeds)}\n"
        f"![final perplexity against the learning rate]({names[0]})\n\n"
        f"![learning curves]({names[1]})\n\n"
        "At the default learning rate (AdamW: the LM example's 0.002; SGD: 0.1), k and α:\n\n"
        f"{variant_table(groups)}\n\n"
        "<!-- reading -->\n"
    )
    md = HERE / "RESULTS.md"
    old = md.read_text() if md.exists() else ""
    begin, end = f"<!-- begin {SECTION} -->", f"<!-- end {SECTION} -->"
    kept = ""
    if begin in old and "<!-- reading -->" in old.split(begin, 1)[1].split(end, 1)[0]:
        kept = old.split(begin, 1)[1].split(end, 1)[0].split("<!-- reading -->", 1)[1].strip("\n")
    update_section(md, SECTION, body + (kept or "Reading: to be written from the numbers above."))
    print(sweep_table(groups, seeds))
    print(variant_table(groups))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--val-every", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--store", type=Path, default=HERE / "bench_paper.json", help="where finished runs go"
    )
    parser.add_argument(
        "--seed-list",
        default="",
        help="comma-separated seeds this process runs (default: all); several "
        "processes with their own --store (bench_paper*.json beside this script) can share the sweep",
    )
    parser.add_argument("--only", default="", help="comma-separated families (adamw,sgd) to run")
    parser.add_argument("--report", action="store_true", help="no training: table, plots, RESULTS.md")
    parser.add_argument(
        "--variants-only", action="store_true", help="only the k/α variants at the default lr"
    )
    parser.add_argument("--no-report", action="store_true", help="train only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs: list[dict] = json.loads(args.store.read_text()) if args.store.exists() else []
    done = {run_key(r["family"], r["lr"], r["variant"], r["seed"], r["steps"]) for r in load_all(args.store)}
    if not args.report:
        data = load_data()
        seeds = [int(s) for s in args.seed_list.split(",") if s] or list(range(args.seeds))
        todo = [
            t
            for t in plan(seeds, set(filter(None, args.only.split(","))))
            if run_key(*t, args.steps) not in done and not (args.variants_only and t[2] in SWEPT)
        ]
        print(f"[paper] {len(todo)} runs to do, {len(done)} stored in {args.store}", flush=True)
        for i, (family, lr, variant, seed) in enumerate(todo, 1):
            result = train(family, lr, variant, seed, args.steps, args.val_every, data)
            runs.append(result)
            tmp = args.store.with_suffix(".tmp")
            tmp.write_text(json.dumps(runs))
            tmp.replace(args.store)  # a run is stored whole or not at all
            print(
                f"[paper] {i}/{len(todo)} {family} lr={lr:g} {variant} seed={seed}: final ppl {result['final']:.1f} "
                f"({result['cpu_s']:.0f} s CPU)",
                flush=True,
            )
    if not args.no_report:
        report(
            load_all(args.store),
            args.steps,
            args.val_every,
            args.seeds,
            "nice -n 10 .venv/bin/python benchmarks/bench_paper.py",
        )


if __name__ == "__main__":
    main()
