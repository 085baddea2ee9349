"""``python -m lookahead_dist.checkpoint``: Lookahead's slow weights through every engine's checkpoints.

    python -m lookahead_dist.checkpoint check CKPT_DIR [--tag TAG]
    python -m lookahead_dist.checkpoint to-universal CKPT_DIR [--tag TAG] [--output-dir DIR]
    python -m lookahead_dist.checkpoint slow-weights CKPT_DIR|LIGHTNING.ckpt|DCP_DIR OUT.pt|OUT.safetensors
    python -m lookahead_dist.checkpoint slow-weights-dcp DCP_DIR OUT

This front knows no engine: each subcommand calls the adapter that reads that kind of checkpoint, imported
only when used. DeepSpeed folders: :mod:`lookahead_dist.deepspeed.checkpoint` (completeness checks,
universal checkpoints, consolidated slow weights; import those functions from there).
Lightning ``.ckpt`` files: :mod:`lookahead_dist.lightning.checkpoint`. torch.distributed.checkpoint
folders (FSDP2, Lightning's ModelParallelStrategy / FSDPStrategy sharded checkpoints):
:mod:`lookahead_dist.fsdp.checkpoint`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .deepspeed import checkpoint as _deepspeed

__all__ = ["main"]

_PROG = "python -m lookahead_dist.checkpoint"


def _is_dcp_folder(path: Path) -> bool:
    # torch.distributed.checkpoint writes a ".metadata" file at the top of every checkpoint folder.
    return path.is_dir() and (path / ".metadata").is_file()


def _slow_weights(args: argparse.Namespace) -> None:
    source = Path(args.checkpoint_dir)
    if source.is_file():
        from .lightning.checkpoint import save_lightning_slow_weights

        if args.tag is not None:
            raise ValueError(f"--tag applies to DeepSpeed folders, not to the file {str(source)!r}.")
        names = None if args.param_names is None else Path(args.param_names).read_text().split()
        out = save_lightning_slow_weights(source, args.output_file, names)
    elif _is_dcp_folder(source):
        from .fsdp.checkpoint import save_consolidated_slow_weights as save_dcp

        out = save_dcp(source, args.output_file)
    else:
        out = _deepspeed.save_consolidated_slow_weights(source, args.output_file, args.tag)
    print(f"Consolidated slow weights written to {out}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Carry Lookahead's slow weights through checkpoint tools (DeepSpeed, Lightning .ckpt, DCP).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="which DeepSpeed tags are complete (every rank's files present and intact)")
    check.add_argument("checkpoint_dir", help="folder given to engine.save_checkpoint")
    check.add_argument("--tag", default=None, help="check one tag only")
    uni = sub.add_parser("to-universal", help="ds_to_universal + Lookahead slow weights and cycle position")
    uni.add_argument("checkpoint_dir", help="folder given to engine.save_checkpoint, or one tag folder")
    uni.add_argument("--tag", default=None, help="tag folder to convert (default: the 'latest' file)")
    uni.add_argument("--output-dir", default=None, help="default: <tag>_universal beside the tag folder")
    uni.add_argument("--num-workers", type=int, default=1, help="processes for DeepSpeed's extraction/merge")
    slow = sub.add_parser("slow-weights", help="consolidated fp32 slow weights (like zero_to_fp32)")
    slow.add_argument(
        "checkpoint_dir",
        help="DeepSpeed: the folder given to engine.save_checkpoint or one tag folder; Lightning: a .ckpt file; "
        "FSDP: a torch.distributed.checkpoint folder",
    )
    slow.add_argument("output_file", help="*.safetensors for safetensors, anything else for torch.save")
    slow.add_argument("--tag", default=None, help="DeepSpeed tag folder to read (default: the 'latest' file)")
    slow.add_argument(
        "--param-names", default=None, help="Lightning .ckpt: file with the module name of each optimizer "
        "parameter in param-group order, one per line (needed when shapes do not identify them)",
    )  # fmt: skip
    dcp = sub.add_parser("slow-weights-dcp", help="consolidated slow weights of a torch.distributed.checkpoint folder")
    from .fsdp.checkpoint import add_arguments as add_dcp_arguments

    add_dcp_arguments(dcp)
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            return _deepspeed.check_command(Path(args.checkpoint_dir), args.tag)
        if args.command == "to-universal":
            out = _deepspeed.to_universal(args.checkpoint_dir, args.tag, args.output_dir, num_workers=args.num_workers)
            print(f"Lookahead universal checkpoint written to {out}")
        elif args.command == "slow-weights-dcp":
            from .fsdp.checkpoint import run as run_dcp

            return run_dcp(args)
        else:
            _slow_weights(args)
    except (OSError, ValueError, RuntimeError, NotImplementedError) as exc:
        # One line naming the file and the fix instead of a traceback (the messages are written for that).
        print(f"{_PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
