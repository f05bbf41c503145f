"""Padding fraction and load time of the data pipeline on Multi30k de-en train.

Reads train.{de,en}.gz, trains the joint 8k SentencePiece model (TokenizerConfig defaults) on
de + en train text, encodes with data.max_length = 100, and measures one epoch of
TokenBatchSampler batches at several token budgets. Padding fraction = padded cells of src and
tgt_in / tgt_out that hold PAD, over all cells (B*S + B*T per batch).

    python benchmarks/data_padding.py [MULTI30K_DIR]

The machine (CPU, ISA, fp32 matmul peak) is printed first; the last line printed is a one-line
JSON summary.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from machine import describe_machine, machine_line

from seq2seq.config import DataConfig, TokenizerConfig
from seq2seq.data import TokenBatchSampler, collate, encode_pairs, read_parallel
from seq2seq.tokenizer import train_tokenizer

DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"


def epoch_figures(data, max_tokens: int, world_size: int) -> dict:
    """Padding and batch sizes over one epoch, all ranks together."""
    src_len, tgt_len = data.src_lengths, data.tgt_lengths
    real = padded = batches = 0
    src_pad = tgt_pad = 0
    start = time.perf_counter()
    for rank in range(world_size):
        sampler = TokenBatchSampler(src_len, tgt_len, max_tokens, seed=1, rank=rank,
                                    world_size=world_size)
        for indices in sampler:
            batch = collate(data, indices)
            cells_src, cells_tgt = batch.src.numel(), batch.tgt_out.numel()
            real += batch.num_src_tokens + batch.num_tgt_tokens
            padded += cells_src + cells_tgt
            src_pad += cells_src - batch.num_src_tokens
            tgt_pad += cells_tgt - batch.num_tgt_tokens
            batches += 1
    seconds = time.perf_counter() - start
    return {
        "max_tokens": max_tokens,
        "world_size": world_size,
        "batches": batches,
        "padding_fraction": round(1 - real / padded, 4),
        "src_padding_fraction": round(src_pad / padded, 4),
        "tgt_padding_fraction": round(tgt_pad / padded, 4),
        "mean_cells_per_batch": round(padded / batches, 1),
        "mean_sentences_per_batch": round(len(data) / batches, 1),
        "epoch_sample_collate_s": round(seconds, 3),
    }


def main() -> None:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_ROOT
    config = DataConfig(root=str(root))
    machine = describe_machine()
    print(machine_line(machine))
    start = time.perf_counter()
    pairs = read_parallel(config, "train")
    load_s = time.perf_counter() - start
    print(f"read {len(pairs)} pairs in {load_s:.3f} s")

    start = time.perf_counter()
    tokenizer = train_tokenizer([text for pair in pairs for text in pair], TokenizerConfig())
    train_s = time.perf_counter() - start
    print(f"trained SentencePiece ({tokenizer.vocab_size} pieces) in {train_s:.1f} s")

    start = time.perf_counter()
    data = encode_pairs(pairs, tokenizer, config.max_length)
    encode_s = time.perf_counter() - start
    print(f"encoded {len(data)} pairs in {encode_s:.2f} s")

    results = []
    for max_tokens in (4096, 8192):
        for world_size in (1, 8):
            figures = epoch_figures(data, max_tokens, world_size)
            results.append(figures)
            print(f"max_tokens {max_tokens:5d} world {world_size}: "
                  f"{figures['batches']} batches, padding {100 * figures['padding_fraction']:.2f}% "
                  f"(src {100 * figures['src_padding_fraction']:.2f}%, "
                  f"tgt {100 * figures['tgt_padding_fraction']:.2f}%), "
                  f"{figures['mean_sentences_per_batch']} sentences and "
                  f"{figures['mean_cells_per_batch']} cells per batch, "
                  f"sample+collate {figures['epoch_sample_collate_s']} s/epoch")
    print(json.dumps({"pairs": len(pairs), "load_s": round(load_s, 3),
                      "tokenizer_train_s": round(train_s, 1), "encode_s": round(encode_s, 2),
                      "vocab_size": tokenizer.vocab_size, "machine": machine,
                      "results": results}))


if __name__ == "__main__":
    main()
