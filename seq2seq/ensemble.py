"""Several translation models decoded as one: their log-probabilities averaged at every step.

:class:`Ensemble` implements the step protocol of DESIGN section 4 (``start``, ``step``,
``state.select``, and ``output_ids``) over its members, so one search runs over the combined step
and ``search.py`` never learns that there is more than one model. The members must share a
tokenizer (the caller checks); they may score different target vocabularies, in which case the
combined step scores the union of their columns and a token a member cannot emit gets -inf from it.

The average is the arithmetic mean of log-probabilities (a normalised product of experts would
need a log-sum-exp per step); an ensemble of a model with itself is exactly that model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from seq2seq.search import DecoderState, exposed_attention, exposed_coverage


@dataclass(frozen=True)
class EnsembleState:
    """The members' states, row-aligned: row i of each is decoding row i of the ensemble."""

    members: tuple[DecoderState, ...]

    def select(self, index: Tensor) -> EnsembleState:
        """Rows by ``index`` (M,) long, in every member."""
        return EnsembleState(tuple(state.select(index) for state in self.members))

    @property
    def attention(self) -> Tensor | None:
        """(N, S) the members' mean attention of the last step, None when one has none."""
        return _mean([exposed_attention(state) for state in self.members])

    @property
    def coverage(self) -> Tensor | None:
        """(N, S) the members' mean attention mass so far, None when one has none."""
        return _mean([exposed_coverage(state) for state in self.members])


def _mean(tensors: list[Tensor | None]) -> Tensor | None:
    if any(t is None for t in tensors):
        return None
    total = tensors[0].clone()
    for tensor in tensors[1:]:
        total.add_(tensor)
    return total.div_(len(tensors))


class Ensemble(nn.Module):
    """Translation models that share a tokenizer, stepped together (see the module docstring)."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least two models, got {len(members)}")
        self.members = nn.ModuleList(members)
        ids = [member.output_ids() for member in members]
        union: Tensor | None = None  # the ensemble's column ids (None: every id)
        scatter: list[Tensor | None] = [None] * len(members)  # member column -> ours
        self._width = members[0].vocab_size
        if any(i is not None for i in ids):
            columns = [torch.arange(self._width) if i is None else i.cpu() for i in ids]
            union = torch.unique(torch.cat(columns))  # sorted, so the special ids stay 0-3
            scatter = [None if c.numel() == union.numel() else torch.searchsorted(union, c)
                       for c in columns]
            self._width = union.numel()
            union = None if union.numel() == members[0].vocab_size else union
        self.register_buffer("_union", union, persistent=False)  # moves with .to(device)
        for i, columns in enumerate(scatter):  # buffers too: no copy to the device per step
            self.register_buffer(f"_scatter{i}", columns, persistent=False)

    def output_ids(self) -> Tensor | None:
        """The token id of each column of :meth:`step`'s log-probs (None: column j is id j)."""
        return self._union

    def start(self, src: Tensor, src_lengths: Tensor) -> EnsembleState:
        """Every member encodes the batch: src (N, S), src_lengths (N,)."""
        return EnsembleState(tuple(member.start(src, src_lengths) for member in self.members))

    def step(self, prev: Tensor, state: EnsembleState) -> tuple[Tensor, EnsembleState]:
        """prev (N,) long -> the members' mean log-probs (N, V) and the next state."""
        total: Tensor | None = None
        states = []
        for i, (member, member_state) in enumerate(zip(self.members, state.members,
                                                       strict=True)):
            log_probs, new_state = member.step(prev, member_state)
            scatter = getattr(self, f"_scatter{i}")
            states.append(new_state)
            if scatter is not None:  # widen to the union's columns, -inf where it cannot emit
                wide = log_probs.new_full((log_probs.size(0), self._width), float("-inf"))
                log_probs = wide.index_copy_(1, scatter, log_probs)
            total = log_probs if total is None else total.add_(log_probs)
        assert total is not None
        return total.div_(len(self.members)), EnsembleState(tuple(states))
