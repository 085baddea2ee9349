"""Test-session set-up shared by every test file. Helpers that tests import live in ``tests/helpers.py``.

Hugging Face libraries run offline and keep every cache in a temporary folder, in this process and (through
the inherited environment) in every process a test launches, so no test writes to ``~/.cache/huggingface``.
DeepSpeed's JIT-built ops in ``~/.cache/torch_extensions`` stay where they are (see ``offline_hf_env``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import offline_hf_env

_HF_ROOT = pytest.StashKey[Path]()
_SAVED_ENV = pytest.StashKey[dict[str, "str | None"]]()
MARK = "LOOKAHEAD_TEST_HF_HOME"  # tells tests/helpers.py that HF_HOME is this session's temporary one


def pytest_configure(config: pytest.Config) -> None:
    # Set before collection, not in a fixture: huggingface_hub and datasets read these variables once, when
    # first imported, and a test module may import them at collection time.
    root = Path(tempfile.mkdtemp(prefix="lookahead-tests-hf-"))
    values = {**offline_hf_env(root), MARK: str(root)}
    config.stash[_HF_ROOT] = root
    config.stash[_SAVED_ENV] = {name: os.environ.get(name) for name in values}
    os.environ.update(values)


def pytest_report_header(config: pytest.Config) -> str:
    # The CPU kernel path and thread count decide how fp32 results round (see tests/tolerances.py); the
    # Makefile reruns the numerically sensitive tests under other ones, and this line says which ran.
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    return f"torch {torch.__version__}, CPU kernels {capability}, {torch.get_num_threads()} thread(s)"


def pytest_unconfigure(config: pytest.Config) -> None:
    for name, value in config.stash.get(_SAVED_ENV, {}).items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    root = config.stash.get(_HF_ROOT, None)
    if root is not None:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def hf_home(pytestconfig: pytest.Config) -> Iterator[Path]:
    """This session's temporary ``HF_HOME`` (Hugging Face offline, caches in it); fails if a test moved it."""
    root = pytestconfig.stash[_HF_ROOT]
    guarded = ("HF_HOME", "HF_DATASETS_CACHE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    expected = {name: value for name, value in offline_hf_env(root).items() if name in guarded}
    yield root
    changed = {
        name: os.environ.get(name) for name, value in expected.items() if os.environ.get(name) != value
    }
    assert not changed, (
        f"a test changed the offline Hugging Face environment for the rest of the session: {changed}"
    )


@pytest.fixture(scope="session", autouse=True)
def example_caches(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The examples' tokenizer cache (``LOOKAHEAD_CACHE_DIR``, else ``<repo>/out/cache``) in a temporary folder."""
    root = tmp_path_factory.mktemp("example-cache")
    saved = os.environ.get("LOOKAHEAD_CACHE_DIR")
    os.environ["LOOKAHEAD_CACHE_DIR"] = str(root)
    yield root
    if saved is None:
        os.environ.pop("LOOKAHEAD_CACHE_DIR", None)
    else:
        os.environ["LOOKAHEAD_CACHE_DIR"] = saved
