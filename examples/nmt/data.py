"""Parallel data through ``datasets.load_dataset`` (Hub or a local TSV), a joint BPE, padded batches."""

from __future__ import annotations

import csv
import hashlib
from typing import Any

import datasets
import lightning as L
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader

from examples.common.paths import cache_dir, expand_data_path
from examples.common.tokenizer import EOS, PAD, load_bpe, train_bpe

Pair = tuple[str, str]


def split_of(source: str, valid_fraction: float, test_fraction: float) -> str:
    """Deterministic split by a hash of the source sentence, so repeated sources never cross splits."""
    bucket = int.from_bytes(hashlib.sha1(source.encode()).digest()[:4], "big") / 2**32
    if bucket < test_fraction:
        return "test"
    return "validation" if bucket < test_fraction + valid_fraction else "train"


def load_pairs(
    dataset_name: str | None,
    dataset_config: str | None,
    data_file: str | None,
    columns: list[str],
    source_lang: str,
    target_lang: str,
    valid_fraction: float,
    test_fraction: float,
) -> dict[str, list[Pair]]:
    """``{"train"|"validation"|"test": [(source, target), ...]}``.

    A local ``data_file`` is a tab-separated file with ``columns`` (one split; we cut valid/test from it by hash).
    A Hub dataset (``wmt16``/``de-en``, ``iwslt2017``/``iwslt2017-de-en``) has a ``translation`` column of
    ``{lang: text}`` dicts and its own splits.
    """
    for lang in (source_lang, target_lang):
        if data_file and lang not in columns:
            raise ValueError(
                f"language {lang!r} is not one of data.columns={columns}; set source_lang/target_lang."
            )
    if data_file:
        loaded = datasets.load_dataset(
            "csv", data_files=expand_data_path(data_file), delimiter="\t", column_names=columns,
            quoting=csv.QUOTE_NONE, keep_default_na=False, split="train",
        )  # fmt: skip
        pairs: dict[str, list[Pair]] = {"train": [], "validation": [], "test": []}
        for src, tgt in zip(loaded[source_lang], loaded[target_lang]):
            pairs[split_of(src, valid_fraction, test_fraction)].append((src, tgt))
        return pairs
    if not dataset_name:
        raise ValueError(
            "no data given: set data.dataset_name (a Hub dataset) or data.data_file (a local TSV)."
        )
    loaded = datasets.load_dataset(dataset_name, dataset_config)
    pairs = {}
    for split in ("train", "validation", "test"):
        if split not in loaded:
            raise ValueError(f"the dataset {dataset_name!r} has no {split!r} split; it has {sorted(loaded)}.")
        rows = loaded[split]["translation"]
        pairs[split] = [(row[source_lang], row[target_lang]) for row in rows]
    return pairs


class TranslationDataModule(L.LightningDataModule):
    """Batches of ``input_ids``/``attention_mask``/``labels`` (labels padded with -100)."""

    def __init__(
        self,
        dataset_name: str | None = "wmt16",
        dataset_config: str | None = "de-en",
        data_file: str | None = None,
        columns: tuple[str, ...] = ("en", "de"),
        source_lang: str = "de",
        target_lang: str = "en",
        valid_fraction: float = 0.01,
        test_fraction: float = 0.01,
        max_train_pairs: int | None = None,
        max_eval_pairs: int | None = 256,
        vocab_size: int = 8000,
        max_len: int = 64,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.tokenizer: Tokenizer | None = None
        self.sets: dict[str, list[tuple[list[int], list[int]]]] = {}

    def _pairs(self) -> dict[str, list[Pair]]:
        hp = self.hparams
        pairs = load_pairs(
            hp.dataset_name, hp.dataset_config, hp.data_file, list(hp.columns), hp.source_lang, hp.target_lang,
            hp.valid_fraction, hp.test_fraction,
        )  # fmt: skip
        generator = torch.Generator().manual_seed(hp.seed)
        limits = {"train": hp.max_train_pairs, "validation": hp.max_eval_pairs, "test": hp.max_eval_pairs}
        for split, limit in limits.items():
            if limit is not None and len(pairs[split]) > limit:
                # A seeded random subset: local files are often sorted (Tatoeba by length).
                keep = torch.randperm(len(pairs[split]), generator=generator)[:limit].sort().values
                pairs[split] = [pairs[split][i] for i in keep.tolist()]
        return pairs

    @staticmethod
    def _bpe_corpus(train: list[Pair]) -> list[str]:
        return [text for pair in train for text in pair]  # one joint vocabulary for both languages

    def prepare_data(self) -> None:
        train_bpe(self._bpe_corpus(self._pairs()["train"]), self.hparams.vocab_size, cache_dir())

    def setup(self, stage: str | None = None) -> None:
        if self.sets:
            return
        pairs = self._pairs()
        self.tokenizer = load_bpe(
            train_bpe(self._bpe_corpus(pairs["train"]), self.hparams.vocab_size, cache_dir())
        )
        self.sets = {split: self._encode(split_pairs) for split, split_pairs in pairs.items()}

    def _encode(self, pairs: list[Pair]) -> list[tuple[list[int], list[int]]]:
        assert self.tokenizer is not None
        eos, limit = self.tokenizer.token_to_id(EOS), self.hparams.max_len - 1
        sources = self.tokenizer.encode_batch([src for src, _ in pairs])
        targets = self.tokenizer.encode_batch([tgt for _, tgt in pairs])
        return [(s.ids[:limit] + [eos], t.ids[:limit] + [eos]) for s, t in zip(sources, targets)]

    def collate(self, examples: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        assert self.tokenizer is not None
        pad = self.tokenizer.token_to_id(PAD)
        src_len = max(len(s) for s, _ in examples)
        tgt_len = max(len(t) for _, t in examples)
        input_ids = torch.full((len(examples), src_len), pad)
        labels = torch.full((len(examples), tgt_len), -100)
        for row, (src, tgt) in enumerate(examples):
            input_ids[row, : len(src)] = torch.tensor(src)
            labels[row, : len(tgt)] = torch.tensor(tgt)
        return {"input_ids": input_ids, "attention_mask": (input_ids != pad).long(), "labels": labels}

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.sets or not self.sets[split]:
            raise RuntimeError(f"the {split} split is empty or setup() has not run; check the data settings.")
        return DataLoader(
            self.sets[split], batch_size=self.hparams.batch_size, shuffle=shuffle, drop_last=shuffle,
            collate_fn=self.collate, num_workers=self.hparams.num_workers,
        )  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def decode(self, ids: Any) -> list[str]:
        """Token ids (labels with -100 or generated ids) back to text, special tokens dropped."""
        assert self.tokenizer is not None
        rows = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return self.tokenizer.decode_batch(
            [[i for i in row if i >= 0] for row in rows], skip_special_tokens=True
        )
