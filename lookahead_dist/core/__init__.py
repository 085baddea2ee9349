"""The engine-free core, torch only: the optimizer (``optim``), its bookkeeping (``plan``), the sync loop and
its rule (``pull``) and kernels (``sync``), adaptive α, the settings object, the state keys and checks."""

from __future__ import annotations

from .keys import COUNT_KEY, SLOW_KEY
from .optim import Lookahead
from .settings import LookaheadConfigError, LookaheadSettings

__all__ = ["COUNT_KEY", "SLOW_KEY", "Lookahead", "LookaheadConfigError", "LookaheadSettings"]
