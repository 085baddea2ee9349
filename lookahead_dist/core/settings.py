"""``LookaheadSettings``: every Lookahead option, validated once, with one set of messages.

Every entry point builds one of these and nothing else checks the values again:
``Lookahead(inner, k=..., ...)``, the ``"lookahead"`` section of a DeepSpeed config
(:meth:`LookaheadSettings.from_mapping`), ``LookaheadCallback`` and the other engine adapters. So every
option is reachable from each of them and a bad value gets the same error everywhere.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

from .keys import DEFAULT_PULLBACK_KEYS, NONFINITE_POLICIES, OUTER_COMM_DTYPES, OUTER_SCOPES, PULLBACK_MODES

__all__ = ["AlphaSpec", "LookaheadConfigError", "LookaheadSettings", "OuterSettings", "check_alpha", "check_k"]

AlphaSpec = float | Literal["adaptive"]


class LookaheadConfigError(ValueError):
    """A Lookahead option (argument, param-group override or config key) has a bad value or name."""


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _error(where: str, value: Any, must: str) -> LookaheadConfigError:
    return LookaheadConfigError(f"Lookahead: {where}={value!r} is invalid; it must be {must}.")


def check_k(k: Any, where: str = "k") -> int:
    """``k`` as an int >= 1, or :class:`LookaheadConfigError` naming ``where`` and the value."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise _error(where, k, "a positive int (the number of inner steps between slow-weight syncs), e.g. 5")
    return k


def check_alpha(alpha: Any, where: str = "alpha", allow_adaptive: bool = True) -> AlphaSpec:
    """``alpha`` as a float in (0, 1] (or ``"adaptive"``), or :class:`LookaheadConfigError`."""
    if allow_adaptive and alpha == "adaptive":
        return "adaptive"
    if not _is_number(alpha) or not math.isfinite(alpha) or not (0.0 < alpha <= 1.0):
        extra = ' or "adaptive"' if allow_adaptive else ""
        raise _error(where, alpha, f"a finite number in (0, 1]{extra}, e.g. 0.5 (1 makes Lookahead a no-op)")
    return float(alpha)


@dataclass(frozen=True)
class OuterSettings:
    """How the slow weights move at a sync when several nodes train (``LookaheadSettings.outer``).

    Attributes:
        scope: ``"global"`` (default): one data-parallel group, the sync is Lookahead's local lerp.
            ``"nodes"``: every node reduces gradients only inside itself and the nodes meet once per cycle,
            when φ takes one step along the mean over nodes of θ − φ (DeepSpeed only, see
            :mod:`lookahead_dist.deepspeed.outer`).
        momentum: outer momentum β in [0, 1) (SlowMo / DiLoCo); ``None`` (default) is Lookahead's own
            rule ``φ ← φ + lr·mean(θ − φ)``.
        nesterov: Nesterov form of the outer momentum (needs ``momentum`` > 0).
        lr: outer step size (> 0, may exceed 1); ``None`` means ``alpha`` (or a group's ``lookahead_alpha``).
        comm_dtype: dtype of the cross-node all-reduce of θ − φ: ``"fp32"`` or ``"bf16"`` (half the bytes).
        local_world_size: ranks per node; ``None`` reads ``LOCAL_WORLD_SIZE`` (set by torchrun).
    """

    scope: str = "global"
    momentum: float | None = None
    nesterov: bool = False
    lr: float | None = None
    comm_dtype: str = "fp32"
    local_world_size: int | None = None

    def __post_init__(self) -> None:
        _validate_outer(self, self._where)

    _where = "outer."

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_mapping(cls, section: Any, where: str = "outer") -> OuterSettings:
        """Outer settings from a config object; unknown keys refused with the closest known name."""
        if isinstance(section, OuterSettings):
            return section
        if not isinstance(section, Mapping):
            raise _error(where, section, 'an object such as {"scope": "nodes", "momentum": 0.9}')
        _refuse_unknown(section, cls.names(), where)
        obj = object.__new__(cls)
        object.__setattr__(obj, "_where", where + ".")
        for f in fields(cls):
            object.__setattr__(obj, f.name, section.get(f.name, f.default))
        obj.__post_init__()
        object.__delattr__(obj, "_where")
        return obj


def _validate_outer(o: OuterSettings, where: str) -> None:
    if o.scope not in OUTER_SCOPES:
        raise _error(f"{where}scope", o.scope, f"one of {', '.join(map(repr, OUTER_SCOPES))}")
    if o.momentum is not None and (
        not _is_number(o.momentum) or not math.isfinite(o.momentum) or not 0.0 <= o.momentum < 1.0
    ):
        raise _error(f"{where}momentum", o.momentum, "a number in [0, 1), e.g. 0.9, or null for Lookahead's rule")
    if not isinstance(o.nesterov, bool):
        raise _error(f"{where}nesterov", o.nesterov, "true or false")
    if o.nesterov and not o.momentum:
        raise _error(f"{where}nesterov", o.nesterov, "false unless outer.momentum > 0 (e.g. momentum 0.9)")
    if o.lr is not None and (not _is_number(o.lr) or not math.isfinite(o.lr) or o.lr <= 0):
        raise _error(f"{where}lr", o.lr, "a positive number (e.g. 0.7), or null to use alpha")
    if o.comm_dtype not in OUTER_COMM_DTYPES:
        raise _error(f"{where}comm_dtype", o.comm_dtype, f"one of {', '.join(map(repr, OUTER_COMM_DTYPES))}")
    lws = o.local_world_size
    if lws is not None and (isinstance(lws, bool) or not isinstance(lws, int) or lws < 1):
        raise _error(f"{where}local_world_size", lws, "a positive int (ranks per node), or null for LOCAL_WORLD_SIZE")


def _refuse_unknown(section: Mapping[Any, Any], names: tuple[str, ...], where: str) -> None:
    unknown = [key for key in section if key not in names]
    if unknown:
        raise LookaheadConfigError(
            "Lookahead: unknown key(s) "
            + ", ".join(f"{where}.{key}{_did_you_mean(key, names)}" for key in unknown)
            + f"; allowed keys are {', '.join(names)}."
        )


@dataclass(frozen=True)
class LookaheadSettings:
    """What Lookahead does; immutable and valid by construction.

    Attributes:
        k: inner steps per cycle (per-group override: param-group key ``"lookahead_k"``).
        alpha: slow-weights step size in (0, 1], or ``"adaptive"`` (chosen at each sync from how consecutive
            cycles' displacements agree; see :mod:`lookahead_dist.core.adaptive`).
        pullback: at a sync, ``"none"`` keeps the inner optimizer's state, ``"reset"`` clears it,
            ``"pullback"`` interpolates the momentum-like buffers named by ``pullback_keys``.
        alpha_bounds: ``(low, high)`` clip for ``alpha="adaptive"``, ``0 < low <= high <= 1``.
        alpha_fallback: α used by ``alpha="adaptive"`` when its estimate is undefined; ``None`` means
            ``alpha_bounds[0]``.
        pullback_keys: optimizer-state names interpolated by ``pullback="pullback"``.
        nonfinite: a sync whose fast weights are not finite: ``"skip"`` keeps φ for the affected tensors
            and warns, ``"raise"`` stops training with an error.
        outer: :class:`OuterSettings` (or a mapping of its fields): the cross-node outer step; the default
            (``scope="global"``) is plain Lookahead.
    """

    k: int = 5
    alpha: AlphaSpec = 0.5
    pullback: str = "none"
    alpha_bounds: tuple[float, float] = (0.5, 1.0)
    alpha_fallback: float | None = None
    pullback_keys: tuple[str, ...] = DEFAULT_PULLBACK_KEYS
    nonfinite: str = "skip"
    outer: OuterSettings = OuterSettings()

    def __post_init__(self) -> None:
        normalized = _validate(self, self._where)
        for name, value in normalized.items():
            object.__setattr__(self, name, value)

    # Where the values came from, for messages ("Lookahead: lookahead.k=0 ..." for a config section).
    _where = ""

    @property
    def fallback_alpha(self) -> float:
        """The α ``alpha="adaptive"`` falls back to."""
        return self.alpha_bounds[0] if self.alpha_fallback is None else float(self.alpha_fallback)

    def to_dict(self) -> dict[str, Any]:
        """Plain keyword arguments (``Lookahead(inner, **settings.to_dict())`` rebuilds the same)."""
        out = asdict(self)
        if self.outer == OuterSettings():
            del out["outer"]  # the default: plain Lookahead, whose constructor has no such keyword
        return out

    def replace(self, **changes: Any) -> LookaheadSettings:
        return replace(self, **changes)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_mapping(cls, section: Any, where: str = "lookahead") -> LookaheadSettings:
        """Settings from a config section (a DeepSpeed ``"lookahead"`` object, a YAML mapping).

        Unknown keys are refused with the closest known name; ``where`` prefixes every key in messages.
        """
        if not isinstance(section, Mapping):
            raise _error(where, section, 'an object such as {"k": 5, "alpha": 0.5}')
        unknown = [key for key in section if key not in cls.names()]
        if unknown:
            raise LookaheadConfigError(
                "Lookahead: unknown key(s) "
                + ", ".join(f"{where}.{key}{_did_you_mean(key, cls.names())}" for key in unknown)
                + f"; allowed keys are {', '.join(cls.names())}."
            )
        values = {key: section[key] for key in cls.names() if key in section}
        if "outer" in values:  # a nested object: its keys are checked the same way, with their full path
            values["outer"] = OuterSettings.from_mapping(values["outer"], where=f"{where}.outer")
        for key in ("alpha_bounds", "pullback_keys"):  # JSON/YAML have lists, not tuples
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])
        return _with_where(cls, where + ".", values)


def _with_where(cls: type[LookaheadSettings], where: str, values: dict[str, Any]) -> LookaheadSettings:
    obj = object.__new__(cls)
    object.__setattr__(obj, "_where", where)
    defaults = {f.name: f.default for f in fields(cls)}
    for name, default in defaults.items():
        object.__setattr__(obj, name, values.get(name, default))
    obj.__post_init__()
    object.__delattr__(obj, "_where")  # back to the class default: instances compare by value
    return obj


def _did_you_mean(key: Any, names: tuple[str, ...]) -> str:
    if not isinstance(key, str):
        return ""
    folded = {name.replace("_", "").lower(): name for name in names}
    exact = folded.get(key.replace("_", "").replace("-", "").lower())
    close = [exact] if exact else difflib.get_close_matches(key, names, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _validate(s: LookaheadSettings, where: str) -> dict[str, Any]:
    k = check_k(s.k, f"{where}k")
    alpha = check_alpha(s.alpha, f"{where}alpha")
    if s.pullback not in PULLBACK_MODES:
        raise _error(f"{where}pullback", s.pullback, f"one of {', '.join(map(repr, PULLBACK_MODES))}")
    bounds = s.alpha_bounds
    if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
        raise _error(f"{where}alpha_bounds", bounds, "a pair (low, high) with 0 < low <= high <= 1, e.g. (0.5, 1.0)")
    low = check_alpha(bounds[0], f"{where}alpha_bounds[0]", allow_adaptive=False)
    high = check_alpha(bounds[1], f"{where}alpha_bounds[1]", allow_adaptive=False)
    if low > high:  # type: ignore[operator]
        raise _error(f"{where}alpha_bounds", bounds, "(low, high) with low <= high, e.g. (0.5, 1.0)")
    fallback: Any = s.alpha_fallback
    if fallback is not None:
        fallback = check_alpha(fallback, f"{where}alpha_fallback", allow_adaptive=False)
    keys = s.pullback_keys
    if isinstance(keys, str) or not isinstance(keys, (tuple, list)) or not all(
        isinstance(key, str) and key for key in keys
    ):
        raise _error(
            f"{where}pullback_keys", keys, 'a list of optimizer-state names, e.g. ["exp_avg"] (not a bare string)'
        )
    if s.nonfinite not in NONFINITE_POLICIES:
        raise _error(f"{where}nonfinite", s.nonfinite, f"one of {', '.join(map(repr, NONFINITE_POLICIES))}")
    outer = s.outer
    if not isinstance(outer, OuterSettings):
        outer = OuterSettings.from_mapping(outer, where=f"{where}outer")
    if outer.scope == "nodes" and s.alpha == "adaptive":
        raise _error(f"{where}alpha", s.alpha, 'a fixed number with outer.scope="nodes" (the outer step has one lr)')
    if outer.momentum and s.pullback == "reset":
        raise _error(
            f"{where}pullback", s.pullback, '"none" or "pullback" with outer.momentum (a reset would drop it)'
        )
    return {
        "outer": outer,
        "k": k,
        "alpha": alpha,
        "alpha_bounds": (float(low), float(high)),  # type: ignore[arg-type]
        "alpha_fallback": None if fallback is None else float(fallback),  # type: ignore[arg-type]
        "pullback_keys": tuple(keys),
    }
