"""LightningCLI shared by the examples: a base YAML as default config, CSV + TensorBoard loggers, checkpoints."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

from examples.common.paths import REPO_ROOT

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    # Offline unless the user asked otherwise: these examples run on machines with no network.
    os.environ.setdefault(_var, "1")


def default_loggers(root: str) -> list[Logger]:
    """CSV logs (always) and TensorBoard logs (when installed) in ``<root>/logs``; a fixed folder so resume finds it."""
    loggers: list[Logger] = [CSVLogger(root, name="logs", version="")]
    if importlib.util.find_spec("tensorboard") is not None:
        loggers.append(TensorBoardLogger(root, name="logs", version="", default_hp_metric=False))
    return loggers


class ExampleCLI(LightningCLI):
    """``python -m examples.<task>.cli fit --config configs/<task>_<setup>.yaml [--config configs/<task>_lookahead.yaml]``.

    ``configs/<task>_base.yaml`` is always read first. Resume with ``--ckpt_path last``.
    """

    def __init__(self, model_class: Any, datamodule_class: Any, base_config: str, **kwargs: Any) -> None:
        base = str(REPO_ROOT / "configs" / base_config)
        super().__init__(
            model_class,
            datamodule_class,
            parser_kwargs={sub: {"default_config_files": [base]} for sub in ("fit", "validate", "test")},
            # last.ckpt is a link to the newest checkpoint, not a second copy of it (GBs for a pretrained model)
            trainer_defaults={"callbacks": [ModelCheckpoint(save_last="link")]},
            save_config_kwargs={"overwrite": True},
            **kwargs,
        )

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer_config = self.config_init.get(str(self.subcommand), self.config_init).get("trainer", {})
        if trainer_config.get("logger") in (None, True):
            kwargs["logger"] = default_loggers(str(Path(trainer_config.get("default_root_dir") or "out")))
        if trainer_config.get("enable_checkpointing") is False:
            # Lightning refuses a ModelCheckpoint callback when checkpointing is off: leave ours out then.
            self.trainer_defaults.pop("callbacks", None)
        return super().instantiate_trainer(**kwargs)
