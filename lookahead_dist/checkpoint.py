"""``python -m lookahead_dist.checkpoint``: Lookahead's slow weights through checkpoint tools.

The DeepSpeed tools (universal checkpoints, consolidated slow weights) live in
:mod:`lookahead_dist.deepspeed.checkpoint`; their names are re-exported here, where they always were.
``slow-weights-dcp CKPT_DIR OUT`` writes the consolidated slow weights of a torch.distributed.checkpoint
folder (FSDP, Lightning's ModelParallelStrategy / FSDPStrategy sharded checkpoints); see
:mod:`lookahead_dist.fsdp.checkpoint`.
"""

from __future__ import annotations

from .deepspeed.checkpoint import (
    UNIVERSAL_META_FILE,
    consolidated_slow_state_dict,
    load_checkpoint,
    main,
    restore_after_universal_load,
    restore_if_universal,
    save_consolidated_slow_weights,
    to_universal,
)

__all__ = [
    "UNIVERSAL_META_FILE",
    "consolidated_slow_state_dict",
    "load_checkpoint",
    "main",
    "restore_after_universal_load",
    "restore_if_universal",
    "save_consolidated_slow_weights",
    "to_universal",
]


def _cli(argv: list[str]) -> int:
    # `slow-weights-dcp DIR OUT` (FSDP / torch.distributed.checkpoint folders) is handled by
    # lookahead_dist.fsdp.checkpoint; every other subcommand is the DeepSpeed tools' `main`.
    if argv[:1] == ["slow-weights-dcp"]:
        from .fsdp.checkpoint import main as dcp_main

        return dcp_main(argv[1:], prog="python -m lookahead_dist.checkpoint slow-weights-dcp")
    return main(argv)


if __name__ == "__main__":
    import sys

    raise SystemExit(_cli(sys.argv[1:]))
