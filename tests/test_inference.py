"""Decoding batches side by side (``decode.workers``) and the row cap of a batch."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
import torch

from seq2seq import inference
from seq2seq.config import ConfigError, recipe_from_dict
from seq2seq.inference import encode_source, load_model, translate_ids

from .test_cli import assert_user_error, invoke, toy_valid


def hypotheses(results):
    return [[(h.tokens, h.log_prob, h.score) for h in hyps] for hyps in results]


def record_batches(monkeypatch) -> list[tuple[str, int]]:
    """(thread name, sentences) of every batch ``translate_ids`` decodes from now on."""
    seen: list[tuple[str, int]] = []
    decode_batch = inference._translate_batch

    def recording(model, src_ids, indices, *args, **kwargs):
        seen.append((threading.current_thread().name, len(indices)))
        return decode_batch(model, src_ids, indices, *args, **kwargs)

    monkeypatch.setattr(inference, "_translate_batch", recording)
    return seen


@pytest.mark.parametrize("quantize", [None, "int8"])
@pytest.mark.parametrize("strategy", ["beam", "greedy"])
def test_two_workers_decode_exactly_what_one_decodes(toy_run, monkeypatch, quantize, strategy):
    """Several batches on two worker threads: the same tokens and scores, in input order; the
    caller's thread count is left as it was, and the workers are gone."""
    loaded = load_model(toy_run / "best.pt", quantize=quantize)
    sources = [encode_source(loaded.tokenizer, s) for s, _ in toy_valid(toy_run)]
    config = replace(loaded.recipe.decode, beam_size=3, n_best=2, max_tokens_per_batch=24,
                     max_rows_per_batch=0)
    one = translate_ids(loaded.model, sources, replace(config, workers=1), loaded.device, strategy)
    threads = torch.get_num_threads()
    seen = record_batches(monkeypatch)
    two = translate_ids(loaded.model, sources, replace(config, workers=2), loaded.device, strategy)
    assert hypotheses(two) == hypotheses(one)
    assert len(seen) > 4 and all(name.startswith("seq2seq-decode") for name, _ in seen)
    assert torch.get_num_threads() == threads
    # idle threads that ran OpenMP work would slow the caller's parallel regions: none is kept
    assert not [t for t in threading.enumerate() if t.name.startswith("seq2seq-decode")]


def test_one_worker_and_a_single_batch_decode_on_the_calling_thread(toy_run, monkeypatch):
    loaded = load_model(toy_run / "best.pt")
    sources = [encode_source(loaded.tokenizer, s) for s, _ in toy_valid(toy_run)[:6]]
    seen = record_batches(monkeypatch)
    for workers, budget in ((1, 24), (2, 10_000)):
        config = replace(loaded.recipe.decode, workers=workers, max_tokens_per_batch=budget)
        translate_ids(loaded.model, sources, config, loaded.device)
    assert {name for name, _ in seen} == {threading.current_thread().name}


@pytest.mark.parametrize("strategy,beam,sentences", [("beam", 3, 4), ("beam", 5, 2),
                                                    ("greedy", 5, 12)])
def test_a_batch_holds_at_most_max_rows_of_sentences_times_beams(toy_run, monkeypatch, strategy,
                                                                 beam, sentences):
    """Beam search decodes sentences x beam rows, greedy one row per sentence; the cap splits
    batches that the token budget would allow, and the results do not depend on it."""
    loaded = load_model(toy_run / "best.pt")
    sources = [encode_source(loaded.tokenizer, s) for s, _ in toy_valid(toy_run)[:30]]
    config = replace(loaded.recipe.decode, beam_size=beam, max_tokens_per_batch=10_000,
                     workers=1, max_rows_per_batch=12)
    seen = record_batches(monkeypatch)
    capped = translate_ids(loaded.model, sources, config, loaded.device, strategy)
    assert max(size for _, size in seen) == sentences
    assert sum(size for _, size in seen) == len(sources)
    uncapped = translate_ids(loaded.model, sources, replace(config, max_rows_per_batch=0),
                             loaded.device, strategy)
    assert len(seen) == len(sources) // sentences + (len(sources) % sentences > 0) + 1
    assert [h[0].tokens for h in capped] == [h[0].tokens for h in uncapped]


def test_negative_workers_or_rows_are_refused(toy_run, tmp_path):
    for key in ("workers", "max_rows_per_batch"):
        with pytest.raises(ConfigError, match=f"decode.{key} must be at least 0"):
            recipe_from_dict({}, [f"decode.{key}=-1"])
    source = tmp_path / "src.txt"
    source.write_text("1 2 3\n")
    for option, name in (("--workers", "workers"), ("--max-rows-per-batch", "max-rows-per-batch")):
        assert_user_error(invoke("translate", toy_run / "best.pt", "--input", source, option, "-1"),
                          f"{name} must be at least 0", "got -1")
