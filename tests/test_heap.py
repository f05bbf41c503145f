"""The heap policy the command line sets: tensors under 32 MiB live in the heap, its freed
top is kept for the next one instead of being unmapped and faulted in again, and every thread
allocates from the one heap."""

import subprocess
import sys

import pytest

from seq2seq.heap import _glibc

# A fresh process (glibc's thresholds as they start) writes and frees a 24 MiB tensor and prints
# how much the heap ([heap] in /proc/self/maps) grew with it, and how much stays after the free.
HEAP_GROWTH = """
import sys, torch
from seq2seq.heap import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory()
def heap_bytes():
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith("[heap]"):
            low, high = (int(x, 16) for x in line.split()[0].split("-"))
            return high - low
    return 0
start = heap_bytes()
tensor = torch.empty(6 << 20)
tensor.fill_(1.0)
written = heap_bytes()
del tensor
print(written - start, heap_bytes() - start)
"""
TENSOR_BYTES = 24 << 20


def _heap_growth(policy: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", HEAP_GROWTH, policy], capture_output=True,
                         text=True, check=True).stdout
    written, freed = out.split()
    return int(written), int(freed)


@pytest.mark.skipif(_glibc() is None or sys.platform != "linux", reason="glibc on Linux only")
def test_a_freed_tensor_stays_in_the_heap_for_the_next_one():
    written, freed = _heap_growth("retain")  # the heap's free top may hold a little of it
    assert written > TENSOR_BYTES * 3 // 4 and freed == written
    # glibc's initial threshold (128 KiB) maps such a tensor afresh, outside the heap: the
    # setting is what puts it there.
    assert _heap_growth("default")[0] < TENSOR_BYTES // 4


# A fresh process: a second thread allocates and frees a tensor; glibc's malloc_stats (on
# stderr) then lists one "Arena N:" block per heap.
THREAD_ARENAS = """
import sys, threading, torch
from seq2seq.heap import _glibc, retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory()
def allocate():
    tensor = torch.ones(1 << 12)
    del tensor
worker = threading.Thread(target=allocate)
worker.start()
worker.join()
_glibc().malloc_stats()
"""


def _arenas(policy: str) -> int:
    err = subprocess.run([sys.executable, "-c", THREAD_ARENAS, policy], capture_output=True,
                         text=True, check=True).stderr
    return sum(line.startswith("Arena ") for line in err.splitlines())


@pytest.mark.skipif(_glibc() is None or sys.platform != "linux", reason="glibc on Linux only")
def test_worker_threads_share_one_heap():
    """Decoding workers' freed blocks stay reusable by each other: with the policy, a second
    thread allocates from the main heap; without it, glibc gives it an arena of its own."""
    assert _arenas("retain") == 1
    assert _arenas("default") >= 2
