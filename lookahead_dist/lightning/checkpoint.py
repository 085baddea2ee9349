"""Lookahead's slow weights in a Lightning ``.ckpt`` file (single device / DDP), as a plain state dict.

Torch only: reading a checkpoint needs neither Lightning nor the model class.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..core.keys import SLOW_KEY

__all__ = ["lightning_slow_state_dict", "save_lightning_slow_weights", "slow_by_name"]


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


def slow_by_name(
    ckpt: Mapping[str, Any],
    candidates: Sequence[tuple[str, tuple[int, ...]]],
    param_names: Sequence[str] | None = None,
    optimizer_index: int = 0,
    source: str = "the checkpoint",
) -> dict[str, Tensor]:
    """Module name -> φ of a loaded Lightning checkpoint dict, for each optimizer parameter that has one.

    The one matching rule for a Lightning ``.ckpt`` (the ``slow-weights`` tool and ``LookaheadCallback``
    evaluating ``ckpt_path=...`` both use it). An optimizer state numbers its tensors in param-group order.
    ``param_names`` gives the module name of each optimizer parameter in that order; without it the
    parameters are matched, in order, to ``candidates`` (name, shape) by shape, and the checkpoint is refused
    (:class:`ValueError` with the reason) unless exactly one such match exists. A parameter without state
    (frozen, never stepped) matches any shape.
    """
    osd = _optimizer_state(ckpt, optimizer_index, source)
    order = [index for group in osd["param_groups"] for index in group["params"]]
    states = osd["state"]
    slow = {i: states[i][SLOW_KEY] for i in order if isinstance(states.get(i, {}).get(SLOW_KEY), Tensor)}
    if not slow:
        raise ValueError(
            f"Lookahead checkpoint: {source} holds no slow weights ('{SLOW_KEY}' in no optimizer state); "
            f"was it saved with LookaheadCallback after at least one optimizer step?"
        )
    names = _names(order, states, slow, candidates, param_names, source)
    shapes = dict(candidates)
    out: dict[str, Tensor] = {}
    for index, name in zip(order, names):
        if index in slow:
            if tuple(slow[index].shape) != tuple(shapes[name]):
                raise ValueError(
                    f"Lookahead checkpoint: slow weight {index} has shape {tuple(slow[index].shape)} but "
                    f"{name!r} has {tuple(shapes[name])}; check param_names."
                )
            out[name] = slow[index]
    return out


def _optimizer_state(ckpt: Mapping[str, Any], optimizer_index: int, source: str) -> Mapping[str, Any]:
    optimizers = ckpt.get("optimizer_states") or []
    if not optimizers:
        raise ValueError(
            f"Lookahead checkpoint: {source} holds no optimizer state (saved with save_weights_only?), so no "
            f"slow weights."
        )
    if not 0 <= optimizer_index < len(optimizers):
        raise ValueError(
            f"Lookahead checkpoint: {source} has {len(optimizers)} optimizer state(s); "
            f"optimizer_index={optimizer_index} does not exist."
        )
    return optimizers[optimizer_index]


def _names(
    order: list[int],
    states: Mapping[int, Any],
    slow: Mapping[int, Tensor],
    candidates: Sequence[tuple[str, tuple[int, ...]]],
    param_names: Sequence[str] | None,
    source: str,
) -> list[str]:
    known = {name for name, _ in candidates}
    if param_names is not None:
        names = list(param_names)
        unknown = [n for n in names if n not in known]
        if len(names) != len(order) or unknown:
            raise ValueError(
                f"Lookahead checkpoint: param_names must name the {len(order)} optimizer parameters of "
                f"{source} in param-group order, each a key of its state_dict; got {len(names)} names"
                + (f", unknown: {unknown[:5]}" if unknown else "") + "."
            )  # fmt: skip
        return names

    def shape_of(i: int) -> tuple[int, ...] | None:
        tensor = next((v for v in states.get(i, {}).values() if isinstance(v, Tensor) and v.dim() > 0), None)
        return tuple(slow[i].shape) if i in slow else (None if tensor is None else tuple(tensor.shape))

    picked = _unique_embedding([shape_of(i) for i in order], [tuple(shape) for _, shape in candidates])
    if picked is None:
        raise ValueError(
            f"Lookahead checkpoint: cannot tell which module entry of {source} each of the optimizer's "
            f"{len(order)} parameters is (shapes are ambiguous or in another order than the module's); "
            f"pass the names in optimizer order: --param-names FILE (one per line) or "
            f"lightning_slow_state_dict(path, param_names=[...])."
        )
    return [candidates[j][0] for j in picked]


def lightning_slow_state_dict(
    ckpt_path: str | os.PathLike, param_names: Sequence[str] | None = None, optimizer_index: int = 0
) -> dict[str, Tensor]:
    """The slow weights φ of a Lightning ``.ckpt`` file (single device / DDP) as a state dict of the module.

    Lightning stores the module's ``state_dict`` and, per optimizer, the optimizer's state dict; φ is matched
    to module entries by :func:`slow_by_name` (without ``param_names``: the optimizer's parameters are taken
    to be the module's floating-point entries in definition order, matched by shape). Entries without slow
    weights (buffers, parameters never stepped) keep the saved values; everything is returned as fp32 like
    :func:`consolidated_slow_state_dict`.
    """
    path = Path(ckpt_path)
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "optimizer_states" not in ckpt:
        raise ValueError(
            f"Lookahead checkpoint: {str(path)!r} is not a Lightning checkpoint with optimizer state "
            f"('state_dict' and 'optimizer_states'); pass a DeepSpeed checkpoint folder or a Lightning .ckpt "
            f"saved by Trainer (save_weights_only=False)."
        )
    module = ckpt["state_dict"]
    candidates = [(n, tuple(t.shape)) for n, t in module.items() if isinstance(t, Tensor) and t.is_floating_point()]
    slow = slow_by_name(ckpt, candidates, param_names, optimizer_index, source=repr(str(path)))
    out = {name: t.detach().float().clone() if t.is_floating_point() else t for name, t in module.items()}
    out.update({name: phi.detach().float().clone() for name, phi in slow.items()})
    return out


def save_lightning_slow_weights(
    ckpt_path: str | os.PathLike, output_file: str | os.PathLike, param_names: Sequence[str] | None = None
) -> Path:
    """Write :func:`lightning_slow_state_dict` to ``output_file`` (``.safetensors`` or torch ``.pt``)."""
    from .._files import save_state_dict

    return save_state_dict(lightning_slow_state_dict(ckpt_path, param_names), output_file)
