"""The memory-mapped corpus: exactly the batches of the list-based path it replaced, a cache that
is keyed, atomic and checked, streams that still name the bad file and line."""

from __future__ import annotations

import gzip
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from seq2seq import corpus
from seq2seq.config import TokenizerConfig, load_recipe
from seq2seq.data import DataError, iter_text, read_parallel, source_key
from seq2seq.distributed import DistContext
from seq2seq.tasks import make_task
from seq2seq.tokenizer import train_char, train_sentencepiece

from . import reference_data as old
from .conftest import RECIPES

MULTI30K = Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"
LINES = 3000
SHAKESPEARE = Path(__file__).resolve().parents[1] / "seq2seq" / "corpora" / "tinyshakespeare.txt.gz"


def ctx(rank: int = 0, world_size: int = 1) -> DistContext:
    return DistContext(rank, world_size, rank, torch.device("cpu"))


def corpus_lines(lang: str) -> list[str]:
    """LINES lines of one side: Multi30k's training file where it is available, else (a clean
    checkout in CI) pseudo-pairs from the packaged Tiny Shakespeare, a line and the line after it,
    so that the comparison with the old path always runs on thousands of real sentences."""
    if MULTI30K.exists():
        with gzip.open(MULTI30K / f"train.{lang}.gz", "rt", encoding="utf-8") as handle:
            return [next(handle).rstrip("\n") for _ in range(LINES)]
    with gzip.open(SHAKESPEARE, "rt", encoding="utf-8") as handle:
        text = [line.strip() for line in handle if line.strip()]
    offset = 0 if lang == "de" else 1
    return text[offset:offset + LINES]


@pytest.fixture(scope="module")
def multi30k_sized(tmp_path_factory) -> Path:
    """LINES training pairs (plus an empty and an overlong line) as plain files, and 50
    validation pairs (see :func:`corpus_lines`)."""
    root = tmp_path_factory.mktemp("m30k")
    for lang in ("de", "en"):
        lines = corpus_lines(lang)
        lines[10] = "" if lang == "de" else lines[10]
        lines[20] = " ".join([lines[20]] * 12)
        (root / f"train.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
        (root / f"val.{lang}").write_text("\n".join(lines[:50]) + "\n", encoding="utf-8")
    return root


def recipe_for(root: Path, *overrides: str):
    settings = [f"data.root={root}", "data.train=train.{lang}", "data.valid=val.{lang}",
                "tokenizer.vocab_size=1000", "train.max_tokens=1500", "data.max_length=60",
                *overrides]
    return load_recipe(RECIPES / "multi30k_de_en.toml", settings)


@pytest.fixture(scope="module")
def tokenizer(multi30k_sized):
    pairs = read_parallel(recipe_for(multi30k_sized).data, "train")
    return train_sentencepiece([s for pair in pairs for s in pair], TokenizerConfig(
        vocab_size=1000, max_sentences=10_000))


def old_batches(recipe, tokenizer, rank: int, world_size: int, steps: int):
    """What the list-based path (before issue 14) gave rank ``rank``: its micro-batches."""
    pairs = old.read_parallel(recipe.data, "train")
    encoded = old.encode_pairs(pairs, tokenizer, recipe.data.max_length)
    accumulate = recipe.train.accumulate
    samplers = [old.TokenBatchSampler(encoded.src_lengths, encoded.tgt_lengths,
                                      recipe.train.max_tokens, seed=recipe.train.seed,
                                      rank=rank * accumulate + j,
                                      world_size=world_size * accumulate)
                for j in range(accumulate)]
    iterators, out = [iter(s) for s in samplers], []
    for _ in range(steps):
        indices = [next(i, None) for i in iterators]
        if indices[0] is None:
            iterators = [iter(s) for s in samplers]
            indices = [next(i) for i in iterators]
        out.append([old.collate(encoded, i) for i in indices])
    return out


def assert_same_batches(got, expected) -> None:
    assert len(got) == len(expected)
    for step_got, step_expected in zip(got, expected, strict=True):
        for a, b in zip(step_got, step_expected, strict=True):
            for name in ("src", "src_lengths", "tgt_in", "tgt_out"):
                assert torch.equal(getattr(a, name), getattr(b, name)), name
            assert (a.num_src_tokens, a.num_tgt_tokens) == (b.num_src_tokens, b.num_tgt_tokens)


def test_the_cached_corpus_gives_exactly_the_old_batches_on_every_rank_and_resumes(
        multi30k_sized, tokenizer, tmp_path, monkeypatch):
    recipe = recipe_for(multi30k_sized, "train.accumulate=2")
    tasks = [make_task(recipe, ctx(r, 2)) for r in range(2)]
    for task in tasks:  # rank 0 builds, rank 1 maps what it built
        task.encode(tokenizer, tmp_path)
    assert len(list(tmp_path.iterdir())) == 1
    steps = 2 * tasks[0].steps_per_epoch + 3  # across two epoch ends
    for rank, task in enumerate(tasks):
        got = [task.next_step() for _ in range(steps)]
        assert_same_batches(got, old_batches(recipe, tokenizer, rank, 2, steps))
    assert isinstance(tasks[0].train.src.ids, np.memmap) and tasks[0].train.src.ids.dtype == "int32"
    # a second start maps the cache without encoding, and resumes mid-epoch exactly
    monkeypatch.setattr(corpus, "build_parallel", lambda *a, **k: pytest.fail("re-encoded"))
    first = make_task(recipe, ctx(1, 2))
    first.encode(tokenizer, tmp_path)
    head = [first.next_step() for _ in range(5)]
    resumed = make_task(recipe, ctx(1, 2))
    resumed.encode(tokenizer, tmp_path)
    resumed.load_state_dict(first.state_dict())
    assert_same_batches([resumed.next_step() for _ in range(4)],
                        old_batches(recipe, tokenizer, 1, 2, 9)[5:])
    assert len(head) == 5


def test_the_validation_pairs_and_output_vocabulary_equal_the_old_path(multi30k_sized, tokenizer,
                                                                        tmp_path):
    recipe = recipe_for(multi30k_sized, "model.target_vocabulary=true")
    task = make_task(recipe, ctx())
    task.encode(tokenizer, tmp_path)
    pairs = old.read_parallel(recipe.data, "train")
    encoded = old.encode_pairs(pairs, tokenizer, recipe.data.max_length)
    assert [list(r) for r in task.train.src] == encoded.src and task.train.kept.tolist() == \
        encoded.kept
    seen = sorted({i for row in encoded.tgt for i in row} | {3})
    assert task.output_vocabulary().tolist() == seen
    assert list(task.valid.tgt) == old.encode_pairs(old.read_parallel(recipe.data, "valid"),
                                                    tokenizer, recipe.data.max_length).tgt


# Encodes the training pairs into the cache and SIGKILLs itself while writing the third chunk.
DIE_IN_ENCODE = """
import os, signal, sys
from pathlib import Path
from seq2seq import corpus, data
from seq2seq.config import load_recipe
from seq2seq.distributed import DistContext
from seq2seq.tasks import make_task
from seq2seq.tokenizer import load_tokenizer
import torch

recipe = load_recipe(sys.argv[1], sys.argv[4:])
corpus.CHUNK_PAIRS = 500
real, calls = data.encode_chunk, []
def dying(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
corpus.encode_chunk = dying
task = make_task(recipe, DistContext(0, 1, 0, torch.device("cpu")))
task.encode(load_tokenizer(sys.argv[2]), Path(sys.argv[3]))
"""


def test_a_start_takes_the_output_vocabulary_from_the_manifest(multi30k_sized, tokenizer,
                                                               tmp_path):
    """The entry's manifest lists the target ids, counted while encoding; a later start reads
    them from it and not from the (possibly huge) target token array."""
    recipe = recipe_for(multi30k_sized, "model.target_vocabulary=true")
    first = make_task(recipe, ctx())
    first.encode(tokenizer, tmp_path)
    expected = first.output_vocabulary().tolist()
    (entry,) = tmp_path.glob("pairs-*")
    manifest = json.loads((entry / "manifest.json").read_text())
    assert sorted({*manifest["target_ids"], 3}) == expected
    ids = np.memmap(entry / "tgt.ids", dtype=manifest["dtype"], mode="r+")
    ids[:] = 5  # a start that scanned the targets would now find {3, 5}
    ids.flush()
    del ids
    restarted = make_task(recipe, ctx())
    restarted.encode(tokenizer, tmp_path)
    assert restarted.output_vocabulary().tolist() == expected


def test_a_killed_encode_leaves_nothing_a_restart_would_trust(multi30k_sized, tokenizer,
                                                               tmp_path):
    from seq2seq.tokenizer import save_tokenizer

    save_tokenizer(tokenizer, tmp_path / "tok")
    cache = tmp_path / "cache"
    settings = [f"data.root={multi30k_sized}", "data.train=train.{lang}",
                "data.valid=val.{lang}", "data.max_length=60"]
    done = subprocess.run([sys.executable, "-c", DIE_IN_ENCODE, str(RECIPES /
                          "multi30k_de_en.toml"), str(tmp_path / "tok"), str(cache), *settings],
                          stderr=subprocess.PIPE, text=True, timeout=120)
    assert done.returncode == -9, done.stderr
    [left] = list(cache.iterdir())
    assert left.name.startswith(".pairs-") and left.name.endswith(".tmp")  # only a temporary
    recipe = recipe_for(multi30k_sized)
    inputs = corpus.built_from(tokenizer, source_key(recipe.data, "train"), max_length=60)
    entry = corpus.entry_dir(cache, "pairs", inputs)
    assert corpus.read_manifest(entry, inputs) is None
    task = make_task(recipe, ctx())
    task.encode(tokenizer, cache)  # starts clean: the dead build's directory is removed
    assert [p.name for p in cache.iterdir()] == [entry.name]
    fresh = make_task(recipe, ctx())
    fresh.encode(tokenizer, tmp_path / "uninterrupted")
    assert task.train == fresh.train


def test_another_tokenizer_or_changed_files_get_their_own_entry_and_a_stale_one_is_rebuilt(
        multi30k_sized, tokenizer, tmp_path, caplog):
    root = tmp_path / "data"
    shutil.copytree(multi30k_sized, root)
    recipe = recipe_for(root)
    task = make_task(recipe, ctx())
    task.encode(tokenizer, tmp_path / "cache")
    other = train_sentencepiece(["ein Hund", "a dog"] * 50, TokenizerConfig(vocab_size=30))
    make_task(recipe, ctx()).encode(other, tmp_path / "cache")
    with open(root / "train.de", "a", encoding="utf-8") as handle, \
            open(root / "train.en", "a", encoding="utf-8") as target:
        handle.write("noch ein Satz\n")
        target.write("one more sentence\n")
    changed = make_task(recipe, ctx())
    changed.encode(tokenizer, tmp_path / "cache")
    assert len(changed.train) == len(task.train) + 1
    entries = sorted((tmp_path / "cache").iterdir())
    assert len(entries) == 3
    # an entry whose manifest says it was built from something else is rebuilt, not used
    inputs = corpus.built_from(tokenizer, source_key(recipe.data, "train"), max_length=60)
    entry = corpus.entry_dir(tmp_path / "cache", "pairs", inputs)
    manifest = json.loads((entry / "manifest.json").read_text())
    manifest["built_from"]["max_length"] = 7
    (entry / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="seq2seq.corpus"):
        again = make_task(recipe, ctx())
        again.encode(tokenizer, tmp_path / "cache")
    assert "built from other files or another tokenizer: rebuilding" in caplog.text
    assert again.train == changed.train


def test_a_disk_without_room_is_refused_before_writing(multi30k_sized, tokenizer, tmp_path,
                                                       monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1, 1, 1000))
    with pytest.raises(DataError, match=r"needs about .* MiB but only 0 MiB are free.*cache_dir"):
        make_task(recipe_for(multi30k_sized), ctx()).encode(tokenizer, tmp_path / "cache")
    assert not any((tmp_path / "cache").iterdir())


def test_bad_lines_are_named_while_streaming(tmp_path, tokenizer):
    (tmp_path / "train.de").write_bytes(b"gut\n" * 5000 + b"schlecht \xff\n")
    (tmp_path / "train.en").write_bytes(b"good\n" * 5001)
    (tmp_path / "val.de").write_text("a\n")
    (tmp_path / "val.en").write_text("b\n")
    task = make_task(recipe_for(tmp_path), ctx())
    with pytest.raises(DataError, match=r"train\.de: line 5001 is not valid UTF-8"):
        task.encode(tokenizer, tmp_path / "cache")
    assert not any((tmp_path / "cache").iterdir())
    (tmp_path / "train.de").write_bytes(b"gut\n" * 5002)
    with pytest.raises(DataError, match=r"train\.de has 5002 lines but .*train\.en has 5001"):
        make_task(recipe_for(tmp_path), ctx()).encode(tokenizer, tmp_path / "cache")


def test_text_chunks_keep_lines_whole_and_name_the_bad_line(tmp_path):
    path = tmp_path / "t.txt.gz"
    text = "".join(f"line {i} ünïcode\r\n" for i in range(300))
    path.write_bytes(gzip.compress(("\ufeff" + text + "last").encode()))
    chunks = list(iter_text(path, chunk_bytes=64))
    assert len(chunks) > 10 and "".join(chunks) == text.replace("\r\n", "\n") + "last"
    path = tmp_path / "t.txt"
    path.write_bytes(b"ok\n" * 100 + b"\xc3(\n")
    with pytest.raises(DataError, match="line 101 is not valid UTF-8"):
        list(iter_text(path, chunk_bytes=16))


def test_the_char_lm_maps_a_small_type_and_gives_the_old_stream(tmp_path):
    text = "".join(f"ROMEO {i}: ü, what light?\n" for i in range(400))
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    recipe = load_recipe(RECIPES / "tinyshakespeare_char.toml",
                         [f"data.text={tmp_path / 't.txt'}", "train.batch_size=4",
                          "train.bptt=16"])
    task = make_task(recipe, ctx())
    tokenizer = train_char(task.tokenizer_texts(), recipe.tokenizer)
    task.encode(tokenizer, tmp_path / "cache")
    train_text, valid_text = old.split_text(text, recipe.data.valid_fraction)
    assert tokenizer.chars == train_char([train_text], recipe.tokenizer).chars
    assert task.train_ids.dtype == np.uint8
    assert task.train_ids.tolist() == tokenizer.encode(train_text)
    assert task.valid_ids.tolist() == tokenizer.encode(valid_text)
    expected = old.LMStream(torch.tensor(tokenizer.encode(train_text)), 4, 16)
    for (x, y), (x_old, y_old) in zip(task.stream, expected, strict=True):
        assert torch.equal(x, x_old) and torch.equal(y, y_old)


def test_a_local_hf_dataset_goes_through_the_same_arrays(tmp_path, hf_offline, tokenizer):
    folder = tmp_path / "wmt_like"
    folder.mkdir()
    for split, n in (("train", 30), ("validation", 3), ("test", 2)):
        rows = [{"translation": {"de": f"ein Hund {i}", "en": f"a dog {i}"}} for i in range(n)]
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    recipe = load_recipe(RECIPES / "wmt16_en_de_gnmt.toml",
                         [f"data.root={tmp_path}", "data.hf_dataset=wmt_like",
                          "data.hf_config=", "train.max_tokens=200"])
    task = make_task(recipe, ctx())
    task.encode(tokenizer, tmp_path / "cache")
    pairs = old.read_parallel(recipe.data, "train")
    assert [list(r) for r in task.train.tgt] == old.encode_pairs(pairs, tokenizer, 50).tgt
    assert len(task.train) == 30 and (tmp_path / "cache").iterdir()


def test_bad_utf8_met_while_the_tokenizer_trains_is_one_error_line(tmp_path):
    """The stream reaches SentencePiece's trainer first; its error is not wrapped in theirs."""
    from typer.testing import CliRunner

    from seq2seq.cli import app

    (tmp_path / "train.de").write_bytes(b"gut\nschlecht \xff\n")
    (tmp_path / "train.en").write_bytes(b"good\nbad\n")
    (tmp_path / "val.de").write_text("a\n")
    (tmp_path / "val.en").write_text("b\n")
    result = CliRunner().invoke(app, ["train", str(RECIPES / "multi30k_de_en.toml"), "--out",
                                      str(tmp_path / "run"), "--set", f"data.root={tmp_path}",
                                      "--set", "data.train=train.{lang}", "--set",
                                      "data.valid=val.{lang}"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].endswith("train.de: line 2 is not valid UTF-8; re-encode the file as UTF-8 "
                              "(e.g. with iconv)") and lines[-1].startswith("error: ")
    assert "SentencePiece" not in result.stderr
