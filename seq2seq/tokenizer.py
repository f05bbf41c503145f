"""Tokenizers: SentencePiece subwords and characters behind one small interface.

Every tokenizer reserves PAD/UNK/BOS/EOS = 0/1/2/3, encodes text to ids without special tokens,
decodes ids back to text (special ids dropped), and round-trips through bytes so that a checkpoint
can carry it.
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import sentencepiece as spm

from seq2seq.config import TokenizerConfig
from seq2seq.files import atomic_write

PAD, UNK, BOS, EOS = 0, 1, 2, 3
SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")


class TokenizerError(ValueError):
    """A tokenizer that cannot be trained or loaded; the message says why."""


class Tokenizer(Protocol):
    """What the rest of the toolkit needs from a tokenizer."""

    kind: str

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def to_bytes(self) -> bytes: ...


class SentencePieceTokenizer:
    """Subwords from a SentencePiece model (unigram or BPE)."""

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes):
        self._proto = model_proto
        try:
            self._processor = spm.SentencePieceProcessor(model_proto=model_proto)
        except RuntimeError as error:
            raise TokenizerError(f"not a valid SentencePiece model ({error})") from None
        ids = [self._processor.pad_id(), self._processor.unk_id(),
               self._processor.bos_id(), self._processor.eos_id()]
        if ids != [PAD, UNK, BOS, EOS]:
            raise TokenizerError(f"SentencePiece model has special ids {ids}, not [0, 1, 2, 3]")

    @property
    def vocab_size(self) -> int:
        return self._processor.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self._processor.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``encode`` of many texts in one call, on every CPU core (SentencePiece's threads)."""
        return self._processor.encode(list(texts), num_threads=os.cpu_count() or 1)

    def encode_sampled(self, texts: Sequence[str], alpha: float, nbest: int = -1,
                       seed: int = 0) -> list[list[int]]:
        """One sampled segmentation per text (subword regularisation, Kudo 2018; BPE-dropout
        with rate ``alpha`` for a BPE model), a function of (texts, alpha, nbest, seed) only.

        SentencePiece samples with per-thread generators that start from its process-wide seed.
        A batch call with one thread samples on a fresh worker thread, so setting the seed just
        before makes the result reproducible (a test holds this); with several threads the texts
        would reach the generators in a racy order.
        """
        spm.set_random_generator_seed(seed % 2**32)
        return self._processor.encode(list(texts), enable_sampling=True, alpha=alpha,
                                      nbest_size=nbest, num_threads=1)

    def decode(self, ids: Sequence[int]) -> str:
        return self._processor.decode([int(i) for i in ids if i > EOS])

    def to_bytes(self) -> bytes:
        return self._proto


class CharTokenizer:
    """One id per character; characters outside the vocabulary map to UNK."""

    kind = "char"

    def __init__(self, chars: Sequence[str]):
        self.chars = list(chars)
        self._index = {char: i + len(SPECIALS) for i, char in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        return len(SPECIALS) + len(self.chars)

    def encode(self, text: str) -> list[int]:
        return [self._index.get(char, UNK) for char in text]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        """The smallest unsigned type that holds every id (uint8 for up to 256 ids)."""
        return np.uint8 if self.vocab_size <= 256 else np.uint16 if self.vocab_size <= 65536 \
            else np.uint32

    def encode_array(self, text: str) -> np.ndarray:
        """``encode`` as an array of :attr:`dtype`, vectorised (for corpora, chunk by chunk):
        code points are looked up among the vocabulary's, sorted."""
        points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        known = np.array(sorted([ord(c) for c in self.chars] + [0x110000]), dtype=np.uint32)
        ids = np.array([self._index.get(chr(p), UNK) if p < 0x110000 else UNK for p in known],
                       dtype=self.dtype)
        where = np.searchsorted(known, points)  # a sentinel above every code point ends `known`
        return np.where(known[where] == points, ids[where], UNK).astype(self.dtype)

    def decode(self, ids: Sequence[int]) -> str:
        first = len(SPECIALS)
        return "".join(self.chars[i - first] for i in (int(i) for i in ids) if i >= first)

    def to_bytes(self) -> bytes:
        return json.dumps({"chars": self.chars}, ensure_ascii=False).encode("utf-8")


def train_sentencepiece(texts: Iterable[str], config: TokenizerConfig) -> SentencePieceTokenizer:
    """Train a joint SentencePiece model in memory from an iterator of sentences. An error
    raised by the iterator (a corpus read as a stream: bad UTF-8 at some line) is raised as
    itself, not wrapped in SentencePiece's message."""
    model, failures = io.BytesIO(), []

    def guarded() -> Iterator[str]:
        try:
            yield from texts
        except Exception as error:  # re-raised below, once SentencePiece has returned
            failures.append(error)

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=guarded(),
            model_writer=model,
            vocab_size=config.vocab_size,
            model_type=config.model_type,
            character_coverage=config.character_coverage,
            input_sentence_size=config.max_sentences,
            shuffle_input_sentence=True,
            pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS,
            hard_vocab_limit=False,
            minloglevel=2,
        )
    except RuntimeError as error:
        if failures:
            raise failures[0] from None
        raise TokenizerError(f"SentencePiece training failed: {error}") from None
    if failures:
        raise failures[0]
    return SentencePieceTokenizer(model.getvalue())


def train_char(texts: Iterable[str], config: TokenizerConfig) -> CharTokenizer:
    """Characters seen at least ``min_count`` times, most frequent first (ties by code point)."""
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(text)
    chars = sorted((c for c, n in counts.items() if n >= config.min_count),
                   key=lambda c: (-counts[c], c))
    if not chars:
        raise TokenizerError("no characters to build a vocabulary from: the corpus is empty")
    return CharTokenizer(chars)


def train_tokenizer(texts: Iterable[str], config: TokenizerConfig) -> Tokenizer:
    """Train the tokenizer the recipe names."""
    if config.kind == "char":
        return train_char(texts, config)
    return train_sentencepiece(texts, config)


def tokenizer_from_bytes(kind: str, data: bytes) -> Tokenizer:
    """Rebuild a tokenizer from ``to_bytes()`` output."""
    if kind == "sentencepiece":
        return SentencePieceTokenizer(data)
    if kind == "char":
        try:
            return CharTokenizer(json.loads(data.decode("utf-8"))["chars"])
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            raise TokenizerError("not a valid character tokenizer") from None
    raise TokenizerError(f"unknown tokenizer kind {kind!r}")


def save_tokenizer(tokenizer: Tokenizer, directory: str | Path) -> Path:
    """Write the tokenizer to ``directory/tokenizer.<kind>`` and return the path."""
    path = Path(directory) / f"tokenizer.{tokenizer.kind}"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as handle:
        handle.write(tokenizer.to_bytes())
    return path


def load_tokenizer(directory: str | Path) -> Tokenizer | None:
    """The tokenizer saved in ``directory``, or None when there is none."""
    for kind in ("sentencepiece", "char"):
        path = Path(directory) / f"tokenizer.{kind}"
        if path.exists():
            try:
                return tokenizer_from_bytes(kind, path.read_bytes())
            except TokenizerError as error:
                raise TokenizerError(f"{path}: {error}") from None
    return None


def coverage(tokenizer: Tokenizer, texts: Iterable[str]) -> float:
    """Fraction of produced tokens that are not UNK."""
    total = unknown = 0
    for text in texts:
        ids = tokenizer.encode(text)
        total += len(ids)
        unknown += sum(1 for i in ids if i == UNK)
    return 1.0 - unknown / total if total else 1.0
