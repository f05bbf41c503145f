"""Corpus metrics agree with sacrebleu and fail clearly on misaligned input."""

from __future__ import annotations

import math

import pytest
import sacrebleu

from seq2seq.evaluate import perplexity, score_corpus

REFS = ["The cat sat on the mat.", "A dog barked at the postman twice.", "It is raining again."]
HYPS = ["The cat sat on a mat.", "The dog barked at a postman.", "It rains again."]


def test_references_against_themselves_are_perfect() -> None:
    scores = score_corpus(REFS, REFS)
    assert scores["bleu"] == pytest.approx(100.0)
    assert scores["chrf"] == pytest.approx(100.0)
    assert scores["ter"] == pytest.approx(0.0)
    assert scores["n"] == 3


def test_matches_sacrebleu_directly() -> None:
    scores = score_corpus(HYPS, REFS)
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS]).score)
    assert scores["chrf"] == pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS]).score)
    assert scores["ter"] == pytest.approx(sacrebleu.corpus_ter(HYPS, [REFS]).score)
    assert 0.0 < scores["bleu"] < 100.0


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
