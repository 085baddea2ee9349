"""Old import paths: each old module re-exports its names from their new home, with a warning."""

from __future__ import annotations

import importlib
import warnings
from typing import Any


def moved(old: str, new: str, names: list[str]) -> Any:
    """A module ``__getattr__`` for ``old`` that forwards ``names`` to ``new`` and warns once per name."""

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        warnings.warn(
            f"{old}.{name} moved to {new}.{name}; import it from there ({old} will be removed).",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(new), name)

    return __getattr__
