"""Helpers to launch CLI runs as subprocesses and read their CSV logs (used by the demo and the tests)."""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from examples.common.paths import REPO_ROOT


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_env(port: int | None = None) -> dict[str, str]:
    """The environment for a child run: offline Hugging Face, one thread per process, its own MASTER_PORT."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1",
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port or free_port()),
    )  # fmt: skip
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def run_cli(task: str, args: list[str], log_file: Path, timeout: float) -> subprocess.CompletedProcess:
    """``python -m examples.<task>.cli <args>`` from the repository root; output goes to ``log_file``."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as log:
        # Its own process group, so a timeout also ends the worker processes Lightning starts.
        proc = subprocess.Popen(
            [sys.executable, "-m", f"examples.{task}.cli", *args],
            cwd=REPO_ROOT, env=run_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    return subprocess.CompletedProcess(proc.args, proc.returncode)


def run_folder(run_dir: Path | str) -> Path:
    """The folder holding a run's ``metrics.csv``: ``run_dir`` itself, else its newest ``version_N``.

    ``run_dir`` may be a run folder or a ``trainer.default_root_dir`` (each fit gets ``version_N`` under it).
    """
    run_dir = Path(run_dir)
    if (run_dir / "metrics.csv").exists():
        return run_dir
    versions = sorted(
        (int(p.name.split("_")[1]), p) for p in run_dir.glob("version_*") if p.name.split("_")[1].isdigit()
    )
    if not versions:
        raise FileNotFoundError(f"{run_dir} holds no metrics.csv and no version_N run folder")
    return versions[-1][1]


def read_metrics(run_dir: Path | str) -> list[dict[str, float]]:
    """Rows of the run's ``metrics.csv`` (see :func:`run_folder`), empty cells left out, numbers as floats."""
    with open(run_folder(run_dir) / "metrics.csv") as f:
        return [{key: float(value) for key, value in row.items() if value != ""} for row in csv.DictReader(f)]


def series(rows: list[dict[str, float]], name: str) -> list[tuple[int, float]]:
    """``(step, value)`` for every row that logged ``name``."""
    return [(int(row["step"]), row[name]) for row in rows if name in row]
