"""The engine-free core: the optimizer, adaptive α, the settings object and the state keys. Torch only."""

from __future__ import annotations

from .keys import COUNT_KEY, SLOW_KEY
from .optim import Lookahead
from .settings import LookaheadConfigError, LookaheadSettings

__all__ = ["COUNT_KEY", "SLOW_KEY", "Lookahead", "LookaheadConfigError", "LookaheadSettings"]
