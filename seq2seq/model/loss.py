"""The training loss: summed label-smoothed cross-entropy and summed NLL over non-PAD targets.

Two forms of one computation, as ``F.cross_entropy(..., ignore_index=PAD, reduction="sum",
label_smoothing=smoothing)`` and the same without smoothing would give them:

- :func:`token_losses` from logits (B, T, V): one log-softmax serves both sums, and the gradient
  is written in one pass as softmax minus the smoothed one-hot target, scaled per row.
  ``F.cross_entropy`` would need a second log-softmax for the NLL and five passes in backward.
- :func:`classifier_losses` from the classifier's input, weight and bias: the classifier and the
  loss run together over blocks of rows, and each block's gradients (of the input, weight and
  bias) are taken while its log-probs are still in cache. The (rows x vocabulary) logits and
  their gradient never exist whole, which saves their passes through memory; and the weight's
  rows may be padded to a multiple of 8 (only the first ``columns`` are scored), which AVX2
  matmul kernels run far faster than an odd count (``benchmarks/kernels.py``). The gradients are
  those of the loss; backward only scales them by the incoming gradient (the loss is a sum, so
  that is exact).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from seq2seq.tokenizer import PAD

BLOCK_ELEMENTS = 1 << 21  # logits per block of classifier_losses: 8 MB of fp32


class _SmoothedCrossEntropy(torch.autograd.Function):
    """:func:`token_losses` over flat (N, V) logits and (N,) targets."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, target: Tensor,
                smoothing: float) -> tuple[Tensor, Tensor]:
        log_probs = torch.log_softmax(logits, dim=-1)
        loss, nll = _sums(log_probs, target, smoothing, log_probs.size(1))
        ctx.save_for_backward(log_probs, target)
        ctx.smoothing = smoothing
        ctx.mark_non_differentiable(nll)
        return loss, nll

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor, _grad_nll: Tensor) -> tuple[Tensor, None, None]:
        log_probs, target = ctx.saved_tensors
        grad = _logit_gradient(log_probs, target, ctx.smoothing, log_probs.size(1), grad_loss)
        return grad, None, None


def _sums(log_probs: Tensor, target: Tensor, smoothing: float,
          columns: int) -> tuple[Tensor, Tensor]:
    """The smoothed loss and the NLL (each a new scalar) of (n, >= columns) log-probs whose
    first ``columns`` are the classes, over the rows whose target is not PAD."""
    real = target != PAD
    picked = log_probs.gather(1, target.unsqueeze(1)).squeeze(1)
    nll = -torch.where(real, picked, 0.0).sum()
    loss = nll.clone()  # a tensor of its own: the NLL is marked non-differentiable
    if smoothing:
        uniform = -torch.where(real, log_probs[:, :columns].sum(1), 0.0).sum() / columns
        loss = (1.0 - smoothing) * nll + smoothing * uniform
    return loss, nll


def _logit_gradient(log_probs: Tensor, target: Tensor, smoothing: float, columns: int,
                    scale: Tensor | float) -> Tensor:
    """d loss / d logits, times ``scale``, written over ``exp(log_probs)``: softmax minus the
    smoothed one-hot target on rows whose target is not PAD, 0 on the others and past
    ``columns``."""
    row_scale = ((target != PAD) * scale).unsqueeze(1).to(log_probs.dtype)  # (n, 1)
    grad = torch.exp(log_probs)
    torch.addcmul(row_scale * (-smoothing / columns), grad, row_scale, out=grad)
    if columns < grad.size(1):
        grad[:, columns:] = 0.0
    grad.scatter_add_(1, target.unsqueeze(1), row_scale * (smoothing - 1.0))
    return grad


def token_losses(logits: Tensor, target: Tensor, smoothing: float) -> tuple[Tensor, Tensor]:
    """Summed label-smoothed loss and summed NLL over non-PAD targets (module docstring).

    logits (B, T, V), target (B, T) -> two scalars (the NLL detached).
    """
    flat_logits, flat_target = logits.reshape(-1, logits.size(-1)).float(), target.reshape(-1)
    return _SmoothedCrossEntropy.apply(flat_logits, flat_target, float(smoothing))


def _block_rows(width: int) -> int:
    return max(64, BLOCK_ELEMENTS // width)


def _blocks(x: Tensor, weight: Tensor, bias: Tensor, target: Tensor, smoothing: float,
            columns: int, gradients: bool
            ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor] | None]:
    """The loss and NLL of ``x @ weight.T + bias`` against ``target``, block by block, and with
    ``gradients`` the loss's gradients of x, weight and bias."""
    loss, nll = x.new_zeros(()), x.new_zeros(())
    grads = ((torch.empty_like(x), torch.zeros_like(weight), torch.zeros_like(bias))
             if gradients else None)
    rows = _block_rows(weight.shape[0])
    for start in range(0, x.shape[0], rows):
        block = slice(start, start + rows)
        logits = torch.addmm(bias, x[block], weight.t())
        if columns < logits.size(1):
            logits[:, columns:] = float("-inf")
        log_probs = torch.log_softmax(logits, dim=-1, out=logits)
        block_loss, block_nll = _sums(log_probs, target[block], smoothing, columns)
        loss += block_loss
        nll += block_nll
        if grads is not None:
            grad = _logit_gradient(log_probs, target[block], smoothing, columns, 1.0)
            torch.mm(grad, weight, out=grads[0][block])
            grads[1].addmm_(grad.t(), x[block])
            grads[2].add_(grad.sum(0))
    return loss, nll, grads


class _ClassifierLoss(torch.autograd.Function):
    """:func:`classifier_losses` with autograd: the gradients are taken in forward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, target: Tensor,
                smoothing: float, columns: int) -> tuple[Tensor, Tensor]:
        loss, nll, grads = _blocks(x, weight, bias, target, smoothing, columns, True)
        assert grads is not None
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(nll)
        return loss, nll

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor, _grad_nll: Tensor
                 ) -> tuple[Tensor, Tensor, Tensor, None, None, None]:
        grad_x, grad_weight, grad_bias = ctx.saved_tensors
        return grad_x * grad_loss, grad_weight * grad_loss, grad_bias * grad_loss, None, None, None


def classifier_losses(x: Tensor, weight: Tensor, bias: Tensor, target: Tensor,
                      smoothing: float, columns: int) -> tuple[Tensor, Tensor]:
    """Summed label-smoothed loss and summed NLL over non-PAD targets of the logits
    ``x @ weight.T + bias`` restricted to their first ``columns`` (module docstring).

    x (N, F), weight (R, F) with R >= columns, bias (R,), target (N,) columns -> two scalars
    (the NLL detached); equal to ``token_losses(x @ weight[:columns].T + bias[:columns],
    target, smoothing)`` up to the order of float sums.
    """
    if not 0 < columns <= weight.shape[0]:
        raise ValueError(f"columns must be in 1..{weight.shape[0]}, got {columns}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, weight, bias)):
        return _ClassifierLoss.apply(x, weight, bias, target, float(smoothing), columns)
    loss, nll, _ = _blocks(x, weight, bias, target, float(smoothing), columns, False)
    return loss, nll
