"""DeepSpeed strategies for Lightning: one that honours a ``"lookahead"`` config section, and one that also
runs on CPU (gloo), to debug DeepSpeed configs on a laptop.

Lightning's ``DeepSpeedStrategy`` refuses any accelerator but CUDA. DeepSpeed itself runs on CPU; only
Lightning's environment check and device selection assume GPUs. ``CPUDeepSpeedStrategy`` replaces those three
pieces and nothing else::

    from lookahead_dist.lightning import CPUDeepSpeedStrategy
    Trainer(accelerator="cpu", devices=2, strategy=CPUDeepSpeedStrategy(config="configs/zero2.json"))

Importing this module registers the name ``"deepspeed_cpu"`` (ZeRO stage 2 unless ``config`` says otherwise)
and ``"deepspeed_cpu_stage_1"`` / ``_2`` / ``_3`` in Lightning's strategy registry.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, StrategyRegistry
from typing_extensions import override

from .._versions import check_versions
from ..core.keys import CONFIG_KEY

__all__ = ["CONFIG_DIR", "CPUDeepSpeedStrategy", "LookaheadDeepSpeedStrategy"]

#: The repository's DeepSpeed JSON configs (present in a source checkout, not in a wheel).
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"

check_versions("lightning")
# The section is hidden from DeepSpeed by overriding this (private) method, the only place where the
# config reaches deepspeed.initialize. If a Lightning release renames it, an override would silently
# never run and the section would be dropped: refuse to import instead.
if not all(  # pragma: no cover
    callable(getattr(DeepSpeedStrategy, name, None)) for name in ("_setup_model_and_optimizer", "_load_config")
):
    raise ImportError(
        "lookahead_dist.lightning: this Lightning version's DeepSpeedStrategy has no _setup_model_and_optimizer "
        "or _load_config, "
        "so a 'lookahead' config section cannot be honoured. Use lightning 2.6.x, or LookaheadCallback with "
        "the stock DeepSpeedStrategy and a config without the section."
    )


def _resolve_config(config: Any) -> Any:
    """Accept a dict, a path, or the bare name of a JSON file in the repository's ``configs/``."""
    if not isinstance(config, (str, Path)) or Path(config).is_file():
        return config
    for candidate in (CONFIG_DIR / str(config), CONFIG_DIR / f"{config}.json"):
        if candidate.is_file():
            return str(candidate)
    known = sorted(p.name for p in CONFIG_DIR.glob("*.json")) if CONFIG_DIR.is_dir() else []
    raise FileNotFoundError(
        f"CPUDeepSpeedStrategy: config={str(config)!r} is neither a file nor a config in {CONFIG_DIR}; "
        f"pass a path to a DeepSpeed JSON file or a dict" + (f", or one of {known}." if known else ".")
    )


class LookaheadDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy`` that also honours a ``"lookahead"`` section of the DeepSpeed config.

    The stock strategy hands the whole config to DeepSpeed, which ignores unknown keys, so a section there
    would be dropped silently. This class hides it from ``deepspeed.initialize`` and installs Lookahead on
    the engine from it (:func:`lookahead_dist.deepspeed.install`). Everything else is the stock strategy;
    ``LookaheadCallback`` with a section-free config is the other way to get the same training.

    ``outer`` (a mapping of :class:`~lookahead_dist.core.settings.OuterSettings` fields, e.g.
    ``{"scope": "nodes", "momentum": 0.9, "nesterov": True}``) sets or replaces the section's ``"outer"``
    object. With ``scope: "nodes"`` every node becomes its own data-parallel group and the nodes meet only
    at the sync (:mod:`lookahead_dist.deepspeed.outer`); the groups are built here, before
    ``deepspeed.initialize``, which is why this is a strategy option and not a callback's.
    """

    def __init__(self, *args: Any, outer: dict[str, Any] | None = None, **kwargs: Any) -> None:
        from ..core.settings import OuterSettings

        # Validated now, so a bad value fails when the Trainer is built, not after the processes start.
        self.lookahead_outer = None if outer is None else dict(outer)
        if outer is not None:
            OuterSettings.from_mapping(self.lookahead_outer, where="LookaheadDeepSpeedStrategy(outer=...)")
        super().__init__(*args, **kwargs)

    @override
    def _load_config(self, config: Any) -> dict[str, Any] | None:
        # Read files and base64 strings as deepspeed.initialize does (hjson, duplicate keys refused, the
        # file name in every message) and refuse a misspelled or null "lookahead" section up front.
        from ..deepspeed.config import check_top_level, load_config, settings_from_section, source_name

        if config is None and self.DEEPSPEED_ENV_VAR in os.environ:
            config = os.environ[self.DEEPSPEED_ENV_VAR]
        if config is None:
            return None
        loaded = load_config(config)
        check_top_level(loaded, source_name(config))
        if loaded.get(CONFIG_KEY) is not None:
            settings_from_section(loaded[CONFIG_KEY], source_name(config))
        return loaded

    @override
    def _setup_model_and_optimizer(
        self, model: Any, optimizer: Any, lr_scheduler: Any = None
    ) -> tuple[Any, Any]:
        # A "lookahead" config section is ours, not DeepSpeed's: hide it from deepspeed.initialize and
        # install Lookahead from it afterwards (as lookahead_dist.deepspeed.initialize does). It stays in
        # self.config so that LookaheadCallback can refuse to install a second one.
        if isinstance(self.config, dict):
            from ..deepspeed.config import check_top_level

            check_top_level(self.config)
        section = self.config.pop(CONFIG_KEY, None) if isinstance(self.config, dict) else None
        if self.lookahead_outer is not None:
            if section is None:
                from ..core.settings import LookaheadConfigError

                raise LookaheadConfigError(
                    'LookaheadDeepSpeedStrategy(outer=...) needs a "lookahead" section in the DeepSpeed config '
                    '(e.g. "lookahead": {"k": 50, "alpha": 0.7}); the outer step applies to its slow weights.'
                )
            section = {**section, "outer": dict(self.lookahead_outer)}
        from ..deepspeed import install, settings_from_section

        settings = None if section is None else settings_from_section(section)
        try:
            if settings is not None and settings.outer.scope == "nodes":
                engine, ds_optimizer = self._setup_nodes_engine(model, optimizer, lr_scheduler, settings)
            else:
                engine, ds_optimizer = super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
        finally:
            if section is not None and isinstance(self.config, dict):
                self.config[CONFIG_KEY] = section
        if settings is not None and engine.optimizer is not None:
            install(engine, settings=settings)
        return engine, ds_optimizer

    def _setup_nodes_engine(self, model: Any, optimizer: Any, lr_scheduler: Any, settings: Any) -> tuple[Any, Any]:
        # The stock strategy's deepspeed.initialize call plus mpu=: the node-local data-parallel groups
        # (and one identical start on every node) must exist before the engine does.
        import argparse

        import deepspeed

        from ..deepspeed.outer import prepare_nodes

        arguments: dict[str, Any] = {
            "args": argparse.Namespace(device_rank=self.root_device.index),
            "config": self.config,
            "model": model,
            "model_parameters": filter(lambda p: p.requires_grad, model.parameters()),
            "optimizer": optimizer,
            "lr_scheduler": lr_scheduler,
            "dist_init_required": False,
        }
        prepare_nodes(arguments, settings)
        engine, ds_optimizer, _, _ = deepspeed.initialize(**arguments)
        return engine, ds_optimizer


class CPUDeepSpeedStrategy(LookaheadDeepSpeedStrategy):
    """``DeepSpeedStrategy`` that accepts ``accelerator="cpu"`` (one process per "device", gloo backend).

    Takes every argument of ``DeepSpeedStrategy``; ``config`` may also be the name of a JSON file in the
    repository's ``configs/`` folder (``"zero2"`` or ``"zero2.json"``). fp16 is refused by DeepSpeed on
    CPU; use ``precision="bf16-mixed"`` or 32-bit. It is meant for debugging and tests, not for speed.

    A ``"lookahead"`` section in the config installs Lookahead on the engine's optimizer (see
    ``lookahead_dist.deepspeed``); do not combine it with ``LookaheadCallback``, which then raises.
    """

    strategy_name = "deepspeed_cpu"

    def __init__(self, *args: Any, config: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, config=_resolve_config(config), **kwargs)  # type: ignore[misc]

    @override
    def setup_environment(self) -> None:
        # Skip DeepSpeedStrategy's CUDA-only check; keep DDP's environment set-up.
        DDPStrategy.setup_environment(self)

    @override
    def setup_distributed(self) -> None:
        # DeepSpeedStrategy validates CUDA device indices here; CPU "devices" have none to validate.
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @property
    @override
    def root_device(self) -> torch.device:
        return torch.device("cpu", self.local_rank)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        if "deepspeed_cpu" in strategy_registry:
            return
        strategy_registry.register(
            "deepspeed_cpu", cls, description="DeepSpeed on CPU (gloo), ZeRO stage 2", stage=2
        )
        for stage in (1, 2, 3):
            strategy_registry.register(
                f"deepspeed_cpu_stage_{stage}", cls, description=f"DeepSpeed on CPU, ZeRO stage {stage}",
                stage=stage,
            )


CPUDeepSpeedStrategy.register_strategies(StrategyRegistry)
