"""The character language model: embeddings -> the shared recurrent stack -> output layer.

No encoder, no attention. ``forward`` takes and returns the recurrent state so that training can
carry it across consecutive chunks (truncated BPTT: ``state.detach()`` between chunks).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from seq2seq.config import ModelConfig
from seq2seq.model.recurrent import (
    OutputLayer,
    RecurrentStack,
    State,
    make_embedding,
    rnn_flops,
    select_rows,
)


@dataclass(frozen=True)
class LMState:
    """The recurrent state of N streams: ``rnn`` is (h, c) or (h,), each (N, L, H)."""

    rnn: State

    def select(self, index: Tensor) -> LMState:
        """Rows by ``index`` (M,) long."""
        return select_rows(self, index)

    def detach(self) -> LMState:
        """The same values cut from the autograd graph (truncated BPTT between chunks)."""
        return LMState(tuple(part.detach() for part in self.rnn))


class CharLM(nn.Module):
    """``forward(ids, state) -> (logits, state)``; ``start`` / ``step`` for generation.

    Uses ``config.decoder_layers`` layers (the LM is a decoder without attention); residual
    connections from the third layer up.
    """

    def __init__(self, config: ModelConfig, vocab_size: int):
        super().__init__()
        self.config, self.vocab_size = config, vocab_size
        c = config
        self.embed = make_embedding(vocab_size, c.embed_dim, c.init_scale)
        self.rnn = RecurrentStack(c.cell, c.embed_dim, c.hidden_size, c.decoder_layers,
                                  c.dropout, c.init_scale)
        self.output = OutputLayer(c.hidden_size, self.embed, vocab_size, c.output_projection,
                                  c.tie_embeddings, c.dropout, c.init_scale)

    def forward(self, ids: Tensor, state: LMState | None = None) -> tuple[Tensor, LMState]:
        """ids (B,T) long, state (None = zeros) -> logits (B,T,V), state after the last token."""
        x, rnn = self.rnn(self.embed(ids), None if state is None else state.rnn)
        return self.output(x), LMState(rnn)

    def start(self, batch_size: int) -> LMState:
        """The all-zero state of ``batch_size`` streams, on the model's device."""
        like = self.embed.weight
        return LMState(self.rnn.zero_state(batch_size, like))

    def step(self, prev: Tensor, state: LMState) -> tuple[Tensor, LMState]:
        """prev (N,) long -> log_probs (N,V) float32 and the next state."""
        x, rnn = self.rnn(self.embed(prev.unsqueeze(1)), state.rnn)
        return self.output.log_probs(x[:, 0]), LMState(rnn)

    def output_ids(self) -> None:
        """``step`` scores every id (column j is id j)."""
        return None

    def flops_per_token(self, training: bool = True) -> float:
        """Matmul FLOPs per token (2*in*out per gate matmul, output layer); training = 3x."""
        c, h = self.config, self.config.hidden_size
        layers = (rnn_flops(c.cell, c.embed_dim, h)
                  + (c.decoder_layers - 1) * rnn_flops(c.cell, h, h))
        return (3.0 if training else 1.0) * (layers + self.output.flops())
