"""``python -m lookahead_dist.checkpoint``: Lookahead's slow weights through checkpoint tools.

The DeepSpeed tools (universal checkpoints, consolidated slow weights) live in
:mod:`lookahead_dist.deepspeed.checkpoint`; their names are re-exported here, where they always were.
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

if __name__ == "__main__":
    raise SystemExit(main())
