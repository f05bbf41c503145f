"""Normalised Bahdanau attention, as in NVIDIA's GNMT v2.

``score(q, k) = g * (v / ||v||) . tanh(W_q q + W_k k + b)``; softmax over source positions with
padding masked; ``context = sum_s weights_s * memory_s``. ``g`` starts at ``1 / sqrt(units)`` as in
GNMT v2, but is stored as ``scale = g / sqrt(units)``: Adam moves a parameter by about the
learning rate per step whatever its size, so a bare ``g`` needs thousands of steps to sharpen the
attention from uniform, while ``scale`` moves ``g`` about as fast as the unnormalised ``v`` of plain
Bahdanau attention would (``sqrt(units)`` times faster). Early in training that is the difference
between a decoder that reads the source and one that is still a language model of the target.

The keys ``W_k k + b`` are projected once per source sentence (:meth:`BahdanauAttention.keys`),
then every query — all target positions at once in training (B,T,H), one position in decoding
(N,1,H) — is one batched computation. The module holds parameters only, never decoding state.

The additive score needs ``tanh`` over a (B, T, S, A) tensor: about 60M floats (230 MB) for a
4,000-token batch, several times over in plain autograd (sum, tanh, its gradient, the outer
product with ``v``). :class:`_AdditiveScores` instead computes it in blocks of batch rows that stay
in cache and recomputes ``tanh`` in the backward pass, so nothing of that size is ever stored.
It evaluates ``tanh`` as ``2 sigmoid(2x) - 1``, which torch runs faster on CPUs
(``benchmarks/kernels.py`` measures both).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _block_rows(q: Tensor, k: Tensor) -> int:
    """Batch rows per block: about 1M elements of (rows, T, S, A) on CPU (cache-sized); GPUs
    take the whole batch in as few blocks as memory comfortably allows."""
    budget = 1 << 20 if q.device.type == "cpu" else 1 << 28
    return max(1, budget // max(1, q.size(1) * k.size(1) * q.size(2)))


def _half_tanh(q2: Tensor, k: Tensor) -> Tensor:
    """sigmoid(q2 + 2k) as (b, T, S, A) for q2 (b, T, A) = 2q and k (b, S, A): that is
    (1 + tanh(q + k)) / 2: the identity is exact, and torch's CPU sigmoid is faster than its
    tanh (``benchmarks/kernels.py``)."""
    return torch.add(q2.unsqueeze(2), k.unsqueeze(1), alpha=2).sigmoid_()


class _AdditiveScores(torch.autograd.Function):
    """scores[b,t,s] = v . tanh(q[b,t] + k[b,s]) for q (B,T,A), k (B,S,A), v (A,) -> (B,T,S),
    blockwise over batch rows, recomputing tanh in backward (memory O(block), not O(B*T*S*A))."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        with torch.autocast(q.device.type, enabled=False):
            k, v = k.to(q.dtype), v.to(q.dtype)
            ctx.save_for_backward(q, k, v)
            scores = q.new_empty(q.size(0), q.size(1), k.size(1))
            rows, q2, v2 = _block_rows(q, k), 2 * q, 2 * v
            for start in range(0, q.size(0), rows):
                block = slice(start, start + rows)
                scores[block] = torch.matmul(_half_tanh(q2[block], k[block]), v2)
            scores -= v.sum()  # v . tanh(x) = 2v . sigmoid(2x) - sum(v)
        return scores

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = ctx.saved_tensors
        grad = grad.to(q.dtype)
        grad_q, grad_k = torch.empty_like(q), torch.empty_like(k)
        accumulate = torch.promote_types(q.dtype, torch.float32)  # bf16 sums in fp32
        grad_v = -grad.sum(dtype=accumulate).expand(v.shape).clone()
        rows, q2, v4 = _block_rows(q, k), 2 * q, 4 * v
        for start in range(0, q.size(0), rows):
            block = slice(start, start + rows)
            energy = _half_tanh(q2[block], k[block])  # (b, T, S, A), sigmoid(2(q + k))
            g = grad[block]  # (b, T, S)
            flat = energy.reshape(-1, v.numel())
            grad_v += 2 * (g.reshape(1, -1) @ flat).squeeze(0).to(accumulate)
            # d score / d (q + k) = g * v * 4 sigmoid' (2(q + k)), in place on the block
            torch.ops.aten.sigmoid_backward.grad_input(g.unsqueeze(-1) * v4, energy,
                                                       grad_input=energy)
            torch.sum(energy, dim=2, out=grad_q[block])
            torch.sum(energy, dim=1, out=grad_k[block])
        return grad_q, grad_k, grad_v.to(v.dtype)


class BahdanauAttention(nn.Module):
    """Additive attention with a normalised score vector (weight normalisation of ``v``)."""

    def __init__(self, query_size: int, key_size: int, units: int, init_scale: float):
        super().__init__()
        self.query = nn.Linear(query_size, units, bias=False)
        self.key = nn.Linear(key_size, units, bias=True)  # its bias is the ``b`` of the score
        self.v = nn.Parameter(torch.empty(units).uniform_(-init_scale, init_scale))
        self.scale = nn.Parameter(torch.tensor(1.0 / units))  # g = scale * sqrt(units)
        nn.init.uniform_(self.query.weight, -init_scale, init_scale)
        nn.init.uniform_(self.key.weight, -init_scale, init_scale)
        nn.init.zeros_(self.key.bias)

    def keys(self, memory: Tensor) -> Tensor:
        """memory (B,S,K) -> projected keys (B,S,A); computed once per source."""
        return self.key(memory)

    def forward(self, query: Tensor, keys: Tensor, memory: Tensor,
                mask: Tensor) -> tuple[Tensor, Tensor]:
        """query (B,T,Q), keys (B,S,A), memory (B,S,K), mask (B,S) bool (True = real token)
        -> context (B,T,K), weights (B,T,S) (rows sum to 1, exactly 0 at padding)."""
        units = self.v.numel()
        v = (self.scale * math.sqrt(units)) * self.v / self.v.norm()
        scores = _AdditiveScores.apply(self.query(query), keys, v)  # (B, T, S)
        scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        return torch.bmm(weights, memory), weights

    def flops(self, query_size: int, key_size: int) -> tuple[int, int, int]:
        """Forward matmul FLOPs: per query, per key, and per (query, key) pair."""
        units = self.v.numel()
        return 2 * query_size * units, 2 * key_size * units, 2 * units + 2 * key_size
