"""Tests for seq2seq.data: reading and validation, encoding, batching, sharding, LM chunks."""

from __future__ import annotations

import gzip
import json
import logging
import random
from pathlib import Path

import pytest
import torch

from seq2seq.config import DataConfig, TokenizerConfig
from seq2seq.data import (
    Batch,
    DataError,
    LMStream,
    ParallelData,
    TokenBatchSampler,
    collate,
    encode_pairs,
    inference_batches,
    read_lines,
    read_parallel,
    read_text,
    sample_pairs,
    split_text,
)
from seq2seq.tokenizer import BOS, EOS, PAD, train_char, train_sentencepiece

MULTI30K = Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"


def write(path: Path, lines: list[str], gz: bool = False) -> Path:
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def lines_config(root: Path, **kwargs) -> DataConfig:
    return DataConfig(root=str(root), train="train.{lang}", valid="val.{lang}",
                      test="test.{lang}", **kwargs)


# --- reading -------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_read_lines_plain_and_gz_strip_only_the_newline(tmp_path, gz):
    path = write(tmp_path / ("f.txt.gz" if gz else "f.txt"), ["a b ", "", "  ü\tc"], gz=gz)
    assert read_lines(path) == ["a b ", "", "  ü\tc"]


def test_read_lines_crlf_and_no_final_newline(tmp_path):
    path = tmp_path / "f.txt"
    path.write_bytes(b"one\r\ntwo\r\nthree")
    assert read_lines(path) == ["one", "two", "three"]


@pytest.mark.parametrize("gz", [False, True])
def test_invalid_utf8_names_file_and_line(tmp_path, gz):
    data = b"fine\nalso fine\nbad \xff byte\n"
    path = tmp_path / ("bad.de.gz" if gz else "bad.de")
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(DataError, match=r"bad\.de.*line 3.*UTF-8"):
        read_lines(path)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="nothere.txt.*not found"):
        read_lines(tmp_path / "nothere.txt")


def test_lines_format_resolves_root_and_lang(tmp_path):
    write(tmp_path / "train.de.gz", ["ein Hund", "eine Katze"], gz=True)
    write(tmp_path / "train.en.gz", ["a dog", "a cat"], gz=True)
    data = DataConfig(root=str(tmp_path), train="train.{lang}.gz")
    assert read_parallel(data, "train") == [("ein Hund", "a dog"), ("eine Katze", "a cat")]


def test_line_count_mismatch_names_both_files_and_counts(tmp_path):
    write(tmp_path / "train.de", ["a", "b", "c"])
    write(tmp_path / "train.en", ["a", "b"])
    with pytest.raises(DataError) as error:
        read_parallel(lines_config(tmp_path), "train")
    message = str(error.value)
    assert "train.de" in message and "train.en" in message
    assert "3 lines" in message and "2 lines" in message


def test_empty_pairs_dropped_and_logged(tmp_path, caplog):
    write(tmp_path / "train.de", ["a", "", "c", "  ", "e"])
    write(tmp_path / "train.en", ["A", "B", "", "D", "E"])
    with caplog.at_level(logging.INFO, logger="seq2seq.data"):
        pairs = read_parallel(lines_config(tmp_path), "train")
    assert pairs == [("a", "A"), ("e", "E")]
    assert "dropped 3 of 5" in caplog.text


def test_valid_max_lines_applies_to_valid_only(tmp_path):
    for split in ("train", "val"):
        write(tmp_path / f"{split}.de", [f"s{i}" for i in range(10)])
        write(tmp_path / f"{split}.en", [f"t{i}" for i in range(10)])
    data = lines_config(tmp_path, valid_max_lines=4)
    assert read_parallel(data, "valid") == [(f"s{i}", f"t{i}") for i in range(4)]
    assert len(read_parallel(data, "train")) == 10


def test_tsv_format_and_bad_line(tmp_path):
    write(tmp_path / "train.tsv", ["ein Hund\ta dog", "Katze\tcat"])
    data = DataConfig(root=str(tmp_path), format="tsv", train="train.tsv")
    assert read_parallel(data, "train") == [("ein Hund", "a dog"), ("Katze", "cat")]
    write(tmp_path / "train.tsv", ["ok\tfine", "no tab here", "x\ty"])
    with pytest.raises(DataError, match=r"train\.tsv: line 2 .*exactly one"):
        read_parallel(data, "train")
    write(tmp_path / "train.tsv", ["ok\tfine", "a\tb\tc"])
    with pytest.raises(DataError, match=r"train\.tsv: line 2"):
        read_parallel(data, "train")
    with pytest.raises(DataError, match="'train.tsv'"):  # a per-language template
        read_parallel(DataConfig(root=str(tmp_path), format="tsv"), "train")


def test_jsonl_format_default_custom_and_nested_fields(tmp_path):
    write(tmp_path / "a.jsonl", [json.dumps({"de": "Hund", "en": "dog"}), ""])
    data = DataConfig(root=str(tmp_path), format="jsonl", train="a.jsonl")
    assert read_parallel(data, "train") == [("Hund", "dog")]
    write(tmp_path / "b.jsonl", [json.dumps({"src": "x y", "tgt": "y x"})])
    data = DataConfig(root=str(tmp_path), format="jsonl", test="b.jsonl",
                      source_field="src", target_field="tgt")
    assert read_parallel(data, "test") == [("x y", "y x")]
    write(tmp_path / "c.jsonl", [json.dumps({"translation": {"de": "Ja", "en": "Yes"}})])
    data = DataConfig(root=str(tmp_path), format="jsonl", valid="c.jsonl",
                      hf_translation_field="translation")
    assert read_parallel(data, "valid") == [("Ja", "Yes")]


def test_jsonl_bad_json_and_missing_field_name_file_and_line(tmp_path):
    data = DataConfig(root=str(tmp_path), format="jsonl", train="t.jsonl")
    write(tmp_path / "t.jsonl", [json.dumps({"de": "a", "en": "b"}), "{not json"])
    with pytest.raises(DataError, match=r"t\.jsonl: line 2 is not valid JSON"):
        read_parallel(data, "train")
    write(tmp_path / "t.jsonl", [json.dumps({"de": "a", "en": "b"})] * 2 + ['{"de": "a"}'])
    with pytest.raises(DataError, match=r"t\.jsonl: line 3 has no field 'en'"):
        read_parallel(data, "train")


def test_hf_local_directory_with_nested_translation(tmp_path, hf_offline):
    folder = tmp_path / "wmt_like"
    folder.mkdir()
    for split, n in (("train", 5), ("validation", 3), ("test", 2)):
        rows = [{"translation": {"de": f"{split} de {i}", "en": f"{split} en {i}"}}
                for i in range(n)]
        write(folder / f"{split}.jsonl", [json.dumps(row) for row in rows])
    data = DataConfig(root=str(tmp_path), format="hf", hf_dataset="wmt_like",
                      hf_translation_field="translation")
    assert read_parallel(data, "valid") == [(f"validation de {i}", f"validation en {i}")
                                            for i in range(3)]
    assert len(read_parallel(data, "train")) == 5
    with pytest.raises(DataError, match="has no field 'fr'"):
        read_parallel(DataConfig(root=str(tmp_path), format="hf", hf_dataset="wmt_like",
                                 hf_translation_field="translation", target_lang="fr"), "test")
    flat = tmp_path / "flat"
    flat.mkdir()
    write(flat / "train.jsonl", [json.dumps({"id": 1, "src": "x y", "tgt": "y x"})])
    data = DataConfig(format="hf", hf_dataset=str(flat), source_field="src", target_field="tgt")
    assert read_parallel(data, "train") == [("x y", "y x")]


def test_hf_unknown_dataset_offline_is_one_clear_error(tmp_path, hf_offline):
    data = DataConfig(root=str(tmp_path), format="hf", hf_dataset="no-such-org/no-such-set-x1")
    with pytest.raises(DataError) as error:
        read_parallel(data, "train")
    message = str(error.value)
    assert "no-such-org/no-such-set-x1" in message
    assert "format = 'lines'" in message and "data.root" in message


def test_toy_reverse_is_deterministic_and_reversed():
    data = DataConfig(format="toy_reverse", toy_vocab=7, toy_min_length=2, toy_max_length=5,
                      toy_train_size=50, toy_valid_size=20)
    train = read_parallel(data, "train", seed=3)
    assert len(train) == 50 and train == read_parallel(data, "train", seed=3)
    assert train != read_parallel(data, "train", seed=4)
    valid, test = read_parallel(data, "valid", seed=3), read_parallel(data, "test", seed=3)
    assert len(valid) == len(test) == 20 and valid != test
    symbols = set()
    for src, tgt in train:
        tokens = src.split()
        assert tgt.split() == tokens[::-1] and 2 <= len(tokens) <= 5
        symbols.update(tokens)
    assert len(symbols) <= 7 and all(s.isalpha() and s.islower() for s in symbols)


def test_read_text_packaged_and_local_and_split(tmp_path):
    packaged = read_text(DataConfig(task="lm", format="text"))
    assert len(packaged) > 100_000 and "ROMEO" in packaged
    path = tmp_path / "corpus.txt.gz"
    path.write_bytes(gzip.compress(b"abcdefghij"))
    text = read_text(DataConfig(task="lm", format="text", root=str(tmp_path),
                                text="corpus.txt.gz"))
    assert text == "abcdefghij"
    assert split_text(text, 0.2) == ("abcdefgh", "ij")
    assert split_text(text, 0.0) == (text, "")


# --- encoding and batching -----------------------------------------------------------------------


@pytest.fixture
def char_tokenizer():
    return train_char(["abcdefghijklmnopqrstuvwxyz "], TokenizerConfig(kind="char"))


def test_encode_pairs_appends_eos_and_filters_with_counts(char_tokenizer, caplog):
    pairs = [("ab", "cde"), ("abcdef", "a"), ("a", "abcdefg"), ("??", "x"), ("abc", "abc")]
    with caplog.at_level(logging.INFO, logger="seq2seq.data"):
        data = encode_pairs(pairs + [("x", "")], char_tokenizer, max_length=5)
    enc = char_tokenizer.encode
    assert list(data.src) == [enc("ab") + [EOS], enc("??") + [EOS], enc("abc") + [EOS]]
    assert list(data.tgt) == [enc("cde"), enc("x"), enc("abc")]
    assert "encoded 3 of 6 pairs: dropped 1 with an empty side and 2 longer than 5" in caplog.text


def test_sample_pairs_keeps_the_examples_and_the_length_limit():
    sentences = ["ein Hund läuft über die Wiese", "a dog runs across the meadow",
                 "zwei Männer spielen Fußball", "two men are playing football"]
    tokenizer = train_sentencepiece(sentences * 20, TokenizerConfig(vocab_size=60))
    limit = max(len(tokenizer.encode(s)) for s in sentences)
    pairs = [(sentences[0], sentences[1]), (sentences[2], sentences[3])] * 10
    pairs.insert(3, (" ".join(sentences), "a dog"))  # over the limit: dropped, never sampled
    best = encode_pairs(pairs, tokenizer, limit)
    assert best.kept.tolist() == [i for i in range(len(pairs)) if i != 3]
    sampled = sample_pairs(pairs, best, tokenizer, 0.1, -1, seed=1, max_length=limit)
    free = sample_pairs(pairs, best, tokenizer, 0.1, -1, seed=1, max_length=0)
    assert sampled.kept.tolist() == best.kept.tolist()
    for i, k in enumerate(best.kept.tolist()):
        assert sampled.src[i][-1] == EOS and tokenizer.decode(free.src[i]) == pairs[k][0]
        assert tokenizer.decode(free.tgt[i]) == pairs[k][1]
    sides = [(sampled.src, free.src, best.src, limit + 1), (sampled.tgt, free.tgt, best.tgt, limit)]
    outcomes = set()
    for result, unlimited, fallback, most in sides:
        for got, drawn, kept in zip(result, unlimited, fallback, strict=True):
            fits = len(drawn) <= most
            assert got == (drawn if fits else kept)
            outcomes.add((fits, drawn == kept))
    assert (True, False) in outcomes and (False, False) in outcomes  # sampled, and fell back


def test_sampler_set_lengths_keeps_epoch_and_position():
    src, tgt = random_lengths(300)
    longer = ([n + i % 3 for i, n in enumerate(src)], [n + i % 2 for i, n in enumerate(tgt)])
    sampler = TokenBatchSampler(src, tgt, 250, seed=4)
    sampler.load_state_dict({"epoch": 2, "position": 0})
    iterator = iter(sampler)
    head = [next(iterator) for _ in range(3)]
    sampler.set_lengths(*longer)
    assert sampler.state_dict() == {"epoch": 2, "position": 3}
    fresh = TokenBatchSampler(*longer, 250, seed=4)
    fresh.load_state_dict({"epoch": 2, "position": 0})
    assert list(sampler) == list(fresh)[3:] and head != list(fresh)[:3]
    with pytest.raises(ValueError, match="one source and one target length per example"):
        sampler.set_lengths(src[:-1], tgt[:-1])


def random_lengths(n: int, seed: int = 0) -> tuple[list[int], list[int]]:
    rng = random.Random(seed)
    tgt = [rng.randint(1, 40) for _ in range(n)]
    src = [max(2, t + rng.randint(-5, 5)) for t in tgt]
    return src, tgt


def examples(src: list[int], tgt: list[int]) -> ParallelData:
    """Encoded examples of these lengths (``src`` counts its EOS)."""
    return ParallelData([[5] * (n - 1) + [EOS] for n in src], [[6] * n for n in tgt])


def collated(batch: list[int], data: ParallelData) -> tuple[int, int]:
    """(cells, real tokens) of the padded ``src`` and ``tgt_in`` tensors that training builds
    for ``batch``: what the token budget bounds."""
    padded = collate(data, batch)
    cells = padded.src.numel() + padded.tgt_in.numel()
    return cells, int((padded.src != PAD).sum() + (padded.tgt_in != PAD).sum())


def test_sampler_budget_by_hand():
    # each example: 3 source cells + 3 target cells (BOS + 2); batches of 2 fill 12 exactly
    src, tgt = [3] * 4, [2] * 4
    assert [len(b) for b in TokenBatchSampler(src, tgt, 12, shuffle=False)] == [2, 2]
    assert [len(b) for b in TokenBatchSampler(src, tgt, 11, shuffle=False)] == [1, 1, 1, 1]
    # a longer target widens its whole batch: [2, 2, 2, 5] as one batch would cost 4 * (3 + 6)
    tgt = [2, 2, 2, 5]
    assert [sorted(b) for b in TokenBatchSampler(src, tgt, 24, shuffle=False)] == [[0, 1, 2],
                                                                                   [3]]
    # one example over the budget still gets a batch of its own
    assert list(TokenBatchSampler([30], [30], 10, shuffle=False)) == [[0]]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_sampler_covers_each_example_once_across_ranks(world_size):
    src, tgt = random_lengths(701)
    data = examples(src, tgt)
    for epoch in (0, 1):
        seen, counts = [], set()
        for rank in range(world_size):
            sampler = TokenBatchSampler(src, tgt, 300, seed=5, rank=rank, world_size=world_size)
            sampler.load_state_dict({"epoch": epoch, "position": 0})
            batches = list(sampler)
            assert len(batches) == len(sampler)
            counts.add(len(batches))
            assert all(collated(b, data)[0] <= 300 for b in batches)
            seen += [i for b in batches for i in b]
        assert sorted(seen) == list(range(701))
        assert len(counts) == 1


def test_sampler_ranks_get_similar_lengths_per_step():
    src, tgt = random_lengths(900, seed=1)
    ranks = [list(TokenBatchSampler(src, tgt, 400, seed=2, rank=r, world_size=3)) for r in range(3)]
    for step in zip(*ranks, strict=True):
        longest = [max(tgt[i] for i in batch) for batch in step]
        assert max(longest) - min(longest) <= 3  # lengths range over 1..40


def test_sampler_low_padding_and_budget_used():
    src, tgt = random_lengths(3000, seed=2)
    batches = list(TokenBatchSampler(src, tgt, 2000, seed=1))
    data = examples(src, tgt)
    padded, real = (sum(parts) for parts in zip(*(collated(b, data) for b in batches),
                                                strict=True))
    assert 1 - real / padded < 0.1
    assert padded / len(batches) > 0.8 * 2000


def test_sampler_deterministic_per_seed_and_epoch():
    src, tgt = random_lengths(500)

    def epoch_batches(seed: int, epoch: int) -> list[list[int]]:
        sampler = TokenBatchSampler(src, tgt, 250, seed=seed)
        sampler.load_state_dict({"epoch": epoch, "position": 0})
        return list(sampler)

    assert epoch_batches(1, 0) == epoch_batches(1, 0)
    assert epoch_batches(1, 0) != epoch_batches(1, 1)
    assert epoch_batches(1, 0) != epoch_batches(2, 0)


def test_sampler_iteration_advances_epoch_and_unshuffled_is_sorted():
    src, tgt = random_lengths(300)
    sampler = TokenBatchSampler(src, tgt, 250, seed=1)
    first = list(sampler)
    assert sampler.state_dict() == {"epoch": 1, "position": 0}
    assert list(sampler) != first
    ordered = [i for b in TokenBatchSampler(src, tgt, 250, shuffle=False) for i in b]
    # by target length, then source length up for even and down for odd target lengths
    keys = [(tgt[i], src[i] if tgt[i] % 2 == 0 else -src[i]) for i in ordered]
    assert keys == sorted(keys)


def test_sampler_resume_continues_identically():
    src, tgt = random_lengths(600)
    sampler = TokenBatchSampler(src, tgt, 250, seed=7, rank=1, world_size=2)
    sampler.load_state_dict({"epoch": 3, "position": 0})
    iterator = iter(sampler)
    head = [next(iterator) for _ in range(4)]
    state = sampler.state_dict()
    assert state == {"epoch": 3, "position": 4}
    rest = list(iterator)
    resumed = TokenBatchSampler(src, tgt, 250, seed=7, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert list(resumed) == rest and len(head) + len(rest) == len(resumed)
    uninterrupted = TokenBatchSampler(src, tgt, 250, seed=7, rank=1, world_size=2)
    uninterrupted.load_state_dict({"epoch": 3, "position": 0})
    assert list(uninterrupted) == head + rest


def test_collate_shapes_and_contents():
    data = ParallelData(src=[[5, 6, EOS], [7, EOS], [8, 9, 10, 11, EOS]],
                        tgt=[[12], [13, 14, 15], [16, 17]])
    batch = collate(data, [2, 0, 1])
    assert isinstance(batch, Batch)
    assert batch.src.tolist() == [[8, 9, 10, 11, EOS], [5, 6, EOS, PAD, PAD], [7, EOS] + [PAD] * 3]
    assert batch.src_lengths.tolist() == [5, 3, 2]
    assert batch.tgt_in.tolist() == [[BOS, 16, 17, PAD], [BOS, 12, PAD, PAD], [BOS, 13, 14, 15]]
    assert batch.tgt_out.tolist() == [[16, 17, EOS, PAD], [12, EOS, PAD, PAD], [13, 14, 15, EOS]]
    assert batch.src.dtype == batch.tgt_in.dtype == batch.src_lengths.dtype == torch.long
    assert (batch.num_src_tokens, batch.num_tgt_tokens) == (10, 9)
    moved = batch.to("cpu")
    assert torch.equal(moved.tgt_out, batch.tgt_out) and moved.num_tgt_tokens == 9


def test_inference_batches_sorted_covering_and_within_budget():
    rng = random.Random(0)
    src_ids = [[4] * rng.randint(1, 30) for _ in range(200)]
    batches = list(inference_batches(src_ids, 120))
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(200))
    lengths = [len(src_ids[i]) for i in flat]
    assert lengths == sorted(lengths, reverse=True)
    assert all(len(b) * max(len(src_ids[i]) for i in b) <= 120 for b in batches)


def test_lm_stream_chunks_are_consecutive_rows():
    ids = torch.arange(103)
    stream = LMStream(ids, batch_size=4, bptt=7)  # rows of 25 columns: chunks 7, 7, 7, 4
    chunks = list(stream)
    assert len(chunks) == len(stream) == 4
    assert [x.shape for x, _ in chunks] == [(4, 7)] * 3 + [(4, 4)]
    inputs = torch.cat([x for x, _ in chunks], dim=1)
    targets = torch.cat([y for _, y in chunks], dim=1)
    assert torch.equal(inputs, torch.arange(100).view(4, 25))  # row r continues across chunks
    assert torch.equal(targets, inputs + 1)


def test_lm_stream_position_restore():
    stream = LMStream(torch.arange(1000), batch_size=3, bptt=10)
    iterator = iter(stream)
    next(iterator), next(iterator)
    state = stream.state_dict()
    rest = list(iterator)
    restored = LMStream(torch.arange(1000), batch_size=3, bptt=10)
    restored.load_state_dict(state)
    again = list(restored)
    assert len(again) == len(rest) == len(stream) - 2
    for (x, y), (x_ref, y_ref) in zip(again, rest, strict=True):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    assert restored.state_dict() == {"epoch": 1, "position": 0}
    with pytest.raises(DataError, match="cannot fill"):
        LMStream(torch.arange(3), batch_size=4, bptt=5)


@pytest.mark.skipif(not MULTI30K.exists(), reason="Multi30k not available")
def test_multi30k_train_loads():
    pairs = read_parallel(DataConfig(root=str(MULTI30K)), "train")
    assert len(pairs) == 29_000


def test_sampler_refuses_data_that_ranks_cannot_share():
    with pytest.raises(DataError, match="3 ranks"):
        TokenBatchSampler([2, 2], [1, 1], 100, world_size=3)
    assert len(TokenBatchSampler([2, 2, 2, 2], [1] * 4, 100, world_size=3)) == 1  # halved
