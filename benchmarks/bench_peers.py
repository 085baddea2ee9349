"""Lookahead's sync next to other Lookahead implementations, on the same tensors, in one process.

Contenders, each wrapping its own copy of the same inner optimizer over its own copy of the same tensors
(same values, same gradients):

* ``ours``                ``lookahead_dist.Lookahead`` (default ``nonfinite="skip"``: θ is checked at each sync);
* ``core kernel``         the inner step, then the core's sync kernel alone (``lookahead_dist.core.sync``:
  ``make_slow`` + one ``SyncPlan``), checked as ``ours`` checks; ``ours`` minus this is Lookahead's bookkeeping;
* ``core kernel, no check`` the same kernel without the non-finite check, to show the check's cost;
* ``foreach``             the inner step, then ``_foreach_lerp_`` + ``_foreach_copy_`` over the list;
* ``loop``                the inner step, then ``slow.lerp_(fast); fast.copy_(slow)`` per tensor;
* ``timm``                ``timm.optim.lookahead.Lookahead``;
* ``pytorch_optimizer``   ``pytorch_optimizer.Lookahead``;
* ``torch_optimizer``     ``torch_optimizer.Lookahead``.

The three peers are installed only for this benchmark, never as project dependencies::

    .venv/bin/pip install --no-deps --target /tmp/la_peers timm pytorch_optimizer torch-optimizer
    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.bench_peers --peers /tmp/la_peers
    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.bench_peers --quick --no-results-md   # a smoke run

(``--no-deps``: a plain ``pip install timm`` pulls torchvision and may replace torch. How they are loaded
without their dependencies: :func:`benchmarks.common.load_peers`.)

Two measurements:

1. **Sync cost** (``k=1`` over SGD with lr 1e-9, so every step syncs): the cost of a contender is its
   step minus a plain SGD step, against the **memory floor**: twice the time of copying the tensors
   once (a sync reads θ and φ and writes both: 16 bytes per fp32 element, a copy 8).
2. **k=5 amortized** over a whole cycle with AdamW (for-loop and fused): time of 5 steps of the
   contender over 5 AdamW steps.

Rounds are interleaved (every contender once per round, in a rotating order) so that other work on the
machine hits all alike; the times are the thread's CPU time (``time.thread_time``; every op here runs
synchronously on this thread, one torch thread). Reported: median over rounds [min-max of the medians of
5 sub-blocks]. Writes ``bench_peers.json``, ``bench_peers.png`` and the "bench_peers" section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import importlib.util
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
    load_peers,
    pyplot,
    update_section,
)
from lookahead_dist import Lookahead
from lookahead_dist.core.sync import SyncPlan, make_slow

ALPHA = 0.5

# name -> (tensor shapes, param groups: list of index lists or None for one group)
SHAPES: dict[str, list[tuple[int, ...]]] = {
    "96 (24×Linear256+LN), 1.6M": [s for _ in range(24) for s in ((256, 256), (256,), (256,), (256,))],
    "8 (4×Linear2048), 16.8M": [s for _ in range(4) for s in ((2048, 2048), (2048,))],
    "500 tensors of 2k, 1M": [(2000,)] * 500,
    "ZeRO flat partitions: 2 groups × 8.4M": [(8_388_608,), (8_388_608,)],
}
QUICK = ["96 (24×Linear256+LN), 1.6M", "500 tensors of 2k, 1M"]


PREVIOUS: list[Any] = [None]  # Lookahead class of an earlier commit's core (--previous), or None


def load_previous(folder: Path) -> Any:
    """``Lookahead`` from a copy of an earlier ``lookahead_dist/core`` (``git archive REV lookahead_dist/core``).

    The core has only relative imports, so it loads as a package of another name beside the current one.
    """
    core = folder / "lookahead_dist" / "core"
    spec = importlib.util.spec_from_file_location(
        "_previous_core", core / "__init__.py", submodule_search_locations=[str(core)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["_previous_core"] = module
    spec.loader.exec_module(module)
    return module.Lookahead


def make_tensors(shapes: list[tuple[int, ...]], seed: int) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out: list[Tensor] = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.02)
        p.grad = torch.randn(shape, generator=gen) * 1e-3
        out.append(p)
    return out


def groups_of(params: list[Tensor], shape_name: str) -> list[dict[str, Any]] | list[Tensor]:
    if shape_name.startswith("ZeRO"):
        return [{"params": [p]} for p in params]  # one flat partition per param group
    return params


class CoreKernel:
    """Inner step + the core's sync kernel alone (the ``core kernel`` rows): φ laid out by
    ``lookahead_dist.core.sync.make_slow``, one ``SyncPlan`` over every tensor, run with or without its
    non-finite check. Its two rows give the check's cost; ``ours`` against ``core kernel`` gives what
    Lookahead's bookkeeping adds to the kernel."""

    def __init__(self, inner: torch.optim.Optimizer, k: int, check: bool) -> None:
        self.inner, self.k, self.check, self.t = inner, k, check, 0
        fast = [p for g in inner.param_groups for p in g["params"]]
        with torch.no_grad():
            self.plan = SyncPlan(fast, make_slow(fast))

    @torch.no_grad()
    def step(self) -> None:
        self.inner.step()
        self.t += 1
        if self.t % self.k == 0:
            self.plan.run(ALPHA, self.check)


class Manual:
    """Inner step + a hand-written sync (the ``foreach`` and ``loop`` rows)."""

    def __init__(self, inner: torch.optim.Optimizer, k: int, how: str) -> None:
        self.inner, self.k, self.how, self.t = inner, k, how, 0
        self.fast = [p for g in inner.param_groups for p in g["params"]]
        self.slow = [p.detach().clone() for p in self.fast]

    @torch.no_grad()
    def step(self) -> None:
        self.inner.step()
        self.t += 1
        if self.t % self.k:
            return
        if self.how == "foreach":
            torch._foreach_lerp_(self.slow, self.fast, ALPHA)
            torch._foreach_copy_(self.fast, self.slow)
        else:
            for s, f in zip(self.slow, self.fast):
                s.lerp_(f, ALPHA)
                f.copy_(s)


def contenders(
    shape_name: str, inner: Callable[[Any], torch.optim.Optimizer], k: int, peers: dict[str, Any], base: str
) -> dict[str, Callable[[], Any]]:
    shapes = SHAPES[shape_name]
    made: dict[str, Callable[[], Any]] = {}

    def params() -> Any:
        return groups_of(make_tensors(shapes, seed=0), shape_name)

    made[base] = inner(params()).step
    made["ours"] = Lookahead(inner(params()), k=k, alpha=ALPHA).step
    made["core kernel"] = CoreKernel(inner(params()), k, check=True).step
    made["core kernel, no check"] = CoreKernel(inner(params()), k, check=False).step
    if PREVIOUS[0] is not None:
        made["previous core"] = PREVIOUS[0](inner(params()), k=k, alpha=ALPHA).step
    made["foreach"] = Manual(inner(params()), k, "foreach").step
    made["loop"] = Manual(inner(params()), k, "loop").step
    for name, factory in peers.items():
        made[name] = factory(inner(params()), k, ALPHA).step
    return made


def floor_fn(shape_name: str) -> Callable[[], None]:
    # Bandwidth only: two copies of one flat buffer holding as many elements as the tensors (no
    # per-tensor overhead; for the small shapes the data fit in the L3 cache, as the tensors do).
    n = sum(torch.Size(s).numel() for s in SHAPES[shape_name])
    src, dst = torch.randn(n), torch.empty(n)

    def copy_twice() -> None:  # the bytes of a sync: read θ and φ, write both = two copies
        dst.copy_(src)
        src.copy_(dst)

    return copy_twice


def measure(fns: dict[str, Callable[[], Any]], rounds: int, steps_per_round: int) -> dict[str, list[float]]:
    names = list(fns)
    for name in names:  # warm-up: state, slow weights, caches
        for _ in range(max(2, steps_per_round)):
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            fn = fns[name]
            start = time.thread_time()
            for _ in range(steps_per_round):
                fn()
            times[name].append((time.thread_time() - start) / steps_per_round)
    return times


def summary(values: list[float]) -> dict[str, float]:
    blocks = [values[i::5] for i in range(5) if values[i::5]]
    meds = [statistics.median(b) for b in blocks]
    return {"median": statistics.median(values), "min": min(meds), "max": max(meds), "best": min(values)}


def sync_case(shape_name: str, peers: dict[str, Any], rounds: int) -> dict[str, Any]:
    fns = contenders(shape_name, lambda p: torch.optim.SGD(p, lr=1e-9), 1, peers, "sgd")
    fns["floor"] = floor_fn(shape_name)
    probe = time.thread_time()
    fns["ours"]()
    est = max(time.thread_time() - probe, 1e-5)
    steps = max(1, min(50, int(0.02 / est)))
    times = measure(fns, rounds, steps)
    base, floor = times["sgd"], times["floor"]
    out: dict[str, Any] = {"shape": shape_name, "steps_per_round": steps, "floor_s": summary(floor)}
    n = sum(torch.Size(s).numel() for s in SHAPES[shape_name])
    out["elements"] = n
    out["floor_GBps"] = 16 * n / statistics.median(floor) / 1e9
    out["cost_over_floor"] = {}
    for name, vals in times.items():
        if name in ("sgd", "floor"):
            continue
        # per round: (contender − SGD) / floor, so that a slow round affects both sides
        out["cost_over_floor"][name] = summary([(v - b) / f for v, b, f in zip(vals, base, floor)])
    out["sgd_s"] = summary(base)
    return out


def amortized_case(shape_name: str, kind: str, peers: dict[str, Any], rounds: int) -> dict[str, Any]:
    flags: dict[str, Any] = {"for-loop": {"foreach": False}, "fused": {"fused": True}}[kind]
    k = 5

    def adamw(p: Any) -> torch.optim.Optimizer:
        return torch.optim.AdamW(p, lr=1e-4, weight_decay=0.01, **flags)

    fns = contenders(shape_name, adamw, k, peers, "adamw")
    cycle: dict[str, Callable[[], Any]] = {
        name: (lambda fn=fn: [fn() for _ in range(k)]) for name, fn in fns.items()  # type: ignore[misc]
    }
    times = measure(cycle, rounds, 1)
    base = times["adamw"]
    return {
        "shape": shape_name,
        "inner": kind,
        "adamw_step_s": statistics.median(base) / k,
        "over_adamw": {
            name: summary([v / b for v, b in zip(vals, base)]) for name, vals in times.items() if name != "adamw"
        },
    }


NONSYNC_COUNTS = (10, 100, 500, 2000)  # tensors of 16 elements: the step is bookkeeping, not arithmetic


def nonsync_case(count: int, rounds: int) -> dict[str, Any]:
    """Bookkeeping on steps that do not sync: Lookahead(k=10⁹) over fused AdamW minus fused AdamW, µs/step,
    on ``count`` tensors of 16 elements (so that the arithmetic is negligible and the per-tensor costs show)."""
    shapes = [(16,)] * count

    def adamw() -> torch.optim.Optimizer:
        return torch.optim.AdamW(make_tensors(shapes, seed=0), lr=1e-4, fused=True)

    fns: dict[str, Callable[[], Any]] = {"adamw": adamw().step, "ours": Lookahead(adamw(), k=10**9).step}
    if PREVIOUS[0] is not None:
        fns["previous core"] = PREVIOUS[0](adamw(), k=10**9).step
    times = measure(fns, rounds, 20)
    base = times["adamw"]
    return {
        "shape": f"{count} × 16 elements",
        "adamw_step_us": 1e6 * statistics.median(base),
        "overhead_us": {
            name: summary([1e6 * (v - b) for v, b in zip(vals, base)]) for name, vals in times.items() if name != "adamw"
        },
    }


def nonsync_table(rows: list[dict[str, Any]]) -> list[str]:
    names = [n for n in ("ours", "previous core") if n in rows[0]["overhead_us"]]
    lines = ["| tensors | fused AdamW µs/step | " + " | ".join(f"{n} +µs" for n in names) + " |"]
    lines.append("|" + "---|" * (len(names) + 2))
    for r in rows:
        cells = [
            f"{r['overhead_us'][n]['median']:+.0f} [{r['overhead_us'][n]['min']:+.0f} to {r['overhead_us'][n]['max']:+.0f}]"
            for n in names
        ]
        lines.append(f"| {r['shape']} | {r['adamw_step_us']:.0f} | " + " | ".join(cells) + " |")
    return lines


def fmt(s: dict[str, float], digits: int = 2) -> str:
    return f"{s['median']:.{digits}f}× [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def sync_table(rows: list[dict[str, Any]], names: list[str], best: bool = False) -> list[str]:
    head = "| tensors | floor ms (GB/s) | " + " | ".join(names) + " |"
    lines = [head, "|" + "---|" * (len(names) + 2)]
    for r in rows:
        costs = r["cost_over_floor"]
        if best:
            cells = [f"{costs[n]['best']:.2f}×" if n in costs else "—" for n in names]
        else:
            cells = [fmt(costs[n]) if n in costs else "—" for n in names]
        floor = f"{r['floor_s']['median'] * 1e3:.3f} ({r['floor_GBps']:.1f})"
        lines.append(f"| {r['shape']} | {floor} | " + " | ".join(cells) + " |")
    return lines


def amortized_table(rows: list[dict[str, Any]], names: list[str]) -> list[str]:
    head = "| tensors | AdamW | AdamW ms/step | " + " | ".join(names) + " |"
    lines = [head, "|" + "---|" * (len(names) + 3)]
    for r in rows:
        cells = [fmt(r["over_adamw"][n], 3) if n in r["over_adamw"] else "—" for n in names]
        lines.append(f"| {r['shape']} | {r['inner']} | {r['adamw_step_s'] * 1e3:.2f} | " + " | ".join(cells) + " |")
    return lines


def plot(rows: list[dict[str, Any]], names: list[str], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(11, 4.2))
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        xs, ys, lo, hi = [], [], [], []
        for i, r in enumerate(rows):
            s = r["cost_over_floor"].get(name)
            if s is None:
                continue
            xs.append(i + j * width)
            ys.append(s["median"])
            lo.append(s["median"] - s["min"])
            hi.append(s["max"] - s["median"])
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=name)
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
    ax.set_xticklabels([r["shape"] for r in rows], fontsize=8)
    ax.set_ylabel("sync cost / memory floor")
    ax.set_title("Lookahead sync (k=1 over SGD): cost over the memory floor (lower is better; 1 = floor)")
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=Path, default=None, help="folder the peers were pip-installed into")
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--amortized", nargs="*", default=["for-loop", "fused"], choices=["for-loop", "fused"])
    parser.add_argument("--quick", action="store_true", help="two small shapes, 9 rounds, no amortized part")
    parser.add_argument("--out", type=Path, default=BENCH_DIR, help="folder for bench_peers.json/.png")
    parser.add_argument(
        "--previous",
        type=Path,
        default=None,
        help="folder holding an earlier commit's lookahead_dist/core (git archive REV lookahead_dist/core | tar -x -C DIR),"
        " measured as 'previous core'",
    )
    parser.add_argument("--no-results-md", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.shapes, args.rounds, args.amortized = QUICK, 9, []
    torch.set_num_threads(1)
    peers, versions = load_peers(args.peers)
    if args.previous is not None:
        PREVIOUS[0] = load_previous(args.previous)
    names = ["ours", "core kernel", "core kernel, no check", *(["previous core"] if args.previous else []), "foreach", "loop", *peers]
    started = time.perf_counter()
    sync_rows = []
    for shape in args.shapes:
        sync_rows.append(sync_case(shape, peers, args.rounds))
        print(sync_table(sync_rows[-1:], names)[-1], flush=True)
    amort_rows = []
    for kind in args.amortized:
        for shape in args.shapes:
            amort_rows.append(amortized_case(shape, kind, peers, max(5, args.rounds // 2)))
            print(amortized_table(amort_rows[-1:], names)[-1], flush=True)
    nonsync_rows = [nonsync_case(n, args.rounds) for n in NONSYNC_COUNTS] if args.amortized else []
    if nonsync_rows:
        print("\n".join(nonsync_table(nonsync_rows)), flush=True)
    elapsed = time.perf_counter() - started
    lines = sync_table(sync_rows, names)
    best_lines = sync_table(sync_rows, names, best=True)
    amort = amortized_table(amort_rows, names) if amort_rows else []
    print("\n".join(["", *lines, "", *amort]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_peers.json").write_text(
        json.dumps(
            {"versions": versions, "sync": sync_rows, "amortized": amort_rows, "nonsync": nonsync_rows}, indent=1
        )
    )
    plot(sync_rows, names, args.out / "bench_peers.png")
    if args.no_results_md:
        return
    command = command_line("benchmarks.bench_peers", sys.argv[1:], prefix="OMP_NUM_THREADS=1")
    peer_versions = ", ".join(f"{n} {v}" for n, v in versions.items()) or "none installed"
    body = [
        *environment_lines("cpu"),
        f"- peers (pip install --no-deps --target, benchmark only): {peer_versions}",
        (f"- command: `{command}` ({elapsed:.0f} s); {args.rounds} interleaved rounds; thread CPU time, "
        "1 torch thread (the load average above says whether other work shared the machine: thread CPU time "
        "does not remove shared cache and memory bandwidth)."),
        "",
        ("Sync cost over the memory floor (k=1 over SGD lr 1e-9, so every step syncs; cost = step − SGD step; "
        "floor = two copies of the tensors, i.e. the 16 bytes/element a sync must move; median "
        "[min-max of 5 sub-block medians]; lower is better):"),
        "",
        *lines,
        "",
        ("The same, best round (the minimum over rounds of (contender − SGD) / floor: the least disturbed by the "
        "other processes):"),
        "",
        *best_lines,
    ]
    if amort:
        body += [
            "",
            "k=5 amortized over a cycle: 5 steps of the contender / 5 AdamW steps (1.000× = free):",
            "",
            *amort,
        ]
    if nonsync_rows:
        body += [
            "",
            "Steps that do not sync (bookkeeping only): Lookahead(k=10⁹) over fused AdamW minus fused AdamW on "
            "tensors of 16 elements, µs per step, median [min to max of 5 sub-block medians]; 'previous core' is "
            "the core before this change, loaded beside it (`--previous`):",
            "",
            *nonsync_table(nonsync_rows),
        ]
    body += ["", "![sync cost over the floor](bench_peers.png)"]
    update_section(RESULTS_MD, "bench_peers", "\n".join(body))


if __name__ == "__main__":
    main()
