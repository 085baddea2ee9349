"""The shared test helpers (tests/helpers.py) and the session set-up (tests/conftest.py) do what they say."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.helpers import CollectiveLog, child_env, free_port, run


def test_hf_caches_are_temporary_and_offline(hf_home: Path) -> None:
    real_cache = Path.home() / ".cache" / "huggingface"
    assert Path(os.environ["HF_HOME"]) == hf_home and hf_home.is_dir()
    assert real_cache not in hf_home.parents and hf_home != real_cache
    assert Path(os.environ["HF_DATASETS_CACHE"]).is_relative_to(hf_home)
    assert os.environ["HF_HUB_OFFLINE"] == os.environ["HF_DATASETS_OFFLINE"] == "1"
    # DeepSpeed's prebuilt ops must stay reachable: the session does not move the torch extensions folder.
    assert "TORCH_EXTENSIONS_DIR" not in os.environ or os.environ["TORCH_EXTENSIONS_DIR"] != str(hf_home)


def test_child_process_sees_the_session_environment(hf_home: Path, tmp_path: Path) -> None:
    pytest.importorskip("huggingface_hub")
    out = tmp_path / "env.json"
    code = (
        "import json, os, huggingface_hub.constants as c; "
        "json.dump({'hf_home': c.HF_HOME, 'offline': c.HF_HUB_OFFLINE, 'port': os.environ['MASTER_PORT']}, "
        "open(os.environ['OUT'], 'w'))"
    )
    proc = run([sys.executable, "-c", code], timeout=120, env=child_env(extra={"OUT": str(out)}))
    assert proc.returncode == 0, proc.stdout
    seen = json.loads(out.read_text())
    assert seen["hf_home"] == str(hf_home) and seen["offline"] is True
    assert int(seen["port"]) > 0


def test_free_port_is_bindable_and_child_env_gets_fresh_ports() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))  # raises if the port was not free
    assert child_env(port=1234)["MASTER_PORT"] == "1234"
    env = child_env()
    assert env["OMP_NUM_THREADS"] and env["PYTHONPATH"].split(os.pathsep)[0] == str(Path(__file__).parents[1])


def test_collective_log_records_name_and_elements_inside_the_block_only() -> None:
    import types

    fake = types.SimpleNamespace(all_reduce=lambda t, op=None: t, broadcast=lambda t, src: t, other=len)
    log = CollectiveLog()
    assert sorted(log.install(fake, prefix="f.")) == ["all_reduce", "broadcast"]
    assert log.install(fake) == [], "already wrapped functions are not wrapped twice"
    fake.all_reduce(torch.zeros(3))  # outside any block: not recorded
    with log.counting() as calls:
        fake.all_reduce(torch.zeros(2, 3))
        fake.broadcast([torch.zeros(4), torch.zeros(1)], src=0)
    assert calls == [("f.all_reduce", 6), ("f.broadcast", 5)]
    assert log.record(lambda: fake.all_reduce(torch.zeros(7))) == [("f.all_reduce", 7)]
    assert log.calls == []


def test_collective_log_on_a_real_process_group(tmp_path: Path) -> None:
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    original = dist.all_reduce
    log = CollectiveLog()
    log.install(dist, names=["all_reduce"])
    try:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
        t = torch.ones(5)
        assert log.record(lambda: dist.all_reduce(t)) == [("all_reduce", 5)]
        assert torch.equal(t, torch.ones(5)), "the wrapped function still runs"
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        dist.all_reduce = original  # type: ignore[assignment]
