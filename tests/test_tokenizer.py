"""Tokenizers: special ids, round trips through text and bytes, coverage, and errors."""

import io

import pytest
import sentencepiece as spm

from seq2seq.config import TokenizerConfig
from seq2seq.tokenizer import (
    BOS,
    EOS,
    PAD,
    UNK,
    TokenizerError,
    coverage,
    load_tokenizer,
    save_tokenizer,
    tokenizer_from_bytes,
    train_tokenizer,
)

CORPUS = ["ein Hund läuft über die Wiese", "a dog runs across the meadow",
          "zwei Männer spielen Fußball", "two men are playing football"] * 20


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_sentencepiece_round_trips_text_and_bytes(model_type):
    config = TokenizerConfig(kind="sentencepiece", model_type=model_type, vocab_size=60)
    tokenizer = train_tokenizer(iter(CORPUS), config)
    # the model itself, read by SentencePiece, puts the special pieces at our ids
    processor = spm.SentencePieceProcessor(model_proto=tokenizer.to_bytes())
    pieces = [processor.id_to_piece(i) for i in (PAD, UNK, BOS, EOS)]
    assert pieces == ["<pad>", "<unk>", "<s>", "</s>"]
    assert UNK in tokenizer.encode("ж")  # never seen in training
    for text in CORPUS[:4]:
        ids = tokenizer.encode(text)
        assert min(ids) > EOS
        assert tokenizer.decode(ids) == text
    again = tokenizer_from_bytes("sentencepiece", tokenizer.to_bytes())
    assert again.encode(CORPUS[0]) == tokenizer.encode(CORPUS[0])
    assert again.vocab_size == tokenizer.vocab_size


def test_a_sentencepiece_model_with_other_special_ids_is_refused():
    model = io.BytesIO()  # SentencePiece's own defaults: no PAD, UNK/BOS/EOS = 0/1/2
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=model,
                                   vocab_size=60, hard_vocab_limit=False, minloglevel=2)
    with pytest.raises(TokenizerError, match=r"special ids \[-1, 0, 1, 2\], not \[0, 1, 2, 3\]"):
        tokenizer_from_bytes("sentencepiece", model.getvalue())


def test_decode_drops_special_ids():
    tokenizer = train_tokenizer(iter(CORPUS), TokenizerConfig(kind="char"))
    ids = tokenizer.encode("dog")
    assert tokenizer.decode([BOS, *ids, EOS, PAD]) == "dog"


def test_char_tokenizer_min_count_unknowns_and_bytes():
    tokenizer = train_tokenizer(iter(["aaab", "ab"]), TokenizerConfig(kind="char", min_count=2))
    assert tokenizer.vocab_size == 4 + 2
    assert tokenizer.encode("abz") == [4, 5, UNK]
    assert tokenizer.decode(tokenizer.encode("ba")) == "ba"
    again = tokenizer_from_bytes("char", tokenizer.to_bytes())
    assert again.encode("abz") == tokenizer.encode("abz")
    assert coverage(tokenizer, ["abz"]) == pytest.approx(2 / 3)


def test_save_and_load_directory(tmp_path):
    assert load_tokenizer(tmp_path) is None
    tokenizer = train_tokenizer(iter(CORPUS), TokenizerConfig(kind="char"))
    save_tokenizer(tokenizer, tmp_path)
    assert load_tokenizer(tmp_path).encode("Hund") == tokenizer.encode("Hund")


def test_bad_bytes_and_empty_corpus_errors(tmp_path):
    with pytest.raises(TokenizerError, match="SentencePiece"):
        tokenizer_from_bytes("sentencepiece", b"not a model")
    with pytest.raises(TokenizerError, match="character tokenizer"):
        tokenizer_from_bytes("char", b"\xff")
    with pytest.raises(TokenizerError, match="empty"):
        train_tokenizer(iter([""]), TokenizerConfig(kind="char"))
    (tmp_path / "tokenizer.sentencepiece").write_bytes(b"junk")
    with pytest.raises(TokenizerError, match="tokenizer.sentencepiece"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize(("model_type", "alpha"), [("unigram", 0.1), ("unigram", 0.5),
                                                   ("bpe", 0.1), ("bpe", 0.5)])
def test_sampled_segmentations_round_trip_and_vary(model_type, alpha):
    config = TokenizerConfig(kind="sentencepiece", model_type=model_type, vocab_size=60)
    tokenizer = train_tokenizer(iter(CORPUS), config)
    sampled = tokenizer.encode_sampled(CORPUS, alpha, nbest=-1, seed=3)
    assert [tokenizer.decode(ids) for ids in sampled] == CORPUS
    assert all(min(ids) > EOS for ids in sampled)
    assert any(ids != tokenizer.encode(text) for ids, text in zip(sampled, CORPUS, strict=True))


def test_sampled_segmentation_is_a_function_of_the_seed_only():
    config = TokenizerConfig(kind="sentencepiece", vocab_size=60)
    tokenizer = train_tokenizer(iter(CORPUS), config)
    first = tokenizer.encode_sampled(CORPUS, 0.2, seed=5)
    other = tokenizer.encode_sampled(CORPUS, 0.2, seed=6)
    tokenizer.encode_sampled(CORPUS[:7], 0.2, seed=7)  # a different history changes nothing
    again = tokenizer_from_bytes("sentencepiece", tokenizer.to_bytes())  # nor another processor
    assert again.encode_sampled(CORPUS, 0.2, seed=5) == first
    assert tokenizer.encode_sampled(CORPUS, 0.2, seed=5 + 2**32) == first
    assert other != first
    assert tokenizer.encode_sampled(CORPUS, 0.2, nbest=4, seed=5) != first
