"""Consolidated slow weights from a torch.distributed.checkpoint (DCP) folder, in one process.

A DCP folder written from ``get_state_dict(model, lookahead)`` (torch's recipe, Lightning's
``ModelParallelStrategy`` / ``FSDPStrategy(state_dict_type="sharded")``) holds, as global tensors split in
per-rank chunks, the model weights under ``<model key>.<name>`` and φ under
``<optimizer key>.state.<name>.lookahead_slow`` (in both ``flatten_optimizer_state_dict`` layouts). This
module reads only those tensors, reassembled to full size, and returns a state dict for the plain model:
φ for every tensor that has slow weights, the checkpoint's own value for the rest (buffers, frozen
parameters), and for a tied weight saved under two names (only one is stepped) φ under both, so ``model.load_state_dict(consolidated_slow_state_dict(path))`` works.

    python -m lookahead_dist.checkpoint slow-weights-dcp CKPT_DIR slow.safetensors
    python -m lookahead_dist.fsdp.checkpoint CKPT_DIR slow.pt
"""

from __future__ import annotations

import argparse
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..core.keys import SLOW_KEY

__all__ = ["consolidated_slow_state_dict", "main", "save_consolidated_slow_weights", "slow_weight_keys"]

_STATE = ".state."


def _tensor_metadata(path: Path) -> dict[str, Any]:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if not path.is_dir() or not (path / ".metadata").is_file():
        raise FileNotFoundError(
            f"Lookahead DCP checkpoint: {str(path)!r} is not a torch.distributed.checkpoint folder (no .metadata "
            f"file in it). Pass the folder given to dcp.save, or Lightning's sharded checkpoint folder "
            f"(ModelParallelStrategy's default, FSDPStrategy(state_dict_type='sharded'))."
        )
    metadata = FileSystemReader(str(path)).read_metadata()
    return {k: v for k, v in metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}


def slow_weight_keys(
    path: str | os.PathLike, *, model_key: str | None = None, optimizer_key: str | None = None
) -> tuple[str, dict[str, str]]:
    """(model key, {parameter name: checkpoint key of its φ}) of a DCP folder.

    ``model_key`` / ``optimizer_key`` pick the top-level entries when the folder has several (``"model"`` /
    ``"optim"`` as in torch's recipe, ``"state_dict"`` / ``"optimizer_0"`` in Lightning); by default they
    are found from the keys.
    """
    tensors = _tensor_metadata(Path(path))
    suffix = "." + SLOW_KEY
    slow: dict[str, str] = {}  # parameter name -> key of φ
    models: set[str] = set()
    for key in tensors:
        if not key.endswith(suffix) or _STATE not in key:
            continue
        stem = key[: -len(suffix)]
        # "<optimizer key>.state.<name>": a name may itself contain ".state.", so try each split and keep
        # the first whose <name> is also a model tensor under another top-level key.
        start = 0
        while (cut := stem.find(_STATE, start)) >= 0:
            opt_key, name = stem[:cut], stem[cut + len(_STATE) :]
            start = cut + 1
            if optimizer_key is not None and opt_key != optimizer_key:
                continue
            owners = {
                other[: -len(name) - 1]
                for other in tensors
                if other.endswith("." + name) and not other.startswith(opt_key + ".")
            }
            if model_key is not None:
                owners &= {model_key}
            if owners:
                if name in slow:
                    raise ValueError(
                        f"Lookahead DCP checkpoint: {name!r} has slow weights under two optimizer entries "
                        f"({slow[name]!r} and {key!r}); pass optimizer_key= (--optimizer-key) to pick one."
                    )
                slow[name] = key
                models |= owners
                break
    if not slow:
        where = f" under optimizer key {optimizer_key!r}" if optimizer_key else ""
        raise ValueError(
            f"Lookahead DCP checkpoint: {str(path)!r} holds no slow weights{where} (no '<optimizer>.state.<name>."
            f"{SLOW_KEY}' tensor with a matching model tensor). Was it saved with Lookahead installed and after "
            f"at least one optimizer step? Top-level keys present: {sorted({k.split('.')[0] for k in tensors})}."
        )
    if len(models) != 1:
        raise ValueError(
            f"Lookahead DCP checkpoint: the parameters appear under several top-level keys {sorted(models)}; "
            f"pass model_key= (--model-key) to say which holds the model."
        )
    return models.pop(), slow


def consolidated_slow_state_dict(
    path: str | os.PathLike, *, model_key: str | None = None, optimizer_key: str | None = None
) -> dict[str, Tensor]:
    """The slow weights φ of a DCP checkpoint as full tensors keyed like the model's ``state_dict()``."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load

    tensors = _tensor_metadata(Path(path))
    model, slow = slow_weight_keys(path, model_key=model_key, optimizer_key=optimizer_key)
    prefix = model + "."
    names = [key[len(prefix) :] for key in tensors if key.startswith(prefix)]
    wanted = {name: slow.get(name, prefix + name) for name in names}

    def shape_of(key: str) -> tuple[Any, ...]:
        return (tuple(tensors[key].size), tensors[key].properties.dtype)

    # A tied weight (an LM head sharing the embedding) is saved under both names but stepped, and given φ,
    # once. Its other name must get the same φ: found as the model tensor it equals bit for bit.
    untracked = [name for name in names if name not in slow]
    twins = {
        name: [other for other in slow if other in wanted and shape_of(prefix + other) == shape_of(prefix + name)]
        for name in untracked
    }
    extra = {prefix + other for candidates in twins.values() for other in candidates}
    templates = {
        key: torch.empty(tensors[key].size, dtype=tensors[key].properties.dtype) for key in {*wanted.values(), *extra}
    }
    # no_dist: this process reads every rank's chunks itself; nothing else is loaded. (DCP warns that it
    # assumes a single process when no process group exists: that is the intent here.)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp_load(templates, storage_reader=FileSystemReader(str(path)), no_dist=True)
    out = {name: templates[key] for name, key in wanted.items()}
    for name, candidates in twins.items():
        for other in candidates:
            if torch.equal(templates[prefix + name], templates[prefix + other]):
                out[name] = out[other]
                break
    return out


def save_consolidated_slow_weights(
    path: str | os.PathLike,
    output_file: str | os.PathLike,
    *,
    model_key: str | None = None,
    optimizer_key: str | None = None,
) -> Path:
    """Write :func:`consolidated_slow_state_dict` to ``output_file`` (``.safetensors`` or torch ``.pt``)."""
    from .._files import save_state_dict

    state = consolidated_slow_state_dict(path, model_key=model_key, optimizer_key=optimizer_key)
    return save_state_dict(state, output_file)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint_dir", help="a torch.distributed.checkpoint folder (Lightning: the .ckpt folder)")
    parser.add_argument("output_file", help="*.safetensors for safetensors, anything else for torch.save")
    parser.add_argument("--model-key", default=None, help="top-level key of the model weights (default: found)")
    parser.add_argument("--optimizer-key", default=None, help="top-level key of the optimizer (default: found)")


def run(args: argparse.Namespace) -> int:
    out = save_consolidated_slow_weights(
        args.checkpoint_dir, args.output_file, model_key=args.model_key, optimizer_key=args.optimizer_key
    )
    print(f"Consolidated slow weights written to {out}")
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "python -m lookahead_dist.fsdp.checkpoint") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Write the consolidated Lookahead slow weights of a torch.distributed.checkpoint folder.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
