"""The LightningModule: a small Marian encoder-decoder from a config, trained from scratch; sacrebleu BLEU."""

from __future__ import annotations

import math
import os
import resource
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import DeepSpeedStrategy, Strategy
from lightning.pytorch.utilities import rank_zero_info

from examples.common.tokenizer import SPECIAL_TOKENS

PAD_ID, EOS_ID = SPECIAL_TOKENS.index("<pad>"), SPECIAL_TOKENS.index("</s>")
SCHEDULES = ("inverse_sqrt", "constant")
STAGE_SPLIT = {"val": "validation", "test": "test", "predict": "test"}


def corpus_bleu(hypotheses: list[str], references: list[str]) -> tuple[float, str]:
    """sacrebleu's corpus BLEU (0-100) with its standard settings (13a tokenization, exp smoothing, mixed case).

    Returns the score and sacrebleu's signature string, which names those settings and the version.
    """
    from sacrebleu.metrics import BLEU

    bleu = BLEU()
    score = bleu.corpus_score(hypotheses, [references])
    return score.score, str(bleu.get_signature())


def inverse_sqrt(step: int, warmup_steps: int) -> float:
    """The Transformer paper's schedule as a factor of the peak rate: linear warm-up, then 1/sqrt(step)."""
    step = max(step, 1)
    if warmup_steps <= 0:
        return 1.0
    return min(step / warmup_steps, math.sqrt(warmup_steps / step))


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (user + system), all threads together."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


_IMPORTED = time.time()


def wall_seconds() -> float:
    """Wall time since this process started (Linux), else since this module was imported."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start time after boot
        with open("/proc/uptime") as f:
            return float(f.read().split()[0]) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time() - _IMPORTED


def _all_gather_objects(value: Any) -> list[Any]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, value)
        return gathered
    return [value]


class TranslationModule(L.LightningModule):
    """Label-smoothed cross-entropy; validation/test log ``{stage}_loss`` (plain NLL per token) and
    ``{stage}_bleu``, sacrebleu's corpus BLEU of the whole split.

    BLEU: every process decodes its share of the split, the ``(index, hypothesis)`` pairs are gathered
    to every process (duplicates that the distributed sampler pads with are dropped by index), and each
    process scores the same complete list against the split's raw reference strings, so all ranks log
    the same number. Validation decodes with ``val_num_beams`` (greedy by default, for speed), test and
    predict with ``num_beams``.

    The learning rate is ``optimizer.lr`` times the schedule's factor (``schedule: inverse_sqrt``: linear
    warm-up over ``warmup_steps`` optimizer steps, then 1/sqrt(step)), set before every step on the
    optimizer's param groups, so it also holds under DeepSpeed and Lookahead. ``schedule: constant``
    leaves the rate alone (e.g. for an ``lr_scheduler:`` of your own).
    """

    def __init__(
        self,
        vocab_size: int = 8000,
        max_len: int = 64,
        d_model: int = 256,
        layers: int = 3,
        heads: int = 4,
        ffn_dim: int = 1024,
        dropout: float = 0.1,
        label_smoothing: float = 0.1,
        schedule: str = "inverse_sqrt",
        warmup_steps: int = 400,
        num_beams: int = 4,
        val_num_beams: int = 1,
        show_translations: int = 5,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if schedule not in SCHEDULES:
            raise ValueError(f"model.schedule={schedule!r} is unknown; use one of {SCHEDULES}.")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"model.label_smoothing={label_smoothing} must be in [0, 1), e.g. 0.1.")
        from transformers import MarianConfig, MarianMTModel

        config = MarianConfig(
            vocab_size=vocab_size, d_model=d_model, encoder_layers=layers, decoder_layers=layers,
            encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=ffn_dim,
            decoder_ffn_dim=ffn_dim, dropout=dropout, max_position_embeddings=max_len + 1,
            pad_token_id=PAD_ID, eos_token_id=EOS_ID, decoder_start_token_id=PAD_ID, forced_eos_token_id=EOS_ID,
            # Embeddings times sqrt(d_model), as in the Transformer paper and trained Marian models: without it
            # the sinusoidal positions (magnitude 1) drown the tokens' embeddings (std 0.02) and learning crawls.
            scale_embedding=True,
        )  # fmt: skip
        self.model = MarianMTModel(config)
        self._hypotheses: list[tuple[int, str]] = []

    # ------------------------------------------------------------------ training
    def _logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        from transformers.models.marian.modeling_marian import shift_tokens_right

        decoder_input_ids = shift_tokens_right(batch["labels"], PAD_ID, PAD_ID)
        out = self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            decoder_input_ids=decoder_input_ids,
        )  # fmt: skip
        return out.logits

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
        return F.cross_entropy(
            logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, label_smoothing=smoothing
        )

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.hparams.schedule == "constant":
            return
        # global_step counts finished optimizer steps; the coming step is number global_step + 1.
        factor = inverse_sqrt(self.trainer.global_step + 1, self.hparams.warmup_steps)
        for optimizer in self.trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = group.setdefault("initial_lr", group["lr"]) * factor

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(self._logits(batch), batch["labels"], self.hparams.label_smoothing)
        tokens = float((batch["labels"] != -100).sum())
        self.log("train_loss", loss, prog_bar=True, batch_size=1)
        self.log("train_tokens", tokens, on_step=True, on_epoch=False, batch_size=1)
        self.log(
            "lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False, batch_size=1
        )
        return loss

    # ------------------------------------------------------------------ evaluation
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate("val", batch, self.hparams.val_num_beams)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate("test", batch, self.hparams.num_beams)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> list[dict[str, Any]]:
        hypotheses = self._decode(batch, self.hparams.num_beams)
        self._hypotheses.extend(zip(batch["index"].tolist(), hypotheses))
        return [{"index": int(i), "translation": h} for i, h in zip(batch["index"], hypotheses)]

    def on_predict_epoch_start(self) -> None:
        self._hypotheses = []

    def on_predict_epoch_end(self) -> None:
        # predict cannot log metrics: the score goes to the console, the translations to a file
        self._score("predict")

    def _decode(self, batch: dict[str, torch.Tensor], beams: int) -> list[str]:
        generated = self.translate(batch["input_ids"], batch["attention_mask"], beams)
        return self.trainer.datamodule.decode(generated)

    def _evaluate(self, stage: str, batch: dict[str, torch.Tensor], beams: int) -> None:
        labels = batch["labels"]
        tokens = int((labels != -100).sum())
        loss = self._loss(self._logits(batch), labels, 0.0)
        self.log(f"{stage}_loss", loss, sync_dist=True, prog_bar=True, batch_size=tokens)
        if self.trainer.sanity_checking:
            return
        self._hypotheses.extend(zip(batch["index"].tolist(), self._decode(batch, beams)))

    def on_validation_epoch_start(self) -> None:
        self._hypotheses = []

    def on_test_epoch_start(self) -> None:
        self._hypotheses = []

    def on_validation_epoch_end(self) -> None:
        self._score("val")

    def on_test_epoch_end(self) -> None:
        self._score("test")

    def _score(self, stage: str) -> None:
        if self.trainer.sanity_checking:
            return
        merged: dict[int, str] = {}
        for part in _all_gather_objects(self._hypotheses):
            merged.update(part)  # the distributed sampler repeats a few batches to even out the ranks
        self._hypotheses = []
        split = STAGE_SPLIT[stage]
        references = self.trainer.datamodule.references(split)
        if sorted(merged) != list(range(len(references))):
            raise RuntimeError(
                f"{stage} decoded {len(merged)} of the {len(references)} {split} sentences; BLEU needs all of them "
                f"(limit_{stage}_batches must be 1.0; cap the split with "
                f"data.max_{'val' if stage == 'val' else 'test'}_pairs instead)."
            )
        hypotheses = [merged[i] for i in range(len(references))]
        score, signature = corpus_bleu(hypotheses, references)
        if stage != "predict":
            # Every rank holds the same hypotheses and computes the same score: no reduction needed.
            self.log(f"{stage}_bleu", score, prog_bar=True, sync_dist=False, rank_zero_only=False)
            # Time since the process started: a shared machine stretches wall time, CPU time is what it cost.
            self.log(f"{stage}_wall_min", wall_seconds() / 60, sync_dist=False)
            self.log(f"{stage}_cpu_min", cpu_seconds() / 60, sync_dist=False)
        beams = self.hparams.val_num_beams if stage == "val" else self.hparams.num_beams
        rank_zero_info(
            f"{stage} BLEU {score:.2f} on {len(references)} {split} sentences at step {self.trainer.global_step} "
            f"({'greedy' if beams == 1 else f'beam {beams}'}; sacrebleu {signature})"
        )
        if stage != "val":
            log_dir = self.trainer.log_dir  # a broadcast from rank 0: every rank must ask
            if self.trainer.is_global_zero:
                self._report(split, hypotheses, references, log_dir)

    def _report(self, split: str, hypotheses: list[str], references: list[str], log_dir: str | None) -> None:
        sources = self.trainer.datamodule.sources(split)
        if log_dir:
            path = Path(log_dir) / f"{split}_translations.tsv"
            with open(path, "w") as f:
                f.write("source\treference\ttranslation\n")
                f.writelines(
                    "\t".join(text.replace("\t", " ") for text in row) + "\n"
                    for row in zip(sources, references, hypotheses)
                )
            rank_zero_info(f"all {len(hypotheses)} {split} translations: {path}")
        n = self.hparams.show_translations
        if n <= 0:
            return
        # Evenly spread over the split (its order is the file's, and Tatoeba is sorted by length).
        picks = sorted({round(i * (len(sources) - 1) / max(n - 1, 1)) for i in range(n)})
        lines = [f"{n} {split} translations (source, reference, model):"]
        for i in picks:
            lines += [
                f"  source:      {sources[i]}",
                f"  reference:   {references[i]}",
                f"  translation: {hypotheses[i]}",
                "",
            ]
        rank_zero_info("\n".join(lines))

    def _attached_strategy(self) -> Strategy | None:
        """The Trainer's strategy, or None when this module is used on its own (no Trainer attached)."""
        try:
            return self.trainer.strategy
        except RuntimeError:  # Lightning's "not attached to a `Trainer`"
            return None

    @torch.no_grad()
    def translate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_beams: int = 1
    ) -> torch.Tensor:
        strategy = self._attached_strategy()
        # Under ZeRO-3 every process must run the same number of forward passes (each gathers the weights).
        synced = isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3 and strategy.world_size > 1
        # Translations are rarely much longer than their source: a bound keeps a looping output cheap.
        max_new = min(self.hparams.max_len, int(input_ids.shape[1] * 1.5) + 10)
        return self.model.generate(
            input_ids=input_ids, attention_mask=attention_mask, num_beams=num_beams, do_sample=False,
            max_new_tokens=max_new, synced_gpus=synced,
        )  # fmt: skip
