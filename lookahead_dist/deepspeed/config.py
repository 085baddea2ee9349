"""The ``"lookahead"`` section of a DeepSpeed config, and reading a config the way DeepSpeed does."""

from __future__ import annotations

import copy
import os
from typing import Any

from ..core.keys import CONFIG_KEY
from ..core.settings import LookaheadConfigError, LookaheadSettings

__all__ = ["load_config", "parse_lookahead_config", "settings_from_section", "split_config"]


def settings_from_section(section: Any) -> LookaheadSettings:
    """Validate a ``"lookahead"`` section (unknown keys refused, every key path in messages)."""
    return LookaheadSettings.from_mapping(section, where=CONFIG_KEY)


def parse_lookahead_config(section: Any) -> dict[str, Any]:
    """Validate a ``"lookahead"`` section and return keyword arguments for ``install``."""
    return settings_from_section(section).to_dict()


def load_config(config: Any) -> dict[str, Any]:
    """A private copy of a DeepSpeed config given as a dict or a JSON file path."""
    import json

    if isinstance(config, dict):
        return copy.deepcopy(config)
    if isinstance(config, (str, os.PathLike)):
        with open(config) as f:
            loaded = json.load(f)
        if not isinstance(loaded, dict):
            raise LookaheadConfigError(f"DeepSpeed config file {os.fspath(config)!r} must hold a JSON object.")
        return loaded
    raise LookaheadConfigError(
        f"DeepSpeed config must be a dict or a path to a JSON file, got {type(config).__name__}."
    )


def split_config(config: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``(DeepSpeed config without the lookahead section, install kwargs or None)``."""
    ds_config = load_config(config)
    section = ds_config.pop(CONFIG_KEY, None)
    return ds_config, (None if section is None else parse_lookahead_config(section))
