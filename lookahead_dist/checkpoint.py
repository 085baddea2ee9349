"""``python -m lookahead_dist.checkpoint``: Lookahead's slow weights through checkpoint tools.

    python -m lookahead_dist.checkpoint check CKPT_DIR [--tag TAG]
    python -m lookahead_dist.checkpoint to-universal CKPT_DIR [--tag TAG] [--output-dir DIR]
    python -m lookahead_dist.checkpoint slow-weights CKPT_DIR|LIGHTNING.ckpt OUT.pt|OUT.safetensors [--tag TAG]
    python -m lookahead_dist.checkpoint slow-weights-dcp CKPT_DIR OUT

The DeepSpeed tools (completeness checks, universal checkpoints, consolidated slow weights) and the Lightning
``.ckpt`` reader live in :mod:`lookahead_dist.deepspeed.checkpoint`; their names are re-exported here, where they
always were. ``slow-weights-dcp CKPT_DIR OUT`` writes the consolidated slow weights of a
torch.distributed.checkpoint folder (FSDP, Lightning's ModelParallelStrategy / FSDPStrategy sharded checkpoints);
see :mod:`lookahead_dist.fsdp.checkpoint`.
"""

from __future__ import annotations

from .deepspeed.checkpoint import (
    UNIVERSAL_META_FILE,
    IncompleteCheckpointError,
    TagReport,
    check_checkpoint,
    check_tag,
    consolidated_slow_state_dict,
    last_complete_tag,
    lightning_slow_state_dict,
    load_checkpoint,
    main,
    resolve_load_tag,
    restore_after_universal_load,
    restore_if_universal,
    save_checkpoint,
    save_consolidated_slow_weights,
    to_universal,
)

__all__ = [
    "UNIVERSAL_META_FILE",
    "IncompleteCheckpointError",
    "TagReport",
    "check_checkpoint",
    "check_tag",
    "consolidated_slow_state_dict",
    "last_complete_tag",
    "lightning_slow_state_dict",
    "load_checkpoint",
    "main",
    "resolve_load_tag",
    "restore_after_universal_load",
    "restore_if_universal",
    "save_checkpoint",
    "save_consolidated_slow_weights",
    "to_universal",
]



def _slow_weights_dcp(argv: list[str]) -> int:
    from .fsdp.checkpoint import main as dcp_main

    return dcp_main(argv, prog="python -m lookahead_dist.checkpoint slow-weights-dcp")


#: Subcommands of other engines, listed in ``--help`` beside the DeepSpeed tools.
EXTRA_COMMANDS = {
    "slow-weights-dcp": (
        "consolidated slow weights from a torch.distributed.checkpoint folder (FSDP2, Lightning FSDP)",
        _slow_weights_dcp,
    ),
}


def _cli(argv: list[str]) -> int:
    return main(argv, extra=EXTRA_COMMANDS)


if __name__ == "__main__":
    import sys

    raise SystemExit(_cli(sys.argv[1:]))
