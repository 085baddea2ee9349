"""Tested version ranges. The DeepSpeed adapter relies on DeepSpeed internals, so others warn."""

from __future__ import annotations

import warnings
from importlib.metadata import PackageNotFoundError, version

#: package -> (first tested, first untested), compared on (major, minor).
TESTED: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {
    "torch": ((2, 13), (2, 14)),
    "deepspeed": ((0, 19), (0, 20)),
    "lightning": ((2, 6), (2, 7)),
}
_checked: set[str] = set()


class UntestedVersionWarning(UserWarning):
    """A dependency's version is outside the range lookahead-dist is tested with."""


def _major_minor(v: str) -> tuple[int, int]:
    parts = [int("".join(ch for ch in part if ch.isdigit()) or 0) for part in v.split(".")[:2]]
    return (parts + [0, 0])[0], (parts + [0, 0])[1]


def check_versions(*packages: str) -> None:
    for package in packages:
        if package in _checked:
            continue
        _checked.add(package)
        try:
            installed = version(package)
        except PackageNotFoundError:
            continue
        low, high = TESTED[package]
        if not (low <= _major_minor(installed) < high):
            warnings.warn(
                f"lookahead-dist is tested with {package} {low[0]}.{low[1]}.x; found {installed}. "
                + (
                    "The DeepSpeed adapter hooks DeepSpeed internals (ZeRO optimizer param groups); "
                    "check training with the equivalence tests before relying on it."
                    if package == "deepspeed"
                    else "Things may work, but are unverified."
                ),
                UntestedVersionWarning,
                stacklevel=3,
            )
