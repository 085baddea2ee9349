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

Incomplete checkpoints: DeepSpeed's rank 0 writes ``latest`` without waiting for the other ranks, so
after a crash during a save ``latest`` can name a tag whose per-rank files are missing or truncated.
:func:`check_checkpoint` finds the complete tags, :func:`load_checkpoint` refuses an incomplete tag (or,
with ``fallback=True``, loads the last complete one with a warning), and :func:`save_checkpoint` writes
``latest`` only after every rank has finished writing.

CLI::

    python -m lookahead_dist.checkpoint check CKPT_DIR [--tag TAG]
    python -m lookahead_dist.checkpoint to-universal CKPT_DIR [--tag TAG] [--output-dir DIR]
    python -m lookahead_dist.checkpoint slow-weights CKPT_DIR OUT.pt|OUT.safetensors [--tag TAG]
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import re
import sys
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..core.keys import COUNT_KEY, GROUP_K, SLOW_KEY
from .holders import find_lookahead

__all__ = [
    "UNIVERSAL_META_FILE",
    "IncompleteCheckpointError",
    "TagReport",
    "check_checkpoint",
    "check_command",
    "check_tag",
    "consolidated_slow_state_dict",
    "last_complete_tag",
    "load_checkpoint",
    "resolve_load_tag",
    "restore_after_universal_load",
    "save_checkpoint",
    "save_consolidated_slow_weights",
    "to_universal",
]

#: Written next to ``zero/`` in the universal folder: the slow keys and the shared cycle position.
UNIVERSAL_META_FILE = "lookahead_universal.json"
_META_FORMAT = 1
#: Set on an engine whose ``load_checkpoint`` already completes universal loads (see ``install``).
RESTORES_UNIVERSAL = "_lookahead_restores_universal"
_RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_MODEL_FILE = re.compile(r"^(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt$")

# DeepSpeed checkpoint keys (deepspeed.checkpoint.constants); literal so that importing this module
# does not import DeepSpeed.
_OPTIMIZER_STATE_DICT = "optimizer_state_dict"
_BASE_OPTIMIZER_STATE = "base_optimizer_state"
_SINGLE_PARTITION_OF_FP32_GROUPS = "single_partition_of_fp32_groups"
_FP32_FLAT_GROUPS = "fp32_flat_groups"
_PARAM_ALIGNMENT_PADDINGS = "param_alignment_paddings"
_ZERO_STAGE = "zero_stage"


# ---------------------------------------------------------------------------------- completeness
class IncompleteCheckpointError(RuntimeError):
    """A DeepSpeed checkpoint tag lacks per-rank files, or some are truncated (a save was interrupted)."""


@dataclass
class TagReport:
    """What :func:`check_tag` found in one tag folder."""

    tag: str
    path: Path
    problems: list[str] = field(default_factory=list)
    #: Data-parallel world size the tag was saved with (from its model-states file), if readable.
    world_size: int | None = None
    #: ``engine.global_steps`` at the save, if readable.
    global_steps: int | None = None
    #: A universal checkpoint folder (``to_universal``); never a fallback for a regular load.
    universal: bool = False

    @property
    def complete(self) -> bool:
        return not self.problems


def _readable_torch_file(path: Path) -> str | None:
    """None if ``path`` is a complete torch.save archive, else what is wrong (cheap: no tensor is read)."""
    if not path.is_file():
        return f"{path.name} is missing"
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(name.endswith("data.pkl") for name in archive.namelist()):
                return f"{path.name} is not a torch.save archive"
    except (zipfile.BadZipFile, OSError):
        return f"{path.name} is truncated or corrupt ({path.stat().st_size} bytes; an interrupted write?)"
    return None


def check_tag(tag_dir: str | os.PathLike) -> TagReport:
    """Whether a tag folder of ``engine.save_checkpoint`` holds every rank's files, each complete.

    Expected files come from the tag's own model-states file: its ``dp_world_size`` and whether the
    optimizer state is sharded (ZeRO: one ``*_optim_states.pt`` per data-parallel rank; ZeRO-3 also one
    model-states file per rank). A file counts as complete when its zip directory (written last by
    ``torch.save``) is intact.
    """
    path = Path(tag_dir)
    report = TagReport(tag=path.name, path=path)
    if not path.is_dir():
        report.problems.append(f"{str(path)!r} does not exist")
        return report
    if (path / "zero").is_dir():  # a universal checkpoint (ds_to_universal): no per-rank files
        report.universal = True
        if not any(path.glob("*_model_states.pt")):
            report.problems.append("no *_model_states.pt file in the universal checkpoint")
        return report
    models: dict[str, re.Match[str]] = {}
    for child in path.iterdir():
        match = _MODEL_FILE.match(child.name)
        if match:
            models[child.name] = match
    if not models:
        report.problems.append("no *_model_states.pt file (rank 0 never wrote its part)")
        return report
    first = min(models)
    problem = _readable_torch_file(path / first)
    if problem:
        report.problems.append(problem)
        return report
    head = torch.load(path / first, map_location="cpu", mmap=True, weights_only=False)
    world = head.get("dp_world_size")
    mp_world = head.get("mp_world_size", 1) or 1
    report.world_size = int(world) if isinstance(world, int) else None
    steps = head.get("global_steps")
    report.global_steps = int(steps) if isinstance(steps, int) else None
    if report.world_size is None:
        return report  # not written by a DeepSpeed engine we know: only the readable file is checked
    zero3 = models[first].group(1) is not None
    sharded_optimizer = head.get("optimizer") is None and head.get("param_shapes") is not None
    prefix = ""
    if sharded_optimizer:
        existing = [p.name for p in path.glob("*_optim_states.pt")]
        prefix = "bf16_" if any(name.startswith("bf16_") for name in existing) else ""
    expected = []
    for mp in range(int(mp_world)):
        if not zero3:
            expected.append(f"mp_rank_{mp:02d}_model_states.pt")
        for dp in range(report.world_size):
            if zero3:
                expected.append(f"zero_pp_rank_{dp}_mp_rank_{mp:02d}_model_states.pt")
            if sharded_optimizer:
                expected.append(f"{prefix}zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt")
    for name in expected:
        problem = _readable_torch_file(path / name)
        if problem:
            report.problems.append(problem)
    return report


def _tag_dirs(root: Path) -> list[Path]:
    out = []
    for child in root.iterdir():
        if child.is_dir() and (
            any(_MODEL_FILE.match(p.name) for p in child.iterdir()) or any(child.glob("*_optim_states.pt"))
        ):
            out.append(child)
    return out


def check_checkpoint(checkpoint_dir: str | os.PathLike) -> tuple[str | None, list[TagReport]]:
    """(tag named by ``latest`` or None, a report per tag folder, oldest first by saved step then time)."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"Lookahead checkpoint: {str(root)!r} is not a directory; pass the folder given to "
            f"engine.save_checkpoint."
        )
    latest_file = root / "latest"
    latest = latest_file.read_text().strip() if latest_file.is_file() else None
    dirs = _tag_dirs(root)
    if latest is not None and (root / latest) not in dirs:
        dirs.append(root / latest)
    reports = [check_tag(d) for d in dirs]

    def order(r: TagReport) -> tuple[float, float, str]:
        mtime = max((p.stat().st_mtime for p in r.path.iterdir()), default=0.0) if r.path.is_dir() else 0.0
        return (r.global_steps if r.global_steps is not None else -1.0, mtime, r.tag)

    return latest, sorted(reports, key=order)


def last_complete_tag(checkpoint_dir: str | os.PathLike) -> str | None:
    """The most recent complete tag of ``checkpoint_dir`` (by saved step, then time), or None."""
    complete = [r for r in check_checkpoint(checkpoint_dir)[1] if r.complete and not r.universal]
    return complete[-1].tag if complete else None


def _incomplete_message(root: Path, report: TagReport, fallback_tag: str | None, named_by: str) -> str:
    offer = (
        f"The last complete tag is {fallback_tag!r}: load it with tag={fallback_tag!r}, or call "
        f"lookahead_dist.deepspeed.load_checkpoint(engine, {str(root)!r}, fallback=True)."
        if fallback_tag
        else "No complete tag was found in this folder."
    )
    return (
        f"Lookahead checkpoint: tag {report.tag!r} ({named_by}) in {str(root)!r} is incomplete: "
        f"{'; '.join(report.problems)}. A save was interrupted (DeepSpeed writes 'latest' before every rank "
        f"has finished). {offer} Inspect with: python -m lookahead_dist.checkpoint check {root}"
    )


def resolve_load_tag(load_dir: str | os.PathLike, tag: str | None = None, fallback: bool = False) -> str | None:
    """The tag to load from ``load_dir``: ``tag``, else ``latest``; refused if incomplete.

    With ``fallback=True`` an incomplete tag is replaced by the last complete one, with a warning.
    Returns None when the folder has no ``latest`` and no tag was given (DeepSpeed then loads nothing).
    """
    root = Path(load_dir)
    named_by = "given as tag="
    if tag is None:
        latest = root / "latest"
        if not latest.is_file():
            return None
        tag, named_by = latest.read_text().strip(), "named by the 'latest' file"
    report = check_tag(root / tag)
    if report.complete:
        return tag
    fallback_tag = last_complete_tag(root)
    message = _incomplete_message(root, report, fallback_tag, named_by)
    if not fallback or fallback_tag is None:
        raise IncompleteCheckpointError(message)
    warnings.warn(
        f"Lookahead checkpoint: tag {tag!r} in {str(root)!r} is incomplete ({'; '.join(report.problems)}); "
        f"loading the last complete tag {fallback_tag!r} instead.",
        RuntimeWarning,
        stacklevel=3,
    )
    return fallback_tag


def save_checkpoint(
    engine: Any,
    save_dir: str | os.PathLike,
    tag: str | None = None,
    client_state: dict[str, Any] | None = None,
    save_latest: bool = True,
    **save_kwargs: Any,
) -> bool:
    """``engine.save_checkpoint``, but ``latest`` is written only once every rank has written its files.

    DeepSpeed's rank 0 writes ``latest`` as soon as its own files are done; a crash of another rank
    during its write then leaves ``latest`` naming an incomplete tag. Here DeepSpeed saves without
    ``latest``; its closing barrier is passed only when every rank's files are written; then rank 0
    replaces ``latest`` atomically (write a temporary file, ``os.replace``) and all ranks meet again.
    """
    import deepspeed.comm as dist

    if tag is None:
        tag = f"global_step{engine.global_steps}"  # DeepSpeed's default tag
    done = engine.save_checkpoint(
        save_dir, tag=tag, client_state={} if client_state is None else client_state, save_latest=False,
        **save_kwargs,
    )  # fmt: skip
    if save_latest:
        if dist.get_rank() == 0:
            latest = Path(save_dir) / "latest"
            temporary = latest.with_name(f".latest.{os.getpid()}.tmp")
            temporary.write_text(str(tag))
            os.replace(temporary, latest)
        dist.barrier()
    return bool(done)


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
    report = check_tag(tag_dir)
    if not report.complete:
        root = tag_dir.parent
        fallback_tag = last_complete_tag(root) if root.is_dir() else None
        raise IncompleteCheckpointError(
            _incomplete_message(root, report, fallback_tag, "being read").replace(
                "load it with tag=", "pass --tag "
            )
        )
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
    from .._files import save_state_dict

    return save_state_dict(consolidated_slow_state_dict(checkpoint_dir, tag), output_file)


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


# ------------------------------------------------------------------------------------------- CLI
def check_command(root: Path, tag: str | None) -> int:
    """Print one line per tag; exit 0 if the tag to resume from is complete, 1 if not, 2 if none is."""
    if tag is not None:
        report = check_tag(root / tag)
        print(_report_line(report))
        return 0 if report.complete else 1
    latest, reports = check_checkpoint(root)
    for report in reports:
        print(_report_line(report, is_latest=report.tag == latest))
    complete = [r.tag for r in reports if r.complete and not r.universal]
    if latest is None:
        print(f"no 'latest' file in {str(root)!r}")
    latest_ok = any(r.tag == latest and r.complete for r in reports)
    if not complete:
        print("no complete tag: nothing to resume from")
        return 2
    if latest_ok:
        print(f"resume from: {latest}")
        return 0
    print(
        f"'latest' names an incomplete tag; resume from the last complete one, {complete[-1]!r}: pass "
        f"tag={complete[-1]!r}, or lookahead_dist.deepspeed.load_checkpoint(engine, DIR, fallback=True)"
    )
    return 1


def _report_line(report: TagReport, is_latest: bool = False) -> str:
    mark = " (latest)" if is_latest else ""
    if report.complete:
        detail = f"{report.world_size} rank(s)" if report.world_size is not None else "readable"
        if report.universal:
            detail = "universal checkpoint"
        if report.global_steps is not None:
            detail += f", step {report.global_steps}"
        return f"{report.tag}{mark}: complete ({detail})"
    return f"{report.tag}{mark}: INCOMPLETE: {'; '.join(report.problems)}"

