"""The ``"lookahead"`` section of a DeepSpeed config, and reading a config the way DeepSpeed does.

``deepspeed.initialize`` accepts a config as a dict, a path to a JSON/hjson file, or a base64-encoded
JSON/hjson string. :func:`load_config` accepts the same three and is stricter in two ways: duplicate keys
are refused in every form (DeepSpeed refuses them only in files), and every message names the file (or
"the base64 config string") the bad value came from.

Because DeepSpeed ignores top-level keys it does not know, a misspelled section (``"look_ahead"``,
``"Lookahead"``, ``"lookAhead"``, ``"lookahed"``) or ``"lookahead": null`` would silently train plain
DeepSpeed. :func:`split_config` refuses those with the key and the fix.
"""

from __future__ import annotations

import base64
import binascii
import collections
import copy
import difflib
import os
from collections.abc import Mapping
from typing import Any

from ..core.keys import CONFIG_KEY
from ..core.settings import LookaheadConfigError, LookaheadSettings

__all__ = [
    "check_top_level",
    "load_config",
    "parse_lookahead_config",
    "read_config_file",
    "settings_from_section",
    "source_name",
    "split_config",
]


def settings_from_section(section: Any, source: str | None = None) -> LookaheadSettings:
    """Validate a ``"lookahead"`` section (unknown keys refused, every key path in messages).

    ``source`` (a file name) prefixes the messages.
    """
    if section is None:
        raise _in(
            source,
            LookaheadConfigError(
                f'Lookahead: "{CONFIG_KEY}": null is invalid; give the section as an object such as '
                f'{{"k": 5, "alpha": 0.5}}, or remove the key to train without Lookahead.'
            ),
        )
    try:
        return LookaheadSettings.from_mapping(section, where=CONFIG_KEY)
    except LookaheadConfigError as exc:
        raise _in(source, exc) from None


def parse_lookahead_config(section: Any, source: str | None = None) -> dict[str, Any]:
    """Validate a ``"lookahead"`` section and return keyword arguments for ``install``."""
    return settings_from_section(section, source).to_dict()


def _in(source: str | None, exc: LookaheadConfigError) -> LookaheadConfigError:
    return exc if source is None else LookaheadConfigError(f"{source}: {exc}")


def _fold(key: str) -> str:
    return "".join(ch for ch in key.lower() if ch.isalnum())


def check_top_level(config: Mapping[str, Any], source: str | None = None) -> None:
    """Refuse top-level keys that look like a misspelled ``"lookahead"`` section, and a null section.

    A key is a near miss when it equals ``"lookahead"`` up to case, ``_``, ``-`` and spaces, or is one
    edit-ish away (``difflib`` ratio >= 0.8, e.g. ``"lookahed"``). No DeepSpeed key comes close.
    """
    for key in config:
        if not isinstance(key, str) or key == CONFIG_KEY:
            continue
        if _fold(key) == CONFIG_KEY or difflib.SequenceMatcher(None, _fold(key), CONFIG_KEY).ratio() >= 0.8:
            raise _in(
                source,
                LookaheadConfigError(
                    f'Lookahead: top-level key "{key}" is not "{CONFIG_KEY}"; DeepSpeed ignores unknown keys, so '
                    f"this section would be dropped and training would run without Lookahead. Rename it to "
                    f'"{CONFIG_KEY}".'
                ),
            )
    if CONFIG_KEY in config and config[CONFIG_KEY] is None:
        settings_from_section(None, source)


def _no_duplicates(source: str) -> Any:
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        counts = collections.Counter(key for key, _ in pairs)
        duplicates = [key for key, n in counts.items() if n > 1]
        if duplicates:
            raise LookaheadConfigError(
                f"{source}: duplicate key(s) {duplicates} in one object of the DeepSpeed config; JSON keeps only "
                f"the last value, so one of them would be ignored silently. Keep one of each."
            )
        return dict(pairs)

    return hook


def _parse_text(text: str, source: str) -> dict[str, Any]:
    import hjson  # type: ignore[import-untyped]  # a DeepSpeed dependency; DeepSpeed reads configs with it

    try:
        loaded = hjson.loads(text, object_pairs_hook=_no_duplicates(source))
    except LookaheadConfigError:
        raise
    except ValueError as exc:  # json/hjson decode errors are ValueErrors; add where it came from
        raise LookaheadConfigError(f"{source}: not valid JSON/hjson: {exc}") from None
    if not isinstance(loaded, dict):
        raise LookaheadConfigError(
            f"{source}: a DeepSpeed config must be a JSON object ({{...}}), got {type(loaded).__name__}."
        )
    return loaded


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A DeepSpeed config file as DeepSpeed reads it (JSON or hjson), duplicate keys refused."""
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise LookaheadConfigError(f"DeepSpeed config file {name!r} cannot be read: {exc}") from None
    return _parse_text(text, f"DeepSpeed config file {name!r}")


def load_config(config: Any) -> dict[str, Any]:
    """A private copy of a DeepSpeed config given as a dict, a file path or a base64 string.

    Same forms as ``deepspeed.initialize(config=...)``: an existing path is read as JSON/hjson, any other
    string is decoded as urlsafe base64 of a JSON/hjson document.
    """
    if isinstance(config, Mapping):
        return copy.deepcopy(dict(config))
    if isinstance(config, os.PathLike) or (isinstance(config, str) and os.path.exists(config)):
        return read_config_file(config)
    if isinstance(config, str):
        if "/" in config or "." in config or os.sep in config:  # never in urlsafe base64: a path
            raise LookaheadConfigError(
                f"DeepSpeed config file {config!r} does not exist (working directory: {os.getcwd()!r}); "
                f"pass an existing JSON/hjson file, a dict or a base64-encoded config."
            )
        try:
            text = base64.urlsafe_b64decode(config).decode("utf-8")
        except (binascii.Error, ValueError, UnicodeDecodeError):
            shown = config if len(config) <= 80 else config[:77] + "..."
            raise LookaheadConfigError(
                f"DeepSpeed config {shown!r} is neither an existing file nor a base64-encoded JSON config; "
                f"check the path (working directory: {os.getcwd()!r})."
            ) from None
        return _parse_text(text, "the base64 DeepSpeed config string")
    raise LookaheadConfigError(
        f"DeepSpeed config must be a dict, a path to a JSON/hjson file or a base64 string, "
        f"got {type(config).__name__}."
    )


def source_name(config: Any) -> str | None:
    """How messages name where a config came from (``None`` for a dict)."""
    if isinstance(config, Mapping):
        return None
    if isinstance(config, os.PathLike) or (isinstance(config, str) and os.path.exists(config)):
        return f"DeepSpeed config file {os.fspath(config)!r}"
    return "the base64 DeepSpeed config string"


def split_config(config: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``(DeepSpeed config without the lookahead section, install kwargs or None)``.

    Refuses near-miss spellings of the section, a null section and bad values, naming the file.
    """
    ds_config = load_config(config)
    source = source_name(config)
    check_top_level(ds_config, source)
    if CONFIG_KEY not in ds_config:
        return ds_config, None
    section = ds_config.pop(CONFIG_KEY)
    return ds_config, parse_lookahead_config(section, source)
