"""Dropout whose mask is cheap to draw on CPUs.

``nn.Dropout`` on CPU draws its mask with ``bernoulli_``, one random number at a time, which was
5-6% of the Multi30k recipe's training step. :class:`Dropout` draws 64 random bits per four
elements instead (``random_`` over the whole int64 range) and keeps an element when its 16 bits,
read as a signed integer, are at or above a threshold: two to four times faster, forward and
backward, on the recipe's activations (``benchmarks/kernels.py`` measures both). The drop
probability is ``p`` rounded to a multiple of 1/65536 (0.2 becomes 0.199997), and kept elements
are scaled by the inverse of the rounded keep probability, so the output's expectation is the
input exactly. On other devices, where the fused kernel is fast, it is ``F.dropout``. The random
numbers come from the device's default generator, as ``nn.Dropout``'s do, so seeding and
checkpointed RNG state cover them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LEVELS = 1 << 16  # the mask compares 16 random bits per element


def drop_threshold(p: float) -> int:
    """How many of the 65,536 values of 16 random bits drop an element: ``round(p * 65536)``."""
    return round(p * LEVELS)


def dropout_mask(like: Tensor, p: float) -> Tensor:
    """A dropout mask shaped and typed like ``like``: 0 for a dropped element, else
    1 / (1 - q) with q = ``drop_threshold(p)`` / 65536, each element dropped with probability q."""
    n, dropped = like.numel(), drop_threshold(p)
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=like.device)
    bits.random_(-(1 << 63), None)  # every 64-bit value equally likely
    keep = bits.view(torch.int16)[:n].view(like.shape) >= dropped - LEVELS // 2
    return keep.to(like.dtype).mul_(LEVELS / (LEVELS - dropped))


class Dropout(nn.Module):
    """``nn.Dropout(p)`` (training only; identity in eval mode) with the CPU mask above."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        return x * dropout_mask(x, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"
