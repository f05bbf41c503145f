"""``seq2seq serve`` under load: sentences/s and latency at several concurrencies, and a soak.

First the batch decoder's figure: ``inference.translate_lines`` on the same sentences in one call
(what ``seq2seq translate`` runs; decode time only, after a warm-up). Then a server is started on
127.0.0.1 (a subprocess, ``seq2seq serve CKPT ... --quantize int8``) and driven by asyncio httpx
clients: at each concurrency C, C clients send the test_2016_flickr sentences one per request
(bounded by ``--requests`` and ``--seconds``); sentences/s over the wall time and p50/p99 latency.
The soak sends ``--soak`` requests at ``--soak-concurrency`` with ``--bad-fraction`` malformed or
refused ones mixed in (bad JSON, beam 0, an unknown option, too many sentences, an empty list),
counts every good request that did not get a 200 and every bad one that did not get a 4xx, and
reads the server's resident memory (``/proc/PID/status``) before and after.

Clients and server share the machine: on 2 cores the clients' own CPU time is part of what is
measured, as it would be for a co-located caller. The machine (CPU, ISA, the fp32 matmul peak
measured in this run) is printed first; the last line is one JSON object with every figure.

    python benchmarks/serve_load.py --checkpoint runs/m30k/best.pt
    python benchmarks/serve_load.py --checkpoint A.pt --checkpoint B.pt   # a 2-model ensemble
    python benchmarks/serve_load.py --checkpoint runs/m30k/best.pt --sentences 100 --soak 500
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import httpx
import torch
from machine import describe_machine, machine_line

from seq2seq.data import read_lines
from seq2seq.inference import load_models, translate_lines

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"

BAD_BODIES = [b'{"text": ["ein Hund"', json.dumps({"text": ["ein Hund"], "beam_size": 0}).encode(),
              json.dumps({"text": ["ein Hund"], "beams": 5}).encode(),
              json.dumps({"text": ["ein Hund"] * 1000}).encode(), json.dumps({"text": []}).encode()]


def batch_figures(args: argparse.Namespace, lines: list[str]) -> dict:
    """The batch decoder on all the sentences in one call: sentences/s decode-only."""
    loaded = load_models(args.checkpoint, "cpu", args.quantize)
    config = replace(loaded.recipe.decode, beam_size=args.beam, n_best=1)
    translate_lines(loaded, lines[:8], config)
    start = time.perf_counter()
    translate_lines(loaded, lines, config)
    seconds = time.perf_counter() - start
    return {"sentences": len(lines), "seconds": round(seconds, 2),
            "sentences_per_s": round(len(lines) / seconds, 1)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "seq2seq", "serve", *map(str, args.checkpoint),
               "--port", str(port), "--batch-wait-ms", str(args.batch_wait_ms)]
    if args.quantize:
        command += ["--quantize", args.quantize]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}")
    process.kill()
    raise SystemExit("the server did not start within 300 s")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def drive(url: str, bodies: list[tuple[bytes, bool]], concurrency: int,
                seconds: float) -> dict:
    """Send ``bodies`` (JSON bytes, whether good) from ``concurrency`` clients; latencies of
    the good ones and the count of wrong answers."""
    latencies: list[float] = []
    wrong = {"good_failed": 0, "bad_not_4xx": 0}
    next_body = iter(bodies)
    deadline = time.monotonic() + seconds
    headers = {"content-type": "application/json"}

    async def worker() -> None:
        # Each client its own connection, as independent callers have: one shared pool of 64
        # connections costs httpx about twice the CPU per request (5.3 against 2.8 ms here).
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            for body, good in next_body:
                if time.monotonic() > deadline:
                    return
                start = time.perf_counter()
                response = await client.post("/translate", content=body, headers=headers)
                if good:
                    latencies.append(time.perf_counter() - start)
                    wrong["good_failed"] += response.status_code != 200
                else:
                    wrong["bad_not_4xx"] += not 400 <= response.status_code < 500

    start, client_cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall, client_cpu = time.perf_counter() - start, time.process_time() - client_cpu
    latencies.sort()
    done = len(latencies)

    def quantile(q: float) -> float:
        return round(1000 * latencies[min(done - 1, int(q * done))], 1) if done else float("nan")

    return {"concurrency": concurrency, "requests": done, "seconds": round(wall, 2),
            "sentences_per_s": round(done / wall, 1), "p50_ms": quantile(0.5),
            "p99_ms": quantile(0.99), "client_cpu_ms_per_request": round(
                1000 * client_cpu / max(1, done), 2), **wrong}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, action="append", required=True,
                        help="a translation checkpoint (repeat for an ensemble)")
    parser.add_argument("--source", type=Path, default=DATA / "test_2016_flickr.de.gz")
    parser.add_argument("--sentences", type=int, default=1000, help="first N source lines")
    parser.add_argument("--quantize", default="int8", help="int8, or '' for fp32")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--requests", type=int, default=0,
                        help="requests per concurrency level (default: one per sentence)")
    parser.add_argument("--seconds", type=float, default=120, help="cap per level")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--soak", type=int, default=10000, help="soak requests (0 = none)")
    parser.add_argument("--soak-concurrency", type=int, default=16)
    parser.add_argument("--soak-seconds", type=float, default=900)
    parser.add_argument("--bad-fraction", type=float, default=0.05)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    machine = describe_machine()
    print(machine_line(machine), flush=True)
    lines = read_lines(args.source)[: args.sentences]
    batch = batch_figures(args, lines)
    print(f"batch decoder: {batch['sentences_per_s']} sentences/s "
          f"({batch['sentences']} sentences in {batch['seconds']} s)", flush=True)
    process, url = start_server(args)
    good = [(json.dumps({"text": [line], "beam_size": args.beam}).encode(), True)
            for line in lines]
    levels, soak = [], None
    try:
        count = args.requests or len(good)
        for concurrency in args.concurrency:
            bodies = [good[i % len(good)] for i in range(count)]
            before = httpx.get(url + "/stats").json()
            figures = asyncio.run(drive(url, bodies, concurrency, args.seconds))
            after = httpx.get(url + "/stats").json()
            searches = max(1, after["searches"] - before["searches"])
            figures["sentences_per_search"] = round(
                (after["sentences"] - before["sentences"]) / searches, 1)
            figures["of_batch"] = round(figures["sentences_per_s"] / batch["sentences_per_s"], 2)
            levels.append(figures)
            print(" ".join(f"{k}={v}" for k, v in figures.items()), flush=True)
        if args.soak:
            every = max(1, round(1 / args.bad_fraction)) if args.bad_fraction > 0 else 0
            bodies = [(BAD_BODIES[(i // every) % len(BAD_BODIES)], False)
                      if every and i % every == every - 1 else good[i % len(good)]
                      for i in range(args.soak)]
            rss_start = rss_mib(process.pid)
            soak = asyncio.run(drive(url, bodies, args.soak_concurrency, args.soak_seconds))
            soak.update(bad_sent=sum(1 for _, ok in bodies if not ok), total_sent=len(bodies),
                        rss_start_mib=round(rss_start, 1),
                        rss_end_mib=round(rss_mib(process.pid), 1))
            print("soak: " + " ".join(f"{k}={v}" for k, v in soak.items()), flush=True)
    finally:
        process.terminate()
        exit_code = process.wait(timeout=120)
    print(json.dumps({"benchmark": "serve_load", "machine": machine,
                      "checkpoints": [str(c) for c in args.checkpoint],
                      "quantize": args.quantize or "none", "beam": args.beam,
                      "batch_wait_ms": args.batch_wait_ms, "batch": batch, "levels": levels,
                      "soak": soak, "server_exit_code": exit_code}))


if __name__ == "__main__":
    main()
