"""The paper's claims at our scale: Lookahead vs its inner optimizer on the LM and NMT examples, across learning rates.

Zhang et al. 2019 (arXiv 1907.08610) claim that Lookahead makes training more robust to the inner optimizer's
learning rate and lowers the variance between runs. This measures that on two of the examples, importing their
own model and data code, one process, one thread, a plain PyTorch loop (no Lightning Trainer):

* ``--task lm`` (the default): ``examples/lm``, its GPT-2 model and its WikiText-2 data code; the score is the
  validation perplexity;
* ``--task nmt``: ``examples/nmt``, its Marian encoder-decoder (``TranslationModule``: label-smoothed loss, the
  inverse-sqrt warm-up schedule, greedy decoding) and its Tatoeba de→en data code; the score is sacrebleu's
  corpus BLEU (0-100, ``examples.nmt.model.corpus_bleu``) on a seeded subset of the validation split, with the
  teacher-forced validation NLL beside it.

For each task:

* AdamW vs Lookahead(AdamW) and SGD with momentum 0.9 vs Lookahead(SGD), k=5, α=0.5, at equal steps and
  data (a seed fixes the initial weights and the batch order for every optimizer);
* a learning-rate sweep of 5 values spanning 100× for each inner optimizer, from below its best to where it
  degrades or diverges; 3 seeds each (mean ± std);
* at the default learning rate: k ∈ {5, 10} × α ∈ {0.5, 0.8} and ``alpha="adaptive"`` (NMT: AdamW first,
  then SGD).

Every score is that of the weights one would keep (φ for Lookahead) at the end; learning curves are recorded
every ``--val-every`` steps. Runs are resumable: every finished run is stored in ``--store`` (JSON) and skipped
next time, so the sweep can run in pieces; ``--only`` picks a subset. Runs are seed-major: a partial sweep
already covers every learning rate.

    nice -n 10 .venv/bin/python -m benchmarks.bench_paper                 # LM sweep, resumable
    nice -n 19 .venv/bin/python -m benchmarks.bench_paper --task nmt      # NMT sweep, resumable
    .venv/bin/python -m benchmarks.bench_paper --report                   # no training: tables, plots, RESULTS.md
    .venv/bin/python -m benchmarks.bench_paper --steps 20 --seeds 1 --store /tmp/p.json --only adamw --no-report
    .venv/bin/python -m benchmarks.bench_paper --task nmt --steps 20 --seeds 1 --store /tmp/p.json --only adamw --no-report

Writes ``bench_paper.json`` / ``bench_paper_nmt.json`` (the runs of each task), ``bench_paper_lr.png`` and
``bench_paper_nmt_lr.png`` (final score against the learning rate), ``bench_paper_curves.png`` and
``bench_paper_nmt_curves.png`` (learning curves with seed bands), and the "bench_paper" section of RESULTS.md.
The report always rewrites both parts of that section (each from its own store) and keeps both hand-written
readings (the text after ``<!-- reading -->`` and after ``<!-- reading nmt -->``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from benchmarks.common import BENCH_DIR, REPO, RESULTS_MD, command_line, pyplot, read_section, update_section

# The NMT data goes through datasets.load_dataset("csv"): keep its cache beside the tokenizers, not in ~/.cache.
os.environ.setdefault("HF_DATASETS_CACHE", str(REPO / "out" / "cache" / "hf-datasets"))

from examples.lm.data import LMDataModule
from examples.lm.model import build_causal_lm
from lookahead_dist import Lookahead

SECTION = "bench_paper"
TASKS = ("lm", "nmt")
# A model small enough for ~80 runs on one core, trained past its first fast descent.
MODEL: dict[str, Any] = {"n_layer": 1, "n_head": 2, "n_embd": 64, "dropout": 0.0}
DATA: dict[str, Any] = {"vocab_size": 2048, "seq_len": 64, "batch_size": 16, "max_val_blocks": 64}
FAMILIES: dict[str, dict[str, Any]] = {
    # default: where the k/α variants run; AdamW's is the LM example's (configs/lm_base.yaml), SGD's its best.
    "adamw": {"lrs": (6e-4, 2e-3, 6e-3, 2e-2, 6e-2), "default": 2e-3},
    "sgd": {"lrs": (0.03, 0.1, 0.3, 1.0, 3.0), "default": 0.1},
}
# NMT: configs/nmt_base.yaml scaled down (half as wide, one layer each side, a quarter of the batch tokens) so
# that the whole sweep runs on one core; its run times are in RESULTS.md. Dropout 0 as in the LM half: runs
# see a fraction of one epoch, so there is nothing to regularise, and it removes a source of seed noise.
NMT_MODEL: dict[str, Any] = {
    "d_model": 128,
    "layers": 1,
    "heads": 4,
    "ffn_dim": 512,
    "dropout": 0.0,
    "label_smoothing": 0.1,
    "warmup_steps": 100,
}
NMT_DATA: dict[str, Any] = {
    "data_file": "{data}/tatoeba-deu-eng/deu.txt",
    "columns": ("en", "de"),
    "source_lang": "de",
    "target_lang": "en",
    "vocab_size": 2000,
    "max_len": 64,
    "max_tokens": 512,
    "max_val_pairs": 400,
    "seed": 0,
}
NMT_FAMILIES: dict[str, dict[str, Any]] = {
    # lr = the peak of the inverse-sqrt schedule. AdamW's default is the NMT example's (configs/nmt_base.yaml).
    "adamw": {"lrs": (6e-4, 2e-3, 6e-3, 2e-2, 6e-2), "default": 2e-3},
    "sgd": {"lrs": (0.03, 0.1, 0.2, 0.4, 1.0), "default": 0.2},  # 1-seed probe: 0.3 trains, 0.5 diverges
}
TASK_FAMILIES = {"lm": FAMILIES, "nmt": NMT_FAMILIES}
# Defaults per task; the LM runs in bench_paper.json are 300 steps.
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "lm": {"steps": 300, "val_every": 50, "bleu_every": 0, "store": BENCH_DIR / "bench_paper.json"},
    "nmt": {"steps": 500, "val_every": 50, "bleu_every": 250, "store": BENCH_DIR / "bench_paper_nmt.json"},
}
COMMANDS = {
    "lm": command_line("benchmarks.bench_paper", [], prefix="nice -n 10"),
    "nmt": command_line("benchmarks.bench_paper", ["--task", "nmt"], prefix="nice -n 19"),
}
FAMILY_NAMES = {"adamw": ("AdamW", "Lookahead(AdamW)"), "sgd": ("SGD-m", "Lookahead(SGD-m)")}
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
READING, READING_NMT, NMT_PART = "<!-- reading -->", "<!-- reading nmt -->", "<!-- nmt -->"


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


def make_optimizer(
    family: str, lr: float, params: Any, variant: str, task: str = "lm"
) -> torch.optim.Optimizer:
    if family == "adamw":
        betas = (0.9, 0.98) if task == "nmt" else (0.9, 0.999)  # NMT: the example's (configs/nmt_base.yaml)
        inner: torch.optim.Optimizer = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=0.01)
    else:
        inner = torch.optim.SGD(params, lr=lr, momentum=0.9)
    spec = VARIANTS[variant]
    return inner if spec is None else Lookahead(inner, **spec)


def train_step(opt: torch.optim.Optimizer, loss: torch.Tensor, step: int, losses: list, alphas: list) -> bool:
    """Backward and one optimizer step; records the loss and the α applied at a sync. False once diverged."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    value = float(loss)
    losses.append(value)
    if isinstance(opt, Lookahead) and opt.last_alpha and step % opt.k == 0:
        alphas.append(opt.last_alpha[0])
    return math.isfinite(value) and value <= 20


def kept_weights(opt: torch.optim.Optimizer) -> Any:
    """The weights one would keep in the parameters for the body: φ for Lookahead, else as they are."""
    return opt.use_slow_weights() if isinstance(opt, Lookahead) else contextlib.nullcontext()


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
        if not train_step(opt, model(input_ids=ids, labels=ids).loss, step, losses, alphas):
            curve.append((step, DIVERGED))
            break
        if step % val_every == 0 or step == steps:
            with kept_weights(opt):
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


# ---------------------------------------------------------------------------------------------------- NMT
class NMTData:
    """The NMT example's data module, set up once: its length-sorted token batches, collate, validation."""

    def __init__(self) -> None:
        from examples.nmt.data import TranslationDataModule

        self.dm = TranslationDataModule(dataset_name=None, dataset_config=None, **NMT_DATA)
        self.dm.prepare_data()
        self.dm.setup()
        loader = self.dm.train_dataloader()  # one item = one whole batch of example indices
        self.batches, self.collate = loader.dataset, loader.collate_fn
        self.val = list(self.dm.val_dataloader())  # a seeded random max_val_pairs of the validation split
        self.references = self.dm.references("validation")

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        return self.collate([self.batches[index]])


@torch.no_grad()
def evaluate_nmt(module: Any, data: NMTData, bleu: bool) -> tuple[float, float | None]:
    """Teacher-forced NLL per target token (no smoothing) and, if ``bleu``, greedy corpus BLEU (0-100)."""
    from examples.nmt.model import corpus_bleu

    module.eval()
    total, count, hypotheses = 0.0, 0, []
    for batch in data.val:
        tokens = int((batch["labels"] != -100).sum())
        total += float(module._loss(module._logits(batch), batch["labels"], 0.0)) * tokens
        count += tokens
        if bleu:
            generated = module.translate(batch["input_ids"], batch["attention_mask"], num_beams=1)
            hypotheses += data.dm.decode(generated)
    module.train()
    score = corpus_bleu(hypotheses, data.references)[0] if bleu else None
    nll = total / count
    return (nll if math.isfinite(nll) else DIVERGED), score


def train_nmt(
    family: str,
    lr: float,
    variant: str,
    seed: int,
    steps: int,
    val_every: int,
    bleu_every: int,
    data: NMTData,
) -> dict:
    from examples.nmt.model import TranslationModule, inverse_sqrt

    torch.manual_seed(seed)
    module = TranslationModule(
        vocab_size=NMT_DATA["vocab_size"], max_len=NMT_DATA["max_len"], val_num_beams=1, **NMT_MODEL
    )
    module.train()
    opt = make_optimizer(family, lr, module.parameters(), variant, task="nmt")
    order = torch.Generator().manual_seed(10_000 + seed)  # the same batches for every optimizer
    curve: list[tuple[int, float]] = []  # validation NLL
    bleu_curve: list[tuple[int, float]] = []
    losses: list[float] = []
    alphas: list[float] = []
    started = time.process_time()
    perm = torch.randperm(len(data.batches), generator=order)
    cursor = 0
    for step in range(1, steps + 1):
        if cursor >= len(perm):
            perm, cursor = torch.randperm(len(data.batches), generator=order), 0
        batch = data.batch(int(perm[cursor]))
        cursor += 1
        # The example's schedule (TranslationModule.on_train_batch_start): peak lr x inverse_sqrt(step).
        factor = inverse_sqrt(step, NMT_MODEL["warmup_steps"])
        for group in opt.param_groups:
            group["lr"] = lr * factor
        loss = module._loss(module._logits(batch), batch["labels"], NMT_MODEL["label_smoothing"])
        if not train_step(opt, loss, step, losses, alphas):
            curve.append((step, DIVERGED))
            bleu_curve.append((step, DIVERGED))
            break
        with_bleu = step == steps or (bleu_every > 0 and step % bleu_every == 0)
        if step % val_every == 0 or with_bleu:
            with kept_weights(opt):
                nll, bleu = evaluate_nmt(module, data, with_bleu)
            curve.append((step, nll))
            if bleu is not None:
                bleu_curve.append((step, bleu))
    return {
        "task": "nmt",
        "family": family,
        "lr": lr,
        "variant": variant,
        "seed": seed,
        "steps": steps,
        "curve": curve,
        "bleu_curve": bleu_curve,
        "final": bleu_curve[-1][1],  # BLEU of φ (Lookahead) or of the weights (inner) at the end
        "final_nll": curve[-1][1],
        "train_loss_last50": statistics.fmean(losses[-50:]),
        "mean_alpha": statistics.fmean(alphas) if alphas else None,
        "cpu_s": time.process_time() - started,
        "train_batches": len(data.batches),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }


# ---------------------------------------------------------------------------------------------------- store
def load_all(store: Path, task: str = "lm") -> list[dict]:
    """Runs of ``task`` from ``store`` and every ``bench_paper*.json`` beside it, each (setting, seed, steps) once.

    LM runs carry no ``task`` field (they predate the NMT half); NMT runs say ``"task": "nmt"``.
    """
    files = {store, *store.parent.glob("bench_paper*.json")}
    seen: dict[str, dict] = {}
    for path in sorted(files):
        if path.exists():
            for r in json.loads(path.read_text()):
                if r.get("task", "lm") == task:
                    key = run_key(r["family"], r["lr"], r["variant"], r["seed"], r["steps"], task)
                    seen.setdefault(key, r)
    return list(seen.values())


def run_key(family: str, lr: float, variant: str, seed: int, steps: int, task: str = "lm") -> str:
    key = f"{family}|{lr:g}|{variant}|{seed}|{steps}"
    return key if task == "lm" else f"{task}|{key}"


def plan(
    seeds: list[int], only: set[str] | None, families: dict[str, dict[str, Any]] = FAMILIES
) -> list[tuple[str, float, str, int]]:
    """Every run, seed-major: a partial sweep already covers every learning rate."""
    out = []
    for seed in seeds:
        for family, spec in families.items():
            if only and family not in only:
                continue
            for lr in spec["lrs"]:
                for variant in SWEPT:
                    out.append((family, lr, variant, seed))
    # the k/α variants after every seed's sweep; the first family's (AdamW) for all seeds before the next's
    for family, spec in families.items():
        if only and family not in only:
            continue
        for seed in seeds:
            for variant in VARIANTS:
                if variant not in SWEPT:
                    out.append((family, spec["default"], variant, seed))
    return out


# ---------------------------------------------------------------------------------------------------- report
def fmt(values: list[float], digits: int = 1) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not values:
        return "—"
    if not finite:
        return "diverged" if len(values) == 1 else f"diverged ({len(values)}/{len(values)})"
    text = f"{statistics.fmean(finite):.{digits}f}"
    if len(finite) > 1:
        text += f" ± {statistics.stdev(finite):.{digits}f}"
    if len(finite) < len(values):
        text += f" ({len(values) - len(finite)} diverged)"
    return text


def std_ratio(inner: list[float], la: list[float]) -> str:
    fi, fl = [v for v in inner if math.isfinite(v)], [v for v in la if math.isfinite(v)]
    if len(fi) > 1 and len(fl) > 1 and statistics.stdev(fi) > 0:
        return f"{statistics.stdev(fl) / statistics.stdev(fi):.2f}"
    return "—"


def group(runs: list[dict], steps: int) -> dict[tuple[str, float, str], list[dict]]:
    out: dict[tuple[str, float, str], list[dict]] = {}
    for r in runs:
        if r["steps"] == steps:
            out.setdefault((r["family"], r["lr"], r["variant"]), []).append(r)
    return out


def sweep_table(groups: dict, seeds_wanted: int, families: dict[str, dict[str, Any]] = FAMILIES) -> str:
    lines = []
    for family, spec in families.items():
        names = FAMILY_NAMES[family]
        lines.append(f"| lr | {names[0]} | {names[1]} | seeds | std ratio (LA / inner) |")
        lines.append("|---:|---:|---:|---:|---:|")
        for lr in spec["lrs"]:
            inner = [r["final"] for r in groups.get((family, lr, "inner"), [])]
            la = [r["final"] for r in groups.get((family, lr, "la k5 a0.5"), [])]
            lines.append(
                f"| {lr:g} | {fmt(inner)} | {fmt(la)} | {min(len(inner), len(la))}/{seeds_wanted} | "
                f"{std_ratio(inner, la)} |"
            )
        lines.append("")
    return "\n".join(lines)


def nmt_sweep_table(groups: dict, seeds_wanted: int) -> str:
    """Per family and peak lr: BLEU and validation NLL of both optimizers, and their std ratios."""
    lines = []
    for family, spec in NMT_FAMILIES.items():
        a, b = FAMILY_NAMES[family]
        lines.append(
            f"| peak lr | {a} BLEU | {b} BLEU | std ratio BLEU | {a} val NLL | {b} val NLL | "
            "std ratio NLL | seeds |"
        )
        lines.append("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for lr in spec["lrs"]:
            inner = groups.get((family, lr, "inner"), [])
            la = groups.get((family, lr, "la k5 a0.5"), [])
            bi, bl = [r["final"] for r in inner], [r["final"] for r in la]
            ni, nl = [r["final_nll"] for r in inner], [r["final_nll"] for r in la]
            lines.append(
                f"| {lr:g} | {fmt(bi, 2)} | {fmt(bl, 2)} | {std_ratio(bi, bl)} | {fmt(ni, 3)} | {fmt(nl, 3)} | "
                f"{std_ratio(ni, nl)} | {min(len(inner), len(la))}/{seeds_wanted} |"
            )
        lines.append("")
    return "\n".join(lines)


def variant_table(groups: dict, families: dict[str, dict[str, Any]] = FAMILIES, key: str = "final",
                  digits: int = 1) -> str:  # fmt: skip
    lines = ["| inner (default lr) | " + " | ".join(VARIANTS) + " |", "|---|" + "---:|" * len(VARIANTS)]
    for family, spec in families.items():
        cells = [
            fmt([r[key] for r in groups.get((family, spec["default"], v), [])], digits) for v in VARIANTS
        ]
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


def _lr_panel(ax: Any, groups: dict, family: str, spec: dict[str, Any], key: str, ylabel: str, log_y: bool) -> None:
    """Final ``key`` against the learning rate, inner vs Lookahead k=5 α=0.5, mean ± std over seeds."""
    import matplotlib.ticker

    for variant, label, color in (("inner", family, "C0"), ("la k5 a0.5", f"Lookahead({family})", "C1")):
        xs, ys, sds = [], [], []
        for lr in spec["lrs"]:
            vals = [r[key] for r in groups.get((family, lr, variant), []) if math.isfinite(r[key])]
            if vals:
                xs.append(lr)
                ys.append(statistics.fmean(vals))
                sds.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
        if xs:
            ax.errorbar(xs, ys, yerr=sds, marker="o", capsize=3, color=color, label=label)
    ax.set(xscale="log", ylabel=f"{ylabel} (φ for Lookahead)")
    if log_y:
        ax.set_yscale("log")
    ax.set_xticks(list(spec["lrs"]), [f"{lr:g}" for lr in spec["lrs"]])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    gone = [
        f"{lr:g}"
        for lr in spec["lrs"]
        if all(not math.isfinite(r[key]) for v in SWEPT for r in groups.get((family, lr, v), [{key: 0}]))
    ]
    if gone:
        ax.text(0.02, 0.02, "diverged (both): lr " + ", ".join(gone), transform=ax.transAxes, fontsize=8)
    ax.grid(True, which="both", alpha=0.3)


def _curves_figure(
    groups: dict, families: dict[str, dict[str, Any]], path: Path, title: str, ylabel: str, log_y: bool, lr_name: str
) -> None:
    """Validation curves per (family, lr): mean over seeds, band = min..max; 'diverged' where all runs did."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 5, figsize=(17, 6.5), sharex=True)
    for row, (family, spec) in zip(axes, families.items()):
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
                steps = [rs[0]["curve"][i][0] for i in range(length)]
                mat = [[r["curve"][i][1] for r in rs] for i in range(length)]
                mean = [statistics.fmean(v) for v in mat]
                lo, hi = [min(v) for v in mat], [max(v) for v in mat]
                ax.plot(steps, mean, color=color, label="inner" if variant == "inner" else "Lookahead")
                ax.fill_between(steps, lo, hi, color=color, alpha=0.25)
            if log_y:
                ax.set_yscale("log")
            ax.set_title(f"{family} {lr_name}={lr:g}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
        row[0].set_ylabel(ylabel)
        row[0].legend(fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plots(groups: dict) -> list[str]:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (family, spec) in zip(axes, FAMILIES.items()):
        _lr_panel(ax, groups, family, spec, "final", "final val perplexity", log_y=True)
        ax.set_xlabel("inner learning rate")
        ax.set_title(f"{family}: mean ± std over seeds", fontsize=10)
        ax.legend(fontsize=9)
    fig.suptitle("LM example (1x64 GPT-2, WikiText-2): robustness to the learning rate", fontsize=11)
    fig.tight_layout()
    fig.savefig(BENCH_DIR / "bench_paper_lr.png", dpi=110)
    plt.close(fig)
    _curves_figure(groups, FAMILIES, BENCH_DIR / "bench_paper_curves.png",
                   "Learning curves: mean over seeds, band = min..max", "val perplexity", True, "lr")  # fmt: skip
    return ["bench_paper_lr.png", "bench_paper_curves.png"]


def nmt_plots(groups: dict) -> list[str]:
    """BLEU and validation NLL against the peak lr (top / bottom row), and validation-NLL learning curves."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex="col")
    for col, (family, spec) in enumerate(NMT_FAMILIES.items()):
        for row, (key, ylabel) in enumerate((("final", "final val BLEU"), ("final_nll", "final val NLL"))):
            ax = axes[row][col]
            _lr_panel(ax, groups, family, spec, key, ylabel, log_y=False)
            if row == 0:
                ax.set_title(f"{family}: mean ± std over seeds", fontsize=10)
                ax.legend(fontsize=9)
            else:
                ax.set_xlabel("peak learning rate (inverse-sqrt schedule)")
    model = f"{NMT_MODEL['layers']}+{NMT_MODEL['layers']} x {NMT_MODEL['d_model']} Marian"
    fig.suptitle(f"NMT example ({model}, Tatoeba de→en): robustness to the learning rate", fontsize=11)
    fig.tight_layout()
    fig.savefig(BENCH_DIR / "bench_paper_nmt_lr.png", dpi=110)
    plt.close(fig)
    _curves_figure(groups, NMT_FAMILIES, BENCH_DIR / "bench_paper_nmt_curves.png",
                   "NMT learning curves: validation NLL, mean over seeds, band = min..max",
                   "val NLL (teacher-forced)", False, "peak lr")  # fmt: skip
    return ["bench_paper_nmt_lr.png", "bench_paper_nmt_curves.png"]


def measured_on(runs: list[dict], store: Path) -> str:
    """The date(s) the runs were made: their own ``date`` fields, else the store's last commit, else today."""
    dates = sorted({r["date"] for r in runs if r.get("date")})
    if dates:
        return dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
    try:
        out = subprocess.run(
            ["git", "log", "-1", "--format=%cs", "--", store.name],
            cwd=store.parent, capture_output=True, text=True, check=True,
        )  # fmt: skip
        if out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return time.strftime("%Y-%m-%d")


def lm_body(runs: list[dict], steps: int, val_every: int, seeds: int, store: Path) -> str:
    groups = group(runs, steps)
    cpu = sum(r["cpu_s"] for r in runs if r["steps"] == steps)
    names = plots(groups)
    import transformers

    print(sweep_table(groups, seeds))
    print(variant_table(groups))
    return (
        "## The paper's claims on the LM example (bench_paper)\n\n"
        f"Produced by `{COMMANDS['lm']}` (runs stored in `benchmarks/bench_paper.json`; {len(groups)} settings, "
        f"{sum(len(v) for v in groups.values())} runs, {cpu / 60:.0f} min of CPU in all) on {platform.machine()} "
        f"Linux, {os.cpu_count()} shared CPU cores, one process with 1 thread; Python {platform.python_version()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}; {measured_on(runs, store)}.\n\n"
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
    )


def nmt_body(runs: list[dict], steps: int, val_every: int, bleu_every: int, seeds: int, store: Path) -> str:
    groups = group(runs, steps)
    done = [r for r in runs if r["steps"] == steps]
    cpu = sum(r["cpu_s"] for r in done)
    names = nmt_plots(groups)
    import sacrebleu
    import tokenizers
    import transformers

    from examples.nmt.model import corpus_bleu

    signature = corpus_bleu(["a"], ["a"])[1]
    wanted = len(plan(list(range(seeds)), None, NMT_FAMILIES))
    per_run = statistics.median(r["cpu_s"] for r in done) if done else 0.0
    tokens = steps * NMT_DATA["max_tokens"]
    bleu_at = f"every {bleu_every} steps and at the end" if bleu_every else "at the end"
    batches = [r["train_batches"] for r in done if r.get("train_batches")]
    epoch = f"{steps / batches[0]:.2f} of an epoch of {batches[0]} batches" if batches else "under one epoch"
    print(nmt_sweep_table(groups, seeds))
    print(variant_table(groups, NMT_FAMILIES, "final", 2))
    print(variant_table(groups, NMT_FAMILIES, "final_nll", 3))
    d = NMT_DATA
    return (
        "## The paper's claims on the NMT example (bench_paper --task nmt)\n\n"
        f"Produced by `{COMMANDS['nmt']}` (runs stored in `benchmarks/{store.name}`; {len(groups)} settings, "
        f"{len(done)} of the {wanted} planned runs, {cpu / 60:.0f} min of CPU in all, median {per_run:.0f} s a "
        f"run including evaluation) on {platform.machine()} Linux, {os.cpu_count()} shared CPU cores, one process "
        f"with 1 thread; Python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, tokenizers {tokenizers.__version__}, sacrebleu {sacrebleu.__version__}; "
        f"{measured_on(done, store)}.\n\n"
        f"Setup: the NMT example's `TranslationModule` (`examples/nmt/model.py`: Marian encoder-decoder, "
        f"{NMT_MODEL['layers']} encoder + {NMT_MODEL['layers']} decoder layer, d_model {NMT_MODEL['d_model']}, "
        f"{NMT_MODEL['heads']} heads, FFN {NMT_MODEL['ffn_dim']}, dropout {NMT_MODEL['dropout']}, label smoothing "
        f"{NMT_MODEL['label_smoothing']}) and its data code (`examples/nmt/data.py`: Tatoeba de→en from "
        f"`{d['data_file']}`, its leak-free train/validation/test cut, joint byte-level BPE of {d['vocab_size']}, "
        f"length-sorted batches of at most {d['max_tokens']} tokens padding included), trained for {steps} steps "
        f"(at most {tokens / 1e3:.0f}k tokens, {epoch}) with the example's inverse-sqrt schedule: linear warm-up over "
        f"{NMT_MODEL['warmup_steps']} steps to the peak lr in the tables, then 1/sqrt(step). AdamW betas (0.9, "
        "0.98), weight decay 0.01 (the example's); SGD momentum 0.9; no clipping. Lookahead k=5, α=0.5 unless "
        "named, evaluated on φ (`use_slow_weights()`). A seed fixes the initial weights and the batch order for "
        "every optimizer. Scores on a fixed seeded subset of "
        f"{d['max_val_pairs']} validation sentences (the data module's `max_val_pairs`): sacrebleu corpus BLEU "
        f"(0-100) of greedy translations (`TranslationModule.translate`, `examples.nmt.model.corpus_bleu`, "
        f"signature `{signature}`), decoded {bleu_at}; the teacher-forced validation NLL per target token (no "
        f"smoothing) every {val_every} steps. 'diverged': the training loss went non-finite or above 20.\n\n"
        "Final validation BLEU and NLL, mean ± std over seeds (std ratio: Lookahead's std / the inner optimizer's):\n\n"
        f"{nmt_sweep_table(groups, seeds)}\n"
        f"![final BLEU and NLL against the peak learning rate]({names[0]})\n\n"
        f"![NMT learning curves]({names[1]})\n\n"
        "At the default peak learning rate (AdamW: the NMT example's "
        f"{NMT_FAMILIES['adamw']['default']:g}; SGD: {NMT_FAMILIES['sgd']['default']:g}), k and α; BLEU:\n\n"
        f"{variant_table(groups, NMT_FAMILIES, 'final', 2)}\n\n"
        "Validation NLL:\n\n"
        f"{variant_table(groups, NMT_FAMILIES, 'final_nll', 3).split(chr(10) + chr(10))[0]}\n\n"
    )


def kept_readings(md: Path) -> tuple[str, str]:
    """The hand-written LM and NMT readings now in RESULTS.md's section ('' where there is none)."""
    section = read_section(md, SECTION)
    lm = nmt = ""
    if READING in section:
        lm = section.split(READING, 1)[1].split(NMT_PART, 1)[0].strip("\n")
    if READING_NMT in section:
        nmt = section.split(READING_NMT, 1)[1].strip("\n")
    return lm, nmt


def report(stores: dict[str, Path], steps: dict[str, int], seeds: dict[str, int]) -> None:
    """Rewrite the whole bench_paper section: the LM part, then the NMT part, each with its kept reading."""
    md = RESULTS_MD
    lm_reading, nmt_reading = kept_readings(md)
    lm = lm_body(
        load_all(stores["lm"], "lm"), steps["lm"], TASK_DEFAULTS["lm"]["val_every"], seeds["lm"], stores["lm"]
    )
    nmt_runs = load_all(stores["nmt"], "nmt")
    nmt = nmt_body(
        nmt_runs, steps["nmt"], TASK_DEFAULTS["nmt"]["val_every"], TASK_DEFAULTS["nmt"]["bleu_every"], seeds["nmt"],
        stores["nmt"],
    )  # fmt: skip
    body = (
        lm
        + f"{READING}\n"
        + (lm_reading or "Reading: to be written from the numbers above.")
        + f"\n\n{NMT_PART}\n"
        + nmt
        + f"{READING_NMT}\n"
        + (nmt_reading or "Reading: to be written from the numbers above.")
    )
    update_section(md, SECTION, body)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", choices=TASKS, default="lm", help="lm (default) or nmt")
    parser.add_argument("--steps", type=int, default=None, help="default: lm 300, nmt 500")
    parser.add_argument("--val-every", type=int, default=None, help="default: 50")
    parser.add_argument(
        "--bleu-every", type=int, default=None, help="NMT: decode for BLEU every N steps too (default 250)"
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--store",
        type=Path,
        default=None,
        help="where finished runs go (default: bench_paper.json, nmt: bench_paper_nmt.json)",
    )
    parser.add_argument(
        "--seed-list",
        default="",
        help="comma-separated seeds this process runs (default: all); several "
        "processes with their own --store (bench_paper*.json beside this script) can share the sweep",
    )
    parser.add_argument("--only", default="", help="comma-separated families (adamw,sgd) to run")
    parser.add_argument(
        "--lrs", default="", help="comma-separated lrs replacing the sweep's (a probe; use its own --store)"
    )
    parser.add_argument("--report", action="store_true", help="no training: table, plots, RESULTS.md")
    parser.add_argument(
        "--variants-only", action="store_true", help="only the k/α variants at the default lr"
    )
    parser.add_argument(
        "--no-variants", action="store_true", help="only the lr sweep (inner and Lookahead k5 α0.5)"
    )
    parser.add_argument("--no-report", action="store_true", help="train only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    task = args.task
    defaults = TASK_DEFAULTS[task]
    steps = args.steps if args.steps is not None else defaults["steps"]
    val_every = args.val_every if args.val_every is not None else defaults["val_every"]
    bleu_every = args.bleu_every if args.bleu_every is not None else defaults["bleu_every"]
    store: Path = args.store if args.store is not None else defaults["store"]
    families = TASK_FAMILIES[task]
    if args.lrs:
        lrs = tuple(float(x) for x in args.lrs.split(","))
        families = {f: {"lrs": lrs, "default": spec["default"]} for f, spec in families.items()}
    runs: list[dict] = json.loads(store.read_text()) if store.exists() else []
    done = {
        run_key(r["family"], r["lr"], r["variant"], r["seed"], r["steps"], task)
        for r in load_all(store, task)
    }
    if not args.report:
        data: Any = load_data() if task == "lm" else NMTData()
        seeds = [int(s) for s in args.seed_list.split(",") if s] or list(range(args.seeds))
        todo = [
            t
            for t in plan(seeds, set(filter(None, args.only.split(","))), families)
            if run_key(*t, steps, task) not in done
            and not (args.variants_only and t[2] in SWEPT)
            and not (args.no_variants and t[2] not in SWEPT)
        ]
        print(f"[paper] {task}: {len(todo)} runs to do, {len(done)} stored in {store}", flush=True)
        for i, (family, lr, variant, seed) in enumerate(todo, 1):
            if task == "lm":
                result = train(family, lr, variant, seed, steps, val_every, data)
                score = f"final ppl {result['final']:.1f}"
            else:
                result = train_nmt(family, lr, variant, seed, steps, val_every, bleu_every, data)
                score = f"final BLEU {result['final']:.2f}, val NLL {result['final_nll']:.3f}"
            runs.append(result)
            tmp = store.with_suffix(".tmp")
            tmp.write_text(json.dumps(runs))
            tmp.replace(store)  # a run is stored whole or not at all
            print(
                f"[paper] {i}/{len(todo)} {family} lr={lr:g} {variant} seed={seed}: {score} "
                f"({result['cpu_s']:.0f} s CPU)",
                flush=True,
            )
    if not args.no_report:
        stores = {t: TASK_DEFAULTS[t]["store"] for t in TASKS}
        stores[task] = store
        all_steps = {t: TASK_DEFAULTS[t]["steps"] for t in TASKS}
        all_steps[task] = steps
        all_seeds = {t: 3 for t in TASKS}
        all_seeds[task] = args.seeds
        report(stores, all_steps, all_seeds)


if __name__ == "__main__":
    main()
