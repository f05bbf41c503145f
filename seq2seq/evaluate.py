"""Corpus metrics: sacreBLEU, chrF and TER with their signatures, and perplexity.

Scores come from sacrebleu's metric objects in-process, on detokenised text, with sacrebleu's
default settings (13a tokenisation for BLEU), so numbers are comparable with published ones;
the signature records exactly how each was computed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sacrebleu.metrics import BLEU, CHRF, TER

log = logging.getLogger(__name__)

MAX_NLL = 100.0  # exp(100) ~ 2.7e43: large enough to say "diverged", small enough to print


def score_corpus(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """BLEU, chrF and TER of ``hypotheses`` against one reference each.

    Returns ``{"bleu", "chrf", "ter": float, "signatures": {name: str}, "n": int}``. Raises
    ValueError when the two lists differ in length or are empty.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references; "
                         "each hypothesis needs exactly one reference line")
    if not hypotheses:
        raise ValueError("no sentences to score: hypotheses and references are empty")
    hyps, refs = list(hypotheses), [list(references)]
    scores: dict[str, Any] = {"signatures": {}, "n": len(hyps)}
    for name, metric in (("bleu", BLEU()), ("chrf", CHRF()), ("ter", TER())):
        scores[name] = float(metric.corpus_score(hyps, refs).score)
        scores["signatures"][name] = str(metric.get_signature())
    log.debug("scored %d sentences: BLEU %.2f chrF %.2f TER %.2f",
              len(hyps), scores["bleu"], scores["chrf"], scores["ter"])
    return scores


def perplexity(nll_per_token: float) -> float:
    """``exp`` of the mean negative log-likelihood per token (nats), capped to stay finite."""
    if math.isnan(nll_per_token):
        return math.nan
    return math.exp(min(nll_per_token, MAX_NLL))


def evaluate_files(checkpoints: Sequence[Path] | Path | None, source: Path | None,
                   reference: Path, hypotheses: Path | None, device: str = "cpu",
                   quantize: str | None = None,
                   options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Score ``hypotheses``, or the translation of ``source`` by ``checkpoints`` (one, or several
    as an ensemble), against ``reference``.

    Files are read strictly (UTF-8, line numbers in errors); the result is ``score_corpus``'s.
    """
    from seq2seq import inference
    from seq2seq.data import read_lines

    references = read_lines(reference)
    if hypotheses is not None:
        outputs = read_lines(hypotheses)
    else:
        paths = [checkpoints] if isinstance(checkpoints, Path | str) else list(checkpoints or [])
        loaded = inference.load_models(paths, device, quantize)
        inference.require_task(loaded, "translation", paths[0])
        config = inference.generation_config(loaded.recipe.decode, **(options or {}))
        inference.check_decode_options(config)
        sources = read_lines(source)
        if len(sources) != len(references):
            raise inference.InferenceError(f"{source} has {len(sources)} lines but {reference} "
                                           f"has {len(references)}; they must be line-aligned")
        outputs = [inference.best_text(loaded.tokenizer, hyps)
                   for hyps in inference.translate_lines(loaded, sources, config)]
    try:
        return score_corpus(outputs, references)
    except ValueError as error:
        raise inference.InferenceError(f"{hypotheses or source} vs {reference}: {error}") from None
