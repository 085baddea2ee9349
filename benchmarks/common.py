"""What the benchmark scripts share: paths, the RESULTS.md sections, the machine description, launching
workers under torchrun, and loading the peers' Lookahead implementations.

The scripts are modules of the ``benchmarks`` package, run from the repository root
(``python -m benchmarks.bench_sync``); workers are launched the same way (``torchrun ... -m
benchmarks.dist_zero_worker``) from the root, so ``lookahead_dist``, ``examples`` and ``benchmarks`` import
with no edit of ``sys.path``.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import signal
import site
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from examples.common.runs import free_port, run_env

__all__ = [
    "BENCH_DIR",
    "REPO",
    "RESULTS_MD",
    "command_line",
    "environment_lines",
    "free_port",
    "load_peers",
    "pyplot",
    "read_section",
    "run_workers",
    "spread",
    "torchrun_cmd",
    "update_section",
    "worker_env",
]

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_MD = BENCH_DIR / "RESULTS.md"
#: A hand-written reading below this marker survives a re-run whose body brings none of its own.
READING = "<!-- reading -->"

# A peer factory: (inner optimizer, k, alpha) -> the peer's Lookahead around it.
PeerFactory = Callable[[Any, int, float], Any]


# ------------------------------------------------------------------ RESULTS.md
def _markers(name: str) -> tuple[str, str]:
    return f"<!-- begin {name} -->", f"<!-- end {name} -->"


def read_section(path: Path, name: str) -> str:
    """The current text of ``name``'s section of ``path`` ("" when there is none)."""
    begin, end = _markers(name)
    text = path.read_text() if path.exists() else ""
    return text.split(begin, 1)[1].split(end, 1)[0] if begin in text and end in text else ""


def update_section(path: Path, name: str, body: str) -> None:
    """Replace (or append) the part of ``path`` between the markers for ``name`` with ``body``.

    A hand-written reading below :data:`READING` in the old section is kept when ``body`` has none.
    """
    begin, end = _markers(name)
    text = path.read_text() if path.exists() else "# Benchmark results\n\nWritten by the scripts in this folder.\n"
    old_block = read_section(path, name)
    if READING in old_block and READING not in body:
        body = body.rstrip("\n") + "\n\n" + READING + old_block.split(READING, 1)[1].rstrip("\n")
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def command_line(module: str, argv: Sequence[str], prefix: str = "") -> str:
    """The command that reproduces this run, as RESULTS.md shows it: ``[prefix ].venv/bin/python -m <module> <argv>``."""
    parts = [prefix, ".venv/bin/python -m", module, *argv]
    return " ".join(p for p in parts if p)


def environment_lines(device: str) -> list[str]:
    """Machine, versions, date and load, as Markdown list items for a RESULTS.md section."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from importlib.metadata import PackageNotFoundError, version

    versions = [f"torch {torch.__version__}"]
    for name in ("deepspeed", "lightning"):
        try:
            versions.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            versions.append(f"{name} not installed")
    where = f"{os.cpu_count()} CPU cores ({cpu})"
    if device.startswith("cuda") and torch.cuda.is_available():
        where = f"{torch.cuda.get_device_name()} (host: {where})"
    return [
        f"- machine: {where}, {platform.system()} {platform.release()}, Python {platform.python_version()}",
        f"- versions: {', '.join(versions)}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}",
        (
            f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}; load average at the end: "
            f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} (other jobs shared the machine)"
        ),
    ]


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of ``values`` (how the tables report a repeated measurement)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend (the benchmarks run without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ------------------------------------------------------------------ launching workers
def worker_env(port: int, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A worker's environment: the examples' run environment (offline Hugging Face, the repository on
    ``PYTHONPATH``, ``MASTER_ADDR``/``MASTER_PORT``), one thread per process, DeepSpeed on the CPU."""
    env = run_env(port)
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    env.update(extra or {})
    return env


def torchrun_cmd(
    module: str, args: Sequence[str], nproc: int, port: int, nnodes: int = 1, node_rank: int = 0
) -> list[str]:
    """``python -m torch.distributed.run ... -m <module> <args>`` on 127.0.0.1 (one node's command)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    if nnodes > 1:
        cmd += ["--nnodes", str(nnodes), "--node_rank", str(node_rank)]
    cmd += ["--master_addr", "127.0.0.1", "--master_port", str(port)]
    return [*cmd, "-m", module, *map(str, args)]


def run_workers(cmds: Sequence[Sequence[str]], env: Mapping[str, str], timeout: float) -> None:
    """Run ``cmds`` at the same time from the repository root; exit with the output's tail if one fails.

    Each gets its own process group, so a timeout also ends the processes torchrun started.
    """
    for cmd in cmds:
        print("launching:", " ".join(cmd), flush=True)
    procs = [
        subprocess.Popen(
            list(cmd),
            cwd=REPO,
            env=dict(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for cmd in cmds
    ]
    try:
        outputs = [proc.communicate(timeout=timeout)[0] for proc in procs]
    except subprocess.TimeoutExpired:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        raise
    for proc, out in zip(procs, outputs):
        if proc.returncode != 0:
            sys.exit(f"worker failed (exit {proc.returncode}): {' '.join(proc.args)}\n{out[-8000:]}")


# ------------------------------------------------------------------ the peers
def load_peers(folder: Path | None) -> tuple[dict[str, PeerFactory], dict[str, str]]:
    """The peers' Lookahead (name -> factory ``(inner, k, alpha) -> optimizer``) and their versions.

    ``folder`` is where they were installed with ``pip install --no-deps --target`` (benchmark only, never a
    project dependency); a peer missing there is left out (with a line saying why). ``folder`` becomes a
    site directory of this process: a ``--target`` folder is one, and the peers import their own modules
    by their package names.
    """
    factories: dict[str, PeerFactory] = {}
    versions: dict[str, str] = {}
    if folder is None:
        return factories, versions
    if not folder.is_dir():
        raise SystemExit(f"--peers {folder}: no such folder; install the peers there first (see --help)")
    site.addsitedir(str(folder))
    timm_file = folder / "timm" / "optim" / "lookahead.py"
    if timm_file.exists():
        # timm's package __init__ needs torchvision (left out by --no-deps): load the one file on its own.
        spec = importlib.util.spec_from_file_location("_timm_lookahead", timm_file)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        factories["timm"] = lambda opt, k, alpha: module.Lookahead(opt, alpha=alpha, k=k)
        versions["timm"] = _version_in(folder, "timm")
    try:
        from pytorch_optimizer import Lookahead as POLookahead

        factories["pytorch_optimizer"] = lambda opt, k, alpha: POLookahead(opt, k=k, alpha=alpha)
        versions["pytorch_optimizer"] = _version_in(folder, "pytorch_optimizer")
    except ImportError as exc:
        print(f"pytorch_optimizer not available: {exc}")
    # torch_optimizer's __init__ imports pytorch_ranger, which its Lookahead does not use: an empty stand-in.
    if "pytorch_ranger" not in sys.modules:
        stub = types.ModuleType("pytorch_ranger")
        for name in ("Ranger", "RangerQH", "RangerVA"):
            setattr(stub, name, type(name, (), {}))
        sys.modules["pytorch_ranger"] = stub
    try:
        from torch_optimizer import Lookahead as TOLookahead

        factories["torch_optimizer"] = lambda opt, k, alpha: TOLookahead(opt, k=k, alpha=alpha)
        versions["torch_optimizer"] = _version_in(folder, "torch_optimizer")
    except ImportError as exc:
        print(f"torch_optimizer not available: {exc}")
    return factories, versions


def _version_in(folder: Path, dist: str) -> str:
    from importlib.metadata import PathDistribution

    for info in folder.glob(f"{dist}-*.dist-info"):
        return str(PathDistribution(info).version)
    return "?"
