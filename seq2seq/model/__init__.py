"""Models: the GNMT-style translation model and the character LM over one recurrent block.

``build_model(config, vocab_size, task)`` is the one entry point the rest of the toolkit uses.

Embedding sharing (``config.tie_embeddings``): source and target embeddings are one matrix (one
vocabulary for both sides), and the output classifier shares it too when
``config.output_projection`` is on (features are projected to ``embed_dim`` first). Without the
projection the classifier reads [top; context] (2 * hidden wide; hidden for the LM), which cannot
share the ``embed_dim``-wide embeddings, so it gets its own weight: that is NVIDIA's GNMT v2 layout.
"""

from __future__ import annotations

import logging

from torch import nn

from seq2seq.config import ConfigError, ModelConfig
from seq2seq.model.lm import CharLM, LMState
from seq2seq.model.quantize import QuantizationUnavailable, quantize_int8
from seq2seq.model.seq2seq import Seq2Seq, TranslationState

__all__ = ["CharLM", "LMState", "QuantizationUnavailable", "Seq2Seq", "TranslationState",
           "build_model", "quantize_int8"]

log = logging.getLogger(__name__)


def build_model(config: ModelConfig, vocab_size: int, task: str) -> nn.Module:
    """A :class:`Seq2Seq` for task "translation", a :class:`CharLM` for task "lm"."""
    if vocab_size < 4:
        raise ConfigError(f"vocabulary of {vocab_size} ids is too small (4 are special ids)")
    if task == "translation":
        model: nn.Module = Seq2Seq(config, vocab_size)
    elif task == "lm":
        model = CharLM(config, vocab_size)
    else:
        raise ConfigError(f"data.task: {task!r} is not one of translation, lm")
    if config.tie_embeddings and not config.output_projection:
        log.info("model.output_projection = false: the output classifier has its own weights "
                 "(source and target embeddings stay shared)")
    params = sum(p.numel() for p in model.parameters())
    log.info("%s model: %.2fM parameters", task, params / 1e6)
    return model
