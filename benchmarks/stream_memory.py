"""Peak resident memory of ``seq2seq translate`` streaming 1,000 and 100,000 lines through stdin.

Each run is a fresh process whose peak RSS comes from ``os.wait4`` (the kernel's figure for that
child alone). Two ways of running the same code are compared:

- ``cli``: ``python -m seq2seq translate CKPT`` as a user types it (it calls
  ``inference.limit_allocator_growth()`` first: one malloc arena, freed memory trimmed at once);
- ``library``: the same ``load_model`` -> ``read_utf8_lines`` -> ``write_translations`` calls with
  glibc's default allocator settings, i.e. what the CLI did before.

The input repeats the toy task's validation sources (with an empty line every 97 lines), so any
checkpoint of the toy recipe works; without ``--checkpoint`` one is trained first (about a minute).
The output line count is checked against the input line count. The last line is one JSON object.

    python benchmarks/stream_memory.py                          # trains a toy model first
    python benchmarks/stream_memory.py --checkpoint runs/toy/best.pt --lines 1000 100000
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

REPO = Path(__file__).resolve().parents[1]
LIBRARY_TRANSLATE = """
import sys
from seq2seq import inference
loaded = inference.load_model(sys.argv[1])
lines = inference.read_utf8_lines(sys.stdin.buffer, "<stdin>")
inference.write_translations(loaded, lines, loaded.recipe.decode, sys.stdout)
"""


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
    from seq2seq.data import read_parallel
    from seq2seq.inference import load_model

    recipe = load_model(checkpoint).recipe
    sources = [source for source, _ in read_parallel(recipe.data, "valid", recipe.train.seed)]
    with path.open("w", encoding="utf-8") as out:
        for i in range(lines):
            out.write("\n" if i % 97 == 96 else sources[i % len(sources)] + "\n")


def run(mode: str, checkpoint: Path, source: Path, target: Path) -> dict[str, float]:
    """One streaming run; returns seconds, peak RSS in MiB and the output line count."""
    command = ([sys.executable, "-m", "seq2seq", "translate", str(checkpoint)] if mode == "cli"
               else [sys.executable, "-c", LIBRARY_TRANSLATE, str(checkpoint)])
    start = time.perf_counter()
    with source.open("rb") as stdin, target.open("wb") as stdout:
        process = subprocess.Popen(command, stdin=stdin, stdout=stdout)
        _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{mode} translate failed with status {status}")
    with target.open("rb") as produced:
        produced_lines = sum(1 for _ in produced)
    return {"seconds": time.perf_counter() - start, "peak_rss_mib": usage.ru_maxrss / 1024,
            "lines_out": produced_lines}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="a toy-recipe checkpoint (default: train)")
    parser.add_argument("--lines", type=int, nargs="+", default=[1000, 100000])
    parser.add_argument("--modes", nargs="+", default=["cli", "library"],
                        choices=["cli", "library"])
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        checkpoint = args.checkpoint or toy_checkpoint(work)
        for lines in args.lines:
            source = work / f"input_{lines}.txt"
            make_input(source, lines, checkpoint)
            for mode in args.modes:
                figures = run(mode, checkpoint, source, work / "output.txt")
                ok = figures["lines_out"] == lines
                results.append({"mode": mode, "lines_in": lines, **figures, "lines_match": ok})
                print(f"{mode:8s} {lines:>7,} lines: peak RSS {figures['peak_rss_mib']:6.0f} MiB, "
                      f"{figures['seconds']:6.1f} s, {figures['lines_out']:,} lines out"
                      f"{'' if ok else '  (MISMATCH)'}", flush=True)
    print(json.dumps({"benchmark": "stream_memory", "results": results}))


if __name__ == "__main__":
    main()
