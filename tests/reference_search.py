"""A plain reference beam search and a seeded step function with a large vocabulary.

``reference_beam_search`` decodes one sentence at a time with Python lists and no batching. It is
written from the documented semantics of :mod:`seq2seq.search` (the module docstring and
``beam_search``'s), not from its code, so that a test can require the batched search to agree
with it token for token:

- every step extends each open hypothesis by every allowed token (PAD and BOS never; UNK when
  banned; EOS while fewer than ``min_length`` tokens were emitted; a token that would complete an
  n-gram already emitted); the cumulative log-probabilities are float32 sums as in the search;
- EOS extensions among the K best candidates finish, the K best non-EOS extensions stay open;
- a finished hypothesis scores log_prob / ((5 + |Y|) / 6) ** alpha over its |Y| scored steps,
  plus beta * sum_j log(min(coverage_j, 1)) over the real source positions (coverage floored at
  ``COVERAGE_EPS``), where coverage sums the attention of its scored steps;
- a sentence stops once it holds ``n_best`` finished hypotheses that no open one can beat, or at
  its maximum length, where the open hypotheses are finalised as they stand (no EOS scored).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from seq2seq.search import COVERAGE_EPS, Hypothesis, LogitRules
from seq2seq.tokenizer import BOS, EOS, PAD, UNK


@dataclass
class _Open:
    """An open hypothesis: its tokens, the token to feed next and the state to feed it to."""

    tokens: list[int]
    log_prob: float  # a float32 value, summed in float32 like the batched search
    prev: int
    state: Any
    attention: list[Tensor] = field(default_factory=list)  # (S,) per scored step


def banned(tokens: list[int], rules: LogitRules) -> set[int]:
    """The tokens that may not follow the emitted ``tokens``."""
    out = {PAD, BOS}
    if rules.ban_unk:
        out.add(UNK)
    if len(tokens) < rules.min_length:
        out.add(EOS)
    n = rules.no_repeat_ngram
    if n > 0:  # the last n - 1 tokens and a banned one would repeat an n-gram
        prefix = tokens[len(tokens) - n + 1:] if n > 1 else []
        for i in range(len(tokens) - n + 1):
            if tokens[i:i + n - 1] == prefix:
                out.add(tokens[i + n - 1])
    return out


def gnmt_score(log_prob: float, steps: int, attention: list[Tensor], real: list[bool],
               alpha: float, beta: float) -> float:
    """The GNMT score of a hypothesis with ``steps`` scored steps and their attention rows."""
    score = log_prob / ((5 + steps) / 6) ** alpha
    if beta and attention:
        coverage = [sum(column) for column in zip(*(row.tolist() for row in attention),
                                                  strict=True)]
        score += beta * sum(math.log(min(max(c, COVERAGE_EPS), 1.0))
                            for c, counts in zip(coverage, real, strict=True) if counts)
    return score


def reference_beam_search(step: Any, state: Any, first: int, max_len: int, rules: LogitRules,
                          beam: int, n_best: int, alpha: float, beta: float,
                          real: list[bool]) -> list[Hypothesis]:
    """The ``n_best`` hypotheses of one sentence, best first (see the module docstring).

    ``state`` holds one row; ``real`` marks the source positions the coverage penalty counts.
    """
    if max_len <= 0:  # allowed no token: one empty hypothesis
        return [Hypothesis([], 0.0, 0.0, None)]
    finished: list[Hypothesis] = []

    def offer(tokens: list[int], log_prob: float, attention: list[Tensor]) -> None:
        score = gnmt_score(log_prob, len(attention), attention, real, alpha, beta)
        if len(finished) < n_best or score > finished[-1].score:
            finished.append(Hypothesis(tokens, log_prob, score, torch.stack(attention)))
            finished.sort(key=lambda h: -h.score)
            del finished[n_best:]

    beams = [_Open([], 0.0, first, state)]
    for t in range(max_len):  # t tokens emitted so far
        candidates = []  # (log_prob, parent, token, parent's state after this step, attention)
        for hyp in beams:
            log_probs, after = step(torch.tensor([hyp.prev]), hyp.state)
            total = log_probs[0].float() + torch.tensor(hyp.log_prob, dtype=torch.float32)
            values, forbidden = total.tolist(), banned(hyp.tokens, rules)
            # no more than 2K extensions of one hypothesis can be among the 2K best of all
            tokens = heapq.nlargest(2 * beam, (w for w in range(len(values)) if w not in forbidden),
                                    key=values.__getitem__)
            candidates += [(values[w], hyp, w, after, after.attention[0]) for w in tokens]
        candidates.sort(key=lambda c: -c[0])
        for value, hyp, token, _, attention in candidates[:beam]:
            if token == EOS:
                offer(hyp.tokens, value, [*hyp.attention, attention])
        kept = [c for c in candidates if c[2] != EOS][:beam]
        beams = [_Open([*hyp.tokens, token], value, token, after, [*hyp.attention, attention])
                 for value, hyp, token, after, attention in kept]
        if t + 1 == max_len:
            for hyp in beams:
                offer(hyp.tokens, hyp.log_prob, hyp.attention)
            break
        # log-probs only fall and the coverage penalty is <= 0: an open hypothesis can at best
        # keep its log-prob and take the most favourable length it may still reach
        best = max(hyp.log_prob for hyp in beams)
        bound = max(best / ((5 + steps) / 6) ** alpha for steps in range(t + 2, max_len + 1))
        if len(finished) == n_best and bound <= finished[-1].score:
            break
    return finished


# ---------------------------------------------------------------- a seeded step function


@dataclass(frozen=True)
class PeakyState:
    """N decoding rows of :class:`PeakyModel`."""

    hidden: Tensor  # (N, H) float64
    keys: Tensor  # (N, S, H) float64, zero at padding
    real: Tensor  # (N, S) bool
    target: Tensor  # (N,) float64: around this many tokens EOS becomes likely
    emitted: Tensor  # (N,) float64: tokens fed so far, the first included
    attention: Tensor  # (N, S) float32: the last step's attention
    coverage: Tensor | None  # (N, S) float32: the attention summed over the steps, if exposed

    def select(self, index: Tensor) -> PeakyState:
        pick = lambda x: None if x is None else x[index]  # noqa: E731
        return PeakyState(*(pick(getattr(self, name)) for name in self.__dataclass_fields__))


class PeakyModel:
    """A random but seeded recurrent "translation model" over a large vocabulary.

    ``h' = tanh(E[prev] + W h)``; dot attention of ``h'`` over the source keys (padding masked);
    logits ``(h' + context) O``, with EOS rising as the hypothesis passes its target length, the
    previous token favoured (so n-grams repeat unless blocked) and PAD/BOS/UNK favoured (so a
    missing ban shows). Each row is computed on its own in float64, so a row's log-probs do not
    depend on the batch it is in: the batched and the one-row-at-a-time searches see the same
    numbers bit for bit.
    """

    def __init__(self, vocab: int = 1024, hidden: int = 16, seed: int = 0,
                 expose_coverage: bool = True):
        g = torch.Generator().manual_seed(seed)
        self.vocab, self.hidden, self.expose_coverage = vocab, hidden, expose_coverage
        self.embed = torch.randn(vocab, hidden, generator=g, dtype=torch.float64)
        self.recur = torch.randn(hidden, hidden, generator=g, dtype=torch.float64) / hidden**0.5
        self.out = torch.randn(hidden, vocab, generator=g, dtype=torch.float64) * 0.8
        self.seed = seed

    def start(self, src_lengths: list[int], targets: list[int]) -> PeakyState:
        g = torch.Generator().manual_seed(self.seed + 1)
        n, width = len(src_lengths), max(src_lengths)
        src = torch.randint(4, self.vocab, (n, width), generator=g)
        real = torch.arange(width)[None] < torch.tensor(src_lengths)[:, None]
        keys = self.embed[src] * real[:, :, None]
        hidden = torch.tanh(keys.sum(1) / torch.tensor(src_lengths, dtype=torch.float64)[:, None])
        zeros = torch.zeros(n, width)
        return PeakyState(hidden, keys, real, torch.tensor(targets, dtype=torch.float64),
                          torch.zeros(n, dtype=torch.float64), zeros,
                          zeros if self.expose_coverage else None)

    def _row(self, prev: int, state: PeakyState, i: int) -> tuple[Tensor, Tensor, Tensor]:
        hidden = torch.tanh(self.embed[prev] + self.recur @ state.hidden[i])
        energy = (state.keys[i] @ hidden).masked_fill(~state.real[i], float("-inf"))
        attention = torch.softmax(energy, 0)
        logits = (hidden + attention @ state.keys[i]) @ self.out
        logits[EOS] = 6.0 + 2.0 * (state.emitted[i] + 1 - state.target[i])
        logits[prev] += 3.0
        logits[[PAD, BOS, UNK]] += 4.0
        return torch.log_softmax(logits, 0).float(), hidden, attention.float()

    def __call__(self, prev: Tensor, state: PeakyState) -> tuple[Tensor, PeakyState]:
        rows = [self._row(int(p), state, i) for i, p in enumerate(prev.tolist())]
        log_probs, hidden, attention = (torch.stack(parts) for parts in zip(*rows, strict=True))
        coverage = None if state.coverage is None else state.coverage + attention
        return log_probs, PeakyState(hidden, state.keys, state.real, state.target,
                                     state.emitted + 1, attention, coverage)
