"""Lightning callbacks of lookahead-dist (installed as ``lookahead_dist.callbacks``)."""

from .lookahead import LookaheadCallback

__all__ = ["LookaheadCallback"]
