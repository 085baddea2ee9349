"""lookahead-dist: the Lookahead optimizer for large-scale training.

``Lookahead`` (torch only) is importable without DeepSpeed or Lightning installed; the engine adapters
live in ``lookahead_dist.deepspeed`` and ``lookahead_dist.callbacks`` and are imported lazily.
"""

from __future__ import annotations

from typing import Any

from ._versions import check_versions
from .optim import Lookahead

__all__ = ["Lookahead", "LookaheadCallback", "__version__"]
__version__ = "0.1.0"

check_versions("torch")


def __getattr__(name: str) -> Any:
    if name == "LookaheadCallback":
        from .callbacks import LookaheadCallback

        return LookaheadCallback
    raise AttributeError(f"module 'lookahead_dist' has no attribute {name!r}")
