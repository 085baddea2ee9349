"""Parallel data through ``datasets.load_dataset`` (Hub or a local TSV), a joint BPE, batches by token count."""

from __future__ import annotations

import csv
import hashlib
from typing import Any

import datasets
import lightning as L
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, Dataset

from examples.common.paths import cache_dir, expand_data_path
from examples.common.tokenizer import EOS, PAD, load_bpe, train_bpe

Pair = tuple[str, str]
SPLITS = ("train", "validation", "test")


def _bucket(key: str) -> float:
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:4], "big") / 2**32


def split_pairs(pairs: list[Pair], valid_fraction: float, test_fraction: float) -> dict[str, list[Pair]]:
    """Cut one list of pairs into train/validation/test so that no sentence, on either side, is in two splits.

    Tatoeba repeats sentences: one English sentence with several German translations and the reverse.
    Splitting by one side alone would put the other side's repeats in training, and the model would have
    seen the test references. Pairs that share a sentence (on either side, transitively) form one group,
    and a hash of the group's smallest sentence picks its split: deterministic, independent of file order.
    """
    parent: dict[str, str] = {}

    def find(node: str) -> str:
        root = node
        while parent.setdefault(root, root) != root:
            root = parent[root]
        while parent[node] != root:  # path compression
            parent[node], node = root, parent[node]
        return root

    # Source and target sentences live in different name spaces (a German "Hallo!" is not an English one).
    for src, tgt in pairs:
        a, b = find("s\t" + src), find("t\t" + tgt)
        if a != b:
            parent[max(a, b)] = min(a, b)  # the root is the group's smallest sentence
    out: dict[str, list[Pair]] = {split: [] for split in SPLITS}
    for src, tgt in pairs:
        bucket = _bucket(find("s\t" + src))
        split = (
            "test"
            if bucket < test_fraction
            else "validation"
            if bucket < test_fraction + valid_fraction
            else "train"
        )
        out[split].append((src, tgt))
    return out


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

    A local ``data_file`` is a tab-separated file with ``columns`` (one split; :func:`split_pairs` cuts
    valid/test from it). A Hub dataset (``wmt16``/``de-en``, ``iwslt2017``/``iwslt2017-de-en``) has a
    ``translation`` column of ``{lang: text}`` dicts and its own splits.
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
        pairs = list(zip(loaded[source_lang], loaded[target_lang]))
        return split_pairs(pairs, valid_fraction, test_fraction)
    if not dataset_name:
        raise ValueError(
            "no data given: set data.dataset_name (a Hub dataset) or data.data_file (a local TSV)."
        )
    loaded = datasets.load_dataset(dataset_name, dataset_config)
    out = {}
    for split in SPLITS:
        if split not in loaded:
            raise ValueError(f"the dataset {dataset_name!r} has no {split!r} split; it has {sorted(loaded)}.")
        out[split] = [(row[source_lang], row[target_lang]) for row in loaded[split]["translation"]]
    return out


def token_batches(lengths: list[int], max_tokens: int, max_sentences: int | None = None) -> list[list[int]]:
    """Indices grouped by length into batches of at most ``max_tokens`` tokens counting padding.

    A batch of ``n`` examples padded to length ``L`` costs ``n * L``: sorting by length first keeps the
    padding small, so the number of real tokens per step is nearly constant (the Transformer paper's recipe).
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = max(lengths[i], lengths[current[-1]] if current else 0)
        full = max_sentences is not None and len(current) >= max_sentences
        if current and (longest * (len(current) + 1) > max_tokens or full):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


class Batches(Dataset):
    """A map-style dataset whose items are whole batches (lists of example indices).

    Lightning's DistributedSampler then shards batches, not sentences, across processes, and shuffles
    their order every epoch; the batches themselves stay fixed.
    """

    def __init__(self, batches: list[list[int]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> list[int]:
        return self.batches[index]


class TranslationDataModule(L.LightningDataModule):
    """Batches of ``input_ids``/``attention_mask``/``labels`` (labels padded with -100) and ``index``.

    ``index`` numbers the example in its split: evaluation gathers hypotheses by it and scores them against
    the split's raw reference strings (:meth:`references`), never against decoded label ids.
    """

    def __init__(
        self,
        dataset_name: str | None = "wmt16",
        dataset_config: str | None = "de-en",
        data_file: str | None = None,
        columns: tuple[str, ...] = ("en", "de"),
        source_lang: str = "de",
        target_lang: str = "en",
        valid_fraction: float = 0.01,
        test_fraction: float = 0.02,
        max_train_pairs: int | None = None,
        max_val_pairs: int | None = None,
        max_test_pairs: int | None = None,
        vocab_size: int = 8000,
        max_len: int = 64,
        max_tokens: int = 4096,
        max_sentences: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if max_tokens < max_len:
            raise ValueError(
                f"data.max_tokens={max_tokens} is smaller than data.max_len={max_len}: a batch could not hold one "
                f"sentence. Use max_tokens >= max_len (e.g. 4096)."
            )
        self.tokenizer: Tokenizer | None = None
        self.pairs: dict[str, list[Pair]] = {}
        self.sets: dict[str, list[tuple[list[int], list[int]]]] = {}

    def _pairs(self) -> dict[str, list[Pair]]:
        if not self.pairs:  # prepare_data and setup run in the same process on local rank 0: load once
            self.pairs = self._load_pairs()
        return self.pairs

    def _load_pairs(self) -> dict[str, list[Pair]]:
        hp = self.hparams
        pairs = load_pairs(
            hp.dataset_name, hp.dataset_config, hp.data_file, list(hp.columns), hp.source_lang, hp.target_lang,
            hp.valid_fraction, hp.test_fraction,
        )  # fmt: skip
        generator = torch.Generator().manual_seed(hp.seed)
        limits = {"train": hp.max_train_pairs, "validation": hp.max_val_pairs, "test": hp.max_test_pairs}
        for split, limit in limits.items():
            if limit is not None and len(pairs[split]) > limit:
                # A seeded random subset, not the first lines: local files are often sorted (Tatoeba by
                # length), and a prefix would score only the shortest sentences.
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
        self._pairs()
        self.tokenizer = load_bpe(
            train_bpe(self._bpe_corpus(self.pairs["train"]), self.hparams.vocab_size, cache_dir())
        )
        self.sets = {split: self._encode(split_pairs, split) for split, split_pairs in self.pairs.items()}

    def _encode(self, pairs: list[Pair], split: str) -> list[tuple[list[int], list[int]]]:
        assert self.tokenizer is not None
        eos, limit = self.tokenizer.token_to_id(EOS), self.hparams.max_len - 1
        sources = self.tokenizer.encode_batch([src for src, _ in pairs])
        targets = self.tokenizer.encode_batch([tgt for _, tgt in pairs])
        encoded = [(s.ids + [eos], t.ids + [eos]) for s, t in zip(sources, targets)]
        if split == "train":
            # Training drops over-long pairs: a truncated target without its end would teach the model to
            # stop mid-sentence. Evaluation keeps every pair (source truncated; BLEU uses the raw reference).
            return [(s, t) for s, t in encoded if len(s) <= limit + 1 and len(t) <= limit + 1]
        return [(s[:limit] + [eos], t[:limit] + [eos]) for s, t in encoded]

    def references(self, split: str) -> list[str]:
        """The raw target sentences of ``split`` (``validation``/``test``), in ``index`` order."""
        return [tgt for _, tgt in self.pairs[split]]

    def sources(self, split: str) -> list[str]:
        return [src for src, _ in self.pairs[split]]

    def collate(self, examples: list[tuple[int, list[int], list[int]]]) -> dict[str, torch.Tensor]:
        assert self.tokenizer is not None
        pad = self.tokenizer.token_to_id(PAD)
        src_len = max(len(s) for _, s, _ in examples)
        tgt_len = max(len(t) for _, _, t in examples)
        input_ids = torch.full((len(examples), src_len), pad)
        labels = torch.full((len(examples), tgt_len), -100)
        for row, (_, src, tgt) in enumerate(examples):
            input_ids[row, : len(src)] = torch.tensor(src)
            labels[row, : len(tgt)] = torch.tensor(tgt)
        index = torch.tensor([i for i, _, _ in examples])
        return {
            "input_ids": input_ids,
            "attention_mask": (input_ids != pad).long(),
            "labels": labels,
            "index": index,
        }

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.sets or not self.sets[split]:
            raise RuntimeError(f"the {split} split is empty or setup() has not run; check the data settings.")
        examples = self.sets[split]
        lengths = [max(len(s), len(t)) for s, t in examples]
        batches = token_batches(lengths, self.hparams.max_tokens, self.hparams.max_sentences)

        def collate(items: list[list[int]]) -> dict[str, torch.Tensor]:
            (indices,) = items  # batch_size=1: one item is one whole batch
            return self.collate([(i, *examples[i]) for i in indices])

        return DataLoader(
            Batches(batches), batch_size=1, shuffle=shuffle, collate_fn=collate,
            num_workers=self.hparams.num_workers,
        )  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def decode(self, ids: Any) -> list[str]:
        """Token ids (labels with -100 or generated ids) back to text, special tokens dropped."""
        assert self.tokenizer is not None
        rows = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        texts = self.tokenizer.decode_batch(
            [[i for i in row if i >= 0] for row in rows], skip_special_tokens=True
        )
        return [text.strip() for text in texts]  # byte-level BPE keeps the space of a word-initial token
