"""The machine a benchmark ran on: CPU model, ISA level and the fp32 matmul peak of this run.

Machines differ 2-3x in speed, so every benchmark that reports a speed prints this description
and puts it in its JSON; a figure without it cannot be compared with anything.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from seq2seq.train import matmul_peak_flops

CPUINFO = Path("/proc/cpuinfo")
# What torch.backends.cpu.get_cpu_capability() reports for each ISA level on x86.
TORCH_CAPABILITY = {"AVX-512": "AVX512", "AVX2": "AVX2", "no AVX2": "DEFAULT"}


def isa_level(flags: set[str]) -> str:
    """"AVX-512" with avx512f, else "AVX2" with avx2, else "no AVX2"."""
    if "avx512f" in flags:
        return "AVX-512"
    return "AVX2" if "avx2" in flags else "no AVX2"


def parse_cpuinfo(text: str) -> dict[str, Any]:
    """Vendor, model name, family and model numbers and ISA level of the first processor."""
    fields: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, colon, value = line.partition(":")
        if colon:
            fields[key.strip()] = value.strip()
    number = {key: int(fields[key]) if fields.get(key, "").isdigit() else None
              for key in ("cpu family", "model")}
    return {"cpu": fields.get("model name", "unknown"), "vendor": fields.get("vendor_id"),
            "family": number["cpu family"], "model": number["model"],
            "isa": isa_level(set(fields.get("flags", "").split()))}


def omp_wait_policy() -> str:
    """How OpenMP threads wait between parallel regions: the environment's OMP_WAIT_POLICY, or
    "default" (libgomp spins a while, then sleeps), which is what ``seq2seq`` runs with.

    The benchmarks leave it as the user has it, so that they measure what ``seq2seq train`` and
    ``seq2seq translate`` do. Forcing PASSIVE (threads sleep at every barrier) made the recipe's
    training step 1.6-2.2x slower and int8 beam search 1.3-1.5x slower on a 2-core Zen 3
    (2 December 2026); earlier sessions had set it to steady a shared host."""
    return os.environ.get("OMP_WAIT_POLICY") or "default"


def describe_machine(peak_flops: float | None = None, device: str = "cpu") -> dict[str, Any]:
    """This machine's CPU (``/proc/cpuinfo``), the ISA torch dispatches to (a cross-check), the
    threads, and the fp32 matmul peak: ``peak_flops`` if the caller measured it in this run, else
    measured now with ``seq2seq.train.matmul_peak_flops`` on the current threads. With a CUDA
    ``device`` also the GPU's name and its own matmul peak."""
    cpu = parse_cpuinfo(CPUINFO.read_text() if CPUINFO.exists() else "")
    capability = torch.backends.cpu.get_cpu_capability()
    if peak_flops is None:
        peak_flops = matmul_peak_flops(torch.device("cpu"))
    machine = {**cpu, "torch_cpu_capability": capability,
               "isa_agrees_with_torch": TORCH_CAPABILITY[cpu["isa"]] == capability,
               "logical_cpus": os.cpu_count(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "matmul_peak_gflops": round(peak_flops / 1e9, 1),
               "omp_wait_policy": omp_wait_policy()}
    if torch.device(device).type == "cuda":
        gpu = torch.device(device)
        machine.update(gpu=torch.cuda.get_device_name(gpu),
                       gpu_matmul_peak_gflops=round(matmul_peak_flops(gpu) / 1e9, 1))
    return machine


def machine_line(machine: dict[str, Any]) -> str:
    """One printable line: ``machine: AMD EPYC (AuthenticAMD family 25 model 1), AVX2, ...``."""
    isa = machine["isa"]
    if not machine["isa_agrees_with_torch"]:
        isa += f" (but torch dispatches {machine['torch_cpu_capability']} kernels)"
    line = (f"machine: {machine['cpu']} ({machine['vendor']} family {machine['family']} model "
            f"{machine['model']}), {isa}, {machine['logical_cpus']} logical CPUs, "
            f"{machine['threads']} threads, fp32 matmul peak {machine['matmul_peak_gflops']} "
            f"GFLOP/s, torch {machine['torch']}, OpenMP wait policy "
            f"{machine.get('omp_wait_policy', 'default')}")
    if "gpu" in machine:
        line += (f"; GPU {machine['gpu']}, fp32 matmul peak "
                 f"{machine['gpu_matmul_peak_gflops']} GFLOP/s")
    return line
