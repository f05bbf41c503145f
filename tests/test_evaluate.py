"""Corpus metrics: BLEU, chrF and TER as computed by hand, and clear errors on misaligned input."""

from __future__ import annotations

import math

import pytest

from seq2seq.evaluate import perplexity, score_corpus

REFS = ["The cat sat on the mat.", "A dog barked at the postman twice.", "It is raining again."]
HYPS = ["The cat sat on a mat.", "The dog barked at a postman.", "It rains again."]


def test_references_against_themselves_are_perfect() -> None:
    scores = score_corpus(REFS, REFS)
    assert scores["bleu"] == pytest.approx(100.0)
    assert scores["chrf"] == pytest.approx(100.0)
    assert scores["ter"] == pytest.approx(0.0)
    assert scores["n"] == 3


# Lower-case words without punctuation: 13a tokenisation leaves them as they are.
CAT_HYPS = ["the cat sat on the mat today", "the cat sat on the"]
CAT_REFS = ["the cat sat on the mat", "the cat sat on the mat"]


def test_bleu_by_hand_with_clipping_brevity_and_corpus_counts() -> None:
    # sentence 1: 7 words, n-gram matches 6/7 ("the" clipped at 2), 5/6, 4/5, 3/4
    assert score_corpus(CAT_HYPS[:1], CAT_REFS[:1])["bleu"] == pytest.approx(
        100 * (6 / 7 * 5 / 6 * 4 / 5 * 3 / 4) ** 0.25)
    # sentence 2: every n-gram matches, but 5 words for 6: brevity penalty exp(1 - 6/5)
    assert score_corpus(CAT_HYPS[1:], CAT_REFS[1:])["bleu"] == pytest.approx(
        100 * math.exp(1 - 6 / 5))
    # the corpus sums the counts (11/12, 9/10, 7/8, 5/6; 12 words each side), not the scores
    assert score_corpus(CAT_HYPS, CAT_REFS)["bleu"] == pytest.approx(
        100 * (11 / 12 * 9 / 10 * 7 / 8 * 5 / 6) ** 0.25)


def test_ter_and_chrf_by_hand() -> None:
    # one substitution in six reference words, then one missing word in six: 2 edits / 12 words
    scores = score_corpus(["the cat sat on a mat", "the cat sat on the"], CAT_REFS)
    assert scores["ter"] == pytest.approx(100 * 2 / 12)
    # one word of 7 characters, the last differs: n-gram precision = recall = (7 - n) / (8 - n)
    # for n = 1..6, and chrF averages them
    chrf = score_corpus(["abcdefg"], ["abcdefh"])["chrf"]
    assert chrf == pytest.approx(100 * sum((7 - n) / (8 - n) for n in range(1, 7)) / 6)
    assert 0.0 < score_corpus(HYPS, REFS)["bleu"] < 100.0


def test_signatures_describe_the_settings() -> None:
    signatures = score_corpus(HYPS, REFS)["signatures"]
    assert set(signatures) == {"bleu", "chrf", "ter"}
    assert "nrefs:1" in signatures["bleu"] and "tok:13a" in signatures["bleu"]
    assert all("nrefs:1" in s for s in signatures.values())


def test_length_mismatch_names_both_counts() -> None:
    with pytest.raises(ValueError, match=r"2 hypotheses but 3 references"):
        score_corpus(HYPS[:2], REFS)
    with pytest.raises(ValueError, match="empty"):
        score_corpus([], [])


def test_perplexity() -> None:
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(7.0)) == pytest.approx(7.0)
    assert math.isfinite(perplexity(1e6))  # a diverged loss still prints
    assert math.isnan(perplexity(math.nan))
