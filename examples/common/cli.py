"""LightningCLI shared by the examples: a base YAML as default config, one folder per run, CSV + TensorBoard logs.

Run folders (``trainer.default_root_dir`` is ``ROOT``):

* ``fit`` starts ``ROOT/version_N`` (the next free N): ``metrics.csv``, ``config.yaml``, ``hparams.yaml``,
  TensorBoard events, ``checkpoints/``. Two runs of one config never share a folder.
* ``fit --ckpt_path last`` resumes the newest run under ``ROOT`` that has ``checkpoints/last.ckpt``, in its
  folder; ``--ckpt_path <file>`` resumes the run that file belongs to. ``metrics.csv`` is appended to.
* ``validate``/``test``/``predict --ckpt_path ...`` write into ``<run>/<subcommand>_N`` beside the training
  logs of the checkpoint's run, never over them (without ``--ckpt_path``: ``ROOT/<subcommand>_N``).
* After ``fit``, the test split is evaluated once on the weights the run asked for (Lookahead's slow weights
  with ``LookaheadCallback``); ``--test_after_fit false`` skips it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden

from examples.common.paths import REPO_ROOT

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    # Offline unless the user asked otherwise: these examples run on machines with no network.
    os.environ.setdefault(_var, "1")

# Third-party warnings that say nothing a user of these examples can act on.
QUIET_WARNINGS = (
    # DeepSpeed / torch internals on every ZeRO step (torch's own deprecations inside DeepSpeed's code)
    r".*torch\.cuda\.amp\..* is deprecated.*",
    r".*`torch\.distributed\._all_gather_base` is a private function.*",
    r".*`torch\.distributed\._reduce_scatter_base` is a private function.*",
    r".*TypedStorage is deprecated.*",
    # Lightning's advice for GPU data loading, meaningless for these small in-memory datasets on CPU
    r".*does not have many workers which may be a bottleneck.*",
    r".*The number of training batches .* is smaller than the logging interval.*",
    # evaluation under DDP/DeepSpeed: the NMT example scores each sentence once anyway (it gathers by index)
    r".*Using `DistributedSampler` with the dataloaders.*",
    # a resumed run continues in its own folder, so its checkpoint folder is not empty by design
    r".*Checkpoint directory .* exists and is not empty.*",
    # Lightning's own use of a torch API it has not caught up with (once per run, nothing to do for a user)
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
)

VERSION = re.compile(r"version_(\d+)$")


def _not_an_advert(record: logging.LogRecord) -> bool:
    return not str(record.getMessage()).startswith("💡 Tip:")  # Lightning's cloud-logging advert, every run


def quiet_third_party_warnings() -> None:
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_not_an_advert)


def _numbered(root: Path, prefix: str) -> list[tuple[int, Path]]:
    pattern = re.compile(rf"{re.escape(prefix)}_(\d+)$")
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := pattern.match(p.name))]
    return sorted(found)


def next_folder(root: Path, prefix: str) -> Path:
    """``root/<prefix>_N`` for the first N above every existing one."""
    taken = _numbered(root, prefix)
    return root / f"{prefix}_{taken[-1][0] + 1 if taken else 0}"


def latest_run(root: Path | str) -> Path | None:
    """The newest ``root/version_N`` (the highest N), or None."""
    runs = _numbered(Path(root), "version")
    return runs[-1][1] if runs else None


def find_last_checkpoint(root: Path) -> Path:
    for _, run in reversed(_numbered(root, "version")):
        last = run / "checkpoints" / "last.ckpt"
        if last.exists():
            return last
    raise FileNotFoundError(
        f"--ckpt_path last: no run under {root} has checkpoints/last.ckpt; start a run without --ckpt_path, or give "
        f"the checkpoint file, e.g. --ckpt_path {root}/version_0/checkpoints/last.ckpt."
    )


def run_of_checkpoint(ckpt: Path) -> Path | None:
    """The run folder a checkpoint file was written in (``<run>/checkpoints/<file>``), if it looks like one."""
    folder = ckpt.parent
    if folder.name == "checkpoints" and (folder.parent / "metrics.csv").exists():
        return folder.parent
    if ckpt.is_dir() and ckpt.parent.name == "checkpoints":  # a DeepSpeed checkpoint is a folder
        return ckpt.parent.parent
    return None


def plan_run(root: Path, subcommand: str, ckpt_path: str | None) -> tuple[Path, str | None, bool]:
    """``(folder for this run's logs, checkpoint path to load, append to that folder's metrics)``."""
    ckpt = None
    if ckpt_path == "last":
        ckpt = find_last_checkpoint(root)
    elif ckpt_path is not None and ckpt_path not in ("best", "hpc", "registry"):
        ckpt = Path(ckpt_path)
        if not ckpt.exists():
            raise FileNotFoundError(f"--ckpt_path {ckpt_path}: no such checkpoint file or folder.")
    resolved = str(ckpt) if ckpt is not None else ckpt_path
    run = run_of_checkpoint(ckpt) if ckpt is not None else None
    if subcommand == "fit":
        if run is not None:
            return run, resolved, True
        return next_folder(root, "version"), resolved, False
    return next_folder(run if run is not None else root, subcommand), resolved, False


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing ``metrics.csv`` is continued instead of deleted.

    Rows the earlier run logged after the step it is resumed from are dropped (they belong to a future
    that the resumed run replaces), so each step appears once.
    """

    resume_step: int | None = None

    @staticmethod
    def _after_checkpoint(row: dict[str, str], step: int) -> bool:
        # A training row at the checkpoint's step is the next batch's (it logs the steps done before it);
        # an evaluation row there (the test after fit) saw the checkpoint's weights and stays.
        if row.get("step") in (None, ""):
            return False
        at = int(row["step"])
        return at > step or (at == step and any(k.startswith("train") and row[k] != "" for k in row))

    def _check_log_dir_exists(self) -> None:
        import csv

        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            rows = list(reader)
            self.metrics_keys = sorted(reader.fieldnames or [])
        if self.resume_step is not None:
            rows = [row for row in rows if not self._after_checkpoint(row, self.resume_step)]
        with self._fs.open(self.metrics_file_path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)


class AppendingCSVLogger(CSVLogger):
    """A CSVLogger that continues the run folder's ``metrics.csv`` (for resumed runs)."""

    def __init__(self, *args: Any, resume_step: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            _AppendingWriter.resume_step = self._resume_step
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def _checkpoint_step(ckpt: str | None) -> int | None:
    if ckpt is None:
        return None
    match = re.search(r"step=(\d+)", Path(os.path.realpath(ckpt)).name)
    return int(match.group(1)) if match else None


def default_loggers(run: Path | str, append: bool = False, resume_step: int | None = None) -> list[Logger]:
    """CSV logs (always) and TensorBoard logs (when installed), both in the folder ``run``."""
    run = Path(run)
    # An int N names the folder version_N, as Lightning does, and the progress bar then shows "v_num: N".
    match = VERSION.match(run.name)
    version: int | str = int(match.group(1)) if match else run.name
    loggers: list[Logger] = []
    if append:
        loggers.append(AppendingCSVLogger(str(run.parent), name="", version=version, resume_step=resume_step))
    else:
        loggers.append(CSVLogger(str(run.parent), name="", version=version))
    if importlib.util.find_spec("tensorboard") is not None:
        loggers.append(TensorBoardLogger(str(run.parent), name="", version=version, default_hp_metric=False))
    return loggers


def _epoch_text(trainer: Trainer) -> str:
    if trainer.max_epochs is None or trainer.max_epochs < 0:  # max_steps bounds the run: say so
        return f"Epoch {trainer.current_epoch} (max_steps {trainer.max_steps})"
    return f"Epoch {trainer.current_epoch}/{trainer.max_epochs - 1}"


class StepsRichProgressBar(RichProgressBar):
    """Rich's bar, without "Epoch 0/-2" when the run is bounded by ``max_steps`` (``max_epochs`` is -1)."""

    def _get_train_description(self, current_epoch: int) -> str:
        text = _epoch_text(self.trainer)
        return f"{text:{len(self.validation_description)}}"


class StepsTQDMProgressBar(TQDMProgressBar):
    def on_train_epoch_start(self, trainer: Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(_epoch_text(trainer))


def progress_bar() -> RichProgressBar | TQDMProgressBar:
    # the bar Lightning would pick by itself (rich when installed), with the epoch text fixed
    return StepsRichProgressBar() if importlib.util.find_spec("rich") is not None else StepsTQDMProgressBar()


class ExampleCLI(LightningCLI):
    """``python -m examples.<task>.cli fit --config configs/<task>_<setup>.yaml [--config configs/<task>_lookahead.yaml]``.

    ``configs/<task>_base.yaml`` is always read first. Resume with ``--ckpt_path last``. See the module
    docstring for the run folders.
    """

    def __init__(self, model_class: Any, datamodule_class: Any, base_config: str, **kwargs: Any) -> None:
        quiet_third_party_warnings()
        base = str(REPO_ROOT / "configs" / base_config)
        self.run_dir: Path | None = None
        super().__init__(
            model_class,
            datamodule_class,
            parser_kwargs={
                sub: {"default_config_files": [base]} for sub in ("fit", "validate", "test", "predict")
            },
            # last.ckpt is a link to the newest checkpoint, not a second copy of it (GBs for a pretrained model)
            trainer_defaults={"callbacks": [ModelCheckpoint(save_last="link"), progress_bar()]},
            # a resumed run rewrites its folder's config.yaml (the run folder is its own, see plan_run)
            save_config_kwargs={"overwrite": True},
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument(
            "--test_after_fit", type=bool, default=True,
            help="after fit, evaluate the test split once (on the slow weights with LookaheadCallback)",
        )  # fmt: skip

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        subcommand = str(self.subcommand)
        config = self.config_init.get(subcommand, self.config_init)
        trainer_config = config.get("trainer", {})
        root = Path(trainer_config.get("default_root_dir") or "out")
        run, ckpt, append = plan_run(root, subcommand, config.get("ckpt_path"))
        if "ckpt_path" in config:
            config["ckpt_path"] = ckpt  # "last" resolved to the file, in this run's folder
        self.run_dir = run
        if trainer_config.get("logger") in (None, True):
            kwargs["logger"] = default_loggers(run, append=append, resume_step=_checkpoint_step(ckpt))
        # Lightning refuses a ModelCheckpoint / progress bar callback when that feature is off: leave ours out then.
        callbacks = self.trainer_defaults.get("callbacks", [])
        if trainer_config.get("enable_checkpointing") is False:
            callbacks = [cb for cb in callbacks if not isinstance(cb, ModelCheckpoint)]
        if trainer_config.get("enable_progress_bar") is False:
            callbacks = [cb for cb in callbacks if not isinstance(cb, (RichProgressBar, TQDMProgressBar))]
        self.trainer_defaults["callbacks"] = callbacks
        trainer = super().instantiate_trainer(**kwargs)
        config = getattr(trainer.strategy, "config", None)
        if isinstance(trainer.strategy, DeepSpeedStrategy) and isinstance(config, dict):
            # Lightning's DeepSpeed evaluation (test after fit, test/validate/predict --ckpt_path) reads this
            # key unconditionally; a user's JSON rarely has it. DeepSpeed's own default, so training is unchanged.
            config.setdefault("zero_allow_untested_optimizer", False)
        return trainer

    def before_fit(self) -> None:
        rank_zero_info(f"run folder: {self.run_dir}")

    def after_fit(self) -> None:
        config = self.config_init.get("fit", self.config_init)
        if not config.get("test_after_fit", True) or self.trainer.interrupted:
            return
        if not is_overridden("test_step", self.model) or not (
            self.datamodule is not None and is_overridden("test_dataloader", self.datamodule)
        ):
            return  # nothing to test (the LM example has no test split)
        # The weights fit ended with; LookaheadCallback swaps in the slow weights for the test (eval_weights).
        self.trainer.test(self.model, datamodule=self.datamodule)
