"""The GNMT v2 encoder-decoder (DESIGN section 3) and its immutable decoding state.

Encoder: embeddings -> bidirectional layer (hidden/2 per direction) -> unidirectional layers,
residual from the third layer up. Decoder: layer 1 over the target embeddings; its outputs query
the attention over the encoder memory; the context is concatenated to the input of every upper
layer and to the output layer. No input feeding, so teacher-forced training runs every layer as
one whole-sequence fused call and the attention for all target positions as one batched op, and
``step`` is the same code with T = 1, except that an LSTM's bottom layer reads its input gates
from a table (:meth:`Seq2Seq.input_gate_table`). As in GNMT v2 the decoder starts from a zero
state, unless ``config.bridge``: then every decoder layer starts from ``tanh(W m)`` (h) and
``W' m`` (c) of the mean ``m`` of the encoder outputs, so the decoder knows the source before its
attention has learned where to look (OpenNMT-py and Joey NMT pass the encoder's final states on
in the same spirit).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from seq2seq.config import ModelConfig
from seq2seq.model.attention import BahdanauAttention
from seq2seq.model.dropout import Dropout
from seq2seq.model.quantize import SplitGatesLSTM
from seq2seq.model.recurrent import (
    BidirectionalLayer,
    DerivedTensors,
    OutputLayer,
    RecurrentStack,
    State,
    lstm_cell,
    make_embedding,
    rnn_flops,
    select_rows,
)

INPUT_TABLE_BYTES = 64 << 20  # the bottom layer's input-gate table is used up to this size


@dataclass(frozen=True)
class TranslationState:
    """Everything ``step`` needs for N decoding rows (sentences x beams). Never mutated: ``step``
    and ``select`` return new states.

    The encoder side (memory, keys, mask) is held once per source sentence, G rows, and
    ``source`` maps each decoding row to its sentence. ``select`` only re-indexes the per-row
    parts, and shrinks the per-sentence parts when a sentence has no row left; it never copies
    the memory per beam. When the rows are ``group`` consecutive rows per sentence in order (as
    beam search keeps them), ``step`` attends with each sentence's rows as one block of queries
    against its keys; any other layout gathers the memory per row.
    """

    memory: Tensor  # (G, S, H) encoder outputs, zero at padding
    keys: Tensor  # (G, S, A) attention keys, projected once
    mask: Tensor  # (G, S) bool, True at real source positions
    source: Tensor  # (N,) long: the sentence (row of memory) each decoding row belongs to
    group: int  # rows per sentence when source == arange(G).repeat_interleave(group), else 0
    bottom: State  # decoder layer 1: (h, c) or (h,), each (N, 1, H)
    upper: State  # decoder layers 2..L: each (N, L-1, H); () when L = 1
    coverage: Tensor  # (N, S) attention mass summed over the steps so far (0 at padding)
    attention: Tensor  # (N, S) the last step's attention weights (zeros before the first step)

    def select(self, index: Tensor) -> TranslationState:
        """Rows by ``index`` (M,) long: expand to beams, reorder, drop finished."""
        sentences, source = torch.unique(self.source.index_select(0, index), return_inverse=True)
        memory, keys, mask = self.memory, self.keys, self.mask
        if sentences.numel() < memory.size(0):  # some sentence lost all its rows
            memory, keys, mask = (x.index_select(0, sentences) for x in (memory, keys, mask))
        return TranslationState(
            memory=memory, keys=keys, mask=mask, source=source,
            group=_group_size(source, sentences.numel()),
            bottom=select_rows(self.bottom, index), upper=select_rows(self.upper, index),
            coverage=self.coverage.index_select(0, index),
            attention=self.attention.index_select(0, index),
        )


def _group_size(source: Tensor, sentences: int) -> int:
    """k when ``source`` is ``arange(sentences).repeat_interleave(k)``, else 0."""
    k = source.numel() // max(sentences, 1)
    if k == 0 or k * sentences != source.numel():
        return 0
    expected = torch.arange(sentences, device=source.device).repeat_interleave(k)
    return k if torch.equal(source, expected) else 0


class Seq2Seq(nn.Module):
    """``forward(src, src_lengths, tgt_in) -> logits``; ``start`` / ``step`` for search."""

    def __init__(self, config: ModelConfig, vocab_size: int):
        super().__init__()
        self.config, self.vocab_size = config, vocab_size
        c, hidden = config, config.hidden_size
        self.src_embed = make_embedding(vocab_size, c.embed_dim, c.init_scale)
        # One vocabulary for both sides when tied (the same module under two names).
        self.tgt_embed = (self.src_embed if c.tie_embeddings
                          else make_embedding(vocab_size, c.embed_dim, c.init_scale))
        self.dropout = Dropout(c.dropout)
        self.encoder_bottom = BidirectionalLayer(c.cell, c.embed_dim, hidden, c.init_scale)
        self.encoder_upper = RecurrentStack(c.cell, hidden, hidden, c.encoder_layers - 1,
                                            c.dropout, c.init_scale, residual_from=1)
        self.decoder_bottom = RecurrentStack(c.cell, c.embed_dim, hidden, 1, c.dropout,
                                             c.init_scale)
        self.attention = BahdanauAttention(hidden, hidden, hidden, c.init_scale)
        self.decoder_upper = RecurrentStack(c.cell, hidden, hidden, c.decoder_layers - 1,
                                            c.dropout, c.init_scale, extra_size=hidden,
                                            residual_from=1)
        self.output = OutputLayer(2 * hidden, self.tgt_embed, vocab_size, c.output_projection,
                                  c.tie_embeddings, c.dropout, c.init_scale, c.target_vocabulary)
        parts = 2 if c.cell == "lstm" else 1  # (h, c) or (h,)
        self.bridge = nn.Linear(hidden, parts * c.decoder_layers * hidden) if c.bridge else None
        if self.bridge is not None:
            nn.init.uniform_(self.bridge.weight, -c.init_scale, c.init_scale)
            nn.init.zeros_(self.bridge.bias)
        self._input_table = DerivedTensors()  # see input_gate_table

    def initial_state(self, memory: Tensor, mask: Tensor) -> tuple[State, State]:
        """The decoder's first bottom and upper states for memory (B,S,H), mask (B,S): zeros, or
        with the bridge the projection of the mean encoder output (each part (B, L, H))."""
        rows = memory.size(0)
        if self.bridge is None:
            return (self.decoder_bottom.zero_state(rows, memory),
                    self.decoder_upper.zero_state(rows, memory))
        mean = memory.sum(1) / mask.sum(1, keepdim=True).clamp(min=1).to(memory.dtype)
        parts = self.bridge(mean).view(rows, -1, self.config.decoder_layers, memory.size(-1))
        state = (torch.tanh(parts[:, 0]), *parts[:, 1:].unbind(1))  # h, then c for an LSTM
        upper = tuple(part[:, 1:] for part in state) if self.config.decoder_layers > 1 else ()
        return tuple(part[:, :1] for part in state), upper

    def encode(self, src: Tensor, src_lengths: Tensor) -> tuple[Tensor, Tensor]:
        """src (B,S) long, src_lengths (B,) -> memory (B,S,H) (zero at padding), mask (B,S)."""
        steps = torch.arange(src.size(1), device=src.device)
        mask = steps.unsqueeze(0) < src_lengths.to(src.device).unsqueeze(1)
        x = self.encoder_bottom(self.dropout(self.src_embed(src)), src_lengths)
        # Upper layers are causal: the garbage at padding (after the end) cannot reach real tokens.
        x, _ = self.encoder_upper(x)
        return x.masked_fill(~mask.unsqueeze(-1), 0.0), mask

    def decode(self, tgt_in: Tensor, memory: Tensor, keys: Tensor, mask: Tensor,
               bottom: State | None = None, upper: State | None = None,
               group: int = 1) -> tuple[Tensor, Tensor, State, State]:
        """tgt_in (B,T) long over memory (B/group,S,H), keys (B/group,S,A), mask (B/group,S),
        from states (None = zeros) -> the output layer's input ``[top; context]`` (B,T,2H),
        attention weights (B,T,S), new bottom and upper states. ``group`` consecutive rows
        share one source sentence (beams, T = 1)."""
        x, bottom = self._bottom_layer(tgt_in, bottom)  # (B, T, H)
        if group > 1:  # each sentence's beams are its queries: (G, group, H)
            rows, _, hidden = x.shape
            context, weights = self.attention(x.view(rows // group, group, hidden), keys, memory,
                                              mask)
            context, weights = context.reshape(rows, 1, -1), weights.reshape(rows, 1, -1)
        else:
            context, weights = self.attention(x, keys, memory, mask)  # (B,T,H), (B,T,S)
        x, upper = self.decoder_upper(x, upper, extra=context)
        return torch.cat([x, context], dim=-1), weights, bottom, upper

    def _bottom_layer(self, tgt_in: Tensor, bottom: State | None) -> tuple[Tensor, State]:
        """The bottom decoder layer over the target embeddings: (B, T, H) and its state. A
        decoding step (T = 1, no autograd, eval mode) of an LSTM takes ``E W_ih + b`` from
        :meth:`input_gate_table` instead of a matmul: the gates are one ``addmm`` of ``h W_hh``
        onto the fed ids' rows, then :func:`lstm_cell`."""
        found = (self.input_gate_table() if tgt_in.size(1) == 1 and bottom is not None
                 and not self.training and not torch.is_grad_enabled() else None)
        if found is not None:
            table, row_of = found
            rows = tgt_in[:, 0] if row_of is None else row_of[tgt_in[:, 0]]
            if row_of is None or bool((rows >= 0).all()):
                lstm = self.decoder_bottom.layers[0]
                h, c = bottom[0][:, 0], bottom[1][:, 0]
                if isinstance(lstm, SplitGatesLSTM):  # int8: the hidden half is its own matmul
                    gates = table.index_select(0, rows).add_(lstm.hidden_gates(h))
                else:
                    gates = torch.addmm(table.index_select(0, rows), h, lstm.weight_hh_l0.t())
                h, c = lstm_cell(gates, c)
                return h[:, None], (h[:, None], c[:, None])
        return self.decoder_bottom(self.tgt_embed(tgt_in), bottom)

    def input_gate_table(self) -> tuple[Tensor, Tensor | None] | None:
        """For decoding: the bottom LSTM's input gates ``E W_ih^T + b_ih + b_hh`` of every id the
        decoder can be fed, (rows, 4H), and each id's row (-1 for none; None when row = id).

        The bottom layer's input is the embedding of the previous token alone (no input
        feeding), so its input half of the gate matmul — half of that layer's work, a tenth of a
        beam-search step — is a lookup. The rows are the target vocabulary's ids when the model
        has one, else every id; kept until the weights change (:class:`DerivedTensors`). The
        layer is an ``nn.LSTM``, or an int8 model's :class:`SplitGatesLSTM` (whose input half
        stays fp32). None for a GRU, or when a table over the whole vocabulary would pass
        ``INPUT_TABLE_BYTES`` (a bound read off the shapes, so a step does no work to check it).
        """
        lstm = self.decoder_bottom.layers[0]
        if isinstance(lstm, nn.LSTM):
            weight_ih, biases = lstm.weight_ih_l0, (lstm.bias_ih_l0, lstm.bias_hh_l0)
        elif isinstance(lstm, SplitGatesLSTM):
            weight_ih, biases = lstm.weight_ih, (lstm.bias,)
        else:
            return None
        weight = self.tgt_embed.weight
        if weight.shape[0] * weight_ih.shape[0] * weight.element_size() > INPUT_TABLE_BYTES:
            return None

        def compute() -> tuple[Tensor, Tensor | None]:
            ids = self.output.target_ids()
            embedded = weight if ids is None else weight.index_select(0, ids)
            table = torch.addmm(sum(biases[1:], biases[0]), embedded, weight_ih.t())
            if ids is None:
                return table, None
            row_of = torch.full((weight.shape[0],), -1, dtype=torch.long, device=weight.device)
            row_of[ids] = torch.arange(ids.numel(), device=weight.device)
            return table, row_of

        sources = (weight, weight_ih, *biases)
        if self.output.target_mask is not None:
            sources += (self.output.target_mask,)
        return self._input_table.get(sources, compute)

    def forward(self, src: Tensor, src_lengths: Tensor, tgt_in: Tensor,
                targets: Tensor | None = None,
                smoothing: float = 0.0) -> Tensor | tuple[Tensor, Tensor]:
        """Teacher forcing: src (B,S), src_lengths (B,), tgt_in (B,T) -> logits (B,T,V), or
        (B,T,V') over the target vocabulary (``self.output.positions`` maps ids to columns).

        With ``targets`` (B,T) columns: the summed label-smoothed loss and summed NLL instead
        (:meth:`OutputLayer.losses`, which need not form the logits). The loss is computed
        here, not by the caller, so that a DistributedDataParallel wrapper sees it all."""
        memory, mask = self.encode(src, src_lengths)
        bottom, upper = (None, None) if self.bridge is None else self.initial_state(memory, mask)
        features, _, _, _ = self.decode(tgt_in, memory, self.attention.keys(memory), mask,
                                        bottom, upper)
        if targets is not None:
            return self.output.losses(features, targets, smoothing)
        return self.output(features)

    def start(self, src: Tensor, src_lengths: Tensor) -> TranslationState:
        """Encode once and project the attention keys once: src (N,S), src_lengths (N,)."""
        memory, mask = self.encode(src, src_lengths)
        n = src.size(0)
        coverage = memory.new_zeros(mask.shape, dtype=torch.float32)
        bottom, upper = self.initial_state(memory, mask)
        return TranslationState(
            memory=memory, keys=self.attention.keys(memory), mask=mask,
            source=torch.arange(n, device=src.device), group=1, bottom=bottom, upper=upper,
            coverage=coverage, attention=coverage,
        )

    def step(self, prev: Tensor, state: TranslationState) -> tuple[Tensor, TranslationState]:
        """prev (N,) long ids -> log_probs (N,V) float32 over the columns of
        :meth:`output_ids` (V' of them with a target vocabulary; a view of a row-padded
        tensor, see :meth:`OutputLayer.log_probs`) and the next state."""
        memory, keys, mask = state.memory, state.keys, state.mask
        if not state.group:  # rows in no regular layout: gather the encoder side per row
            memory, keys, mask = (x.index_select(0, state.source) for x in (memory, keys, mask))
        features, weights, bottom, upper = self.decode(
            prev.unsqueeze(1), memory, keys, mask, state.bottom, state.upper, state.group or 1)
        attention = weights[:, 0].float()  # (N, S)
        new = dataclasses.replace(state, bottom=bottom, upper=upper,
                                  coverage=state.coverage + attention, attention=attention)
        return self.output.log_probs(features[:, 0]), new

    def output_ids(self) -> Tensor | None:
        """The token id of each column of ``step``'s log-probs (None: column j is id j)."""
        return self.output.target_ids()

    def flops_per_token(self, src_len: float = 14.0, tgt_len: float | None = None,
                        training: bool = True) -> float:
        """Matmul FLOPs per (source + target) token of a pair with these lengths (tgt_len defaults
        to src_len): 2*in*out per linear/gate matmul, attention scores and context, output layer.
        Training counts 3x forward (backward = 2x)."""
        c, h = self.config, self.config.hidden_size
        tgt_len = src_len if tgt_len is None else tgt_len
        per_query, per_key, per_pair = self.attention.flops(h, h)
        src = (2 * rnn_flops(c.cell, c.embed_dim, h // 2)
               + (c.encoder_layers - 1) * rnn_flops(c.cell, h, h) + per_key)
        tgt = (rnn_flops(c.cell, c.embed_dim, h) + per_query
               + (c.decoder_layers - 1) * rnn_flops(c.cell, 2 * h, h)
               + self.output.flops() + per_pair * src_len)
        total = src * src_len + tgt * tgt_len
        return (3.0 if training else 1.0) * total / (src_len + tgt_len)

