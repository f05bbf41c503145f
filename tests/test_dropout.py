"""The CPU dropout mask: exact values, the rounded rate in every lane, gradients, seeding."""

from __future__ import annotations

import pytest
import torch

from seq2seq.model.dropout import LEVELS, Dropout, drop_threshold


def test_outside_training_and_at_zero_it_is_the_identity():
    x = torch.randn(4, 5)
    assert Dropout(0.3).eval()(x) is x
    assert Dropout(0.0).train()(x) is x


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5])
def test_each_element_is_dropped_or_scaled_at_the_rounded_rate_in_every_lane(p: float):
    torch.manual_seed(0)
    x = torch.rand(1 << 20) + 1.0  # never 0, so a 0 in the output is a dropped element
    y = Dropout(p).train()(x)
    q = drop_threshold(p) / LEVELS
    dropped = y == 0
    assert torch.equal(y[~dropped], x[~dropped] * (LEVELS / (LEVELS - drop_threshold(p))))
    # Four elements share 64 random bits: each of the four 16-bit lanes must drop at rate q.
    per_lane = dropped.view(-1, 4).float().mean(0)
    sigma = (q * (1 - q) / (x.numel() // 4)) ** 0.5
    assert (per_lane - q).abs().max() < 5 * sigma, per_lane


def test_the_gradient_is_the_mask_and_a_seed_repeats_it():
    x = torch.randn(3, 7, 33, requires_grad=True)  # 693 elements: not a multiple of four
    grad = torch.randn(3, 7, 33)
    torch.manual_seed(5)
    y = Dropout(0.2).train()(x)
    y.backward(grad)
    mask = (y != 0).float() * (LEVELS / (LEVELS - drop_threshold(0.2)))
    assert torch.equal(x.grad, grad * mask)
    torch.manual_seed(5)
    assert torch.equal(Dropout(0.2).train()(x), y)
    assert not torch.equal(Dropout(0.2).train()(x), y)  # the next draw differs


def test_a_probability_outside_0_1_is_refused():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        Dropout(1.0)
