"""Fixed vs adaptive Lookahead α on a small language model (CPU, a few minutes).

A 2-layer GPT-2 (``transformers.GPT2LMHeadModel`` from a config) trains on Tiny Shakespeare at character
level (the offline copy in ``../shared/data``; override with ``LOOKAHEAD_DATA_DIR``) with AdamW, alone and
wrapped in Lookahead with a fixed α and with ``alpha="adaptive"`` (two bound settings). All runs share the
seed, the batches and the evaluation batches; validation uses the slow weights φ (``use_slow_weights``).

Prints a table (final validation loss / perplexity, mean α and how often it was clipped, wall time),
writes ``bench_adaptive.png`` (validation loss and α over steps) and ``RESULTS_adaptive.md``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_adaptive.py            # 300 steps
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_adaptive.py --steps 60 # smoke run
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from lookahead_dist import Lookahead  # noqa: E402

SEQ, BATCH, EVAL_BATCHES = 64, 16, 8
RUNS: dict[str, dict] = {
    "adamw": {},
    "lookahead α=0.5": {"alpha": 0.5},
    "adaptive [0.5, 1]": {"alpha": "adaptive", "alpha_bounds": (0.5, 1.0)},
    "adaptive [0.1, 1]": {"alpha": "adaptive", "alpha_bounds": (0.1, 1.0)},
}


def data_dir() -> Path:
    override = os.environ.get("LOOKAHEAD_DATA_DIR")
    return Path(override) if override else HERE.parent / ".." / "shared" / "data"


def load_tokens() -> tuple[torch.Tensor, torch.Tensor, int]:
    text = (data_dir() / "tinyshakespeare" / "input.txt").read_text()
    vocab = sorted(set(text))
    index = {ch: i for i, ch in enumerate(vocab)}
    ids = torch.tensor([index[ch] for ch in text], dtype=torch.long)
    split = int(0.9 * len(ids))
    return ids[:split], ids[split:], len(vocab)


def batches(ids: torch.Tensor, count: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - SEQ - 1, (count, BATCH), generator=gen)
    return [torch.stack([ids[s : s + SEQ] for s in row.tolist()]) for row in starts]


def make_model(vocab: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=vocab, n_positions=SEQ, n_embd=96, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def param_groups(model: torch.nn.Module, lr: float) -> list[dict]:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    return [
        {"params": decay, "lr": lr, "weight_decay": 0.1},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0},
    ]


@torch.no_grad()
def evaluate(model: torch.nn.Module, val: list[torch.Tensor]) -> float:
    model.eval()
    losses = [model(input_ids=b, labels=b).loss.item() for b in val]
    model.train()
    return statistics.fmean(losses)


def run(name: str, spec: dict, train: list[torch.Tensor], val: list[torch.Tensor], vocab: int, lr: float,
        k: int, eval_every: int) -> dict:  # fmt: skip
    model = make_model(vocab)
    inner = torch.optim.AdamW(param_groups(model, lr), betas=(0.9, 0.99))
    opt = Lookahead(inner, k=k, **spec) if spec else inner
    curve, alphas = [], []
    started = time.perf_counter()
    for step, batch in enumerate(train, start=1):
        opt.zero_grad()
        model(input_ids=batch, labels=batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        syncs_before = getattr(opt, "sync_count", 0)
        opt.step()
        if spec and opt.sync_count > syncs_before:
            alphas.append((step, dict(opt.last_alpha)))
        if step % eval_every == 0 or step == len(train):
            if spec:
                with opt.use_slow_weights():
                    curve.append((step, evaluate(model, val)))
            else:
                curve.append((step, evaluate(model, val)))
    seconds = time.perf_counter() - started
    values = [a for _, per_group in alphas for a in per_group.values()]
    bounds = spec.get("alpha_bounds")
    result = {"name": name, "curve": curve, "alphas": alphas, "seconds": seconds, "final": curve[-1][1]}
    result["mean_alpha"] = statistics.fmean(values) if values else None
    if bounds and values:
        result["at_low"] = sum(v == bounds[0] for v in values) / len(values)
        result["at_high"] = sum(v == bounds[1] for v in values) / len(values)
    print(f"  {name}: val loss {result['final']:.4f} in {seconds:.1f}s", flush=True)
    return result


def table(results: list[dict]) -> str:
    lines = ["| run | final val loss | val ppl | mean α | α at low / high bound | wall time (s) |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        mean = "—" if r["mean_alpha"] is None else f"{r['mean_alpha']:.3f}"
        clip = f"{r['at_low']:.0%} / {r['at_high']:.0%}" if "at_low" in r else "—"
        ppl = math.exp(r["final"])
        lines.append(f"| {r['name']} | {r['final']:.4f} | {ppl:.2f} | {mean} | {clip} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_alpha) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        steps, losses = zip(*r["curve"])
        ax_loss.plot(steps, losses, label=r["name"], marker=".")
        if r["alphas"] and "adaptive" in r["name"]:
            xs = [s for s, _ in r["alphas"]]
            ys = [statistics.fmean(g.values()) for _, g in r["alphas"]]
            ax_alpha.plot(xs, ys, label=r["name"], marker=".", lw=0.8)
    ax_loss.set(xlabel="step", ylabel="validation loss (slow weights)", title="Tiny Shakespeare, char GPT-2")
    ax_alpha.set(xlabel="step", ylabel="α (mean over groups)", title="adaptive α per sync", ylim=(0, 1.05))
    ax_loss.legend()
    ax_alpha.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--out-dir", type=Path, default=HERE)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    train_ids, val_ids, vocab = load_tokens()
    train, val = batches(train_ids, args.steps, seed=1), batches(val_ids, EVAL_BATCHES, seed=2)
    print(f"char vocab {vocab}, {args.steps} steps of {BATCH}x{SEQ} tokens, AdamW lr {args.lr}, k={args.k}")
    results = [
        run(name, spec, train, val, vocab, args.lr, args.k, args.eval_every) for name, spec in RUNS.items()
    ]
    text = table(results)
    print(text)
    png = args.out_dir / "bench_adaptive.png"
    plot(results, png)
    adaptive_runs = [r for r in results if "at_low" in r]
    clipped = statistics.fmean(r["at_low"] + r["at_high"] for r in adaptive_runs) if adaptive_runs else 0.0
    md = args.out_dir / "RESULTS_adaptive.md"
    md.write_text(
        "## Adaptive α (bench_adaptive)\n\n"
        f"Produced by `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_adaptive.py --steps {args.steps}` on "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread (machine shared with other "
        "jobs, so wall times are rough). Model: GPT-2 config, 2 layers, 96 wide, 4 heads, char-level Tiny Shakespeare "
        f"(90/10 split), {BATCH}x{SEQ} tokens per step, AdamW lr {args.lr} betas (0.9, 0.99), weight decay 0.1 on "
        f"matrices, grad-norm clip 1.0, Lookahead k={args.k}. Validation: {EVAL_BATCHES} fixed batches, slow weights. "
        "The adaptive rule is the paper's quadratic model with Adam's bias-corrected second moment as the curvature "
        "(see `lookahead_dist/adaptive.py`).\n\n"
        f"{text}\n\n![fixed vs adaptive α]({png.name})\n\n"
        f"Reading it: in the adaptive runs {clipped:.0%} of the per-group α values sat at a bound, i.e. the "
        "quadratic estimate 1 + gᵀd/dᵀAd was mostly outside [α_low, 1]. Adam's second moment is the mean of "
        "squared *mini-batch* gradients, not a Hessian, so the curvature scale it gives is off and the rule "
        "behaves much like a switch between the two bounds; α_low matters more than the rule. One seed, one "
        "short run: differences of a few hundredths in loss are within run-to-run noise.\n"
    )
    print(f"wrote {png} and {md}")


if __name__ == "__main__":
    main()
