"""Decoding speed on Multi30k test_2016_flickr: beam 5 and greedy, fp32 and (optionally) int8.

With ``--checkpoint`` the source file goes through ``inference.translate_lines`` (the real path:
tokenise, batch by length under the token and row budgets, decode the batches on the recipe's
workers, restore the order) and, with references,
BLEU/chrF are scored (``--checkpoint`` twice or more: an ensemble of those checkpoints, int8 by
quantising each member). Without it a reference-size model (embedding 256, hidden 512, 2+2 layers,
8k vocabulary) gets seeded random weights and an 8k SentencePiece tokenizer is trained on the
Multi30k train de+en (``--tokenizer-sentences`` samples fewer for a faster start); each sentence's
output is capped at its reference length (in target pieces) + 10, since random weights rarely emit
EOS. Those hypotheses mostly run to the cap, so random-weight figures decode somewhat *longer*
outputs than a trained model and are pessimistic per sentence.

Figures per configuration: sentences/s decode-only (wall time around the decode calls only, after
an untimed warm-up on 8 sentences; with a checkpoint it includes the source tokenisation inside
translate_lines, ~1% of it), tokens/s = (source pieces without EOS + best hypothesis' pieces
without EOS) / decode time, and peak RSS (getrusage maxrss: the process-wide peak so far, so the
int8 rows include the fp32 model). The machine (CPU, ISA, the fp32 matmul peak measured in this
run) is printed first. The last line printed is one JSON object with every figure.

A ratio to the OpenNMT-py peer is printed only for the beams given a ``--peer-summary``: a
``summary.txt`` of ``../shared/peers/translate_onmt.sh`` decoded on this machine in this session
(its beam size is read from the file; the ratio is to its decode-only sentences/s).

    python benchmarks/decode_speed.py                       # random weights
    python benchmarks/decode_speed.py --int8 --threads 2
    python benchmarks/decode_speed.py --checkpoint runs/x/best.pt --int8
    python benchmarks/decode_speed.py --sentences 40 --threads 1   # smoke test
    python benchmarks/decode_speed.py --checkpoint runs/x/best.pt --workers 1,2 --repeats 4
        # one batch at a time on 2 threads against two side by side, alternating in one process
    python benchmarks/decode_speed.py --checkpoint runs/x/best.pt \\
        --peer-summary ~/peers/runs/onmt_20m/decode/beam5_b64/summary.txt \\
        --peer-summary ~/peers/runs/onmt_20m/decode/beam1_b64/summary.txt
"""

from __future__ import annotations

import argparse
import json
import resource
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch
from machine import describe_machine, machine_line
from peers import PeerFileError, decode_summaries_by_beam

from seq2seq.config import DecodeConfig, ModelConfig, Recipe, TokenizerConfig
from seq2seq.data import read_lines
from seq2seq.evaluate import score_corpus
from seq2seq.heap import retain_freed_memory
from seq2seq.inference import (
    LoadedModel,
    decoding_workers,
    encode_source,
    load_models,
    translate_ids,
    translate_lines,
    translation_max_lengths,
)
from seq2seq.model import build_model, quantize_int8
from seq2seq.model.recurrent import bound_primitive_cache
from seq2seq.tokenizer import train_tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"  # <repo>/../shared


warnings.filterwarnings("ignore", message="torch.quantize_per_tensor")  # int8 LSTM, torch 2.x


def random_model(args: argparse.Namespace) -> LoadedModel:
    """A reference-size translation model with seeded random weights and an 8k tokenizer."""
    train = [line for lang in ("de", "en") for line in read_lines(args.data / f"train.{lang}.gz")]
    start = time.perf_counter()
    tokenizer = train_tokenizer(train, TokenizerConfig(vocab_size=args.vocab,
                                                       max_sentences=args.tokenizer_sentences))
    print(f"tokenizer: {tokenizer.vocab_size} pieces from "
          f"{min(len(train), args.tokenizer_sentences)} sentences in "
          f"{time.perf_counter() - start:.1f}s")
    torch.manual_seed(args.seed)
    config = ModelConfig(embed_dim=256, hidden_size=512, encoder_layers=2, decoder_layers=2)
    device = torch.device(args.device)
    model = build_model(config, args.vocab, "translation").eval().to(device)
    return LoadedModel(Recipe(), model, tokenizer, device, 0)


def decode_all(loaded: LoadedModel, lines: list[str], src_ids: list[list[int]],
               caps: torch.Tensor | None, config: DecodeConfig, strategy: str) -> list[list[int]]:
    """Best hypothesis tokens per line: the real path with a checkpoint, else capped lengths."""
    if caps is None:
        with torch.inference_mode():
            hyps = translate_lines(loaded, lines, config, strategy)
        return [per_input[0].tokens if per_input else [] for per_input in hyps]
    hyps = translate_ids(loaded.model, src_ids, config, loaded.device, strategy,
                         max_lengths=caps)
    return [per_input[0].tokens for per_input in hyps]


def run_config(loaded: LoadedModel, precision: str, beam: int, data: dict,
               base: DecodeConfig) -> dict:
    """Warm up on 8 sentences, then time decoding all of them with one beam size."""
    config = replace(base, beam_size=beam, n_best=1)
    strategy = "beam" if beam > 1 else "greedy"
    lines, src_ids, caps, refs = data["lines"], data["src_ids"], data["caps"], data["refs"]
    decode_all(loaded, lines[:8], src_ids[:8], None if caps is None else caps[:8], config,
               strategy)
    start = time.perf_counter()
    tokens = decode_all(loaded, lines, src_ids, caps, config, strategy)
    seconds = time.perf_counter() - start
    src_tokens = sum(len(ids) - 1 for ids in src_ids)
    tgt_tokens = sum(len(t) for t in tokens)
    result = {
        "precision": precision, "beam": beam, "sentences": len(lines),
        "decode_s": round(seconds, 2),
        "sentences_per_s": round(len(lines) / seconds, 1),
        "tokens_per_s": round((src_tokens + tgt_tokens) / seconds),
        "source_tokens": src_tokens, "target_tokens": tgt_tokens,
        "peak_rss_MiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "bleu": None, "chrf": None,
    }
    if refs is not None and caps is None:  # BLEU of random weights means nothing
        scores = score_corpus([loaded.tokenizer.decode(t) for t in tokens], refs)
        result["bleu"], result["chrf"] = round(scores["bleu"], 2), round(scores["chrf"], 2)
    return result


def peer_ratio(result: dict, peer: dict) -> dict:
    """Our decode-only sentences/s over the peer's, when both decoded the same sentences."""
    figures = {"peer": peer["path"], "peer_batch": peer.get("batch"),
               "peer_sentences_per_s": peer.get("sentences_per_s_gen"),
               "peer_sentences_per_s_wall": peer.get("sentences_per_s_wall"),
               "ratio_to_peer": None}
    if peer["sentences"] != result["sentences"]:
        figures["note"] = (f"no ratio: the peer decoded {peer['sentences']} sentences, "
                           f"this run {result['sentences']}")
    elif not figures["peer_sentences_per_s"]:
        figures["note"] = "no ratio: the peer summary has no decode-only time (gen_s NA)"
    else:
        figures["ratio_to_peer"] = round(result["sentences_per_s"]
                                         / figures["peer_sentences_per_s"], 2)
    return figures


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, action="append",
                        help="trained model (default: random weights); repeat for an ensemble")
    parser.add_argument("--data", type=Path, default=DATA, help="Multi30k directory")
    parser.add_argument("--source", type=Path, help="default DATA/test_2016_flickr.de.gz")
    parser.add_argument("--reference", type=Path, help="default DATA/test_2016_flickr.en.gz")
    parser.add_argument("--beams", default="5,1", help="comma-separated beam sizes (1 = greedy)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (int8 is CPU only)")
    parser.add_argument("--sentences", type=int, default=1000, help="first N source lines")
    parser.add_argument("--max-tokens-per-batch", type=int,
                        help="source-token budget per batch (default: the recipe's)")
    parser.add_argument("--max-rows-per-batch", type=int,
                        help="decoding rows (sentences x beam) per batch (default: the recipe's)")
    parser.add_argument("--workers", type=str,
                        help="batches decoded side by side (default: the recipe's; 0 = auto); "
                        "several, comma-separated, alternate in this process (--repeats times)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed runs of every configuration (workers alternate between them)")
    parser.add_argument("--int8", action="store_true", help="also run int8 dynamic quantisation")
    parser.add_argument("--vocab", type=int, default=8000, help="random weights: vocabulary")
    parser.add_argument("--tokenizer-sentences", type=int, default=1_000_000,
                        help="random weights: sentences sampled to train the tokenizer")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--peer-summary", type=Path, action="append", default=[],
                        help="a translate_onmt.sh summary.txt from this machine (repeatable, one "
                        "per beam): print our ratio to it")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    try:  # read first: a bad file fails fast
        peers = decode_summaries_by_beam(args.peer_summary)
    except PeerFileError as error:
        raise SystemExit(str(error)) from None
    bound_primitive_cache()  # as load_model does, also for random weights
    retain_freed_memory()  # as the command line does
    torch.set_num_threads(args.threads)
    machine = describe_machine(device=args.device)
    print(machine_line(machine))
    source = args.source or args.data / "test_2016_flickr.de.gz"
    reference = args.reference or args.data / "test_2016_flickr.en.gz"
    lines = read_lines(source)[: args.sentences]
    refs = read_lines(reference)[: args.sentences] if reference.exists() else None
    loaded = load_models(args.checkpoint, args.device) if args.checkpoint else random_model(args)
    base = loaded.recipe.decode
    if args.max_tokens_per_batch:
        base = replace(base, max_tokens_per_batch=args.max_tokens_per_batch)
    if args.max_rows_per_batch is not None:
        base = replace(base, max_rows_per_batch=args.max_rows_per_batch)
    workers = [base.workers] if args.workers is None else [int(w) for w in args.workers.split(",")]
    src_ids = [encode_source(loaded.tokenizer, line) for line in lines]  # whole, as translated
    caps = None
    if not args.checkpoint:  # random weights: cap at the reference length + 10
        caps = (torch.tensor([len(loaded.tokenizer.encode(r)) + 10 for r in refs]) if refs
                else translation_max_lengths(torch.tensor([len(s) for s in src_ids]), base))
    data = {"lines": lines, "src_ids": src_ids, "caps": caps, "refs": refs}
    models = [("fp32", loaded)]
    if args.int8 and args.checkpoint and len(args.checkpoint) > 1:  # an ensemble: each member
        models.append(("int8", load_models(args.checkpoint, args.device, "int8")))
    elif args.int8:
        models.append(("int8", replace(loaded, model=quantize_int8(loaded.model))))
    results = []
    for precision, model in models:
        for beam in (int(b) for b in args.beams.split(",")):
            for repeat in range(args.repeats):
                for count in workers if repeat % 2 == 0 else workers[::-1]:
                    result = run_config(model, precision, beam, data,
                                        replace(base, workers=count))
                    result = {**result, "workers": count, "repeat": repeat}
                    if beam in peers:
                        result.update(peer_ratio(result, peers[beam]))
                    print(" ".join(f"{key}={value}" for key, value in result.items()))
                    results.append(result)
    summary = {"weights": [str(c) for c in args.checkpoint] if args.checkpoint else "random",
               "parameters_M": round(sum(p.numel() for p in loaded.model.parameters()) / 1e6, 2),
               "source": str(source), "threads": args.threads, "device": args.device,
               "max_tokens_per_batch": base.max_tokens_per_batch,
               "max_rows_per_batch": base.max_rows_per_batch,
               "workers_x_threads": ["x".join(map(str, decoding_workers(replace(base, workers=w),
                                                                         loaded.device)))
                                     for w in workers],
               "tokens_counted": "source pieces without EOS + best hypothesis pieces without EOS",
               "machine": machine, "configs": results}
    if peers:
        summary["peers"] = {f"beam{beam}": peer for beam, peer in sorted(peers.items())}
    print(json.dumps(summary))

if __name__ == "__main__":
    main()
