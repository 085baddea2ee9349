"""Lightning's ``FSDPStrategy`` (FSDP1) on CPU processes (gloo), for laptops and CI.

The stock strategy refuses ``accelerator="cpu"``, and FSDP itself needs a ``device_id`` when the
parameters are on CPU, which Lightning derives from a CUDA index (``None`` for a CPU device).
``CPUFSDPStrategy`` passes ``device_id=torch.device("cpu")`` where Lightning wraps the model and
changes nothing else::

    from lookahead_dist.lightning import CPUFSDPStrategy
    Trainer(accelerator="cpu", devices=2, strategy=CPUFSDPStrategy(state_dict_type="sharded"),
            callbacks=[LookaheadCallback(k=5, alpha=0.5)])

Importing this module registers ``"fsdp_cpu"`` in Lightning's strategy registry. It is meant for
debugging and tests, not for speed; on GPUs use the stock ``FSDPStrategy`` with the same arguments.
``use_orig_params=True`` (Lightning's default) is what LookaheadCallback supports: the optimizer then
steps each parameter's local slice of the flat shard, so φ is shard-sized per rank.

Evaluating after fit in the same Trainer (``trainer.test(model)``, as the examples do): the stock strategy wraps
the LightningModule again, whose parameters are by then views of this rank's shard, and the forward fails
(``'weight' must be 2-D`` in an embedding); this class reuses the wrapper fit created.

Full checkpoints (``state_dict_type="full"``): Lightning gathers them with ``offload_to_cpu=True``, which
on CPU parameters crashes inside FSDP's parameter hook; here the gather stays where the tensors are
(they are on the CPU already), with the same rank-0-only output.
"""

from __future__ import annotations

from collections.abc import Generator
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import FSDPStrategy, StrategyRegistry
from torch import nn
from typing_extensions import override

from .._versions import check_versions

__all__ = ["CPUFSDPStrategy"]

check_versions("lightning")
_CPU = torch.device("cpu")


class CPUFSDPStrategy(FSDPStrategy):
    """``FSDPStrategy`` that accepts ``accelerator="cpu"``; takes every argument of ``FSDPStrategy``."""

    strategy_name = "fsdp_cpu"

    @override
    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        root = getattr(self, "_fsdp_root", None)
        if root is not None and root.module is model:
            # trainer.test/validate/predict after fit hands back the LightningModule that fit wrapped: its
            # parameters are now views of this rank's shard, and wrapping them again would flatten those
            # views as if they were whole tensors. Reuse the wrapper (and its sharded parameters).
            return root
        if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            # Wrapped in configure_model (through model_sharded_context, which passes the device below).
            return super()._setup_model(model)
        wrapped = FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=_CPU,
            **self.kwargs,
        )
        # The stock method then sees a wrapped model and does the rest (activation checkpointing, metrics);
        # hide the auto-wrap policy so that it does not warn that the policy was ignored: it was applied.
        policy = self.kwargs.pop("auto_wrap_policy", None)
        try:
            self._fsdp_root = super()._setup_model(wrapped)
        finally:
            if policy is not None:
                self.kwargs["auto_wrap_policy"] = policy
        return self._fsdp_root

    @contextmanager
    @override
    def model_sharded_context(self) -> Generator[None, None, None]:
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import enable_wrap

        with enable_wrap(
            wrapper_cls=FullyShardedDataParallel,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=_CPU,
            **self.kwargs,
        ), self.precision_plugin.tensor_init_context():
            yield

    @contextmanager
    def _full_state_dict_context(self) -> Generator[None, None, None]:
        from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        assert self.model is not None
        with FSDP.state_dict_type(
            module=self.model,
            state_dict_type=StateDictType.FULL_STATE_DICT,
            state_dict_config=FullStateDictConfig(offload_to_cpu=False, rank0_only=True),
            optim_state_dict_config=FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True),
        ):
            yield

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        if self._state_dict_type != "full":
            return super().lightning_module_state_dict()
        assert self.model is not None
        with self._full_state_dict_context():
            return self.model.state_dict()

    @override
    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        if self._state_dict_type != "full":
            return super().optimizer_state(optimizer)
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import OptimStateKeyType

        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        assert self.model is not None
        with self._full_state_dict_context():
            state = FSDP.optim_state_dict(self.model, optimizer)
            if self.global_rank == 0:  # the standard (parameter index) layout, as the stock strategy saves
                state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
        return state

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        if "fsdp_cpu" in strategy_registry:
            return
        strategy_registry.register("fsdp_cpu", cls, description="FSDP (FSDP1) on CPU processes (gloo)")


CPUFSDPStrategy.register_strategies(StrategyRegistry)
