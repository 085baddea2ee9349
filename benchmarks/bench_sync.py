"""Cost of Lookahead's per-step bookkeeping and of its sync, next to the bare inner optimizer (AdamW).

For each model shape (number of tensors x total parameters) and each AdamW implementation, one run measures,
side by side and repeated (blocks in alternating order):

* ``adamw``      step time of AdamW alone;
* ``la_step``    Lookahead(AdamW) on a step that does not sync (AdamW + per-step bookkeeping);
* ``la_sync``    Lookahead(AdamW) on a step that syncs (AdamW + bookkeeping + the sync);
* ``fused``      the sync alone as Lookahead does it: ``_foreach_lerp_`` + ``_foreach_copy_``;
* ``naive``      the same sync as a per-parameter Python loop (``slow.lerp_(fast); fast.copy_(slow)``);
* ``naive_add``  the loop most Lookahead ports write (``slow.add_(fast - slow, alpha=a); fast.copy_(slow)``).

It also counts the extra memory: bytes of φ against the parameters and AdamW's own state.
On CPU it also times the bookkeeping alone on tiny tensors (fixed and per-tensor µs per step).
Prints a table, writes ``bench_sync.json`` / ``bench_sync.png`` and the "bench_sync" section of RESULTS.md.

    .venv/bin/python -m benchmarks.bench_sync            # default grid (several minutes)
    .venv/bin/python -m benchmarks.bench_sync --quick    # small grid
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
from torch import Tensor

from benchmarks.common import (
    BENCH_DIR,
    RESULTS_MD,
    command_line,
    environment_lines,
    pyplot,
    spread,
    update_section,
)
from lookahead_dist import Lookahead
from lookahead_dist.core.keys import SLOW_KEY

K = 5
ALPHA = 0.5
INNER_KINDS = ("for-loop", "foreach", "fused")


def make_params(n_tensors: int, n_params: int, device: str, seed: int) -> list[Tensor]:
    """``n_tensors`` tensors of (about) equal size holding ``n_params`` elements, with fixed small grads."""
    gen = torch.Generator().manual_seed(seed)
    size = max(1, n_params // n_tensors)
    params: list[Tensor] = []
    for _ in range(n_tensors):
        p = torch.nn.Parameter(torch.randn(size, generator=gen).to(device) * 0.02)
        p.grad = (torch.randn(size, generator=gen) * 1e-3).to(device)
        params.append(p)
    return params


def make_adamw(params: list[Tensor], kind: str) -> torch.optim.AdamW:
    flags: dict[str, Any] = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[kind]
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, **flags)


def naive_sync(slow: list[Tensor], fast: list[Tensor], alpha: float) -> None:
    for s, f in zip(slow, fast):
        s.lerp_(f, alpha)
        f.copy_(s)


def naive_add_sync(slow: list[Tensor], fast: list[Tensor], alpha: float) -> None:
    for s, f in zip(slow, fast):
        s.add_(f - s, alpha=alpha)
        f.copy_(s)


def fused_sync(slow: list[Tensor], fast: list[Tensor], alpha: float) -> None:
    torch._foreach_lerp_(slow, fast, alpha)
    torch._foreach_copy_(fast, slow)


def timed(fn: Callable[[], object], device: str) -> float:
    """Seconds ``fn`` takes: this thread's CPU time on CPU (robust to other jobs on a shared machine, valid
    because every op here runs synchronously on this one thread), wall time with a sync on CUDA."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - start
    start = time.thread_time()
    fn()
    return time.thread_time() - start


def bench_case(n_tensors: int, n_params: int, kind: str, repeats: int, device: str) -> dict:
    with torch.no_grad():
        params_plain = make_params(n_tensors, n_params, device, seed=0)
        params_la = make_params(n_tensors, n_params, device, seed=0)
    plain = make_adamw(params_plain, kind)
    lookahead = Lookahead(make_adamw(params_la, kind), k=K, alpha=ALPHA)

    # Warm-up: creates AdamW state and φ, and gives a step-time estimate to size the blocks.
    for _ in range(K + 1):
        plain.step()
        lookahead.step()
    estimate = statistics.median([timed(plain.step, device) for _ in range(3)])
    cycles = max(2, min(40, int(0.25 / (K * max(estimate, 1e-6)))))
    sync_reps = max(3, min(200, int(0.1 / max(estimate, 1e-6))))

    slow = [lookahead.state[p][SLOW_KEY] for p in params_la]
    per_repeat: dict[str, list[float]] = {
        k: [] for k in ("adamw", "la_step", "la_sync", "fused", "naive", "naive_add")
    }
    for r in range(repeats):
        # Steps alternate one by one (plain, Lookahead, Lookahead, plain, ...), so that anything else the
        # machine does at the time hits both alike.
        plain_times: list[float] = []
        step_times: list[float] = []
        sync_times: list[float] = []
        for i in range(cycles * K):
            for which in ("plain", "lookahead") if i % 2 == 0 else ("lookahead", "plain"):
                if which == "plain":
                    plain_times.append(timed(plain.step, device))
                    continue
                before = lookahead.sync_count
                t = timed(lookahead.step, device)
                (sync_times if lookahead.sync_count != before else step_times).append(t)
        per_repeat["adamw"].append(statistics.median(plain_times))
        per_repeat["la_step"].append(statistics.median(step_times))
        per_repeat["la_sync"].append(statistics.median(sync_times))
        sync_fns = [("fused", fused_sync), ("naive", naive_sync), ("naive_add", naive_add_sync)]
        sync_samples: dict[str, list[float]] = {name: [] for name, _ in sync_fns}
        with torch.no_grad():
            for i in range(sync_reps):
                for name, fn in sync_fns if i % 2 == 0 else sync_fns[::-1]:
                    sync_samples[name].append(timed(lambda fn=fn: fn(slow, params_la, ALPHA), device))  # type: ignore[misc]
        for name, samples in sync_samples.items():
            per_repeat[name].append(statistics.median(samples))

    ratios = {
        "bookkeeping": [s / a for s, a in zip(per_repeat["la_step"], per_repeat["adamw"])],
        "sync_step": [s / a for s, a in zip(per_repeat["la_sync"], per_repeat["adamw"])],
        "amortized": [
            ((K - 1) * s + y) / K / a
            for s, y, a in zip(per_repeat["la_step"], per_repeat["la_sync"], per_repeat["adamw"])
        ],
        "naive_over_fused": [n / f for n, f in zip(per_repeat["naive"], per_repeat["fused"])],
        "naive_add_over_fused": [n / f for n, f in zip(per_repeat["naive_add"], per_repeat["fused"])],
    }
    param_bytes = sum(p.numel() * p.element_size() for p in params_la)
    slow_bytes = sum(s.numel() * s.element_size() for s in slow)
    shared = sum(
        s.untyped_storage().data_ptr() == p.untyped_storage().data_ptr() for s, p in zip(slow, params_la)
    )
    adam_bytes = sum(
        v.numel() * v.element_size()
        for p in params_la
        for key, v in lookahead.state[p].items()
        if isinstance(v, Tensor) and key != SLOW_KEY
    )
    return {
        "n_tensors": n_tensors,
        "n_params": n_tensors * max(1, n_params // n_tensors),
        "inner": kind,
        "device": device,
        "steps_per_block": cycles * K,
        "times_s": {k: spread(v) for k, v in per_repeat.items()},
        "ratios": {k: spread(v) for k, v in ratios.items()},
        "memory": {
            "param_bytes": param_bytes,
            "slow_bytes": slow_bytes,
            "adamw_state_bytes": adam_bytes,
            "slow_tensors_sharing_param_storage": int(shared),
        },
    }


def bench_bookkeeping(n_tensors: int, repeats: int, steps: int = 200) -> dict:
    """Per-step cost of Lookahead's Python bookkeeping alone: tensors of 16 elements make the math negligible."""
    plain = make_adamw(make_params(n_tensors, 16 * n_tensors, "cpu", seed=0), "fused")
    lookahead = Lookahead(make_adamw(make_params(n_tensors, 16 * n_tensors, "cpu", seed=0), "fused"), k=10**9)
    for _ in range(3):
        plain.step()
        lookahead.step()
    plain_us, extra_us = [], []
    for _ in range(repeats):
        plain_times: list[float] = []
        la_times: list[float] = []
        for i in range(steps):
            for opt in (plain, lookahead) if i % 2 == 0 else (lookahead, plain):
                (plain_times if opt is plain else la_times).append(timed(opt.step, "cpu"))
        plain_med, la_med = statistics.median(plain_times), statistics.median(la_times)
        plain_us.append(plain_med * 1e6)
        extra_us.append((la_med - plain_med) * 1e6)
    return {"n_tensors": n_tensors, "fused_adamw_us": spread(plain_us), "extra_us": spread(extra_us)}


def bookkeeping_table(rows: list[dict]) -> list[str]:
    lines = [
        "| tensors (16 elements each) | fused AdamW µs/step | + Lookahead bookkeeping µs | µs per tensor |",
        "|---|---|---|---|",
    ]
    for r in rows:
        n, extra = r["n_tensors"], r["extra_us"]
        lines.append(
            f"| {n} | {r['fused_adamw_us']['median']:.1f} | {extra['median']:.1f} "
            f"[{extra['min']:.1f}-{extra['max']:.1f}] | {extra['median'] / n:.2f} |"
        )
    return lines


def fmt_ratio(s: dict[str, float]) -> str:
    return f"{s['median']:.3f} [{s['min']:.3f}-{s['max']:.3f}]"


def fmt_ms(s: dict[str, float]) -> str:
    return f"{s['median'] * 1e3:.3f}"


def fmt_params(n: int) -> str:
    return f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def table(cases: list[dict]) -> list[str]:
    head = (
        "| tensors | params | AdamW impl | AdamW ms | LA no-sync ms | LA sync ms | no-sync / AdamW | "
        "sync step / AdamW | amortized (k=5) / AdamW | fused sync ms | naive loop ms | naive-add ms | "
        "naive / fused |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for c in cases:
        t, r = c["times_s"], c["ratios"]
        lines.append(
            f"| {c['n_tensors']} | {fmt_params(c['n_params'])} | {c['inner']} | {fmt_ms(t['adamw'])} | "
            f"{fmt_ms(t['la_step'])} | {fmt_ms(t['la_sync'])} | {fmt_ratio(r['bookkeeping'])} | "
            f"{fmt_ratio(r['sync_step'])} | {fmt_ratio(r['amortized'])} | {fmt_ms(t['fused'])} | "
            f"{fmt_ms(t['naive'])} | {fmt_ms(t['naive_add'])} | {fmt_ratio(r['naive_over_fused'])} |"
        )
    return lines


def memory_table(cases: list[dict]) -> list[str]:
    lines = [
        (
            "| tensors | params | param bytes | φ bytes | φ / params | AdamW state bytes | φ / AdamW state | "
            "φ sharing param storage |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    seen = set()
    for c in cases:
        key = (c["n_tensors"], c["n_params"])
        if key in seen:
            continue
        seen.add(key)
        m = c["memory"]
        lines.append(
            f"| {c['n_tensors']} | {fmt_params(c['n_params'])} | {m['param_bytes']:,} | {m['slow_bytes']:,} | "
            f"{m['slow_bytes'] / m['param_bytes']:.3f} | {m['adamw_state_bytes']:,} | "
            f"{m['slow_bytes'] / m['adamw_state_bytes']:.3f} | {m['slow_tensors_sharing_param_storage']} |"
        )
    return lines


def plot(cases: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    sizes = sorted({c["n_params"] for c in cases})
    kinds = [k for k in INNER_KINDS if any(c["inner"] == k for c in cases)]
    styles = {"for-loop": "-o", "foreach": "--s", "fused": ":^"}
    for size in sizes:
        for kind in kinds:
            sel = sorted(
                (c for c in cases if c["n_params"] == size and c["inner"] == kind),
                key=lambda c: c["n_tensors"],
            )
            if not sel:
                continue
            xs = [c["n_tensors"] for c in sel]
            for ax, key in ((axes[0], "bookkeeping"), (axes[1], "amortized")):
                med = [100 * (c["ratios"][key]["median"] - 1) for c in sel]
                lo = [100 * (c["ratios"][key]["min"] - 1) for c in sel]
                hi = [100 * (c["ratios"][key]["max"] - 1) for c in sel]
                ax.errorbar(
                    xs,
                    med,
                    yerr=[[m - low for m, low in zip(med, lo)], [h - m for m, h in zip(med, hi)]],
                    fmt=styles[kind],
                    capsize=3,
                    label=f"{fmt_params(size)}, AdamW {kind}",
                )
    for size in sizes:
        sel = sorted(
            (c for c in cases if c["n_params"] == size and c["inner"] == kinds[0]),
            key=lambda c: c["n_tensors"],
        )
        xs = [c["n_tensors"] for c in sel]
        line = axes[2].plot(
            xs,
            [c["times_s"]["fused"]["median"] * 1e3 for c in sel],
            "-o",
            label=f"{fmt_params(size)} fused _foreach",
        )[0]
        axes[2].plot(
            xs,
            [c["times_s"]["naive"]["median"] * 1e3 for c in sel],
            "--x",
            color=line.get_color(),
            label=f"{fmt_params(size)} per-tensor loop",
        )
    axes[0].set_title("non-sync step: Lookahead(AdamW) vs AdamW")
    axes[1].set_title(f"amortized over a cycle (k={K})")
    axes[2].set_title("sync alone: fused vs per-tensor loop")
    for ax in axes[:2]:
        ax.set_ylabel("step-time overhead (%)")
        ax.axhline(0, color="gray", lw=0.8)
    axes[2].set_ylabel("ms per sync")
    axes[2].set_yscale("log")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("number of tensors")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tensors", type=int, nargs="+", default=[10, 100, 500])
    parser.add_argument(
        "--params",
        type=float,
        nargs="+",
        default=[1e6, 10e6],
        help="total parameter counts (floats allowed, e.g. 1e6), crossed with --tensors",
    )
    parser.add_argument(
        "--extra",
        nargs="*",
        default=["50e6:100"],
        help="more PARAMS:TENSORS cases outside the grid (large ones cost the most time)",
    )
    parser.add_argument(
        "--inner",
        nargs="+",
        default=["for-loop", "fused"],
        choices=INNER_KINDS,
        help="AdamW implementation: for-loop (the CPU default), foreach, fused",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="tensors 10 100 500, params 1e6, 3 repeats")
    parser.add_argument("--out", type=Path, default=BENCH_DIR, help="folder for bench_sync.json/.png")
    parser.add_argument("--no-results-md", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args()
    if args.quick:
        args.tensors, args.params, args.extra, args.repeats = [10, 100, 500], [1e6], [], 3
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    cases = []
    started = time.perf_counter()
    shapes = [(int(n_params), n_tensors) for n_params in args.params for n_tensors in args.tensors]
    shapes += [(int(float(e.split(":")[0])), int(e.split(":")[1])) for e in args.extra]
    for n_params, n_tensors in shapes:
        for kind in args.inner:
            case = bench_case(n_tensors, n_params, kind, args.repeats, args.device)
            cases.append(case)
            print(table([case])[-1], flush=True)
    book_rows = []
    if args.device == "cpu":
        for n_tensors in sorted({1, *args.tensors}):
            book_rows.append(bench_bookkeeping(n_tensors, args.repeats))
            print(bookkeeping_table(book_rows[-1:])[-1], flush=True)
    elapsed = time.perf_counter() - started

    lines = table(cases)
    book = bookkeeping_table(book_rows) if book_rows else []
    mem = memory_table(cases)
    print("\n".join(["", *lines, "", *mem, "", *book]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_sync.json").write_text(
        json.dumps({"k": K, "alpha": ALPHA, "cases": cases, "bookkeeping": book_rows}, indent=1)
    )
    plot(cases, args.out / "bench_sync.png")
    print(f"\nwrote {args.out / 'bench_sync.json'} and {args.out / 'bench_sync.png'} ({elapsed:.0f} s)")
    if not args.no_results_md:
        command = command_line("benchmarks.bench_sync", sys.argv[1:], prefix="OMP_NUM_THREADS=1")
        body = [
            *environment_lines(args.device),
            f"- command: `{command}` ({elapsed:.0f} s)",
            (
                f"- k={K}, alpha={ALPHA}; each cell: median over {args.repeats} repeats [min-max]; a repeat is the "
                "median over a block of steps; AdamW and Lookahead(AdamW) steps alternate one by one, the three syncs "
                "likewise. Times are the thread's CPU time (single-threaded, synchronous CPU work), so other jobs on "
                "the machine inflate them less than wall time; cache and memory-bandwidth sharing still add noise."
            ),
            "",
            *lines,
            "",
            *mem,
            "",
            (
                "Bookkeeping alone (Python work per step: fused AdamW on tiny tensors so the math is negligible; "
                "Lookahead with k=10⁹ so it never syncs; Lookahead minus AdamW, median [min-max] over repeats):"
            ),
            "",
            *book,
            "",
            "![step-time overhead](bench_sync.png)",
        ]
        update_section(RESULTS_MD, "bench_sync", "\n".join(body))


if __name__ == "__main__":
    main()
