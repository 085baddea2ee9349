"""Deprecated location: the optimizer lives in :mod:`lookahead_dist.core.optim` (keys in ``core.keys``)."""

from ._moved import moved

__getattr__ = moved(
    "lookahead_dist.optim",
    "lookahead_dist.core.optim",
    ["COUNT_KEY", "PULLBACK_MODES", "SLOW_KEY", "Lookahead", "slow_key_for", "ReduceFn"],
)
