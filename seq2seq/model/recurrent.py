"""The shared recurrent block: fused LSTM/GRU layers, the bidirectional bottom layer, the output
layer, and the helpers that keep decoding state immutable.

Every layer is its own single-layer ``nn.LSTM`` / ``nn.GRU`` run over the whole sequence in one call
(oneDNN on CPU, cuDNN on GPU): we need per-layer residuals, dropout and an extra input (the
attention context) concatenated to every layer, which a multi-layer ``nn.LSTM`` cannot express.
There is never a Python loop over time here.

Recurrent state is a tuple of tensors, batch first: ``(h, c)`` for LSTM, ``(h,)`` for GRU, each
``(B, L, H)`` for a stack of ``L`` layers. The LSTM/GRU difference lives in :func:`_layer_hx` and
:func:`_from_hx` only.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seq2seq.model.dropout import Dropout
from seq2seq.model.loss import classifier_losses, token_losses
from seq2seq.tokenizer import SPECIALS

State = tuple[Tensor, ...]  # (h, c) for LSTM, (h,) for GRU; each (B, L, H)
CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}
GATES = {"lstm": 4, "gru": 3}
T = TypeVar("T")


PRIMITIVE_CACHE = 64  # oneDNN primitives kept in training (see bound_primitive_cache)
# Decoding runs the encoder on batches whose shapes seldom repeat, so cached primitives are
# hardly ever reused: a small cache lowers decoding's peak memory at no cost in speed.
DECODING_PRIMITIVE_CACHE = 8


def bound_primitive_cache(capacity: int = PRIMITIVE_CACHE) -> None:
    """Keep oneDNN's primitive cache small, unless ONEDNN_PRIMITIVE_CACHE_CAPACITY is set.

    oneDNN, which runs the fused LSTM layers on CPUs, compiles a primitive per input shape and
    caches up to 1,024 of them (about a megabyte each). Token-budget batches and beam search bring
    a new shape at nearly every call, so the default cache mostly grows, by gigabytes over a
    training run (README, "Measured results"). oneDNN reads the variable when it first runs, so
    this must come before the process's first LSTM call (``train`` and ``load_model`` call it
    first thing).
    """
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(capacity))


class DerivedTensors:
    """Tensors computed from parameters for decoding, kept while those parameters stay the same
    tensors, unmodified: their storage and version counters are the key, so an optimizer step,
    ``load_state_dict`` or ``.to(device)`` is seen at the next :meth:`get`. Callers use it
    only with autograd off (the kept tensors carry no graph)."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._value: Any = None

    def get(self, sources: tuple[Tensor, ...], compute: Any) -> Any:
        """``compute()``'s result, recomputed only when a tensor of ``sources`` changed."""
        key = tuple((t.data_ptr(), t._version, t.device) for t in sources)
        if key != self._key:
            self._value, self._key = compute(), key
        return self._value


def lstm_cell(gates: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """One LSTM update from pre-activation ``gates`` (N, 4H) in torch's order (input, forget,
    cell, output), overwritten, and c (N, H) -> (h', c'). ``c' = f c + i g``, ``h' = o tanh(c')``,
    each tanh as ``2 sigmoid(2x) - 1`` so that one in-place sigmoid covers all four gates
    (torch's CPU sigmoid is faster than its tanh: ``benchmarks/kernels.py``)."""
    hidden = c.shape[-1]
    gates[:, 2 * hidden : 3 * hidden] *= 2
    i, f, g, o = gates.sigmoid_().chunk(4, dim=-1)
    c = torch.addcmul(f * c, i, g * 2 - 1)
    return o * (torch.sigmoid(2 * c) * 2 - 1), c


def padded_vocab(vocab_size: int) -> int:
    """The vocabulary rounded up to a multiple of 8: aligned matmuls on tensor cores, and on
    CPUs, whose kernels run an odd number of columns far slower (``benchmarks/kernels.py``)."""
    return (vocab_size + 7) // 8 * 8


def make_rnn(cell: str, input_size: int, hidden_size: int, init_scale: float) -> nn.RNNBase:
    """One fused batch-first layer; weights ~ U(-init_scale, init_scale), biases 0 except the LSTM
    forget gate, whose two biases (b_ih + b_hh) sum to 1 so that memory is kept early in training.
    """
    if cell not in CELLS:
        raise ValueError(f"cell must be one of {', '.join(CELLS)}, got {cell!r}")
    rnn = CELLS[cell](input_size, hidden_size, batch_first=True)
    with torch.no_grad():
        for name, param in rnn.named_parameters():
            if name.startswith("weight"):
                param.uniform_(-init_scale, init_scale)
            else:
                param.zero_()
        if cell == "lstm":  # PyTorch gate order: input, forget, cell, output
            rnn.bias_ih_l0[hidden_size : 2 * hidden_size] = 1.0
    return rnn


def _layer_hx(state: State, layer: int) -> Tensor | tuple[Tensor, Tensor]:
    """The ``hx`` argument of ``nn.LSTM`` / ``nn.GRU`` for one layer: each part (1, B, H)."""
    parts = tuple(part[:, layer].unsqueeze(0).contiguous() for part in state)
    return parts if len(parts) == 2 else parts[0]


def _from_hx(hx: Tensor | tuple[Tensor, ...]) -> State:
    """The final ``hx`` of one layer as a tuple of (B, H) tensors."""
    parts = hx if isinstance(hx, tuple) else (hx,)
    return tuple(part.squeeze(0) for part in parts)


def _steps_alone(rnn: nn.Module, inputs: Tensor) -> bool:
    """Whether ``rnn`` over ``inputs`` is one decoding step of a plain LSTM layer: one position,
    no autograd, on the CPU (:func:`lstm_step`)."""
    return (inputs.size(1) == 1 and type(rnn) is nn.LSTM and inputs.device.type == "cpu"
            and not torch.is_grad_enabled())


def lstm_step(lstm: nn.LSTM, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """One step of a single-layer ``lstm``: x (N, I), h and c (N, H) -> (h', c'), each (N, H).

    Two ``addmm`` and :func:`lstm_cell`. oneDNN's fused kernel, which a one-position call of
    ``nn.LSTM`` runs, is no faster for one step and allocates a scratch area about four times the
    size of the gates at every call, which a beam-search step's peak memory then holds (README,
    "Decoding test_2016_flickr side by side")."""
    gates = torch.addmm(lstm.bias_ih_l0 + lstm.bias_hh_l0, x, lstm.weight_ih_l0.t())
    return lstm_cell(gates.addmm_(h, lstm.weight_hh_l0.t()), c)


class RecurrentStack(nn.Module):
    """Layers of fused LSTM/GRU with dropout on every layer's input and residual connections.

    ``forward(x (B,T,I), state, extra (B,T,C) | None) -> (y (B,T,H), state)``. ``extra`` (the
    attention context) is concatenated to the input of every layer; layers with index >=
    ``residual_from`` add their input to their output (inputs there are ``hidden_size`` wide).
    """

    def __init__(self, cell: str, input_size: int, hidden_size: int, num_layers: int,
                 dropout: float, init_scale: float, extra_size: int = 0, residual_from: int = 2):
        super().__init__()
        if residual_from < 1:
            raise ValueError("residual_from must be >= 1 (the first layer changes the width)")
        self.cell, self.hidden_size, self.residual_from = cell, hidden_size, residual_from
        self.dropout = Dropout(dropout)
        self.layers = nn.ModuleList(
            make_rnn(cell, (input_size if i == 0 else hidden_size) + extra_size, hidden_size,
                     init_scale)
            for i in range(num_layers)
        )

    def zero_state(self, batch_size: int, like: Tensor) -> State:
        """All-zero state, ``(h, c)`` or ``(h,)``, each (B, L, H), on ``like``'s device/dtype;
        ``()`` for an empty stack (as ``forward`` returns)."""
        if not self.layers:
            return ()
        shape = (batch_size, len(self.layers), self.hidden_size)
        return tuple(like.new_zeros(shape) for _ in range(2 if self.cell == "lstm" else 1))

    def forward(self, x: Tensor, state: State | None = None,
                extra: Tensor | None = None) -> tuple[Tensor, State]:
        """x (B,T,I), state parts (B,L,H) or None (zeros), extra (B,T,C) -> (B,T,H), state."""
        finals = []
        for i, rnn in enumerate(self.layers):
            inputs = self.dropout(x)
            if extra is not None:
                inputs = torch.cat([inputs, extra], dim=-1)
            if state is not None and _steps_alone(rnn, inputs):
                h, c = lstm_step(rnn, inputs[:, 0], state[0][:, i], state[1][:, i])
                y, final = h[:, None], (h, c)
            else:
                y, hx = rnn(inputs, None if state is None else _layer_hx(state, i))
                final = _from_hx(hx)
            x = y + x if i >= self.residual_from else y
            finals.append(final)
        return x, tuple(torch.stack(parts, dim=1) for parts in zip(*finals, strict=True))


def reverse_padded(x: Tensor, lengths: Tensor) -> Tensor:
    """Reverse each row of x (B,T,D) within its length; padding stays at the end. Self-inverse."""
    steps = torch.arange(x.size(1), device=x.device)
    lengths = lengths.to(x.device).unsqueeze(1)
    index = torch.where(steps < lengths, lengths - 1 - steps, steps)  # (B, T)
    return x.gather(1, index.unsqueeze(-1).expand_as(x))


class BidirectionalLayer(nn.Module):
    """The bottom encoder layer: two directions of ``hidden_size // 2``, concatenated.

    The backward direction runs over each sequence reversed within its length, so in both
    directions padding comes after the real tokens and cannot reach them (the layers are causal).
    Unlike ``pack_padded_sequence`` (which PyTorch's CPU backend runs step by step, outside
    oneDNN), this keeps both directions on the fused whole-sequence kernel.
    """

    def __init__(self, cell: str, input_size: int, hidden_size: int, init_scale: float):
        super().__init__()
        if hidden_size % 2:
            raise ValueError("hidden_size must be even for the bidirectional layer")
        self.forward_rnn = make_rnn(cell, input_size, hidden_size // 2, init_scale)
        self.backward_rnn = make_rnn(cell, input_size, hidden_size // 2, init_scale)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        """x (B,S,I), lengths (B,) -> (B,S,H); values at padding positions are arbitrary."""
        ahead, _ = self.forward_rnn(x)
        behind, _ = self.backward_rnn(reverse_padded(x, lengths))
        return torch.cat([ahead, reverse_padded(behind, lengths)], dim=-1)


class OutputLayer(nn.Module):
    """Features (..., F) -> logits (..., V) over the real vocabulary, or (..., V') over the
    target vocabulary when ``target_vocabulary`` is on.

    With ``project``, a Linear maps the features to ``embed_dim`` first (no nonlinearity) and the
    classifier weight is ``embedding.weight`` when ``tie`` (shared storage). Without ``project`` the
    classifier has its own (V_pad, F) weight: F (e.g. [top; context]) is not the embedding width.
    The classifier runs over the padded vocabulary and the padding columns are sliced off.

    ``target_vocabulary``: a joint source+target vocabulary holds pieces the target language never
    uses (about half of a joint 8k German-English one). :meth:`restrict` keeps the ids seen on the
    target side of the training data (``target_mask``, saved with the weights) and the classifier
    scores only those, in id order: ``logits[..., j]`` is id ``target_ids()[j]``. The special ids
    0-3 are always kept, so they keep their positions and PAD stays the ignored class. Training then
    computes about half the classifier, and so does every decoding step (search maps columns back
    to ids).
    """

    def __init__(self, features: int, embedding: nn.Embedding, vocab_size: int, project: bool,
                 tie: bool, dropout: float, init_scale: float, target_vocabulary: bool = False):
        super().__init__()
        padded, embed_dim = embedding.weight.shape
        self.vocab_size = vocab_size
        self.dropout = Dropout(dropout)
        self.project = nn.Linear(features, embed_dim) if project else None
        if self.project is not None:
            nn.init.uniform_(self.project.weight, -init_scale, init_scale)
            nn.init.zeros_(self.project.bias)
        width = embed_dim if project else features
        if project and tie:
            self.weight = embedding.weight
        else:
            self.weight = nn.Parameter(torch.empty(padded, width).uniform_(-init_scale, init_scale))
        self.bias = nn.Parameter(torch.zeros(padded))
        # every id until restrict() is told the target side's; None: the whole vocabulary
        mask = torch.ones(vocab_size, dtype=torch.bool) if target_vocabulary else None
        self.register_buffer("target_mask", mask)
        self.int8_classifier: nn.Module | None = None  # set by model.quantize.quantize_int8
        self._compact = DerivedTensors()  # the classifier's rows while decoding
        self._columns = DerivedTensors()  # how many of them score (int8 decoding)

    def restrict(self, ids: Tensor) -> None:
        """Score only ``ids`` (and the special ids 0-3) from now on."""
        if self.target_mask is None:
            raise ValueError("this output layer was built without a target vocabulary")
        mask = torch.zeros_like(self.target_mask)
        mask[ids.to(mask.device)] = True
        mask[: len(SPECIALS)] = True
        self.target_mask.copy_(mask)

    def target_ids(self) -> Tensor | None:
        """The ids the classifier scores, ascending, or None for the whole vocabulary."""
        return None if self.target_mask is None else self.target_mask.nonzero().squeeze(1)

    def positions(self, ids: Tensor) -> Tensor:
        """Vocabulary ids (any shape) -> their logit columns; ids outside the target
        vocabulary map to UNK's column (it is column 1, as UNK is id 1)."""
        if self.target_mask is None:
            return ids
        column = torch.cumsum(self.target_mask, 0) - 1
        return torch.where(self.target_mask[ids], column[ids], torch.ones_like(ids))

    def classifier_linear(self) -> nn.Linear:
        """A detached copy of decoding's classifier (:meth:`_decoding_classifier`, rows padded
        with -inf bias) as an ``nn.Linear``, for int8 quantisation, which takes linear modules
        (see ``model/quantize.py``)."""
        with torch.no_grad():
            weight, bias, _ = self._padded_classifier()
        linear = nn.Linear(weight.shape[1], weight.shape[0], device=weight.device)
        linear.weight = nn.Parameter(weight.detach().clone())
        linear.bias = nn.Parameter(bias.detach().clone())
        return linear

    def _classifier(self) -> tuple[Tensor, Tensor]:
        """The classifier's (rows, width) weight and bias: the target vocabulary's rows, or
        every padded row. With autograd, gathered at each call; without, the leading rows of
        :meth:`_decoding_classifier`'s kept copy."""
        if self.target_mask is None:
            return self.weight, self.bias
        if torch.is_grad_enabled():
            ids = self.target_ids()
            return self.weight.index_select(0, ids), self.bias.index_select(0, ids)
        weight, bias, columns = self._decoding_classifier()
        return weight[:columns], bias[:columns]

    def _padded_rows(self) -> tuple[Tensor, Tensor, int]:
        """The classifier's weight (R, F) and bias (R,) with R a multiple of 8, and C, the
        number of rows that score: the target vocabulary's ids, then copies of id 0's row up to
        R (gathered, so with autograd the gradient flows back); or, without a target
        vocabulary, the parameters themselves, whose rows past the real ids pad them already."""
        ids = self.target_ids()
        if ids is None:
            return self.weight, self.bias, self.vocab_size
        columns = ids.numel()
        rows = F.pad(ids, (0, padded_vocab(columns) - columns))
        return self.weight.index_select(0, rows), self.bias.index_select(0, rows), columns

    def _decoding_classifier(self) -> tuple[Tensor, Tensor, int]:
        """Decoding's classifier, weight (R, F) and bias (R,), and the number of scored columns
        C: :meth:`_padded_rows`, with bias -inf on rows ``C:R``.

        The row count matters: a (N, 256) x (256, 3963) product runs at two thirds of the speed
        of one with 3968 columns on AVX2 (``benchmarks/kernels.py``, "classifier"), and the
        classifier is the largest matmul of a beam-search step. Kept while the parameters stay
        the same tensors, unmodified (:class:`DerivedTensors`), so a step copies nothing."""

        sources = (self.weight, self.bias)
        if self.target_mask is not None:
            sources += (self.target_mask,)
        with torch.no_grad():
            return self._compact.get(sources, self._padded_classifier)

    def _padded_classifier(self) -> tuple[Tensor, Tensor, int]:
        """:meth:`_padded_rows` with bias -inf on rows ``C:R`` (a new bias tensor)."""
        weight, bias, columns = self._padded_rows()
        bias = bias.clone() if bias is self.bias else bias
        bias[columns:] = float("-inf")
        return weight, bias, columns

    def _scored_columns(self) -> int:
        """C: the columns the classifier scores (the target vocabulary's ids, or every id); kept
        while the mask is unchanged, so a decoding step runs no reduction for it."""
        mask = self.target_mask
        if mask is None:
            return self.vocab_size
        return self._columns.get((mask,), lambda: int(mask.sum()))

    def forward(self, x: Tensor) -> Tensor:
        """x (..., F) -> logits (..., V), or (..., V') with a target vocabulary."""
        x = self.dropout(x)
        if self.project is not None:
            x = self.project(x)
        if self.int8_classifier is not None:  # decoding's padded rows
            return self.int8_classifier(x)[..., : self._scored_columns()]
        logits = F.linear(x, *self._classifier())
        if self.target_mask is not None or logits.size(-1) == self.vocab_size:
            return logits
        return logits[..., : self.vocab_size]

    def losses(self, x: Tensor, target: Tensor, smoothing: float) -> tuple[Tensor, Tensor]:
        """Training: the summed label-smoothed loss and summed NLL of features x (..., F)
        against target columns (...), PAD ignored, as ``token_losses(self(x), target,
        smoothing)`` gives them (``model/loss.py``). On CPU in fp32 the classifier runs inside
        the loss (:func:`classifier_losses`) over its rows padded to a multiple of 8; elsewhere
        (GPUs, autocast) the logits are formed first."""
        if x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
            return token_losses(self(x), target, smoothing)
        x = self.dropout(x)
        if self.project is not None:
            x = self.project(x)
        weight, bias, columns = self._padded_rows()  # classifier_losses never scores the padding
        return classifier_losses(x.reshape(-1, x.size(-1)), weight, bias, target.reshape(-1),
                                 smoothing, columns)

    def log_probs(self, x: Tensor) -> Tensor:
        """A decoding step: features (N, F) -> log-probabilities (N, C) float32 over the columns
        :meth:`forward` gives, equal bit for bit to ``log_softmax(forward(x))``.

        The classifier runs over :meth:`_decoding_classifier`'s padded rows and ``log_softmax``
        runs in place over the whole padded row: the extra columns are -inf, so they add
        ``exp(-inf) = 0`` to each row's sum, in the vector lanes after the last real column,
        which leaves the sum unchanged. The result is the first C columns, a view whose rows
        are R apart: one (N, R) tensor per step and no copy."""
        x = self.dropout(x)
        if self.project is not None:
            x = self.project(x)
        if self.int8_classifier is not None:  # its rows are the padded ones, without a copy
            logits, columns = self.int8_classifier(x), self._scored_columns()
        else:
            weight, bias, columns = self._decoding_classifier()
            logits = F.linear(x, weight, bias)
        logits = logits.float()
        return torch.log_softmax(logits, dim=-1, out=logits)[:, :columns]

    def flops(self) -> int:
        """Forward matmul FLOPs per token (projection + classifier over the rows it scores)."""
        rows = self.weight.shape[0] if self.target_mask is None else int(self.target_mask.sum())
        flops = 2 * rows * self.weight.shape[1]
        if self.project is not None:
            flops += 2 * self.project.weight.numel()
        return flops


def make_embedding(vocab_size: int, embed_dim: int, init_scale: float) -> nn.Embedding:
    """Embeddings over the padded vocabulary, ~ U(-init_scale, init_scale)."""
    embedding = nn.Embedding(padded_vocab(vocab_size), embed_dim)
    nn.init.uniform_(embedding.weight, -init_scale, init_scale)
    return embedding


def select_rows(value: T, index: Tensor) -> T:
    """``index_select`` on dim 0 of every tensor in value (tensors, tuples, frozen dataclasses)."""
    if isinstance(value, Tensor):
        return value.index_select(0, index)
    if isinstance(value, tuple):
        return tuple(select_rows(part, index) for part in value)  # type: ignore[return-value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes: dict[str, Any] = {
            field.name: select_rows(getattr(value, field.name), index)
            for field in dataclasses.fields(value)
        }
        return dataclasses.replace(value, **changes)
    return value


def rnn_flops(cell: str, input_size: int, hidden_size: int) -> int:
    """Forward matmul FLOPs per token of one layer: 2 * (in + hidden) * gates * hidden."""
    return 2 * (input_size + hidden_size) * GATES[cell] * hidden_size
