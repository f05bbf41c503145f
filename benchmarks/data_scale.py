"""The data path at WMT scale: time to the first step, a second start, peak memory per rank.

Builds a synthetic WMT-shaped corpus of ``--pairs`` pairs from a seed (each line two random
Multi30k sentences, about 24 words a side; Multi30k's validation set validates), then starts
``seq2seq train recipes/multi30k_de_en.toml`` as a user would (``train.max_steps=1``,
``tokenizer.max_sentences=100000``, ``data.max_length=200``), once as one process and once as 2
torchrun processes, each twice: a first start (tokenizer training, encoding into the
memory-mapped cache) and a second start in the same run directory (tokenizer and cache reused).
Each rank reports, through a small hook around the trainer: the seconds from launch to the end
of its first optimizer step, the seconds spent encoding, its peak RSS at that point, its peak
private (anonymous) memory, sampled every 20 ms, and the mapped file pages it holds at that point
(page cache, which the ranks of a node share and the kernel can drop), and the data path's
speed (``task.next_step()`` batches per second: the sampler, collate and the memory-mapped
arrays, no model). ``--old REPO_DIR`` also runs the first start of another checkout (e.g. the
code before issue 14) for comparison. The last line is one JSON object.

    python benchmarks/data_scale.py --pairs 1000000 --old /tmp/seq2seq_main
    python benchmarks/data_scale.py                     # 4.5M pairs, as WMT16 en-de
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MULTI30K = REPO.parent / "shared" / "data" / "multi30k"
RECIPE = Path("recipes") / "multi30k_de_en.toml"  # in the checkout that runs
SETTINGS = ("train.max_steps=1", "tokenizer.max_sentences=100000", "data.max_length=200",
            "train.valid_every=1000000", "train.log_every=1000000")

# Runs in each rank (``--worker``): times the first step, measures the data path, then exits
# before validating (the figures are about getting to training, not about the model).
WORKER = """
import json, os, resource, sys, threading, time
from seq2seq import train

rank, record, launched = int(os.environ.get("RANK", 0)), os.environ["RECORD"], float(sys.argv[1])
spent = {"encode_s": 0.0}
memory = {"peak_anon_mib": 0.0}

def status_mib():
    with open("/proc/self/status") as handle:
        fields = dict(line.split(":", 1) for line in handle)
    return {k: int(fields[k].split()[0]) / 1024 for k in ("RssAnon", "RssFile", "RssShmem")}

def watch_anonymous():  # the kernel keeps no peak of RssAnon: sample it
    while True:
        memory["peak_anon_mib"] = max(memory["peak_anon_mib"], status_mib()["RssAnon"])
        time.sleep(0.02)

threading.Thread(target=watch_anonymous, daemon=True).start()
try:
    from seq2seq import corpus
    real_build = corpus.build_parallel
    def build(*args, **kwargs):
        started = time.perf_counter()
        real_build(*args, **kwargs)
        spent["encode_s"] += time.perf_counter() - started
    corpus.build_parallel = build
except ImportError:  # the old path encodes inside task.encode
    pass
real_step = train.Trainer.train_step

def first_step(self, micro_batches):
    stats = real_step(self, micro_batches)
    first = time.time() - launched
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    now = status_mib()
    anon = max(memory["peak_anon_mib"], now["RssAnon"])
    started, count = time.perf_counter(), 0
    while time.perf_counter() - started < 5.0:
        self.task.next_step()
        count += 1
    params = sum(p.numel() for p in self.model.parameters())
    with open(f"{record}.rank{rank}.json", "w") as handle:
        json.dump({"first_step_s": first, "peak_rss_mib": rss, "peak_anon_mib": anon,
                   "file_mib": now["RssFile"], **spent,
                   "batches_per_s": count / (time.perf_counter() - started),
                   "model_optimizer_mib": params * 16 / 2**20}, handle)
    os._exit(0)

train.Trainer.train_step = first_step
from seq2seq.cli import main
sys.argv = ["seq2seq", *sys.argv[2:]]
main()
"""


def build_corpus(directory: Path, pairs: int, seed: int) -> None:
    """train.{de,en}: ``pairs`` lines of two random Multi30k training sentences each."""
    directory.mkdir(parents=True, exist_ok=True)
    sides = {}
    for lang in ("de", "en"):
        with gzip.open(MULTI30K / f"train.{lang}.gz", "rt", encoding="utf-8") as handle:
            sides[lang] = np.array(handle.read().splitlines(), dtype=object)
        shutil.copy(MULTI30K / f"val.{lang}.gz", directory / f"val.{lang}.gz")
    picks = np.random.default_rng(seed).integers(0, len(sides["de"]), size=(pairs, 2))
    for lang, sentences in sides.items():
        with open(directory / f"train.{lang}", "w", encoding="utf-8") as handle:
            for start in range(0, pairs, 100_000):
                part = picks[start : start + 100_000]
                lines = sentences[part[:, 0]] + " " + sentences[part[:, 1]]
                handle.write("\n".join(lines) + "\n")


def start(corpus: Path, out: Path, nproc: int, code: Path, record: Path) -> list[dict]:
    """One start of ``seq2seq train`` with ``nproc`` processes; each rank's figures."""
    settings = [f"data.root={corpus}", "data.train=train.{lang}", *SETTINGS]
    if nproc > 1:
        settings.append("train.threads=1")
    args = ["train", str(code / RECIPE), "--out", str(out)]
    args += [item for setting in settings for item in ("--set", setting)]
    env = {**os.environ, "RECORD": str(record), "PYTHONPATH": str(code),
           "PYTHONDONTWRITEBYTECODE": "1"}
    launched = time.time()
    if nproc == 1:
        command = [sys.executable, "-c", WORKER, str(launched), *args]
    else:
        worker = out.parent / "worker.py"
        worker.write_text(WORKER)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={nproc}", str(worker), str(launched), *args]
    # cwd outside any checkout: ``python -c`` puts the cwd first on sys.path
    done = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, cwd=out.parent)
    if done.returncode:
        raise SystemExit(f"error: {' '.join(command[:6])} ... failed:\n{done.stderr[-3000:]}")
    return [json.loads(Path(f"{record}.rank{r}.json").read_text()) for r in range(nproc)]


def summary(label: str, ranks: list[dict]) -> str:
    peaks = ", ".join(f"{r['peak_rss_mib']:.0f}" for r in ranks)
    anon = ", ".join(f"{r.get('peak_anon_mib', float('nan')):.0f}" for r in ranks)
    files = ", ".join(f"{r.get('file_mib', float('nan')):.0f}" for r in ranks)
    return (f"{label}: first step after {max(r['first_step_s'] for r in ranks):.1f} s "
            f"(encoding {ranks[0]['encode_s']:.1f} s), peak RSS per rank "
            f"{peaks} MiB (private {anon}; mapped files {files} at the first step; model + Adam "
            f"{ranks[0]['model_optimizer_mib']:.0f} MiB), data path "
            f"{ranks[0]['batches_per_s']:.0f} batches/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=4_500_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/seq2seq_data_scale"))
    parser.add_argument("--old", type=Path, help="another checkout to compare (first start)")
    parser.add_argument("--skip-new", action="store_true", help="run only the --old checkout")
    parser.add_argument("--keep", action="store_true", help="keep the corpus and the runs")
    parser.add_argument("--corpus-only", type=Path, metavar="DIR",
                        help="only build the corpus into DIR (for gpu_check.sh), then stop")
    args = parser.parse_args()
    if args.corpus_only:
        build_corpus(args.corpus_only, args.pairs, args.seed)
        return
    sys.path.insert(0, str(REPO))
    from machine import describe_machine, machine_line

    machine = describe_machine()
    print(machine_line(machine), flush=True)
    work = args.work / str(args.pairs)
    shutil.rmtree(work, ignore_errors=True)
    started = time.perf_counter()
    build_corpus(work / "corpus", args.pairs, args.seed)
    print(f"corpus of {args.pairs:,} pairs built in {time.perf_counter() - started:.0f} s",
          flush=True)
    result: dict = {"pairs": args.pairs, "seed": args.seed, "machine": machine}
    for nproc in () if args.skip_new else (1, 2):
        runs = {}
        for which in ("first", "second"):
            runs[which] = start(work / "corpus", work / f"run{nproc}", nproc, REPO,
                                work / f"{which}{nproc}")
            print(summary(f"{nproc} process(es), {which} start", runs[which]), flush=True)
        result[f"nproc{nproc}"] = runs
    if args.old:
        old = start(work / "corpus", work / "old", 1, args.old, work / "old")
        print(summary("old path, 1 process", old), flush=True)
        result["old"] = old
    two = result.get("nproc2")
    if two:
        result.update(
            first_start_s=max(r["first_step_s"] for r in two["first"]),
            second_start_s=max(r["first_step_s"] for r in two["second"]),
            peak_rss_mib=[max(a["peak_rss_mib"], b["peak_rss_mib"])
                          for a, b in zip(two["first"], two["second"], strict=True)],
            peak_anon_mib=[max(a["peak_anon_mib"], b["peak_anon_mib"])
                           for a, b in zip(two["first"], two["second"], strict=True)])
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
