"""Writing a consolidated state dict, shared by every engine's checkpoint tools."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor


def save_state_dict(state: dict[str, Tensor], output_file: str | os.PathLike) -> Path:
    """Write ``state`` as ``.safetensors`` (by suffix) or with ``torch.save``; returns the path."""
    out = Path(output_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        # safetensors refuses tensors sharing storage (tied weights): give each its own copy.
        save_file({name: t.detach().contiguous().clone() for name, t in state.items()}, str(out))
    else:
        torch.save(state, out)
    return out
