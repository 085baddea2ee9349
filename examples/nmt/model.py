"""The LightningModule: a small Marian encoder-decoder from a config, trained from scratch."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from torchmetrics.text import SacreBLEUScore

from examples.common.tokenizer import SPECIAL_TOKENS

PAD_ID, EOS_ID = SPECIAL_TOKENS.index("<pad>"), SPECIAL_TOKENS.index("</s>")


class TranslationModule(L.LightningModule):
    """Teacher-forced cross-entropy; validation/test log loss and SacreBLEU of greedy and beam-search output.

    BLEU decodes the first ``bleu_batches`` batches of each evaluation (generation is the slow part).
    """

    def __init__(
        self,
        vocab_size: int = 8000,
        max_len: int = 64,
        d_model: int = 128,
        layers: int = 2,
        heads: int = 4,
        ffn_dim: int = 256,
        dropout: float = 0.1,
        num_beams: int = 4,
        bleu_batches: int = 2,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        from transformers import MarianConfig, MarianMTModel

        config = MarianConfig(
            vocab_size=vocab_size, d_model=d_model, encoder_layers=layers, decoder_layers=layers,
            encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=ffn_dim,
            decoder_ffn_dim=ffn_dim, dropout=dropout, max_position_embeddings=max_len + 1,
            pad_token_id=PAD_ID, eos_token_id=EOS_ID, decoder_start_token_id=PAD_ID, forced_eos_token_id=EOS_ID,
        )  # fmt: skip
        self.model = MarianMTModel(config)
        self.bleu = torch.nn.ModuleDict(
            {
                stage: torch.nn.ModuleDict({"greedy": SacreBLEUScore(), "beam": SacreBLEUScore()})
                for stage in ("val", "test")
            }
        )

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate("val", batch, batch_idx)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate("test", batch, batch_idx)

    def _evaluate(self, stage: str, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss = self.model(**batch).loss
        self.log(f"{stage}_loss", loss, sync_dist=True, prog_bar=True)
        if batch_idx >= self.hparams.bleu_batches:
            return
        decode = self.trainer.datamodule.decode
        references = [[text] for text in decode(batch["labels"])]
        for mode, beams in (("greedy", 1), ("beam", self.hparams.num_beams)):
            generated = self.translate(batch["input_ids"], batch["attention_mask"], beams)
            self.bleu[stage][mode].update(decode(generated), references)
            self.log(f"{stage}_bleu_{mode}", self.bleu[stage][mode], prog_bar=mode == "beam")

    @torch.no_grad()
    def translate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_beams: int = 1
    ) -> torch.Tensor:
        strategy = self.trainer.strategy if self._trainer is not None else None
        # Under ZeRO-3 every process must run the same number of forward passes (each gathers the weights).
        synced = isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3 and strategy.world_size > 1
        return self.model.generate(
            input_ids=input_ids, attention_mask=attention_mask, num_beams=num_beams, do_sample=False,
            max_new_tokens=self.hparams.max_len, synced_gpus=synced,
        )  # fmt: skip
