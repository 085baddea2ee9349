"""Packaging: one importable package, typed, callbacks mapped into it, untested versions warn."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest

import lookahead_dist
from lookahead_dist import _versions


def test_callbacks_live_inside_the_package_not_as_top_level_module() -> None:
    from lookahead_dist.callbacks import LookaheadCallback

    assert lookahead_dist.LookaheadCallback is LookaheadCallback
    assert LookaheadCallback.__module__ == "lookahead_dist.callbacks.lookahead"


def test_wheel_maps_callbacks_into_the_package(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[1]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(repo)],
        check=True, capture_output=True, cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("lookahead_dist-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "lookahead_dist/callbacks/lookahead.py" in names
    assert "lookahead_dist/py.typed" in names
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_level == {"lookahead_dist"}, top_level


def test_typed_marker_is_shipped() -> None:
    assert (Path(lookahead_dist.__file__).parent / "py.typed").is_file()


@pytest.mark.parametrize(
    ("package", "installed", "warns"),
    [("deepspeed", "0.19.8", False), ("deepspeed", "0.20.1", True), ("lightning", "2.5.0", True),
     ("torch", "2.13.0+cpu", False), ("torch", "2.14.0", True)],
)
def test_untested_versions_warn(monkeypatch: pytest.MonkeyPatch, package: str, installed: str, warns: bool) -> None:
    monkeypatch.setattr(_versions, "version", lambda name: installed)
    monkeypatch.setattr(_versions, "_checked", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _versions.check_versions(package)
    messages = [str(w.message) for w in caught if issubclass(w.category, _versions.UntestedVersionWarning)]
    assert bool(messages) == warns, messages
    if warns:
        assert installed in messages[0] and package in messages[0]


def test_core_imports_without_deepspeed_or_lightning() -> None:
    code = (
        "import sys; sys.modules['deepspeed'] = None; sys.modules['lightning'] = None\n"
        "import torch, lookahead_dist\n"
        "opt = lookahead_dist.Lookahead(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1))\n"
        "print(type(opt).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "Lookahead"
    assert importlib.import_module("lookahead_dist.core.optim").__name__ == "lookahead_dist.core.optim"
