"""Language-model data: ``datasets.load_dataset`` from the Hub or local text files, BPE or pretrained tokenizer."""

from __future__ import annotations

from typing import Any

import datasets
import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from examples.common.paths import cache_dir, expand_data_path
from examples.common.tokenizer import EOS, load_bpe, train_bpe


def load_text_splits(
    dataset_name: str | None,
    dataset_config: str | None,
    data_files: dict[str, str] | None,
    splits: dict[str, str],
    text_column: str,
) -> dict[str, list[str]]:
    """Return ``{role: lines}`` for each ``role -> split name`` in ``splits``.

    With ``data_files`` the local ``text`` builder reads them (``{data}`` expands to the offline data folder);
    otherwise ``dataset_name``/``dataset_config`` are a Hub dataset (e.g. ``wikitext``/``wikitext-103-raw-v1``).
    """
    if data_files:
        files = {split: expand_data_path(path) for split, path in data_files.items()}
        loaded = datasets.load_dataset("text", data_files=files)
        text_column = "text"
    elif dataset_name:
        loaded = datasets.load_dataset(dataset_name, dataset_config)
    else:
        raise ValueError(
            "no data given: set data.dataset_name (a Hub dataset) or data.data_files (local text files)."
        )
    result = {}
    for role, split in splits.items():
        if split not in loaded:
            raise ValueError(f"split {split!r} (for {role}) not in the dataset; it has {sorted(loaded)}.")
        if text_column not in loaded[split].column_names:
            raise ValueError(
                f"column {text_column!r} not in split {split!r}; columns are {loaded[split].column_names}: set data.text_column."
            )
        result[role] = loaded[split][text_column]
    return result


class LMDataModule(L.LightningDataModule):
    """Token blocks of ``seq_len`` cut from the concatenated text of each split.

    Local wikitext-2 here has only ``valid.txt`` and ``test.txt``: the configs train on valid and validate on test.
    """

    def __init__(
        self,
        dataset_name: str | None = "wikitext",
        dataset_config: str | None = "wikitext-103-raw-v1",
        data_files: dict[str, str] | None = None,
        train_split: str = "train",
        val_split: str = "validation",
        text_column: str = "text",
        pretrained_tokenizer: str | None = None,
        gguf_file: str | None = None,
        vocab_size: int = 8000,
        seq_len: int = 128,
        batch_size: int = 16,
        max_train_blocks: int | None = None,
        max_val_blocks: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def _texts(self) -> dict[str, list[str]]:
        hp = self.hparams
        return load_text_splits(
            hp.dataset_name, hp.dataset_config, hp.data_files,
            {"train": hp.train_split, "val": hp.val_split}, hp.text_column,
        )  # fmt: skip

    def prepare_data(self) -> None:
        # One process per node loads the data and trains the tokenizer; the others read the caches in setup().
        texts = self._texts()
        if self.hparams.pretrained_tokenizer is None:
            train_bpe(texts["train"], self.hparams.vocab_size, cache_dir())

    def _encoder(self, train_texts: list[str]) -> Any:
        hp = self.hparams
        if hp.pretrained_tokenizer is not None:
            from transformers import AutoTokenizer

            from examples.lm.model import resolve_pretrained

            tokenizer = AutoTokenizer.from_pretrained(
                resolve_pretrained(hp.pretrained_tokenizer), gguf_file=hp.gguf_file
            )
            eos = tokenizer.eos_token_id
            return lambda lines: [ids + [eos] for ids in tokenizer(lines)["input_ids"]]
        tokenizer = load_bpe(train_bpe(train_texts, hp.vocab_size, cache_dir()))
        eos = tokenizer.token_to_id(EOS)
        return lambda lines: [enc.ids + [eos] for enc in tokenizer.encode_batch(lines)]

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        texts = self._texts()
        encode = self._encoder(texts["train"])
        self.train_set = self._blocks(encode, texts["train"], self.hparams.max_train_blocks)
        self.val_set = self._blocks(encode, texts["val"], self.hparams.max_val_blocks)

    def _blocks(self, encode: Any, lines: list[str], max_blocks: int | None) -> TensorDataset:
        seq_len = self.hparams.seq_len
        # wikitext has one paragraph per line and empty lines between: drop the empty ones, end each with EOS.
        lines = [line for line in lines if line.strip()]
        ids: list[int] = []
        for start in range(0, len(lines), 2000):
            for line_ids in encode(lines[start : start + 2000]):
                ids.extend(line_ids)
            if max_blocks is not None and len(ids) >= (max_blocks + 1) * seq_len:
                break
        n_blocks = len(ids) // seq_len
        if max_blocks is not None:
            n_blocks = min(n_blocks, max_blocks)
        if n_blocks == 0:
            raise ValueError(f"the split has {len(ids)} tokens, fewer than one block of seq_len={seq_len}.")
        return TensorDataset(torch.tensor(ids[: n_blocks * seq_len]).view(n_blocks, seq_len))

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        return DataLoader(
            self.train_set, batch_size=self.hparams.batch_size, shuffle=True, drop_last=True,
            num_workers=self.hparams.num_workers,
        )  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None
        return DataLoader(
            self.val_set, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers
        )
