"""Universal checkpoints (resume at another world size) that keep φ and the cycle position.

``ds_to_universal`` writes only ``fp32``/``exp_avg``/``exp_avg_sq`` per parameter. :func:`to_universal` runs it
and adds ``<param>/lookahead_slow.pt`` (and ``lookahead_slow_<buffer>.pt`` under ``pullback="pullback"``) plus
the cycle position in ``lookahead_universal.json``. At load, :func:`load_checkpoint` (or
``engine.load_checkpoint`` followed by :func:`restore_after_universal_load`) puts φ and the counters into every
new partition. Under ZeRO-3 it also repairs two things DeepSpeed's own universal loader gets wrong with or
without Lookahead: per-group hyper-parameters (all groups get group 0's) and a ``step`` tensor shared by all
sub-groups (Adam then advances it once per sub-group).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ...core.keys import COUNT_KEY, GROUP_K
from ..holders import find_lookahead
from .complete import resolve_load_tag
from .consolidate import (
    _load_rank_files,
    _lookahead_layout,
    _merge_like_zero_to_fp32,
    _resolve_tag_dir,
    _slow_flat_groups,
    _trainable_names,
)

__all__ = [
    "RESTORES_UNIVERSAL",
    "UNIVERSAL_META_FILE",
    "load_checkpoint",
    "restore_after_universal_load",
    "restore_if_universal",
    "to_universal",
]

#: Written next to ``zero/`` in the universal folder: the slow keys and the shared cycle position.
UNIVERSAL_META_FILE = "lookahead_universal.json"
_META_FORMAT = 1
#: Set on an engine whose ``load_checkpoint`` already completes universal loads (see ``install``).
RESTORES_UNIVERSAL = "_lookahead_restores_universal"


# ----------------------------------------------------------------------------- universal: convert
def _run_ds_to_universal(tag_dir: Path, out: Path, num_workers: int) -> None:
    """DeepSpeed's own converter, through its documented command line."""
    import subprocess

    command = [
        sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
        "--input_folder", str(tag_dir), "--output_folder", str(out),
        "--num_extract_workers", str(num_workers), "--num_merge_workers", str(num_workers),
        "--inject_missing_state",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"Lookahead to_universal: DeepSpeed's ds_to_universal failed on {str(tag_dir)!r} "
            f"(exit {done.returncode}):\n{done.stderr[-4000:]}"
        )


def to_universal(
    checkpoint_dir: str | os.PathLike,
    tag: str | None = None,
    output_dir: str | os.PathLike | None = None,
    *,
    num_workers: int = 1,
) -> Path:
    """Convert a ZeRO-1/2/3 checkpoint to a DeepSpeed universal checkpoint that keeps Lookahead's state.

    Runs ``deepspeed.checkpoint.ds_to_universal`` and adds, per trainable parameter, ``lookahead_slow.pt``
    (and ``lookahead_slow_<buffer>.pt`` for pulled-back buffers) in the same format as its ``fp32.pt``,
    plus :data:`UNIVERSAL_META_FILE` with the cycle position. Output defaults to ``<tag>_universal`` next
    to the tag folder; DeepSpeed writes ``latest_universal`` beside it. Returns the output folder.

    Resume with ``"checkpoint": {"load_universal": true}`` in the DeepSpeed config and
    :func:`load_checkpoint` (or ``engine.load_checkpoint`` then :func:`restore_after_universal_load`).
    """
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"Lookahead to_universal: num_workers={num_workers!r} must be an int >= 1.")
    tag_dir = _resolve_tag_dir(checkpoint_dir, tag)
    out = Path(output_dir) if output_dir is not None else tag_dir.parent / f"{tag_dir.name}_universal"
    if out.resolve() == tag_dir.resolve():
        raise ValueError(
            f"Lookahead to_universal: output_dir {str(out)!r} is the input folder; choose another."
        )
    stage, states = _load_rank_files(tag_dir)
    keys, count = _lookahead_layout(states, stage)  # validate before the long conversion

    _run_ds_to_universal(tag_dir, out, num_workers)

    names = _trainable_names(tag_dir)
    for key in keys:
        merged = _merge_like_zero_to_fp32(tag_dir, stage, states, _slow_flat_groups(states, stage, key), True)
        for name in names:
            # Same layout as ds_to_universal's fp32.pt for a data-parallel-only parameter.
            torch.save({"param": merged[name].contiguous(), "cat_dim": 0}, out / "zero" / name / f"{key}.pt")
    meta = {
        "format": _META_FORMAT,
        "slow_keys": keys,
        "count": count,
        "zero_stage": stage,
        "source_world_size": len(states),
    }
    (out / UNIVERSAL_META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return out


# -------------------------------------------------------------------------------- universal: load
def _universal_folder(load_dir: str | os.PathLike, tag: str | None) -> Path:
    root = Path(load_dir)
    if tag is None:
        latest = root / "latest_universal"
        if not latest.is_file():
            raise FileNotFoundError(
                f"Lookahead checkpoint: {str(latest)!r} does not exist; pass tag=... "
                f"(the folder name written by to_universal)."
            )
        tag = latest.read_text().strip()
    return root / tag


def _read_meta(folder: Path) -> dict[str, Any]:
    meta_file = folder / UNIVERSAL_META_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(
            f"Lookahead checkpoint: {str(meta_file)!r} is missing, so this universal checkpoint does not carry "
            f"Lookahead's slow weights (plain ds_to_universal drops them). Convert the original checkpoint "
            f"with lookahead_dist.checkpoint.to_universal (CLI: python -m lookahead_dist.checkpoint "
            f"to-universal CKPT_DIR)."
        )
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != _META_FORMAT:
        raise ValueError(
            f"Lookahead checkpoint: {str(meta_file)!r} has format {meta.get('format')!r}; this "
            f"version reads format {_META_FORMAT}."
        )
    return meta


def _check_count_fits(engine: Any, count: int) -> None:
    wrapper = find_lookahead(engine)
    if wrapper is not None:
        ks = [g.get(GROUP_K, wrapper.k) for g in wrapper.param_groups] or [wrapper.k]
        if count >= min(ks):
            raise ValueError(
                f"Lookahead checkpoint: the saved cycle position {count} does not fit k={min(ks)} of "
                f"the installed Lookahead; resume with the k the checkpoint was trained with."
            )


def _repair_zero3_universal_load(zero_opt: Any, zero_dir: Path) -> None:
    """Undo two side effects of ZeRO-3's universal loader (DeepSpeed 0.19.8, stage3.py L3664-3692).

    It gives every param group the hyper-parameters of group 0 (lr, ..., and Lookahead's per-group
    ``lookahead_k`` / ``lookahead_alpha``), and it stores one ``step`` tensor object in every sub-group's
    state, which torch's Adam then increments once per sub-group per step.
    """
    saved = torch.load(zero_dir / "optimizer_state.pt", map_location="cpu", weights_only=False)
    saved_groups = saved["param_groups"]
    groups = zero_opt.optimizer.param_groups
    if len(saved_groups) != len(groups):
        raise ValueError(
            f"Lookahead checkpoint: the universal checkpoint has {len(saved_groups)} param groups, "
            f"the optimizer {len(groups)}; build the optimizer with the same param groups."
        )
    for group, saved_group in zip(groups, saved_groups):
        for key, value in saved_group.items():
            if key != "params":
                group[key] = value
    state = zero_opt.optimizer.state
    for flat in zero_opt.fp32_partitioned_groups_flat:
        step = state.get(flat, {}).get("step")
        if isinstance(step, Tensor):
            state[flat]["step"] = step.clone()


def _restore_zero3(zero_opt: Any, folder: Path, keys: list[str], count: int) -> None:
    """Fill φ of each sub-group's fp32 partition from the universal files (ZeRO-3's loader ignores them)."""
    if getattr(zero_opt, "swap_optimizer", False):
        raise NotImplementedError(
            "Lookahead checkpoint: restoring slow weights from a universal checkpoint "
            "with ZeRO-3 NVMe optimizer offload is not supported; load without NVMe "
            "offload, save a regular checkpoint, then switch offload back on."
        )
    state = zero_opt.optimizer.state
    zero_dir = folder / "zero"
    with torch.no_grad():
        for sub_group_id, params in enumerate(zero_opt.fp16_groups):
            fp32_flat = zero_opt.fp32_partitioned_groups_flat[sub_group_id]
            for key in keys:
                buffer = torch.zeros_like(fp32_flat)
                offset = 0
                for param in params:
                    name = zero_opt.param_names[param]
                    part = zero_opt.load_hp_checkpoint_state(str(zero_dir / name), key, param=param)
                    buffer.narrow(0, offset, part.numel()).copy_(part)
                    offset += part.numel()
                state[fp32_flat][key] = buffer
            state[fp32_flat][COUNT_KEY] = count


def restore_after_universal_load(
    engine: Any, load_dir: str | os.PathLike, tag: str | None = None
) -> int | None:
    """After ``engine.load_checkpoint`` of a :func:`to_universal` checkpoint, complete Lookahead's state.

    ZeRO-1/2: DeepSpeed's loader already put φ into the new partitions; this sets the cycle counters.
    ZeRO-3: DeepSpeed's loader reads a fixed key list, so this also loads φ into each partition; it also
    repairs the per-group hyper-parameters and the shared ``step`` tensor that loader leaves behind
    (which would be wrong without Lookahead too).
    Returns the restored cycle position (``None`` if the checkpoint held no Lookahead state).
    """
    folder = _universal_folder(load_dir, tag)
    meta = _read_meta(folder)
    keys, count = list(meta["slow_keys"]), meta["count"]
    zero_opt = engine.optimizer
    stage3 = engine.zero_optimization_stage() == 3
    if stage3:
        _repair_zero3_universal_load(zero_opt, folder / "zero")
    if not keys:
        return None
    _check_count_fits(engine, count)
    if stage3:
        _restore_zero3(zero_opt, folder, keys, count)
        return count
    inner_state = zero_opt.optimizer.state
    flats = [p for g in zero_opt.optimizer.param_groups for p in g["params"]]
    missing = [i for i, p in enumerate(flats) if any(k not in inner_state.get(p, {}) for k in keys)]
    if not flats or missing:
        raise RuntimeError(
            f"Lookahead checkpoint: the slow weights of {str(folder)!r} were not loaded into the optimizer "
            f"(flat partitions {missing} lack them). Load with load_optimizer_states=True and "
            f'"checkpoint": {{"load_universal": true}} in the DeepSpeed config, before calling this.'
        )
    for p in flats:
        inner_state[p][COUNT_KEY] = count
    return count


def load_checkpoint(
    engine: Any,
    load_dir: str | os.PathLike,
    tag: str | None = None,
    *,
    fallback: bool = False,
    **load_kwargs: Any,
) -> tuple[Any, Any]:
    """``engine.load_checkpoint``, refusing incomplete tags, plus the Lookahead state universal loads drop.

    A regular tag (``tag`` or the one ``latest`` names) whose per-rank files are missing or truncated is
    refused with :class:`IncompleteCheckpointError` naming the files and the last complete tag; with
    ``fallback=True`` that tag is loaded instead, with a warning. Every rank reads the same folder, so
    every rank decides the same. For universal checkpoints this also runs
    :func:`restore_after_universal_load` (an engine set up by :func:`lookahead_dist.deepspeed.install`
    does that in its own ``load_checkpoint``).
    """
    if not engine.load_universal_checkpoint():
        tag = resolve_load_tag(load_dir, tag, fallback=fallback)
        if tag is None:
            return None, None  # no 'latest' and no tag: what DeepSpeed returns (it also warns)
    result = engine.load_checkpoint(load_dir, tag=tag, **load_kwargs)
    if not getattr(engine, RESTORES_UNIVERSAL, False):
        restore_if_universal(engine, load_dir, tag, load_kwargs, result)
    return result


def restore_if_universal(
    engine: Any, load_dir: str | os.PathLike, tag: str | None, load_kwargs: dict[str, Any], result: Any
) -> None:
    """Run :func:`restore_after_universal_load` when ``engine.load_checkpoint`` loaded a universal one."""
    loads_optimizer = load_kwargs.get("load_optimizer_states", True) and not load_kwargs.get(
        "load_module_only"
    )
    if result[0] is not None and engine.load_universal_checkpoint() and loads_optimizer:
        restore_after_universal_load(engine, load_dir, tag)
