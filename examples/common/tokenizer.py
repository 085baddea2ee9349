"""Byte-level BPE tokenizers trained with ``tokenizers`` on the training split, cached on disk by content hash."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]  # ids 0..3 in this order


def _fingerprint(texts: Sequence[str], vocab_size: int) -> str:
    digest = hashlib.sha256(f"bytelevel-bpe v1 vocab={vocab_size}\n".encode())
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\x00")
    return digest.hexdigest()[:16]


def train_bpe(texts: Sequence[str], vocab_size: int, cache_folder: Path) -> Path:
    """Train (or reuse from ``cache_folder``) a byte-level BPE on ``texts``; returns the tokenizer JSON path.

    The file is written to a temporary name and renamed, so several processes may call this at once.
    """
    if vocab_size < 300:
        raise ValueError(
            f"vocab_size={vocab_size} is too small for byte-level BPE (256 bytes + specials); use >= 300."
        )
    path = Path(cache_folder) / f"bpe-{_fingerprint(texts, vocab_size)}.json"
    if path.exists():
        return path
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_batches(texts), trainer=trainer, length=len(texts))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tokenizer.save(str(tmp))
    os.replace(tmp, path)
    return path


def _batches(texts: Sequence[str], size: int = 1000) -> Iterable[list[str]]:
    for start in range(0, len(texts), size):
        yield list(texts[start : start + size])


def load_bpe(path: Path | str) -> Tokenizer:
    return Tokenizer.from_file(str(path))
