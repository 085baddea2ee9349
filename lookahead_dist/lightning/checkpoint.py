"""Lookahead's slow weights in a Lightning ``.ckpt`` file (single device / DDP), as a plain state dict.

Torch only: reading a checkpoint needs neither Lightning nor the model class.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from ..core.keys import SLOW_KEY

__all__ = ["lightning_slow_state_dict", "save_lightning_slow_weights"]


def _unique_embedding(wanted: list[tuple[int, ...] | None], have: list[tuple[int, ...]]) -> list[int] | None:
    """Indices into ``have`` of the one way ``wanted`` (None: any shape) is an ordered subsequence of it."""
    n, m = len(wanted), len(have)

    def fits(a: tuple[int, ...] | None, b: tuple[int, ...]) -> bool:
        return a is None or a == b

    # ways[i][j]: ways to place wanted[:i] into have[:j], capped at 2 (we only need 0, 1 or "several").
    ways = [[1] * (m + 1)] + [[0] * (m + 1) for _ in range(n)]
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            ways[i][j] = min(2, ways[i][j - 1] + (ways[i - 1][j - 1] if fits(wanted[i - 1], have[j - 1]) else 0))
    if ways[n][m] != 1:
        return None
    picked, i, j = [], n, m
    while i > 0:
        if ways[i][j - 1] == 0:  # wanted[i-1] must sit at have[j-1]
            picked.append(j - 1)
            i -= 1
        j -= 1
    return picked[::-1]


def lightning_slow_state_dict(
    ckpt_path: str | os.PathLike, param_names: Sequence[str] | None = None, optimizer_index: int = 0
) -> dict[str, Tensor]:
    """The slow weights φ of a Lightning ``.ckpt`` file (single device / DDP) as a state dict of the module.

    Lightning stores the module's ``state_dict`` and, per optimizer, the optimizer's state dict, whose
    tensors are numbered in param-group order. ``param_names`` gives the module name of each optimizer
    parameter in that order; without it the optimizer's parameters are taken to be the module's in
    definition order (``model.parameters()``), matched by shape, and the file is refused when the shapes
    do not determine one match. Entries without slow weights (buffers, parameters never stepped) keep
    the saved values; everything is returned as fp32 like :func:`consolidated_slow_state_dict`.
    """
    path = Path(ckpt_path)
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "optimizer_states" not in ckpt:
        raise ValueError(
            f"Lookahead checkpoint: {str(path)!r} is not a Lightning checkpoint with optimizer state "
            f"('state_dict' and 'optimizer_states'); pass a DeepSpeed checkpoint folder or a Lightning .ckpt "
            f"saved by Trainer (save_weights_only=False)."
        )
    optimizers = ckpt["optimizer_states"]
    if not 0 <= optimizer_index < len(optimizers):
        raise ValueError(
            f"Lookahead checkpoint: {str(path)!r} has {len(optimizers)} optimizer state(s); "
            f"optimizer_index={optimizer_index} does not exist."
        )
    osd = optimizers[optimizer_index]
    order = [index for group in osd["param_groups"] for index in group["params"]]
    states = osd["state"]
    slow = {i: states[i][SLOW_KEY] for i in order if isinstance(states.get(i, {}).get(SLOW_KEY), Tensor)}
    if not slow:
        raise ValueError(
            f"Lookahead checkpoint: {str(path)!r} holds no slow weights ('{SLOW_KEY}' in no optimizer state); "
            f"was it saved with LookaheadCallback after at least one optimizer step?"
        )
    module = ckpt["state_dict"]
    if param_names is not None:
        names = list(param_names)
        if len(names) != len(order) or any(name not in module for name in names):
            raise ValueError(
                f"Lookahead checkpoint: param_names must name the {len(order)} optimizer parameters of "
                f"{str(path)!r} in param-group order, each a key of its state_dict; got {len(names)} names"
                + (f", unknown: {[n for n in names if n not in module][:5]}" if any(n not in module for n in names)
                   else "") + "."
            )  # fmt: skip
    else:
        candidates = [n for n, t in module.items() if isinstance(t, Tensor) and t.is_floating_point()]

        def shape_of(i: int) -> tuple[int, ...] | None:
            tensor = next((v for v in states.get(i, {}).values() if isinstance(v, Tensor) and v.dim() > 0), None)
            return tuple(slow[i].shape) if i in slow else (None if tensor is None else tuple(tensor.shape))

        picked = _unique_embedding([shape_of(i) for i in order], [tuple(module[n].shape) for n in candidates])
        if picked is None:
            raise ValueError(
                f"Lookahead checkpoint: cannot tell which module entry of {str(path)!r} each of the optimizer's "
                f"{len(order)} parameters is (shapes are ambiguous or in another order than the module's); "
                f"pass the names in optimizer order: --param-names FILE (one per line) or "
                f"lightning_slow_state_dict(path, param_names=[...])."
            )
        names = [candidates[j] for j in picked]
    out = {name: t.detach().float().clone() if t.is_floating_point() else t for name, t in module.items()}
    for index, name in zip(order, names):
        if index in slow:
            if tuple(slow[index].shape) != tuple(module[name].shape):
                raise ValueError(
                    f"Lookahead checkpoint: slow weight {index} has shape {tuple(slow[index].shape)} but "
                    f"{name!r} has {tuple(module[name].shape)}; check param_names."
                )
            out[name] = slow[index].detach().float().clone()
    return out


def save_lightning_slow_weights(
    ckpt_path: str | os.PathLike, output_file: str | os.PathLike, param_names: Sequence[str] | None = None
) -> Path:
    """Write :func:`lightning_slow_state_dict` to ``output_file`` (``.safetensors`` or torch ``.pt``)."""
    from .._files import save_state_dict

    return save_state_dict(lightning_slow_state_dict(ckpt_path, param_names), output_file)
