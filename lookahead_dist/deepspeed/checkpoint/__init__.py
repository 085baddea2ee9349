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

from .complete import (
    IncompleteCheckpointError,
    TagReport,
    check_checkpoint,
    check_command,
    check_tag,
    last_complete_tag,
    resolve_load_tag,
    save_checkpoint,
)
from .consolidate import (
    _lookahead_layout,  # noqa: F401 - tests/test_bad_inputs.py checks the layout rule directly
    consolidated_slow_state_dict,
    save_consolidated_slow_weights,
)
from .universal import (
    RESTORES_UNIVERSAL,
    UNIVERSAL_META_FILE,
    load_checkpoint,
    restore_after_universal_load,
    restore_if_universal,
    to_universal,
)

__all__ = [
    "RESTORES_UNIVERSAL",
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
    "restore_if_universal",
    "save_checkpoint",
    "save_consolidated_slow_weights",
    "to_universal",
]
