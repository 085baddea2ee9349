"""Every name Lookahead writes into optimizer state, param groups and config files, in one place.

Engines and tools import these instead of retyping the strings, so a rename is one edit.
"""

from __future__ import annotations

__all__ = [
    "CARRY_KEY",
    "CONFIG_KEY",
    "COUNT_KEY",
    "DEFAULT_PULLBACK_KEYS",
    "EVAL_WEIGHTS",
    "GROUP_ALPHA",
    "GROUP_K",
    "LAST_ALPHA",
    "NONFINITE_POLICIES",
    "OUTER_COMM_DTYPES",
    "OUTER_MOMENTUM_KEY",
    "OUTER_SCOPES",
    "PREV_KEY",
    "PULLBACK_MODES",
    "SLOW_KEY",
    "STAT_KEYS",
    "STEP_KEY",
    "slow_key_for",
]

# Per-tensor optimizer state (``inner.state[p]``).
#: φ, the slow weights: same shape, dtype and device (placement, for DTensors) as the stepped tensor.
SLOW_KEY = "lookahead_slow"
#: A Python int: inner steps this tensor has taken since its last sync, ``0 <= count < k``.
COUNT_KEY = "lookahead_count"
#: The outer momentum buffer of the cross-node outer step (``outer.momentum``), beside φ and like φ sharded.
OUTER_MOMENTUM_KEY = "lookahead_outer_momentum"

# Per-tensor state of alpha="adaptive" (none of them starts with SLOW_KEY: they are not slow weights).
#: The displacement ``d = φ − θ_k`` of the tensor's previous sync (a tensor like φ).
PREV_KEY = "lookahead_adaptive_prev"
#: This tensor's share of ``qᵀd``: the part of the next displacement the momentum carries over (a float).
CARRY_KEY = "lookahead_adaptive_carry"
#: The inner optimizer's ``step`` count at the tensor's previous sync (a float; gives k for the carry).
STEP_KEY = "lookahead_adaptive_step"
#: The group's statistics of ``h`` (floats, the same in every tensor of the group).
STAT_KEYS = (
    "lookahead_adaptive_mean",
    "lookahead_adaptive_sq",
    "lookahead_adaptive_n",
    "lookahead_adaptive_dd",
)


def slow_key_for(buffer_key: str) -> str:
    """State key of the slow copy of a momentum buffer (``pullback="pullback"``)."""
    return f"{SLOW_KEY}_{buffer_key}"


# Param-group entries.
#: Overrides ``k`` for one param group.
GROUP_K = "lookahead_k"
#: Overrides ``alpha`` for one param group.
GROUP_ALPHA = "lookahead_alpha"
#: The α applied at the group's most recent sync (information only, written by Lookahead).
LAST_ALPHA = "lookahead_last_alpha"

# Settings vocabularies.
PULLBACK_MODES = ("none", "reset", "pullback")
#: First-moment (momentum-like) buffers of torch's SGD and Adam-family optimizers.
DEFAULT_PULLBACK_KEYS = ("momentum_buffer", "exp_avg")
NONFINITE_POLICIES = ("skip", "raise")
EVAL_WEIGHTS = ("slow", "fast")
OUTER_SCOPES = ("global", "nodes")
OUTER_COMM_DTYPES = ("fp32", "bf16")

#: Top-level key of the Lookahead section in a DeepSpeed config.
CONFIG_KEY = "lookahead"
