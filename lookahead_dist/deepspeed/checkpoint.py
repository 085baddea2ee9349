"""Lookahead's slow weights in DeepSpeed checkpoints: universal checkpoints and consolidation.

Per-rank (rigid) DeepSpeed checkpoints already carry the slow weights φ and the cycle counters, because
they live in the inner optimizer's per-tensor state. Two DeepSpeed tools do not know about them:

* ``ds_to_universal`` (resume at another world size) writes only ``fp32``/``exp_avg``/``exp_avg_sq``
  per parameter. :func:`to_universal` runs it and adds ``<param>/lookahead_slow.pt`` (and
  ``lookahead_slow_<buffer>.pt`` under ``pullback="pullback"``) plus the cycle position in
  ``lookahead_universal.json``. At load, :func:`load_checkpoint` (or ``engine.load_checkpoint`` followed
  by :func:`restore_after_universal_load`) puts φ and the counters into every new partition. Under
  ZeRO-3 it also repairs two things DeepSpeed's own universal loader gets wrong with or without
  Lookahead: per-group hyper-parameters (all groups get group 0's) and a ``step`` tensor shared by all
  sub-groups (Adam then advances it once per sub-group).
* ``zero_to_fp32`` consolidates the fast weights only. :func:`consolidated_slow_state_dict` applies the
  same merge to φ and returns a state dict that loads into the plain model.

Data parallelism only (ZeRO-1/2/3, any world size); tensor- or pipeline-parallel checkpoints are refused.

CLI::

    python -m lookahead_dist.checkpoint to-universal CKPT_DIR [--tag TAG] [--output-dir DIR]
    python -m lookahead_dist.checkpoint slow-weights CKPT_DIR OUT.pt|OUT.safetensors [--tag TAG]
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..core.keys import COUNT_KEY, GROUP_K, SLOW_KEY
from .holders import find_lookahead

__all__ = [
    "UNIVERSAL_META_FILE",
    "consolidated_slow_state_dict",
    "load_checkpoint",
    "main",
    "restore_after_universal_load",
    "save_consolidated_slow_weights",
    "to_universal",
]

#: Written next to ``zero/`` in the universal folder: the slow keys and the shared cycle position.
UNIVERSAL_META_FILE = "lookahead_universal.json"
_META_FORMAT = 1
#: Set on an engine whose ``load_checkpoint`` already completes universal loads (see ``install``).
RESTORES_UNIVERSAL = "_lookahead_restores_universal"
_RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")

# DeepSpeed checkpoint keys (deepspeed.checkpoint.constants); literal so that importing this module
# does not import DeepSpeed.
_OPTIMIZER_STATE_DICT = "optimizer_state_dict"
_BASE_OPTIMIZER_STATE = "base_optimizer_state"
_SINGLE_PARTITION_OF_FP32_GROUPS = "single_partition_of_fp32_groups"
_FP32_FLAT_GROUPS = "fp32_flat_groups"
_PARAM_ALIGNMENT_PADDINGS = "param_alignment_paddings"
_ZERO_STAGE = "zero_stage"


# ---------------------------------------------------------------------------------------- reading
def _resolve_tag_dir(checkpoint_dir: str | os.PathLike, tag: str | None) -> Path:
    """The folder holding ``*_optim_states.pt``: ``checkpoint_dir/tag``, the folder itself, or ``latest``."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"Lookahead checkpoint: {str(root)!r} is not a directory; pass the folder "
            f"given to engine.save_checkpoint (or one of its tag folders)."
        )
    if tag is not None:
        tag_dir = root / tag
        if not tag_dir.is_dir():
            raise FileNotFoundError(
                f"Lookahead checkpoint: tag {tag!r} not found: {str(tag_dir)!r} does not exist."
            )
        return tag_dir
    if glob.glob(str(root / "*_optim_states.pt")):
        return root
    latest = root / "latest"
    if not latest.is_file():
        raise FileNotFoundError(
            f"Lookahead checkpoint: {str(root)!r} has no *_optim_states.pt files and no 'latest' file; pass "
            f"tag=... (e.g. tag='global_step100') or the tag folder itself."
        )
    return _resolve_tag_dir(root, latest.read_text().strip())


def _load_rank_files(tag_dir: Path) -> tuple[int, list[dict[str, Any]]]:
    """(ZeRO stage, the optimizer-state dict of every data-parallel rank, in rank order)."""
    by_rank: dict[int, str] = {}
    for path in glob.glob(str(tag_dir / "*_optim_states.pt")):
        match = _RANK_FILE.search(os.path.basename(path))
        if match is None:
            raise ValueError(f"Lookahead checkpoint: cannot read the rank from file name {path!r}.")
        dp_rank, mp_rank = int(match.group(1)), int(match.group(2))
        if mp_rank != 0:
            raise NotImplementedError(
                f"Lookahead checkpoint: {path!r} comes from a tensor/pipeline-parallel run (mp_rank={mp_rank}); "
                f"only data-parallel (ZeRO) checkpoints are supported."
            )
        if dp_rank in by_rank:
            raise ValueError(
                f"Lookahead checkpoint: two files for rank {dp_rank}: {by_rank[dp_rank]!r}, {path!r}."
            )
        by_rank[dp_rank] = path
    if not by_rank:
        raise FileNotFoundError(
            f"Lookahead checkpoint: no *_optim_states.pt files in {str(tag_dir)!r}; is this "
            f"a DeepSpeed ZeRO checkpoint?"
        )
    if sorted(by_rank) != list(range(len(by_rank))):
        raise ValueError(
            f"Lookahead checkpoint: ranks {sorted(by_rank)} in {str(tag_dir)!r} are not 0..N-1; a "
            f"rank's file is missing (incomplete save?)."
        )
    states = []
    for rank in range(len(by_rank)):
        sd = torch.load(by_rank[rank], map_location="cpu", mmap=True, weights_only=False)
        states.append(sd[_OPTIMIZER_STATE_DICT])
    stage = int(states[0].get(_ZERO_STAGE, 1))
    if stage not in (1, 2, 3):
        raise ValueError(f"Lookahead checkpoint: unknown ZeRO stage {stage} in {str(tag_dir)!r}.")
    return stage, states


def _flat_groups(osd: dict[str, Any], stage: int) -> list[Tensor]:
    """This rank's fp32 flat partitions as zero_to_fp32 merges them (ZeRO-1/2: padding removed)."""
    return osd[_FP32_FLAT_GROUPS if stage == 3 else _SINGLE_PARTITION_OF_FP32_GROUPS]


def _group_states(osd: dict[str, Any], stage: int) -> list[dict[str, Any]]:
    """The inner optimizer's state of each flat partition of one rank (one tensor per group/sub-group)."""
    n = len(_flat_groups(osd, stage))
    base = osd[_OPTIMIZER_STATE_DICT] if stage == 3 else osd[_BASE_OPTIMIZER_STATE]
    if isinstance(base, list):  # ZeRO-1/2 elastic format: one lean state per group
        return list(base)
    # Rigid format: torch state_dict numbering; the flat partitions are the only params, in order.
    return [base["state"].get(i, {}) for i in range(n)]


def _lookahead_layout(
    states: list[dict[str, Any]], stage: int, need_count: bool = True
) -> tuple[list[str], int | None]:
    """Slow-state keys and the one cycle position shared by every tensor of every rank.

    ([], None) when the checkpoint holds no Lookahead state (saved before the first step, or right after
    a sync with ``pullback="reset"``: either way the next step starts a cycle from the current weights).
    """
    seen: dict[tuple[int, int], tuple[tuple[str, ...], Any]] = {}
    for rank, osd in enumerate(states):
        for gi, st in enumerate(_group_states(osd, stage)):
            keys = tuple(sorted(k for k in st if k.startswith(SLOW_KEY) and isinstance(st[k], Tensor)))
            seen[(rank, gi)] = (keys, st.get(COUNT_KEY))
    layouts = {keys for keys, _ in seen.values()}
    if layouts == {()}:
        return [], None
    if len(layouts) != 1:
        detail = ", ".join(f"rank {r} group {g}: {list(k)}" for (r, g), (k, _) in sorted(seen.items()))
        raise ValueError(
            f"Lookahead checkpoint: the slow-weight keys differ between tensors ({detail}); the checkpoint "
            f"cannot be converted. Save it with every parameter group stepped by the same Lookahead."
        )
    counts = {count for _, count in seen.values()}
    if not need_count:
        return list(layouts.pop()), None
    if len(counts) != 1 or not isinstance(next(iter(counts)), int):
        detail = ", ".join(f"rank {r} group {g}: {c!r}" for (r, g), (_, c) in sorted(seen.items()))
        raise ValueError(
            f"Lookahead checkpoint: the cycle counters ('{COUNT_KEY}') differ between tensors ({detail}). A "
            f"universal checkpoint stores one cycle position; save at a step where all groups are at the same "
            f"point of their cycle (e.g. same k for every group, or right after a sync of all groups)."
        )
    return list(layouts.pop()), counts.pop()


def _slow_flat_groups(states: list[dict[str, Any]], stage: int, key: str) -> list[list[Tensor]]:
    """Per rank, per flat partition: the ``key`` tensor cut to the length zero_to_fp32 expects."""
    out = []
    for osd in states:
        flats = _flat_groups(osd, stage)
        group_states = _group_states(osd, stage)
        out.append([st[key].reshape(-1)[: flat.numel()].float() for st, flat in zip(group_states, flats)])
    return out


def _merge_like_zero_to_fp32(
    tag_dir: Path,
    stage: int,
    states: list[dict[str, Any]],
    flat_groups: list[list[Tensor]],
    exclude_frozen_parameters: bool,
) -> dict[str, Tensor]:
    """zero_to_fp32's merge of fp32 partitions, applied to other per-rank flat partitions."""
    from deepspeed.utils import zero_to_fp32 as z2f

    quiet = io.StringIO()  # its progress lines talk about "fp32 weights", which would mislead here
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        model_states = z2f.parse_model_states(z2f.get_model_state_files(str(tag_dir)))
        world_size = len(states)
        if stage <= 2:
            merged = z2f._get_fp32_state_dict_from_zero2_checkpoint(
                world_size,
                flat_groups,
                model_states,
                exclude_frozen_parameters,
                states[0].get(_PARAM_ALIGNMENT_PADDINGS),
            )
        else:
            merged = z2f._get_fp32_state_dict_from_zero3_checkpoint(
                world_size, flat_groups, model_states, exclude_frozen_parameters
            )
        return z2f.to_torch_tensor(merged)


def _trainable_names(tag_dir: Path) -> list[str]:
    from deepspeed.utils import zero_to_fp32 as z2f

    model_state = torch.load(
        z2f.get_model_state_files(str(tag_dir))[0], map_location="cpu", weights_only=False
    )
    return [name for group in model_state["param_shapes"] for name in group]


# ---------------------------------------------------------------------------------- consolidation
def consolidated_slow_state_dict(
    checkpoint_dir: str | os.PathLike,
    tag: str | None = None,
    *,
    exclude_frozen_parameters: bool = False,
) -> dict[str, Tensor]:
    """The slow weights φ of a ZeRO-1/2/3 checkpoint as one fp32 state dict for the plain model.

    The analogue of ``deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint`` (which gives
    the fast weights θ): same arguments, same merge, and buffers / frozen parameters taken from the model
    states as it does, so ``model.load_state_dict(consolidated_slow_state_dict(dir))`` works.
    """
    tag_dir = _resolve_tag_dir(checkpoint_dir, tag)
    stage, states = _load_rank_files(tag_dir)
    keys, _ = _lookahead_layout(states, stage, need_count=False)
    if SLOW_KEY not in keys:
        raise ValueError(
            f"Lookahead checkpoint: {str(tag_dir)!r} holds no slow weights ('{SLOW_KEY}' is in no optimizer "
            f"state). Was it saved with Lookahead installed and after at least one step? Right after a sync "
            f"with pullback='reset' the slow weights equal the fast ones: use zero_to_fp32 then."
        )
    flat = _slow_flat_groups(states, stage, SLOW_KEY)
    return _merge_like_zero_to_fp32(tag_dir, stage, states, flat, exclude_frozen_parameters)


def save_consolidated_slow_weights(
    checkpoint_dir: str | os.PathLike,
    output_file: str | os.PathLike,
    tag: str | None = None,
) -> Path:
    """Write :func:`consolidated_slow_state_dict` to ``output_file`` (``.safetensors`` or torch ``.pt``)."""
    out = Path(output_file)
    state = consolidated_slow_state_dict(checkpoint_dir, tag)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        # safetensors refuses tensors sharing storage (tied weights): give each its own copy.
        save_file({name: t.detach().contiguous().clone() for name, t in state.items()}, str(out))
    else:
        torch.save(state, out)
    return out


# ----------------------------------------------------------------------------- universal: convert
def _run_ds_to_universal(tag_dir: Path, out: Path, num_workers: int) -> None:
    """DeepSpeed's own converter, through its documented command line."""
    import subprocess
    import sys

    command = [
        sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
        "--input_folder", str(tag_dir), "--output_folder", str(out),
        "--num_extract_workers", str(num_workers), "--num_merge_workers", str(num_workers),
        "--inject_missing_state",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
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
    from deepspeed.checkpoint import ds_to_universal

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
    engine: Any, load_dir: str | os.PathLike, tag: str | None = None, **load_kwargs: Any
) -> tuple[Any, Any]:
    """``engine.load_checkpoint`` plus, for universal checkpoints, :func:`restore_after_universal_load`.

    An engine set up by :func:`lookahead_dist.deepspeed.install` already does this in its own
    ``load_checkpoint``; this function is for engines whose Lookahead was installed another way.
    """
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


# ------------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lookahead_dist.checkpoint",
        description="Carry Lookahead's slow weights through DeepSpeed checkpoint tools.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    uni = sub.add_parser("to-universal", help="ds_to_universal + Lookahead slow weights and cycle position")
    uni.add_argument("checkpoint_dir", help="folder given to engine.save_checkpoint, or one tag folder")
    uni.add_argument("--tag", default=None, help="tag folder to convert (default: the 'latest' file)")
    uni.add_argument("--output-dir", default=None, help="default: <tag>_universal beside the tag folder")
    uni.add_argument("--num-workers", type=int, default=1, help="processes for DeepSpeed's extraction/merge")
    slow = sub.add_parser("slow-weights", help="consolidated fp32 slow weights (like zero_to_fp32)")
    slow.add_argument("checkpoint_dir", help="folder given to engine.save_checkpoint, or one tag folder")
    slow.add_argument("output_file", help="*.safetensors for safetensors, anything else for torch.save")
    slow.add_argument("--tag", default=None, help="tag folder to read (default: the 'latest' file)")
    args = parser.parse_args(argv)
    if args.command == "to-universal":
        out = to_universal(args.checkpoint_dir, args.tag, args.output_dir, num_workers=args.num_workers)
        print(f"Lookahead universal checkpoint written to {out}")
    else:
        out = save_consolidated_slow_weights(args.checkpoint_dir, args.output_file, args.tag)
        print(f"Consolidated slow weights written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
