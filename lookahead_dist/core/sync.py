"""The sync kernels: ``φ ← φ + α(θ − φ)`` then ``θ ← φ``, with the non-finite check folded in. Torch only.

A sync has to read θ and φ and write both (16 bytes per fp32 element); done as two whole-list passes
(lerp over every tensor, then copy over every tensor) it streams the weights from memory twice once
they outgrow the cache. So, on CPU:

* a tensor of at least :data:`SMALL` elements is processed alone, in blocks of :data:`CHUNK` elements:
  per block, ``lerp(φ, θ, α)`` is written into θ (φ still holds the old value), checked and copied
  into φ while the block is in cache, so memory is streamed once and the check reads cached data;
* tiny tensors (below :data:`TINY` elements: biases, norms) get their φ as views of one flat buffer
  (:func:`make_slow`); a run of them is gathered into a scratch buffer (one ``torch.cat``), checked and
  lerped as one flat tensor and scattered back: two per-tensor operations, not three (the scratch
  buffer is shared by the runs of one plan and holds at most ``BATCH + SMALL`` elements, 1.1 MiB of fp32);
* the others (and tiny ones whose φ are separate tensors, e.g. loaded from a checkpoint written
  elsewhere) are processed in batches of up to :data:`BATCH` elements with the multi-tensor
  (``_foreach``) kernels, so that the copy reads what the lerp just wrote from cache; the check is one
  sum per tensor, one fused kernel (GradScaler's) for the tiny ones.

On other devices (CUDA) the multi-tensor kernels run on the whole list (fused launches), with one
fused non-finite check and one device-to-host transfer per call.

Non-finite fast weights (the ``"skip"`` policy):

* a block whose θ holds a NaN or an infinity is not synced: its φ is kept and θ is reset to φ;
* a "block" is the whole tensor for a tensor smaller than :data:`CHUNK` elements, otherwise one
  ``CHUNK``-element slice of it (a flat ZeRO partition holding many parameters loses only the slices
  that hold the bad values). Deciding for a whole large tensor before writing would need a second
  pass over θ from memory.

Callers that must decide per whole tensor before writing anything (``nonfinite="raise"``, adaptive α)
call :func:`nonfinite_tensors` first and pass ``check=False``. What the check costs is measured by
``benchmarks/bench_peers.py`` (numbers in ``benchmarks/RESULTS.md``).

Every tensor here is a plain (local) tensor: DTensors are reduced to their local shards by the caller,
so nothing in this module communicates.
"""

from __future__ import annotations

import math
import operator
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

__all__ = [
    "BATCH",
    "CHUNK",
    "SMALL",
    "TINY",
    "Skipped",
    "SyncPlan",
    "SyncReport",
    "local",
    "make_slow",
    "nonfinite_tensors",
    "sync_",
]

#: Elements per block for large CPU tensors (1 MiB of fp32 each for θ and φ).
CHUNK = 1 << 18
#: Most elements per multi-tensor batch of small CPU tensors.
BATCH = 1 << 18
#: CPU tensors below this many elements are "small" and sync in batches (per-tensor dispatch dominates
#: there); larger ones sync one by one, block by block. Chosen by measurement on the benchmark machine.
SMALL = 1 << 15
#: CPU tensors below this many elements are "tiny" (biases, norms): their new φ share one flat buffer
#: (see :func:`make_slow`) so that a run of them syncs as a few flat operations, the check included,
#: instead of three multi-tensor passes. Between TINY and SMALL a tensor's check is one sum of it.
TINY = 1 << 14



class Skipped(NamedTuple):
    """A tensor with a non-finite block: its position in the synced lists, blocks kept, blocks in it."""

    position: int
    blocks_kept: int
    blocks: int


#: The tensors of one sync that had non-finite blocks (empty when all were finite or nothing was checked).
SyncReport = list[Skipped]

_dtensor_cls: Any = None


def _dtensor() -> type[Any] | None:
    global _dtensor_cls
    if _dtensor_cls is None:
        try:
            import torch.distributed.tensor as dt
        except ImportError:  # pragma: no cover - torch built without distributed
            _dtensor_cls = type(None)
        else:
            _dtensor_cls = dt.DTensor  # type: ignore[misc]
    return _dtensor_cls


def local(t: Tensor) -> Tensor:
    """This process's shard of a DTensor (its local tensor, no communication); any other tensor as is.

    Under ``torch.no_grad`` ``DTensor.to_local()`` returns the local tensor itself, so in-place
    operations on the result change the DTensor. Never rebuild with ``from_local``: for uneven shards
    it infers a wrong global shape.
    """
    if type(t) is Tensor or type(t) is torch.nn.Parameter:
        return t
    cls = _dtensor()
    if cls is not None and isinstance(t, cls):
        return t.to_local()  # type: ignore[attr-defined,no-any-return]
    return t


def _finite(block: Tensor) -> bool:
    # A sum is NaN/inf iff some element is (inf − inf is NaN too); unlike isfinite().all() it allocates
    # no mask and runs at cache speed, and testing the Python float saves two tensor ops per call.
    # Finite values whose sum overflows (|θ| ~ 1e34 over many elements) would also read as non-finite:
    # such weights are broken anyway.
    return math.isfinite(block.sum().item())


def _any_nonfinite(tensors: list[Tensor]) -> bool:
    """Whether any of these same-device floating tensors holds a NaN or an infinity.

    torch's GradScaler kernel (multiplies by 1, exact, and raises a flag) loops over the list in C++ on
    CPU and is one fused launch on CUDA: no Python-level operation per tensor.
    """
    like = tensors[0]
    flag = torch.zeros(1, dtype=torch.float32, device=like.device)
    one = _ONES.get(like.device)
    if one is None:
        one = _ONES[like.device] = torch.ones(1, dtype=torch.float32, device=like.device)
    torch._amp_foreach_non_finite_check_and_unscale_(tensors, flag, one)
    return bool(flag.item())


_ONES: dict[torch.device, Tensor] = {}


def nonfinite_tensors(tensors: list[Tensor]) -> list[int]:
    """Indices of the tensors holding a NaN or an infinity (one reduction per tensor)."""
    if not tensors:
        return []
    if tensors[0].device.type == "cpu":
        return [i for i, t in enumerate(tensors) if t.numel() and not _finite(t)]
    sums = torch.stack([t.sum(dtype=torch.float32) for t in tensors])
    return [i for i, ok in enumerate(torch.isfinite(sums).tolist()) if not ok]


def sync_(fast: list[Tensor], slow: list[Tensor], alpha: float, *, check: bool = True) -> SyncReport:
    """In place: ``slow ← slow + alpha·(fast − slow)``, then ``fast ← slow``, for each pair.

    Pairs have the same shape, dtype and device. With ``check``, a block (see the module docstring)
    whose ``fast`` is not finite keeps its ``slow`` and gets ``fast ← slow``; the return value names the
    tensors where that happened. Without ``check`` nothing is inspected and the report is empty.
    """
    if not fast:
        return []
    return SyncPlan(fast, slow).run(alpha, check)


def make_slow(params: list[Tensor]) -> list[Tensor]:
    """φ₀ = θ for each tensor: copies with the tensor's layout.

    Tiny (< :data:`TINY` elements) contiguous CPU tensors of one dtype get views into one flat buffer (in
    list order), which lets their sync run as a few operations on flat memory instead of several per
    tensor. The views are ordinary tensors to every reader of the state (``torch.save`` stores the shared
    buffer once).
    """
    out: list[Tensor | None] = [None] * len(params)
    small: dict[torch.dtype, list[int]] = {}
    for i, p in enumerate(params):
        if p.device.type == "cpu" and p.numel() < TINY and p.is_contiguous() and type(p) in _PLAIN:
            small.setdefault(p.dtype, []).append(i)
        else:
            out[i] = p.detach().clone(memory_format=torch.preserve_format)
    for dtype, idx in small.items():
        if len(idx) == 1:
            out[idx[0]] = params[idx[0]].detach().clone()
            continue
        flat = torch.empty(sum(params[i].numel() for i in idx), dtype=dtype)
        offset = 0
        for i in idx:
            p = params[i]
            view = flat[offset : offset + p.numel()].view(p.shape)
            view.copy_(p.detach())
            out[i] = view
            offset += p.numel()
    return out  # type: ignore[return-value]


_PLAIN = (Tensor, torch.nn.Parameter)


class _FlatRun:
    """Tiny tensors whose φ are consecutive views of one flat buffer: synced with flat operations.

    θ is gathered into a scratch buffer (one ``torch.cat`` for 1-D tensors, else one multi-tensor copy),
    checked and lerped flat, and φ scattered back into θ (one multi-tensor copy): two per-tensor
    operations per run instead of a check, a lerp and a copy per tensor. The scratch is shared by the
    runs of one :class:`SyncPlan` (at most ``BATCH + SMALL`` elements).
    """

    __slots__ = ("catable", "fast", "idx", "scratch", "scratch_views", "slow", "slow_flat")

    def __init__(self, idx: list[int], fast: list[Tensor], slow: list[Tensor], slow_flat: Tensor) -> None:
        self.idx = idx
        self.fast = fast
        self.slow = slow
        self.slow_flat = slow_flat
        # 1-D θ can be gathered by one torch.cat (a serial copy in C++, cheaper per tensor than a
        # multi-tensor copy); other shapes would need a cached flat view per tensor, which goes stale
        # when an engine re-points ``p.data``.
        self.catable = all(t.dim() == 1 and t.is_contiguous() for t in fast)

    def bind(self, scratch: Tensor) -> None:
        self.scratch = scratch[: self.slow_flat.numel()]
        self.scratch_views = []
        offset = 0
        for t in self.fast:
            self.scratch_views.append(self.scratch[offset : offset + t.numel()].view(t.shape))
            offset += t.numel()

    def run(self, fast: list[Tensor], slow: list[Tensor], alpha: float, check: bool, report: SyncReport) -> None:
        if self.catable:
            torch.cat(self.fast, out=self.scratch)  # gather θ
        else:
            torch._foreach_copy_(self.scratch_views, self.fast)
        if check and not _finite(self.scratch):  # rare: find the tensors, as a plain batch
            inner: SyncReport = []
            _sync_batch(list(range(len(self.fast))), self.fast, self.slow, [], self.fast, alpha, check, inner)
            report.extend(Skipped(self.idx[i], kept, blocks) for i, kept, blocks in inner)
            return
        self.slow_flat.lerp_(self.scratch, alpha)
        torch._foreach_copy_(self.fast, self.slow)  # θ ← φ


class _Item(Protocol):
    """One part of a :class:`SyncPlan`: syncs its tensors of the plan's lists and reports non-finite ones."""

    def run(self, fast: list[Tensor], slow: list[Tensor], alpha: float, check: bool, report: SyncReport) -> None: ...


class _Large:
    """A large contiguous CPU tensor, synced alone block by block (:func:`_sync_blocks`)."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def run(self, fast: list[Tensor], slow: list[Tensor], alpha: float, check: bool, report: SyncReport) -> None:
        f = fast[self.index]
        kept = _sync_blocks(f.view(-1), slow[self.index].view(-1), alpha, check)
        if kept:
            report.append(Skipped(self.index, kept, -(-f.numel() // CHUNK)))


class _Batch:
    """Small CPU tensors synced with the multi-tensor kernels (:func:`_sync_batch`).

    ``sums``: those checked by one sum each (at least :data:`TINY` elements); ``rest``: the tiny ones,
    checked by one multi-tensor kernel.
    """

    __slots__ = ("fast", "idx", "rest", "slow", "sums")

    def __init__(self, idx: list[int], fast: list[Tensor], slow: list[Tensor]) -> None:
        self.idx = idx
        self.fast = fast
        self.slow = slow
        self.sums = [t for t in fast if t.numel() >= TINY]
        self.rest = [t for t in fast if t.numel() < TINY]

    def run(self, fast: list[Tensor], slow: list[Tensor], alpha: float, check: bool, report: SyncReport) -> None:
        _sync_batch(self.idx, self.fast, self.slow, self.sums, self.rest, alpha, check, report)


class _Foreach:
    """Every tensor of the plan with the multi-tensor kernels (non-CPU devices: fused launches)."""

    __slots__ = ()

    def run(self, fast: list[Tensor], slow: list[Tensor], alpha: float, check: bool, report: SyncReport) -> None:
        report.extend(_sync_foreach(fast, slow, alpha, check))


class SyncPlan:
    """How one list of (fast, slow) pairs is synced: built once, reused while the φ objects are the same.

    CPU: large tensors block by block (:class:`_Large`), runs of small tensors with flat φ as
    :class:`_FlatRun`, other small tensors in multi-tensor batches (:class:`_Batch`). Other devices: the
    multi-tensor kernels on the whole list (:class:`_Foreach`).
    """

    __slots__ = ("fast", "items", "slow")

    def __init__(self, fast: list[Tensor], slow: list[Tensor]) -> None:
        self.fast = fast
        self.slow = slow
        self.items: list[_Item] = []
        if fast[0].device.type != "cpu":
            self.items.append(_Foreach())
            return
        pending: list[int] = []
        elems = 0
        for i, (f, s) in enumerate(zip(fast, slow)):
            n = f.numel()
            if n >= SMALL and f.is_contiguous() and s.is_contiguous():
                self.items.append(_Large(i))
                continue
            pending.append(i)
            elems += n
            if elems >= BATCH:
                self._add_small(pending)
                pending, elems = [], 0
        if pending:
            self._add_small(pending)
        runs = [item for item in self.items if isinstance(item, _FlatRun)]
        if runs:  # one scratch buffer for all runs (one plan holds one dtype), the size of the largest
            scratch = runs[0].slow_flat.new_empty(max(r.slow_flat.numel() for r in runs))
            for r in runs:
                r.bind(scratch)

    def _add_small(self, idx: list[int]) -> None:
        # Tensors whose φ are views of a shared buffer, in storage order (the sync order of independent
        # tensors is free), split into maximal runs that follow each other in one storage.
        def where(i: int) -> tuple[int, int]:
            s = self.slow[i]
            return s.untyped_storage().data_ptr(), int(s.storage_offset())

        shared = sorted((i for i in idx if _is_view_of_larger(self.slow[i])), key=where)
        runs: list[list[int]] = []
        for i in shared:
            if runs and _follows(self.slow[runs[-1][-1]], self.slow[i]):
                runs[-1].append(i)
            else:
                runs.append([i])
        in_runs: set[int] = set()
        for run in runs:
            if len(run) < 2:
                continue
            in_runs.update(run)
            head = self.slow[run[0]]
            total = sum(self.slow[i].numel() for i in run)
            flat = head.new_empty(0).set_(head.untyped_storage(), head.storage_offset(), (total,), (1,))
            self.items.append(_FlatRun(run, [self.fast[i] for i in run], [self.slow[i] for i in run], flat))
        loose = [i for i in idx if i not in in_runs]
        if loose:
            self.items.append(_Batch(loose, [self.fast[i] for i in loose], [self.slow[i] for i in loose]))

    def valid(self, slow: list[Tensor]) -> bool:
        return len(slow) == len(self.slow) and all(map(operator.is_, slow, self.slow))

    def run(self, alpha: float, check: bool) -> SyncReport:
        report: SyncReport = []
        fast, slow = self.fast, self.slow
        for item in self.items:
            item.run(fast, slow, alpha, check, report)
        return report


def _is_view_of_larger(s: Tensor) -> bool:
    return s.is_contiguous() and s.untyped_storage().nbytes() > s.numel() * s.element_size()


def _follows(prev: Tensor, s: Tensor) -> bool:
    return (
        s.is_contiguous()
        and prev.is_contiguous()
        and s.dtype == prev.dtype
        and s.untyped_storage().data_ptr() == prev.untyped_storage().data_ptr()
        and s.storage_offset() == prev.storage_offset() + prev.numel()
    )


def _sync_blocks(f: Tensor, s: Tensor, alpha: float, check: bool) -> int:
    """One large tensor, block by block; returns the number of blocks kept for non-finite θ.

    Per block: φ_new = lerp(φ, θ, α) is written into θ first (φ still holds φ_old), checked while it is
    in cache, then copied into φ; a non-finite block gets θ ← φ_old instead. The check thus reads cached
    data, not memory, and φ_new is the same number as ``φ.lerp_(θ, α)``. (φ_new is non-finite exactly
    where θ is, for a finite φ; a finite θ whose lerp overflows would be kept too.)
    """
    n = f.numel()
    kept = 0
    for start in range(0, n, CHUNK):
        fb = f[start : start + CHUNK] if n > CHUNK else f
        sb = s[start : start + CHUNK] if n > CHUNK else s
        torch.lerp(sb, fb, alpha, out=fb)
        if check and not _finite(fb):
            fb.copy_(sb)
            kept += 1
            continue
        sb.copy_(fb)
    return kept


def _sync_batch(
    idx: list[int],
    fs: list[Tensor],
    ss: list[Tensor],
    sums: list[Tensor],
    rest: list[Tensor],
    alpha: float,
    check: bool,
    report: SyncReport,
) -> None:
    # The batch is checked as a whole first; only a batch that fails is inspected tensor by tensor.
    if check and (not all(map(_finite, sums)) or (rest and _any_nonfinite(rest))):
        bad = set(nonfinite_tensors(fs))
        if bad:
            for j in sorted(bad):
                fs[j].copy_(ss[j])
                report.append(Skipped(idx[j], 1, 1))
            fs = [t for j, t in enumerate(fs) if j not in bad]
            ss = [t for j, t in enumerate(ss) if j not in bad]
    if fs:
        torch._foreach_lerp_(ss, fs, alpha)
        torch._foreach_copy_(fs, ss)


def _sync_foreach(fast: list[Tensor], slow: list[Tensor], alpha: float, check: bool) -> SyncReport:
    report: SyncReport = []
    if check and _any_nonfinite(fast):
        bad = set(nonfinite_tensors(fast))
        if bad:
            for j in sorted(bad):
                fast[j].copy_(slow[j])
                report.append(Skipped(j, 1, 1))
            fast = [t for j, t in enumerate(fast) if j not in bad]
            slow = [t for j, t in enumerate(slow) if j not in bad]
    if fast:
        torch._foreach_lerp_(slow, fast, alpha)
        torch._foreach_copy_(fast, slow)
    return report
