"""Search on hand-written probability tables and on a tiny seeded recurrent step function.

Table cases assert scores computed by hand; the neural cases assert invariants (beam 1 = greedy,
batched = one at a time, a huge beam = exhaustive search, the batched search = a plain
one-sentence reference search over 1,024 tokens), never floats from random weights.
"""

from __future__ import annotations

import ast
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from seq2seq import search
from seq2seq.config import DecodeConfig
from seq2seq.search import (
    Hypothesis,
    LogitRules,
    apply_rules,
    beam_search,
    decode,
    greedy,
    repeated_ngrams,
    sample,
    top_k_filter,
    top_p_filter,
)
from seq2seq.tokenizer import BOS, EOS, PAD, UNK

from .reference_search import PeakyModel, reference_beam_search

V = 8
A, B, C, D = 4, 5, 6, 7
NO_RULES = LogitRules()


# ---------------------------------------------------------------- a step backed by tables


def dist(spec: dict[int, float]) -> list[float]:
    """Probabilities over V tokens: those given, the rest of the mass spread evenly."""
    rest = [i for i in range(V) if i not in spec]
    mass = (1.0 - sum(spec.values())) / len(rest)
    return [spec.get(i, mass) for i in range(V)]


@dataclass(frozen=True)
class TableState:
    history: torch.Tensor  # (N, t) tokens fed so far (the first one included)
    coverage: torch.Tensor | None = None  # (N, S)
    attention: torch.Tensor | None = None  # (N, S)

    def select(self, index: torch.Tensor) -> TableState:
        pick = lambda x: None if x is None else x[index]  # noqa: E731
        return TableState(self.history[index], pick(self.coverage), pick(self.attention))


class TableStep:
    """Next-token probabilities (and attention) looked up by the tokens emitted so far."""

    def __init__(self, table: dict[tuple, list[float]], default: list[float],
                 attend: dict[tuple, list[float]] | None = None, expose_coverage: bool = True):
        self.table, self.default, self.attend = table, default, attend
        self.expose_coverage = expose_coverage

    def start(self, n: int, width: int = 3) -> TableState:
        if self.attend is None:
            return TableState(torch.zeros(n, 0, dtype=torch.long))
        zeros = torch.zeros(n, width)
        return TableState(torch.zeros(n, 0, dtype=torch.long),
                          zeros if self.expose_coverage else None, zeros)

    def __call__(self, prev: torch.Tensor, state: TableState):
        history = torch.cat([state.history, prev[:, None]], 1)
        keys = [tuple(row[1:]) for row in history.tolist()]
        log_probs = torch.tensor([self.table.get(key, self.default) for key in keys]).log()
        if self.attend is None:
            return log_probs, TableState(history)
        attention = torch.tensor([self.attend.get(key, self.attend[()]) for key in keys])
        coverage = None
        if self.expose_coverage:
            coverage = state.coverage + attention
        return log_probs, TableState(history, coverage, attention)


def run(strategy: Callable, table: TableStep, n: int = 1, max_len: int | list[int] = 5,
        rules: LogitRules = NO_RULES, **kwargs) -> list[list[Hypothesis]]:
    lengths = torch.tensor(max_len if isinstance(max_len, list) else [max_len] * n)
    first = torch.full((len(lengths),), BOS)
    return strategy(table, table.start(len(lengths)), first, lengths, rules, **kwargs)


# ---------------------------------------------------------------- a tiny seeded neural step


@dataclass(frozen=True)
class NetState:
    hidden: torch.Tensor  # (N, H)
    memory: torch.Tensor  # (N, S, H)
    mask: torch.Tensor  # (N, S) True at real source positions
    coverage: torch.Tensor  # (N, S)
    attention: torch.Tensor  # (N, S)

    def select(self, index: torch.Tensor) -> NetState:
        return NetState(*(x[index] for x in (self.hidden, self.memory, self.mask,
                                            self.coverage, self.attention)))


class TinyNet(nn.Module):
    """Embedding + GRUCell + dot attention + Linear: a small random translation model."""

    def __init__(self, vocab: int = 6, hidden: int = 16, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, hidden)
        self.cell = nn.GRUCell(hidden, hidden)
        self.out = nn.Linear(2 * hidden, vocab)

    def start(self, src: torch.Tensor, lengths: torch.Tensor) -> NetState:
        mask = torch.arange(src.shape[1])[None] < lengths[:, None]
        memory = self.embed(src) * mask[:, :, None]
        hidden = torch.tanh(memory.sum(1) / lengths[:, None])
        zeros = torch.zeros(src.shape, dtype=torch.float32)
        return NetState(hidden, memory, mask, zeros, zeros)

    def step(self, prev: torch.Tensor, state: NetState):
        hidden = self.cell(self.embed(prev), state.hidden)
        energy = (state.memory @ hidden[:, :, None]).squeeze(2).masked_fill(~state.mask, -1e9)
        attention = torch.softmax(energy, -1) * state.mask
        context = (attention[:, :, None] * state.memory).sum(1)
        log_probs = torch.log_softmax(self.out(torch.cat([hidden, context], 1)), -1)
        return log_probs, NetState(hidden, state.memory, state.mask,
                                   state.coverage + attention, attention)


def sources(vocab: int = 6, lengths: tuple[int, ...] = (3, 1, 4, 2)):
    gen = torch.Generator().manual_seed(5)
    lengths_t = torch.tensor(lengths)
    src = torch.randint(4, vocab, (len(lengths), max(lengths)), generator=gen)
    src = src.masked_fill(torch.arange(max(lengths))[None] >= lengths_t[:, None], PAD)
    return src, lengths_t


def net_run(strategy: Callable, net: TinyNet, src, lengths, max_len, rules=NO_RULES, **kwargs):
    first = torch.full((src.shape[0],), BOS)
    max_lengths = torch.as_tensor(max_len).expand(src.shape[0]).clone()
    return strategy(net.step, net.start(src, lengths), first, max_lengths, rules, **kwargs)


def tokens_of(results: list[list[Hypothesis]]) -> list[list[list[int]]]:
    return [[h.tokens for h in hyps] for hyps in results]


# ---------------------------------------------------------------- table tests


def test_beam_finds_the_sequence_greedy_misses():
    table = TableStep({(): dist({A: 0.5, B: 0.4}),
                       (A,): dist({EOS: 0.3, C: 0.25, D: 0.25}),
                       (B,): dist({EOS: 0.9})}, default=dist({EOS: 0.9}))
    [[g]] = run(greedy, table)
    assert g.tokens == [A] and g.log_prob == pytest.approx(math.log(0.5 * 0.3))
    [[b]] = run(beam_search, table, beam_size=2, length_penalty=0.0)
    assert b.tokens == [B]
    assert b.log_prob == pytest.approx(math.log(0.4 * 0.9))
    assert b.score == pytest.approx(math.log(0.4 * 0.9))


@pytest.mark.parametrize("alpha", [0.0, 1.0, 2.0])
def test_length_penalty_flips_ranking_as_computed_by_hand(alpha):
    table = TableStep({(): dist({A: 0.5, B: 0.4}),
                       (A,): dist({EOS: 0.6}),
                       (B,): dist({C: 0.8}),
                       (B, C): dist({EOS: 0.8})}, default=dist({EOS: 0.9}))
    [hyps] = run(beam_search, table, beam_size=3, n_best=2, length_penalty=alpha)
    # short: A EOS, |Y| = 2; long: B C EOS, |Y| = 3
    short = math.log(0.5 * 0.6) / ((5 + 2) / 6) ** alpha
    long = math.log(0.4 * 0.8 * 0.8) / ((5 + 3) / 6) ** alpha
    expected = sorted([([A], short), ([B, C], long)], key=lambda x: -x[1])
    assert [h.tokens for h in hyps] == [tokens for tokens, _ in expected]
    assert [h.score for h in hyps] == pytest.approx([score for _, score in expected])
    assert hyps[0].tokens == ([A] if alpha == 0.0 else [B, C])


def test_beam_keeps_searching_while_an_open_hypothesis_can_still_win():
    # EOS at once scores log 0.6; nine A's then EOS has log-prob log 0.35 + 9 log 0.99 = -1.14,
    # which only the length normaliser (|Y| = 10) lifts above it.
    table = TableStep({(): dist({EOS: 0.6, A: 0.35}),
                       **{(A,) * n: dist({A: 0.99}) for n in range(1, 9)},
                       (A,) * 9: dist({EOS: 0.99})}, default=dist({EOS: 0.9}))
    [[short]] = run(beam_search, table, max_len=10, beam_size=2, length_penalty=0.0)
    assert short.tokens == [] and short.score == pytest.approx(math.log(0.6))
    [[long]] = run(beam_search, table, max_len=10, beam_size=2, length_penalty=1.0)
    assert long.tokens == [A] * 9
    assert long.score == pytest.approx((math.log(0.35) + 9 * math.log(0.99)) / ((5 + 10) / 6))


@pytest.mark.parametrize("expose_coverage", [True, False])
def test_coverage_penalty_prefers_the_hypothesis_covering_the_source(expose_coverage):
    # source of 2 real positions and one padding column (attention 0 there)
    table = TableStep({(): dist({A: 0.5, B: 0.4}),
                       (A,): dist({EOS: 0.9}),
                       (B,): dist({EOS: 0.9})}, default=dist({EOS: 0.9}),
                      attend={(): [0.5, 0.5, 0.0], (A,): [1.0, 0.0, 0.0], (B,): [0.5, 0.5, 0.0]},
                      expose_coverage=expose_coverage)
    [plain] = run(beam_search, table, beam_size=2, n_best=2, length_penalty=0.0)
    assert [h.tokens for h in plain] == [[A], [B]]
    [hyps] = run(beam_search, table, beam_size=2, n_best=2, length_penalty=0.0,
                 coverage_penalty=1.0)
    # A EOS covers [1.5, 0.5] -> log(1) + log(0.5); B EOS covers [1, 1] -> 0; padding ignored
    assert [h.tokens for h in hyps] == [[B], [A]]
    assert hyps[0].score == pytest.approx(math.log(0.4 * 0.9))
    assert hyps[1].score == pytest.approx(math.log(0.5 * 0.9) + math.log(0.5))
    assert hyps[1].log_prob == pytest.approx(math.log(0.5 * 0.9))
    assert torch.equal(hyps[1].attention, torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]))
    # without kept attention the penalty is the same (from the history when no coverage is exposed)
    [bare] = run(beam_search, table, beam_size=2, n_best=2, length_penalty=0.0,
                 coverage_penalty=1.0, keep_attention=False)
    assert [(h.tokens, h.score) for h in bare] == [(h.tokens, h.score) for h in hyps]
    assert all(h.attention is None for h in bare)


def test_pad_bos_never_emitted_and_unk_banned_on_request():
    favour = dist({PAD: 0.5, BOS: 0.3, UNK: 0.15, A: 0.03})
    table = TableStep({}, default=favour)
    strategies = [(greedy, {}), (beam_search, {"beam_size": 3}),
                  *[(sample, {"generator": torch.Generator().manual_seed(s)}) for s in range(5)]]
    for strategy, kwargs in strategies:
        for ban_unk in (False, True):
            h = run(strategy, table, max_len=4, rules=LogitRules(ban_unk=ban_unk), **kwargs)[0][0]
            assert PAD not in h.tokens and BOS not in h.tokens
            if ban_unk:
                assert UNK not in h.tokens
    [[h]] = run(greedy, table, max_len=3)
    assert h.tokens == [UNK] * 3
    [[h]] = run(greedy, table, max_len=3, rules=LogitRules(ban_unk=True))
    assert h.tokens == [A] * 3


@pytest.mark.parametrize("strategy,kwargs", [
    (greedy, {}), (beam_search, {"beam_size": 3}),
    (sample, {"generator": torch.Generator().manual_seed(0)})])
def test_min_and_max_length_hold(strategy, kwargs):
    eager = TableStep({}, default=dist({EOS: 0.9}))  # wants to stop at once
    for hyps in run(strategy, eager, max_len=[6, 6], rules=LogitRules(min_length=3), **kwargs):
        assert len(hyps[0].tokens) >= 3
    if strategy is not sample:
        assert run(strategy, eager, max_len=[6], **kwargs)[0][0].tokens == []
    endless = TableStep({}, default=dist({A: 0.5, B: 0.4}))  # hardly ever stops
    results = run(strategy, endless, max_len=[2, 4, 0, 1], **kwargs)
    assert [len(hyps[0].tokens) for hyps in results] == [2, 4, 0, 1]
    # a maximum below the minimum wins
    [hyps] = run(strategy, eager, max_len=[2], rules=LogitRules(min_length=5), **kwargs)
    assert len(hyps[0].tokens) == 2


def test_no_repeat_ngram_pure_function():
    history = torch.tensor([[A, B, A], [A, B, C]])
    banned = repeated_ngrams(history, 2, V)
    assert banned[0].nonzero().flatten().tolist() == [B]  # "A B" seen
    assert not banned[1].any()  # "C ?" never seen
    banned = repeated_ngrams(torch.tensor([[A, B, C, A, B]]), 3, V)
    assert banned[0].nonzero().flatten().tolist() == [C]
    banned = repeated_ngrams(torch.tensor([[A, B, A]]), 1, V)
    assert banned[0].nonzero().flatten().tolist() == sorted([A, B])
    assert repeated_ngrams(torch.tensor([[A, B]]), 3, V) is None  # too short to repeat
    # apply_rules masks exactly those (and PAD and BOS)
    out = apply_rules(torch.zeros(2, V), history, LogitRules(no_repeat_ngram=2))
    assert torch.isinf(out[0, [PAD, BOS, B]]).all() and torch.isfinite(out[0]).sum() == V - 3


def test_apply_rules_in_place_equals_the_copy():
    history = torch.tensor([[A, B, A], [A, B, C]])
    rules = LogitRules(min_length=5, ban_unk=True, no_repeat_ngram=2)
    log_probs = torch.randn(2, V).log_softmax(-1)
    copied = apply_rules(log_probs, history, rules)
    assert torch.isfinite(log_probs).all()  # the input is untouched without inplace
    same = apply_rules(log_probs, history, rules, inplace=True)
    assert same is log_probs and torch.equal(same, copied)
    assert torch.isinf(copied[:, [PAD, BOS, UNK, EOS]]).all() and torch.isinf(copied[0, B])


@pytest.mark.parametrize("k,n,vocab", [(5, 10, 8000), (3, 6, 64), (4, 8, 24), (2, 4, 12),
                                        (5, 10, 3963), (3, 6, 67), (2, 4, 13)])
def test_two_stage_group_top_k_equals_one_top_k(k, n, vocab):
    """Also over vocabularies that are not a multiple of 8, whose last columns are outside the
    blocks: there the best candidates of some groups are put in those columns."""
    torch.manual_seed(vocab)
    total = torch.randn(7 * k, vocab).log_softmax(-1) + torch.randn(7 * k, 1)
    total[1:k] = float("-inf")  # the first step: one live beam in the first group
    total[k + 1, :vocab // 2] = float("-inf")  # banned tokens
    total[2 * k, -1], total[3 * k + 1, -(vocab % 8 or 1):] = 9.0, torch.arange(vocab % 8 or 1) + 5.0
    expected = total.view(7, k * vocab).topk(n, dim=1)
    # a model's log-probs are a view of a row-padded tensor: the same result, from the view
    padded = torch.full((7 * k, vocab + 5), float("nan"))
    padded[:, :vocab] = total
    for rows in (total, padded[:, :vocab]):
        values, indices = search._top_k_of_groups(rows, k, n)
        assert torch.equal(values, expected.values)
        assert torch.equal(indices, expected.indices)  # random values: no ties


def repeats_bigram(tokens: list[int]) -> bool:
    bigrams = list(zip(tokens, tokens[1:], strict=False))
    return len(bigrams) != len(set(bigrams))


@pytest.mark.parametrize("strategy,kwargs", [
    (greedy, {}), (beam_search, {"beam_size": 4, "n_best": 3}),
    (sample, {"generator": torch.Generator().manual_seed(1)})])
def test_no_repeat_ngram_blocks_in_every_strategy(strategy, kwargs):
    class Cyclic(TableStep):  # after A comes B, after B comes A: "A B A B ..."
        def __call__(self, prev, state):
            log_probs, new = super().__call__(prev, state)
            last = new.history[:, -1]
            ab = torch.tensor([dist({B: 0.6, A: 0.3}), dist({A: 0.6, B: 0.3})]).log()
            return torch.where((last == A)[:, None], ab[0], ab[1]), new

    cyclic = Cyclic({}, default=dist({A: 0.6, B: 0.3}))
    plain = run(strategy, cyclic, max_len=8, **kwargs)
    assert any(repeats_bigram(h.tokens) for hyps in plain for h in hyps)
    blocked = run(strategy, cyclic, max_len=8, rules=LogitRules(no_repeat_ngram=2), **kwargs)
    assert all(not repeats_bigram(h.tokens) for hyps in blocked for h in hyps)


def test_top_p_keeps_only_the_nucleus():
    logits = torch.tensor([[0.125, 0.5, 0.125, 0.25]]).log()
    kept = lambda p: torch.isfinite(top_p_filter(logits, p))[0].tolist()  # noqa: E731
    assert kept(0.75) == [False, True, False, True]
    assert kept(0.5) == [False, True, False, False]
    assert sum(kept(0.8)) == 3 and kept(0.8)[1] and kept(0.8)[3]  # one of the tied 0.125s
    assert kept(0.0) == [False, True, False, False]
    assert kept(1.0) == [True] * 4
    assert torch.equal(top_p_filter(logits, 0.75)[0, [1, 3]], logits[0, [1, 3]])
    assert torch.isfinite(top_k_filter(logits, 2))[0].tolist() == [False, True, False, True]
    assert torch.equal(top_k_filter(logits, 0), logits)


# ---------------------------------------------------------------- neural-step tests


@pytest.fixture(scope="module")
def net() -> TinyNet:
    return TinyNet()


def test_beam_size_one_equals_greedy(net):
    src, lengths = sources()
    g = net_run(greedy, net, src, lengths, 7)
    b = net_run(beam_search, net, src, lengths, 7, beam_size=1, length_penalty=0.0)
    assert tokens_of(g) == tokens_of(b)
    for gh, bh in zip(g, b, strict=True):
        assert gh[0].log_prob == pytest.approx(bh[0].log_prob, abs=1e-5)
        assert torch.allclose(gh[0].attention, bh[0].attention)


def test_temperature_zero_and_top_k_one_equal_greedy(net):
    src, lengths = sources()
    g = net_run(greedy, net, src, lengths, 7)
    for kwargs in ({"temperature": 0.0}, {"temperature": 1.3, "top_k": 1}):
        s = net_run(sample, net, src, lengths, 7, generator=torch.Generator().manual_seed(3),
                    **kwargs)
        assert tokens_of(s) == tokens_of(g)
        assert [h[0].log_prob for h in s] == pytest.approx([h[0].log_prob for h in g])


def test_seeded_sampling_is_reproducible_and_seeds_differ(net):
    src, lengths = sources()
    rules = LogitRules(min_length=12)  # no EOS: 4 x 12 draws from a spread distribution

    def draw(seed: int):
        return tokens_of(net_run(sample, net, src, lengths, 12, rules, temperature=1.5,
                                 generator=torch.Generator().manual_seed(seed)))

    assert draw(0) == draw(0)
    assert draw(0) != draw(1)


def test_batched_equals_one_at_a_time(net):
    src, lengths = sources()
    runs = [(greedy, {}),
            (beam_search, {"beam_size": 4, "n_best": 2, "length_penalty": 0.6,
                           "coverage_penalty": 0.3})]
    for strategy, kwargs in runs:
        batched = net_run(strategy, net, src, lengths, torch.tensor([5, 6, 3, 7]), **kwargs)
        for i, length in enumerate(lengths.tolist()):
            alone = net_run(strategy, net, src[i:i + 1, :length], lengths[i:i + 1],
                            torch.tensor([[5, 6, 3, 7][i]]), **kwargs)[0]
            assert [h.tokens for h in batched[i]] == [h.tokens for h in alone]
            for hb, ha in zip(batched[i], alone, strict=True):
                assert hb.score == pytest.approx(ha.score, abs=1e-5)
                assert hb.log_prob == pytest.approx(ha.log_prob, abs=1e-5)
                assert torch.allclose(hb.attention[:, :length], ha.attention, atol=1e-6)
                assert not hb.attention[:, length:].any()  # padding never attended


def test_attention_has_one_row_per_scored_step(net):
    src, lengths = sources()
    for strategy, kwargs in ((greedy, {}), (beam_search, {"beam_size": 3, "n_best": 3})):
        for hyps in net_run(strategy, net, src, lengths, 4, **kwargs):
            for h in hyps:
                steps = len(h.tokens) + (len(h.tokens) < 4)  # + EOS unless cut at max length
                assert h.attention.shape == (steps, src.shape[1])
                assert torch.allclose(h.attention.sum(1), torch.ones(steps))


def test_keep_attention_false_changes_nothing_but_the_attention(net):
    src, lengths = sources()
    for strategy, kwargs in ((greedy, {}), (beam_search, {"beam_size": 3, "n_best": 2,
                                                         "coverage_penalty": 0.2})):
        kept = net_run(strategy, net, src, lengths, 6, **kwargs)
        bare = net_run(strategy, net, src, lengths, 6, keep_attention=False, **kwargs)
        assert [[(h.tokens, h.score) for h in hyps] for hyps in bare] == \
            [[(h.tokens, h.score) for h in hyps] for hyps in kept]
        assert all(h.attention is None for hyps in bare for h in hyps)
        assert all(h.attention is not None for hyps in kept for h in hyps)


def test_n_best_distinct_and_sorted(net):
    src, lengths = sources()
    best = net_run(beam_search, net, src, lengths, 6, beam_size=5)
    results = net_run(beam_search, net, src, lengths, 6, beam_size=5, n_best=3)
    for one, hyps in zip(best, results, strict=True):
        assert len(hyps) == 3
        assert len({tuple(h.tokens) for h in hyps}) == 3
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True)
        assert hyps[0].tokens == one[0].tokens  # early stopping lost nothing for n_best=1


def exhaustive(net: TinyNet, src, length: int, max_len: int, alpha: float, beta: float):
    """Every allowed sequence up to max_len tokens, scored like beam search, best first."""
    allowed = [t for t in range(net.embed.num_embeddings) if t not in (PAD, BOS, EOS)]
    scored = []
    for n in range(max_len + 1):
        for body in itertools.product(allowed, repeat=n):
            fed = [BOS, *body] + ([EOS] if n < max_len else [])
            state = net.start(src[None, :length], torch.tensor([length]))
            log_prob = 0.0
            for prev, nxt in zip(fed, fed[1:], strict=False):
                log_probs, state = net.step(torch.tensor([prev]), state)
                log_prob += float(log_probs[0, nxt])
            steps = len(fed) - 1
            cover = float(state.coverage[0].clamp(1e-6, 1.0).log().sum())
            scored.append((list(body), log_prob / ((5 + steps) / 6) ** alpha + beta * cover))
    return sorted(scored, key=lambda x: -x[1])


@pytest.mark.parametrize("alpha,beta", [(0.0, 0.0), (0.8, 0.0), (0.6, 0.4)])
def test_large_beam_equals_exhaustive_search(net, alpha, beta):
    src, lengths = sources(lengths=(3, 1, 2))
    with torch.inference_mode():
        results = net_run(beam_search, net, src, lengths, 3, beam_size=6 ** 3, n_best=3,
                          length_penalty=alpha, coverage_penalty=beta)
        for i, length in enumerate(lengths.tolist()):
            truth = exhaustive(net, src[i], length, 3, alpha, beta)[:3]
            assert [h.tokens for h in results[i]] == [tokens for tokens, _ in truth]
            assert [h.score for h in results[i]] == pytest.approx([s for _, s in truth], abs=1e-5)


def test_on_tokens_streams_each_step_in_input_order(net):
    src, lengths = sources()
    max_lengths = [3, 6, 2, 5]
    seen: list[torch.Tensor] = []
    results = net_run(greedy, net, src, lengths, torch.tensor(max_lengths), on_tokens=seen.append)
    assert all(t.shape == (4,) for t in seen)
    for i, hyps in enumerate(results):
        stream = [int(t[i]) for t in seen if int(t[i]) != PAD]
        assert stream[: len(hyps[0].tokens)] == hyps[0].tokens
        assert stream[len(hyps[0].tokens):] in ([], [EOS])
        assert len(stream) <= max_lengths[i] + 1


def test_works_with_and_without_inference_mode(net):
    src, lengths = sources()
    plain = net_run(beam_search, net, src, lengths, 5, beam_size=3, coverage_penalty=0.2)
    with torch.inference_mode():
        inside = net_run(beam_search, net, src, lengths, 5, beam_size=3, coverage_penalty=0.2)
    assert tokens_of(plain) == tokens_of(inside)
    assert not plain[0][0].attention.requires_grad


def test_decode_dispatches_on_strategy(net):
    src, lengths = sources()
    first = torch.full((4,), BOS)
    max_lengths = torch.full((4,), 5)
    config = DecodeConfig(beam_size=3, n_best=2, length_penalty=0.6, min_length=1)
    rules = LogitRules(min_length=1)
    start = net.start(src, lengths)
    beam = decode(net.step, start, first, max_lengths, config, "beam")
    assert tokens_of(beam) == tokens_of(beam_search(net.step, start, first, max_lengths, rules,
                                                    3, 2, 0.6))
    assert tokens_of(decode(net.step, start, first, max_lengths, config, "greedy")) == \
        tokens_of(greedy(net.step, start, first, max_lengths, rules))
    drawn = decode(net.step, start, first, max_lengths, config, "sample",
                   generator=torch.Generator().manual_seed(4))
    again = sample(net.step, start, first, max_lengths, rules, 0.8, 0, 1.0,
                   torch.Generator().manual_seed(4))
    assert tokens_of(drawn) == tokens_of(again)
    with pytest.raises(ValueError, match="strategy"):
        decode(net.step, start, first, max_lengths, config, "viterbi")


def test_search_never_imports_the_model():
    tree = ast.parse(Path(search.__file__).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [name for name in names if name.startswith("seq2seq.model")]


class Opaque:
    """A state that records every attribute anyone reads from it; the step unwraps it.

    ``isinstance`` against another class reads ``__class__`` and is recorded too.
    """

    def __init__(self, inner, seen: set[str]):
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_seen", seen)

    def __getattribute__(self, name: str):
        seen = object.__getattribute__(self, "_seen")
        inner = object.__getattribute__(self, "_inner")
        seen.add(name)
        if name == "select":
            return lambda index: Opaque(inner.select(index), seen)
        return getattr(inner, name)


@pytest.mark.parametrize("strategy,kwargs", [
    (greedy, {}), (beam_search, {"beam_size": 3, "n_best": 2, "coverage_penalty": 0.2}),
    (sample, {"temperature": 1.0})])
def test_search_reads_only_the_state_protocol(net, strategy, kwargs):
    """Search sees ``select`` and the optional ``attention`` / ``coverage``, nothing else of a
    state's layout, and does not ask what class it is."""
    src, lengths = sources()
    seen: set[str] = set()

    def step(prev, state):
        log_probs, after = net.step(prev, object.__getattribute__(state, "_inner"))
        return log_probs, Opaque(after, seen)

    def seeded() -> dict:
        return {"generator": torch.Generator().manual_seed(2)} if strategy is sample else {}

    first, max_lengths = torch.full((4,), BOS), torch.tensor([5, 6, 3, 7])
    wrapped = strategy(step, Opaque(net.start(src, lengths), seen), first, max_lengths, NO_RULES,
                       **kwargs, **seeded())
    plain = strategy(net.step, net.start(src, lengths), first, max_lengths, NO_RULES, **kwargs,
                     **seeded())
    assert tokens_of(wrapped) == tokens_of(plain)
    assert "select" in seen and seen <= {"select", "attention", "coverage"}, seen


# ---------------------------------------------------------------- against the reference search

# Six inputs: source lengths, the length around which EOS becomes likely, and the token cap.
# Input 2 may emit nothing, input 5 one token; inputs 0 and 3 are cut by their cap; input 1
# wants to stop early (for min_length).
REF_SOURCES = [3, 7, 2, 5, 6, 1]
REF_TARGETS = [9, 1, 3, 8, 5, 2]
REF_MAX_LENGTHS = [6, 12, 0, 4, 9, 1]


def reference_results(model: PeakyModel, rules: LogitRules, beam: int, n_best: int,
                      alpha: float, beta: float) -> list[list[Hypothesis]]:
    start = model.start(REF_SOURCES, REF_TARGETS)
    return [reference_beam_search(model, start.select(torch.tensor([i])), BOS, max_len, rules,
                                  beam, n_best, alpha, beta, start.real[i].tolist())
            for i, max_len in enumerate(REF_MAX_LENGTHS)]


def batched_results(model: PeakyModel, rules: LogitRules, beam: int, n_best: int, alpha: float,
                    beta: float) -> list[list[Hypothesis]]:
    return beam_search(model, model.start(REF_SOURCES, REF_TARGETS),
                       torch.full((len(REF_SOURCES),), BOS), torch.tensor(REF_MAX_LENGTHS), rules,
                       beam, n_best, alpha, beta)


@pytest.mark.parametrize("beam,n_best,alpha,beta,rules,vocab,expose_coverage", [
    (1, 1, 0.6, 0.2, LogitRules(), 1024, True),
    (2, 2, 0.6, 0.2, LogitRules(min_length=3, no_repeat_ngram=2), 1024, True),
    (5, 3, 1.0, 0.4, LogitRules(min_length=2, no_repeat_ngram=3, ban_unk=True), 1024, True),
    (5, 5, -0.3, 0.1, LogitRules(no_repeat_ngram=2), 1000, False),
    (12, 5, 0.6, 0.2, LogitRules(min_length=4, no_repeat_ngram=2), 1024, True),
    (12, 12, 0.0, 0.0, LogitRules(no_repeat_ngram=1), 1024, False),
])
def test_batched_beam_search_equals_the_reference(beam, n_best, alpha, beta, rules, vocab,
                                                  expose_coverage):
    """Token-identical hypotheses and equal scores, in order, for every input of one batch.

    V = 1,024 takes the two-stage top-k of real models; V = 1,000 the plain one. Coverage comes
    from the state, or (when it exposes none) from the attention history.
    """
    model = PeakyModel(vocab, seed=beam, expose_coverage=expose_coverage)
    want = reference_results(model, rules, beam, n_best, alpha, beta)
    got = batched_results(model, rules, beam, n_best, alpha, beta)
    for i, (mine, ref) in enumerate(zip(got, want, strict=True)):
        assert [h.tokens for h in mine] == [h.tokens for h in ref], i
        assert [h.log_prob for h in mine] == pytest.approx([h.log_prob for h in ref], abs=1e-5)
        assert [h.score for h in mine] == pytest.approx([h.score for h in ref], abs=1e-5)
        for h, r in zip(mine, ref, strict=True):
            assert (h.attention is None) == (r.attention is None)
            if h.attention is not None:
                assert torch.equal(h.attention, r.attention)
    # the case exercises both endings
    hyps = [h for per_input in want for h in per_input if h.attention is not None]
    assert any(h.attention.shape[0] == len(h.tokens) + 1 for h in hyps)  # ended with EOS
    assert any(h.attention.shape[0] == len(h.tokens) for h in hyps)  # cut at the cap


def test_the_reference_case_blocks_repeats_and_holds_min_length():
    """The peaky model repeats bigrams unless blocked, and wants EOS before min_length."""
    model = PeakyModel(1024, seed=5)
    free = reference_results(model, LogitRules(), 5, 5, 0.6, 0.0)
    assert any(repeats_bigram(h.tokens) for hyps in free for h in hyps)
    assert any(len(h.tokens) < 4 for h in free[1])
    ruled = reference_results(model, LogitRules(min_length=4, no_repeat_ngram=2), 5, 5, 0.6, 0.0)
    assert not any(repeats_bigram(h.tokens) for hyps in ruled for h in hyps)
    assert all(len(h.tokens) >= min(4, cap) for hyps, cap in zip(ruled, REF_MAX_LENGTHS,
                                                                  strict=True) for h in hyps)


@pytest.mark.parametrize("strategy,kwargs", [
    (beam_search, dict(beam_size=5, n_best=3, length_penalty=0.6, coverage_penalty=0.2)),
    (greedy, {}),
])
def test_columns_over_token_ids_decode_like_the_full_vocabulary(strategy, kwargs):
    """A step that scores a target vocabulary only (columns = ``token_ids``) decodes exactly like
    the same step written over every id with -inf at the others: same tokens, scores, attention.
    The rules (bans, min length, n-gram blocking through the id -> column map) act alike."""
    model = PeakyModel(1024, seed=3)
    kept = torch.arange(1024)[(torch.arange(1024) % 3 != 1) | (torch.arange(1024) < 4)]

    def compact(prev: torch.Tensor, state):
        log_probs, state = model(prev, state)
        return torch.log_softmax(log_probs[:, kept], -1), state

    def full(prev: torch.Tensor, state):
        log_probs, state = compact(prev, state)
        return torch.full((len(prev), 1024), float("-inf")).index_copy_(1, kept, log_probs), state

    rules = LogitRules(min_length=2, no_repeat_ngram=2, ban_unk=True)
    first, caps = torch.full((len(REF_SOURCES),), BOS), torch.tensor(REF_MAX_LENGTHS)
    want = strategy(full, model.start(REF_SOURCES, REF_TARGETS), first, caps, rules, **kwargs)
    got = strategy(compact, model.start(REF_SOURCES, REF_TARGETS), first, caps, rules,
                   token_ids=kept, **kwargs)
    assert tokens_of(got) == tokens_of(want)
    assert not any(t % 3 == 1 for hyps in tokens_of(got) for h in hyps for t in h)
    for mine, ref in zip(got, want, strict=True):
        assert [h.score for h in mine] == pytest.approx([h.score for h in ref], abs=1e-6)
        assert all(torch.equal(a.attention, b.attention) for a, b in zip(mine, ref, strict=True)
                   if a.attention is not None)


def test_a_coverage_penalty_without_attention_warns_and_changes_nothing():
    # a state that exposes neither attention nor coverage: the penalty cannot apply
    table = TableStep({(): dist({A: 0.6, EOS: 0.4}), (A,): dist({EOS: 0.9, B: 0.1})},
                      default=dist({EOS: 1.0}))
    plain = run(beam_search, table, max_len=[4], beam_size=2, n_best=2)
    with pytest.warns(RuntimeWarning, match="coverage_penalty has no effect"):
        penalised = run(beam_search, table, max_len=[4], beam_size=2, n_best=2,
                        coverage_penalty=0.5)
    assert [h.tokens for h in penalised[0]] == [h.tokens for h in plain[0]]
    assert [h.score for h in penalised[0]] == [h.score for h in plain[0]]


def test_the_models_states_satisfy_the_search_protocols():
    from seq2seq.config import ModelConfig
    from seq2seq.model import CharLM, Seq2Seq

    config = ModelConfig(hidden_size=8, embed_dim=8, encoder_layers=2, decoder_layers=2)
    model = Seq2Seq(config, 16).eval()
    state = model.start(torch.tensor([[5, 6, EOS]]), torch.tensor([3]))
    assert isinstance(state, search.AttendingState) and isinstance(state, search.CoveringState)
    lm_state = CharLM(config, 16).start(2)
    assert not isinstance(lm_state, search.AttendingState)
    assert search.exposed_attention(lm_state) is None
    assert search.exposed_coverage(state) is state.coverage
