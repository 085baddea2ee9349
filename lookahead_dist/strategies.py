"""Deprecated location: the Lightning strategies live in :mod:`lookahead_dist.lightning`."""

from ._moved import moved

__getattr__ = moved(
    "lookahead_dist.strategies",
    "lookahead_dist.lightning",
    ["CONFIG_DIR", "CPUDeepSpeedStrategy", "LookaheadDeepSpeedStrategy"],
)
