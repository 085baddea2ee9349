"""What Lightning's ``LookaheadCallback`` and the HF Trainer's ``LookaheadTrainerCallback`` do alike.

Both callbacks build their settings, check their own options, count syncs, name what they log, swap the
slow weights in for evaluation and measure ‖θ − φ‖ through this module, so the same bad value gets the
same error type and message in both, and a logged metric has the same name whichever trainer wrote it.
Engine-specific work (finding the optimizer, installing, the trainer's events) stays in each callback.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from typing import Any

from .core.collectives import all_reduce_sum_
from .core.keys import EVAL_WEIGHTS, GROUP_ALPHA
from .core.optim import Lookahead
from .core.settings import LookaheadConfigError, LookaheadSettings, OuterSettings

__all__ = [
    "NODES_WORK_IN",
    "SyncTally",
    "check_view_options",
    "fast_slow_distance",
    "logged_values",
    "refuse_outer_nodes",
    "settings_from_options",
    "slow_weights",
]

#: Where ``outer.scope="nodes"`` is honoured: both build the node-local groups before the engine exists.
NODES_WORK_IN = (
    'lookahead_dist.deepspeed.initialize with a "lookahead" config section, or Lightning\'s '
    "LookaheadDeepSpeedStrategy(outer=...)"
)


def settings_from_options(
    where: str, options: Mapping[str, Any], settings: LookaheadSettings | None
) -> tuple[LookaheadSettings, dict[str, Any]]:
    """The settings of a callback and the options it was given (``None`` values: not given).

    Either ``settings`` or keyword options, not both. The second value holds only plain JSON values (lists
    for tuples, a mapping for ``outer``): what a callback writes into a checkpoint to be rebuilt from.
    """
    given = {name: _plain(value) for name, value in options.items() if value is not None}
    if settings is not None:
        if given:
            raise TypeError(f"{where}: pass either settings=... or the options {sorted(given)}, not both.")
        if not isinstance(settings, LookaheadSettings):
            raise TypeError(f"{where}: settings must be a LookaheadSettings, got {type(settings).__name__}.")
        given = {name: _plain(value) for name, value in settings.to_dict().items()}
    # Keyword options are checked as Lookahead's own keywords, so the same bad value gives the same message
    # from every entry point (a config section's messages name its key path instead).
    values: dict[str, Any] = {
        key: tuple(v) if isinstance(v, list) and key in ("alpha_bounds", "pullback_keys") else v
        for key, v in given.items()
    }
    if isinstance(values.get("outer"), Mapping):
        values["outer"] = OuterSettings.from_mapping(values["outer"])
    return LookaheadSettings(**values), given


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, OuterSettings):
        return asdict(value)
    return value


def refuse_outer_nodes(where: str, settings: LookaheadSettings) -> None:
    """Refuse ``outer.scope="nodes"``: a callback runs after the engine exists, too late to build node groups."""
    if settings.outer.scope == "nodes":
        raise LookaheadConfigError(
            f"{where}: outer.scope='nodes' needs every node to be its own data-parallel group, which must exist "
            f"before the engine is built; a callback only sees the engine afterwards. It works with "
            f"{NODES_WORK_IN}; remove 'outer' here (or use scope 'global')."
        )


def check_view_options(where: str, eval_weights: Any, log_distance: Any, log_prefix: Any) -> None:
    """Check the options both callbacks share beyond the settings (:class:`LookaheadConfigError`)."""
    if eval_weights not in EVAL_WEIGHTS:
        raise LookaheadConfigError(
            f"{where}: eval_weights={eval_weights!r} is unknown; use 'slow' (evaluate the slow weights φ) or "
            f"'fast' (evaluate the fast weights θ)."
        )
    if not isinstance(log_distance, bool):
        raise LookaheadConfigError(f"{where}: log_distance={log_distance!r} must be True or False.")
    if not isinstance(log_prefix, str):
        raise LookaheadConfigError(
            f"{where}: log_prefix={log_prefix!r} must be a string such as 'lookahead/' ('' for none)."
        )


class SyncTally:
    """Counts slow-weight syncs: one per change of a wrapper's ``sync_count`` between two looks.

    Looking once per optimizer step makes one sync of a wrapper count once, however many inner ``step()``
    calls the engine made for it (ZeRO-1/2 steps each param group separately).
    """

    def __init__(self) -> None:
        self.done = 0
        self._seen: dict[int, int] = {}

    def start(self, wrappers: Mapping[int, Lookahead]) -> None:
        self._seen = {i: w.sync_count for i, w in wrappers.items()}

    def update(self, wrappers: Mapping[int, Lookahead]) -> None:
        for i, wrapper in wrappers.items():
            if wrapper.sync_count != self._seen.get(i, 0):
                self.done += 1
                self._seen[i] = wrapper.sync_count


def _alphas(wrapper: Lookahead) -> dict[str, float]:
    """Name suffix -> α: one ``""`` when every param group has the same fixed α, else one per group.

    The names follow the configuration, not the values, so a metric keeps its name for a whole run. A
    fixed α is known from the start; an adaptive one from its group's first sync.
    """
    groups = wrapper.param_groups
    specs = [group.get(GROUP_ALPHA, wrapper.alpha) for group in groups]
    per_group = len(groups) > 1 and ("adaptive" in specs or len(set(specs)) > 1)
    last = wrapper.last_alpha
    out: dict[str, float] = {}
    for gi, spec in enumerate(specs):
        value = last.get(gi, None if spec == "adaptive" else spec)
        if value is not None:
            out[f"_group{gi}" if per_group else ""] = float(value)
    return out


def logged_values(
    prefix: str, syncs: int, wrappers: Mapping[int, Lookahead], distances: Mapping[int, float] | None = None
) -> dict[str, float]:
    """What a callback logs: ``syncs``, ``alpha`` (``alpha_group{g}``) and ``distance``, each ``_opt{i}``
    when several optimizers are wrapped, all behind ``prefix``."""
    several = len(wrappers) > 1
    values = {f"{prefix}syncs": float(syncs)}
    for i, wrapper in wrappers.items():
        opt = f"_opt{i}" if several else ""
        for group, alpha in _alphas(wrapper).items():
            values[f"{prefix}alpha{opt}{group}"] = alpha
    for i, distance in (distances or {}).items():
        values[f"{prefix}distance{f'_opt{i}' if several else ''}"] = distance
    return values


def fast_slow_distance(lookahead: Lookahead, sharded: bool, group: Any = None) -> float:
    """‖θ − φ‖ of one wrapper: local partial sums, plus one scalar sum over ``group`` when sharded.

    Replicas (one process, DDP, DeepSpeed stage 0) hold all of θ and φ: the local sum is already the total.
    """
    partial = lookahead.fast_slow_distance_sq()
    if sharded:
        all_reduce_sum_(partial, group)
    return math.sqrt(max(float(partial), 0.0))


@contextmanager
def slow_weights(engine: Any, wrappers: Iterable[Lookahead]) -> Iterator[None]:
    """The model computes with φ inside the block and θ comes back bit-exactly on exit.

    ``engine``: the DeepSpeed engine when Lookahead was installed there (its holders know where the
    weights the model computes with live), else ``None`` and each wrapper swaps its own parameters.
    """
    with ExitStack() as stack:
        if engine is not None:
            from .deepspeed import use_slow_weights

            stack.enter_context(use_slow_weights(engine))
        else:
            for wrapper in wrappers:
                stack.enter_context(wrapper.use_slow_weights())
        yield
