"""Training-step throughput of the translation model on Multi30k-shaped random batches.

One step = what the trainer does: forward, label-smoothed cross-entropy (PAD ignored;
``OutputLayer.losses``), backward, gradient clipping, fused Adam. The model is the reference one
(embed 256, hidden 512, 2+2 layers, 8k joint vocabulary); ``--hidden-size 256
--target-vocabulary 3963 --target-tokens 1500`` is the Multi30k recipe's model and batch.
Reports source+target tokens/s (non-padding, as NVIDIA's GNMT tables count), matmul FLOPs per
token counted analytically (``Seq2Seq.flops_per_token``: 2*in*out per linear / gate matmul,
attention scores and context, output layer; training = 3x forward), and MFU against the fp32
matmul peak of ``seq2seq.train.matmul_peak_flops`` (the one the trainer reports MFU against)
measured in the same run on the same threads, right after every timed step (the CPU may be
shared): ``mfu_median`` is the median over steps of each step's FLOP/s over its own peak;
``mfu_vs_best_peak`` divides the overall FLOP/s by the best peak seen. The machine (CPU, ISA and
that best peak) is printed before the JSON and recorded in it.

    python benchmarks/train_speed.py --steps 4 --threads 2
    python benchmarks/train_speed.py --output-projection off --profile
    python benchmarks/train_speed.py --output-projection on --hidden-size 256 \
        --target-vocabulary 3963 --target-tokens 1500 --profile
    python benchmarks/train_speed.py --output-projection on --hidden-size 256 \
        --target-vocabulary 3963 --target-tokens 1500 --steps 10 --dropout-pairs 60
    python benchmarks/train_speed.py --output-projection on --hidden-size 256 \
        --target-vocabulary 3963 --target-tokens 1500 --steps 10 --loss-pairs 30

The last line printed is one JSON object with every configuration's figures.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from collections.abc import Callable

import torch
from machine import describe_machine, machine_line
from torch import nn

from seq2seq.config import ModelConfig
from seq2seq.heap import retain_freed_memory
from seq2seq.model import Seq2Seq, build_model
from seq2seq.model.dropout import Dropout
from seq2seq.model.loss import token_losses
from seq2seq.tokenizer import BOS, EOS, PAD
from seq2seq.train import matmul_peak_flops

CPU = torch.device("cpu")


def make_batches(num_batches: int, target_tokens: int, vocab: int, seed: int) -> list[dict]:
    """Length-bucketed batches of random ids with Multi30k-like lengths (src ~14, tgt ~13 tokens
    including EOS), as a token-budget sampler would produce them: pairs sorted by length, cut
    every ``target_tokens`` real target tokens (about 300 sentences)."""
    g = torch.Generator().manual_seed(seed)
    n = 29_000  # a Multi30k-sized training set
    src_len = (torch.randn(n, generator=g) * 4.5 + 13).round().clamp(3, 45).long()
    tgt_len = (src_len * 0.9 + torch.randn(n, generator=g) * 2).round().clamp(2, 45).long()
    order = torch.argsort(src_len * 100 + tgt_len)
    batch_of = torch.cumsum(tgt_len[order] + 1, 0) // target_tokens  # batch id of each pair
    chunks = order.split(torch.bincount(batch_of).tolist())[:-1]  # the last one is partial
    picked = torch.randperm(len(chunks), generator=g)[:num_batches].tolist()
    batches = []
    for chunk in (chunks[i] for i in picked):
        s, t = src_len[chunk], tgt_len[chunk]  # words (without EOS)
        src = torch.randint(4, vocab, (len(chunk), int(s.max()) + 1), generator=g)
        tgt = torch.randint(4, vocab, (len(chunk), int(t.max()) + 1), generator=g)
        steps_s, steps_t = torch.arange(src.size(1)), torch.arange(tgt.size(1))
        src[steps_s == s.unsqueeze(1)] = EOS
        src[steps_s > s.unsqueeze(1)] = PAD
        tgt_out = tgt.masked_fill(steps_t == t.unsqueeze(1), EOS)
        tgt_out[steps_t > t.unsqueeze(1)] = PAD
        tgt_in = torch.cat([torch.full((len(chunk), 1), BOS), tgt_out[:, :-1]], dim=1)
        tgt_in = tgt_in.masked_fill(tgt_in == EOS, PAD)
        batches.append(dict(src=src, src_lengths=s + 1, tgt_in=tgt_in, tgt_out=tgt_out,
                            tgt_lengths=t + 1))
    return batches


def batch_flops(model: Seq2Seq, batch: dict, padded: bool = False) -> float:
    """Training matmul FLOPs of one batch, pair by pair over real (non-padding) tokens, or over
    the padded (B, S) and (B, T) shapes that are actually computed."""
    if padded:
        (rows, s), t = batch["src"].shape, batch["tgt_out"].size(1)
        return model.flops_per_token(s, t) * (s + t) * rows
    total = 0.0
    for s, t in zip(batch["src_lengths"].tolist(), batch["tgt_lengths"].tolist(), strict=True):
        total += model.flops_per_token(s, t) * (s + t)
    return total


def train_step(model: Seq2Seq, optimizer: torch.optim.Optimizer, batch: dict,
               fused_loss: bool = True) -> float:
    """One optimisation step; returns the loss per target token. ``fused_loss=False`` forms the
    logits and calls ``token_losses`` on them (the path GPUs take) instead of
    ``OutputLayer.losses``' fused classifier and loss."""
    targets = model.output.positions(batch["tgt_out"])
    if fused_loss:
        loss, _ = model(batch["src"], batch["src_lengths"], batch["tgt_in"], targets=targets,
                        smoothing=0.1)
    else:
        logits = model(batch["src"], batch["src_lengths"], batch["tgt_in"])
        loss, _ = token_losses(logits, targets, 0.1)
    loss = loss / batch["tgt_lengths"].sum()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
    optimizer.step()
    return loss.item()


def profile_step(model: Seq2Seq, optimizer: torch.optim.Optimizer, batch: dict) -> None:
    """Print where one training step spends its time (top operators by self CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_step(model, optimizer, batch)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


def build(args: argparse.Namespace, projection: bool) -> tuple[Seq2Seq, torch.optim.Optimizer]:
    """The configuration's model, in training mode, and its fused Adam."""
    config = ModelConfig(cell=args.cell, embed_dim=256, hidden_size=args.hidden_size,
                         encoder_layers=2, decoder_layers=2, dropout=0.2, tie_embeddings=True,
                         output_projection=projection,
                         target_vocabulary=bool(args.target_vocabulary))
    torch.manual_seed(args.seed)
    model = build_model(config, args.vocab, "translation").train()
    if args.target_vocabulary:  # the classifier scores this many ids (the batches' targets map
        model.output.restrict(torch.arange(args.target_vocabulary))  # outside them to UNK)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.98), fused=True)


def run_config(args: argparse.Namespace, projection: bool, batches: list[dict]) -> dict:
    """Warm up, then time ``args.steps`` training steps of one configuration."""
    model, optimizer = build(args, projection)
    for batch in batches[: args.warmup]:
        train_step(model, optimizer, batch)
    timed = batches[args.warmup : args.warmup + args.steps]
    seconds, peaks, mfus, hardware = 0.0, [], [], []
    for batch in timed:  # the CPU is shared: measure the peak right after each step
        start = time.perf_counter()
        train_step(model, optimizer, batch)
        elapsed = time.perf_counter() - start
        seconds += elapsed
        peaks.append(matmul_peak_flops(CPU) / 1e9)
        mfus.append(batch_flops(model, batch) / elapsed / 1e9 / peaks[-1])
        hardware.append(batch_flops(model, batch, padded=True) / elapsed / 1e9 / peaks[-1])
    if args.profile:
        profile_step(model, optimizer, timed[0])
    src_tokens = sum(int(b["src_lengths"].sum()) for b in timed)
    tgt_tokens = sum(int(b["tgt_lengths"].sum()) for b in timed)
    padded = sum(b["src"].numel() + b["tgt_out"].numel() for b in timed)
    flops = sum(batch_flops(model, b) for b in timed)
    return {
        "output_projection": projection, "cell": args.cell, "hidden_size": args.hidden_size,
        "target_vocabulary": args.target_vocabulary,
        "parameters_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "step_ms": round(1000 * seconds / len(timed), 1),
        "tokens_per_s": round((src_tokens + tgt_tokens) / seconds),
        "target_tokens_per_s": round(tgt_tokens / seconds),
        "target_tokens_per_batch": round(tgt_tokens / len(timed)),
        "padding_fraction": round(1 - (src_tokens + tgt_tokens) / padded, 3),
        "train_flops_per_token_M": round(flops / (src_tokens + tgt_tokens) / 1e6, 2),
        "model_gflops_per_s": round(flops / seconds / 1e9, 1),
        "matmul_peak_gflops": round(max(peaks), 1),
        "mfu_median": round(statistics.median(mfus), 3),  # each step against its own peak
        "mfu_vs_best_peak": round(flops / seconds / 1e9 / max(peaks), 3),
        "mfu_incl_padding_median": round(statistics.median(hardware), 3),  # FLOPs on padding too
        "peak_rss_MiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def swap_dropout(model: nn.Module, kind: str) -> None:
    """Put ``nn.Dropout`` ("torch_dropout") or ``seq2seq.model.dropout.Dropout``
    ("our_dropout") everywhere."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, (nn.Dropout, Dropout)):
                setattr(module, name,
                        nn.Dropout(child.p) if kind == "torch_dropout" else Dropout(child.p))


def paired_steps(args: argparse.Namespace, projection: bool, batches: list[dict], pairs: int,
                 step: Callable[[str, Seq2Seq, torch.optim.Optimizer, dict], None],
                 kinds: tuple[str, str]) -> dict:
    """Whole training steps of two kinds, alternating within each of ``pairs`` pairs on the same
    batch (the order flips every pair), so that a shared CPU's drift falls on both alike: the
    mean step of each and the median of the paired ratios (second kind over first)."""
    model, optimizer = build(args, projection)
    for batch in batches[: args.warmup]:
        train_step(model, optimizer, batch)
    timed = batches[args.warmup:]
    totals, ratios = dict.fromkeys(kinds, 0.0), []
    for pair in range(pairs):
        batch, seconds = timed[pair % len(timed)], {}
        for kind in kinds if pair % 2 else kinds[::-1]:
            start = time.perf_counter()
            step(kind, model, optimizer, batch)
            seconds[kind] = time.perf_counter() - start
            totals[kind] += seconds[kind]
        ratios.append(seconds[kinds[1]] / seconds[kinds[0]])
    return {"pairs": pairs, **{f"{kind}_step_ms": round(1000 * totals[kind] / pairs, 1)
                               for kind in kinds},
            "median_paired_ratio": round(statistics.median(ratios), 3)}


def dropout_step(kind: str, model: Seq2Seq, optimizer: torch.optim.Optimizer,
                 batch: dict) -> None:
    swap_dropout(model, kind)
    train_step(model, optimizer, batch)


def loss_step(kind: str, model: Seq2Seq, optimizer: torch.optim.Optimizer,
              batch: dict) -> None:
    train_step(model, optimizer, batch, fused_loss=kind == "fused_loss")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-projection", choices=["on", "off", "both"], default="both")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per config")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cell", choices=["lstm", "gru"], default="lstm")
    parser.add_argument("--target-tokens", type=int, default=4000, help="per batch")
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--target-vocabulary", type=int, default=0,
                        help="score only this many ids (the recipes' target vocabulary; 0 = all)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="profile one extra step")
    parser.add_argument("--dropout-pairs", type=int, default=0,
                        help="also time N pairs of steps, torch's dropout against ours")
    parser.add_argument("--loss-pairs", type=int, default=0,
                        help="also time N pairs of steps, the loss over formed logits against "
                             "the classifier fused into the loss")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    retain_freed_memory()  # as the command line does
    torch.set_num_threads(args.threads)
    projections = {"on": [True], "off": [False], "both": [True, False]}[args.output_projection]
    batches = make_batches(args.warmup + args.steps, args.target_tokens, args.vocab, args.seed)
    results = [run_config(args, projection, batches) for projection in projections]
    for result in results:
        print(" ".join(f"{key}={value}" for key, value in result.items()))
    best_peak = max(result["matmul_peak_gflops"] for result in results) * 1e9
    machine = describe_machine(peak_flops=best_peak)
    print(machine_line(machine))
    summary = {"threads": args.threads, "machine": machine, "configs": results}
    if args.dropout_pairs:
        summary["dropout_pairs"] = paired_steps(args, projections[0], batches, args.dropout_pairs,
                                                dropout_step, ("torch_dropout", "our_dropout"))
        print(" ".join(f"{key}={value}" for key, value in summary["dropout_pairs"].items()))
    if args.loss_pairs:
        summary["loss_pairs"] = paired_steps(args, projections[0], batches, args.loss_pairs,
                                             loss_step, ("logits_loss", "fused_loss"))
        print(" ".join(f"{key}={value}" for key, value in summary["loss_pairs"].items()))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
