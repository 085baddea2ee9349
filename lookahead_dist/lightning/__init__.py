"""Lightning glue: DeepSpeed strategies that honour a ``"lookahead"`` section and run on CPU, and
``CPUFSDPStrategy`` (Lightning's FSDPStrategy on CPU processes).

``LookaheadCallback`` itself lives in :mod:`lookahead_dist.callbacks`.
"""

from __future__ import annotations

from .fsdp import CPUFSDPStrategy
from .strategies import CONFIG_DIR, CPUDeepSpeedStrategy, LookaheadDeepSpeedStrategy

__all__ = ["CONFIG_DIR", "CPUDeepSpeedStrategy", "CPUFSDPStrategy", "LookaheadDeepSpeedStrategy"]
