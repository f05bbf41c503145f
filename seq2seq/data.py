"""Corpora in, batches out: reading and validating text, encoding, token-budget batching.

:func:`read_parallel` / :func:`read_text` validate as they read (errors name file, line and fix);
:class:`TokenBatchSampler` makes length-bucketed, DDP-sharded batches under a token budget;
:class:`LMStream` cuts a token stream into consecutive BPTT chunks. Both resume exactly.
"""

from __future__ import annotations

import contextlib
import gzip
import itertools
import json
import logging
import math
import random
import string
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import numpy as np
import torch

from seq2seq.config import DataConfig, resolve_path
from seq2seq.tokenizer import BOS, EOS, PAD, SentencePieceTokenizer, Tokenizer

log = logging.getLogger(__name__)
T = TypeVar("T")

PACKAGED_TEXT = Path(__file__).parent / "corpora" / "tinyshakespeare.txt.gz"
SPLITS = ("train", "valid", "test")


class DataError(ValueError):
    """A corpus that cannot be used; the message names the file, the line and the fix."""


# --- reading -------------------------------------------------------------------------------------


def _open(path: Path) -> BinaryIO:
    """``path`` opened for binary reading (gunzipped on the fly for .gz)."""
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; check data.root and the data paths") from None
    except OSError as error:
        raise DataError(f"{path}: cannot be read ({error.strerror}); check the path") from None
    return gzip.GzipFile(fileobj=handle) if path.name.endswith(".gz") else handle  # type: ignore


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[BinaryIO]:
    """An open file whose gzip and read errors become one DataError naming it."""
    handle = _open(path)
    try:
        yield handle
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise DataError(f"{path}: not a valid gzip file ({error}); re-download it") from None
    finally:
        handle.close()


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """``items`` in lists of ``size`` (the last one shorter), read lazily."""
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def decode_utf8(raw: bytes, path: Path | str, line: int) -> str:
    """Strict UTF-8; an error names the file (or stream) and the line (``line`` = the line
    ``raw`` starts on). Every reader of text, corpora and ``translate`` input alike, uses it."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line += raw.count(b"\n", 0, error.start)
        raise DataError(f"{path}: line {line} is not valid UTF-8; re-encode the file as UTF-8 "
                        "(e.g. with iconv)") from None


def iter_lines(path: Path) -> Iterator[str]:
    """Lines of a plain or .gz UTF-8 file, read as a stream, each without its line ending
    ("\n" or "\r\n"); a byte-order mark at the start is dropped."""
    path = Path(path)
    with _reading(path) as handle:
        for number, raw in enumerate(handle, 1):
            raw = raw[:-1] if raw.endswith(b"\n") else raw
            line = decode_utf8(raw[:-1] if raw.endswith(b"\r") else raw, path, number)
            yield line.removeprefix("\ufeff") if number == 1 else line


def read_lines(path: Path) -> list[str]:
    """Lines of a plain or .gz UTF-8 file, each without its trailing newline."""
    return list(iter_lines(path))


def iter_text(path: Path, chunk_bytes: int = 1 << 22) -> Iterator[str]:
    """A plain or .gz UTF-8 file as text chunks of whole lines (about ``chunk_bytes`` each),
    newlines normalised to "\n", a leading byte-order mark dropped."""
    path, carry, line = Path(path), b"", 1
    with _reading(path) as handle:
        while True:
            block = handle.read(chunk_bytes)
            raw = carry + block
            if not raw:
                return
            cut = raw.rfind(b"\n") + 1 if block else len(raw)  # cut after a whole line
            if cut:
                text = decode_utf8(raw[:cut], path, line)
                text = text.removeprefix("\ufeff") if line == 1 else text
                line, raw = line + text.count("\n"), raw[cut:]
                yield text.replace("\r\n", "\n") if "\r" in text else text
            if not block:
                return
            carry = raw


def _split_paths(data: DataConfig, split: str) -> list[Path]:
    """The files of ``split``: source and target for "lines" ("{lang}" replaced), else one."""
    template = getattr(data, split)
    per_language = data.format == "lines"
    if per_language != ("{lang}" in template):
        example = f"'{split}.{{lang}}.gz'" if per_language else f"'{split}.{data.format}'"
        reads = "one file per language" if per_language else "one file per split"
        raise DataError(f"data.{split} = {template!r} does not fit data.format = "
                        f"{data.format!r}, which reads {reads}; set it like {example}")
    langs = (data.source_lang, data.target_lang) if per_language else ("",)
    return [resolve_path(data.root, template.replace("{lang}", lang)) for lang in langs]


def _lines_pairs(src_path: Path, tgt_path: Path) -> Iterator[tuple[str, str]]:
    """Pairs of two line-aligned files, read side by side as streams."""
    sources, targets = iter_lines(src_path), iter_lines(tgt_path)
    count = 0
    for source in sources:
        target = next(targets, None)
        if target is None:
            _misaligned(src_path, count + 1 + sum(1 for _ in sources), tgt_path, count)
        count += 1
        yield source, target
    rest = sum(1 for _ in targets)
    if rest:
        _misaligned(src_path, count, tgt_path, count + rest)


def _misaligned(src_path: Path, src_count: int, tgt_path: Path, tgt_count: int) -> None:
    raise DataError(f"{src_path} has {src_count} lines but {tgt_path} has {tgt_count} lines; "
                    "parallel files must be line-aligned (fix or re-download them)")


def _fields(record: Any, src_field: str, tgt_field: str, where: str) -> tuple[str, str]:
    """(source, target) text of one record (a dict of fields)."""
    if not isinstance(record, dict):
        raise DataError(f"{where} is not an object of text fields; each record must be one "
                        "(nested under data.hf_translation_field when that is set)")
    for name in (src_field, tgt_field):
        if name not in record:
            raise DataError(f"{where} has no field {name!r} (it has {sorted(record)}); set "
                            "data.source_field / data.target_field")
        if not isinstance(record[name], str):
            raise DataError(f"{where}: field {name!r} is not a string; fix that record")
    return record[src_field], record[tgt_field]


def _file_pairs(path: Path, data: DataConfig) -> Iterator[tuple[str, str]]:
    """Pairs from one tsv (source<TAB>target) or jsonl (one object per line) file."""
    names = data.source_field or data.source_lang, data.target_field or data.target_lang
    for number, line in enumerate(iter_lines(path), 1):
        if data.format == "tsv":
            parts = line.split("\t")
            if len(parts) != 2:
                raise DataError(f"{path}: line {number} has {len(parts) - 1} tabs but needs "
                                "exactly one (source<TAB>target); fix or remove that line")
            yield parts[0], parts[1]
        elif line.strip():  # jsonl; blank lines are allowed
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}: line {number} is not valid JSON ({error.msg}); each "
                                "line must be one JSON object") from None
            if data.hf_translation_field and isinstance(record, dict):
                record = record.get(data.hf_translation_field)
            yield _fields(record, *names, f"{path}: line {number}")


def _load_hf(data: DataConfig, split_name: str) -> Any:
    """``datasets.load_dataset`` with every failure turned into one clear DataError."""
    import datasets  # slow to import: only when a recipe asks for it

    if not data.hf_dataset:
        raise DataError("data.format = 'hf' needs data.hf_dataset (a dataset name or a directory)")
    name = data.hf_dataset
    local = resolve_path(data.root, name)
    if local.is_dir():
        name = str(local)
    try:
        return datasets.load_dataset(name, data.hf_config or None, split=split_name)
    except Exception as error:  # hub unreachable, unknown name or split, unreadable files, ...
        detail = (str(error).strip().splitlines() or [""])[0][:200]
        raise DataError(f"could not load Hugging Face dataset {data.hf_dataset!r} split "
                        f"{split_name!r} ({type(error).__name__}: {detail}); download the data "
                        "and use data.format = 'lines' with data.root pointing at it") from error


def _hf_rows(dataset: Any, name: str | None, where: str,
             batch_size: int = 10_000) -> Iterator[Any]:
    """Column ``name`` (or whole rows when None) of a dataset, read in batches, never whole."""
    if name is not None and name not in dataset.column_names:
        raise DataError(f"{where} has no column {name!r} (it has {dataset.column_names}); set "
                        "data.source_field / data.target_field / data.hf_translation_field")
    for batch in dataset.iter(batch_size=batch_size):
        if name is not None:
            yield from batch[name]
        else:
            columns = list(batch)
            yield from (dict(zip(columns, values, strict=True))
                        for values in zip(*batch.values(), strict=True))


def _hf_pairs(data: DataConfig, split: str) -> tuple[Iterator[tuple[str, str]], str]:
    split_name = getattr(data, f"hf_{split}_split")
    dataset = _load_hf(data, split_name)
    where = f"dataset {data.hf_dataset!r} split {split_name!r}"
    rows = _hf_rows(dataset, data.hf_translation_field or None, where)
    names = data.source_field or data.source_lang, data.target_field or data.target_lang
    pairs = (_fields(row, *names, f"{where} row {i}") for i, row in enumerate(rows))
    return pairs, where


def source_key(data: DataConfig, split: str, seed: int = 1) -> dict[str, Any]:
    """What the pairs of ``split`` (or the LM text, for split "text") are built from, cheap to
    compute: each file's path, size and modification time (reading gigabytes to hash them on
    every start would cost what a cache saves), a Hugging Face dataset's own fingerprint, or
    the settings that generate the toy data."""
    settings = {k: getattr(data, k) for k in ("format", "source_lang", "target_lang",
                                               "source_field", "target_field",
                                               "hf_translation_field")}
    if data.format == "hf":
        split_name = data.hf_train_split if split == "text" else getattr(data, f"hf_{split}_split")
        dataset = _load_hf(data, split_name)
        return {**settings, "hf": data.hf_dataset, "config": data.hf_config,
                "split": split_name, "fingerprint": dataset._fingerprint}
    if data.format == "toy_reverse":
        return {**settings, "toy": [data.toy_vocab, data.toy_min_length, data.toy_max_length,
                                    data.toy_train_size, data.toy_valid_size], "seed": seed,
                "split": split}
    if split == "text":
        paths = [PACKAGED_TEXT if not data.text else resolve_path(data.root, data.text)]
    else:
        paths = _split_paths(data, split)
    files = []
    for path in paths:
        try:
            stat = path.stat()
        except OSError:
            raise DataError(f"{path}: file not found; check data.root and the data paths") from None
        files.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    return {**settings, "files": files}


def toy_reverse_pairs(data: DataConfig, split: str, seed: int = 1) -> list[tuple[str, str]]:
    """Synthetic (symbols, reversed symbols) pairs, a function of (seed, split) only.

    The symbols are ``data.toy_vocab`` distinct lowercase strings: a..z, then aa, ab, ...
    """
    letters = string.ascii_lowercase
    symbols = (list(letters) + [a + b for a in letters for b in letters])[: data.toy_vocab]
    if not (1 <= data.toy_vocab <= 702 and 1 <= data.toy_min_length <= data.toy_max_length):
        raise DataError("data.toy_vocab must be in 1..702 and 1 <= toy_min_length <= max_length")
    rng = random.Random(f"toy_reverse:{seed}:{split}")  # str seeds are stable across runs
    size = data.toy_train_size if split == "train" else data.toy_valid_size
    pairs = []
    for _ in range(size):
        tokens = rng.choices(symbols, k=rng.randint(data.toy_min_length, data.toy_max_length))
        pairs.append((" ".join(tokens), " ".join(reversed(tokens))))
    return pairs


def iter_parallel(data: DataConfig, split: str, seed: int = 1) -> Iterator[tuple[str, str]]:
    """(source, target) pairs of ``split``, validated as they stream; pairs with an empty side
    are dropped (and counted in the log once the stream ends)."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    pairs: Iterable[tuple[str, str]]
    if data.format in ("lines", "tsv", "jsonl"):
        paths = _split_paths(data, split)
        pairs = _lines_pairs(*paths) if len(paths) == 2 else _file_pairs(paths[0], data)
        where = " + ".join(map(str, paths))
    elif data.format == "hf":
        pairs, where = _hf_pairs(data, split)
    elif data.format == "toy_reverse":
        pairs, where = toy_reverse_pairs(data, split, seed), f"toy_reverse {split}"
    else:
        raise DataError(f"data.format = {data.format!r} cannot be read as a parallel corpus; use "
                        "lines, tsv, jsonl, hf or toy_reverse")
    if split == "valid" and data.valid_max_lines > 0:
        pairs = itertools.islice(pairs, data.valid_max_lines)
    total = kept = 0
    for source, target in pairs:
        total += 1
        if source.strip() and target.strip():
            kept += 1
            yield source, target
    if kept < total:
        log.info("%s: dropped %d of %d pairs with an empty side", where, total - kept, total)
    log.info("%s: %d %s pairs", where, kept, split)


def read_parallel(data: DataConfig, split: str, seed: int = 1) -> list[tuple[str, str]]:
    """(source, target) pairs of ``split``, validated; pairs with an empty side are dropped."""
    return list(iter_parallel(data, split, seed))


def iter_lm_text(data: DataConfig) -> Iterator[str]:
    """The LM corpus as a stream of text chunks: data.text, the packaged Tiny Shakespeare ("")
    or an hf train split (rows joined by newlines). An empty text is an error."""
    if data.format == "hf":
        split_name = data.hf_train_split
        where = f"dataset {data.hf_dataset!r} split {split_name!r}"
        rows = _hf_rows(_load_hf(data, split_name), data.source_field or "text", where)
        chunks: Iterator[str] = (("\n" if i else "") + str(row) for i, row in enumerate(rows))
    else:
        where = str(PACKAGED_TEXT if not data.text else resolve_path(data.root, data.text))
        chunks = iter_text(Path(where))
    blank = True
    for chunk in chunks:
        blank = blank and not chunk.strip()
        yield chunk
    if blank:
        raise DataError(f"{where}: the text is empty; point data.text at a non-empty UTF-8 file")


def read_text(data: DataConfig) -> str:
    """The LM corpus (see :func:`iter_lm_text`) as one string."""
    return "".join(iter_lm_text(data))


def split_text(text: str, valid_fraction: float) -> tuple[str, str]:
    """(train, valid): the last ``valid_fraction`` of the characters validates."""
    if not 0.0 <= valid_fraction < 1.0:
        raise DataError(f"data.valid_fraction = {valid_fraction} must be in [0, 1)")
    cut = len(text) - round(len(text) * valid_fraction)
    return text[:cut], text[cut:]


# --- encoding ------------------------------------------------------------------------------------


class Ragged:
    """Rows of token ids stored flat, as a corpus of millions of sentences needs: row i is
    ``ids[offsets[i]:offsets[i + 1]]`` (numpy arrays, possibly memory-mapped and shared by every
    rank), 4 bytes a subword where a list of Python ints costs about 36."""

    def __init__(self, ids: np.ndarray, offsets: np.ndarray):
        if len(offsets) < 1 or int(offsets[-1]) != len(ids):
            raise ValueError(f"offsets end at {int(offsets[-1]) if len(offsets) else None}, "
                             f"but there are {len(ids)} ids")
        self.ids, self.offsets = ids, offsets

    @classmethod
    def from_rows(cls, rows: Sequence[Sequence[int]], dtype: Any = np.int32) -> Ragged:
        lengths = np.fromiter((len(row) for row in rows), dtype=np.int64, count=len(rows))
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.fromiter(itertools.chain.from_iterable(rows), dtype=dtype,
                          count=int(offsets[-1]))
        return cls(ids, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> list[int]:
        return self.ids[self.offsets[i] : self.offsets[i + 1]].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        return (self[i] for i in range(len(self)))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Ragged) and np.array_equal(self.offsets, other.offsets) and \
            np.array_equal(self.ids, other.ids)

    @property
    def lengths(self) -> np.ndarray:
        """(N,) int32 row lengths, computed a million rows at a time (no int64 copy)."""
        lengths, step = np.empty(len(self), dtype=np.int32), 1 << 20
        for start in range(0, len(self), step):
            lengths[start : start + step] = np.diff(self.offsets[start : start + step + 1])
        return lengths

    def gather(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(rows ``indices`` concatenated, their lengths (len(indices),) int64)."""
        starts, ends = self.offsets[indices], self.offsets[np.asarray(indices) + 1]
        flat = np.concatenate([self.ids[s:e] for s, e in zip(starts, ends, strict=True)])
        return flat, ends - starts


@dataclass(eq=False)
class ParallelData:
    """Encoded pairs: ``src[i]`` = x + [EOS], ``tgt[i]`` = y (no BOS/EOS); ``kept[i]`` is the
    index of example i among the pairs that were encoded. Lists of rows are accepted (and
    stored flat) for small data made by hand."""

    src: Ragged
    tgt: Ragged
    kept: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.src, Ragged):
            self.src = Ragged.from_rows(self.src)
        if not isinstance(self.tgt, Ragged):
            self.tgt = Ragged.from_rows(self.tgt)
        self.kept = np.asarray(self.kept if self.kept is not None else [], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.src)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ParallelData) and self.src == other.src and \
            self.tgt == other.tgt and np.array_equal(self.kept, other.kept)

    @property
    def src_lengths(self) -> np.ndarray:
        return self.src.lengths

    @property
    def tgt_lengths(self) -> np.ndarray:
        return self.tgt.lengths


@dataclass
class EncodedChunk:
    """Pairs encoded by :func:`encode_chunk`: the kept rows, their indices and what was dropped."""

    src: list[list[int]]
    tgt: list[list[int]]
    kept: list[int]
    empty: int
    long: int


def encode_chunk(pairs: Sequence[tuple[str, str]], tokenizer: Tokenizer, max_length: int,
                 first: int = 0) -> EncodedChunk:
    """Tokenize a chunk of pairs in one batch call (multi-threaded for SentencePiece); drop
    pairs with an empty side or a side over ``max_length`` tokens (EOS not counted;
    ``max_length`` <= 0 means no limit). ``first`` is the index of the chunk's first pair."""
    ids = tokenizer.encode_batch([s for s, _ in pairs] + [t for _, t in pairs])
    n, chunk = len(pairs), EncodedChunk([], [], [], 0, 0)
    for i in range(n):
        x, y = ids[i], ids[n + i]
        if not x or not y:
            chunk.empty += 1
        elif max_length > 0 and (len(x) > max_length or len(y) > max_length):
            chunk.long += 1
        else:
            chunk.src.append([*x, EOS])
            chunk.tgt.append(y)
            chunk.kept.append(first + i)
    return chunk


def encode_pairs(pairs: Sequence[tuple[str, str]], tokenizer: Tokenizer,
                 max_length: int) -> ParallelData:
    """Tokenize pairs held in memory (validation, tests); see :func:`encode_chunk`."""
    chunk = encode_chunk(pairs, tokenizer, max_length)
    log.info("encoded %d of %d pairs: dropped %d with an empty side and %d longer than %d tokens",
             len(chunk.src), len(pairs), chunk.empty, chunk.long, max_length)
    return ParallelData(chunk.src, chunk.tgt, chunk.kept)


def sample_pairs(pairs: Sequence[tuple[str, str]], best: ParallelData,
                 tokenizer: SentencePieceTokenizer, alpha: float, nbest: int, seed: int,
                 max_length: int) -> ParallelData:
    """``best`` (what :func:`encode_pairs` made of ``pairs``) re-segmented by subword sampling,
    a function of ``seed``. The examples stay those ``best`` kept: a sampled side longer than
    ``max_length`` keeps its best segmentation, so every epoch trains on the same pairs."""
    kept = best.kept.tolist()
    sources = [pairs[i][0] for i in kept]
    targets = [pairs[i][1] for i in kept]
    ids = tokenizer.encode_sampled(sources + targets, alpha, nbest, seed)

    def fits(side: list[int]) -> bool:
        return bool(side) and (max_length <= 0 or len(side) <= max_length)

    n = len(best)
    src = [ids[i] + [EOS] if fits(ids[i]) else best.src[i] for i in range(n)]
    tgt = [ids[n + i] if fits(ids[n + i]) else best.tgt[i] for i in range(n)]
    return ParallelData(src, tgt, best.kept)


# --- batching ------------------------------------------------------------------------------------


class _Position:
    """Epoch and index of the next item to hand out; handing out the last item of an epoch
    moves to the next epoch, so a state saved after consuming an item resumes after it."""

    epoch = position = 0

    def _advance(self, index: int, count: int) -> None:
        if index + 1 == count:
            self.epoch, self.position = self.epoch + 1, 0
        else:
            self.position = index + 1

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class TokenBatchSampler(_Position):
    """Length-bucketed batches of example indices under a token budget, sharded across ranks.

    ``src_lengths`` are the lengths of ``ParallelData.src`` rows (EOS included) and
    ``tgt_lengths`` those of ``ParallelData.tgt``. A batch of B examples costs
    ``B * max(src_len) + B * (max(tgt_len) + 1)``: the cells of the padded ``src`` and ``tgt_in``
    tensors, padding included, and never exceeds ``max_tokens`` unless one example alone does
    (it then forms a batch of its own).

    Per (seed, epoch): examples are sorted by (target, source) length with a random tie-break,
    cut greedily into batches, and the batch count is made a multiple of ``world_size`` by
    halving the largest batches (nothing is dropped or repeated). Consecutive batches form groups
    of ``world_size`` (similar lengths); the group order is shuffled and rank r takes the r-th
    batch of each group. So every example appears exactly once per epoch across ranks and each
    rank gets ``len(self)`` batches. ``shuffle=False`` keeps length order (for validation).

    ``state_dict()`` holds the epoch and the position in it (see :class:`_Position`).
    """

    def __init__(self, src_lengths: Sequence[int], tgt_lengths: Sequence[int], max_tokens: int,
                 seed: int = 1, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        if len(src_lengths) != len(tgt_lengths):
            raise ValueError(f"{len(src_lengths)} source lengths but {len(tgt_lengths)} target")
        if max_tokens < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad max_tokens={max_tokens}, rank={rank}, world_size={world_size}")
        self.src_lengths = np.asarray(src_lengths, dtype=np.int32)  # 4 bytes an example
        self.tgt_lengths = np.asarray(tgt_lengths, dtype=np.int32)
        self.max_tokens, self.seed, self.shuffle = max_tokens, seed, shuffle
        self.rank, self.world_size = rank, world_size
        # per epoch: the example order and this rank's batches as [start, end) spans of it
        self._cache: tuple[int, np.ndarray, np.ndarray] | None = None
        len(self)  # fail early when the examples cannot be shared by the ranks

    def _order(self, generator: torch.Generator) -> np.ndarray:
        """Indices sorted by target length, then by source length ascending for even and
        descending for odd target lengths (so neighbours across a target length boundary have
        similar sources too); ties in random order when shuffling."""
        src, tgt = torch.from_numpy(self.src_lengths), torch.from_numpy(self.tgt_lengths)
        top = int(src.max())
        if (top + 1) * (int(tgt.max()) + 1) >= 2**31:  # int32 keys, unless they would overflow
            src, tgt = src.long(), tgt.long()
        key = tgt * (top + 1) + torch.where(tgt % 2 == 0, src, top - src)
        if not self.shuffle:
            return torch.sort(key, stable=True).indices.int().numpy()
        perm = torch.randperm(len(key), generator=generator)
        return perm[torch.sort(key[perm], stable=True).indices].int().numpy()  # int32: 4 bytes

    def _cut(self, order: np.ndarray) -> list[int]:
        """Greedy batches over ``order`` whose padded cost stays within the budget, as the
        boundaries of [start, end) spans of ``order``. (Plain Python over slices of a million
        examples: the running maxima make it sequential, and small lists keep memory flat.)"""
        bounds, size, max_src, max_tgt, budget = [0], 0, 0, 0, self.max_tokens
        for begin in range(0, len(order), 1 << 20):
            part = order[begin : begin + (1 << 20)]
            sources, targets = self.src_lengths[part].tolist(), self.tgt_lengths[part].tolist()
            for k, s in enumerate(sources, begin):
                t = targets[k - begin] + 1
                new_src = s if s > max_src else max_src
                new_tgt = t if t > max_tgt else max_tgt
                if size and (size + 1) * (new_src + new_tgt) > budget:
                    bounds.append(k)
                    size, new_src, new_tgt = 0, s, t
                size += 1
                max_src, max_tgt = new_src, new_tgt
        bounds.append(len(order))
        return bounds

    def _split_for_ranks(self, bounds: list[int]) -> None:
        """Halve the largest batches (in place) until every rank gets the same count."""
        while (len(bounds) - 1) % self.world_size:
            sizes = np.diff(bounds)
            j = int(np.argmax(sizes))  # the first of the largest
            if sizes[j] < 2:
                raise DataError(f"{len(self.src_lengths)} examples in {len(bounds) - 1} batches "
                                f"cannot be shared evenly by {self.world_size} ranks; use more "
                                "data or a larger train.max_tokens")
            bounds.insert(j + 1, bounds[j] + int(sizes[j]) // 2)

    def _rank_batches(self) -> tuple[np.ndarray, np.ndarray]:
        """(example order, this rank's batches as (K, 2) [start, end) spans of it, in iteration
        order) for the current epoch."""
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1], self._cache[2]
        if not len(self.src_lengths):
            return np.zeros(0, dtype=np.int64), np.zeros((0, 2), dtype=np.int64)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = self._order(generator)
        bounds = self._cut(order)
        self._split_for_ranks(bounds)
        # Consecutive batches form groups of world_size; rank r takes the r-th of each group.
        spans = np.stack([bounds[:-1], bounds[1:]], axis=1).reshape(-1, self.world_size, 2)
        if self.shuffle:
            spans = spans[torch.randperm(len(spans), generator=generator).numpy()]
        mine = np.ascontiguousarray(spans[:, self.rank])
        self._cache = (self.epoch, order, mine)
        return order, mine

    def set_lengths(self, src_lengths: Sequence[int], tgt_lengths: Sequence[int]) -> None:
        """New lengths for the same examples (a new segmentation), for the iterators made
        after this call; the epoch and the position in it stay."""
        if len(src_lengths) != len(self.src_lengths) or len(tgt_lengths) != len(self.tgt_lengths):
            raise ValueError("set_lengths needs one source and one target length per example")
        self.src_lengths = np.asarray(src_lengths, dtype=np.int32)
        self.tgt_lengths = np.asarray(tgt_lengths, dtype=np.int32)
        self._cache = None
        len(self)  # fail early when the examples cannot be shared by the ranks

    def __len__(self) -> int:
        return len(self._rank_batches()[1])

    def __iter__(self) -> Iterator[list[int]]:
        order, spans = self._rank_batches()
        for i in range(self.position, len(spans)):
            self._advance(i, len(spans))
            start, end = spans[i]
            yield order[start:end].tolist()


@dataclass
class Batch:
    """One padded training batch (PAD = 0); lengths count real tokens."""

    src: torch.Tensor  # (B, S) long: x + [EOS], then PAD
    src_lengths: torch.Tensor  # (B,) long, EOS included
    tgt_in: torch.Tensor  # (B, T) long: [BOS] + y, then PAD
    tgt_out: torch.Tensor  # (B, T) long: y + [EOS], then PAD
    num_src_tokens: int
    num_tgt_tokens: int

    def to(self, device: torch.device | str) -> Batch:
        move = {name: getattr(self, name).to(device, non_blocking=True)
                for name in ("src", "src_lengths", "tgt_in", "tgt_out")}
        return replace(self, **move)


def _padded(flat: np.ndarray, lengths: np.ndarray, width: int, first: int = 0) -> np.ndarray:
    """(B, width) int64: row i holds the next ``lengths[i]`` ids of ``flat`` from column
    ``first`` on, PAD elsewhere."""
    out = np.full((len(lengths), width), PAD, dtype=np.int64)
    columns = np.arange(width - first)
    out[:, first:][columns < lengths[:, None]] = flat  # row-major, like the flattened rows
    return out


def collate(data: ParallelData, indices: list[int]) -> Batch:
    """The padded batch of examples ``indices`` (in that order)."""
    if not indices:
        raise ValueError("collate needs at least one index")
    src_flat, src_lengths = data.src.gather(indices)
    tgt_flat, tgt_lengths = data.tgt.gather(indices)
    width = int(tgt_lengths.max()) + 1  # [BOS] + y and y + [EOS]
    tgt_in = _padded(tgt_flat, tgt_lengths, width, first=1)
    tgt_in[:, 0] = BOS
    tgt_out = _padded(tgt_flat, tgt_lengths, width)
    tgt_out[np.arange(len(indices)), tgt_lengths] = EOS
    src = _padded(src_flat, src_lengths, int(src_lengths.max()))
    return Batch(torch.from_numpy(src), torch.from_numpy(src_lengths), torch.from_numpy(tgt_in),
                 torch.from_numpy(tgt_out), num_src_tokens=int(src_lengths.sum()),
                 num_tgt_tokens=int(tgt_lengths.sum()) + len(indices))


def inference_batches(src_ids: list[list[int]], max_tokens: int,
                      max_sentences: int = 0) -> Iterator[list[int]]:
    """Index batches, longest sources first, with ``B * max(len) <= max_tokens`` (a longer
    single source gets its own batch) and, when ``max_sentences`` > 0, ``B <= max_sentences``.
    The caller restores the input order."""
    order = sorted(range(len(src_ids)), key=lambda i: -len(src_ids[i]))
    batch: list[int] = []
    width = 0
    for i in order:
        length = max(len(src_ids[i]), 1)
        full = 0 < max_sentences <= len(batch)
        if batch and (full or (len(batch) + 1) * max(width, length) > max_tokens):
            yield batch
            batch, width = [], 0
        batch.append(i)
        width = max(width, length)
    if batch:
        yield batch


class LMStream(_Position):
    """One token stream cut into ``batch_size`` contiguous rows, read in ``bptt`` chunks.

    Row r holds tokens [r*N, (r+1)*N) with N = (L-1) // batch_size; chunk k is columns
    [k*bptt, (k+1)*bptt) (the last chunk may be shorter), so a row's state carries from one chunk
    to the next. Targets are the inputs shifted by one token. ``state_dict()``: see _Position.
    """

    def __init__(self, ids: torch.Tensor | np.ndarray, batch_size: int, bptt: int):
        # the ids keep their (small) type, and a memory-mapped array stays mapped: chunks are
        # made int64 one at a time
        ids = torch.as_tensor(ids).reshape(-1)
        columns = (len(ids) - 1) // batch_size if batch_size > 0 else 0
        if columns < 1 or bptt < 1:
            raise DataError(f"a text of {len(ids)} tokens cannot fill {batch_size} rows with "
                            f"bptt {bptt}; use a longer text or smaller batch_size / bptt")
        self.inputs = ids[: batch_size * columns].view(batch_size, columns)  # (B, N)
        self.targets = ids[1 : batch_size * columns + 1].view(batch_size, columns)  # (B, N)
        self.bptt = bptt

    def __len__(self) -> int:
        return math.ceil(self.inputs.shape[1] / self.bptt)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (inputs (B, bptt), targets (B, bptt)) from the saved position on."""
        for k in range(self.position, len(self)):
            self._advance(k, len(self))
            cols = slice(k * self.bptt, (k + 1) * self.bptt)
            yield self.inputs[:, cols].long(), self.targets[:, cols].long()
