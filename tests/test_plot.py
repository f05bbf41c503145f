"""Figures: the attention heatmap is shaded up to its own largest weight."""

from __future__ import annotations

import pytest
import torch

from seq2seq.search import Hypothesis
from seq2seq.tokenizer import CharTokenizer

pytest.importorskip("matplotlib")
from seq2seq.plot import attention_figure, attention_heatmap  # noqa: E402

TOKENIZER = CharTokenizer(list("ab "))


def draw(attention: torch.Tensor):
    """The figure for source "a b" and hypothesis "b a" (4 x 4 cells with </s>)."""
    import matplotlib.pyplot as plt

    figure = attention_figure(TOKENIZER, "a b", Hypothesis(TOKENIZER.encode("b a"), 0.0, 0.0,
                                                            attention))
    plt.close(figure)
    return figure


def test_diffuse_attention_is_shaded_up_to_its_maximum_with_a_colour_bar(tmp_path):
    attention = torch.full((5, 6), 0.25)  # rows sum to 1 over the 4 source positions shown
    attention[2, 1], attention[2, 3] = 0.3, 0.2
    attention[4, 5] = 0.9  # outside the drawn 4 x 4: not part of the scale
    figure = draw(attention)
    norm = figure.axes[0].images[0].norm
    assert (norm.vmin, norm.vmax) == (0.0, torch.tensor(0.3).item())
    assert len(figure.axes) == 2  # the heatmap and its colour bar
    assert draw(torch.zeros(4, 4)).axes[0].images[0].norm.vmax == 1.0  # no division by zero
    path = attention_heatmap(tmp_path / "a.png", TOKENIZER, "a b",
                             Hypothesis(TOKENIZER.encode("b a"), 0.0, 0.0, attention))
    assert path.read_bytes()[:4] == b"\x89PNG"
