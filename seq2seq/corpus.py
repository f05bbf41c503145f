"""Corpora encoded once into flat token arrays on disk and memory-mapped by every rank.

An entry is a directory ``CACHE/<kind>-<key>/``: for translation ``src.ids``, ``src.offsets``,
``tgt.ids``, ``tgt.offsets`` and ``kept`` (see :class:`~seq2seq.data.Ragged`), for the character
LM ``text.ids``; and ``manifest.json``, written last, saying what the entry was built from and
what it holds (for translation also the ids the target side uses, so that a start need not read
every target token to find the model's output vocabulary). The key hashes what it was built from:
the entry format, the tokenizer (kind and a hash of its bytes), the length limit, and
:func:`~seq2seq.data.source_key` (files by path, size and mtime).
So another tokenizer or changed files give another entry, which is built; an entry whose
manifest disagrees with its key is rebuilt.

An entry is built in a hidden temporary directory and renamed into place, so a reader sees a
whole entry or none; a build killed half way leaves only a temporary directory, which the next
build removes. Before writing, the free space is checked against an estimate of the size.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import struct
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from seq2seq.data import DataError, ParallelData, Ragged, chunked, encode_chunk
from seq2seq.tokenizer import CharTokenizer, Tokenizer

log = logging.getLogger(__name__)

FORMAT = 2
CHUNK_PAIRS = 16_384  # pairs per SentencePiece batch call: enough for its threads, little memory


def built_from(tokenizer: Tokenizer, source: dict[str, Any], **settings: Any) -> dict[str, Any]:
    """What an entry depends on: the tokenizer, the source (data.source_key) and settings."""
    digest = hashlib.sha256(tokenizer.to_bytes()).hexdigest()
    return {"format": FORMAT, "tokenizer": [tokenizer.kind, digest], "source": source, **settings}


def entry_dir(cache_dir: Path, kind: str, inputs: dict[str, Any]) -> Path:
    """The entry directory for ``inputs`` (see :func:`built_from`)."""
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]
    return Path(cache_dir) / f"{kind}-{key}"


def read_manifest(entry: Path, inputs: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of a complete entry built from ``inputs``, else None (absent or stale)."""
    try:
        manifest = json.loads((entry / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if manifest.get("built_from") != inputs:
        log.warning("%s was built from other files or another tokenizer: rebuilding it", entry)
        return None
    return manifest


def _array(path: Path, dtype: str, count: int) -> np.ndarray:
    """``count`` items of ``dtype`` mapped from ``path`` (copy-on-write: pages stay shared)."""
    if path.stat().st_size != count * np.dtype(dtype).itemsize:
        raise DataError(f"{path}: {path.stat().st_size} bytes, not the {count} {dtype} items its "
                        "manifest says; delete the directory to rebuild it")
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="c", shape=(count,))


def open_parallel(entry: Path, manifest: dict[str, Any]) -> ParallelData:
    """The pairs of an entry, memory-mapped."""
    n, dtype = manifest["pairs"], manifest["dtype"]
    sides = [Ragged(_array(entry / f"{side}.ids", dtype, manifest[f"{side}_tokens"]),
                    _array(entry / f"{side}.offsets", "int64", n + 1)) for side in ("src", "tgt")]
    return ParallelData(*sides, kept=_array(entry / "kept", "int64", n))


def open_text(entry: Path, manifest: dict[str, Any]) -> np.ndarray:
    """The token ids of an LM entry, memory-mapped."""
    return _array(entry / "text.ids", manifest["dtype"], manifest["tokens"])


# --- building ------------------------------------------------------------------------------------


def text_bytes(paths: Iterable[Path]) -> int:
    """About how many bytes of text ``paths`` hold (a .gz file's trailer says, modulo 4 GiB)."""
    total = 0
    for path in paths:
        size = path.stat().st_size
        if path.name.endswith(".gz") and size >= 18:
            with path.open("rb") as handle:
                handle.seek(-4, os.SEEK_END)
                stated = struct.unpack("<I", handle.read(4))[0]
            size = stated if stated >= size else 4 * size  # wrapped past 4 GiB: guess
        total += size
    return total


def _check_space(directory: Path, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if needed > free:
        raise DataError(f"{directory}: the encoded corpus needs about {needed / 2**20:,.0f} MiB "
                        f"but only {free / 2**20:,.0f} MiB are free; free some space or set "
                        "data.cache_dir to a larger disk")


def _remove_dead_builds(entry: Path) -> None:
    """Temporary directories of builds of ``entry`` on this host whose process is gone."""
    host = socket.gethostname()
    for stale in entry.parent.glob(f".{entry.name}.{host}.*.tmp"):
        pid = int(stale.name.rsplit(".", 2)[-2])
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, 0)
            continue  # still running
        log.info("removing %s, left by a build that did not finish", stale)
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def _building(entry: Path, needed: int) -> Iterator[Path]:
    """A temporary directory that becomes ``entry`` when the block succeeds, and is removed
    when it fails; a disk that fills up is a DataError."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_builds(entry)
    _check_space(entry.parent, needed)
    tmp = entry.parent / f".{entry.name}.{socket.gethostname()}.{os.getpid()}.tmp"
    tmp.mkdir()
    try:
        yield tmp
        if entry.exists():  # stale (its manifest disagreed), or another node's finished copy
            shutil.rmtree(entry)
        os.rename(tmp, entry)
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if error.errno == errno.ENOSPC:
            raise DataError(f"{entry.parent}: the disk filled up while writing the encoded "
                            "corpus; free some space or set data.cache_dir to a larger "
                            "disk") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_manifest(tmp: Path, manifest: dict[str, Any]) -> None:
    with open(tmp / "manifest.json", "w", encoding="utf-8") as handle:
        json.dump(manifest, handle)
        handle.flush()
        os.fsync(handle.fileno())


def _dtype(tokenizer: Tokenizer) -> str:
    """int32 for subwords; the smallest unsigned type that holds the ids for characters."""
    return np.dtype(tokenizer.dtype if isinstance(tokenizer, CharTokenizer) else np.int32).name


class _Side:
    """One side's ids and offsets, appended chunk by chunk to two files."""

    def __init__(self, tmp: Path, name: str, dtype: str, files: list[BinaryIO]):
        self.ids = open(tmp / f"{name}.ids", "wb")  # closed by build_parallel
        self.offsets = open(tmp / f"{name}.offsets", "wb")
        files += [self.ids, self.offsets]
        self.dtype, self.tokens = dtype, 0
        self.offsets.write(np.zeros(1, dtype=np.int64).tobytes())

    def append(self, rows: list[list[int]]) -> np.ndarray:
        """Write ``rows``; returns their ids, flat."""
        ragged = Ragged.from_rows(rows, dtype=self.dtype)
        self.ids.write(ragged.ids.tobytes())
        self.offsets.write((ragged.offsets[1:] + self.tokens).tobytes())
        self.tokens += len(ragged.ids)
        return ragged.ids


def build_parallel(entry: Path, inputs: dict[str, Any], pairs: Iterable[tuple[str, str]],
                   tokenizer: Tokenizer, max_length: int, needed: int) -> None:
    """Encode ``pairs`` (a stream) into the entry ``entry``, in batches of CHUNK_PAIRS."""
    started, dtype = time.perf_counter(), _dtype(tokenizer)
    with _building(entry, needed) as tmp:
        files: list[BinaryIO] = []
        try:
            src, tgt = _Side(tmp, "src", dtype, files), _Side(tmp, "tgt", dtype, files)
            kept = open(tmp / "kept", "wb")
            files.append(kept)
            total = count = empty = long = 0
            target_counts = np.zeros(tokenizer.vocab_size, dtype=np.int64)
            for chunk_pairs in chunked(pairs, CHUNK_PAIRS):
                chunk = encode_chunk(chunk_pairs, tokenizer, max_length, first=total)
                src.append(chunk.src)
                target_counts += np.bincount(tgt.append(chunk.tgt), minlength=len(target_counts))
                kept.write(np.asarray(chunk.kept, dtype=np.int64).tobytes())
                total, count = total + len(chunk_pairs), count + len(chunk.src)
                empty, long = empty + chunk.empty, long + chunk.long
            for handle in files:
                handle.flush()
                os.fsync(handle.fileno())
        finally:
            for handle in files:
                handle.close()
        _write_manifest(tmp, {"built_from": inputs, "dtype": dtype, "pairs": count,
                              "src_tokens": src.tokens, "tgt_tokens": tgt.tokens,
                              "target_ids": np.flatnonzero(target_counts).tolist(),
                              "read": total, "empty": empty, "long": long})
    log.info("encoded %d of %d pairs into %s in %.1f s: dropped %d with an empty side and %d "
             "longer than %d tokens", count, total, entry, time.perf_counter() - started, empty,
             long, max_length)


def build_text(entry: Path, inputs: dict[str, Any], chunks: Iterable[str],
               tokenizer: CharTokenizer, needed: int) -> None:
    """Encode a stream of text chunks with a character tokenizer into the entry ``entry``."""
    dtype, tokens = _dtype(tokenizer), 0
    with _building(entry, needed) as tmp:
        with open(tmp / "text.ids", "wb") as handle:
            for chunk in chunks:
                ids = tokenizer.encode_array(chunk)
                handle.write(ids.tobytes())
                tokens += len(ids)
            handle.flush()
            os.fsync(handle.fileno())
        _write_manifest(tmp, {"built_from": inputs, "dtype": dtype, "tokens": tokens})
    log.info("encoded %d characters into %s", tokens, entry)
