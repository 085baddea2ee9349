"""Where the offline data and caches live."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_PLACEHOLDER = "{data}"


def data_dir() -> Path:
    """The offline data folder: ``$LOOKAHEAD_DATA_DIR``, else ``<repo>/../shared/data`` (CI clones beside it)."""
    override = os.environ.get("LOOKAHEAD_DATA_DIR")
    return Path(override) if override else (REPO_ROOT / ".." / "shared" / "data").resolve()


def cache_dir() -> Path:
    """Where trained tokenizers are cached: ``$LOOKAHEAD_CACHE_DIR``, else ``<repo>/out/cache``."""
    override = os.environ.get("LOOKAHEAD_CACHE_DIR")
    return Path(override) if override else REPO_ROOT / "out" / "cache"


def expand_data_path(path: str) -> str:
    """Replace a leading ``{data}`` in a config path with :func:`data_dir` and check that the file exists."""
    expanded = path.replace(DATA_PLACEHOLDER, str(data_dir()))
    if not Path(expanded).exists():
        raise FileNotFoundError(
            f"data file {expanded!r} (from {path!r}) does not exist; set LOOKAHEAD_DATA_DIR to the folder holding "
            f"the offline data, or give a Hub dataset name instead of local files."
        )
    return expanded
