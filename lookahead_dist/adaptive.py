"""Deprecated location: adaptive α lives in :mod:`lookahead_dist.core.adaptive`."""

from typing import Any

from ._moved import moved

_core = moved(
    "lookahead_dist.adaptive",
    "lookahead_dist.core.adaptive",
    ["CURVATURE_KEY", "adaptive_alpha", "alpha_from_sums", "line_sums"],
)
_ds = moved("lookahead_dist.adaptive", "lookahead_dist.deepspeed.holders", ["check_zero3_sub_groups"])


def __getattr__(name: str) -> Any:
    return _ds(name) if name == "check_zero3_sub_groups" else _core(name)
