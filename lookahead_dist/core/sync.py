"""The sync kernels: ``φ ← φ + α(θ − φ)`` then ``θ ← φ``, with the non-finite check folded in. Torch only.

A sync has to read θ and φ and write both (16 bytes per fp32 element); done as two whole-list passes
(lerp over every tensor, then copy over every tensor) it streams the weights from memory twice once
they outgrow the cache. So, on CPU:

* a tensor of at least :data:`CHUNK` elements is processed in blocks of ``CHUNK`` elements: each
  block of θ is checked, lerped into φ and copied back while both blocks are still in cache, so memory
  is read once;
* smaller tensors are processed in batches of up to :data:`BATCH` elements with the multi-tensor
  (``_foreach``) kernels, again so that the copy reads what the lerp just wrote from cache, and without
  a Python-level operation per tensor.

On other devices (CUDA) the multi-tensor kernels are used on the whole list (fused launches; the
device has no cache to keep the data in between anyway), with one device-to-host transfer per call for
the non-finite flags.

Non-finite fast weights (the ``"skip"`` policy). The check runs on θ before anything is written, one
block at a time, so it costs no extra pass over memory:

* a block whose θ holds a NaN or an infinity is not synced: its φ is kept and θ is reset to φ;
* a "block" is the whole tensor for a tensor smaller than :data:`CHUNK` elements, otherwise one
  ``CHUNK``-element slice of it (a flat ZeRO partition holding many parameters loses only the slices
  that hold the bad values). Deciding for a whole large tensor first would need a second pass over θ.

Callers that must decide per whole tensor before writing anything (``nonfinite="raise"``, adaptive α)
call :func:`nonfinite_tensors` first and pass ``check=False``.

Every tensor here is a plain (local) tensor: DTensors are reduced to their local shards by the caller,
so nothing in this module communicates.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["BATCH", "CHUNK", "SyncReport", "local", "nonfinite_tensors", "sync_"]

#: Elements per block for large CPU tensors (256 KiB of fp32 each for θ and φ: both fit in L2).
CHUNK = 1 << 16
#: Most elements per multi-tensor batch of small CPU tensors.
BATCH = 1 << 17

#: (index into the lists, blocks kept, blocks in the tensor) for each tensor with a non-finite block.
SyncReport = list[tuple[int, int, int]]

_dtensor_cls: Any = None
_scratch: dict[tuple[torch.device, torch.dtype], Tensor] = {}


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
    # nothing and runs at cache speed. Finite values whose sum overflows (|θ| ~ 1e34 over many elements)
    # would also read as non-finite: such weights are broken anyway.
    return bool(torch.isfinite(block.sum()))


def _scratch_for(like: Tensor, n: int) -> Tensor:
    key = (like.device, like.dtype)
    buf = _scratch.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.empty(max(n, BATCH), dtype=like.dtype, device=like.device)
        _scratch[key] = buf
    return buf[:n]


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
    if fast[0].device.type == "cpu":
        return _sync_cpu(fast, slow, alpha, check)
    return _sync_foreach(fast, slow, alpha, check)


def _sync_cpu(fast: list[Tensor], slow: list[Tensor], alpha: float, check: bool) -> SyncReport:
    report: SyncReport = []
    batch: list[int] = []
    batch_elems = 0
    for i, (f, s) in enumerate(zip(fast, slow)):
        n = f.numel()
        if n >= CHUNK and f.is_contiguous() and s.is_contiguous():
            kept = _sync_blocks(f.view(-1), s.view(-1), alpha, check)
            if kept:
                report.append((i, kept, -(-n // CHUNK)))
            continue
        batch.append(i)
        batch_elems += n
        if batch_elems >= BATCH:
            _sync_batch(fast, slow, batch, batch_elems, alpha, check, report)
            batch, batch_elems = [], 0
    if batch:
        _sync_batch(fast, slow, batch, batch_elems, alpha, check, report)
    return report


def _sync_blocks(f: Tensor, s: Tensor, alpha: float, check: bool) -> int:
    kept = 0
    n = f.numel()
    for start in range(0, n, CHUNK):
        fb = f[start : start + CHUNK]
        sb = s[start : start + CHUNK]
        if check and not _finite(fb):
            fb.copy_(sb)
            kept += 1
            continue
        sb.lerp_(fb, alpha)
        fb.copy_(sb)
    return kept


def _sync_batch(
    fast: list[Tensor],
    slow: list[Tensor],
    idx: list[int],
    elems: int,
    alpha: float,
    check: bool,
    report: SyncReport,
) -> None:
    fs = [fast[i] for i in idx]
    ss = [slow[i] for i in idx]
    if check and elems:
        # One flat reduction for the whole batch (cat is a single kernel over the list); only a batch
        # that fails is inspected tensor by tensor.
        flat = _scratch_for(fs[0], elems) if all(t.dtype == fs[0].dtype for t in fs) else None
        ok = _finite(torch.cat([t.reshape(-1) for t in fs], out=flat)) if flat is not None else False
        if not ok:
            bad = set(nonfinite_tensors(fs))
            if bad:
                for j in sorted(bad):
                    fs[j].copy_(ss[j])
                    report.append((idx[j], 1, 1))
                fs = [t for j, t in enumerate(fs) if j not in bad]
                ss = [t for j, t in enumerate(ss) if j not in bad]
    if fs:
        torch._foreach_lerp_(ss, fs, alpha)
        torch._foreach_copy_(fs, ss)


def _sync_foreach(fast: list[Tensor], slow: list[Tensor], alpha: float, check: bool) -> SyncReport:
    report: SyncReport = []
    if check:
        bad = set(nonfinite_tensors(fast))
        if bad:
            for j in sorted(bad):
                fast[j].copy_(slow[j])
                report.append((j, 1, 1))
            fast = [t for j, t in enumerate(fast) if j not in bad]
            slow = [t for j, t in enumerate(slow) if j not in bad]
    if fast:
        torch._foreach_lerp_(slow, fast, alpha)
        torch._foreach_copy_(fast, slow)
    return report
