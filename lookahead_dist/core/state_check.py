"""Checks of Lookahead state: a state dict before it is loaded, ``pullback_keys`` against the live state.

Without these a wrong-shape ``lookahead_slow`` fails only at the next sync (after the inner step ran and
the counters reset), and NaN slow weights, negative counters or counters from a larger ``k`` are taken
silently. What is checked, per tensor of the saved ``state`` (matched to the live parameters by the
``param_groups`` index lists, exactly as ``torch.optim.Optimizer.load_state_dict`` matches them):

* φ (``lookahead_slow``) and the slow momentum copies (``lookahead_slow_<key>``) are tensors of the
  parameter's shape, of a floating dtype, with finite values;
* the counter (``lookahead_count``) is an ``int`` with ``0 <= count < k``, ``k`` being the saved
  group's ``lookahead_k`` if any (torch restores the saved group entries) or the wrapper's ``k``.

A counter saved under a larger ``k`` is an error, not a warning: the universal-checkpoint path refuses
the same case, and a silent early sync changes the trajectory. Resume with the ``k`` the checkpoint was
trained with (or ``lookahead_dist.core.state_check.reset_counters(state_dict)`` to start a new cycle
from the saved φ, a deliberate choice).

Dtype and device: like every optimizer state tensor (Adam's ``exp_avg``), φ is cast by torch to the
parameter's dtype and moved to its device at load; a non-floating φ is refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .keys import COUNT_KEY, DEFAULT_PULLBACK_KEYS, GROUP_K, SLOW_KEY

__all__ = ["LookaheadStateError", "check_pullback_keys", "check_state_dict", "reset_counters"]


class LookaheadStateError(ValueError):
    """A Lookahead state dict (checkpoint) holds a bad slow weight or cycle counter."""


def _param_index_map(live_groups: list[dict[str, Any]], saved_groups: list[Any]) -> dict[Any, tuple[Tensor, int]]:
    """Saved state index -> (live parameter, group index), as torch's load_state_dict pairs them."""
    out: dict[Any, tuple[Tensor, int]] = {}
    for gi, (live, saved) in enumerate(zip(live_groups, saved_groups)):
        if not isinstance(saved, Mapping):
            continue
        for index, p in zip(saved.get("params", []), live["params"]):
            out[index] = (p, gi)
    return out


def check_state_dict(lookahead: Any, state_dict: Any) -> None:
    """Raise :class:`LookaheadStateError` (or ``TypeError``) if ``state_dict`` cannot be loaded safely.

    Structural problems torch itself reports (different numbers of groups or parameters) are left to
    torch, which is called right after this.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"Lookahead.load_state_dict: expected the dict returned by optimizer.state_dict(), got "
            f"{type(state_dict).__name__}; a checkpoint without optimizer state cannot restore the slow weights."
        )
    state = state_dict.get("state")
    saved_groups = state_dict.get("param_groups")
    if not isinstance(state, Mapping) or not isinstance(saved_groups, list):
        raise TypeError(
            "Lookahead.load_state_dict: the dict has no 'state' mapping and 'param_groups' list; pass "
            "optimizer.state_dict() of the same optimizer (wrapped or not)."
        )
    live_groups = lookahead.param_groups
    params = _param_index_map(live_groups, saved_groups)
    for index, entry in state.items():
        if not isinstance(entry, Mapping) or index not in params:
            continue
        p, gi = params[index]
        saved_group = saved_groups[gi]
        k = saved_group.get(GROUP_K, lookahead.k) if isinstance(saved_group, Mapping) else lookahead.k
        where = f"state[{index!r}] (param group {gi}, shape {tuple(p.shape)})"
        for key, value in entry.items():
            if isinstance(key, str) and key.startswith(SLOW_KEY):
                _check_slow(where, key, value, p)
        if COUNT_KEY in entry:
            _check_count(where, entry[COUNT_KEY], k, has_slow=SLOW_KEY in entry)


def _check_slow(where: str, key: str, value: Any, p: Tensor) -> None:
    if not isinstance(value, Tensor):
        raise LookaheadStateError(
            f"Lookahead checkpoint: {where}[{key!r}] is a {type(value).__name__}, not a tensor; the "
            f"checkpoint is corrupt or was not written by Lookahead. Load an intact checkpoint."
        )
    if tuple(value.shape) != tuple(p.shape):
        raise LookaheadStateError(
            f"Lookahead checkpoint: {where}[{key!r}] has shape {tuple(value.shape)}, the parameter "
            f"{tuple(p.shape)}; load it into the same model and param groups it was saved from."
        )
    if not (value.is_floating_point() or value.is_complex()):
        raise LookaheadStateError(
            f"Lookahead checkpoint: {where}[{key!r}] has dtype {value.dtype}; slow weights are floating "
            f"point. The checkpoint is corrupt or was not written by Lookahead."
        )
    if value.numel() and not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        raise LookaheadStateError(
            f"Lookahead checkpoint: {where}[{key!r}] holds {bad} non-finite value(s) (NaN/inf); resuming "
            f"would blend them into the weights at the next sync. Resume from an earlier checkpoint."
        )


def _check_count(where: str, count: Any, k: Any, has_slow: bool) -> None:
    if isinstance(count, bool) or not isinstance(count, int):
        bad_type = isinstance(count, float) and math.isfinite(count) and count.is_integer()
        hint = " (a float: was the state dict converted through JSON or a tensor?)" if bad_type else ""
        raise LookaheadStateError(
            f"Lookahead checkpoint: {where}[{COUNT_KEY!r}]={count!r} must be a Python int{hint}."
        )
    if not has_slow:
        raise LookaheadStateError(
            f"Lookahead checkpoint: {where} has a cycle counter but no slow weights ({SLOW_KEY!r}); "
            f"the checkpoint is incomplete."
        )
    if count < 0 or (isinstance(k, int) and count >= k):
        raise LookaheadStateError(
            f"Lookahead checkpoint: {where}[{COUNT_KEY!r}]={count} is outside 0..k-1 for k={k}. If the run "
            f"was saved with a larger k, resume with that k (the cycle position would otherwise force an "
            f"early sync); to start a fresh cycle from the saved slow weights on purpose, pass the state "
            f"dict through lookahead_dist.core.state_check.reset_counters first."
        )


def reset_counters(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Set every saved cycle counter to 0 (in place; returned for chaining): the next sync is k steps away."""
    for entry in state_dict.get("state", {}).values():
        if isinstance(entry, dict) and COUNT_KEY in entry:
            entry[COUNT_KEY] = 0
    return state_dict


def check_pullback_keys(optimizer: Any, keys: tuple[str, ...]) -> bool:
    """Refuse ``pullback_keys`` that do not name momentum-like tensors of this optimizer's state.

    Runs once the inner optimizer has created its state (its first step); checked again after
    ``load_state_dict`` or a settings change. Returns whether there was state to check.
    """
    stepped = [(p, st) for p, st in optimizer.state.items() if SLOW_KEY in st]
    if not stepped:
        return False
    available = sorted(
        {
            key
            for p, st in stepped
            for key, value in st.items()
            if isinstance(key, str) and not key.startswith("lookahead_") and _is_buffer_like(value, p)
        }
    )
    hint = f"the momentum-like tensor buffers of this {type(optimizer).__name__} are {available}"
    any_present = False
    for key in keys:
        present = [(p, st[key]) for p, st in stepped if key in st]
        for p, value in present:
            if key == "step" or not _is_buffer_like(value, p):
                what = (
                    f"a {type(value).__name__}"
                    if not isinstance(value, Tensor)
                    else f"a {value.dtype} tensor of shape {tuple(value.shape)} for a parameter of shape "
                    f"{tuple(p.shape)}"
                )
                raise ValueError(
                    f"Lookahead: pullback_keys entry {key!r} is {what} in the optimizer state, not a "
                    f"momentum-like buffer; pulling it back would corrupt it. {hint}; pass those "
                    f"(e.g. pullback_keys={tuple(available[:1])!r}) or pullback='none'."
                )
        if not present and key not in DEFAULT_PULLBACK_KEYS:
            raise ValueError(
                f"Lookahead: pullback_keys entry {key!r} is not in the optimizer state of any tensor after "
                f"its first step, so it would silently not be pulled back; {hint}."
            )
        any_present = any_present or bool(present)
    if not any_present:
        raise ValueError(
            f"Lookahead: pullback='pullback' has nothing to pull back: none of pullback_keys={keys!r} is "
            f"in the optimizer state; {hint}. Name those buffers, or use pullback='none' (an optimizer "
            f"without momentum has nothing to pull back)."
        )
    return True


def _is_buffer_like(value: Any, p: Tensor) -> bool:
    return isinstance(value, Tensor) and value.is_floating_point() and tuple(value.shape) == tuple(p.shape)
