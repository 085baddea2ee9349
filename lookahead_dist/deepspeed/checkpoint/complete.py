"""Complete DeepSpeed checkpoints: which tags are complete, a save that writes ``latest`` last, the ``check`` CLI.

DeepSpeed's rank 0 writes ``latest`` without waiting for the other ranks, so after a crash during a save
``latest`` can name a tag whose per-rank files are missing or truncated. :func:`check_checkpoint` finds the
complete tags, :func:`resolve_load_tag` refuses an incomplete tag (or, with ``fallback=True``, picks the last
complete one with a warning), and :func:`save_checkpoint` writes ``latest`` only after every rank has
finished writing.
"""

from __future__ import annotations

import os
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "IncompleteCheckpointError",
    "TagReport",
    "check_checkpoint",
    "check_command",
    "check_tag",
    "last_complete_tag",
    "resolve_load_tag",
    "save_checkpoint",
]

RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_MODEL_FILE = re.compile(r"^(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt$")


class IncompleteCheckpointError(RuntimeError):
    """A DeepSpeed checkpoint tag lacks per-rank files, or some are truncated (a save was interrupted)."""


@dataclass
class TagReport:
    """What :func:`check_tag` found in one tag folder."""

    tag: str
    path: Path
    problems: list[str] = field(default_factory=list)
    #: Data-parallel world size the tag was saved with (from its model-states file), if readable.
    world_size: int | None = None
    #: ``engine.global_steps`` at the save, if readable.
    global_steps: int | None = None
    #: A universal checkpoint folder (``to_universal``); never a fallback for a regular load.
    universal: bool = False

    @property
    def complete(self) -> bool:
        return not self.problems


def _readable_torch_file(path: Path) -> str | None:
    """None if ``path`` is a complete torch.save archive, else what is wrong (cheap: no tensor is read)."""
    if not path.is_file():
        return f"{path.name} is missing"
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(name.endswith("data.pkl") for name in archive.namelist()):
                return f"{path.name} is not a torch.save archive"
    except (zipfile.BadZipFile, OSError):
        return f"{path.name} is truncated or corrupt ({path.stat().st_size} bytes; an interrupted write?)"
    return None


def check_tag(tag_dir: str | os.PathLike) -> TagReport:
    """Whether a tag folder of ``engine.save_checkpoint`` holds every rank's files, each complete.

    Expected files come from the tag's own model-states file: its ``dp_world_size`` and whether the
    optimizer state is sharded (ZeRO: one ``*_optim_states.pt`` per data-parallel rank; ZeRO-3 also one
    model-states file per rank). A file counts as complete when its zip directory (written last by
    ``torch.save``) is intact.
    """
    path = Path(tag_dir)
    report = TagReport(tag=path.name, path=path)
    if not path.is_dir():
        report.problems.append(f"{str(path)!r} does not exist")
        return report
    if (path / "zero").is_dir():  # a universal checkpoint (ds_to_universal): no per-rank files
        report.universal = True
        if not any(path.glob("*_model_states.pt")):
            report.problems.append("no *_model_states.pt file in the universal checkpoint")
        return report
    models: dict[str, re.Match[str]] = {}
    for child in path.iterdir():
        match = _MODEL_FILE.match(child.name)
        if match:
            models[child.name] = match
    if not models:
        report.problems.append("no *_model_states.pt file (rank 0 never wrote its part)")
        return report
    first = min(models)
    problem = _readable_torch_file(path / first)
    if problem:
        report.problems.append(problem)
        return report
    head = torch.load(path / first, map_location="cpu", mmap=True, weights_only=False)
    world = head.get("dp_world_size")
    mp_world = head.get("mp_world_size", 1) or 1
    report.world_size = int(world) if isinstance(world, int) else None
    steps = head.get("global_steps")
    report.global_steps = int(steps) if isinstance(steps, int) else None
    if report.world_size is None:
        return report  # not written by a DeepSpeed engine we know: only the readable file is checked
    zero3 = models[first].group(1) is not None
    sharded_optimizer = head.get("optimizer") is None and head.get("param_shapes") is not None
    prefix = ""
    if sharded_optimizer:
        existing = [p.name for p in path.glob("*_optim_states.pt")]
        prefix = "bf16_" if any(name.startswith("bf16_") for name in existing) else ""
    expected = []
    for mp in range(int(mp_world)):
        if not zero3:
            expected.append(f"mp_rank_{mp:02d}_model_states.pt")
        for dp in range(report.world_size):
            if zero3:
                expected.append(f"zero_pp_rank_{dp}_mp_rank_{mp:02d}_model_states.pt")
            if sharded_optimizer:
                expected.append(f"{prefix}zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt")
    for name in expected:
        problem = _readable_torch_file(path / name)
        if problem:
            report.problems.append(problem)
    return report


def _tag_dirs(root: Path) -> list[Path]:
    out = []
    for child in root.iterdir():
        if child.is_dir() and (
            any(_MODEL_FILE.match(p.name) for p in child.iterdir()) or any(child.glob("*_optim_states.pt"))
        ):
            out.append(child)
    return out


def check_checkpoint(checkpoint_dir: str | os.PathLike) -> tuple[str | None, list[TagReport]]:
    """(tag named by ``latest`` or None, a report per tag folder, oldest first by saved step then time)."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"Lookahead checkpoint: {str(root)!r} is not a directory; pass the folder given to "
            f"engine.save_checkpoint."
        )
    latest_file = root / "latest"
    latest = latest_file.read_text().strip() if latest_file.is_file() else None
    dirs = _tag_dirs(root)
    if latest is not None and (root / latest) not in dirs:
        dirs.append(root / latest)
    reports = [check_tag(d) for d in dirs]

    def order(r: TagReport) -> tuple[float, float, str]:
        mtime = max((p.stat().st_mtime for p in r.path.iterdir()), default=0.0) if r.path.is_dir() else 0.0
        return (r.global_steps if r.global_steps is not None else -1.0, mtime, r.tag)

    return latest, sorted(reports, key=order)


def last_complete_tag(checkpoint_dir: str | os.PathLike) -> str | None:
    """The most recent complete tag of ``checkpoint_dir`` (by saved step, then time), or None."""
    complete = [r for r in check_checkpoint(checkpoint_dir)[1] if r.complete and not r.universal]
    return complete[-1].tag if complete else None


def _incomplete_message(root: Path, report: TagReport, fallback_tag: str | None, named_by: str) -> str:
    offer = (
        f"The last complete tag is {fallback_tag!r}: load it with tag={fallback_tag!r}, or call "
        f"lookahead_dist.deepspeed.load_checkpoint(engine, {str(root)!r}, fallback=True)."
        if fallback_tag
        else "No complete tag was found in this folder."
    )
    return (
        f"Lookahead checkpoint: tag {report.tag!r} ({named_by}) in {str(root)!r} is incomplete: "
        f"{'; '.join(report.problems)}. A save was interrupted (DeepSpeed writes 'latest' before every rank "
        f"has finished). {offer} Inspect with: python -m lookahead_dist.checkpoint check {root}"
    )


def resolve_load_tag(load_dir: str | os.PathLike, tag: str | None = None, fallback: bool = False) -> str | None:
    """The tag to load from ``load_dir``: ``tag``, else ``latest``; refused if incomplete.

    With ``fallback=True`` an incomplete tag is replaced by the last complete one, with a warning.
    Returns None when the folder has no ``latest`` and no tag was given (DeepSpeed then loads nothing).
    """
    root = Path(load_dir)
    named_by = "given as tag="
    if tag is None:
        latest = root / "latest"
        if not latest.is_file():
            return None
        tag, named_by = latest.read_text().strip(), "named by the 'latest' file"
    report = check_tag(root / tag)
    if report.complete:
        return tag
    fallback_tag = last_complete_tag(root)
    message = _incomplete_message(root, report, fallback_tag, named_by)
    if not fallback or fallback_tag is None:
        raise IncompleteCheckpointError(message)
    warnings.warn(
        f"Lookahead checkpoint: tag {tag!r} in {str(root)!r} is incomplete ({'; '.join(report.problems)}); "
        f"loading the last complete tag {fallback_tag!r} instead.",
        RuntimeWarning,
        stacklevel=3,
    )
    return fallback_tag


def save_checkpoint(
    engine: Any,
    save_dir: str | os.PathLike,
    tag: str | None = None,
    client_state: dict[str, Any] | None = None,
    save_latest: bool = True,
    **save_kwargs: Any,
) -> bool:
    """``engine.save_checkpoint``, but ``latest`` is written only once every rank has written its files.

    DeepSpeed's rank 0 writes ``latest`` as soon as its own files are done; a crash of another rank
    during its write then leaves ``latest`` naming an incomplete tag. Here DeepSpeed saves without
    ``latest``; its closing barrier is passed only when every rank's files are written; then rank 0
    replaces ``latest`` atomically (write a temporary file, ``os.replace``) and all ranks meet again.
    """
    import deepspeed.comm as dist

    if tag is None:
        tag = f"global_step{engine.global_steps}"  # DeepSpeed's default tag
    done = engine.save_checkpoint(
        save_dir, tag=tag, client_state={} if client_state is None else client_state, save_latest=False,
        **save_kwargs,
    )  # fmt: skip
    if save_latest:
        if dist.get_rank() == 0:
            latest = Path(save_dir) / "latest"
            temporary = latest.with_name(f".latest.{os.getpid()}.tmp")
            temporary.write_text(str(tag))
            os.replace(temporary, latest)
        dist.barrier()
    return bool(done)


# ------------------------------------------------------------------------------------------- CLI
def check_command(root: Path, tag: str | None) -> int:
    """Print one line per tag; exit 0 if the tag to resume from is complete, 1 if not, 2 if none is."""
    if tag is not None:
        report = check_tag(root / tag)
        print(_report_line(report))
        return 0 if report.complete else 1
    latest, reports = check_checkpoint(root)
    for report in reports:
        print(_report_line(report, is_latest=report.tag == latest))
    complete = [r.tag for r in reports if r.complete and not r.universal]
    if latest is None:
        print(f"no 'latest' file in {str(root)!r}")
    latest_ok = any(r.tag == latest and r.complete for r in reports)
    if not complete:
        print("no complete tag: nothing to resume from")
        return 2
    if latest_ok:
        print(f"resume from: {latest}")
        return 0
    print(
        f"'latest' names an incomplete tag; resume from the last complete one, {complete[-1]!r}: pass "
        f"tag={complete[-1]!r}, or lookahead_dist.deepspeed.load_checkpoint(engine, DIR, fallback=True)"
    )
    return 1


def _report_line(report: TagReport, is_latest: bool = False) -> str:
    mark = " (latest)" if is_latest else ""
    if report.complete:
        detail = f"{report.world_size} rank(s)" if report.world_size is not None else "readable"
        if report.universal:
            detail = "universal checkpoint"
        if report.global_steps is not None:
            detail += f", step {report.global_steps}"
        return f"{report.tag}{mark}: complete ({detail})"
    return f"{report.tag}{mark}: INCOMPLETE: {'; '.join(report.problems)}"
