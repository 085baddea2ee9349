"""Lightning glue: DeepSpeed strategies that honour a ``"lookahead"`` section and run on CPU.

``LookaheadCallback`` itself lives in :mod:`lookahead_dist.callbacks`.
"""

from __future__ import annotations

from .strategies import CONFIG_DIR, CPUDeepSpeedStrategy, LookaheadDeepSpeedStrategy

__all__ = ["CONFIG_DIR", "CPUDeepSpeedStrategy", "LookaheadDeepSpeedStrategy"]
