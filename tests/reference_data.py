"""The list-based data path as it was before the memory-mapped corpus (issue 14): the functions
the tests compare the new path against, kept verbatim, as the reference it must reproduce batch
for batch. Not used by the package."""


from __future__ import annotations

import gzip
import itertools
import json
import logging
import math
import random
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from seq2seq.config import DataConfig, resolve_path
from seq2seq.tokenizer import BOS, EOS, PAD, Tokenizer

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")


class DataError(ValueError):
    """A corpus that cannot be used; the message names the file, the line and the fix."""


# --- reading -------------------------------------------------------------------------------------


def _read_text_file(path: Path) -> str:
    """The whole file (plain or .gz) as strict UTF-8; newlines normalised to "\\n"."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; check data.root and the data paths") from None
    except OSError as error:
        raise DataError(f"{path}: cannot be read ({error.strerror}); check the path") from None
    if path.name.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as error:
            raise DataError(f"{path}: not a valid gzip file ({error}); re-download it") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise DataError(f"{path}: line {line} is not valid UTF-8; re-encode the file as UTF-8 "
                        "(e.g. with iconv)") from None
    text = text.removeprefix("\ufeff")
    return text.replace("\r\n", "\n") if "\r" in text else text


def read_lines(path: Path) -> list[str]:
    """Lines of a plain or .gz UTF-8 file, each without its trailing newline."""
    lines = _read_text_file(Path(path)).split("\n")
    if lines[-1] == "":  # the newline that ends the last line
        lines.pop()
    return lines


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


def _lines_pairs(src_path: Path, tgt_path: Path) -> list[tuple[str, str]]:
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        raise DataError(f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)} lines; "
                        "parallel files must be line-aligned (fix or re-download them)")
    return list(zip(src, tgt, strict=True))


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


def _file_pairs(path: Path, data: DataConfig) -> list[tuple[str, str]]:
    """Pairs from one tsv (source<TAB>target) or jsonl (one object per line) file."""
    names = data.source_field or data.source_lang, data.target_field or data.target_lang
    pairs = []
    for number, line in enumerate(read_lines(path), 1):
        if data.format == "tsv":
            parts = line.split("\t")
            if len(parts) != 2:
                raise DataError(f"{path}: line {number} has {len(parts) - 1} tabs but needs "
                                "exactly one (source<TAB>target); fix or remove that line")
            pairs.append((parts[0], parts[1]))
        elif line.strip():  # jsonl; blank lines are allowed
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}: line {number} is not valid JSON ({error.msg}); each "
                                "line must be one JSON object") from None
            if data.hf_translation_field and isinstance(record, dict):
                record = record.get(data.hf_translation_field)
            pairs.append(_fields(record, *names, f"{path}: line {number}"))
    return pairs


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


def _hf_column(dataset: Any, name: str, where: str) -> list[Any]:
    if name not in dataset.column_names:
        raise DataError(f"{where} has no column {name!r} (it has {dataset.column_names}); set "
                        "data.source_field / data.target_field / data.hf_translation_field")
    return list(dataset[name])


def _hf_pairs(data: DataConfig, split: str) -> tuple[list[tuple[str, str]], str]:
    split_name = getattr(data, f"hf_{split}_split")
    dataset = _load_hf(data, split_name)
    where = f"dataset {data.hf_dataset!r} split {split_name!r}"
    nested = data.hf_translation_field
    rows = _hf_column(dataset, nested, where) if nested else dataset.to_list()
    names = data.source_field or data.source_lang, data.target_field or data.target_lang
    return [_fields(row, *names, f"{where} row {i}") for i, row in enumerate(rows)], where


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


def read_parallel(data: DataConfig, split: str, seed: int = 1) -> list[tuple[str, str]]:
    """(source, target) pairs of ``split``, validated; pairs with an empty side are dropped."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
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
        pairs = pairs[: data.valid_max_lines]
    kept = [(src, tgt) for src, tgt in pairs if src.strip() and tgt.strip()]
    if len(kept) < len(pairs):
        log.info("%s: dropped %d of %d pairs with an empty side", where, len(pairs) - len(kept),
                 len(pairs))
    log.info("%s: %d %s pairs", where, len(kept), split)
    return kept


def split_text(text: str, valid_fraction: float) -> tuple[str, str]:
    """(train, valid): the last ``valid_fraction`` of the characters validates."""
    if not 0.0 <= valid_fraction < 1.0:
        raise DataError(f"data.valid_fraction = {valid_fraction} must be in [0, 1)")
    cut = len(text) - round(len(text) * valid_fraction)
    return text[:cut], text[cut:]


# --- encoding ------------------------------------------------------------------------------------


@dataclass
class ParallelData:
    """Encoded pairs: ``src[i]`` = x + [EOS], ``tgt[i]`` = y (no BOS/EOS); ``kept[i]`` is the
    index of example i among the pairs that were encoded."""

    src: list[list[int]]
    tgt: list[list[int]]
    kept: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.src)

    @property
    def src_lengths(self) -> list[int]:
        return [len(ids) for ids in self.src]

    @property
    def tgt_lengths(self) -> list[int]:
        return [len(ids) for ids in self.tgt]


def encode_pairs(pairs: Sequence[tuple[str, str]], tokenizer: Tokenizer,
                 max_length: int) -> ParallelData:
    """Tokenize pairs; drop (and log) those with an empty side or a side over ``max_length``
    tokens (EOS not counted; ``max_length`` <= 0 means no limit)."""
    src, tgt, kept = [], [], []
    empty = long = 0
    for index, (source, target) in enumerate(pairs):
        x, y = tokenizer.encode(source), tokenizer.encode(target)
        if not x or not y:
            empty += 1
        elif max_length > 0 and (len(x) > max_length or len(y) > max_length):
            long += 1
        else:
            src.append(x + [EOS])
            tgt.append(list(y))
            kept.append(index)
    log.info("encoded %d of %d pairs: dropped %d with an empty side and %d longer than %d tokens",
             len(src), len(pairs), empty, long, max_length)
    return ParallelData(src, tgt, kept)


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
        self.src_lengths = [int(n) for n in src_lengths]
        self.tgt_lengths = [int(n) for n in tgt_lengths]
        self.max_tokens, self.seed, self.shuffle = max_tokens, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self._cache: tuple[int, list[list[int]]] | None = None
        len(self)  # fail early when the examples cannot be shared by the ranks

    def _order(self, generator: torch.Generator) -> list[int]:
        """Indices sorted by target length, then by source length ascending for even and
        descending for odd target lengths (so neighbours across a target length boundary have
        similar sources too); ties in random order when shuffling."""
        src, tgt = torch.tensor(self.src_lengths), torch.tensor(self.tgt_lengths)
        top = int(src.max())
        key = tgt * (top + 1) + torch.where(tgt % 2 == 0, src, top - src)
        if not self.shuffle:
            return torch.sort(key, stable=True).indices.tolist()
        perm = torch.randperm(len(key), generator=generator)
        return perm[torch.sort(key[perm], stable=True).indices].tolist()

    def _cut(self, order: list[int]) -> list[list[int]]:
        """Greedy batches over ``order`` whose padded cost stays within the budget."""
        batches: list[list[int]] = []
        batch: list[int] = []
        max_src = max_tgt = 0
        for i in order:
            s, t = self.src_lengths[i], self.tgt_lengths[i] + 1
            new_src, new_tgt = max(max_src, s), max(max_tgt, t)
            if batch and (len(batch) + 1) * (new_src + new_tgt) > self.max_tokens:
                batches.append(batch)
                batch, new_src, new_tgt = [], s, t
            batch.append(i)
            max_src, max_tgt = new_src, new_tgt
        if batch:
            batches.append(batch)
        return batches

    def _split_for_ranks(self, batches: list[list[int]]) -> None:
        """Halve the largest batches (in place) until every rank gets the same count."""
        while len(batches) % self.world_size:
            j = max(range(len(batches)), key=lambda k: len(batches[k]))
            if len(batches[j]) < 2:
                raise DataError(f"{len(self.src_lengths)} examples in {len(batches)} batches "
                                f"cannot be shared evenly by {self.world_size} ranks; use more "
                                "data or a larger train.max_tokens")
            half = len(batches[j]) // 2
            batches[j : j + 1] = [batches[j][:half], batches[j][half:]]

    def _rank_batches(self) -> list[list[int]]:
        """This rank's batches for the current epoch, in iteration order."""
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        if not self.src_lengths:
            return []
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        batches = self._cut(self._order(generator))
        self._split_for_ranks(batches)
        groups = [batches[i : i + self.world_size] for i in range(0, len(batches), self.world_size)]
        if self.shuffle:
            groups = [groups[g] for g in torch.randperm(len(groups), generator=generator).tolist()]
        mine = [group[self.rank] for group in groups]
        self._cache = (self.epoch, mine)
        return mine

    def set_lengths(self, src_lengths: Sequence[int], tgt_lengths: Sequence[int]) -> None:
        """New lengths for the same examples (a new segmentation), for the iterators made
        after this call; the epoch and the position in it stay."""
        if len(src_lengths) != len(self.src_lengths) or len(tgt_lengths) != len(self.tgt_lengths):
            raise ValueError("set_lengths needs one source and one target length per example")
        self.src_lengths = [int(n) for n in src_lengths]
        self.tgt_lengths = [int(n) for n in tgt_lengths]
        self._cache = None
        len(self)  # fail early when the examples cannot be shared by the ranks

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch; the current epoch keeps its position."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def __len__(self) -> int:
        return len(self._rank_batches())

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._rank_batches()
        for i in range(self.position, len(batches)):
            self._advance(i, len(batches))
            yield batches[i]


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


def _pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(padded (B, max_len) long, lengths (B,) long) from ragged rows."""
    lengths = torch.tensor([len(row) for row in rows], dtype=torch.long)
    width = int(lengths.max())
    padded = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.arange(width) < lengths[:, None]  # row-major, like the flattened rows
    # masked_scatter_ fills row-major; (much faster than padded[mask] = ... on CPU)
    padded.masked_scatter_(mask, torch.tensor(list(itertools.chain.from_iterable(rows))))
    return padded, lengths


def collate(data: ParallelData, indices: list[int]) -> Batch:
    """The padded batch of examples ``indices`` (in that order)."""
    if not indices:
        raise ValueError("collate needs at least one index")
    src, src_lengths = _pad([data.src[i] for i in indices])
    tgt_in, tgt_lengths = _pad([[BOS, *data.tgt[i]] for i in indices])
    tgt_out, _ = _pad([[*data.tgt[i], EOS] for i in indices])
    return Batch(src, src_lengths, tgt_in, tgt_out,
                 num_src_tokens=int(src_lengths.sum()), num_tgt_tokens=int(tgt_lengths.sum()))


class LMStream(_Position):
    """One token stream cut into ``batch_size`` contiguous rows, read in ``bptt`` chunks.

    Row r holds tokens [r*N, (r+1)*N) with N = (L-1) // batch_size; chunk k is columns
    [k*bptt, (k+1)*bptt) (the last chunk may be shorter), so a row's state carries from one chunk
    to the next. Targets are the inputs shifted by one token. ``state_dict()``: see _Position.
    """

    def __init__(self, ids: torch.Tensor, batch_size: int, bptt: int):
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
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
            yield self.inputs[:, cols], self.targets[:, cols]
