"""Helpers shared by the tests and by the scripts in ``tests/dist`` they launch.

* :func:`free_port`, :func:`child_env`: a fresh ``MASTER_PORT`` and an offline, one-thread environment per run;
* :func:`run_module`, :func:`run_torchrun`, :func:`torchrun_cmd`: start ``python -m tests.dist.<script>`` (or any
  module) in a subprocess, alone or under torchrun, with a timeout that also ends its workers;
* :class:`CollectiveLog`: wrap ``torch.distributed`` (or ``deepspeed.comm``) functions to record every collective.

The scripts in ``tests/dist`` are modules of the ``tests`` package, run from the repository root
(``python -m tests.dist.ds_cases ...``, ``torchrun --nproc_per_node 2 -m tests.dist.ds_cases ...``): the launchers
here put the root on ``PYTHONPATH`` and run from it, so no script edits ``sys.path``.

This module imports only the standard library and torch (no DeepSpeed), so a launched script can install a
:class:`CollectiveLog` before DeepSpeed is imported and keeps its own references to the functions.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ environment
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it), for ``MASTER_PORT``."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def offline_hf_env(hf_home: Path | str) -> dict[str, str]:
    """Hugging Face libraries offline, with every cache under ``hf_home`` (never ``~/.cache/huggingface``).

    ``TORCH_EXTENSIONS_DIR`` is left alone on purpose: DeepSpeed's JIT-built CPU ops live in
    ``~/.cache/torch_extensions`` and rebuilding them per run would take minutes.
    """
    hf_home = Path(hf_home)
    return {
        "HF_HOME": str(hf_home),
        "HF_DATASETS_CACHE": str(hf_home / "datasets"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


_own_hf_home: list[Path] = []  # created once per process when no caller-provided HF_HOME is in force


def _temporary_hf_home() -> Path:
    # Under pytest, tests/conftest.py has already pointed HF_HOME at a temporary folder (marked by
    # LOOKAHEAD_TEST_HF_HOME); outside pytest the helpers make their own, so a child never uses ~/.cache.
    marked = os.environ.get("LOOKAHEAD_TEST_HF_HOME")
    if marked and os.environ.get("HF_HOME") == marked:
        return Path(marked)
    if not _own_hf_home:
        _own_hf_home.append(Path(tempfile.mkdtemp(prefix="lookahead-hf-")))
    return _own_hf_home[0]


def child_env(
    port: int | None = None, hf_home: Path | str | None = None, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment of a launched run.

    This process's environment plus: Hugging Face offline with a temporary ``HF_HOME`` (``hf_home``, else the
    test session's, else a fresh temporary folder), one thread per process, ``MASTER_ADDR=127.0.0.1`` and
    ``MASTER_PORT`` (``port``, else a fresh free port), the repository root first on ``PYTHONPATH``, then ``extra``.
    """
    env = dict(os.environ)
    env.update(offline_hf_env(hf_home if hf_home is not None else _temporary_hf_home()))
    env.update(
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
        PYTHONUNBUFFERED="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port if port is not None else free_port()),
    )
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(extra or {})
    return env


# ------------------------------------------------------------------ launching
def torchrun_cmd(
    target: str,
    args: Sequence[str] = (),
    nproc: int = 2,
    port: int | None = None,
    nnodes: int = 1,
    node_rank: int = 0,
    module: bool = True,
) -> list[str]:
    """``python -m torch.distributed.run ... -m <target> <args>`` on 127.0.0.1.

    ``target`` is a module name (``tests.dist.ds_cases``), or with ``module=False`` a script path. Give the same
    ``port`` to each node's command when ``nnodes > 1``.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    if nnodes > 1:
        cmd += ["--nnodes", str(nnodes), "--node_rank", str(node_rank)]
    cmd += ["--master_addr", "127.0.0.1", "--master_port", str(port if port is not None else free_port())]
    return [*cmd, *(["-m"] if module else []), target, *map(str, args)]


def module_cmd(module: str, args: Sequence[str] = ()) -> list[str]:
    """``python -m <module> <args>``."""
    return [sys.executable, "-m", module, *map(str, args)]


def run(
    cmd: Sequence[str], timeout: float, env: Mapping[str, str] | None = None, cwd: Path | str = REPO
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` from the repository root and capture its output (stdout and stderr together, in ``stdout``).

    It gets its own process group, so a timeout also ends the worker processes torchrun or Lightning
    started; the ``TimeoutExpired`` raised then carries the output so far.
    """
    proc = subprocess.Popen(
        list(cmd),
        cwd=cwd,
        env=dict(env) if env is not None else child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        _kill_group(proc)
        out, _ = proc.communicate()
        raise subprocess.TimeoutExpired(exc.cmd, exc.timeout, output=out) from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def run_all(
    cmds: Sequence[Sequence[str]],
    timeout: float,
    env: Mapping[str, str] | None = None,
    cwd: Path | str = REPO,
) -> list[subprocess.CompletedProcess[str]]:
    """Run several commands at the same time (e.g. one torchrun per "node"); all must end within ``timeout``."""
    env = dict(env) if env is not None else child_env()
    procs = [
        subprocess.Popen(
            list(cmd),
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for cmd in cmds
    ]
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            _kill_group(p)
        raise
    return [subprocess.CompletedProcess(p.args, p.returncode, out, "") for p, out in zip(procs, outs)]


def run_module(
    module: str, args: Sequence[str] = (), timeout: float = 300, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m <module> <args>`` in a subprocess with :func:`child_env` (plus the variables in ``env``)."""
    return run(module_cmd(module, args), timeout, child_env(extra=env))


def run_torchrun(
    module: str,
    args: Sequence[str] = (),
    nproc: int = 2,
    timeout: float = 300,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``torchrun --nproc_per_node <nproc> -m <module> <args>`` with a fresh port and :func:`child_env`."""
    port = free_port()
    cmd = torchrun_cmd(module, args, nproc=nproc, port=port)
    return run(cmd, timeout, child_env(port=port, extra=env))


def _kill_group(proc: subprocess.Popen[str]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


# ------------------------------------------------------------------ collectives
#: Every collective-like function of ``torch.distributed`` / ``deepspeed.comm`` that a training step might call.
COLLECTIVES: tuple[str, ...] = (
    "all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_into_tensor", "_all_gather_base",
    "all_gather_coalesced", "all_gather_object", "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base",
    "broadcast", "broadcast_object_list", "reduce", "gather", "scatter", "all_to_all", "all_to_all_single",
    "barrier", "send", "recv", "isend", "irecv", "batch_isend_irecv",
)  # fmt: skip


def numel(value: Any) -> int:
    """Total element count of the tensors in ``value`` (a tensor, or nested lists/tuples/dicts of them)."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.numel()
    if isinstance(value, (list, tuple)):
        return sum(numel(v) for v in value)
    if isinstance(value, dict):
        return sum(numel(v) for v in value.values())
    return 0


class CollectiveLog:
    """Records ``(prefix + name, element count)`` of every wrapped collective called while counting.

    The element count is the sum over all tensor arguments (inputs and outputs). ::

        LOG = CollectiveLog()
        LOG.install(torch.distributed)                  # before `import deepspeed`, which keeps references
        import deepspeed, deepspeed.comm
        LOG.install(deepspeed.comm, prefix="ds.")
        calls = LOG.record(lambda: engine.step())       # [("all_gather_into_tensor", 1024), ...]
        with LOG.counting() as calls: ...

    A function is wrapped at most once across all logs (a wrapped function is never wrapped again).
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.active = False

    def install(self, module: Any, names: Iterable[str] = COLLECTIVES, prefix: str = "") -> list[str]:
        """Replace ``module.<name>`` by a recording wrapper for each name it has; returns the names wrapped."""
        wrapped = []
        for name in names:
            fn = getattr(module, name, None)
            if fn is None or getattr(fn, "_collective_log", None) is not None:
                continue
            setattr(module, name, self._wrapper(prefix + name, fn))
            wrapped.append(name)
        return wrapped

    def _wrapper(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def recorded(*args: Any, **kwargs: Any) -> Any:
            if self.active:
                self.calls.append((label, numel(args) + numel(kwargs)))
            return fn(*args, **kwargs)

        recorded._collective_log = self  # type: ignore[attr-defined]
        recorded.__wrapped__ = fn  # type: ignore[attr-defined]
        return recorded

    @contextmanager
    def counting(self) -> Iterator[list[tuple[str, int]]]:
        """Record the calls made inside the block into the yielded (fresh) list."""
        start = len(self.calls)
        out: list[tuple[str, int]] = []
        self.active = True
        try:
            yield out
        finally:
            self.active = False
            out.extend(self.calls[start:])
            del self.calls[start:]

    def record(self, fn: Callable[[], Any]) -> list[tuple[str, int]]:
        """Call ``fn()`` and return the collectives it issued, in order."""
        with self.counting() as calls:
            fn()
        return calls


# ------------------------------------------------------------------ inside a launched script
def run_cases(cases: Iterable[str], run_case: Callable[[str], Any], out: str | Path) -> None:
    """Run each case on every rank, record its result (or its error, then stop: the ranks may be out of step),
    let rank 0 write them to ``out`` as JSON, then leave the process group."""
    import json
    import traceback

    import torch.distributed as dist

    results: dict[str, Any] = {}
    for case in cases:
        try:
            results[case] = run_case(case)
        except Exception as exc:  # noqa: BLE001 - recorded per case so the test shows the error
            results[case] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-3000:]}
            break
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()
