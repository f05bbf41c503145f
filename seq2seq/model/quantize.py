"""Dynamic int8 quantisation for CPU inference: linear layers, the output classifier, and the
decoder's LSTM layers.

torch's own dynamically quantised ``nn.LSTM`` runs each gate matmul as its own op and measured
slower than the fused fp32 oneDNN kernel, so the decoder's LSTM layers (which decoding runs one
step at a time) become :class:`StepLSTM`: one int8 matmul of ``[x; h]`` against the stacked gate
weights per step, then the pointwise cell update. The translation decoder's bottom layer, whose
input half of the gates is read from a table (``Seq2Seq.input_gate_table``), becomes
:class:`SplitGatesLSTM` instead: that half stays fp32 for the table and only ``h W_hh`` runs int8.
The encoder, which runs whole sentences at once, keeps the fused fp32 kernel. GRU layers stay
fp32.

This is the only module that imports ``torch.ao.quantization``. It is deprecated upstream in
favour of torchao; it stays until torchao's dynamic int8 is measured faster on CPU (torchao is
not a dependency). If a torch build no longer has it, ``quantize_int8`` raises
:class:`QuantizationUnavailable` and fp32 decoding is unaffected.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seq2seq.model.recurrent import OutputLayer, RecurrentStack, lstm_cell


class QuantizationUnavailable(RuntimeError):
    """This torch has no ``torch.ao.quantization``."""


def _quantize_dynamic() -> Callable[..., nn.Module]:
    """``torch.ao.quantization.quantize_dynamic``, or a clear error when torch dropped it."""
    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError as error:
        raise QuantizationUnavailable(
            f"int8 needs torch.ao.quantization, which torch {torch.__version__} does not have; "
            "decode in fp32 (no --quantize) or install torch<=2.13") from error
    return quantize_dynamic


class StepLSTM(nn.Module):
    """A batch-first single-layer LSTM, ``forward(x (B,T,I), (h, c) each (1,B,H) | None)``, that
    computes the four gates of a step as one matmul ``gates([x; h])`` (any linear module).

    The gate rows keep torch's order (input, forget, cell, output); the update is
    :func:`~seq2seq.model.recurrent.lstm_cell`.
    """

    def __init__(self, gates: nn.Module, hidden_size: int):
        super().__init__()
        self.gates, self.hidden_size = gates, hidden_size

    @classmethod
    def from_lstm(cls, lstm: nn.LSTM) -> StepLSTM:
        """The same function as a trained single-layer, unidirectional, batch-first ``lstm``."""
        _check_replaceable(lstm)
        h = lstm.hidden_size
        linear = nn.Linear(lstm.input_size + h, 4 * h)
        with torch.no_grad():
            linear.weight.copy_(torch.cat([lstm.weight_ih_l0, lstm.weight_hh_l0], dim=1))
            linear.bias.copy_(lstm.bias_ih_l0 + lstm.bias_hh_l0)
        return cls(linear.to(lstm.weight_ih_l0.device), h)

    def forward(self, x: Tensor,
                hx: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        return _unroll(x, hx, self.hidden_size,
                       lambda t, h: self.gates(torch.cat([x[:, t], h], dim=-1)))


class SplitGatesLSTM(nn.Module):
    """A batch-first single-layer LSTM whose gates are ``x W_ih^T + b``, from fp32 buffers
    ``weight_ih`` and ``bias``, plus ``hidden_gates(h)`` (a linear module without bias, int8
    after quantisation). A decoder layer fed embeddings alone reads the first half from a table,
    so a decoding step's only matmul is the hidden half (``Seq2Seq._bottom_layer``)."""

    def __init__(self, weight_ih: Tensor, bias: Tensor, hidden_gates: nn.Module):
        super().__init__()
        self.register_buffer("weight_ih", weight_ih)
        self.register_buffer("bias", bias)
        self.hidden_gates, self.hidden_size = hidden_gates, weight_ih.shape[0] // 4

    @classmethod
    def from_lstm(cls, lstm: nn.LSTM) -> SplitGatesLSTM:
        """The same function as a trained single-layer, unidirectional, batch-first ``lstm``."""
        _check_replaceable(lstm)
        hidden = nn.Linear(lstm.hidden_size, 4 * lstm.hidden_size, bias=False,
                           device=lstm.weight_hh_l0.device)
        with torch.no_grad():
            hidden.weight.copy_(lstm.weight_hh_l0)
            bias = lstm.bias_ih_l0 + lstm.bias_hh_l0
        return cls(lstm.weight_ih_l0.detach().clone(), bias, hidden)

    def forward(self, x: Tensor,
                hx: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        inputs = F.linear(x, self.weight_ih, self.bias)  # every step's input half at once
        return _unroll(x, hx, self.hidden_size, lambda t, h: inputs[:, t] + self.hidden_gates(h))


def _unroll(x: Tensor, hx: tuple[Tensor, Tensor] | None, hidden_size: int,
            gates_at: Callable[[int, Tensor], Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Run an LSTM over x (B,T,I) from hx ((h, c) each (1,B,H), None = zeros), step t's
    pre-activation gates being ``gates_at(t, h)``: the outputs (B,T,H) and the final (h, c)."""
    batch, steps, _ = x.shape
    if hx is None:
        h = c = x.new_zeros(batch, hidden_size)
    else:
        h, c = hx[0][0], hx[1][0]
    outputs = []
    for t in range(steps):
        h, c = lstm_cell(gates_at(t, h), c)
        outputs.append(h)
    return torch.stack(outputs, dim=1), (h.unsqueeze(0), c.unsqueeze(0))


def _check_replaceable(lstm: nn.LSTM) -> None:
    if lstm.num_layers != 1 or lstm.bidirectional or not lstm.batch_first or lstm.proj_size:
        raise ValueError("StepLSTM and SplitGatesLSTM replace single-layer, unidirectional, "
                         "batch-first LSTMs")


def _step_stacks(model: nn.Module) -> list[RecurrentStack]:
    """The stacks that decoding runs one token at a time: the translation decoder, the LM."""
    names = ("decoder_bottom", "decoder_upper", "rnn")
    return [stack for name in names
            if isinstance(stack := getattr(model, name, None), RecurrentStack)]


def quantize_int8(model: nn.Module, inplace: bool = False) -> nn.Module:
    """``model`` for CPU inference with dynamic int8 matmuls: every linear layer, the output
    classifier (whose weight may be the tied embedding, so it is not an ``nn.Linear``) and the
    decoder's LSTM layers (as :class:`StepLSTM`; the translation decoder's bottom layer, which
    takes its input gates from a table, as :class:`SplitGatesLSTM`). A copy, unless ``inplace``
    (which saves holding the model twice while loading)."""
    quantize_dynamic = _quantize_dynamic()
    if not inplace:
        model = copy.deepcopy(model)
    for stack in _step_stacks(model):
        split = stack is getattr(model, "decoder_bottom", None)
        for i, layer in enumerate(stack.layers):
            if isinstance(layer, nn.LSTM):
                stack.layers[i] = (SplitGatesLSTM if split else StepLSTM).from_lstm(layer)
    with warnings.catch_warnings():  # torch 2.x flags its own qint8 tensor factories as deprecated
        warnings.filterwarnings("ignore", message="torch.quantize_per_tensor")
        model = quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
        for module in model.modules():
            if isinstance(module, OutputLayer):  # its weight may be the tied embedding
                linear = nn.Sequential(module.classifier_linear())
                module.int8_classifier = quantize_dynamic(linear, {nn.Linear},
                                                          dtype=torch.qint8)[0]
    return model
