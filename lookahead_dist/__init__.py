"""lookahead-dist: the Lookahead optimizer for large-scale training.

``Lookahead`` and ``LookaheadSettings`` (``lookahead_dist.core``, torch only) import without DeepSpeed or
Lightning installed. One adapter per engine, each imported only when used: ``lookahead_dist.deepspeed``,
``lookahead_dist.lightning`` (strategies) and ``lookahead_dist.callbacks`` (``LookaheadCallback``).
"""

from __future__ import annotations

from typing import Any

from ._versions import check_versions
from .core import Lookahead, LookaheadConfigError, LookaheadSettings

__all__ = ["Lookahead", "LookaheadCallback", "LookaheadConfigError", "LookaheadSettings", "__version__"]
__version__ = "0.1.0"

check_versions("torch")


def __getattr__(name: str) -> Any:
    if name == "LookaheadCallback":
        from .callbacks import LookaheadCallback

        return LookaheadCallback
    raise AttributeError(f"module 'lookahead_dist' has no attribute {name!r}")
