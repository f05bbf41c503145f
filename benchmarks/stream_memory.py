"""Peak resident memory of ``seq2seq translate`` streaming 1,000 to 100,000 lines through stdin.

Each run is a fresh ``python -m seq2seq translate CKPT`` process, as a user types it, whose peak
RSS comes from ``os.wait4`` (the kernel's figure for that child alone); the output line count is
checked against the input line count. Memory is flat when the 100,000-line peak is close to the
1,000-line one: inputs are read in bounded chunks, and the beam state keeps the encoder side once
per sentence, so no per-beam copies of varying shapes are made at every step.

The input repeats the toy task's validation sources (with an empty line every 97 lines), so any
checkpoint of the toy recipe works; without ``--checkpoint`` one is trained first (about a minute).
The machine (CPU, ISA, fp32 matmul peak) is printed first; the last line is one JSON object.

    python benchmarks/stream_memory.py                          # trains a toy model first
    python benchmarks/stream_memory.py --checkpoint runs/toy/best.pt --lines 1000 10000 100000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import describe_machine, machine_line

REPO = Path(__file__).resolve().parents[1]


def toy_checkpoint(work: Path) -> Path:
    """Train the toy recipe briefly (the figures need a model that stops, not a good one)."""
    out = work / "toy"
    recipe = REPO / "recipes" / "toy_reverse.toml"
    subprocess.run([sys.executable, "-m", "seq2seq", "train", str(recipe),
                    "--set", "train.max_steps=300", "--out", str(out)], check=True,
                   stdout=subprocess.DEVNULL)
    return out / "best.pt"


def make_input(path: Path, lines: int, checkpoint: Path) -> None:
    """``lines`` toy sources (the validation split of the checkpoint's recipe), some empty."""
    import torch

    from seq2seq.data import read_parallel
    from seq2seq.inference import load_model

    torch.set_num_threads(1)  # no OpenMP worker of this process may spin beside the measured one
    recipe = load_model(checkpoint).recipe
    sources = [source for source, _ in read_parallel(recipe.data, "valid", recipe.train.seed)]
    with path.open("w", encoding="utf-8") as out:
        for i in range(lines):
            out.write("\n" if i % 97 == 96 else sources[i % len(sources)] + "\n")


def run(checkpoint: Path, source: Path, target: Path) -> dict[str, float]:
    """One streaming run; returns seconds, peak RSS in MiB and the output line count."""
    command = [sys.executable, "-m", "seq2seq", "translate", str(checkpoint)]
    start = time.perf_counter()
    with source.open("rb") as stdin, target.open("wb") as stdout:
        process = subprocess.Popen(command, stdin=stdin, stdout=stdout)
        _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"translate failed with status {status}")
    with target.open("rb") as produced:
        produced_lines = sum(1 for _ in produced)
    return {"seconds": time.perf_counter() - start, "peak_rss_mib": usage.ru_maxrss / 1024,
            "lines_out": produced_lines}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="a toy-recipe checkpoint (default: train)")
    parser.add_argument("--lines", type=int, nargs="+", default=[1000, 10000, 100000])
    args = parser.parse_args()
    machine = describe_machine()
    print(machine_line(machine))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        checkpoint = args.checkpoint or toy_checkpoint(work)
        for lines in args.lines:
            source = work / f"input_{lines}.txt"
            make_input(source, lines, checkpoint)
            figures = run(checkpoint, source, work / "output.txt")
            ok = figures["lines_out"] == lines
            results.append({"lines_in": lines, **figures, "lines_match": ok})
            print(f"{lines:>7,} lines: peak RSS {figures['peak_rss_mib']:6.0f} MiB, "
                  f"{figures['seconds']:6.1f} s, {figures['lines_out']:,} lines out"
                  f"{'' if ok else '  (MISMATCH)'}", flush=True)
    print(json.dumps({"benchmark": "stream_memory", "machine": machine, "results": results}))


if __name__ == "__main__":
    main()
