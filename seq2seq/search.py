"""Greedy decoding, sampling and GNMT beam search over one step protocol.

Search sees only the protocols below: :class:`StepFn` ``step(prev (N,) long, state) ->
(log_probs (N, V), state)`` and :class:`DecoderState` ``state.select(index (M,) long) -> state``;
it reads ``state.attention`` (:class:`AttendingState`) and ``state.coverage``
(:class:`CoveringState`) when a state exposes them, and knows nothing else of its layout. The
log-probs a step returns belong to the search, which may write into them: beam search adds each
row's score in place, so a step never holds two (N, V) tensors. Their rows may be further
apart than V (a view of a row-padded tensor); search never copies them. State rows are
decoding rows: one per input for greedy and sampling, ``inputs * beam`` (input-major) for beam
search. Inputs that finish are dropped through ``state.select``.

Conventions shared by every strategy:

- ``max_lengths[i]`` caps the tokens of input ``i`` (EOS not counted). A hypothesis that reaches it
  is finalised as it stands: no EOS is forced or scored.
- ``Hypothesis.tokens`` exclude BOS and EOS. ``log_prob`` sums the model's log-probabilities of
  the scored steps: the tokens, plus EOS when the hypothesis ended with it. ``attention`` stacks
  the state's attention of each scored step: (len(tokens) + 1, S) when it ended with EOS,
  (len(tokens), S) when cut at the maximum length, None when the state exposes no attention or
  the caller passed ``keep_attention=False`` (which saves copying the history at every step).
- Greedy and sampling report ``score = log_prob``; beam search reports the GNMT score.
- PAD and BOS are never emitted; see :class:`LogitRules` for the optional rules.
- ``token_ids`` (V,) long, when given, is the token id of each log-prob column (a model that
  scores a target vocabulary only; ascending, with the special ids 0-3 as columns 0-3); without it
  column j is token j. Search chooses columns and hands ids to ``step`` and to the hypotheses.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from seq2seq.config import DecodeConfig
from seq2seq.tokenizer import BOS, EOS, PAD, UNK

TokenCallback = Callable[[Tensor], None]
NEG_INF = float("-inf")
COVERAGE_EPS = 1e-6  # coverage floor: an unattended source word costs beta * log(1e-6), not -inf


class DecoderState(Protocol):
    """The decoding state of N rows. Immutable: ``step`` and ``select`` return new states."""

    def select(self, index: Tensor) -> DecoderState:
        """Rows by ``index`` (M,) long: expand to beams, reorder, drop finished rows."""
        ...


@runtime_checkable
class AttendingState(DecoderState, Protocol):
    """A state that exposes the attention of its last step, (N, S) over the source positions
    (None: not exposed). Attention plots need it; so does the coverage penalty when the state
    exposes no coverage (search then sums the attention history)."""

    attention: Tensor | None


@runtime_checkable
class CoveringState(DecoderState, Protocol):
    """A state that exposes its coverage: attention mass per source position summed over the
    steps so far, (N, S) (None: not exposed)."""

    coverage: Tensor | None


class StepFn(Protocol):
    """One decoding step: the previous tokens (N,) long -> next-token log-probs (N, V), which
    the search may write into, and the new state."""

    def __call__(self, prev: Tensor, state: DecoderState, /) -> tuple[Tensor, DecoderState]: ...


class Decodable(Protocol):
    """What inference and validation need of a model beyond its ``start``, whose arguments
    differ by task: ``step`` and the token id of each log-prob column (None: column j is
    token j)."""

    def step(self, prev: Tensor, state: DecoderState) -> tuple[Tensor, DecoderState]: ...

    def output_ids(self) -> Tensor | None: ...


def exposed_attention(state: DecoderState) -> Tensor | None:
    """``state.attention`` when the state exposes it, else None."""
    return state.attention if isinstance(state, AttendingState) else None


def exposed_coverage(state: DecoderState) -> Tensor | None:
    """``state.coverage`` when the state exposes it, else None."""
    return state.coverage if isinstance(state, CoveringState) else None


@dataclass
class Hypothesis:
    """One decoded sequence of an input (see the module docstring for each field)."""

    tokens: list[int]
    log_prob: float
    score: float
    attention: Tensor | None = None


@dataclass(frozen=True)
class LogitRules:
    """Constraints on the next token, applied by :func:`apply_rules` at every step.

    ``min_length``: EOS is forbidden while fewer tokens than this were emitted (a maximum length
    below it wins). ``ban_unk``: never emit UNK. ``no_repeat_ngram``: never complete an n-gram
    that already occurs in the emitted tokens (0 = off; the prompt or ``first`` is not included).
    """

    min_length: int = 0
    ban_unk: bool = False
    no_repeat_ngram: int = 0


# ---------------------------------------------------------------- pure logit functions


def repeated_ngrams(history: Tensor, n: int, vocab_size: int) -> Tensor | None:
    """(N, V) bool: per row, each token that would repeat an n-gram of ``history`` (N, t); None
    when no n-gram can repeat yet.

    The candidate n-gram is the last n - 1 tokens plus the next one; every earlier window of n
    tokens whose first n - 1 tokens equal them bans its last token.
    """
    t = history.shape[1]
    if n < 1 or t < n:
        return None
    windows = history.unfold(1, n, 1)  # (N, t - n + 1, n)
    prefix = history[:, t - n + 1:]  # (N, n - 1)
    match = (windows[:, :, :-1] == prefix[:, None, :]).all(-1)  # (N, W)
    hits = torch.zeros((history.shape[0], vocab_size), device=history.device)
    hits.scatter_add_(1, windows[:, :, -1], match.to(hits.dtype))
    return hits > 0


def apply_rules(log_probs: Tensor, history: Tensor, rules: LogitRules,
                inplace: bool = False, token_ids: Tensor | None = None) -> Tensor:
    """``log_probs`` (N, V) with the tokens forbidden after ``history`` (N, t) set to -inf.

    ``inplace`` writes into ``log_probs`` (for a tensor the caller owns) instead of a copy;
    ``token_ids`` as in the module docstring (``history`` holds ids, not columns).
    """
    banned = [PAD, BOS]
    if rules.ban_unk:
        banned.append(UNK)
    if history.shape[1] < rules.min_length:
        banned.append(EOS)
    out = log_probs if inplace else log_probs.clone()
    out[:, banned] = NEG_INF
    if rules.no_repeat_ngram > 0:
        columns = history if token_ids is None else torch.searchsorted(token_ids, history)
        repeats = repeated_ngrams(columns, rules.no_repeat_ngram, out.shape[1])
        if repeats is not None:
            out.masked_fill_(repeats, NEG_INF)
    return out


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits per row (ties at the k-th kept); k <= 0 keeps all."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Keep the nucleus: a token survives while the mass of the tokens more likely than it is
    below ``p``, so the most likely token always survives and p >= 1 keeps all."""
    if p >= 1.0:
        return logits
    ordered, order = logits.sort(dim=-1, descending=True)
    probs = torch.softmax(ordered, dim=-1)
    drop = (probs.cumsum(-1) - probs) >= p
    drop[:, 0] = False
    return logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), NEG_INF)


def length_normaliser(steps: Tensor | float, alpha: float) -> Tensor | float:
    """GNMT ``((5 + |Y|) / 6) ** alpha``; |Y| counts the scored steps (tokens plus EOS)."""
    return ((5.0 + steps) / 6.0) ** alpha


def coverage_score(coverage: Tensor, real: Tensor, beta: float) -> Tensor:
    """GNMT ``beta * sum_j log(min(coverage_j, 1))`` (R,) over real source positions only.

    ``coverage`` (R, S) is the attention mass per source position; ``real`` (R, S) bool marks the
    positions that count (padding would add log(0)); coverage is clamped to ``COVERAGE_EPS``.
    """
    logs = coverage.float().clamp(COVERAGE_EPS, 1.0).log()
    return beta * torch.where(real, logs, torch.zeros_like(logs)).sum(-1)


# ---------------------------------------------------------------- greedy and sampling


def _at(x: Tensor | None, index: Tensor | int) -> Tensor | None:
    """``x[index]``, passing None through (for what a state may not expose)."""
    return None if x is None else x[index]


def _step_attention(state: DecoderState, history: Tensor | None) -> Tensor | None:
    """Append the state's attention (R, S) to ``history`` (R, t, S) -> (R, t + 1, S)."""
    attention = exposed_attention(state)
    if attention is None:
        return None
    attention = attention.detach().float()[:, None]
    return attention if history is None else torch.cat([history, attention], 1)


def _empty_hypotheses(max_lengths: Tensor, results: list[list[Hypothesis]]) -> Tensor:
    """Give inputs allowed no token one empty hypothesis; return the others' indices."""
    for i in (max_lengths <= 0).nonzero().flatten().tolist():
        results[i] = [Hypothesis([], 0.0, 0.0, None)]
    return (max_lengths > 0).nonzero().flatten()


def _token_loop(step: StepFn, state: DecoderState, first: Tensor, max_lengths: Tensor,
                rules: LogitRules, choose: Callable[[Tensor], Tensor],
                on_tokens: TokenCallback | None, keep_attention: bool,
                token_ids: Tensor | None) -> list[list[Hypothesis]]:
    """One token per row per step, chosen by ``choose(log_probs (M, V)) -> (M,)`` columns."""
    n, device = first.shape[0], first.device
    results: list[list[Hypothesis]] = [[] for _ in range(n)]
    inputs = _empty_hypotheses(max_lengths.to(device), results)  # (M,) input of each row
    if inputs.numel() < n:
        state = state.select(inputs)
    max_len, prev = max_lengths.to(device)[inputs], first[inputs]
    tokens = first.new_zeros((inputs.numel(), 0))  # (M, t)
    log_prob = torch.zeros(inputs.numel(), device=device)
    attention: Tensor | None = None  # (M, t, S)
    while inputs.numel():
        raw, state = step(prev, state)
        raw = raw.detach().float()
        column = choose(apply_rules(raw, tokens, rules, True, token_ids))  # never a banned one
        log_prob = log_prob + raw.gather(1, column[:, None]).squeeze(1)
        prev = column if token_ids is None else token_ids[column]
        tokens = torch.cat([tokens, prev[:, None]], 1)
        attention = _step_attention(state, attention) if keep_attention else None
        if on_tokens is not None:
            on_tokens(first.new_full((n,), PAD).index_copy(0, inputs, prev))
        ended = prev == EOS
        done = ended | (tokens.shape[1] >= max_len)
        if not bool(done.any()):
            continue
        for r in done.nonzero().flatten().tolist():
            keep, score = tokens.shape[1] - int(ended[r]), float(log_prob[r])
            attn = _at(attention, r)
            results[int(inputs[r])] = [Hypothesis(tokens[r, :keep].tolist(), score, score,
                                                  None if attn is None else attn.clone())]
        alive = (~done).nonzero().flatten()
        if alive.numel():
            state = state.select(alive)
        inputs, max_len, prev, tokens, log_prob = (
            x[alive] for x in (inputs, max_len, prev, tokens, log_prob))
        attention = _at(attention, alive)
    return results


@torch.no_grad()
def greedy(step: StepFn, state: DecoderState, first: Tensor, max_lengths: Tensor, rules: LogitRules,
           on_tokens: TokenCallback | None = None, keep_attention: bool = True,
           token_ids: Tensor | None = None) -> list[list[Hypothesis]]:
    """The most likely token at every step; one hypothesis per input.

    ``first`` (N,) long is each row's first input token, ``max_lengths`` (N,) long the token caps.
    ``on_tokens(tokens (N,))`` gets each step's tokens in input order, PAD for finished inputs.
    """
    return _token_loop(step, state, first, max_lengths, rules,
                       lambda lp: lp.argmax(-1), on_tokens, keep_attention, token_ids)


@torch.no_grad()
def sample(step: StepFn, state: DecoderState, first: Tensor, max_lengths: Tensor, rules: LogitRules,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None, on_tokens: TokenCallback | None = None,
           keep_attention: bool = True, token_ids: Tensor | None = None) -> list[list[Hypothesis]]:
    """Ancestral sampling from ``softmax(log_probs / temperature)`` cut to top-k and top-p.

    Temperature 0 is greedy. ``generator`` (on the tensors' device) makes draws reproducible;
    ``log_prob`` is the model's, not the tempered one. Shapes as in :func:`greedy`.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return greedy(step, state, first, max_lengths, rules, on_tokens, keep_attention,
                      token_ids)

    def choose(log_probs: Tensor) -> Tensor:
        logits = top_p_filter(top_k_filter(log_probs / temperature, top_k), top_p)
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    return _token_loop(step, state, first, max_lengths, rules, choose, on_tokens, keep_attention,
                       token_ids)


# ---------------------------------------------------------------- beam search


@dataclass
class _Beams:
    """The open hypotheses of the M active inputs, K rows each (input-major)."""

    inputs: Tensor  # (M,) index of each active input in the caller's batch
    max_len: Tensor  # (M,) token cap
    log_prob: Tensor  # (M*K,) cumulative log-probability
    tokens: Tensor  # (M*K, t) emitted tokens
    attention: Tensor | None  # (M*K, t, S) attention of each step
    real: Tensor | None  # (M, S) source positions counted by the coverage penalty

    def select(self, keep: Tensor, rows: Tensor) -> _Beams:
        """Keep inputs ``keep`` (M',) and rows ``rows`` (M'*K,)."""
        return _Beams(self.inputs[keep], self.max_len[keep], self.log_prob[rows],
                      self.tokens[rows], _at(self.attention, rows), _at(self.real, keep))


@dataclass
class _Finished:
    """The n best finished hypotheses per input, and the score a newcomer must beat."""

    alpha: float
    beta: float
    n_best: int
    keep_attention: bool
    kept: list[list[Hypothesis]]
    worst: Tensor  # (N,) score of the n-th kept hypothesis, -inf while fewer are kept

    def offer(self, inputs: Tensor, log_prob: Tensor, steps: int, tokens: Tensor,
              attention: Tensor | None, coverage: Tensor | None, real: Tensor | None) -> None:
        """Score C candidates (inputs (C,), tokens (C, L), coverage (C, S)) and keep the best."""
        score = log_prob / length_normaliser(steps, self.alpha)
        if coverage is not None and self.beta != 0:
            mask = torch.ones_like(coverage, dtype=torch.bool) if real is None else real
            score = score + coverage_score(coverage, mask, self.beta)
        better = (score > self.worst[inputs]).nonzero().flatten()
        if better.numel() == 0:
            return
        for c, i, lp, s in zip(better.tolist(), inputs[better].tolist(),
                               log_prob[better].tolist(), score[better].tolist(), strict=True):
            kept = self.kept[i]
            if len(kept) == self.n_best and s <= kept[-1].score:
                continue
            attn = attention[c].clone() if attention is not None and self.keep_attention else None
            kept.append(Hypothesis(tokens[c].tolist(), lp, s, attn))
            kept.sort(key=lambda h: -h.score)
            del kept[self.n_best:]
            if len(kept) == self.n_best:
                self.worst[i] = kept[-1].score


def _coverage(coverage: Tensor | None, attention: Tensor | None, beta: float) -> Tensor | None:
    """Coverage (R, S): the state's ``coverage``, else the summed attention history; None when
    beta = 0."""
    if beta == 0:
        return None
    if coverage is None and attention is not None:
        coverage = attention.sum(1)
    return None if coverage is None else coverage.detach().float()


def _top_k_of_groups(total: Tensor, k: int, n: int) -> tuple[Tensor, Tensor]:
    """The n largest values of each group of k consecutive rows of ``total`` (M*K, V), and their
    indices into the group's K*V values: each (M, n), as ``total.view(M, K*V).topk(n)`` gives.

    Two stages, faster than that (``benchmarks/kernels.py`` measures both): the first 8W
    columns of each row (W = V // 8) are cut into W blocks of 8 strided columns (j, j + W, ...),
    the n blocks with the largest maxima are kept, and a top-n over their 8n values and the
    last V - 8W (< 8) columns of the group's rows finishes. Exact: each of the n largest values
    is in those columns or in a block whose maximum is at least it, and fewer than n blocks can
    have a larger maximum. ``total``'s rows may be apart by more than V (a model's log-probs
    are a view of a row-padded tensor): nothing here copies it.
    """
    rows, v = total.shape
    blocks_per_row = 8
    width = v // blocks_per_row
    if width * k < n:  # small vocabularies: one plain top-n
        return total.reshape(-1, k * v).topk(n, dim=1)
    groups, blocked, device = rows // k, width * blocks_per_row, total.device
    block_max = total[:, :blocked].reshape(rows, blocks_per_row, width).amax(1)
    blocks = block_max.view(groups, k * width).topk(n, dim=1).indices  # row-in-group * W + j
    spread = torch.arange(blocks_per_row, device=device) * width
    flat = ((blocks // width * v + blocks % width)[:, :, None] + spread).view(groups, -1)
    if blocked < v:  # the columns after the blocks, of every row in the group
        rest = (torch.arange(k, device=device)[:, None] * v
                + torch.arange(blocked, v, device=device)).view(1, -1)
        flat = torch.cat([flat, rest.expand(groups, -1)], dim=1)
    group_of = torch.arange(groups, device=device)[:, None]
    values, pick = total.view(groups, k, v)[group_of, flat // v, flat % v].topk(n, dim=1)
    return values, flat.gather(1, pick)


def _candidates(total: Tensor, group: int, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The 2K best extensions per input of ``total`` (M*group, V), each beam's log-prob plus
    its next-token log-probs: log-probs, parent rows and tokens, each (M, 2K).

    At most ``group`` <= K of them end in EOS (one per parent), so at least K continue. A
    vocabulary too small for 2K candidates is padded with -inf ones (PAD from the first row).
    """
    v = total.shape[1]
    scores, flat = _top_k_of_groups(total, group, min(2 * k, group * v))
    rows = flat // v + torch.arange(scores.shape[0], device=total.device)[:, None] * group
    tokens = flat % v
    if scores.shape[1] < 2 * k:
        missing = (scores.shape[0], 2 * k - scores.shape[1])
        scores = torch.cat([scores, scores.new_full(missing, NEG_INF)], 1)
        rows = torch.cat([rows, rows[:, :1].expand(missing)], 1)
        tokens = torch.cat([tokens, tokens.new_full(missing, PAD)], 1)
    return scores, rows, tokens


def _bound(beams: _Beams, k: int, steps: int, alpha: float) -> Tensor:
    """The best score any continuation of an input's open beams can reach (M,).

    Log-probs only fall as tokens are added and the coverage penalty is <= 0, so the bound is the
    best open log-prob L (<= 0) over the largest normaliser a finished length may get:
    L / max(lp(steps + 1), lp(max_len)) (lp is monotone in |Y| for either sign of alpha).
    """
    best = beams.log_prob.view(-1, k).max(1).values
    norm = length_normaliser(beams.max_len.float(), alpha)
    return best / norm.clamp(min=length_normaliser(steps + 1, alpha))


@torch.no_grad()
def beam_search(step: StepFn, state: DecoderState, first: Tensor, max_lengths: Tensor,
                rules: LogitRules, beam_size: int, n_best: int = 1, length_penalty: float = 0.6,
                coverage_penalty: float = 0.0, keep_attention: bool = True,
                token_ids: Tensor | None = None) -> list[list[Hypothesis]]:
    """GNMT beam search; per input the ``n_best`` hypotheses, best score first.

    ``first`` (N,) long, ``max_lengths`` (N,) long. Score = log_prob / lp(|Y|) + cp with
    lp = ((5 + |Y|) / 6) ** length_penalty over |Y| scored steps and
    cp = coverage_penalty * sum_j log(min(coverage_j, 1)) over real source positions: those the
    first step attends (coverage > 0) in an input's beams, which with softmax attention over a
    masked source is exactly the unpadded source. Each step keeps the K best non-EOS extensions
    open; EOS extensions among the K best candidates finish. An input stops when it holds
    ``n_best`` finished hypotheses that no open one can beat (:func:`_bound`), or at its maximum
    length, where the open hypotheses are finalised as they stand.
    """
    if not 1 <= n_best <= beam_size:
        raise ValueError(f"need 1 <= n_best <= beam_size, got n_best={n_best}, beam={beam_size}")
    if coverage_penalty < 0:
        raise ValueError(f"coverage_penalty must be >= 0, got {coverage_penalty}")
    n, k, device = first.shape[0], beam_size, first.device
    finished = _Finished(length_penalty, coverage_penalty, n_best, keep_attention,
                         [[] for _ in range(n)],
                         torch.full((n,), NEG_INF, device=device))
    live = _empty_hypotheses(max_lengths.to(device), finished.kept)
    if live.numel() == 0:
        return finished.kept
    # The first step runs one row per input (its K beams would all be that row); its 2K
    # candidates then become the K rows of each input.
    state, prev, group = state.select(live), first[live], 1
    beams = _Beams(live, max_lengths.to(device)[live], torch.zeros(live.numel(), device=device),
                   first.new_zeros((live.numel(), 0)), None, None)
    offsets = torch.arange(k, device=device)
    while True:
        raw, state = step(prev, state)
        t = beams.tokens.shape[1]  # tokens emitted before this step
        # (R, V): the step's fresh tensor, summed in place; -inf stays -inf after the sum
        total = raw.detach().float().add_(beams.log_prob[:, None])
        apply_rules(total, beams.tokens, rules, True, token_ids)
        del raw
        exposed = exposed_coverage(state) if coverage_penalty != 0 else None  # once a step
        history = keep_attention or (coverage_penalty != 0 and exposed is None)
        attention = _step_attention(state, beams.attention) if history else None  # (R, t+1, S)
        coverage = _coverage(exposed, attention, coverage_penalty)  # (R, S)
        if coverage is None and coverage_penalty != 0 and t == 0:
            warnings.warn("coverage_penalty has no effect: the model's decoding state exposes "
                          "neither attention nor coverage", RuntimeWarning, stacklevel=3)
        if beams.real is None and coverage is not None:
            beams.real = (coverage.view(-1, group, coverage.shape[1]) > 0).any(1)
        scores, parents, tokens = _candidates(total, group, k)
        group = k
        del total  # before the next step allocates its own (R, V) tensor
        if token_ids is not None:
            tokens = token_ids[tokens]

        # EOS among the K best candidates: finish (tokens so far, t + 1 scored steps)
        m, j = (tokens[:, :k] == EOS).nonzero(as_tuple=True)
        if m.numel():
            row = parents[m, j]
            finished.offer(beams.inputs[m], scores[m, j], t + 1, beams.tokens[row],
                           _at(attention, row), _at(coverage, row), _at(beams.real, m))

        # the K best non-EOS candidates stay open
        pick = (tokens == EOS).int().argsort(dim=1, stable=True)[:, :k]
        origin = parents.gather(1, pick).view(-1)  # (M*K,) parent row of each new beam
        chosen = tokens.gather(1, pick).view(-1)
        beams.log_prob = scores.gather(1, pick).view(-1)
        beams.tokens = torch.cat([beams.tokens[origin], chosen[:, None]], 1)
        beams.attention, coverage = _at(attention, origin), _at(coverage, origin)

        at_max = beams.max_len <= t + 1
        if bool(at_max.any()):
            m = at_max.nonzero().flatten().repeat_interleave(k)  # input of each row
            row = m * k + offsets.repeat(len(m) // k)
            finished.offer(beams.inputs[m], beams.log_prob[row], t + 1, beams.tokens[row],
                           _at(beams.attention, row), _at(coverage, row), _at(beams.real, m))
        bound = _bound(beams, k, t + 1, length_penalty)
        done = at_max | (bound <= finished.worst[beams.inputs])
        keep = (~done).nonzero().flatten()
        if keep.numel() == 0:
            return finished.kept
        rows = (keep[:, None] * k + offsets).view(-1)
        beams = beams.select(keep, rows)
        state, prev = state.select(origin[rows]), chosen[rows]


def decode(step: StepFn, state: DecoderState, first: Tensor, max_lengths: Tensor,
           config: DecodeConfig, strategy: str, generator: torch.Generator | None = None,
           on_tokens: TokenCallback | None = None, keep_attention: bool = True,
           token_ids: Tensor | None = None) -> list[list[Hypothesis]]:
    """Run ``strategy`` ("beam" | "greedy" | "sample") with the settings of ``config``.

    ``on_tokens`` streams greedy and sampled tokens; beam search does not stream.
    ``keep_attention=False`` leaves ``Hypothesis.attention`` None.
    """
    rules = LogitRules(config.min_length, config.ban_unk, config.no_repeat_ngram)
    if strategy == "beam":
        return beam_search(step, state, first, max_lengths, rules, config.beam_size,
                           config.n_best, config.length_penalty, config.coverage_penalty,
                           keep_attention, token_ids)
    if strategy == "greedy":
        return greedy(step, state, first, max_lengths, rules, on_tokens, keep_attention,
                      token_ids)
    if strategy == "sample":
        return sample(step, state, first, max_lengths, rules, config.temperature, config.top_k,
                      config.top_p, generator, on_tokens, keep_attention, token_ids)
    raise ValueError(f"unknown decoding strategy {strategy!r}; use 'beam', 'greedy' or 'sample'")
