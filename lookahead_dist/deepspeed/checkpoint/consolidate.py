"""Consolidated slow weights: ``zero_to_fp32``'s merge applied to φ, a state dict that loads into the plain model.

``zero_to_fp32`` consolidates the fast weights only. :func:`consolidated_slow_state_dict` reads every rank's
``*_optim_states.pt``, checks that the ranks agree on Lookahead's layout and merges φ the same way.
Data parallelism only (ZeRO-1/2/3, any world size); tensor- or pipeline-parallel checkpoints are refused.
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ...core.keys import COUNT_KEY, SLOW_KEY
from .complete import RANK_FILE, IncompleteCheckpointError, _incomplete_message, check_tag, last_complete_tag

__all__ = ["consolidated_slow_state_dict", "save_consolidated_slow_weights"]

# DeepSpeed checkpoint keys (deepspeed.checkpoint.constants); literal so that importing this module
# does not import DeepSpeed.
_OPTIMIZER_STATE_DICT = "optimizer_state_dict"
_BASE_OPTIMIZER_STATE = "base_optimizer_state"
_SINGLE_PARTITION_OF_FP32_GROUPS = "single_partition_of_fp32_groups"
_FP32_FLAT_GROUPS = "fp32_flat_groups"
_PARAM_ALIGNMENT_PADDINGS = "param_alignment_paddings"
_ZERO_STAGE = "zero_stage"


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
        match = RANK_FILE.search(os.path.basename(path))
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
    from ..._files import save_state_dict

    return save_state_dict(consolidated_slow_state_dict(checkpoint_dir, tag), output_file)
