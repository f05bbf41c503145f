"""The CPU kernel choices behind training, the decoder and the attention, re-measured here.

The code takes a few measured shortcuts (DESIGN section 6): ``tanh`` evaluated as
``2 sigmoid(2x) - 1`` (``lstm_cell``, the additive attention), beam search's two-stage
top-k over (beam x vocabulary) scores, the decoding classifier's rows padded to a multiple of 8,
the training loss from one log-softmax with a one-pass
gradient (``model.loss.token_losses``) instead of two ``F.cross_entropy`` calls, Adam's fused
kernel, and dropout masks drawn as 64 random bits per four elements (``model.dropout``) instead
of by ``bernoulli_``. Whether a shortcut pays depends on the CPU and torch's kernels for it, so
this script measures each next to the plain form; it also measures the rate of the training
LSTM kernels, which bounds the recipe's MFU (README, training step). The last line is one JSON
object with every figure and the machine.

    python benchmarks/kernels.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe_machine, machine_line

from seq2seq.config import ModelConfig
from seq2seq.heap import retain_freed_memory
from seq2seq.model import build_model
from seq2seq.model.dropout import Dropout
from seq2seq.model.loss import token_losses
from seq2seq.model.quantize import _unroll
from seq2seq.model.recurrent import padded_vocab
from seq2seq.search import _top_k_of_groups
from seq2seq.tokenizer import PAD


def seconds(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` timed calls, after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def elementwise(n: int, repeats: int) -> dict[str, float]:
    """ns per element of tanh and of the sigmoid form of tanh, in place on ``n`` floats."""
    x = torch.randn(n)
    work = x.clone()

    def tanh() -> None:
        work.copy_(x).tanh_()

    def sigmoid_tanh() -> None:
        work.copy_(x).mul_(2).sigmoid_().mul_(2).sub_(1)

    def copy() -> None:
        work.copy_(x)

    base = seconds(copy, repeats)
    return {"tanh_ns": (seconds(tanh, repeats) - base) / n * 1e9,
            "sigmoid_form_ns": (seconds(sigmoid_tanh, repeats) - base) / n * 1e9}


def top_k(rows: int, beam: int, vocab: int, repeats: int) -> dict[str, float]:
    """ms of the plain top-2K over each input's (beam x vocabulary) scores, and the two-stage
    top-k of beam search, which must agree."""
    scores = torch.randn(rows * beam, vocab)
    plain = scores.view(rows, beam * vocab).topk(2 * beam, dim=1)
    staged = _top_k_of_groups(scores, beam, 2 * beam)
    assert torch.equal(plain.values, staged[0]), "two-stage top-k disagrees with topk"
    return {"plain_ms": seconds(lambda: scores.view(rows, -1).topk(2 * beam, dim=1),
                                repeats) * 1e3,
            "two_stage_ms": seconds(lambda: _top_k_of_groups(scores, beam, 2 * beam),
                                    repeats) * 1e3}


def classifier(rows: int, columns: int, width: int, repeats: int) -> dict[str, float]:
    """GFLOP/s of a decoding step's classifier, (rows, width) x (width, columns) plus bias,
    over ``columns`` rows of weights and over them padded to a multiple of 8, as
    ``OutputLayer.log_probs`` runs it."""
    padded = padded_vocab(columns)
    x, weight, bias = torch.randn(rows, width), torch.randn(padded, width), torch.randn(padded)
    flops = 2 * rows * width * columns
    return {"exact_gflops": flops / seconds(
                lambda: F.linear(x, weight[:columns], bias[:columns]), repeats) / 1e9,
            "padded_gflops": flops / seconds(lambda: F.linear(x, weight, bias), repeats) / 1e9}


def training_loss(rows: int, vocab: int, smoothing: float, repeats: int) -> dict[str, float]:
    """ms of loss forward + backward over (rows, vocab) logits: the summed label-smoothed loss
    and the NLL beside it, by two ``F.cross_entropy`` calls and by ``token_losses``."""
    logits = torch.randn(rows, vocab)
    target = torch.randint(PAD + 1, vocab, (rows,))
    target[::10] = PAD

    def two_calls() -> None:
        x = logits.clone().requires_grad_()
        nll = F.cross_entropy(x, target, ignore_index=PAD, reduction="sum")
        F.cross_entropy(x, target, ignore_index=PAD, reduction="sum",
                        label_smoothing=smoothing).backward()
        nll.detach()

    def one_pass() -> None:
        x = logits.clone().requires_grad_()
        token_losses(x, target, smoothing)[0].backward()

    return {"two_cross_entropy_ms": seconds(two_calls, repeats) * 1e3,
            "one_pass_ms": seconds(one_pass, repeats) * 1e3}


def adam_step(repeats: int) -> dict[str, float]:
    """ms of one Adam step over the Multi30k recipe's parameters (4.6M), per-tensor and fused."""
    config = ModelConfig(embed_dim=256, hidden_size=256)
    params = list(build_model(config, 8000, "translation").parameters())
    for param in params:
        param.grad = torch.randn_like(param) * 1e-3
    figures = {}
    for fused in (False, True):
        optimizer = torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.98), fused=fused)
        figures["fused_ms" if fused else "per_tensor_ms"] = seconds(optimizer.step, repeats) * 1e3
    return figures


def dropout(shape: tuple[int, ...], p: float, repeats: int) -> dict[str, float]:
    """ms of dropout forward + backward on a ``shape`` activation: ``nn.Dropout`` and
    :class:`seq2seq.model.dropout.Dropout`."""
    x = torch.randn(shape, requires_grad=True)
    grad = torch.randn(shape)
    figures = {}
    for name, module in (("bernoulli_ms", torch.nn.Dropout(p)), ("random_bits_ms", Dropout(p))):
        figures[name] = seconds(lambda module=module: module(x).backward(grad), repeats) * 1e3
    return figures


def _loop_lstm(x: torch.Tensor, lstm: torch.nn.LSTM) -> torch.Tensor:
    """The same layer as ``lstm`` written as one input matmul for all steps, then per step an
    ``addmm`` of ``h W_hh`` and the decoder's cell, unrolled as the int8 decoder layers are
    (``quantize._unroll``) and differentiated by autograd."""
    inputs = F.linear(x, lstm.weight_ih_l0, lstm.bias_ih_l0 + lstm.bias_hh_l0)
    return _unroll(x, None, lstm.hidden_size,
                   lambda t, h: torch.addmm(inputs[:, t], h, lstm.weight_hh_l0.t()))[0]


def training_lstm(input_size: int, repeats: int) -> dict[str, float]:
    """GFLOP/s of one 256-wide LSTM layer, forward and backward, over batches shaped like the
    Multi30k recipe's (80-140 sentences of 10-22 steps, a new shape each time): oneDNN's fused
    kernel (``nn.LSTM``) and a per-step loop. The recipe's MFU is bounded by these rates."""
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(input_size, 256, batch_first=True)
    shapes = [(int(b), int(t)) for b, t in zip(torch.randint(80, 141, (12,)),
                                                 torch.randint(10, 23, (12,)), strict=True)]
    inputs = [torch.randn(b, t, input_size) for b, t in shapes]
    flops = sum(3 * 2 * b * t * (input_size + 256) * 4 * 256 for b, t in shapes)
    with torch.no_grad():  # the two compute the same layer
        torch.testing.assert_close(_loop_lstm(inputs[0], lstm), lstm(inputs[0])[0],
                                   atol=1e-5, rtol=1e-4)

    def run(layer: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for x in inputs:
            layer(x.requires_grad_()).sum().backward()

    rates = {}
    for name, layer in (("fused", lambda x: lstm(x)[0]), ("loop", lambda x: _loop_lstm(x, lstm))):
        rates[f"{name}_gflops"] = flops / seconds(lambda layer=layer: run(layer), repeats) / 1e9
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    retain_freed_memory()  # as the command line does
    torch.manual_seed(0)
    machine = describe_machine()
    print(machine_line(machine))
    results: dict[str, object] = {"machine": machine}
    for n in (1 << 16, 1 << 22):
        figures = elementwise(n, args.repeats)
        results[f"tanh_{n}"] = figures
        print(f"tanh over {n:,} floats: {figures['tanh_ns']:.3f} ns/element; as "
              f"2 sigmoid(2x) - 1: {figures['sigmoid_form_ns']:.3f} "
              f"({figures['tanh_ns'] / figures['sigmoid_form_ns']:.1f}x)")
    for rows, vocab in ((200, 4000), (200, 8000), (40, 32000)):
        figures = top_k(rows, 5, vocab, args.repeats)
        results[f"topk_{rows}x5x{vocab}"] = figures
        print(f"top-10 of {rows} inputs x 5 beams x {vocab:,}: plain {figures['plain_ms']:.2f} ms, "
              f"two-stage {figures['two_stage_ms']:.2f} ms "
              f"({figures['plain_ms'] / figures['two_stage_ms']:.1f}x)")
    for rows in (300, 1000):  # beam 5 over 60 and 200 sentences; Multi30k's target vocabulary
        figures = classifier(rows, 3963, 256, args.repeats)
        results[f"classifier_{rows}x256x3963"] = figures
        print(f"classifier {rows} x 256 x 3,963: {figures['exact_gflops']:.1f} GFLOP/s; over "
              f"rows padded to 3,968: {figures['padded_gflops']:.1f} "
              f"({figures['padded_gflops'] / figures['exact_gflops']:.2f}x)")
    figures = training_loss(1600, 3968, 0.1, args.repeats)  # a 3,000-token Multi30k batch
    results["loss_1600x3968"] = figures
    print(f"label-smoothed loss + NLL, forward and backward, 1,600 x 3,968: two cross_entropy "
          f"{figures['two_cross_entropy_ms']:.1f} ms, one pass {figures['one_pass_ms']:.1f} ms "
          f"({figures['two_cross_entropy_ms'] / figures['one_pass_ms']:.1f}x)")
    for shape in ((120, 20, 256), (120, 20, 512)):  # recipe-sized embeddings, [h; context]
        figures = dropout(shape, 0.2, args.repeats)
        results["dropout_" + "x".join(map(str, shape))] = figures
        print(f"dropout 0.2 on {shape}, forward and backward: bernoulli_ "
              f"{figures['bernoulli_ms']:.2f} ms, 64 random bits per 4 elements "
              f"{figures['random_bits_ms']:.2f} ms "
              f"({figures['bernoulli_ms'] / figures['random_bits_ms']:.1f}x)")
    figures = adam_step(args.repeats)
    results["adam_4.6M"] = figures
    print(f"Adam step over 4.6M parameters: per tensor {figures['per_tensor_ms']:.1f} ms, "
          f"fused {figures['fused_ms']:.1f} ms "
          f"({figures['per_tensor_ms'] / figures['fused_ms']:.1f}x)")
    for input_size in (256, 512):  # the recipe's layers: fed an embedding, or [h; context]
        figures = training_lstm(input_size, max(3, args.repeats // 4))
        results[f"lstm_train_{input_size}x256"] = figures
        peak = machine["matmul_peak_gflops"]
        print(f"LSTM {input_size} -> 256, forward + backward, recipe-shaped batches: oneDNN "
              f"{figures['fused_gflops']:.1f} GFLOP/s ({figures['fused_gflops'] / peak:.0%} of "
              f"the peak), per-step loop {figures['loop_gflops']:.1f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
